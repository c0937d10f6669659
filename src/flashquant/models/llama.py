"""A compact Llama-3-architecture decoder on flashquant's ops, with seeded random weights (no downloads), or the
weights of a Hugging Face-format Llama checkpoint directory, float or GPTQ / AWQ (:meth:`Llama.from_pretrained`).

RMSNorm -> GQA attention (rotary with Llama-3 frequency scaling; prefill through flashquant.attention, decode
through flashquant.attention_with_kvcache over a contiguous or paged KVCache) -> RMSNorm -> SwiGLU MLP; every
linear can be swapped for a QuantLinear (int4/int8) with :meth:`Llama.quantize`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import torch
from torch import nn

import flashquant as fq
from flashquant.attention import append_kv
from flashquant.nn import fuse_linears, quantize_model


@dataclasses.dataclass
class LlamaConfig:
    vocab_size: int = 512
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    max_position: int = 8192
    # Llama 3 rope scaling (factor, low_freq_factor, high_freq_factor, original_max_position); None disables it
    rope_scaling: tuple[float, float, float, int] | None = (8.0, 1.0, 4.0, 8192)
    tie_embeddings: bool = False

    @classmethod
    def from_hf(cls, hf) -> LlamaConfig:
        """From a Hugging Face Llama config (its config.json as a dict, or a transformers LlamaConfig). Raises
        ValueError for what this decoder does not compute (biases, another activation or rotary scaling)."""
        d = hf.to_dict() if hasattr(hf, "to_dict") else dict(hf)
        if d.get("model_type", "llama") != "llama":
            raise ValueError(f"config model_type must be 'llama', got {d.get('model_type')!r}")
        for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
            if d.get(key, ok) != ok:
                raise ValueError(f"config {key} must be {ok!r} for this Llama decoder, got {d[key]!r}")
        # transformers >= 5 writes rope_parameters (rope_theta inside); older configs rope_theta + rope_scaling
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind == "llama3":
            scaling = (
                float(rope["factor"]),
                float(rope["low_freq_factor"]),
                float(rope["high_freq_factor"]),
                int(rope["original_max_position_embeddings"]),
            )
        elif kind == "default":
            scaling = None
        else:
            raise ValueError(f"config rotary scaling must be 'llama3' or none, got {kind!r}")
        heads = d["num_attention_heads"]
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rope_theta=float(d.get("rope_theta", rope.get("rope_theta", 10000.0))),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            max_position=d.get("max_position_embeddings", 8192),
            rope_scaling=scaling,
            tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        )

    def to_hf(self) -> dict:
        """This config as a Hugging Face Llama config.json (the inverse of :meth:`from_hf`)."""
        rope = {"rope_type": "default"}
        if self.rope_scaling is not None:
            factor, low, high, orig = self.rope_scaling
            rope = {
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low,
                "high_freq_factor": high,
                "original_max_position_embeddings": orig,
            }
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope if self.rope_scaling is not None else None,
            "tie_word_embeddings": self.tie_embeddings,
        }


PRESETS = {
    "tiny": LlamaConfig(),
    "llama3-1b-like": LlamaConfig(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        tie_embeddings=True,
    ),
    "llama3-8b-like": LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
    ),
}


def config_from_preset(name: str, **overrides) -> LlamaConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """Rotary inverse frequencies, with Llama 3's smooth low/high-frequency rescaling."""
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim))
    if cfg.rope_scaling is None:
        return inv.float()
    factor, low, high, orig = cfg.rope_scaling
    wavelen = 2 * math.pi / inv
    low_wavelen, high_wavelen = orig / low, orig / high
    smooth = (orig / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    scaled = torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    return scaled.float()


class RMSNorm(nn.Module):
    """RMSNorm through flashquant.rms_norm: one fused kernel on CUDA; `residual` fuses the add before it."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x, residual=None, backend: str = "auto"):
        return fq.rms_norm(x, self.weight, self.eps, residual, backend=backend)


def layer_ops_backend(attn_backend: str) -> str:
    """The backend of the norms, rotary and gating: the plain-PyTorch model ("torch"/"reference" attention) keeps
    them in PyTorch ops, so that it stays the baseline a user would write; "triton" forces the fused Triton
    kernels (tests run them under the interpreter); otherwise "auto" (fused kernels on CUDA)."""
    return attn_backend if attn_backend in ("torch", "reference", "triton") else "auto"


class KVCache:
    """Per-layer K/V storage for generation: contiguous (layers, B, S_max, Hkv, D) or paged
    (layers, num_blocks, block_size, Hkv, D) with a block table (B, S_max / block_size). `seqlens` (int32, B)
    counts the tokens stored per sequence; a host copy avoids device syncs in the generation loop."""

    def __init__(
        self,
        cfg: LlamaConfig,
        batch: int,
        max_seqlen: int,
        dtype,
        device,
        paged: bool = False,
        block_size: int = 16,
        shuffle_blocks: bool = False,
    ):
        self.paged, self.block_size = paged, block_size
        shape_tail = (cfg.num_kv_heads, cfg.head_dim)
        if paged:
            per_seq = -(-max_seqlen // block_size)
            num_blocks = batch * per_seq
            self.k = torch.zeros(
                cfg.num_layers, num_blocks, block_size, *shape_tail, dtype=dtype, device=device
            )
            order = torch.randperm(num_blocks) if shuffle_blocks else torch.arange(num_blocks)
            self.block_table = order.reshape(batch, per_seq).to(torch.int32).to(device)
        else:
            self.k = torch.zeros(cfg.num_layers, batch, max_seqlen, *shape_tail, dtype=dtype, device=device)
            self.block_table = None
        self.v = torch.zeros_like(self.k)
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=device)
        self.host_seqlens = [0] * batch
        self.capacity = max_seqlen

    def advance(self, counts: list[int]) -> None:
        """Count new tokens. Updates `seqlens` in place, so a captured CUDA graph keeps reading the live lengths."""
        self.host_seqlens = [a + b for a, b in zip(self.host_seqlens, counts)]
        self.seqlens.copy_(torch.tensor(self.host_seqlens, dtype=torch.int32))

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(h, cfg.num_heads * d, bias=False)
        self.k_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=False)
        self.qkv_proj = None  # set by fuse(), which removes q/k/v_proj

    def fuse(self) -> None:
        """q_proj, k_proj and v_proj -> one qkv_proj (see flashquant.nn.fuse_linears)."""
        if self.qkv_proj is None:
            self.qkv_proj = fuse_linears([self.q_proj, self.k_proj, self.v_proj])
            del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x, positions, inv_freq, cache: KVCache | None, backend: str):
        B, S, _ = x.shape
        cfg = self.cfg
        if self.qkv_proj is not None:  # views into one output; the ops below read them in place
            sizes = [cfg.num_heads * cfg.head_dim] + 2 * [cfg.num_kv_heads * cfg.head_dim]
            q, k, v = self.qkv_proj(x).split(sizes, -1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, S, cfg.num_heads, cfg.head_dim)
        k = k.view(B, S, cfg.num_kv_heads, cfg.head_dim)
        v = v.view(B, S, cfg.num_kv_heads, cfg.head_dim)
        q, k = fq.rotary_embedding(q, k, positions, inv_freq, backend=layer_ops_backend(backend))
        if cache is None:
            out = fq.attention(q, k, v, causal=True, backend=backend)
        elif S > 1 and max(cache.host_seqlens) == 0:
            # prefill of a fresh cache: plain causal attention (right-padded prompts never see their padding),
            # then store K/V; padding slots are overwritten by the following decode steps.
            out = fq.attention(q, k, v, causal=True, backend=backend)
            ops = layer_ops_backend(backend)
            append_kv(
                cache.k[self.layer_idx],
                cache.v[self.layer_idx],
                cache.seqlens,
                k,
                v,
                cache.block_table,
                backend="torch" if ops == "reference" else ops,
            )
        else:  # decode / chunked prefill: append in place and attend to the cache
            out = fq.attention_with_kvcache(
                q,
                cache.k[self.layer_idx],
                cache.v[self.layer_idx],
                cache.seqlens,
                k,
                v,
                cache.block_table,
                causal=True,
                backend=backend,
            )
        return self.o_proj(out.reshape(B, S, -1))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gate_up_proj = None  # set by fuse(), which removes gate/up_proj

    def fuse(self) -> None:
        """gate_proj and up_proj -> one gate_up_proj (see flashquant.nn.fuse_linears)."""
        if self.gate_up_proj is None:
            self.gate_up_proj = fuse_linears([self.gate_proj, self.up_proj])
            del self.gate_proj, self.up_proj

    def forward(self, x, backend: str = "auto"):
        if self.gate_up_proj is not None:  # silu_mul reads the two halves in place
            gate, up = self.gate_up_proj(x).chunk(2, -1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(fq.silu_mul(gate, up, backend=layer_ops_backend(backend)))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, residual, positions, inv_freq, cache, backend):
        """The residual stream is carried as (x, residual), its value being x + residual (x alone when residual
        is None: the embeddings), so that each residual add happens inside the next norm's kernel. Returns
        (mlp_out, residual): the layer's output is their sum, formed by the next layer or the final norm."""
        ops = layer_ops_backend(backend)
        if residual is None:
            normed, residual = self.input_layernorm(x, backend=ops), x
        else:  # h = x + residual and its norm in one kernel
            normed, residual = self.input_layernorm(x, residual=residual, backend=ops)
        attn_out = self.self_attn(normed, positions, inv_freq, cache, backend)
        normed, residual = self.post_attention_layernorm(attn_out, residual=residual, backend=ops)
        return self.mlp(normed, backend), residual


class Llama(nn.Module):
    """Llama-3-style decoder. `attn_backend` is passed to flashquant's attention ops ("auto", "torch", ...)."""

    def __init__(self, cfg: LlamaConfig, attn_backend: str = "auto"):
        super().__init__()
        self.cfg, self.attn_backend = cfg, attn_backend
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    @classmethod
    def random(cls, cfg: LlamaConfig, seed: int = 0, dtype=torch.float32, device="cpu", attn_backend="auto"):
        """Seeded random weights, scaled like a trained model's (std 0.02, residual projections smaller), so
        activations stay O(1) through the layers."""
        with torch.device("meta"):
            model = cls(cfg, attn_backend)
        model = model.to_empty(device=device).to(dtype)
        model.tie_weights()  # to_empty gave lm_head and the embedding a tensor each
        g = torch.Generator(device=device).manual_seed(seed)  # same seed + device => same weights
        for name, p in model.named_parameters():
            with torch.no_grad():
                p.normal_(generator=g)  # in place, in the parameter's memory (fast for 8B-sized models)
                if name.endswith("layernorm.weight") or name == "norm.weight":
                    p.mul_(0.1).add_(1.0)
                elif name.endswith(("o_proj.weight", "down_proj.weight")):
                    p.mul_(0.02 / math.sqrt(2 * cfg.num_layers))
                else:
                    p.mul_(0.02)
        model.inv_freq = rope_inv_freq(cfg).to(device)
        return model

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        dtype: torch.dtype | None = None,
        device="cpu",
        attn_backend: str = "auto",
        backend: str = "auto",
    ) -> Llama:
        """A Hugging Face-format Llama checkpoint directory (config.json + *.safetensors, as saved by
        transformers), float or quantized by GPTQ / AWQ (``quantization_config`` in config.json; read by
        flashquant.checkpoints, no other library needed). Nothing is downloaded: pass a local directory.

        dtype: the float dtype of the model (default: as stored). backend: the QuantLinears' quant_matmul backend.
        The q/k/v and gate/up projections are separate, as stored; :meth:`fuse_projections` merges them (for an
        act-order GPTQ checkpoint only where they share their input permutation, as GPTQ gives them)."""
        from flashquant.checkpoints import (
            load_quantized_state_dict,
            read_quantization_config,
            read_safetensors,
        )

        with open(os.path.join(path, "config.json")) as f:
            hf = json.load(f)
        cfg = LlamaConfig.from_hf(hf)
        with torch.device("meta"):
            model = cls(cfg, attn_backend)
        state = {
            k.removeprefix("model."): v
            for k, v in read_safetensors(path).items()
            if not k.endswith("rotary_emb.inv_freq")  # (older transformers saved it; computed here)
        }
        model.inv_freq = rope_inv_freq(cfg)  # (a buffer outside the state_dict: built on meta above)
        qcfg = read_quantization_config(path)
        load_quantized_state_dict(model, state, qcfg, dtype=dtype, backend=backend)
        return model.to(device).eval()

    def save_pretrained(self, path: str, *, checkpoint_format: str = "gptq") -> None:
        """Write a Hugging Face-format checkpoint directory (config.json + model.safetensors) that
        :meth:`from_pretrained`, transformers and other GPTQ loaders read: float linears as they are, QuantLinears
        in GPTQ's layout (flashquant.checkpoints.to_gptq; `checkpoint_format` "gptq" or "gptq_v2") with a
        ``quantization_config``. Save before :meth:`fuse_projections` (checkpoints hold separate projections)."""
        from safetensors.torch import save_file

        from flashquant.checkpoints import gptq_state_dict
        from flashquant.nn import QuantLinear

        if any(
            layer.self_attn.qkv_proj is not None or layer.mlp.gate_up_proj is not None
            for layer in self.layers
        ):
            raise ValueError("save_pretrained needs the separate projections: save before fuse_projections()")
        config = self.cfg.to_hf()
        if any(isinstance(m, QuantLinear) for m in self.modules()):
            state, config["quantization_config"] = gptq_state_dict(self, checkpoint_format=checkpoint_format)
        else:
            state = {k: v.contiguous() for k, v in self.state_dict().items()}
        if self.cfg.tie_embeddings and isinstance(self.lm_head, nn.Linear):
            state.pop("lm_head.weight", None)
        config["torch_dtype"] = str(self.embed_tokens.weight.dtype).replace("torch.", "")
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        prefixed = {k if k.startswith("lm_head.") else f"model.{k}": v.cpu() for k, v in state.items()}
        save_file(prefixed, os.path.join(path, "model.safetensors"))

    def tie_weights(self) -> None:
        """lm_head shares the embedding matrix when the config ties them (again, after a load that replaced it);
        not when the checkpoint quantized lm_head on its own (then it is a QuantLinear)."""
        if self.cfg.tie_embeddings and isinstance(self.lm_head, nn.Linear):
            self.lm_head.weight = self.embed_tokens.weight

    def quantize(
        self,
        bits: int,
        group_size: int = 128,
        symmetric: bool = True,
        skip=("lm_head",),
        **options,
    ) -> Llama:
        """Swap every linear (except `skip`) for a QuantLinear, in place. `options`: quantize_model's keyword
        options (method, calibration for method="gptq", quantize_weights, ...)."""
        quantize_model(self, bits, group_size, symmetric, skip=skip, **options)
        return self

    def quantize_lm_head(self, bits: int, group_size: int | None = None) -> Llama:
        """The output projection alone as a QuantLinear, in place (group_size default: 128 for int4, per channel
        for int8). Checkpoints keep it in float; when it is tied, the embedding keeps the float matrix."""
        from flashquant.nn import QuantLinear

        if not isinstance(self.lm_head, nn.Linear):
            raise ValueError(f"lm_head is a {type(self.lm_head).__name__} already, not a float nn.Linear")
        group_size = (128 if bits == 4 else -1) if group_size is None else group_size
        self.lm_head = QuantLinear.from_linear(self.lm_head, bits, group_size)
        return self

    def fuse_projections(self) -> Llama:
        """Merge each layer's q/k/v projections into one ``qkv_proj`` and gate/up into one ``gate_up_proj``, in
        place, float or quantized (before or after :meth:`quantize`: quantization is per output row, so either
        order stores the same weights). At decode this turns 5 of a layer's 7 matmul launches into 2, each
        over a longer weight. The outputs equal the unfused model's up to summation order; the state_dict
        keys change accordingly."""
        for layer in self.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()
        return self

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        logits_at: torch.Tensor | None = None,
    ):
        """tokens (B, S) int64 -> logits (B, S, vocab) fp32; positions default to 0..S-1 after the cached tokens.
        logits_at (B,) int64: only compute the logits of that position of each sequence -> (B, 1, vocab)
        (generation needs just the last one; the lm_head is the largest matmul of small models); (B, P): those P
        positions of each sequence -> (B, P, vocab)."""
        B, S = tokens.shape
        if positions is None:
            start = cache.seqlens.long()[:, None] if cache is not None else 0
            positions = start + torch.arange(S, device=tokens.device)[None, :]
            positions = positions.expand(B, S)
        x, residual = self.embed_tokens(tokens), None
        for layer in self.layers:
            x, residual = layer(x, residual, positions, self.inv_freq, cache, self.attn_backend)
        if logits_at is not None:
            rows, cols = torch.arange(B, device=x.device)[:, None], logits_at.reshape(B, -1)
            x = x[rows, cols]
            residual = residual[rows, cols] if residual is not None else None
        ops = layer_ops_backend(self.attn_backend)
        x = self.norm(x, backend=ops) if residual is None else self.norm(x, residual=residual, backend=ops)[0]
        return self.lm_head(x).float()

    @property
    def weight_bytes(self) -> int:
        seen, total = set(), 0
        for t in list(self.parameters()) + list(self.buffers()):
            if t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
        return total


class CUDAGraphDecoder:
    """One decode step (B tokens -> last-position logits) captured in a CUDA graph, so that at batch 1 the
    step is not bound by kernel-launch overhead. Reads the cache's `seqlens` in place: call
    ``cache.advance([1] * B)`` after each step as in eager mode. Needs ops that never sync the host (all
    flashquant CUDA/Triton paths qualify)."""

    def __init__(self, model: Llama, cache: KVCache):
        if not torch.cuda.is_available() or cache.k.device.type != "cuda":
            raise ValueError("CUDAGraphDecoder needs a model and cache on a CUDA device")
        self.tokens = torch.zeros(cache.seqlens.shape[0], 1, dtype=torch.long, device=cache.k.device)
        # Warm up on a side stream (Triton compilation, allocator). The warm-up writes K/V at the current
        # positions; the first real step overwrites the same slots.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):
                model(self.tokens, cache=cache)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.inference_mode():
            self.logits = model(self.tokens, cache=cache)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, 1) -> logits (B, 1, vocab) (a view of the graph's output buffer)."""
        self.tokens.copy_(tokens)
        self.graph.replay()
        return self.logits


class CPUDecoder:
    """One decode step (B tokens -> last-position logits) on the CPU, with flashquant's C++ ops called directly:
    the CPU counterpart of :class:`CUDAGraphDecoder`.

    ``model(tokens, cache=cache)`` runs, per layer and token, ~10 public ops (each checks its arguments and picks
    a backend in Python) inside ~9 module calls: at decode sizes that Python costs as much as a large part of the
    kernels' own time. Here the checks and the choices are made once, when the decoder is built, and a step is the
    kernels `auto` picks for CPU tensors, called with the same arguments, so the logits and the cache are the eager
    model's bit for bit (tests/test_llama.py). :func:`generate` uses it on CPUs.

    Build it after the model is final (quantized, fused, moved): it keeps the model's tensors as they are then.
    Forward hooks on the model's modules would be skipped, so models with hooks are refused. Call
    ``cache.advance([1] * B)`` after each step, as in eager mode.
    """

    def __init__(self, model: Llama, cache: KVCache):
        why = CPUDecoder.unsupported(model, cache)
        if why is not None:
            raise ValueError(f"CPUDecoder cannot run this model: {why}")
        from flashquant.attention import _scalars

        cfg = model.cfg
        self.cache, self.batch = cache, cache.seqlens.shape[0]
        self.heads = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
        self.eps, self.intermediate = float(cfg.rms_norm_eps), cfg.intermediate_size
        probe = torch.empty(0, cfg.head_dim)  # attention_with_kvcache's defaults, as the eager model calls it
        self.softmax_scale, self.window_left, self.window_right, self.softcap = _scalars(
            probe, None, (-1, -1), 0.0
        )
        self.inv_freq = model.inv_freq.float().contiguous()
        self.embedding = model.embed_tokens.weight
        dtype = self.embedding.dtype
        self.layers = []
        for i, layer in enumerate(model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            qkv = [attn.qkv_proj] if attn.qkv_proj is not None else [attn.q_proj, attn.k_proj, attn.v_proj]
            gate_up = [mlp.gate_up_proj] if mlp.gate_up_proj is not None else [mlp.gate_proj, mlp.up_proj]
            self.layers.append(
                (
                    layer.input_layernorm.weight.contiguous(),
                    tuple(_direct_linear(m, dtype) for m in qkv),
                    cache.k[i],
                    cache.v[i],
                    _direct_linear(attn.o_proj, dtype),
                    layer.post_attention_layernorm.weight.contiguous(),
                    tuple(_direct_linear(m, dtype) for m in gate_up),
                    _direct_linear(mlp.down_proj, dtype),
                )
            )
        self.norm_weight = model.norm.weight.contiguous()
        self.lm_head = _direct_linear(model.lm_head, dtype)

    @staticmethod
    def unsupported(model: Llama, cache: KVCache) -> str | None:
        """Why a CPUDecoder cannot run `model` with `cache` (None: it can)."""
        from flashquant import _dispatch
        from flashquant.nn import QuantLinear

        devices = {model.embed_tokens.weight.device.type, cache.k.device.type}
        if devices != {"cpu"}:
            return f"the model and the cache must be on the CPU, got {sorted(devices)}"
        if not _dispatch._available("cpu"):
            return f"the C++ CPU extension is unavailable ({_dispatch._availability()['cpu'].reason})"
        if model.attn_backend not in ("auto", "cpu"):
            return f"the model runs attn_backend={model.attn_backend!r}; the decoder runs the C++ kernels ('auto')"
        dtype = model.embed_tokens.weight.dtype
        if cache.k.dtype != dtype:
            return f"the cache holds {cache.k.dtype} but the model computes in {dtype}"
        for name, m in model.named_modules():
            if m._forward_hooks or m._forward_pre_hooks:
                return f"module {name or 'model'!r} has forward hooks, which the decoder would skip"
            if name.endswith("_proj") or name == "lm_head":
                if type(m) is not nn.Linear and not isinstance(m, QuantLinear):
                    return (
                        f"{name} is a {type(m).__name__}; the decoder runs nn.Linear and QuantLinear layers"
                    )
                if isinstance(m, QuantLinear) and m.backend not in ("auto", "cpu"):
                    return f"{name} runs backend={m.backend!r}; the decoder runs the C++ kernel ('auto')"
        return None

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, 1) int64 -> logits (B, 1, vocab) fp32, the next token of each sequence appended to the cache
        at its ``cache.seqlens`` position."""
        if (
            not isinstance(tokens, torch.Tensor)
            or tokens.shape != (self.batch, 1)
            or tokens.is_floating_point()
        ):
            got = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"tokens must be an integer tensor of shape (B={self.batch}, 1), got {got}")
        with torch.inference_mode():
            return self._step(tokens)

    def _step(self, tokens: torch.Tensor) -> torch.Tensor:
        ops, cache = torch.ops.flashquant, self.cache
        B, eps, inter = self.batch, self.eps, self.intermediate
        hq, hkv, d = self.heads
        positions = cache.seqlens.long()[:, None]
        seqlens_k = cache.seqlens + 1  # after the append (the cache's own count moves on in cache.advance)
        x = torch.nn.functional.embedding(tokens.view(B), self.embedding)
        residual = None
        for norm1, qkv, k_cache, v_cache, o_proj, norm2, gate_up, down_proj in self.layers:
            if residual is None:
                normed, residual = ops.rms_norm_rows(x, norm1, None, eps)[0], x
            else:
                normed, residual = ops.rms_norm_rows(x, norm1, residual, eps)
            if len(qkv) == 1:
                y = qkv[0](normed).view(B, 1, hq + 2 * hkv, d)
                q, k, v = y[:, :, :hq], y[:, :, hq : hq + hkv], y[:, :, hq + hkv :]
            else:
                q, k, v = (f(normed).view(B, 1, -1, d) for f in qkv)
            q, k = ops.rotary_qk(q, k, positions, self.inv_freq)
            ops.kvcache_append(k_cache, v_cache, cache.seqlens, k, v, cache.block_table)
            out, _ = ops.kvcache_attention(
                q, k_cache, v_cache, seqlens_k, cache.block_table, self.softmax_scale, True,
                self.window_left, self.window_right, self.softcap, 0,
            )  # fmt: skip
            normed, residual = ops.rms_norm_rows(o_proj(out.view(B, hq * d)), norm2, residual, eps)
            if len(gate_up) == 1:
                g = gate_up[0](normed)
                gate, up = g[:, :inter], g[:, inter:]
            else:
                gate, up = (f(normed) for f in gate_up)
            x = down_proj(ops.silu_mul_rows(gate, up))
        normed = ops.rms_norm_rows(x, self.norm_weight, residual, eps)[0]
        return self.lm_head(normed).float().view(B, 1, -1)


def _direct_linear(m: nn.Module, dtype: torch.dtype):
    """x (M, in_features) in `dtype` -> m(x) on CPU tensors, without the module call or quant_matmul's checks and
    dispatch: the C++ kernel (or dequantize + BLAS at prefill sizes) that backend "cpu" runs, same arguments."""
    from flashquant.nn import QuantLinear
    from flashquant.quant import quant_matmul_cpu

    if isinstance(m, QuantLinear):
        qdata, scales, zeros, bits = m.qdata, m.scales, m.zeros, m.bits
        group, perm = m.qweight.effective_group_size, m.input_perm
        bias = None if m.bias is None else m.bias.to(dtype)  # (QuantLinear.forward: bias.to(x.dtype))
        if perm is None:
            return lambda x: quant_matmul_cpu(x, qdata, scales, zeros, bits, group, bias=bias)
        return lambda x: quant_matmul_cpu(
            x.index_select(-1, perm), qdata, scales, zeros, bits, group, bias=bias
        )
    weight, bias = m.weight, m.bias
    return lambda x: torch.nn.functional.linear(x, weight, bias)


def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator) -> torch.Tensor:
    """logits (B, V) -> tokens (B,). temperature 0 = greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0 < top_p < 1:
        sorted_logits, idx = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(-1, idx, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


@torch.inference_mode()
def generate(
    model: Llama,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | None = None,
    paged: bool = False,
    block_size: int = 16,
    seed: int = 0,
    progress: bool = False,
    on_step=None,
) -> list[list[int]]:
    """Batched generation for prompts of different lengths. Returns the new tokens of each prompt (stopping
    at EOS, which is included, or after max_new_tokens). On CPUs the decode steps run through
    :class:`CPUDecoder` where it supports the model (the same kernels and tokens, less Python per step)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token lists")
    device = model.embed_tokens.weight.device
    dtype = model.embed_tokens.weight.dtype
    B, lens = len(prompts), [len(p) for p in prompts]
    S = max(lens)
    cache = KVCache(model.cfg, B, S + max_new_tokens, dtype, device, paged=paged, block_size=block_size)
    tokens = torch.zeros(B, S, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = torch.tensor(p, device=device)  # right padding
    gen = torch.Generator().manual_seed(seed)
    last = model(tokens, cache=cache, logits_at=torch.tensor(lens, device=device) - 1)[:, 0]
    cache.advance(lens)  # only the real tokens count; padding slots get overwritten
    # On CPUs the decode steps skip the per-op Python (same kernels, same logits); elsewhere the model runs eagerly.
    step_fn = CPUDecoder(model, cache) if CPUDecoder.unsupported(model, cache) is None else None
    out = [[] for _ in range(B)]
    done = [False] * B
    steps = range(max_new_tokens)
    if progress:
        try:
            from tqdm import tqdm

            steps = tqdm(steps, desc="decode", unit="tok", leave=False)
        except ImportError:
            pass
    for step in steps:
        nxt = sample(last, temperature, top_k, top_p, gen)
        host = nxt.tolist()
        for b in range(B):
            if not done[b]:
                out[b].append(host[b])
                done[b] = eos_token_id is not None and host[b] == eos_token_id
        if all(done) or step == max_new_tokens - 1:
            break
        logits = step_fn(nxt[:, None]) if step_fn is not None else model(nxt[:, None], cache=cache)
        cache.advance([1] * B)
        last = logits[:, -1]
        if on_step is not None:
            on_step()
    return out
