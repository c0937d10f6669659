"""Times one decode step of a flashquant Llama on the CPU two ways, alternating the two in one process (single
runs of two builds differ by +-10-20% on a shared host; alternating rounds in one process do not).

    .venv/bin/python scripts/cpu_decode_step_ab.py [--compare layer-ops|decoder] [--preset llama3-1b-like]
        [--layers 2] [--quant int4|int8|none] [--batch 1] [--json PATH]

--compare layer-ops (session 27): "old" runs rms_norm / rotary_embedding / silu_mul on backend="torch" and the
append by PyTorch indexing, "new" the C++ ops (what `auto` picks); both run the same C++ attention and quant_matmul
kernels. Prints the median step time of each, then the same comparison per op at the model's decode sizes (public
API calls, alternated the same way).
--compare decoder (session 28): "old" is the eager model (``model(tokens, cache=cache)``, every op through its
public function), "new" the same step through models.llama.CPUDecoder (the same C++ ops called directly); the
logits are checked to be equal first.
--json records the rows with the environment (bench/results/).
"""

import argparse
import statistics
import sys
import time
import timeit

import torch

import flashquant as fq
from flashquant import layer_ops
from flashquant.bench.harness import write_run
from flashquant.models.llama import CPUDecoder, KVCache, Llama, config_from_preset

attention_module = sys.modules["flashquant.attention"]  # the package's `attention` name is the function


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compare", choices=["layer-ops", "decoder"], default="layer-ops")
    ap.add_argument("--preset", default="llama3-1b-like")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--quant", choices=["int4", "int8", "none"], default="int4")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--json", help="write the results and the environment to this path")
    args = ap.parse_args()
    cfg = config_from_preset(args.preset, num_layers=args.layers)
    model = Llama.random(cfg, seed=0, dtype=torch.bfloat16, device="cpu")
    if args.quant != "none":
        model.quantize(4 if args.quant == "int4" else 8, 128 if args.quant == "int4" else -1, skip=())
    model.fuse_projections()

    real_append, real_order = attention_module._append_kv_impl, layer_ops._auto_order

    def use(mode: str) -> None:  # --compare layer-ops: the PyTorch ops ("old") or the C++ ones
        if mode == "old" and args.compare == "layer-ops":
            attention_module._append_kv_impl = lambda *a: real_append(*a[:-1], "torch")
            layer_ops._auto_order = lambda device: ("torch",)
        else:
            attention_module._append_kv_impl, layer_ops._auto_order = real_append, real_order

    B, prompt_len = args.batch, 32
    prompt = torch.randint(0, cfg.vocab_size, (B, prompt_len))
    steps = {"old": [], "new": []}
    with torch.inference_mode():
        cache = KVCache(cfg, B, prompt_len + 20 * args.rounds + 8, torch.bfloat16, "cpu")
        token = model(prompt, cache=cache, logits_at=torch.full((B,), prompt_len - 1))[:, -1].argmax(-1)[
            :, None
        ]
        cache.advance([prompt_len] * B)
        step = {"old": lambda t: model(t, cache=cache), "new": lambda t: model(t, cache=cache)}
        if args.compare == "decoder":
            step["new"] = CPUDecoder(model, cache)
            saved = cache.k.clone(), cache.v.clone()
            eager = model(token, cache=cache)
            cache.k.copy_(saved[0]), cache.v.copy_(saved[1])
            if not torch.equal(eager, step["new"](token)):
                raise SystemExit("CPUDecoder's logits differ from the eager model's")
        for r in range(args.rounds):
            for mode in ("old", "new") if r % 2 == 0 else ("new", "old"):
                use(mode)
                times = []
                for _ in range(10):
                    t0 = time.perf_counter()
                    nxt = step[mode](token)[:, -1].argmax(-1)
                    times.append(time.perf_counter() - t0)
                    cache.advance([1] * B)
                    token = nxt[:, None]
                if r > 0:  # the first round warms up
                    steps[mode].append(statistics.median(times))
    use("new")
    old, new = statistics.median(steps["old"]), statistics.median(steps["new"])
    print(
        f"{args.compare}: {args.preset}, {args.layers} layers, {args.quant}, bf16, batch {B}, "
        f"{torch.get_num_threads()} threads: decode step old {old * 1e3:.2f} ms, new {new * 1e3:.2f} ms "
        f"({old / new:.3f}x); round medians old {min(steps['old']) * 1e3:.2f}-{max(steps['old']) * 1e3:.2f}, new "
        f"{min(steps['new']) * 1e3:.2f}-{max(steps['new']) * 1e3:.2f} ms"
    )
    rows = [{"case": "decode step", "old_ms": old * 1e3, "new_ms": new * 1e3, "speedup": old / new}]
    if args.compare == "layer-ops":
        rows += per_op(cfg, args.rounds)
    for r in rows[1:]:
        old_us, new_us = r["old_ms"] * 1e3, r["new_ms"] * 1e3
        print(f"  {r['case']:44s} torch {old_us:7.1f} us  cpu {new_us:7.1f} us  {r['speedup']:.2f}x")
    if args.json:
        write_run(args.json, "cpu", args, rows)


def per_op(cfg, rounds: int) -> list[dict]:
    """Each replaced op at the model's decode sizes (batch 1, one token, bf16), backend "torch" against "cpu",
    alternated; the median of per-round minima."""
    dt, H, D = torch.bfloat16, cfg.hidden_size, cfg.head_dim
    x, res, w = torch.randn(1, 1, H, dtype=dt), torch.randn(1, 1, H, dtype=dt), torch.ones(H, dtype=dt)
    q, k = torch.randn(1, 1, cfg.num_heads, D, dtype=dt), torch.randn(1, 1, cfg.num_kv_heads, D, dtype=dt)
    pos, inv_freq = torch.tensor([[40]]), torch.rand(D // 2)
    gate, up = torch.randn(1, 1, 2 * cfg.intermediate_size, dtype=dt).chunk(2, -1)
    k_cache = torch.zeros(1, 256, cfg.num_kv_heads, D, dtype=dt)
    v_cache, lens = torch.zeros_like(k_cache), torch.tensor([40], dtype=torch.int32)
    cases = {
        f"rms_norm + residual, 1 x {H}": lambda b: fq.rms_norm(x, w, 1e-5, res, backend=b),
        f"rotary_embedding, {cfg.num_heads} + {cfg.num_kv_heads} heads of {D}": lambda b: fq.rotary_embedding(
            q, k, pos, inv_freq, backend=b
        ),
        f"silu_mul, 1 x {cfg.intermediate_size}": lambda b: fq.silu_mul(gate, up, backend=b),
        "append_kv, 1 token": lambda b: attention_module.append_kv(k_cache, v_cache, lens, k, k, backend=b),
    }
    rows = []
    with torch.inference_mode():
        for name, fn in cases.items():
            best = {"torch": [], "cpu": []}
            for r in range(rounds):
                for b in ("torch", "cpu") if r % 2 == 0 else ("cpu", "torch"):
                    best[b].append(min(timeit.repeat(lambda f=fn, b=b: f(b), number=500, repeat=3)) / 500)
            old, new = statistics.median(best["torch"]), statistics.median(best["cpu"])
            rows.append({"case": name, "old_ms": old * 1e3, "new_ms": new * 1e3, "speedup": old / new})
    return rows


if __name__ == "__main__":
    main()
