"""Hugging Face transformers integration.

    import flashquant.integrations.transformers as fqt
    name = fqt.register()                            # adds attn_implementation="fq"
    model = AutoModelForCausalLM.from_pretrained(..., attn_implementation=name)
    fqt.quantize_transformers_model(model, bits=4)   # linears -> QuantLinear, lm_head kept
    fqt.fuse_transformers_model(model)               # RMSNorm, SwiGLU MLP -> flashquant's fused ops
    model = fqt.load_quantized_pretrained("path/to/Llama-GPTQ")  # a GPTQ / AWQ checkpoint, no optimum needed

The attention function receives transformers' (B, H, S, D) tensors and calls flashquant.attention with
bottom-right-aligned causal masking. The mask function registered with it is transformers' SDPA one: it
returns None when the mask is plain causal (the fused kernel applies it) and a boolean mask otherwise. On CPUs a
left-padded batch's mask (batched generation: each sequence's keys start after its padding, causal after that)
is recognised for decode-sized steps and runs the C++ KV-cache kernel with each sequence's keys starting past
its padding. Any other mask (custom patterns, prefill of a padded batch, GPUs) goes through PyTorch SDPA with the
mask (logged once) rather than being silently dropped.

Why "fq" and not "flashquant": transformers (5.x) treats every attn_implementation whose name contains "flash"
as a flash-attn kernel to import from its hub (`is_flash_attention_requested`), so a name with "flash" in it
fails at model set-up; "fq" avoids that.
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

import flashquant as fq
from flashquant import _dispatch
from flashquant.attention import cpu_kvcache_max_sq
from flashquant.checkpoints import load_quantized_state_dict, read_quantization_config, read_safetensors
from flashquant.nn import fuse_linears, quantize_model

log = logging.getLogger("flashquant")
NAME = "fq"


@functools.cache
def _log_masked_fallback():
    log.info("flashquant attention: explicit attention mask (padding or custom pattern) -> PyTorch SDPA path")


def _left_padding(mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor, causal: bool) -> torch.Tensor | None:
    """The padding lengths (B,) int32 when transformers' boolean mask (B, 1, Sq, Sk), True = attend, is exactly that
    of a left-padded batch (sequence b's keys from pad[b] on, bottom-right causal if `causal`) and the C++ kernel
    takes the call (CPU tensors without grad, a decode-sized Sq); else None (the caller runs SDPA with the mask)."""
    sq, sk = q.shape[1], k.shape[1]
    if (
        q.device.type != "cpu"
        or mask.dtype != torch.bool
        or mask.shape != (q.shape[0], 1, sq, sk)
        or sq > cpu_kvcache_max_sq(q.dtype, q.shape[-1])
        or _dispatch.needs_grad(q, k)
        or not _dispatch._available("cpu")
    ):
        return None
    pad = sk - mask[:, 0, -1].sum(-1)  # the last query row sees every key past the padding
    keys = torch.arange(sk)
    want = (keys >= pad[:, None, None]).expand(-1, sq, -1)
    if causal:
        want = want & (keys <= torch.arange(sk - sq, sk)[:, None])
    return pad.to(torch.int32) if torch.equal(mask[:, 0], want) else None


def flashquant_attention_forward(
    module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None, **kwargs
):
    """transformers attention interface: query (B, Hq, Sq, D), key/value (B, Hkv, Sk, D) -> ((B, Sq, Hq, D), None)."""
    if dropout:
        raise ValueError("flashquant attention is inference-only: dropout must be 0")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    window = getattr(module, "sliding_window", None)
    softcap = float(getattr(module, "attn_logit_softcapping", None) or 0.0)
    if attention_mask is not None and not window:
        q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        pad = _left_padding(attention_mask, q, k, bool(causal))
        if pad is not None:  # the KV-cache kernel over each sequence's keys past its padding
            scale = scaling if scaling is not None else q.shape[-1] ** -0.5
            out, _ = torch.ops.flashquant.kvcache_attention(
                q, k, v, k.shape[1] - pad, None, scale, bool(causal), -1, -1, softcap, 0, pad
            )
            return out, None
    if attention_mask is not None:
        _log_masked_fallback()
        out = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attention_mask,
            scale=scaling,
            enable_gqa=query.shape[1] != key.shape[1],
        )
        return out.transpose(1, 2).contiguous(), None
    out = fq.attention(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        causal=bool(causal),
        softmax_scale=scaling,
        window_size=(window - 1, 0) if window else (-1, -1),
        softcap=softcap,
    )
    return out, None


def register() -> str:
    """Register attn_implementation="fq" (attention + matching mask function) with transformers; returns the
    name to pass as attn_implementation."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, flashquant_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


def quantize_transformers_model(
    model, bits: int = 4, group_size: int = 128, symmetric: bool = True, skip=("lm_head",), **options
):
    """Swap a loaded transformers model's nn.Linear layers for QuantLinear (lm_head kept by default). `options`:
    flashquant.nn.quantize_model's keyword options (method, calibration for method="gptq", quantize_weights=False
    to prepare a model for a saved quantized state_dict, ...)."""
    return quantize_model(model, bits=bits, group_size=group_size, symmetric=symmetric, skip=skip, **options)


# RMSNorm classes that compute Llama's form, weight * (x * rsqrt(mean(x^2) + eps)): Mistral's and Qwen2's are
# copies of Llama's. (Gemma's scales by 1 + weight, so it is not listed.)
_LLAMA_FORM_RMSNORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")


class FusedRMSNorm(nn.Module):
    """A transformers Llama-style RMSNorm as one flashquant.rms_norm kernel (fp32 inside, one rounding)."""

    def __init__(self, weight: nn.Parameter, eps: float, backend: str = "auto"):
        super().__init__()
        self.weight, self.variance_epsilon, self.backend = weight, eps, backend

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return fq.rms_norm(hidden_states, self.weight, self.variance_epsilon, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, backend={self.backend!r}"


class FusedSwiGLUMLP(nn.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))`` as one GEMM/GEMV over the stacked gate and up weights
    (float or QuantLinear) and one flashquant.silu_mul, which reads the two halves of its output in place."""

    def __init__(self, gate_up_proj: nn.Module, down_proj: nn.Module, backend: str = "auto"):
        super().__init__()
        self.gate_up_proj, self.down_proj, self.backend = gate_up_proj, down_proj, backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, -1)
        return self.down_proj(fq.silu_mul(gate, up, backend=self.backend))


def _is_silu(act) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ in ("SiLUActivation", "SiLU")


def fuse_transformers_model(model: nn.Module, backend: str = "auto") -> dict[str, int]:
    """Swap, in place, a transformers model's Llama-form RMSNorms for :class:`FusedRMSNorm` and its SwiGLU MLPs
    (gate_proj/up_proj/down_proj with a SiLU act_fn, float or already quantized) for :class:`FusedSwiGLUMLP`:
    on CUDA each norm becomes one kernel instead of ~8 and each MLP one GEMV and one gating kernel fewer.
    The attention block and the residual adds stay transformers' own. For inference: the fused MLPs' state_dict
    keys differ from the checkpoint's, so save the model before fusing, not after.

    backend: passed to flashquant.rms_norm / silu_mul ("auto": Triton on CUDA, PyTorch ops on the CPU).
    Returns {"rms_norm": n, "mlp": m}, the numbers of modules swapped."""
    swapped = {"rms_norm": 0, "mlp": 0}
    for name, mod in list(model.named_modules()):
        parent_name, _, leaf = name.rpartition(".")
        if not leaf:
            continue
        parent = model.get_submodule(parent_name) if parent_name else model
        if type(mod).__name__ in _LLAMA_FORM_RMSNORMS:
            setattr(parent, leaf, FusedRMSNorm(mod.weight, float(mod.variance_epsilon), backend))
            swapped["rms_norm"] += 1
        elif all(hasattr(mod, a) for a in ("gate_proj", "up_proj", "down_proj")) and _is_silu(
            getattr(mod, "act_fn", None)
        ):
            gate_up = fuse_linears([mod.gate_proj, mod.up_proj])
            setattr(parent, leaf, FusedSwiGLUMLP(gate_up, mod.down_proj, backend))
            swapped["mlp"] += 1
    log.info("fuse_transformers_model: %s", swapped)
    return swapped


@contextlib.contextmanager
def _parameters_on_meta():
    """Modules built inside get their parameters on the meta device (no memory, no random init) and their buffers
    where they would be: buffers that are not in a checkpoint (rotary inv_freq) are still computed."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def load_quantized_pretrained(
    path: str,
    *,
    dtype: torch.dtype | None = None,
    device="cpu",
    backend: str = "auto",
    attn_implementation: str | None = None,
    model_class=None,
):
    """A GPTQ or AWQ checkpoint directory (config.json with a ``quantization_config``, *.safetensors) as a
    transformers model whose quantized linears are flashquant QuantLinears: no optimum / gptqmodel / autoawq, no
    GPU needed (the CPU kernels run it). The checkpoint's codes are used as they are (see flashquant.checkpoints).

    Args:
        path: a local directory (download it first, e.g. ``huggingface_hub.snapshot_download``).
        dtype: the model's float dtype (norms, embeddings, scales; default: the checkpoint's, usually fp16).
        device: where the model goes after loading.
        backend: the QuantLinears' quant_matmul backend.
        attn_implementation: passed to the model config ("fq" after :func:`register`; default transformers').
        model_class: the transformers class to build (default ``AutoModelForCausalLM``).
    Returns:
        the model, in eval mode.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    qcfg = read_quantization_config(path)
    if qcfg is None:
        raise ValueError(
            f"{path} has no quantization_config in config.json, nor a quantize_config.json / quant_config.json: "
            "it is not a GPTQ / AWQ checkpoint"
        )
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # transformers would otherwise look for the tool that wrote it
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    model_class = model_class or AutoModelForCausalLM
    with _parameters_on_meta():
        model = model_class.from_config(
            config, dtype=dtype or getattr(config, "dtype", None) or torch.float16
        )
    load_quantized_state_dict(model, read_safetensors(path), qcfg, dtype=dtype, backend=backend)
    return model.to(device).eval()
