"""Times the decode step of a transformers LlamaForCausalLM (random weights, Llama-3.2-1B-like shapes) as users run
it on the CPU, with and without flashquant, the variants alternated round by round in one process (single runs on a
shared host differ by +-10-20%; alternated rounds do not).

    .venv/bin/python scripts/transformers_decode_ab.py [--layers 4] [--prompt 128] [--batch 1] [--rounds 8]
        [--json PATH]

--batch B > 1: B prompts left-padded as batched generation pads them (sequence b's first b * prompt / (2B) tokens are
padding, marked in the attention_mask that every step passes, extended by one column a step).

Variants (one model each, the same random weights, bf16, batch 1, eager; greedy steps against the model's own
DynamicCache after a prompt of --prompt tokens):
  sdpa + bf16          transformers as it comes: attn_implementation="sdpa", nn.Linear (the anchor)
  fq + bf16            attn_implementation="fq" (flashquant.integrations.transformers.register())
  sdpa + int4          quantize_transformers_model(bits=4, group_size=128), lm_head kept in bf16
  fq + int4            both
  fq + int4 + fused    both, and fuse_transformers_model (RMSNorm and the SwiGLU MLP as flashquant's fused ops)
Prints the median step time of each variant (the median over rounds of each round's median of --steps steps);
--json records them with the environment (bench/results/).
"""

import argparse
import copy
import statistics
import time

import torch

from flashquant.bench.harness import write_run
from flashquant.integrations import transformers as fqt

VARIANTS = ("sdpa + bf16", "fq + bf16", "sdpa + int4", "fq + int4", "fq + int4 + fused")


def base_model(layers: int):
    """The float model every variant starts from (random weights, seed 0)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(torch.bfloat16).eval()


def build(variant: str, base):
    model = copy.deepcopy(base)
    model.set_attn_implementation("fq" if variant.startswith("fq") else "sdpa")
    if "int4" in variant:
        fqt.quantize_transformers_model(model, bits=4, group_size=128)
    if "fused" in variant:
        fqt.fuse_transformers_model(model)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--json", help="write the results and the environment to this path")
    args = ap.parse_args()
    fqt.register()
    base = base_model(args.layers)
    models = {variant: build(variant, base) for variant in VARIANTS}
    del base
    prompt = torch.randint(0, 128256, (args.batch, args.prompt), generator=torch.Generator().manual_seed(1))
    mask0 = torch.ones(args.batch, args.prompt, dtype=torch.long)
    for b in range(args.batch):
        mask0[b, : b * args.prompt // (2 * args.batch)] = 0
    padded = args.batch > 1
    caches, tokens, first, masks = {}, {}, {}, {}
    with torch.inference_mode():
        for variant, model in models.items():
            out = model(prompt, use_cache=True, **({"attention_mask": mask0} if padded else {}))
            caches[variant], tokens[variant] = out.cache, out.logits[:, -1:].argmax(-1)
            first[variant] = tokens[variant].flatten().tolist()
            masks[variant] = mask0
        times = {v: [] for v in VARIANTS}
        for r in range(args.rounds + 1):  # round 0 warms up
            order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
            for variant in order:
                model, step_times = models[variant], []
                for _ in range(args.steps):
                    t0 = time.perf_counter()
                    kw = {}
                    if padded:
                        masks[variant] = torch.cat([masks[variant], mask0.new_ones(args.batch, 1)], 1)
                        kw["attention_mask"] = masks[variant]
                    out = model(tokens[variant], cache=caches[variant], use_cache=True, **kw)
                    step_times.append(time.perf_counter() - t0)
                    tokens[variant] = out.logits[:, -1:].argmax(-1)
                if r > 0:
                    times[variant].append(statistics.median(step_times))
    anchor = statistics.median(times[VARIANTS[0]])
    rows = []
    print(
        f"transformers LlamaForCausalLM, {args.layers} layers of Llama-3.2-1B's shapes, bf16, batch {args.batch}"
        f"{' (left-padded)' if padded else ''}, prompt {args.prompt}, {torch.get_num_threads()} threads; "
        f"median decode step over {args.rounds} rounds:"
    )
    for variant in VARIANTS:
        ms = statistics.median(times[variant]) * 1e3
        lo, hi = min(times[variant]) * 1e3, max(times[variant]) * 1e3
        print(f"  {variant:18s} {ms:8.2f} ms  ({anchor * 1e3 / ms:.2f}x)  rounds {lo:.2f}-{hi:.2f} ms")
        rows.append(
            {
                "case": variant,
                "step_ms": ms,
                "speedup_vs_sdpa_bf16": anchor * 1e3 / ms,
                "round_medians_ms": [t * 1e3 for t in times[variant]],
                "first_token": first[variant],
            }
        )
    if args.json:
        write_run(args.json, "cpu", args, rows)


if __name__ == "__main__":
    main()
