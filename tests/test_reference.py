"""The references against independent, element-by-element math written here (not the references' code)."""

import math

import pytest
import torch

from flashquant import quant
from flashquant.reference import (
    attention_kvcache_ref,
    attention_ref,
    attention_varlen_ref,
    dequantize_ref,
    quant_matmul_ref,
    quantize_ref,
)
from tolerances import max_err


def naive_attention(q, k, v, causal, scale, window, softcap):
    """Python loops over (b, h, i): visible keys by flash-attn's bottom-right rule."""
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    left, right = window
    if causal:
        right = 0
    out = torch.zeros(B, Sq, Hq, D, dtype=torch.float64)
    lse = torch.full((B, Hq, Sq), -math.inf, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            kv = h // (Hq // Hkv)
            for i in range(Sq):
                keys = [
                    j
                    for j in range(Sk)
                    if (right < 0 or j <= i + Sk - Sq + right) and (left < 0 or j >= i + Sk - Sq - left)
                ]
                if not keys:
                    continue
                s = [float(q[b, i, h].double() @ k[b, j, kv].double()) * scale for j in keys]
                if softcap > 0:
                    s = [softcap * math.tanh(x / softcap) for x in s]
                mx = max(s)
                e = [math.exp(x - mx) for x in s]
                tot = sum(e)
                lse[b, h, i] = mx + math.log(tot)
                for w, j in zip(e, keys):
                    out[b, i, h] += w / tot * v[b, j, kv].double()
    return out, lse


@pytest.mark.parametrize("sq,sk", [(1, 1), (3, 7), (7, 3), (5, 5), (1, 6), (4, 0)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [(-1, -1), (2, 0), (1, 2)])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (3, 1)])
def test_attention_ref_matches_naive_loops(sq, sk, causal, window, heads):
    hq, hkv = heads
    q, k, v = torch.randn(2, sq, hq, 8), torch.randn(2, sk, hkv, 8), torch.randn(2, sk, hkv, 8)
    softcap = 1.5 if window == (1, 2) else 0.0
    out, lse = attention_ref(q, k, v, causal, 0.3, window, softcap)
    exp_out, exp_lse = naive_attention(q, k, v, causal, 0.3, window, softcap)
    assert max_err(out, exp_out) < 1e-5
    assert max_err(lse, exp_lse) < 1e-5
    assert not torch.isnan(out).any()


def test_attention_ref_causal_is_bottom_right_aligned():
    # Sq=2, Sk=5: query 0 sees keys 0..3, query 1 sees 0..4 (flash-attn >= 2.1); v = one-hot key ids.
    q = torch.zeros(1, 2, 1, 5)
    k = torch.zeros(1, 5, 1, 5)
    v = torch.eye(5)[None, :, None, :]
    out, _ = attention_ref(q, k, v, causal=True)
    assert torch.allclose(out[0, 0, 0], torch.tensor([0.25, 0.25, 0.25, 0.25, 0.0]))
    assert torch.allclose(out[0, 1, 0], torch.full((5,), 0.2))


def test_attention_ref_empty_rows_are_zero_with_minus_inf_lse():
    q, k, v = torch.randn(1, 4, 2, 8), torch.randn(1, 2, 2, 8), torch.randn(1, 2, 2, 8)
    out, lse = attention_ref(q, k, v, causal=True, window_size=(0, 0))  # Sq > Sk: rows 0,1 see nothing
    assert torch.equal(out[0, :2], torch.zeros(2, 2, 8))
    assert torch.isinf(lse[0, :, :2]).all() and (lse[0, :, :2] < 0).all()
    assert torch.isfinite(lse[0, :, 2:]).all()


def test_varlen_ref_equals_per_sequence_naive():
    lens_q, lens_k = [3, 0, 5], [4, 2, 5]
    cq = torch.tensor([0, 3, 3, 8], dtype=torch.int32)
    ck = torch.tensor([0, 4, 6, 11], dtype=torch.int32)
    q, k, v = torch.randn(8, 4, 8), torch.randn(11, 2, 8), torch.randn(11, 2, 8)
    out, lse = attention_varlen_ref(q, k, v, cq, ck, causal=True, softmax_scale=0.5)
    for b in range(3):
        qs, ks = sum(lens_q[:b]), sum(lens_k[:b])
        o, lse_b = naive_attention(
            q[None, qs : qs + lens_q[b]],
            k[None, ks : ks + lens_k[b]],
            v[None, ks : ks + lens_k[b]],
            True,
            0.5,
            (-1, -1),
            0.0,
        )
        assert max_err(out[qs : qs + lens_q[b]], o[0]) < 1e-5
        assert max_err(lse[:, qs : qs + lens_q[b]], lse_b[0]) < 1e-5


@pytest.mark.parametrize("paged", [False, True])
def test_kvcache_ref_appends_in_place_and_attends(paged):
    B, hkv, D, bs = 2, 2, 8, 4
    lens = torch.tensor([3, 6], dtype=torch.int32)
    new_k, new_v = torch.randn(B, 2, hkv, D), torch.randn(B, 2, hkv, D)
    full_k = [torch.randn(int(n), hkv, D) for n in lens]
    full_v = [torch.randn(int(n), hkv, D) for n in lens]
    if paged:
        table = torch.tensor([[5, 1], [0, 3]], dtype=torch.int32)
        kc, vc = torch.zeros(6, bs, hkv, D), torch.zeros(6, bs, hkv, D)
        for b in range(B):
            for p in range(int(lens[b])):
                kc[table[b, p // bs], p % bs] = full_k[b][p]
                vc[table[b, p // bs], p % bs] = full_v[b][p]
    else:
        table = None
        kc, vc = torch.zeros(B, 8, hkv, D), torch.zeros(B, 8, hkv, D)
        for b in range(B):
            kc[b, : lens[b]], vc[b, : lens[b]] = full_k[b], full_v[b]
    q = torch.randn(B, 2, 4, D)
    out, _ = attention_kvcache_ref(q, kc, vc, lens, new_k, new_v, table, causal=True)
    for b in range(B):
        keys = torch.cat([full_k[b], new_k[b]])[None]
        vals = torch.cat([full_v[b], new_v[b]])[None]
        o, _ = naive_attention(q[b : b + 1], keys, vals, True, 1 / math.sqrt(D), (-1, -1), 0.0)
        assert max_err(out[b], o[0]) < 1e-5
        pos = int(lens[b])  # the append landed where it should
        blk, slot = (table[b, pos // bs], pos % bs) if paged else (b, pos)
        assert torch.equal(kc[blk, slot], new_k[b, 0])


# ---- quantization --------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [4, -1])
def test_quantize_ref_matches_stated_formula(bits, symmetric, group_size):
    w = torch.randn(3, 8)
    codes, scales, zeros = quantize_ref(w, bits, group_size, symmetric)
    gs = 8 if group_size == -1 else group_size
    for n in range(3):
        for g in range(8 // gs):
            grp = [float(x) for x in w[n, g * gs : (g + 1) * gs]]
            if symmetric:
                qmax = 2 ** (bits - 1) - 1
                s = max(abs(x) for x in grp) / qmax
                z = 2 ** (bits - 1)
            else:
                qmax = 2**bits - 1
                s = (max(max(grp), 0) - min(min(grp), 0)) / qmax
            assert abs(float(scales[n, g]) - s) <= 1e-6 * s
            s = float(scales[n, g])
            if not symmetric:
                z = min(max(round(-min(min(grp), 0) / s), 0), qmax)
                assert int(zeros[n, g]) == z
            for j, x in enumerate(grp):
                lo, hi = (0, 2**bits - 1)
                expect = min(max(round(x / s) + z, lo), hi)  # Python round: half to even, like torch.round
                assert int(codes[n, g * gs + j]) == expect


def test_dequantize_and_matmul_ref():
    codes = torch.tensor([[0, 15, 8, 9]], dtype=torch.uint8)
    scales = torch.tensor([[0.5, 2.0]])
    w = dequantize_ref(codes, scales, None, 4, 2)
    assert torch.equal(w, torch.tensor([[-4.0, 3.5, 0.0, 2.0]]))
    zeros = torch.tensor([[1, 15]], dtype=torch.uint8)
    w = dequantize_ref(codes, scales, zeros, 4, 2)
    assert torch.equal(w, torch.tensor([[-0.5, 7.0, -14.0, -12.0]]))
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert torch.equal(
        quant_matmul_ref(x, codes, scales, zeros, 4, 2, torch.tensor([1.0])),
        torch.tensor([[-0.5 + 14 - 42 - 48 + 1.0]]),
    )


def test_int4_packing_bit_layout_and_round_trip():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 0]], dtype=torch.uint8)
    packed = quant.pack(codes, 4)
    assert packed.tolist() == [[0x21, 0x43, 0x65, 0x87, 0xA9, 0xCB, 0xED, 0x0F]]
    words = packed.view(torch.int32)  # eight codes per int32, k = 8i + t in bits 4t..4t+3 (little endian)
    assert (int(words[0, 0]) >> 4 * 2) & 0xF == 3
    assert torch.equal(quant.unpack(packed, 4), codes)
    rnd = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    assert torch.equal(quant.unpack(quant.pack(rnd, 4), 4), rnd)
