"""transformers integration on a tiny LlamaConfig model built locally (no downloads)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import flashquant as fq  # noqa: E402
import flashquant.integrations.transformers as fqt  # noqa: E402
from flashquant.nn import QuantLinear  # noqa: E402
from tiny_models import TINY_LLAMA  # noqa: E402
from tolerances import sqnr_db  # noqa: E402

CFG = TINY_LLAMA


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


def test_left_padded_batch_decodes_on_the_cpu_kernel_and_matches_eager(models, monkeypatch):
    """Batched generation with left padding: the masks are recognised as padding + causal and run the C++ kernel
    with each sequence's keys starting past its padding (the 9-token prefill too: within the kernel's fp32 bound);
    greedy tokens equal the eager model's, as do the logits of a decode step."""
    if not fq.backends()["cpu"].available:
        pytest.skip("C++ extension not built")
    eager, fq_model = models
    starts = []
    real = torch.ops.flashquant.kvcache_attention
    monkeypatch.setattr(
        torch.ops.flashquant, "kvcache_attention", lambda *a: starts.append(a[-1].tolist()) or real(*a)
    )
    ids = torch.randint(1, 256, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, :2] = 0
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(eager.generate(ids, **kw), fq_model.generate(ids, **kw))
    assert len(starts) == 6 * 2 and all(s == [0, 4, 2] for s in starts)  # prefill + 5 decode steps, 2 layers
    with torch.no_grad():
        a, b = (m(ids, attention_mask=mask, use_cache=True) for m in (eager, fq_model))
        step = torch.randint(1, 256, (3, 1))
        mask1 = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
        a = eager(step, attention_mask=mask1, **_cache_of(a)).logits
        b = fq_model(step, attention_mask=mask1, **_cache_of(b)).logits
    assert torch.allclose(a, b, atol=1e-4)


def _cache_of(output) -> dict:
    """The keyword that passes a forward's KV cache to the next step: transformers 5.2x renamed past_key_values to
    cache (the old name deprecated there); older versions know only past_key_values."""
    if "cache" in getattr(type(output), "__dataclass_fields__", {}):
        return {"cache": output.cache}
    return {"past_key_values": output.past_key_values}


def test_left_padding_is_recognised_only_where_the_kernel_applies():
    """Right padding, a custom pattern, a non-causal padding mask with causal attention, or Sq above the kernel's
    bound: None (SDPA with the mask). Left padding, causal or not: the padding lengths."""
    q, k = torch.randn(2, 3, 4, 16), torch.randn(2, 10, 2, 16)
    keys, rows = torch.arange(10), torch.arange(7, 10)[:, None]
    pad = torch.tensor([0, 3])
    left = (keys >= pad[:, None, None]) & (keys <= rows)
    assert fqt._left_padding(left[:, None], q, k, True).tolist() == [0, 3]
    plain = (keys >= pad[:, None, None]).expand(2, 3, 10)
    assert fqt._left_padding(plain[:, None], q, k, False).tolist() == [0, 3]
    assert fqt._left_padding(plain[:, None], q, k, True) is None
    right = (keys < 10 - pad[:, None, None]) & (keys <= rows)
    assert fqt._left_padding(right[:, None], q, k, True) is None
    custom = left.clone()
    custom[0, 0, 5] = False
    assert fqt._left_padding(custom[:, None], q, k, True) is None
    most = fqt.cpu_kvcache_max_sq(torch.float32, 16)
    long_q, long_k, long_keys = (
        torch.randn(2, most + 1, 4, 16),
        torch.randn(2, most + 1, 2, 16),
        torch.arange(most + 1),
    )
    square = (long_keys >= pad[:, None, None]) & (long_keys <= long_keys[:, None])
    assert fqt._left_padding(square[:, None], long_q, long_k, True) is None
    assert fqt._left_padding(square[:, None, 1:], long_q[:, 1:], long_k, True).tolist() == [0, 3]


def test_generation_with_kv_cache_matches_eager(models):
    eager, fq_model = models
    ids = torch.randint(0, 256, (1, 7))
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(eager.generate(ids, **kw), fq_model.generate(ids, **kw))


@pytest.mark.parametrize("method", ["minmax", "mse"])
@pytest.mark.parametrize("bits,group,min_sqnr,min_top1", [(8, -1, 30.0, 0.95), (4, 32, 12.0, 0.6)])
def test_quantized_hf_model_stays_close(models, bits, group, min_sqnr, min_top1, method):
    eager, _ = models
    q = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG)).eval()
    q.load_state_dict(eager.state_dict())
    fqt.quantize_transformers_model(q, bits=bits, group_size=group, method=method)
    w = eager.model.layers[0].mlp.down_proj.weight.detach()
    assert torch.equal(
        q.model.layers[0].mlp.down_proj.scales, fq.quantize(w, bits, group, method=method).scales
    )
    assert isinstance(q.model.layers[0].mlp.down_proj, QuantLinear)
    assert not isinstance(q.lm_head, QuantLinear)  # lm_head skipped by default
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        a, b = eager(ids).logits, q(ids).logits
    assert sqnr_db(a, b) >= min_sqnr
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= min_top1


def test_gptq_act_order_on_an_hf_model(models):
    """quantize_transformers_model forwards GPTQ's options (calibration, act_order) to quantize_model: with static
    groups every scale is the "mse" one of the linear's own weight while the codes move (error compensation), and
    the model stays as close as the mse int4 bounds above require."""
    eager, _ = models
    q = _copy_of(eager)
    calib = torch.randint(0, 256, (16, 64), generator=torch.Generator().manual_seed(1))  # 4 rows per input
    fqt.quantize_transformers_model(
        q, bits=4, group_size=32, method="gptq", calibration=lambda m: m(calib), act_order=True
    )
    w = eager.model.layers[1].mlp.down_proj.weight.detach()
    got, mse = q.model.layers[1].mlp.down_proj, fq.quantize(w, 4, 32, method="mse")
    assert torch.equal(got.scales, mse.scales) and not torch.equal(got.qdata, mse.qdata)
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        a, b = eager(ids).logits, q(ids).logits
    assert sqnr_db(a, b) >= 12.0
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.6


def test_quantized_hf_checkpoint_loads_into_a_skeleton(models):
    """The usual way to ship a quantized model: quantize once, save the state_dict; later build the architecture
    (other random weights), install empty QuantLinears (quantize_weights=False) and load: the same logits, bit for
    bit. (A transformers model built on the meta device also needs its non-persistent buffers, e.g. the rotary
    inv_freq, which no state_dict holds: from_pretrained-style loaders recreate those.)"""
    eager, _ = models
    q = _copy_of(eager)
    fqt.quantize_transformers_model(q, bits=4, group_size=32, method="mse")
    torch.manual_seed(123)
    skeleton = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG)).eval()
    fqt.quantize_transformers_model(skeleton, bits=4, group_size=32, quantize_weights=False)
    skeleton.load_state_dict(q.state_dict())
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        assert torch.equal(skeleton(ids).logits, q(ids).logits)


def _copy_of(eager):
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG)).eval()
    m.load_state_dict(eager.state_dict())
    return m


@pytest.mark.parametrize("quant", [None, (4, 32)])
def test_fused_hf_model_matches_unfused(models, quant):
    """fuse_transformers_model swaps every RMSNorm (2 per layer + the final one) and every SwiGLU MLP; logits and
    greedy generation stay those of the unfused model (float, or quantized before fusing: the same weights).
    On the Triton path (the interpreter here) the norms and gating are single kernels rounding once, vs the
    Hugging Face forms' up to three roundings in the dtype: fp32 here, so both agree to ~1e-6."""
    eager, _ = models
    plain, fused = _copy_of(eager), _copy_of(eager)
    if quant:
        fqt.quantize_transformers_model(plain, *quant)
        fqt.quantize_transformers_model(fused, *quant)
    swapped = fqt.fuse_transformers_model(fused, backend="triton")
    assert swapped == {"rms_norm": 2 * CFG["num_hidden_layers"] + 1, "mlp": CFG["num_hidden_layers"]}
    assert isinstance(fused.model.layers[0].mlp, fqt.FusedSwiGLUMLP)
    assert isinstance(fused.model.norm, fqt.FusedRMSNorm)
    assert isinstance(fused.model.layers[0].mlp.gate_up_proj, QuantLinear if quant else torch.nn.Linear)
    ids = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        a, b = plain(ids).logits, fused(ids).logits
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(plain.generate(ids[:1], **kw), fused.generate(ids[:1], **kw))


def test_fusing_hf_model_cuts_its_launches(models):
    """One decode-sized forward (1 token) per layer: the fused norms and MLP launch fewer kernels (counted by
    flashquant.bench.launches, the Triton path under the interpreter)."""
    from flashquant.bench.launches import count_launches

    eager, _ = models
    plain, fused = _copy_of(eager), _copy_of(eager)
    fqt.fuse_transformers_model(fused, backend="triton")
    ids = torch.randint(0, 256, (1, 1))
    n_plain = count_launches(lambda: plain(ids)).total
    n_fused = count_launches(lambda: fused(ids)).total
    # per layer, each of the 2 norms' >= 5 ops (6 in fp32: pow, mean, add, rsqrt, 2 muls) becomes 1 kernel, and
    # the MLP's gate + up linears and silu, mul become 1 linear and 1 kernel; the final norm saves more on top
    assert n_plain - n_fused >= 10 * CFG["num_hidden_layers"], (n_plain, n_fused)


def test_quantized_hf_model_trains_its_float_parameters(models):
    """Fine-tuning around a frozen int4 base (embeddings, norms, lm_head trainable; a QLoRA adapter would sit in
    the same place): with flashquant attention and QuantLinear layers, the loss's gradients are those of the same
    model with the dequantized weights in dense nn.Linear layers and eager attention, up to the C++ kernel's int16
    activation rounding (measured: up to 4e-5 of each gradient's largest value; bound 1e-3)."""
    eager, fq_model = models
    quantized, dense = _copy_of(fq_model), _copy_of(eager)
    quantized.set_attn_implementation(fq_model.config._attn_implementation)
    fqt.quantize_transformers_model(quantized, bits=4, group_size=32)
    for name, mod in quantized.named_modules():
        if isinstance(mod, QuantLinear):
            dense.get_submodule(name).weight.data.copy_(mod.qweight.dequantize(torch.float32))
    ids = torch.randint(0, 256, (2, 12))
    grads = []
    for m in (quantized, dense):
        m.zero_grad()
        m(ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    assert {"model.norm.weight", "model.embed_tokens.weight", "lm_head.weight"} <= grads[0].keys()
    assert not any(name.endswith("proj.weight") for name in grads[0])  # the quantized linears hold buffers
    for name, got in grads[0].items():
        want = grads[1][name]
        assert got is not None, name
        err = float((got - want).abs().max()) / float(want.abs().max())
        assert err <= 1e-3, f"{name}: relative error {err:.3g}"
