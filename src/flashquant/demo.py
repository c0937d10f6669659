"""python -m flashquant demo: a Llama-3-architecture model (seeded random weights) generating tokens with plain
PyTorch and with flashquant (kernels, int8, int4), checked against the fp32 reference and timed.

Defaults run in under a minute on a 2-core CPU (llama3-1b-like, 2 layers); on a GPU, llama3-8b-like.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from flashquant.models.llama import CPUDecoder, CUDAGraphDecoder, KVCache, Llama, config_from_preset
from flashquant.quant import QUANTIZE_METHODS


def _on_cuda(device) -> bool:
    return str(device).startswith("cuda")  # "cuda", "cuda:1", ...


def _sync(device):
    if _on_cuda(device):
        torch.cuda.synchronize()


@torch.inference_mode()
def measure(
    model: Llama, prompt: torch.Tensor, new_tokens: int, device: str, progress: bool, fast: bool = False
) -> dict:
    """Greedy generation with timing: prefill (one forward over the prompt), then decode steps: eager, or with
    `fast` the step without per-op Python (on CUDA a CUDA graph of it replayed, on CPUs models.llama.CPUDecoder
    where it supports the model; the result's "decode_path" says which ran)."""
    B, S = prompt.shape
    dtype = model.embed_tokens.weight.dtype
    if _on_cuda(device):
        torch.cuda.reset_peak_memory_stats()
    cache = KVCache(model.cfg, B, S + new_tokens, dtype, device)
    _sync(device)
    t0 = time.perf_counter()
    logits = model(prompt, cache=cache, logits_at=torch.full((B,), S - 1, device=device))
    _sync(device)
    prefill_s = time.perf_counter() - t0
    cache.advance([S] * B)
    step_fn, path = (lambda t: model(t, cache=cache)), "eager"
    if fast and _on_cuda(device):
        step_fn, path = CUDAGraphDecoder(model, cache), "CUDA graph"
    elif fast and CPUDecoder.unsupported(model, cache) is None:
        step_fn, path = CPUDecoder(model, cache), "CPUDecoder"
    first_logits = logits[:, -1].clone()
    tokens = [logits[:, -1].argmax(-1)]
    steps = range(new_tokens - 1)
    if progress:
        try:
            from tqdm import tqdm

            steps = tqdm(steps, desc="  decode", unit="tok", leave=False)
        except ImportError:
            pass
    step_s = []
    for _ in steps:
        t0 = time.perf_counter()
        logits = step_fn(tokens[-1][:, None])
        nxt = logits[:, -1].argmax(-1)
        _sync(device)
        step_s.append(time.perf_counter() - t0)
        cache.advance([1] * B)
        tokens.append(nxt)
    step = statistics.median(step_s) if step_s else float("nan")
    return {
        "prefill_tok_s": B * S / prefill_s,
        "decode_tok_s": B / step,
        "ms_per_token": 1e3 * step,
        "weight_gb": model.weight_bytes / 1e9,
        "kv_cache_gb": cache.nbytes / 1e9,
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if _on_cuda(device) else None,
        "decode_path": path,
        "tokens": torch.stack(tokens, 1).tolist(),
        "first_logits": first_logits,
    }


def sqnr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    noise = (ref.double() - x.double()).pow(2).sum()
    return float(10 * torch.log10(ref.double().pow(2).sum() / noise)) if noise > 0 else float("inf")


# The decode without per-op Python, next to the eager one: its result key and its column's name.
FAST_DECODE = {"decode_tok_s_graph": "graphed", "decode_tok_s_direct": "direct"}


def _forced(r: dict) -> str:
    """The teacher-forced top-1 agreement of a result row, "same/total" ("-" in runs recorded before it existed)."""
    return f"{r['forced_same']}/{r['forced_total']}" if "forced_same" in r else "-"


def markdown(run: dict) -> str:
    """The results table of a `--json` run, as markdown (for the README)."""
    n = run["args"]["new_tokens"]
    fast = next((k for k in FAST_DECODE if any(k in r for r in run["results"])), None)
    head = "| variant | prefill tok/s | decode tok/s |" + (f" {FAST_DECODE[fast]} tok/s |" if fast else "")
    head += " ms/token | weights GB | logit SQNR dB vs fp32 | greedy tokens = fp32 | top-1 = fp32 (forced) |"
    lines = [head, "|---|" + "---:|" * (head.count("|") - 2)]
    for r in run["results"]:
        g = f" {r[fast]:.2f} |" if fast in r else (" - |" if fast else "")
        lines.append(
            f"| {r['name']} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.2f} |{g} {r['ms_per_token']:.2f} | "
            f"{r['weight_gb']:.3f} | {r['sqnr_db']:.1f} | {r['same_tokens']}/{n} | {_forced(r)} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(prog="python -m flashquant demo", description=__doc__)
    ap.add_argument("--preset", default="llama3-8b-like" if cuda else "llama3-1b-like")
    ap.add_argument("--layers", type=int, default=None if cuda else 2, help="override the number of layers")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=2048 if cuda else 32)
    ap.add_argument("--new-tokens", type=int, default=64 if cuda else 16)
    ap.add_argument("--variants", nargs="+", help="subset of variant names to run")
    ap.add_argument("--json", help="also write the results table to this JSON file")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--quant-method",
        choices=QUANTIZE_METHODS,
        default="minmax",
        help="how quantize() picks each group's range (mse: a clip search, better int4 SQNR, slower to quantize;"
        " gptq: calibrated on --calib-tokens random tokens)",
    )
    ap.add_argument(
        "--calib-tokens",
        type=int,
        default=8192,
        help="with --quant-method gptq: calibration tokens (256 per sequence)",
    )
    ap.add_argument(
        "--act-order",
        action="store_true",
        help="with --quant-method gptq: quantize each matrix's columns by decreasing input energy",
    )
    ap.add_argument(
        "--no-graph",
        action="store_true",
        help="skip the second decode measurement of the flashquant variants (CUDA: a CUDA graph of the step; "
        "CPU: models.llama.CPUDecoder)",
    )
    ap.add_argument(
        "--markdown", metavar="RUN.json", help="print the results table of a --json run as markdown"
    )
    args = ap.parse_args(argv)
    if args.act_order and args.quant_method != "gptq":
        ap.error(f"--act-order needs --quant-method gptq, got --quant-method {args.quant_method}")
    if args.markdown:
        with open(args.markdown) as f:
            print(markdown(json.load(f)))
        return 0

    device = "cuda" if cuda else "cpu"
    cfg = config_from_preset(args.preset, num_layers=args.layers)
    half = torch.bfloat16
    # (name, activation/weight dtype, ops backend, quantization (bits, group) or None). The PyTorch variants are
    # the model as Hugging Face writes it (separate q/k/v and gate/up linears, PyTorch ops); the flashquant ones
    # fuse those projections (Llama.fuse_projections) and run flashquant's kernels.
    variants = [("pytorch fp32 (SDPA)", torch.float32, "torch", None)]
    variants += [("pytorch bf16 (SDPA)", half, "torch", None)]
    if cuda:
        variants += [
            ("flashquant bf16 (triton attention)", half, "auto", None),
            ("flashquant int8 w/ bf16 act", half, "auto", (8, -1)),
            ("flashquant int4 g128 w/ bf16 act", half, "auto", (4, 128)),
        ]
    else:
        # both activation dtypes: with bf16 the activations and the KV cache take half the bytes and, on CPUs with
        # AMX, prefill's quantized matmuls run on the tiles
        variants += [
            ("flashquant int8 (C++ kernel)", torch.float32, "auto", (8, -1)),
            ("flashquant int4 g128 (C++ kernel)", torch.float32, "auto", (4, 128)),
            ("flashquant int8 w/ bf16 act (C++ kernel)", half, "auto", (8, -1)),
            ("flashquant int4 g128 w/ bf16 act (C++ kernel)", half, "auto", (4, 128)),
        ]
    if args.variants:
        variants = [v for v in variants if any(s in v[0] for s in args.variants)]
    print(
        f"flashquant demo: {args.preset} ({cfg.num_layers} layers, hidden {cfg.hidden_size}, "
        f"{cfg.num_heads}/{cfg.num_kv_heads} heads, vocab {cfg.vocab_size}) on {device}, batch {args.batch}, "
        f"prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy"
    )
    g = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt_len), generator=g).to(device)
    rows, stopped, env = [], None, None
    if args.json:
        from flashquant.bench.harness import environment

        env = environment(device)
    try:
        for variant in variants:
            rows.append(_run_variant(variant, cfg, prompt, args, device, ref=rows[0] if rows else None))
            if args.json:  # after every variant: a run stopped from outside keeps what it measured
                _write_json(args.json, env, args, rows, None)
    except KeyboardInterrupt:  # Ctrl-C, or SIGINT from a time limit: report the variants that finished
        stopped = f"interrupted after {len(rows)} of {len(variants)} variants"
        print(f"\n{stopped}")
    _print_table(rows, args.new_tokens)
    if args.json:
        _write_json(args.json, env, args, rows, stopped)
        print(f"wrote {args.json}")
    return 130 if stopped else 0


def _write_json(path, env, args, rows, stopped) -> None:
    keep = [{k: v for k, v in r.items() if k not in ("first_logits", "tokens")} for r in rows]
    run = {"environment": env, "args": vars(args), "results": keep}
    if stopped:
        run["stopped_early"] = stopped
    with open(path, "w") as f:
        json.dump(run, f, indent=1)


def _run_variant(variant, cfg, prompt, args, device, ref: dict | None) -> dict:
    """Build and measure one variant; its row compares it with `ref` (the first variant's row, None for that one)."""
    name, dtype, backend, quant = variant
    print(f"- {name}: building", flush=True)
    # Every variant starts from the same seeded weights (same device => same numbers), then is cast and/or
    # quantized.
    model = Llama.random(cfg, seed=args.seed, dtype=dtype, device=device, attn_backend=backend)
    if quant:  # every linear, lm_head included (it is the largest matrix of small Llamas)
        options = {"method": args.quant_method}
        if args.quant_method == "gptq":  # random tokens: the weights are random too
            g = torch.Generator().manual_seed(args.seed + 1)
            calib = torch.randint(0, cfg.vocab_size, (max(1, args.calib_tokens // 256), 256), generator=g)
            options["calibration"] = lambda m: [m(seq[None].to(device)) for seq in calib]
            options["act_order"] = args.act_order
        model.quantize(*quant, skip=(), **options)
    if backend != "torch":
        model.fuse_projections()
    # Warm-up at the timed prompt length: prefill-sized shapes have their own kernel specializations (Triton JIT,
    # the quantized linears' prefill path, cuBLAS's lazily loaded kernels), which an 8-token warm-up left to the
    # timed prefill (on the H100 the first variants then showed ~1.8k prefill tok/s instead of ~15-30k).
    measure(model, prompt, 2, device, False)
    r = measure(model, prompt, args.new_tokens, device, progress=True)
    # The same decode again without per-op Python: on CUDA replayed from a CUDA graph (no launch overhead), on CPUs
    # through CPUDecoder (the same C++ kernels called directly, so the same tokens: recorded, not assumed).
    if not args.no_graph and (device == "cuda" or backend != "torch"):  # (graphs: PyTorch's variants too)
        fast = measure(model, prompt, args.new_tokens, device, False, fast=True)
        if fast["decode_path"] != "eager":
            r["decode_tok_s_graph" if device == "cuda" else "decode_tok_s_direct"] = fast["decode_tok_s"]
            r["fast_decode_same_tokens"] = fast["tokens"] == r["tokens"]
    # Teacher-forced: each generated position's next token given the fp32 reference's tokens so far (one forward
    # over them, no cache). Greedy runs part ways at the first near-tie (random weights have many), after which
    # their tokens are not comparable; every forced position is. For the reference itself this checks the cached
    # decode against a cache-free forward.
    ref_tokens = torch.tensor((ref or r)["tokens"], device=device)  # (B, new_tokens)
    seq = torch.cat([prompt, ref_tokens[:, :-1]], 1)
    at = torch.arange(prompt.shape[1] - 1, seq.shape[1], device=device).expand(seq.shape[0], -1)
    with torch.inference_mode():
        forced = model(seq, logits_at=at).argmax(-1)
    r["forced_same"], r["forced_total"] = int((forced == ref_tokens).sum()), ref_tokens.numel()
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    if ref is None:
        r["top1_agree"], r["sqnr_db"], r["same_tokens"] = 1.0, float("inf"), args.new_tokens
    else:
        r["sqnr_db"] = sqnr_db(ref["first_logits"], r["first_logits"])
        r["top1_agree"] = float(
            (ref["first_logits"].argmax(-1) == r["first_logits"].argmax(-1)).float().mean()
        )
        same = 0
        for a, b in zip(ref["tokens"][0], r["tokens"][0]):
            if a != b:
                break
            same += 1
        r["same_tokens"] = same
    r["name"], r["fused_projections"] = name, backend != "torch"
    return r


def _print_table(rows, new_tokens) -> None:
    width = max([36] + [len(r["name"]) for r in rows])
    fast = next((k for k in FAST_DECODE if any(k in r for r in rows)), "decode_tok_s_graph")
    print(
        f"\n{'variant':{width}s} {'prefill tok/s':>13s} {'decode tok/s':>12s} {FAST_DECODE[fast]:>8s} {'ms/token':>9s} "
        f"{'weights GB':>10s} "
        f"{'peak GB':>8s} {'logit SQNR dB':>13s} {'greedy = fp32':>13s} {'top-1 = fp32':>12s}"
    )
    for r in rows:
        peak = f"{r['peak_mem_gb']:.2f}" if r["peak_mem_gb"] is not None else "-"
        graphed = f"{r[fast]:.2f}" if fast in r else "-"
        print(
            f"{r['name']:{width}s} {r['prefill_tok_s']:13.1f} {r['decode_tok_s']:12.2f} {graphed:>8s} "
            f"{r['ms_per_token']:9.2f} "
            f"{r['weight_gb']:10.3f} {peak:>8s} {r['sqnr_db']:13.1f} {r['same_tokens']:>6d}/{new_tokens:<6d} "
            f"{_forced(r):>12s}"
        )
    print(
        "\nlogit SQNR: first generated position vs the fp32 reference; 'greedy = fp32': leading greedy tokens that"
        " match the fp32 model's; 'top-1 = fp32': generated positions whose next token, given the fp32 model's"
        " tokens so far (teacher-forced), is the fp32 model's.\n"
        "Quantized variants quantize every linear incl. lm_head (round-to-nearest, no calibration; --quant-method"
        " mse searches each group's clip range); random Gaussian weights are a hard case for int4, so expect low"
        " int4 SQNR here.\n"
        "The flashquant variants fuse q/k/v and gate/up into one projection each; the PyTorch variants keep"
        " Hugging Face's separate linears."
    )
