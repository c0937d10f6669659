"""python -m flashquant            backends available here + every op once against its reference
python -m flashquant demo [...]    the end-to-end Llama demo (see flashquant.demo)
python -m flashquant generate DIR [...]
                                   a Hugging Face-format Llama checkpoint (float, GPTQ, AWQ) generating text
python -m flashquant tune [...]    measure and store this GPU's Triton launch configs (see flashquant.tune)
python -m flashquant compile-check [...]
                                   compile the Triton kernels for sm_80/sm_89/sm_90a without a GPU and report
                                   registers, spills, shared memory, tensor-core use (see flashquant.aot)
python -m flashquant.bench [...]   the benchmark suite
"""

from __future__ import annotations

import sys


def check() -> int:
    import torch

    import flashquant as fq
    from flashquant._dispatch import OPS

    print(
        f"flashquant {fq.__version__} | torch {torch.__version__} | "
        f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device'}"
    )
    info = fq.backends()
    for name, b in info.items():
        print(f"  {name:9s} {b}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if info["triton"].available:
        from flashquant.kernels import configs

        where = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
        print(f"  Triton launch configs: {configs.describe(where)}")
    dtype = torch.float16 if device == "cuda" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    q, k, v = rnd(2, 37, 8, 64), rnd(2, 53, 2, 64), rnd(2, 53, 2, 64)
    cq = torch.tensor([0, 20, 37], dtype=torch.int32, device=device)
    ck = torch.tensor([0, 25, 53], dtype=torch.int32, device=device)
    lens = torch.tensor([30, 17], dtype=torch.int32, device=device)
    w, x = rnd(96, 256), rnd(3, 256)
    qw = fq.quantize(w, 4, 128)
    hidden, norm_w, positions = rnd(3, 256), rnd(256), torch.arange(37, device=device).expand(2, 37)
    inv_freq = torch.rand(32, generator=g).to(device)

    def flat(*tensors):  # ops that return several tensors, checked as one
        return torch.cat([t.flatten() for t in tensors])

    cases = {
        "attention": lambda be: fq.attention(q, k, v, causal=True, backend=be),
        "attention_varlen": lambda be: fq.attention_varlen(
            q[0], k[0], v[0], cq, ck, 20, 28, causal=True, backend=be
        ),
        "attention_with_kvcache": lambda be: fq.attention_with_kvcache(
            q[:, :1], k.clone(), v.clone(), lens, k[:, :1], v[:, :1], backend=be
        ),
        "quant_matmul": lambda be: fq.quant_matmul(x, qw, backend=be),
        "rms_norm": lambda be: flat(*fq.rms_norm(hidden, norm_w, 1e-5, residual=x, backend=be)),
        "rotary_embedding": lambda be: flat(
            *fq.rotary_embedding(q, k[:, :37], positions, inv_freq, backend=be)
        ),
        "silu_mul": lambda be: fq.silu_mul(hidden, x, backend=be),
    }
    failures = 0
    print(f"\nop checks on {device} ({str(dtype).replace('torch.', '')}), max |backend - reference|:")
    for op, run in cases.items():
        ref = run("reference").float()
        for be in OPS[op]:
            if be == "reference":
                continue
            if not info[be].available:
                print(f"  {op:24s} {be:7s} skipped: {info[be].reason}")
                continue
            try:
                err = (run(be).float() - ref).abs().max().item()
            except (ValueError, RuntimeError) as e:
                print(f"  {op:24s} {be:7s} not applicable: {e}")
                continue
            ok = err <= 2e-2 * max(1.0, ref.abs().max().item())
            failures += not ok
            print(f"  {op:24s} {be:7s} {err:.2e} {'ok' if ok else 'MISMATCH'}")
    return 1 if failures else 0


def main(argv: list[str]) -> int:
    if argv and argv[0] == "demo":
        from flashquant.demo import main as demo_main

        return demo_main(argv[1:])
    if argv and argv[0] == "generate":
        from flashquant.generate_cli import main as generate_main

        return generate_main(argv[1:])
    if argv and argv[0] == "tune":
        from flashquant.tune import main as tune_main

        return tune_main(argv[1:])
    if argv and argv[0] == "compile-check":
        from flashquant.aot import main as aot_main

        return aot_main(argv[1:])
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if argv:
        print(f"unknown command {argv[0]!r}\n{__doc__}")
        return 2
    return check()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
