"""The Llama model on flashquant's ops: fp32 path vs a straightforward per-layer reference written here,
cache decode vs full recompute, paged vs contiguous, batched vs one-by-one, sampling, the demo."""

import math
import re

import pytest
import torch
import torch.nn.functional as F

from flashquant import backends
from flashquant.models.llama import KVCache, Llama, config_from_preset, generate, rope_inv_freq, sample
from tolerances import sqnr_db

CFG = config_from_preset("tiny")


@pytest.fixture(autouse=True)
def _inference():
    """The model runs as inference does, without autograd: with it, the parameters' requires_grad would send
    `auto` to the differentiable PyTorch paths instead of the kernels these tests check (test_gradients.py)."""
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def model():
    return Llama.random(CFG, seed=0)


def straightforward_forward(m: Llama, tokens):
    """Independent fp32 implementation: explicit softmax attention with repeated KV heads, explicit RoPE."""
    cfg = m.cfg
    B, S = tokens.shape
    x = m.embed_tokens.weight[tokens].double()
    inv = rope_inv_freq(cfg).double()
    ang = torch.arange(S, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cos(ang), torch.sin(ang)

    def rope(t):  # t (B, S, H, D): pairs (i, i + D/2) rotate by ang_i
        a, b = t[..., : cfg.head_dim // 2], t[..., cfg.head_dim // 2 :]
        c, s = cos[None, :, None], sin[None, :, None]
        return torch.cat([a * c - b * s, b * c + a * s], -1)

    def norm(t, w):
        return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps) * w.double()

    for layer in m.layers:
        at = layer.self_attn
        h = norm(x, layer.input_layernorm.weight)
        q = rope((h @ at.q_proj.weight.double().t()).view(B, S, cfg.num_heads, cfg.head_dim))
        k = rope((h @ at.k_proj.weight.double().t()).view(B, S, cfg.num_kv_heads, cfg.head_dim))
        v = (h @ at.v_proj.weight.double().t()).view(B, S, cfg.num_kv_heads, cfg.head_dim)
        rep = cfg.num_heads // cfg.num_kv_heads
        k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(cfg.head_dim)
        scores = scores.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
        o = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(B, S, -1)
        x = x + o @ at.o_proj.weight.double().t()
        h = norm(x, layer.post_attention_layernorm.weight)
        mlp = layer.mlp
        act = F.silu(h @ mlp.gate_proj.weight.double().t()) * (h @ mlp.up_proj.weight.double().t())
        x = x + act @ mlp.down_proj.weight.double().t()
    return norm(x, m.norm.weight) @ m.lm_head.weight.double().t()


def test_fp32_forward_matches_straightforward_reference(model):
    tokens = torch.randint(0, CFG.vocab_size, (2, 13))
    ref = straightforward_forward(model, tokens)
    out = model(tokens)
    assert (out.double() - ref).abs().max() < 1e-4 * ref.abs().max()


def test_logits_at_selects_positions_of_the_full_forward(model):
    """logits_at (B,): one position per sequence -> (B, 1, vocab); (B, P): P positions each -> (B, P, vocab); the
    rows the full forward computes."""
    tokens = torch.randint(0, CFG.vocab_size, (2, 7))
    with torch.no_grad():
        full = model(tokens)
        one = model(tokens, logits_at=torch.tensor([6, 3]))
        several = model(tokens, logits_at=torch.tensor([[0, 4, 6], [1, 2, 5]]))
    torch.testing.assert_close(one, torch.stack([full[0, 6:7], full[1, 3:4]]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        several, torch.stack([full[0, [0, 4, 6]], full[1, [1, 2, 5]]]), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("fused", [False, True])
def test_triton_model_matches_straightforward_reference_prefill_and_decode(fused):
    """Every op through a Triton kernel (attention, rms_norm with the fused residual add, rotary, silu_mul; the
    interpreter on a CPU): the full forward matches the independent reference, and cached decode steps match
    the full forward. Fused: q/k/v and gate/up as one projection each, whose output slices (strided views)
    the rotary, attention, cache append and silu_mul kernels read in place."""
    tri = Llama.random(CFG, seed=0, attn_backend="triton")
    tokens = torch.randint(0, CFG.vocab_size, (2, 7))
    ref = straightforward_forward(tri, tokens)
    if fused:
        tri.fuse_projections()
    full = tri(tokens)
    assert (full.double() - ref).abs().max() < 1e-4 * ref.abs().max()
    cache = KVCache(CFG, 2, 8, torch.float32, "cpu", paged=False)
    steps = [tri(tokens[:, :5], cache=cache)]
    cache.advance([5, 5])
    for t in range(5, 7):
        steps.append(tri(tokens[:, t : t + 1], cache=cache))
        cache.advance([1, 1])
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-4)


@pytest.mark.parametrize("quant", [None, (4, 32)])
def test_fused_projections_give_the_unfused_models_logits(quant):
    """fuse_projections() on a float or quantized model (either order with quantize(): the same weights): the
    same logits as the unfused model, prefill and cached decode (paged), up to matmul summation order."""
    plain = Llama.random(CFG, seed=2)
    fused = Llama.random(CFG, seed=2).fuse_projections()
    if quant:
        plain.quantize(*quant, skip=())
        fused.quantize(*quant, skip=())
        other = Llama.random(CFG, seed=2).quantize(*quant, skip=()).fuse_projections()
        sd_a, sd_b = fused.state_dict(), other.state_dict()
        assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert "layers.0.self_attn.qkv_proj" in dict(fused.named_modules())
    assert not any(n.endswith(("q_proj", "gate_proj")) for n, _ in fused.named_modules())
    tokens = torch.randint(0, CFG.vocab_size, (2, 9))
    caches = [KVCache(CFG, 2, 16, torch.float32, "cpu", paged=True, shuffle_blocks=True) for _ in range(2)]
    with torch.inference_mode():
        for t0, t1 in [(0, 6), (6, 7), (7, 8), (8, 9)]:
            a, b = plain(tokens[:, t0:t1], cache=caches[0]), fused(tokens[:, t0:t1], cache=caches[1])
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * float(a.abs().max()))
            for c in caches:
                c.advance([t1 - t0] * 2)


@pytest.mark.parametrize("paged", [False, True])
def test_decode_with_cache_equals_full_recompute(model, paged):
    prompt = torch.randint(0, CFG.vocab_size, (1, 9))
    new = generate(model, prompt.tolist(), 6, paged=paged)[0]
    full = torch.tensor([prompt[0].tolist() + new])
    logits = model(full)
    greedy = logits[0, 8:-1].argmax(-1).tolist()
    assert greedy == new


def test_cache_logits_match_full_forward_stepwise(model):
    tokens = torch.randint(0, CFG.vocab_size, (2, 10))
    full = model(tokens)
    cache = KVCache(CFG, 2, 16, torch.float32, "cpu", paged=True, block_size=4, shuffle_blocks=True)
    first = model(tokens[:, :6], cache=cache)
    cache.advance([6, 6])
    steps = [first]
    for t in range(6, 10):
        steps.append(model(tokens[:, t : t + 1], cache=cache))
        cache.advance([1, 1])
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-4)


def test_batched_generation_equals_one_by_one(model):
    prompts = [[1, 2, 3, 4, 5, 6], [7], [8, 9, 10]]
    batched = generate(model, prompts, 5)
    assert batched == [generate(model, [p], 5)[0] for p in prompts]
    assert batched == generate(model, prompts, 5, paged=True, block_size=4)


def test_eos_stops_generation(model):
    first = generate(model, [[3, 4, 5]], 4)[0]
    assert generate(model, [[3, 4, 5]], 4, eos_token_id=first[1])[0] == first[:2]


def test_sampling_top_k_top_p_are_seeded_and_restricted():
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    draws = {int(sample(logits, 1.0, 2, 1.0, g)) for _ in range(50)}
    assert draws <= {0, 1}
    draws = {int(sample(logits, 1.0, 0, 0.5, g)) for _ in range(50)}
    assert draws == {0}  # token 0 alone has > 50% of the mass
    assert int(sample(logits, 0.0, 0, 1.0, g)) == 0


@pytest.mark.parametrize("bits,group,min_sqnr", [(8, -1, 25.0), (4, 32, 8.0)])
def test_quantized_model_logits_stay_close(bits, group, min_sqnr):
    ref = Llama.random(CFG, seed=1)
    q = Llama.random(CFG, seed=1).quantize(bits, group)
    tokens = torch.randint(0, CFG.vocab_size, (2, 8))
    a, b = ref(tokens), q(tokens)
    assert sqnr_db(a, b) >= min_sqnr
    if bits == 8:
        assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9


def test_demo_runs_end_to_end(tmp_path, capsys):
    from flashquant.demo import main

    out = tmp_path / "demo.json"
    assert main(["--preset", "tiny", "--prompt-len", "8", "--new-tokens", "4", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "pytorch fp32 (SDPA)" in text and "flashquant int4" in text and out.exists()
    import json

    rows = json.loads(out.read_text())["results"]
    # teacher-forced top-1 over the 4 generated positions of every variant; the fp32 reference's cache-free forward
    # predicts exactly the tokens its cached decode generated
    assert all(r["forced_total"] == 4 and 0 <= r["forced_same"] <= 4 for r in rows)
    assert rows[0]["forced_same"] == 4 and "top-1 = fp32" in text


def test_demo_stopped_from_outside_keeps_the_variants_it_finished(tmp_path, monkeypatch, capsys):
    """On a lent GPU the demo runs under `timeout -s INT`: the variants measured before the interrupt are printed
    and written (the JSON after every variant), marked as stopped early, and the exit code says so."""
    import json

    from flashquant import demo

    real, calls = demo._run_variant, []

    def interrupt_third_variant(*args, **kwargs):
        # Counted per variant, not per measurement: on CUDA a variant also measures its graphed decode.
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(demo, "_run_variant", interrupt_third_variant)
    out = tmp_path / "demo.json"
    assert (
        demo.main(["--preset", "tiny", "--prompt-len", "8", "--new-tokens", "4", "--json", str(out)]) == 130
    )
    run = json.loads(out.read_text())
    assert [r["name"] for r in run["results"]] == ["pytorch fp32 (SDPA)", "pytorch bf16 (SDPA)"]
    # 6 variants on the CPU (the quantized ones with fp32 and bf16 activations), 5 on CUDA
    assert re.fullmatch(r"interrupted after 2 of [56] variants", run["stopped_early"])
    assert "pytorch bf16 (SDPA)" in capsys.readouterr().out


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("quant,fused", [(None, False), ((4, 32), False), ((4, 32), True)])
def test_decode_step_compiles_fullgraph_once_and_matches_eager(quant, fused, paged):
    """torch.compile(fullgraph=True) of a decode step: no graph break (so no host sync or data-dependent Python
    in the step, which CUDA-graph capture and mode="reduce-overhead" also need), one compilation for several
    steps as the cache grows, and the same logits and cache contents as eager."""
    import copy

    m = Llama.random(CFG, seed=0)
    if quant:
        m.quantize(*quant, skip=())
    if fused:
        m.fuse_projections()
    cache = KVCache(CFG, 2, 48, torch.float32, "cpu", paged=paged, shuffle_blocks=paged)
    compiles = []

    def count(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    with torch.inference_mode():
        m(torch.randint(0, CFG.vocab_size, (2, 5)), cache=cache)
        cache.advance([5, 5])
        step = torch.compile(lambda t: m(t, cache=cache), fullgraph=True, backend=count)
        tok = torch.randint(0, CFG.vocab_size, (2, 1))
        for _ in range(3):
            eager_cache = copy.deepcopy(cache)
            eager = m(tok, cache=eager_cache)
            out = step(tok)
            assert torch.allclose(out, eager, atol=1e-5, rtol=1e-5)
            assert torch.equal(cache.k, eager_cache.k) and torch.equal(cache.v, eager_cache.v)
            cache.advance([1, 1])
            tok = out[:, -1].argmax(-1, keepdim=True)
    assert len(compiles) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("quant", [None, (4, 128)])
def test_gpu_cuda_graph_decode_matches_eager(quant, fused):
    from flashquant.models.llama import CUDAGraphDecoder

    cfg = config_from_preset("tiny")
    model = Llama.random(cfg, seed=0, dtype=torch.float16, device="cuda")
    if quant:
        model.quantize(*quant)
    if fused:
        model.fuse_projections()
    prompt = torch.randint(0, cfg.vocab_size, (2, 12), device="cuda")
    caches = [KVCache(cfg, 2, 32, torch.float16, "cuda") for _ in range(2)]
    for c in caches:
        model(prompt, cache=c)
        c.advance([12, 12])
    graphed = CUDAGraphDecoder(model, caches[1])
    tok = prompt[:, -1:]
    for _ in range(4):
        eager = model(tok, cache=caches[0])
        replay = graphed(tok)
        assert torch.allclose(eager, replay, atol=1e-2)
        for c in caches:
            c.advance([1, 1])
        tok = eager[:, -1].argmax(-1, keepdim=True)


def test_flashquant_decode_step_launch_budget_per_layer():
    """At decode a layer's small ops cost their launch count. flashquant's layer (fused projections, Triton
    layer ops and KV append) launches 4 GEMVs, 2 norms, rotary, the KV append (which also writes the lengths
    after it), attention and silu_mul: 10, with no copies and no host syncs (counted by flashquant.bench.launches, whose
    `python -m` form prints the table). The PyTorch model is counted too, so that the counter is known to see
    the ATen ops it must (64 on this path)."""
    from flashquant.bench.launches import decode_launches, llama_builder

    device = "cuda" if torch.cuda.is_available() else "cpu"
    ours = decode_launches(llama_builder(True, (4, 32), device=device), torch.float16, device)
    assert ours["per_layer_total"] <= 10, ours["per_layer"]
    assert ours["host_syncs_per_layer"] == 0
    gemvs = sum(n for name, n in ours["per_layer"].items() if name.startswith("flashquant::"))
    assert gemvs == 4, ours["per_layer"]  # qkv, o, gate_up, down
    assert not {"aten::to", "aten::contiguous", "aten::copy_", "aten::clone"} & set(ours["per_layer"])
    baseline = decode_launches(llama_builder(False, None, device=device), torch.float16, device)
    assert baseline["per_layer_total"] >= 50 and baseline["per_layer"]["aten::linear"] == 7


# ---- CPUDecoder: the decode step with the C++ ops called directly --------------------------------------------
needs_cpu_ext = pytest.mark.skipif(not backends()["cpu"].available, reason="C++ extension not built")


def _prefilled(model, dtype, paged, lens=(9, 4)):
    """A cache holding right-padded prompts of `lens` tokens (prefill through the eager model), and the next
    tokens."""
    cache = KVCache(model.cfg, len(lens), 32, dtype, "cpu", paged=paged, block_size=16, shuffle_blocks=paged)
    prompt = torch.randint(0, model.cfg.vocab_size, (len(lens), max(lens)))
    logits = model(prompt, cache=cache, logits_at=torch.tensor(lens) - 1)
    cache.advance(list(lens))
    return cache, logits[:, -1].argmax(-1, keepdim=True)


@needs_cpu_ext
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("quant", [None, (8, -1), (4, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_decoder_steps_equal_the_eager_model_bit_for_bit(dtype, quant, fused, paged):
    """CPUDecoder calls the kernels the eager model's ops pick on CPU tensors, with the same arguments: the
    logits and both caches must be identical, not just close, step after step (sequences of different lengths,
    contiguous and paged caches, fused and separate projections, float and quantized linears)."""
    from flashquant.models.llama import CPUDecoder

    cfg = config_from_preset("tiny", num_layers=2)
    model = Llama.random(cfg, seed=3, dtype=dtype)
    if quant:
        model.quantize(*quant, skip=())
    if fused:
        model.fuse_projections()
    cache, tok = _prefilled(model, dtype, paged)
    decoder = CPUDecoder(model, cache)
    for _ in range(3):
        saved = cache.k.clone(), cache.v.clone()
        eager = model(tok, cache=cache)
        eager_k, eager_v = cache.k.clone(), cache.v.clone()
        cache.k.copy_(saved[0]), cache.v.copy_(saved[1])
        direct = decoder(tok)
        assert direct.shape == eager.shape == (2, 1, cfg.vocab_size) and direct.dtype == torch.float32
        assert torch.equal(direct, eager)
        assert torch.equal(cache.k, eager_k) and torch.equal(cache.v, eager_v)
        cache.advance([1, 1])
        tok = direct[:, -1].argmax(-1, keepdim=True)


@needs_cpu_ext
def test_cpu_decoder_runs_quantized_linears_with_bias_and_input_perm():
    """QuantLinear's bias and act-order input permutation (GPTQ checkpoints) take the same path as its forward."""
    from flashquant.models.llama import CPUDecoder
    from flashquant.nn import QuantLinear

    cfg = config_from_preset("tiny", num_layers=1)
    model = Llama.random(cfg, seed=4).quantize(4, 32, skip=())
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.bias = torch.nn.Parameter(torch.randn(m.out_features, generator=g) * 0.1)
            m.input_perm = torch.randperm(m.in_features, generator=g)
    cache, tok = _prefilled(model, torch.float32, False)
    saved = cache.k.clone(), cache.v.clone()
    eager = model(tok, cache=cache)
    cache.k.copy_(saved[0]), cache.v.copy_(saved[1])
    assert torch.equal(CPUDecoder(model, cache)(tok), eager)


@needs_cpu_ext
def test_generate_decodes_through_the_cpu_decoder(monkeypatch):
    """generate() on CPU tensors runs its decode steps through CPUDecoder, and its tokens are those of a greedy
    loop over the eager model."""
    from flashquant.models import llama

    model = Llama.random(CFG, seed=5).quantize(4, 32)
    prompts = [[1, 2, 3, 4, 5], [6, 7]]
    steps = []
    real = llama.CPUDecoder._step
    monkeypatch.setattr(llama.CPUDecoder, "_step", lambda self, t: steps.append(1) or real(self, t))
    new = generate(model, prompts, 5)
    assert len(steps) == 4  # the first token comes from the prefill's logits
    cache = KVCache(CFG, 2, 16, torch.float32, "cpu")
    tokens = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 0, 0, 0]])
    tok = model(tokens, cache=cache, logits_at=torch.tensor([4, 1]))[:, -1].argmax(-1, keepdim=True)
    cache.advance([5, 2])
    eager = [tok]
    for _ in range(4):
        tok = model(tok, cache=cache)[:, -1].argmax(-1, keepdim=True)
        cache.advance([1, 1])
        eager.append(tok)
    assert new == torch.cat(eager, 1).tolist()


def test_cpu_decoder_refuses_what_it_would_not_run_as_the_model_does(monkeypatch):
    """Each case names its reason; generate() then decodes eagerly (without the C++ extension too)."""
    import dataclasses

    from flashquant import _dispatch
    from flashquant.models.llama import CPUDecoder

    model = Llama.random(CFG, seed=6)
    cache = KVCache(CFG, 1, 16, torch.float32, "cpu")
    baseline = Llama.random(CFG, seed=6, attn_backend="torch")
    assert "attn_backend='torch'" in CPUDecoder.unsupported(baseline, cache)
    with pytest.raises(ValueError, match="attn_backend='torch'"):
        CPUDecoder(baseline, cache)
    assert "holds torch.bfloat16" in CPUDecoder.unsupported(model, KVCache(CFG, 1, 16, torch.bfloat16, "cpu"))
    handle = model.layers[0].mlp.register_forward_hook(lambda *a: None)
    assert "layers.0.mlp" in CPUDecoder.unsupported(model, cache) and "hooks" in CPUDecoder.unsupported(
        model, cache
    )
    handle.remove()
    quantized = Llama.random(CFG, seed=6).quantize(4, 32, backend="torch")
    assert "backend='torch'" in CPUDecoder.unsupported(quantized, cache)
    info = dict(_dispatch.backends())
    info["cpu"] = dataclasses.replace(info["cpu"], available=False, reason="flashquant._C failed to import")
    monkeypatch.setattr(_dispatch, "_availability", lambda: info)
    assert "_C failed to import" in CPUDecoder.unsupported(model, cache)
    steps = []
    monkeypatch.setattr(CPUDecoder, "_step", lambda *a: steps.append(1))
    assert len(generate(model, [[1, 2, 3]], 3)[0]) == 3  # (the eager ops warn once that they fall back)
    assert not steps


@needs_cpu_ext
def test_cpu_decoder_input_errors_name_the_argument_and_leave_the_cache_alone():
    from flashquant.models.llama import CPUDecoder

    model = Llama.random(CFG, seed=7)
    cache, tok = _prefilled(model, torch.float32, False, lens=(4,))
    decoder = CPUDecoder(model, cache)
    with pytest.raises(
        ValueError, match=r"tokens must be an integer tensor of shape \(B=1, 1\), got \(1, 2\)"
    ):
        decoder(torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="tokens must be an integer tensor"):
        decoder(tok.float())
    cache.advance([cache.capacity - 4])  # full: one more token does not fit
    saved = cache.k.clone(), cache.v.clone()
    with pytest.raises(ValueError, match="cache_seqlens"):
        decoder(tok)
    assert torch.equal(cache.k, saved[0]) and torch.equal(cache.v, saved[1])
