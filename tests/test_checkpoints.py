"""GPTQ / AWQ checkpoints read by flashquant.checkpoints: every format variant against weights written from the
formats' definitions (the packers here follow the layouts as AutoGPTQ and AutoAWQ document and write them, word by
word, and share no code with the reader), then whole models through load_quantized_state_dict and
load_quantized_pretrained.

The reader must give back the exact weights ``scales * (code - zero)``: dequantize() is compared exactly in fp32.
Outputs of the loaded model go through quant_matmul's CPU kernel and are held to tolerances.QMM_RTOL_CPU per
linear, tolerances.CHECKPOINT_LOGITS_RTOL for a whole model's logits.
"""

import json
import zlib

import pytest
import torch
from torch import nn

from flashquant import quantize as fq_quantize
from flashquant.checkpoints import AWQ_ORDER, from_awq, from_gptq, load_quantized_state_dict, to_gptq
from flashquant.nn import QuantLinear, fuse_linears
from tiny_models import TINY_LLAMA
from tolerances import CHECKPOINT_LOGITS_RTOL, assert_qmm_close


# ---- writers of the formats (independent of the reader) -----------------------------------------------------
def _int32(words: torch.Tensor) -> torch.Tensor:
    """uint32 values held in int64 -> the int32 with the same bits (two's complement), as the tools store them."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _pack_dim0(values: torch.Tensor, bits: int) -> torch.Tensor:
    """(R * 32 / bits, C) small ints -> int32 (R, C): word r holds rows r * per + j at bits * j."""
    per = 32 // bits
    words = torch.zeros(values.shape[0] // per, values.shape[1], dtype=torch.int64)
    for j in range(per):
        words |= values[j::per].to(torch.int64) << (bits * j)
    return _int32(words)


def write_gptq(codes, zeros, scales, g_idx, bits, fmt="gptq"):
    """codes (N, K), zeros (N, G) true zero points, scales (N, G) -> GPTQ tensors (qweight, qzeros, scales, g_idx)."""
    stored_zeros = zeros - 1 if fmt == "gptq" else zeros
    qweight = _pack_dim0(codes.t(), bits)  # (K / per, N): packed along K
    qzeros = _pack_dim0(stored_zeros, bits).t().contiguous()  # (G, N / per): packed along N
    return qweight, qzeros, scales.t().contiguous(), g_idx.to(torch.int32)


def write_awq(codes, zeros, scales):
    """AutoAWQ's GEMM layout: word c of row k holds column 8c + AWQ_ORDER[j] in nibble j."""

    def pack_columns(v):  # (R, N) -> (R, N / 8)
        words = torch.zeros(v.shape[0], v.shape[1] // 8, dtype=torch.int64)
        for c in range(v.shape[1] // 8):
            for j, col in enumerate(AWQ_ORDER):
                words[:, c] |= v[:, 8 * c + col].to(torch.int64) << (4 * j)
        return _int32(words)

    return pack_columns(codes.t()), pack_columns(zeros.t()), scales.t().contiguous()


def random_quantized(N, K, bits, group_size, symmetric, act_order, seed=0, zero_min=1, order_seed=None):
    """Random codes / zero points / fp16 scales and the weight they define, w[n, k] = s * (code - zero).
    act_order: groups spread over K by a permutation drawn from `order_seed` (default: `seed`)."""
    gen = torch.Generator().manual_seed(seed)
    G = 1 if group_size == -1 else K // group_size
    gs = K // G
    maxq = (1 << bits) - 1
    codes = torch.randint(0, maxq + 1, (N, K), generator=gen)
    if symmetric:
        zeros = torch.full((N, G), 1 << (bits - 1))
    else:
        zeros = torch.randint(zero_min, maxq + 1, (N, G), generator=gen)
    scales = (torch.rand(N, G, generator=gen) * 0.02 + 0.002).half()
    g_idx = torch.arange(K) // gs
    if act_order:
        order = torch.Generator().manual_seed(seed if order_seed is None else order_seed)
        g_idx = g_idx[torch.randperm(K, generator=order)]
    w = (codes - zeros[:, g_idx]).float() * scales.float()[:, g_idx]
    return codes, zeros, scales, g_idx, w


def original_order(qw, perm):
    """The loaded weight's columns back in the checkpoint's order (fp32): QuantLinear.dequantize undoes the
    permutation."""
    return QuantLinear.from_quantized(qw, None, perm).dequantize(torch.float32)


# ---- one linear ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("act_order", [False, True], ids=["in-order", "act-order"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, 128), (4, -1), (8, 64), (8, -1)])
def test_gptq_weights_are_the_checkpoints_exactly(bits, group_size, symmetric, act_order, fmt):
    N, K = 24, 256
    codes, zeros, scales, g_idx, w = random_quantized(N, K, bits, group_size, symmetric, act_order)
    qw, perm = from_gptq(
        *write_gptq(codes, zeros, scales, g_idx, bits, fmt), bits=bits, checkpoint_format=fmt
    )
    assert (qw.zeros is None) == symmetric, "symmetric checkpoints load as flashquant's symmetric format"
    # (with one group per row every channel is in group 0: act-order changes nothing the format holds)
    assert (perm is None) != (act_order and group_size != -1), "a permutation exactly where groups are spread"
    assert (
        qw.shape == (N, K) and qw.bits == bits and qw.group_size == group_size and qw.dtype == torch.float16
    )
    assert torch.equal(original_order(qw, perm), w)
    if perm is not None:  # the groups are contiguous after the permutation
        assert torch.equal(g_idx[perm], torch.arange(K) // (K // qw.scales.shape[1]))


@pytest.mark.parametrize("group_size", [32, 128, -1])
def test_awq_weights_are_the_checkpoints_exactly(group_size):
    N, K = 40, 256
    codes, zeros, scales, _, w = random_quantized(N, K, 4, group_size, False, False, seed=1, zero_min=0)
    qw = from_awq(*write_awq(codes, zeros, scales))
    assert qw.zeros is not None and qw.group_size == group_size
    assert torch.equal(qw.dequantize(torch.float32), w)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("M", [1, 4, 17])
def test_act_order_linear_permutes_its_input(backend, M):
    """A QuantLinear from an act-order checkpoint computes x @ W^T with W in the checkpoint's column order."""
    N, K = 32, 256
    codes, zeros, scales, g_idx, w = random_quantized(N, K, 4, 64, False, True, seed=2)
    qw, perm = from_gptq(*write_gptq(codes, zeros, scales, g_idx, 4), bits=4, dtype=torch.float32)
    bias = torch.randn(N)
    layer = QuantLinear.from_quantized(qw, bias, perm, backend=backend)
    x = torch.randn(2, M, K)
    assert_qmm_close(layer(x), x @ w.t() + bias, f"act-order M={M}", backend)
    assert torch.equal(layer.dequantize(torch.float32), w), "dequantize() gives the columns in x's order"
    assert "input_perm" in layer.state_dict() and "input_perm" in repr(layer)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["auto", "triton", "cuda"])
def test_act_order_linear_on_cuda(backend, dtype):
    """The same on the GPU kernels, in fp16 and bf16 (scales rounded to bf16 there, the weight with them)."""
    N, K = 64, 256
    codes, zeros, scales, g_idx, _ = random_quantized(N, K, 4, 64, False, True, seed=3)
    qw, perm = from_gptq(*write_gptq(codes, zeros, scales, g_idx, 4), bits=4, dtype=dtype)
    w = (codes - zeros[:, g_idx]).float() * scales.to(dtype).float()[:, g_idx]
    layer = QuantLinear.from_quantized(qw.to("cuda"), None, perm, backend=backend)
    assert layer.input_perm.is_cuda
    x = torch.randn(2, 5, K, device="cuda", dtype=dtype)
    assert_qmm_close(layer(x), x.float() @ w.cuda().t(), f"act-order on CUDA, {backend}", backend)
    assert torch.equal(layer.dequantize(torch.float32).cpu(), w)


def test_a_saved_act_order_model_reloads_into_an_empty_skeleton():
    """quantize_model(quantize_weights=False) builds QuantLinears without input_perm; load_state_dict adds it."""
    from flashquant.nn import quantize_model

    state, _ = _mlp_checkpoint(act_order=True)
    model = TinyMLP()
    load_quantized_state_dict(model, state, GPTQ_CONFIG, dtype=torch.float32)
    saved = model.state_dict()
    skeleton = quantize_model(TinyMLP(), bits=4, group_size=32, symmetric=False, quantize_weights=False)
    skeleton.load_state_dict(saved)
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(skeleton(x), model(x), rtol=0, atol=0)
    assert skeleton.up.input_perm.dtype == torch.int64


def test_fp16_scales_can_load_as_bf16_or_fp32():
    codes, zeros, scales, g_idx, w = random_quantized(16, 64, 4, 32, False, False)
    for dtype in (torch.bfloat16, torch.float32):
        qw, _ = from_gptq(*write_gptq(codes, zeros, scales, g_idx, 4), bits=4, dtype=dtype)
        assert qw.scales.dtype == dtype and qw.dtype == dtype
        torch.testing.assert_close(qw.dequantize(torch.float32), w, rtol=2**-8, atol=0)


def test_symmetric_argument():
    codes, zeros, scales, g_idx, w = random_quantized(16, 64, 4, 32, True, False)
    tensors = write_gptq(codes, zeros, scales, g_idx, 4)
    asym, _ = from_gptq(*tensors, bits=4, symmetric=False)
    assert asym.zeros is not None and torch.equal(asym.dequantize(torch.float32), w)
    codes, zeros, scales, g_idx, _ = random_quantized(16, 64, 4, 32, False, False)
    with pytest.raises(ValueError, match="symmetric=True needs every zero point to be 8"):
        from_gptq(*write_gptq(codes, zeros, scales, g_idx, 4), bits=4, symmetric=True)


def _gptq_tensors(N=16, K=64, bits=4, group_size=32):
    codes, zeros, scales, g_idx, _ = random_quantized(N, K, bits, group_size, False, False)
    return write_gptq(codes, zeros, scales, g_idx, bits)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (lambda t, kw: kw.update(bits=3), ValueError, "bits must be 4 or 8"),
        (lambda t, kw: kw.update(checkpoint_format="marlin"), ValueError, "checkpoint_format must be one of"),
        (lambda t, kw: t.__setitem__(0, t[0].to(torch.int64)), TypeError, "qweight must have dtype in"),
        (lambda t, kw: t.__setitem__(slice(0, 4), (t[0], t[1][[0, 1, 1]], t[2][[0, 1, 1]], None)), ValueError,
         r"scales.shape\[0\] = 3 must divide K = 64"),
        (lambda t, kw: t.__setitem__(1, t[1][:, :1]), ValueError, r"qzeros must have shape"),
        (lambda t, kw: t.__setitem__(2, t[2][:, :8]), ValueError, r"qweight must have shape"),
        (lambda t, kw: t.__setitem__(2, t[2].int()), TypeError, "scales must have dtype in"),
        (lambda t, kw: t.__setitem__(3, t[3][:10]), ValueError, r"g_idx must have shape \(K,\) = \(64,\)"),
        (lambda t, kw: t.__setitem__(3, t[3] + 1), ValueError, r"g_idx must hold group indices in \[0, 2\)"),
        (lambda t, kw: t.__setitem__(3, torch.zeros(64, dtype=torch.int32)), ValueError, "every group 32"),
    ],
    ids=["bits3", "marlin", "qweight-int64", "groups-do-not-divide-K", "qzeros-shape", "N-mismatch", "int-scales",
         "g_idx-length", "g_idx-range", "g_idx-unequal-groups"],
)  # fmt: skip
def test_gptq_bad_inputs_raise_clear_errors(change, error, match):
    tensors, kwargs = list(_gptq_tensors()), {"bits": 4}
    change(tensors, kwargs)
    with pytest.raises(error, match=match):
        from_gptq(*tensors, **kwargs)


def test_gptq_v1_zero_point_overflow_is_reported():
    """A v1 packer cannot store a zero point of 0 (it writes -1): reading 15 in a 4-bit qzeros means that."""
    codes, zeros, scales, g_idx, _ = random_quantized(16, 64, 4, 32, False, False)
    zeros[3, 1] = 16  # stored as 15 by the v1 writer
    tensors = write_gptq(codes, zeros, scales, g_idx, 4)
    with pytest.raises(ValueError, match="packed with a zero point of 0"):
        from_gptq(*tensors, bits=4)
    zeros[3, 1] = 15  # the same bits read as v2 are a valid zero point 15
    qw, _ = from_gptq(
        *write_gptq(codes, zeros, scales, g_idx, 4, "gptq_v2"), bits=4, checkpoint_format="gptq_v2"
    )
    assert int(qw.zeros[3, 1]) == 15


def test_awq_bad_inputs_raise_clear_errors():
    codes, zeros, scales, _, _ = random_quantized(16, 64, 4, 32, False, False)
    qweight, qzeros, s = write_awq(codes, zeros, scales)
    with pytest.raises(ValueError, match="AWQ checkpoints are int4"):
        from_awq(qweight, qzeros, s, bits=8)
    with pytest.raises(ValueError, match=r"qweight must have shape \(K, N / 8\)"):
        from_awq(qweight[:, :1], qzeros, s)
    with pytest.raises(ValueError, match=r"must be a multiple of 8"):
        from_awq(qweight, qzeros, s[:, :12])


def test_from_quantized_checks_its_arguments():
    qw, _ = from_gptq(*_gptq_tensors(), bits=4)
    with pytest.raises(TypeError, match="qweight must be a flashquant.QuantizedWeight"):
        QuantLinear.from_quantized(torch.zeros(3))
    with pytest.raises(ValueError, match=r"bias must have shape \(out_features=16,\)"):
        QuantLinear.from_quantized(qw, torch.zeros(15))
    with pytest.raises(ValueError, match="input_perm must be a permutation of range"):
        QuantLinear.from_quantized(qw, None, torch.zeros(64, dtype=torch.int64))


def test_fusing_needs_one_input_perm():
    linears, perms = [], []
    for seed in (0, 1):
        codes, zeros, scales, g_idx, _ = random_quantized(16, 64, 4, 32, False, True, seed=seed)
        qw, perm = from_gptq(*write_gptq(codes, zeros, scales, g_idx, 4), bits=4, dtype=torch.float32)
        linears.append(QuantLinear.from_quantized(qw, None, perm))
        perms.append(perm)
    with pytest.raises(ValueError, match="must share their input_perm"):
        fuse_linears(linears)
    # with one shared permutation (q/k/v of a layer share it: one X^T X) the fused linear equals the parts
    same = [QuantLinear.from_quantized(m.qweight, None, perms[0]) for m in linears]
    x = torch.randn(3, 64)
    torch.testing.assert_close(fuse_linears(same)(x), torch.cat([m(x) for m in same], -1), rtol=0, atol=1e-6)


# ---- whole models -------------------------------------------------------------------------------------------
class TinyMLP(nn.Module):
    def __init__(self, device=None):
        super().__init__()
        self.up = nn.Linear(64, 128, bias=True, device=device)
        self.down = nn.Linear(128, 32, bias=False, device=device)
        self.norm = nn.LayerNorm(64, device=device)

    def forward(self, x):
        return self.down(torch.relu(self.up(self.norm(x))))


def _mlp_checkpoint(act_order=True):
    """A GPTQ state_dict for TinyMLP and the float weights it stands for."""
    state, weights = {}, {}
    for name, (N, K) in {"up": (128, 64), "down": (32, 128)}.items():
        codes, zeros, scales, g_idx, w = random_quantized(N, K, 4, 32, False, act_order, seed=N)
        q = write_gptq(codes, zeros, scales, g_idx, 4)
        state.update(zip((f"{name}.qweight", f"{name}.qzeros", f"{name}.scales", f"{name}.g_idx"), q))
        weights[name] = w
    state["up.bias"] = torch.randn(128).half()
    state["norm.weight"], state["norm.bias"] = torch.rand(64).half() + 0.5, torch.randn(64).half()
    return state, weights


GPTQ_CONFIG = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True, "sym": False}


@pytest.mark.parametrize("on_meta", [False, True], ids=["cpu", "meta"])
def test_load_quantized_state_dict_into_a_model(on_meta):
    state, weights = _mlp_checkpoint()
    model = TinyMLP(device="meta" if on_meta else None)
    report = load_quantized_state_dict(model, state, GPTQ_CONFIG, dtype=torch.float32)
    assert report == {"quantized": 2, "loaded": 2}
    assert isinstance(model.up, QuantLinear) and isinstance(model.down, QuantLinear)
    ref = TinyMLP()
    ref.load_state_dict(
        {"up.weight": weights["up"], "up.bias": state["up.bias"].float(), "down.weight": weights["down"],
         "norm.weight": state["norm.weight"].float(), "norm.bias": state["norm.bias"].float()}
    )  # fmt: skip
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert_qmm_close(model(x), ref(x), "TinyMLP from a GPTQ act-order state_dict", "cpu")


def test_load_quantized_state_dict_errors_leave_the_model_unchanged():
    state, _ = _mlp_checkpoint()
    model = TinyMLP()
    bad = dict(state, **{"down.scales": state["down.scales"][:, :8]})
    with pytest.raises(ValueError, match=r"^down: qweight must have shape"):
        load_quantized_state_dict(model, bad, GPTQ_CONFIG)
    assert isinstance(model.up, nn.Linear) and isinstance(model.down, nn.Linear), "nothing replaced"
    with pytest.raises(ValueError, match=r"not loaded \['norm.bias'\]"):
        load_quantized_state_dict(
            TinyMLP(), {k: v for k, v in state.items() if k != "norm.bias"}, GPTQ_CONFIG
        )
    with pytest.raises(ValueError, match=r"unexpected \['extra'\]"):
        load_quantized_state_dict(TinyMLP(), dict(state, extra=torch.zeros(1)), GPTQ_CONFIG)
    with pytest.raises(ValueError, match=r"state_dict has down.qweight but not down.scales"):
        load_quantized_state_dict(
            TinyMLP(), {k: v for k, v in state.items() if k != "down.scales"}, GPTQ_CONFIG
        )
    with pytest.raises(ValueError, match="holds no '<linear>.qweight' tensor"):
        load_quantized_state_dict(TinyMLP(), {"norm.weight": torch.ones(64)}, GPTQ_CONFIG)
    for cfg, match in (
        ({"quant_method": "bitsandbytes"}, "quant_method must be 'gptq' or 'awq'"),
        ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "'gemm' layout"),
        (dict(GPTQ_CONFIG, checkpoint_format="marlin"), "checkpoint_format must be one of"),
    ):
        with pytest.raises(ValueError, match=match):
            load_quantized_state_dict(TinyMLP(), state, cfg)
    with pytest.raises(TypeError, match="quantization_config must be a dict"):
        load_quantized_state_dict(TinyMLP(), state, "gptq")


def test_transformers_quantization_config_objects_are_read():
    """transformers' GPTQConfig / AwqConfig hold str enums (QuantizationMethod.GPTQ), not plain strings."""
    transformers = pytest.importorskip("transformers")
    state, weights = _mlp_checkpoint(act_order=False)
    model = TinyMLP()
    cfg = transformers.GPTQConfig(bits=4, group_size=32, sym=False)
    assert load_quantized_state_dict(model, state, cfg)["quantized"] == 2
    assert torch.equal(model.down.qweight.dequantize(torch.float32), weights["down"])
    codes, zeros, scales, _, w = random_quantized(32, 128, 4, 32, False, False, zero_min=0)
    awq = dict(zip(("down.qweight", "down.qzeros", "down.scales"), write_awq(codes, zeros, scales)))
    model = nn.Sequential()
    model.down = nn.Linear(128, 32, bias=False)
    load_quantized_state_dict(model, awq, transformers.AwqConfig(bits=4, group_size=32))
    assert torch.equal(model.down.qweight.dequantize(torch.float32), w)


# ---- a transformers Llama from a checkpoint directory ----------------------------------------------------------
LLAMA = TINY_LLAMA


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
    "rope_theta": 500000.0,
}


def _write_llama_checkpoint(
    tmp_path, method, tie, shards=1, rope=None, legacy=False, quantized_lm_head=False
):
    """A float transformers Llama and a checkpoint directory of the same model, as the tools save one:
    config.json (with quantization_config unless method="float"), fp16 tensors in safetensors. For GPTQ / AWQ
    every linear but lm_head holds random codes, and the float model their exact weights; linears that read the
    same input (q/k/v, gate/up) share their act-order permutation, as GPTQ gives them (one X^T X).
    legacy: as older tools saved them: the settings in quantize_config.json (AutoGPTQ, no quant_method) or
    quant_config.json (AutoAWQ: w_bit, q_group_size, "GEMM"), one oddly named weights file, and (GPTQ) a zero
    bias for every quantized linear, as GPTQ-for-LLaMa's packer wrote.
    quantized_lm_head: lm_head quantized too, on its own (GPTQModel's lm_head=True), while config.json still says
    the embeddings are tied (the float model is then untied)."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file

    extra = {"rope_parameters": rope} if rope else {}
    config = transformers.LlamaConfig(**LLAMA, tie_word_embeddings=tie, **extra)
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # the checkpoint is fp16: the float model holds the same values
        for p in ref.parameters():
            p.copy_(p.half().float())
    state = {k: v.half() for k, v in ref.state_dict().items()}
    for seed, (name, mod) in enumerate(ref.named_modules()):
        if (
            method == "float"
            or not isinstance(mod, nn.Linear)
            or (name == "lm_head" and not quantized_lm_head)
        ):
            continue
        N, K = mod.out_features, mod.in_features
        parent, _, leaf = name.rpartition(".")
        shared_input = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gu", "up_proj": "gu"}
        order_seed = zlib.crc32(f"{parent}.{shared_input.get(leaf, leaf)}".encode())
        act_order = method == "gptq-desc_act"
        codes, zeros, scales, g_idx, w = random_quantized(
            N, K, 4, 64, method == "gptq", act_order, seed=seed, order_seed=order_seed
        )
        if method == "awq":
            tensors = dict(zip(("qweight", "qzeros", "scales"), write_awq(codes, zeros, scales)))
        else:
            names = ("qweight", "qzeros", "scales", "g_idx")
            tensors = dict(zip(names, write_gptq(codes, zeros, scales, g_idx, 4)))
        del state[f"{name}.weight"]
        state.update({f"{name}.{k}": v for k, v in tensors.items()})
        if legacy and method != "awq":
            state[f"{name}.bias"] = torch.zeros(N, dtype=torch.float16)
        mod.weight.data = w  # the exact fp32 weight (s * (code - zero) needs more than fp16's 11 bits)
    if tie:
        state.pop("lm_head.weight", None)
    if legacy:
        settings = (
            ("quant_config.json", {"zero_point": True, "q_group_size": 64, "w_bit": 4, "version": "GEMM"})
            if method == "awq"
            else ("quantize_config.json", {"bits": 4, "group_size": 64, "desc_act": method == "gptq-desc_act",
                                           "sym": method == "gptq", "true_sequential": True})
        )  # fmt: skip
        (tmp_path / settings[0]).write_text(json.dumps(settings[1]))
    elif method == "awq":
        config.quantization_config = {"quant_method": "awq", "bits": 4, "group_size": 64, "version": "gemm"}
    elif method != "float":
        desc_act, sym = method == "gptq-desc_act", method == "gptq"
        config.quantization_config = {
            "quant_method": "gptq", "bits": 4, "group_size": 64, "checkpoint_format": "gptq", "desc_act": desc_act,
            "sym": sym,
        }  # fmt: skip
    if quantized_lm_head:
        config.tie_word_embeddings = True
    config.save_pretrained(tmp_path)
    keys = sorted(state)
    if shards == 1:
        save_file(
            state, str(tmp_path / ("gptq_model-4bit-64g.safetensors" if legacy else "model.safetensors"))
        )
    else:
        parts = {
            "model-00001-of-00002.safetensors": keys[::2],
            "model-00002-of-00002.safetensors": keys[1::2],
        }
        for file, part in parts.items():
            save_file({k: state[k] for k in part}, str(tmp_path / file))
        weight_map = {k: file for file, part in parts.items() for k in part}
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return ref


def _assert_logits_close(got, want, what):
    err = float((got - want).abs().max())
    bound = CHECKPOINT_LOGITS_RTOL * float(want.abs().max())
    assert err <= bound, f"{what}: logits differ by {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize(
    "method,tie,shards",
    [("gptq", False, 1), ("gptq-desc_act", True, 2), ("awq", False, 2)],
    ids=["gptq-sym", "gptq-desc_act-asym-tied-sharded", "awq-sharded"],
)
def test_llama_checkpoint_directory_loads_and_matches_its_float_model(
    tmp_path, method, tie, shards, monkeypatch
):
    ref = _write_llama_checkpoint(tmp_path, method, tie, shards)
    import flashquant.integrations.transformers as fqt

    calls = []
    real = fqt.fq.attention
    monkeypatch.setattr(fqt.fq, "attention", lambda *a, **k: calls.append(1) or real(*a, **k))

    model = fqt.load_quantized_pretrained(
        str(tmp_path), dtype=torch.float32, attn_implementation=fqt.register()
    )
    assert model.config._attn_implementation == fqt.NAME
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == 7 * LLAMA["num_hidden_layers"], "every linear but lm_head"
    assert all((m.input_perm is not None) == (method == "gptq-desc_act") for m in model.modules()
               if isinstance(m, QuantLinear))  # fmt: skip
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    if tie:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, LLAMA["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = model(ids).logits, ref(ids).logits
    _assert_logits_close(got, want, method)
    assert len(calls) == LLAMA["num_hidden_layers"], "every layer's attention ran through flashquant"
    assert not model.training
    # transformers' own generate() with its KV cache: the float model's greedy tokens
    prompt = ids[:1, :6]
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(prompt, **kw), ref.generate(prompt, **kw))


def test_directory_without_quantization_config_is_refused(tmp_path):
    transformers = pytest.importorskip("transformers")
    import flashquant.integrations.transformers as fqt

    transformers.LlamaConfig(**LLAMA).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="has no quantization_config"):
        fqt.load_quantized_pretrained(str(tmp_path))
    transformers.LlamaConfig(**LLAMA, quantization_config=GPTQ_CONFIG).save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor"):
        fqt.load_quantized_pretrained(str(tmp_path))


@pytest.mark.parametrize(
    "method,tie,rope",
    [
        ("float", True, LLAMA3_ROPE),
        ("gptq", False, None),
        ("gptq-desc_act", False, LLAMA3_ROPE),
        ("awq", True, None),
    ],
    ids=["float-tied-llama3rope", "gptq-sym", "gptq-desc_act-llama3rope", "awq-tied"],
)
def test_flashquant_llama_from_pretrained_matches_transformers(tmp_path, method, tie, rope):
    """flashquant's own decoder (fused projections, its caches and kernels) on a transformers-format checkpoint."""
    from flashquant.models.llama import Llama, generate

    ref = _write_llama_checkpoint(tmp_path, method, tie, rope=rope)
    model = Llama.from_pretrained(str(tmp_path), dtype=torch.float32)
    assert model.cfg.tie_embeddings == tie and (model.cfg.rope_scaling is not None) == (rope is not None)
    if tie:
        assert model.lm_head.weight is model.embed_tokens.weight
    n_quant = sum(isinstance(m, QuantLinear) for m in model.modules())
    assert n_quant == (0 if method == "float" else 7 * LLAMA["num_hidden_layers"])
    ids = torch.randint(0, LLAMA["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids).logits
        _assert_logits_close(model(ids), want, f"{method}: flashquant Llama")
        # q/k/v and gate/up fuse (act-order ones share their permutation) and give the same logits
        _assert_logits_close(model.fuse_projections()(ids), want, f"{method}: fused projections")
    # decode through the KV cache: greedy tokens as recomputing the whole sequence gives them
    prompt = ids[0, :5].tolist()
    new = generate(model, [prompt], 4)[0]
    with torch.no_grad():
        seq = torch.tensor([prompt + new])
        assert new == ref(seq).logits[0, 4:-1].argmax(-1).tolist()


def test_llama_config_from_hf_reads_both_config_styles_and_refuses_what_it_cannot_compute():
    from flashquant.models.llama import LlamaConfig

    base = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip
    new_style = LlamaConfig.from_hf({**base, "rope_parameters": LLAMA3_ROPE})
    old = {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}
    old_style = LlamaConfig.from_hf({**base, "rope_theta": 500000.0, "rope_scaling": old})
    assert new_style == old_style
    assert new_style.rope_scaling == (8.0, 1.0, 4.0, 64) and new_style.head_dim == 8
    assert LlamaConfig.from_hf(base).rope_scaling is None and LlamaConfig.from_hf(base).rope_theta == 10000.0
    for change, match in (
        ({"model_type": "mistral"}, "model_type must be 'llama'"),
        ({"hidden_act": "gelu"}, "hidden_act must be 'silu'"),
        ({"attention_bias": True}, "attention_bias must be False"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "must be 'llama3' or none, got 'yarn'"),
    ):
        with pytest.raises(ValueError, match=match):
            LlamaConfig.from_hf({**base, **change})


# ---- python -m flashquant generate DIR ------------------------------------------------------------------------
def _save_word_tokenizer(path):
    """A word-level tokenizer of the tiny model's 256 ids ("w0" .. "w255"), saved as transformers saves one."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(LLAMA["vocab_size"])}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0")
    fast.save_pretrained(path)


@pytest.mark.parametrize("method", ["gptq-desc_act", "awq"])
def test_generate_command_continues_a_text_prompt_as_the_float_model_does(tmp_path, method, capsys):
    from flashquant.__main__ import main

    ref = _write_llama_checkpoint(tmp_path, method, False)
    _save_word_tokenizer(tmp_path)
    prompt = [5, 9, 3, 17, 2]
    assert main(["generate", str(tmp_path), "--prompt", " ".join(f"w{i}" for i in prompt), "--new-tokens", "4",
                 "--dtype", "float32"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    want = []
    with torch.no_grad():
        for _ in range(4):
            want.append(int(ref(torch.tensor([prompt + want])).logits[0, -1].argmax()))
    assert f"output (4 tokens): {' '.join(f'w{i}' for i in want)}\n" in out, out
    assert "(quantized, float32, cpu)" in out and "decode" in out and "tok/s" in out


def test_generate_command_with_token_ids_and_quantize_on_load(tmp_path, capsys):
    from flashquant.__main__ import main

    _write_llama_checkpoint(tmp_path, "float", True)
    args = ["generate", str(tmp_path), "--prompt-ids", "1,2,3", "--new-tokens", "3"]
    assert main([*args, "--quantize", "int8"]) == 0
    out = capsys.readouterr().out
    assert "(int8, float16, cpu)" in out and "output (3 tokens): " in out
    assert main([*args, "--lm-head", "int4"]) == 0
    assert "(float, lm_head int4, float16, cpu)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no tokenizer could be read"):
        main(["generate", str(tmp_path), "--prompt", "hello"])
    for bad in (
        ["--prompt-ids", "1,x"],
        ["--prompt-ids", "1,999"],
        ["--prompt-ids", "1", "--new-tokens", "0"],
    ):
        with pytest.raises(SystemExit):
            main(["generate", str(tmp_path), *bad])
    assert "--prompt-ids must be comma-separated integers" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["gptq", "gptq-desc_act", "awq"])
def test_older_checkpoint_layouts_load(tmp_path, method):
    """quantize_config.json / quant_config.json beside a config.json without quantization_config, one weights file
    named after the tool, and GPTQ-for-LLaMa's zero biases on linears that have none."""
    import flashquant.integrations.transformers as fqt
    from flashquant.models.llama import Llama

    ref = _write_llama_checkpoint(tmp_path, method, False, legacy=True)
    ids = torch.randint(0, LLAMA["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref(ids).logits
        _assert_logits_close(
            Llama.from_pretrained(str(tmp_path), dtype=torch.float32)(ids), want, "flashquant"
        )
        model = fqt.load_quantized_pretrained(str(tmp_path), dtype=torch.float32)
        _assert_logits_close(model(ids).logits, want, "transformers")
    assert all(m.bias is None for m in model.modules() if isinstance(m, QuantLinear)), "zero biases dropped"


def test_a_nonzero_bias_for_a_linear_without_one_is_an_error():
    state, _ = _mlp_checkpoint()
    state["down.bias"] = torch.zeros(32, dtype=torch.float16)
    model = TinyMLP()
    load_quantized_state_dict(model, state, GPTQ_CONFIG)  # zeros: dropped
    assert model.down.bias is None
    state["down.bias"][3] = 1.0
    with pytest.raises(
        ValueError, match="down: the model's linear has bias=False, the checkpoint has down.bias"
    ):
        load_quantized_state_dict(TinyMLP(), state, GPTQ_CONFIG)


def test_a_quantized_lm_head_stays_apart_from_tied_embeddings(tmp_path):
    import flashquant.integrations.transformers as fqt
    from flashquant.models.llama import Llama

    ref = _write_llama_checkpoint(tmp_path, "gptq", False, quantized_lm_head=True)
    model = Llama.from_pretrained(str(tmp_path), dtype=torch.float32)
    hf = fqt.load_quantized_pretrained(str(tmp_path), dtype=torch.float32)
    for m in (model, hf):  # tying did not hang the embedding on the QuantLinear
        assert isinstance(m.lm_head, QuantLinear) and not hasattr(m.lm_head, "weight")
    ids = torch.randint(0, LLAMA["vocab_size"], (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _assert_logits_close(model(ids), ref(ids).logits, "quantized lm_head")
        _assert_logits_close(hf(ids).logits, ref(ids).logits, "quantized lm_head, transformers")


# ---- writing GPTQ checkpoints -----------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("act_order", [False, True], ids=["in-order", "act-order"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, -1), (8, 64)])
def test_to_gptq_writes_what_the_format_definition_writes(bits, group_size, symmetric, act_order, fmt):
    """to_gptq(from_gptq(t)) == t, tensor for tensor, against the writer built from the format's definition."""
    codes, zeros, scales, g_idx, _ = random_quantized(24, 256, bits, group_size, symmetric, act_order, seed=5)
    tensors = write_gptq(codes, zeros, scales, g_idx, bits, fmt)
    qw, perm = from_gptq(*tensors, bits=bits, checkpoint_format=fmt)
    out = to_gptq(qw, perm, checkpoint_format=fmt)
    for name, want in zip(("qweight", "qzeros", "scales", "g_idx"), tensors):
        if name == "g_idx" and group_size == -1:
            want = torch.zeros_like(want)  # one group: any order is the same
        assert torch.equal(out[name], want), name


def test_to_gptq_refuses_what_the_format_cannot_hold():
    codes, zeros, scales, g_idx, _ = random_quantized(16, 64, 4, 32, False, False)
    zeros[0, 0] = 0
    qw, _ = from_gptq(
        *write_gptq(codes, zeros, scales, g_idx, 4, "gptq_v2"), bits=4, checkpoint_format="gptq_v2"
    )
    with pytest.raises(ValueError, match="zero point of 0 cannot be stored in the 'gptq' \\(v1\\) format"):
        to_gptq(qw)
    assert int(to_gptq(qw, checkpoint_format="gptq_v2")["qzeros"][0, 0]) & 0xF == 0
    with pytest.raises(ValueError, match=r"multiples of 8, got \(N, K\) = \(12, 64\)"):
        to_gptq(fq_quantize(torch.randn(12, 64), 4, 32))
    with pytest.raises(TypeError, match="qweight must be a flashquant.QuantizedWeight"):
        to_gptq(torch.zeros(3))


@pytest.mark.parametrize(
    "bits,group_size,symmetric,act_order,tie",
    [(4, 32, True, False, False), (4, 64, False, True, True), (8, -1, True, False, True)],
    ids=["int4-g32-sym", "int4-g64-asym-act-order-tied", "int8-per-channel-tied"],
)
def test_llama_save_pretrained_round_trips_through_flashquant_and_transformers(
    tmp_path, bits, group_size, symmetric, act_order, tie
):
    """A Llama quantized here (GPTQ act-order: static groups, so no permutation is written) saved as a GPTQ
    checkpoint loads back to the same weights and logits, and transformers reads the same model from it."""
    from flashquant.models.llama import Llama, LlamaConfig

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16, rope_scaling=(8.0, 1.0, 4.0, 32), tie_embeddings=tie)  # fmt: skip
    model = Llama.random(cfg, seed=1, dtype=torch.float16)
    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    method = {"method": "gptq", "act_order": True, "calibration": lambda m: m(calib)} if act_order else {}
    model.quantize(bits, group_size, symmetric, **method)
    model.save_pretrained(str(tmp_path), checkpoint_format="gptq_v2" if not symmetric else "gptq")
    loaded = Llama.from_pretrained(str(tmp_path))
    for (name, a), b in zip(
        ((n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)),
        (m for m in loaded.modules() if isinstance(m, QuantLinear)),
    ):
        assert torch.equal(a.dequantize(torch.float32), b.dequantize(torch.float32)), name
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = model(ids)
        torch.testing.assert_close(loaded(ids), want, rtol=0, atol=0)
        hf = pytest.importorskip("flashquant.integrations.transformers").load_quantized_pretrained(
            str(tmp_path), dtype=torch.float32
        )
        _assert_logits_close(hf(ids).logits, model.float()(ids), "transformers from a flashquant checkpoint")


def test_llama_save_pretrained_float_checkpoint_is_a_transformers_checkpoint(tmp_path):
    transformers = pytest.importorskip("transformers")
    from flashquant.models.llama import Llama, LlamaConfig

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16, rope_scaling=(8.0, 1.0, 4.0, 32), tie_embeddings=True)  # fmt: skip
    model = Llama.random(cfg, seed=2)
    assert model.lm_head.weight is model.embed_tokens.weight, (
        "random() keeps the tie (to_empty used to break it)"
    )
    model.save_pretrained(str(tmp_path))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        _assert_logits_close(hf(ids).logits, model(ids), "transformers reading a flashquant Llama")
        torch.testing.assert_close(Llama.from_pretrained(str(tmp_path))(ids), model(ids), rtol=0, atol=0)
    with pytest.raises(ValueError, match="save before fuse_projections"):
        model.fuse_projections().save_pretrained(str(tmp_path / "fused"))
