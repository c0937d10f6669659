"""python -m flashquant generate DIR: a Hugging Face-format Llama checkpoint directory (float, GPTQ or AWQ) generating
text greedily on flashquant's kernels (flashquant.models.llama, projections fused), with its prefill and decode
speed. Nothing is downloaded: DIR holds config.json, *.safetensors and, for text in and out, the tokenizer files
(read by transformers' AutoTokenizer; without them pass --prompt-ids).
"""

from __future__ import annotations

import argparse

import torch

from flashquant.demo import measure
from flashquant.models.llama import Llama
from flashquant.nn import QuantLinear

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _tokenizer(path: str):
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise SystemExit(
            "--prompt needs transformers (pip install transformers); or pass --prompt-ids"
        ) from None
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise SystemExit(f"no tokenizer could be read from {path} ({e}); pass --prompt-ids instead") from None


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(prog="python -m flashquant generate", description=__doc__)
    ap.add_argument("checkpoint", help="local checkpoint directory")
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument(
        "--prompt-ids", help="comma-separated token ids, instead of --prompt (no tokenizer needed)"
    )
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument(
        "--dtype", choices=("auto", *DTYPES), default="auto", help="auto: as the checkpoint stores it"
    )
    ap.add_argument("--device", default="cuda" if cuda else "cpu")
    ap.add_argument(
        "--quantize",
        choices=("none", "int8", "int4"),
        default="none",
        help="quantize a float checkpoint's linears on load (group 128 for int4, per channel for int8)",
    )
    ap.add_argument(
        "--no-graph",
        action="store_true",
        help="decode eagerly (the model's forward per token) instead of replaying a CUDA graph of the step (CUDA) "
        "or running it through models.llama.CPUDecoder (CPU)",
    )
    ap.add_argument(
        "--lm-head",
        choices=("keep", "int8", "int4"),
        default="keep",
        help="quantize the output projection too (checkpoints keep it in float: for small models, or tied "
        "embeddings, it is a large share of the bytes each decoded token reads)",
    )
    args = ap.parse_args(argv)
    if args.new_tokens < 1:
        ap.error(f"--new-tokens must be >= 1, got {args.new_tokens}")

    model = Llama.from_pretrained(args.checkpoint, dtype=DTYPES.get(args.dtype), device=args.device)
    quantized = any(isinstance(m, QuantLinear) for m in model.modules())
    if args.quantize != "none":
        if quantized:
            ap.error("--quantize is for float checkpoints; this one is already quantized")
        bits = int(args.quantize[3:])
        model.quantize(bits, 128 if bits == 4 else -1)
    if args.lm_head != "keep":
        if isinstance(model.lm_head, QuantLinear):
            ap.error("--lm-head: this checkpoint's lm_head is quantized already")
        model.quantize_lm_head(int(args.lm_head[3:]))
    model.fuse_projections()

    tokenizer = None
    if args.prompt_ids:
        try:
            ids = [int(t) for t in args.prompt_ids.split(",")]
        except ValueError:
            ap.error(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}")
    else:
        tokenizer = _tokenizer(args.checkpoint)
        ids = tokenizer(args.prompt)["input_ids"]
    vocab = model.cfg.vocab_size
    if not ids or not all(0 <= t < vocab for t in ids):
        ap.error(f"the prompt must be a non-empty list of token ids in [0, {vocab}), got {ids}")

    prompt = torch.tensor([ids], device=args.device)
    run = measure(
        model,
        prompt,
        args.new_tokens,
        args.device,
        progress=True,
        fast=not args.no_graph,
    )
    new = run["tokens"][0]
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and eos in new:
        new = new[: new.index(eos) + 1]
    text = tokenizer.decode(new) if tokenizer is not None else ",".join(map(str, new))
    kind = "quantized" if quantized else (args.quantize if args.quantize != "none" else "float")
    kind += f", lm_head {args.lm_head}" if args.lm_head != "keep" else ""
    print(
        f"{args.checkpoint} ({kind}, {str(model.embed_tokens.weight.dtype).replace('torch.', '')}, {args.device})"
    )
    print(f"prompt ({len(ids)} tokens): {args.prompt if tokenizer is not None else args.prompt_ids}")
    print(f"output ({len(new)} tokens): {text}")
    print(
        f"prefill {run['prefill_tok_s']:.1f} tok/s, decode {run['decode_tok_s']:.2f} tok/s "
        f"({run['ms_per_token']:.1f} ms/token, {run['decode_path']}), weights {run['weight_gb']:.2f} GB"
    )
    return 0
