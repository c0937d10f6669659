"""A GPTQ checkpoint loaded and run, recorded: what the dtype and a quantized lm_head do to generation speed, next
to the same weights dequantized into plain PyTorch linears in the same run.

``python -m flashquant.bench.checkpoint [--preset P] [--layers L] [--json FILE]`` writes a synthetic GPTQ
checkpoint (``Llama.random`` of the preset, int4 group 128 symmetric, ``Llama.save_pretrained``; nothing is
downloaded, so no real checkpoint), then for each variant loads it with ``Llama.from_pretrained`` (projections
fused) and times greedy generation with the demo's ``measure`` (prefill of `--prompt-len` tokens, median decode
step; best of `--reps` runs):

* ``<dtype> / lm_head <keep|int8|int4>``: the checkpoint's QuantLinears (flashquant kernels), activations and the
  float tensors in fp16 (as stored) or bf16, the output projection kept as the checkpoint has it (float, tied to
  the embedding for presets that tie) or quantized on load;
* ``<dtype> dense (dequantized)``: the anchor, every QuantLinear replaced by an ``nn.Linear`` holding its
  dequantized weight (the same weights, PyTorch's ``F.linear``).

Each row also gives the bytes a decode step must read (every linear's weight; the embedding is only gathered) and
the bandwidth that makes at the measured decode rate, to compare with the machine's read bandwidth (the
environment's ``measured_bandwidth_gbs``). "Weights held" is memory: a quantized lm_head adds its codes to the
embedding it was tied to.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from torch import nn

from flashquant.demo import measure
from flashquant.models.llama import Llama, config_from_preset
from flashquant.nn import QuantLinear

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _dense(model: Llama) -> Llama:
    """Every QuantLinear replaced, in place, by an nn.Linear holding its dequantized weight."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, QuantLinear):
            dense = nn.Linear(mod.in_features, mod.out_features, mod.bias is not None, dtype=mod.weight_dtype)
            with torch.no_grad():
                dense.weight.copy_(mod.dequantize())
                if mod.bias is not None:
                    dense.bias.copy_(mod.bias)
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, dense)
    return model


def bytes_read_per_token(model: Llama) -> int:
    """What one decode step must stream: every linear's weight (codes + scales + zeros, or the float matrix) and
    bias; the embedding is only gathered, a row per token, and the norms are negligible."""
    total = 0
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            total += mod.qweight.nbytes
        elif isinstance(mod, nn.Linear):
            total += mod.weight.numel() * mod.weight.element_size()
        else:
            continue
        if mod.bias is not None:
            total += mod.bias.numel() * mod.bias.element_size()
    return total


def variants():
    for dtype in DTYPES:
        for lm_head in ("keep", "int8", "int4"):
            yield f"{dtype} / lm_head {lm_head}", dtype, lm_head, False
        yield f"{dtype} dense (dequantized)", dtype, "keep", True


def run(path: str, prompt_len: int, new_tokens: int, reps: int, seed: int) -> list[dict]:
    rows = []
    for name, dtype, lm_head, dense in variants():
        start = time.perf_counter()
        model = Llama.from_pretrained(path, dtype=DTYPES[dtype])
        load_s = time.perf_counter() - start
        if lm_head != "keep":
            model.quantize_lm_head(int(lm_head[3:]))
        if dense:
            _dense(model)
        model.fuse_projections()
        prompt = torch.randint(
            0, model.cfg.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(seed)
        )
        runs = [measure(model, prompt, new_tokens, "cpu", progress=False) for _ in range(reps)]
        best = min(runs, key=lambda r: r["ms_per_token"])
        read_gb = bytes_read_per_token(model) / 1e9
        rows.append(
            {
                "name": name,
                "load_s": load_s,
                "prefill_tok_s": max(r["prefill_tok_s"] for r in runs),
                "decode_tok_s": best["decode_tok_s"],
                "ms_per_token": best["ms_per_token"],
                "weight_gb": best["weight_gb"],
                "read_gb_per_token": read_gb,
                "decode_gbs": read_gb * best["decode_tok_s"],
                "tokens": best["tokens"][0],
            }
        )
        print(
            f"  {name:28s} load {load_s:5.1f} s  prefill {rows[-1]['prefill_tok_s']:7.1f} tok/s  "
            f"decode {best['decode_tok_s']:6.2f} tok/s ({read_gb:.3f} GB read per token: "
            f"{read_gb * best['decode_tok_s']:5.1f} GB/s)  weights held {best['weight_gb']:.2f} GB"
        )
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flashquant.bench.checkpoint", description=__doc__)
    ap.add_argument("--preset", default="llama3-1b-like")
    ap.add_argument("--layers", type=int, default=2, help="override the preset's number of layers")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the rows, with the environment and commit, to this file")
    args = ap.parse_args(argv)
    cfg = config_from_preset(args.preset, num_layers=args.layers)
    with tempfile.TemporaryDirectory() as path:
        model = Llama.random(cfg, seed=args.seed, dtype=torch.float16).quantize(4, 128)
        model.save_pretrained(path)
        del model
        print(f"synthetic GPTQ checkpoint: {args.preset}, {cfg.num_layers} layers, int4 g128 symmetric, fp16")
        rows = run(path, args.prompt_len, args.new_tokens, args.reps, args.seed)
    if args.json:
        from .harness import write_run

        write_run(args.json, "cpu", args, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
