import pytest
import torch
from torch import nn

import flashquant as fq
from flashquant.nn import QuantLinear, quantize_model
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


def test_quantlinear_rejects_bad_config():
    with pytest.raises(ValueError, match="bits"):
        QuantLinear(64, 8, bits=2)
    with pytest.raises(ValueError, match="group_size"):
        QuantLinear(60, 8, group_size=32)
    with pytest.raises(TypeError, match="nn.Linear"):
        QuantLinear.from_linear(nn.Conv1d(1, 1, 1))
