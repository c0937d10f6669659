"""Times one decode step of a flashquant Llama on the CPU with the C++ layer ops and KV-cache append (what `auto`
picks since session 27) against the PyTorch ops they replaced, alternating the two in one process (single runs of
two builds differ by +-10-20% on a shared host; alternating rounds in one process do not).

    .venv/bin/python scripts/cpu_decode_step_ab.py [--preset llama3-1b-like] [--layers 2] [--quant int4|int8|none]

"old": rms_norm / rotary_embedding / silu_mul on backend="torch" and the append by PyTorch indexing; "new": the
C++ ops. Both run the same C++ attention and quant_matmul kernels. Prints the median step time of each.
"""

import argparse
import statistics
import sys
import time

import torch

import flashquant  # noqa: F401  (loads the ops)
from flashquant import layer_ops
from flashquant.models.llama import KVCache, Llama, config_from_preset

attention_module = sys.modules["flashquant.attention"]  # the package's `attention` name is the function


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="llama3-1b-like")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--quant", choices=["int4", "int8", "none"], default="int4")
    ap.add_argument("--rounds", type=int, default=12)
    args = ap.parse_args()
    cfg = config_from_preset(args.preset, num_layers=args.layers)
    model = Llama.random(cfg, seed=0, dtype=torch.bfloat16, device="cpu")
    if args.quant != "none":
        model.quantize(4 if args.quant == "int4" else 8, 128 if args.quant == "int4" else -1, skip=())
    model.fuse_projections()

    real_append, real_order = attention_module._append_kv_impl, layer_ops._auto_order

    def use(mode: str) -> None:
        if mode == "old":
            attention_module._append_kv_impl = lambda *a: real_append(*a[:-1], "torch")
            layer_ops._auto_order = lambda device: ("torch",)
        else:
            attention_module._append_kv_impl, layer_ops._auto_order = real_append, real_order

    prompt = torch.randint(0, cfg.vocab_size, (1, 32))
    steps = {"old": [], "new": []}
    with torch.inference_mode():
        cache = KVCache(cfg, 1, 32 + 20 * args.rounds + 8, torch.bfloat16, "cpu")
        token = model(prompt, cache=cache, logits_at=torch.tensor([31]))[:, -1].argmax(-1)[:, None]
        cache.advance([32])
        for r in range(args.rounds):
            for mode in ("old", "new") if r % 2 == 0 else ("new", "old"):
                use(mode)
                times = []
                for _ in range(10):
                    t0 = time.perf_counter()
                    nxt = model(token, cache=cache)[:, -1].argmax(-1)
                    times.append(time.perf_counter() - t0)
                    cache.advance([1])
                    token = nxt[:, None]
                if r > 0:  # the first round warms up
                    steps[mode].append(statistics.median(times))
    use("new")
    old, new = statistics.median(steps["old"]), statistics.median(steps["new"])
    print(
        f"{args.preset}, {args.layers} layers, {args.quant}, bf16, batch 1, {torch.get_num_threads()} threads: "
        f"decode step old {old * 1e3:.2f} ms, new {new * 1e3:.2f} ms ({old / new:.3f}x); round medians old "
        f"{min(steps['old']) * 1e3:.2f}-{max(steps['old']) * 1e3:.2f}, new "
        f"{min(steps['new']) * 1e3:.2f}-{max(steps['new']) * 1e3:.2f} ms"
    )


if __name__ == "__main__":
    main()
