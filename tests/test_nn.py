import pytest
import torch
from torch import nn

import flashquant as fq
from flashquant.nn import QuantLinear, fuse_linears, quantize_model
from tolerances import assert_qmm_close


@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 32, True), (8, -1, False), (4, 64, False)])
def test_quantlinear_matches_dequantized_linear(bits, group_size, symmetric):
    lin = nn.Linear(128, 40)
    ql = QuantLinear.from_linear(lin, bits, group_size, symmetric)
    x = torch.randn(3, 128)
    ref = fq.quant_matmul(
        x,
        fq.quantize(lin.weight.detach(), bits, group_size, symmetric),
        lin.bias.detach(),
        backend="reference",
    )
    assert_qmm_close(ql(x), ref, backend="cpu")  # auto picks the C++ kernel for small M on CPU


def test_quantlinear_state_dict_round_trip():
    lin = nn.Linear(64, 24, bias=True)
    ql = QuantLinear.from_linear(lin, 4, 32, symmetric=False)
    sd = ql.state_dict()
    assert set(sd) == {"qdata", "scales", "zeros", "bias"}
    fresh = QuantLinear(64, 24, bias=True, bits=4, group_size=32, symmetric=False, dtype=torch.float32)
    fresh.load_state_dict(sd)
    x = torch.randn(2, 64)
    assert torch.equal(fresh(x), ql(x))


def test_quantize_model_skips_lm_head_and_incompatible():
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(64, 30))
    model.add_module("odd", nn.Linear(30, 8))  # 30 % 32 != 0: stays float
    model.add_module("lm_head", nn.Linear(8, 100))
    quantize_model(model, bits=4, group_size=32)
    assert isinstance(model.proj, QuantLinear)
    assert isinstance(model.odd, nn.Linear) and not isinstance(model.odd, QuantLinear)
    assert isinstance(model.lm_head, nn.Linear)
    assert model(torch.randn(2, 64)).shape == (2, 100)


def test_quantize_model_and_llama_pass_the_method_on():
    """method="mse" reaches quantize() from quantize_model and Llama.quantize: the stored weights are its."""
    from flashquant.models.llama import Llama, LlamaConfig

    model = nn.Sequential(nn.Linear(64, 16), nn.Linear(16, 8))
    expected = fq.quantize(model[0].weight.detach(), 4, 16, False, method="mse")
    quantize_model(model, bits=4, group_size=16, symmetric=False, skip=(), method="mse")
    assert torch.equal(model[0].qdata, expected.qdata) and torch.equal(model[0].zeros, expected.zeros)
    assert torch.equal(model[0].scales, expected.scales)
    llama = Llama.random(LlamaConfig(), seed=0)
    w = llama.layers[0].mlp.down_proj.weight.detach().clone()
    llama.quantize(4, 32, method="mse")
    assert torch.equal(llama.layers[0].mlp.down_proj.scales, fq.quantize(w, 4, 32, method="mse").scales)
    with pytest.raises(ValueError, match="method must be one of"):
        quantize_model(nn.Sequential(nn.Linear(64, 16)), method="awq")


def _small_model():
    return nn.Sequential(nn.Linear(64, 32), nn.LayerNorm(32), nn.Linear(32, 16, bias=False))


def _state_after_save_and_load(model):
    import io

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf)


@pytest.mark.parametrize("on_meta", [False, True])
def test_quantized_checkpoint_loads_into_an_unquantized_skeleton(on_meta, monkeypatch):
    """quantize_model(quantize_weights=False) installs empty QuantLinears of the same format, so a saved quantized
    state_dict loads without quantizing again (quantize is not called), also into a meta-device model
    (assign=True); the loaded model computes exactly what the saved one did."""
    from flashquant import nn as fqnn

    torch.manual_seed(0)
    saved = quantize_model(_small_model(), bits=4, group_size=32, symmetric=False, skip=(), method="mse")
    state = _state_after_save_and_load(saved)
    monkeypatch.setattr(fqnn, "quantize", lambda *a, **k: pytest.fail("quantize called"))
    with torch.device("meta" if on_meta else "cpu"):
        skeleton = _small_model()
    quantize_model(skeleton, bits=4, group_size=32, symmetric=False, skip=(), quantize_weights=False)
    assert isinstance(skeleton[0], QuantLinear) and isinstance(skeleton[2], QuantLinear)
    skeleton.load_state_dict(state, assign=on_meta)
    x = torch.randn(5, 64)
    assert torch.equal(skeleton(x), saved(x))


@pytest.mark.parametrize(
    "other", [dict(bits=8), dict(group_size=16), dict(symmetric=True)], ids=["bits", "group", "sym"]
)
def test_quantized_checkpoint_refuses_a_skeleton_of_another_format(other):
    """A skeleton built with other arguments than the checkpoint's has other buffer shapes (or no zero points):
    load_state_dict refuses it instead of loading codes of one format into another."""
    args = dict(bits=4, group_size=32, symmetric=False, skip=())
    state = quantize_model(_small_model(), **args).state_dict()
    skeleton = quantize_model(_small_model(), **{**args, **other}, quantize_weights=False)
    with pytest.raises(RuntimeError, match="size mismatch|Unexpected key"):
        skeleton.load_state_dict(state)


def test_quantlinear_rejects_bad_config():
    with pytest.raises(ValueError, match="bits"):
        QuantLinear(64, 8, bits=2)
    with pytest.raises(ValueError, match="group_size"):
        QuantLinear(60, 8, group_size=32)
    with pytest.raises(TypeError, match="nn.Linear"):
        QuantLinear.from_linear(nn.Conv1d(1, 1, 1))


# ---- fuse_linears -----------------------------------------------------------------------------------------
def _three_linears(biases=(True, False, True), in_features=128, outs=(48, 16, 16)):
    torch.manual_seed(0)
    return [nn.Linear(in_features, n, bias=b) for n, b in zip(outs, biases)]


def test_fused_float_linear_equals_concatenated_outputs():
    """The fused weight is the stacked weights; a missing bias becomes zeros in its slice."""
    mods = _three_linears()
    fused = fuse_linears(mods)
    assert type(fused) is nn.Linear and (fused.in_features, fused.out_features) == (128, 80)
    x = torch.randn(5, 128)
    want = torch.cat([m(x) for m in mods], -1)
    torch.testing.assert_close(fused(x), want, rtol=1e-6, atol=1e-6)  # fp32 GEMMs of different N: sum order
    assert torch.equal(fused.bias[48:64], torch.zeros(16))


@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 32, False), (8, -1, True)])
def test_fused_quantlinear_stores_what_quantizing_the_fused_float_linear_stores(bits, group_size, symmetric):
    """Quantization is per output row, so fuse(quantize each) == quantize(fuse): the same codes, scales and
    zero points, bit for bit; and its outputs are the concatenated outputs of the parts."""
    mods = _three_linears()
    fused_q = fuse_linears([QuantLinear.from_linear(m, bits, group_size, symmetric) for m in mods])
    q_fused = QuantLinear.from_linear(fuse_linears(mods), bits, group_size, symmetric)
    assert type(fused_q) is QuantLinear and fused_q.out_features == 80
    sd_a, sd_b = fused_q.state_dict(), q_fused.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    x = torch.randn(3, 128)
    parts = [QuantLinear.from_linear(m, bits, group_size, symmetric) for m in mods]
    want = torch.cat([fq.quant_matmul(x, p.qweight, p.bias, backend="reference") for p in parts], -1)
    assert_qmm_close(fused_q(x), want, backend="cpu")


def test_fuse_linears_rejects_what_it_cannot_fuse():
    a, b = nn.Linear(64, 8), nn.Linear(32, 8)
    with pytest.raises(ValueError, match="at least two"):
        fuse_linears([a])
    with pytest.raises(ValueError, match=r"in_features .*\[64, 32\]"):
        fuse_linears([a, b])
    with pytest.raises(TypeError, match="all torch.nn.Linear or all"):
        fuse_linears([a, QuantLinear.from_linear(nn.Linear(64, 8), 4, 32)])
    with pytest.raises(ValueError, match="bits"):
        fuse_linears([QuantLinear.from_linear(a, 4, 32), QuantLinear.from_linear(nn.Linear(64, 8), 8, 32)])
    with pytest.raises(ValueError, match="dtype and device"):
        fuse_linears([a, nn.Linear(64, 8).half()])


def test_quant_linear_weight_dtype_follows_to():
    """module.to(dtype) converts the scales (and bias) buffers; the weight's nominal dtype follows them."""
    ql = QuantLinear.from_linear(torch.nn.Linear(64, 32), bits=4, group_size=32)
    assert ql.weight_dtype == torch.float32
    ql = ql.to(torch.bfloat16)
    assert ql.weight_dtype == torch.bfloat16 and ql.qweight.dequantize().dtype == torch.bfloat16
    assert ql.qdata.dtype == torch.uint8
