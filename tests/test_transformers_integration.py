"""transformers integration on a tiny LlamaConfig model built locally (no downloads)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import flashquant.integrations.transformers as fqt  # noqa: E402
from flashquant.nn import QuantLinear  # noqa: E402
from tolerances import sqnr_db  # noqa: E402

CFG = dict(
    vocab_size=256,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


@pytest.fixture(scope="module")
def models():
    name = fqt.register()
    torch.manual_seed(0)
    eager = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG)).eval()
    eager.set_attn_implementation("eager")
    fq_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG)).eval()
    fq_model.load_state_dict(eager.state_dict())
    fq_model.set_attn_implementation(name)
    return eager, fq_model


def test_logits_match_eager_and_reach_flashquant_attention(models, monkeypatch):
    eager, fq_model = models
    seen = []
    real = fqt.fq.attention
    monkeypatch.setattr(fqt.fq, "attention", lambda *a, **k: seen.append(k["causal"]) or real(*a, **k))
    ids = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        a, b = eager(ids).logits, fq_model(ids).logits
    assert seen == [True, True]  # both layers went through flashquant, causally
    assert torch.allclose(a, b, atol=1e-4)


def test_padding_mask_is_honoured(models):
    eager, fq_model = models
    ids = torch.randint(0, 256, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :4] = 0
    with torch.no_grad():
        a = eager(ids, attention_mask=mask).logits
        b = fq_model(ids, attention_mask=mask).logits
    assert torch.allclose(a[0], b[0], atol=1e-4) and torch.allclose(a[1, 4:], b[1, 4:], atol=1e-4)


def test_generation_with_kv_cache_matches_eager(models):
    eager, fq_model = models
    ids = torch.randint(0, 256, (1, 7))
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(eager.generate(ids, **kw), fq_model.generate(ids, **kw))


@pytest.mark.parametrize("bits,group,min_sqnr,min_top1", [(8, -1, 30.0, 0.95), (4, 32, 12.0, 0.6)])
def test_quantized_hf_model_stays_close(models, bits, group, min_sqnr, min_top1):
    eager, _ = models
    q = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG)).eval()
    q.load_state_dict(eager.state_dict())
    fqt.quantize_transformers_model(q, bits=bits, group_size=group)
    assert isinstance(q.model.layers[0].mlp.down_proj, QuantLinear)
    assert not isinstance(q.lm_head, QuantLinear)  # lm_head skipped by default
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        a, b = eager(ids).logits, q(ids).logits
    assert sqnr_db(a, b) >= min_sqnr
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= min_top1
