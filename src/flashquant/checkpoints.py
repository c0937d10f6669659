"""GPTQ and AWQ checkpoints on flashquant's kernels, without the tools that made them.

Models quantized by AutoGPTQ / GPTQModel / optimum ("gptq") or AutoAWQ ("awq", GEMM layout) are saved as packed
int32 tensors per linear. This module turns them into :class:`~flashquant.QuantizedWeight` (and
:class:`~flashquant.nn.QuantLinear`) once, at load time: the checkpoint's own codes, scales and zero points,
reordered into flashquant's layout, never re-quantized. The dequantized weights equal the tools' own
``scales * (code - zero)`` exactly (in fp32; rounded once to the scales' dtype as theirs are).

Formats, for a linear with K = in_features, N = out_features and G groups along K (group_size = K / G):

* GPTQ: ``qweight`` int32 (K * bits / 32, N), packed along K: word r of column n holds the codes of
  k = r * (32 / bits) + j in bits [bits * j, bits * (j + 1)). ``qzeros`` int32 (G, N * bits / 32), packed along N
  the same way; the "gptq" format (v1, the common one) stores zero - 1, "gptq_v2" the zero itself. ``scales``
  (G, N) fp16. ``g_idx`` int32 (K,), the group of each input channel: k // group_size, except in act-order
  ("desc_act") checkpoints, whose groups are spread over K. Weight: ``w[n, k] = scales[g, n] * (code - zero[g, n])``
  with g = g_idx[k]. flashquant's groups are contiguous, so an act-order checkpoint is stored with its columns
  sorted by group and an ``input_perm`` that the QuantLinear applies to its input (one gather per call).
* AWQ (GEMM): ``qweight`` int32 (K, N / 8), packed along N: word c of row k holds column 8c + AWQ_ORDER[j] in bits
  [4j, 4j + 4). ``qzeros`` int32 (G, N / 8), the same packing (zeros stored as they are). ``scales`` (G, N) fp16.

Entry points: :func:`from_gptq` and :func:`from_awq` for one linear's tensors, :func:`load_quantized_state_dict` for
a whole model (``flashquant.integrations.transformers.load_quantized_pretrained`` and
``flashquant.models.llama.Llama.from_pretrained`` read a checkpoint directory). The other way, :func:`to_gptq` and
:func:`gptq_state_dict` write GPTQ's layout (``Llama.save_pretrained`` a directory).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping

import torch
from torch import nn

from ._checks import FLOAT_DTYPES, check_tensor
from .nn import QuantLinear
from .quant import QuantizedWeight, pack, unpack

__all__ = [
    "AWQ_ORDER",
    "from_awq",
    "from_gptq",
    "load_quantized_state_dict",
    "gptq_state_dict",
    "read_quantization_config",
    "read_safetensors",
    "to_gptq",
]
log = logging.getLogger("flashquant")

# AWQ's GEMM layout interleaves the eight columns of a word: nibble j holds column AWQ_ORDER[j] of its 8.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
GPTQ_FORMATS = ("gptq", "gptq_v2")


def _require_little_endian() -> None:
    # the int32 <-> byte views below read the words' bytes in memory order
    if sys.byteorder != "little":
        raise RuntimeError("reading or writing packed int32 checkpoints needs a little-endian machine")


def _word_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 words (R, C) -> uint8 codes (R, C * 32 / bits), word c's codes at c * 32 / bits + j, j counting from
    the lowest bits. On a little-endian machine byte b of a word holds codes 2b and 2b + 1 (int4: low nibble
    first) or code b (int8), so viewing the words as bytes is the unpacking: no shifts, no int32 temporaries."""
    _require_little_endian()
    as_bytes = packed.contiguous().view(torch.uint8)
    if bits == 8:
        return as_bytes
    return torch.stack((as_bytes & 0xF, as_bytes >> 4), dim=-1).reshape(packed.shape[0], -1)


def _check_packed(name: str, t, shape: tuple[int, int], what: str) -> None:
    check_tensor(name, t, ndim=2, dtypes=(torch.int32,))
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {what} = {shape}, got {tuple(t.shape)}")


def _zeros_and_symmetry(zeros: torch.Tensor, bits: int, symmetric: bool | None) -> torch.Tensor | None:
    """(N, G) zero points -> None when the grid is flashquant's symmetric one (every zero 2^(bits-1))."""
    mid = bool((zeros == (1 << (bits - 1))).all())
    if symmetric is None:
        symmetric = mid
    if symmetric and not mid:
        raise ValueError(
            f"symmetric=True needs every zero point to be {1 << (bits - 1)} (int{bits}'s middle), but this "
            "checkpoint's vary; load it with symmetric=False or None"
        )
    return None if symmetric else zeros.contiguous()


def _scales(scales: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """(G, N) checkpoint scales -> flashquant's (N, G) in `dtype` (default: the checkpoint's)."""
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be one of float16, bfloat16, float32 or None, got {dtype}")
    return scales.t().to(dtype or scales.dtype).contiguous()


def from_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None = None,
    *,
    bits: int,
    checkpoint_format: str = "gptq",
    symmetric: bool | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[QuantizedWeight, torch.Tensor | None]:
    """One GPTQ linear's tensors (layout in the module docstring) -> ``(QuantizedWeight, input_perm)``.

    Args:
        qweight: int32 (K * bits / 32, N). qzeros: int32 (G, N * bits / 32). scales: (G, N) float.
        g_idx: int (K,) or None (= k // group_size).
        bits: 4 or 8 (flashquant stores no 2- or 3-bit weights).
        checkpoint_format: "gptq" (v1: stored zeros are zero - 1; the default of AutoGPTQ and of the checkpoints
            on the Hub) or "gptq_v2" (GPTQModel's internal format, zeros as they are).
        symmetric: None to store the weight as flashquant's symmetric format when every zero point is 2^(bits-1)
            (GPTQ's ``sym=True``), asymmetric otherwise; True / False to require one.
        dtype: the scales' dtype in flashquant (default: the checkpoint's, fp16). It is also the QuantizedWeight's
            dtype, i.e. what ``dequantize()`` returns.
    Returns:
        the weight as a QuantizedWeight (N, K) (group_size -1 when G == 1), and None, or for act-order
        checkpoints an int64 (K,) permutation: column j of the QuantizedWeight is column ``input_perm[j]`` of the
        original weight, so ``x @ W.T == x[..., input_perm] @ qweight.dequantize().T`` (QuantLinear applies it).
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8 (flashquant stores int4 and int8 weights), got {bits!r}")
    if checkpoint_format not in GPTQ_FORMATS:
        raise ValueError(
            f"checkpoint_format must be one of {GPTQ_FORMATS}, got {checkpoint_format!r} (Marlin- or "
            "BitBLAS-repacked checkpoints are not read: load the original GPTQ one)"
        )
    per_word = 32 // bits
    check_tensor("scales", scales, ndim=2, dtypes=FLOAT_DTYPES)
    G, N = scales.shape
    check_tensor("qweight", qweight, ndim=2, dtypes=(torch.int32,))
    K = qweight.shape[0] * per_word
    _check_packed("qweight", qweight, (K // per_word, N), "(K * bits / 32, N)")
    if N % per_word:
        raise ValueError(f"N = scales.shape[1] = {N} must be a multiple of {per_word} for int{bits} qzeros")
    _check_packed("qzeros", qzeros, (G, N // per_word), "(G, N * bits / 32)")
    if G == 0 or K % G:
        raise ValueError(
            f"the number of groups G = scales.shape[0] = {G} must divide K = {K} (flashquant's groups are all "
            "the same size)"
        )
    group_size = K // G
    perm = None
    if g_idx is not None:
        check_tensor("g_idx", g_idx, ndim=1, dtypes=(torch.int32, torch.int64))
        if g_idx.shape[0] != K:
            raise ValueError(f"g_idx must have shape (K,) = ({K},), got {tuple(g_idx.shape)}")
        g_idx = g_idx.to(torch.int64)
        if bool(((g_idx < 0) | (g_idx >= G)).any()):
            raise ValueError(f"g_idx must hold group indices in [0, {G}), got values outside it")
        contiguous = torch.arange(K, device=g_idx.device) // group_size
        if not torch.equal(g_idx, contiguous):
            counts = torch.bincount(g_idx, minlength=G)
            if bool((counts != group_size).any()):
                raise ValueError(
                    f"g_idx must give every group {group_size} input channels (flashquant's groups have one size), "
                    f"got sizes from {int(counts.min())} to {int(counts.max())}"
                )
            # sorting by group makes the groups contiguous; a stable sort keeps each group's channels in order
            perm = torch.sort(g_idx, stable=True).indices
    # Column n of qweight, as words along K, is row n of flashquant's codes: the same bytes, since both put the lower
    # k in the lower bits (qdata's byte j holds k = 2j in its low nibble), so without a permutation this is qdata.
    qdata = _word_codes(qweight.t(), 8)  # (N, K * bits / 8)
    if perm is not None:
        qdata = pack(unpack(qdata, bits)[:, perm.to(qdata.device)].contiguous(), bits)
    zeros = _word_codes(qzeros, bits).t()  # (N, G)
    if checkpoint_format == "gptq":
        zeros = zeros.to(torch.int16) + 1
        if bool((zeros >= (1 << bits)).any()):
            # A v1 packer stores zero - 1: a zero point of 0 became -1, which fills the whole int32 word with
            # ones and so also destroys the 32 / bits - 1 zeros packed next to it.
            raise ValueError(
                f"qzeros hold {(1 << bits) - 1} (a zero point of {1 << bits} after the 'gptq' format's + 1), "
                f"which no int{bits} grid has: the checkpoint was packed with a zero point of 0, which the v1 "
                "format cannot store. If it is a 'gptq_v2' checkpoint, pass checkpoint_format='gptq_v2'"
            )
        zeros = zeros.to(torch.uint8)
    zeros = _zeros_and_symmetry(zeros, bits, symmetric)
    qw = QuantizedWeight(
        qdata,
        _scales(scales, dtype),
        zeros,
        bits,
        -1 if G == 1 else group_size,
        (N, K),
        dtype or scales.dtype,
    )
    return qw, perm


def from_awq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    *,
    bits: int = 4,
    symmetric: bool | None = None,
    dtype: torch.dtype | None = None,
) -> QuantizedWeight:
    """One AWQ (GEMM layout) linear's tensors -> QuantizedWeight (N, K), no re-quantization.

    Args:
        qweight: int32 (K, N / 8). qzeros: int32 (G, N / 8). scales: (G, N) float. bits: 4 (AWQ's only width).
        symmetric, dtype: as in :func:`from_gptq` (AWQ checkpoints are asymmetric: their zero points vary).
    """
    if bits != 4:
        raise ValueError(f"AWQ checkpoints are int4: bits must be 4, got {bits!r}")
    check_tensor("scales", scales, ndim=2, dtypes=FLOAT_DTYPES)
    G, N = scales.shape
    if N % 8:
        raise ValueError(
            f"N = scales.shape[1] = {N} must be a multiple of 8 (eight int4 codes per int32 word)"
        )
    check_tensor("qweight", qweight, ndim=2, dtypes=(torch.int32,))
    K = qweight.shape[0]
    _check_packed("qweight", qweight, (K, N // 8), "(K, N / 8)")
    _check_packed("qzeros", qzeros, (G, N // 8), "(G, N / 8)")
    if G == 0 or K % G or K % 2:
        raise ValueError(
            f"the number of groups G = scales.shape[0] = {G} must divide K = {K}, and K must be even"
        )
    # column 8c + AWQ_ORDER[j] sits in nibble j of word c: nibble_of[i] is the nibble that holds column 8c + i
    nibble_of = torch.tensor(sorted(range(8), key=AWQ_ORDER.__getitem__), device=qweight.device)
    order = (torch.arange(N // 8, device=qweight.device).view(-1, 1) * 8 + nibble_of).view(-1)
    codes = _word_codes(qweight, 4)[:, order].t()  # (N, K)
    zeros = _word_codes(qzeros, 4)[:, order].t()  # (N, G)
    return QuantizedWeight(
        pack(codes.contiguous(), 4),
        _scales(scales, dtype),
        _zeros_and_symmetry(zeros, 4, symmetric),
        4,
        -1 if G == 1 else K // G,
        (N, K),
        dtype or scales.dtype,
    )


def _config_dict(quantization_config) -> dict:
    if hasattr(quantization_config, "to_dict"):
        quantization_config = quantization_config.to_dict()
    if not isinstance(quantization_config, Mapping):
        raise TypeError(
            "quantization_config must be a dict (the checkpoint's config.json 'quantization_config'), a "
            f"transformers quantization config or None, got {type(quantization_config).__name__}"
        )
    return dict(quantization_config)


def _text(value) -> str:
    """A config entry as lower-case text: transformers' configs hold str enums (QuantizationMethod.GPTQ), whose
    str() is their name, not their value."""
    return str(getattr(value, "value", value)).lower()


def _converter(cfg: dict, dtype: torch.dtype | None):
    """The checkpoint's quantization_config -> (tensor names per linear, function(tensors) -> (qweight, perm))."""
    method = _text(cfg.get("quant_method", ""))
    bits = cfg.get("bits", cfg.get("w_bit"))
    if method == "gptq":
        fmt = _text(cfg.get("checkpoint_format") or "gptq")
        if fmt not in GPTQ_FORMATS:
            raise ValueError(
                f"quantization_config checkpoint_format must be one of {GPTQ_FORMATS}, got {fmt!r}"
            )
        # sym=False checkpoints stay asymmetric even where a layer's zeros all sit mid-range (so that every linear
        # has one format and q/k/v can be fused); sym=True ones are stored symmetric when their zeros allow it
        symmetric = False if cfg.get("sym") is False else None

        def convert(t):
            return from_gptq(
                t["qweight"],
                t["qzeros"],
                t["scales"],
                t.get("g_idx"),
                bits=bits,
                checkpoint_format=fmt,
                symmetric=symmetric,
                dtype=dtype,
            )

        return ("qweight", "qzeros", "scales", "g_idx"), convert
    if method == "awq":
        version = _text(cfg.get("version") or "gemm")
        if version != "gemm":
            raise ValueError(
                f"AWQ checkpoints in the 'gemm' layout are read; this one is {version!r} (AutoAWQ's GEMV / "
                "exllama / Marlin layouts are not)"
            )

        def convert(t):
            return from_awq(t["qweight"], t["qzeros"], t["scales"], bits=bits, dtype=dtype), None

        return ("qweight", "qzeros", "scales"), convert
    raise ValueError(
        f"quantization_config quant_method must be 'gptq' or 'awq', got {cfg.get('quant_method')!r}"
    )


def load_quantized_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    quantization_config,
    *,
    dtype: torch.dtype | None = None,
    backend: str = "auto",
    strict: bool = True,
) -> dict[str, int]:
    """Load a GPTQ / AWQ state_dict into `model`, in place: every ``nn.Linear`` whose ``<name>.qweight`` is in
    `state_dict` becomes a :class:`~flashquant.nn.QuantLinear` holding the checkpoint's quantized weight; every
    other tensor (embeddings, norms, unquantized linears) is loaded as ``load_state_dict(assign=True)`` loads it.
    With quantization_config=None the state_dict is a float one, loaded with the same checks.

    The model may have its parameters on the meta device (nothing is read from them, only their shapes).

    Args:
        quantization_config: the checkpoint's ``quantization_config`` (a dict as in its config.json, or a
            transformers GPTQConfig / AwqConfig): ``quant_method`` "gptq" (``bits`` 4 or 8, ``checkpoint_format``
            "gptq" or "gptq_v2", ``sym``) or "awq" (``version`` "gemm").
        dtype: float dtype for the scales, biases and the other floating tensors (default: as stored).
        backend: the QuantLinears' quant_matmul backend.
        strict: raise if `model` has parameters or buffers the state_dict does not fill (tied weights excepted,
            after ``model.tie_weights()`` where the model has it) or the state_dict has keys the model lacks.
    Returns:
        {"quantized": linears replaced, "loaded": other tensors loaded}.
    """
    prefixes = sorted(k[: -len(".qweight")] for k in state_dict if k.endswith(".qweight"))
    if quantization_config is None:
        if prefixes:
            raise ValueError(
                f"state_dict holds quantized linears ({prefixes[0]}.qweight, ...) but quantization_config is None"
            )
        names, convert = (), None
    else:
        names, convert = _converter(_config_dict(quantization_config), dtype)
        if not prefixes:
            raise ValueError(
                "state_dict holds no '<linear>.qweight' tensor: it is not a GPTQ / AWQ checkpoint"
            )
    used, replacements = set(), []
    for prefix in prefixes:
        try:
            linear = model.get_submodule(prefix)
        except AttributeError:
            raise ValueError(
                f"state_dict has {prefix}.qweight but the model has no module {prefix!r}"
            ) from None
        if not isinstance(linear, nn.Linear):
            raise TypeError(
                f"{prefix} must be a torch.nn.Linear to take {prefix}.qweight, got {type(linear).__name__}"
            )
        tensors = {n: state_dict[f"{prefix}.{n}"] for n in names if f"{prefix}.{n}" in state_dict}
        missing = [n for n in names if n != "g_idx" and n not in tensors]
        if missing:
            raise ValueError(
                f"state_dict has {prefix}.qweight but not {', '.join(prefix + '.' + n for n in missing)}"
            )
        try:
            qw, perm = convert(tensors)
        except (ValueError, TypeError) as e:
            raise type(e)(f"{prefix}: {e}") from None
        if tuple(qw.shape) != (linear.out_features, linear.in_features):
            raise ValueError(
                f"{prefix}: the checkpoint's weight is (out, in) = {tuple(qw.shape)} but the model's linear is "
                f"{(linear.out_features, linear.in_features)}"
            )
        bias = state_dict.get(f"{prefix}.bias")
        if bias is not None and linear.bias is None and not bool(bias.any()):
            bias = None  # GPTQ-for-LLaMa-era packers saved a zero bias for every linear, bias or not
        if (bias is not None) != (linear.bias is not None):
            raise ValueError(
                f"{prefix}: the model's linear has bias={linear.bias is not None}, the checkpoint "
                f"{'has' if bias is not None else 'has no'} {prefix}.bias"
            )
        replacements.append((prefix, QuantLinear.from_quantized(qw, bias, perm, backend)))
        used.update(f"{prefix}.{n}" for n in (*names, "bias"))
    # only now that every linear converted: an error above leaves the model as it was
    for prefix, module in replacements:
        parent, _, leaf = prefix.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, module)
    rest = {k: v for k, v in state_dict.items() if k not in used}
    if dtype is not None:
        rest = {k: v.to(dtype) if v.is_floating_point() else v for k, v in rest.items()}
    result = model.load_state_dict(rest, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
        for _, module in replacements:
            # a config that ties the embeddings, with lm_head quantized on its own (GPTQModel's lm_head=True):
            # transformers' tie_weights hangs the embedding on the QuantLinear as a "weight" it never reads
            module._parameters.pop("weight", None)
    if strict:
        # missing: not in the state_dict and not tied to (the very tensor of) something that was
        tensors = model.state_dict(keep_vars=True)
        loaded = {id(tensors[k]) for k in rest if k in tensors}
        replaced = tuple(p + "." for p in prefixes)
        unfilled = [
            k
            for k in result.missing_keys
            if not k.startswith(replaced) and k in tensors and id(tensors[k]) not in loaded
        ]
        unfilled += [n for n, t in model.named_buffers() if t.is_meta and n not in unfilled]
        if unfilled or result.unexpected_keys:
            raise ValueError(
                f"the state_dict does not match the model: not loaded {unfilled[:8]}"
                f"{' ...' if len(unfilled) > 8 else ''}, unexpected {result.unexpected_keys[:8]}"
            )
    log.info("load_quantized_state_dict: %d quantized linears, %d other tensors", len(prefixes), len(rest))
    return {"quantized": len(prefixes), "loaded": len(rest)}


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint directory (on the CPU): its model.safetensors, the shards that
    model.safetensors.index.json names, or else its one *.safetensors file (older GPTQ repositories name it
    e.g. gptq_model-4bit-128g.safetensors)."""
    from safetensors.torch import load_file

    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
        return load_file(single)
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(load_file(os.path.join(path, shard)))
        return state
    others = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if len(others) == 1:
        return load_file(os.path.join(path, others[0]))
    raise FileNotFoundError(
        f"{path} has neither model.safetensors nor model.safetensors.index.json nor a single *.safetensors file "
        f"(found {others}; checkpoints in other files, e.g. *.bin, are not read: convert them to safetensors)"
    )


def read_quantization_config(path: str) -> dict | None:
    """A checkpoint directory's quantization settings: config.json's ``quantization_config``, else the files
    older tools wrote beside it (AutoGPTQ's quantize_config.json, AutoAWQ's quant_config.json), else None (a
    float checkpoint)."""
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    if config.get("quantization_config"):
        return dict(config["quantization_config"])
    for name, method in (("quantize_config.json", "gptq"), ("quant_config.json", "awq")):
        file = os.path.join(path, name)
        if os.path.isfile(file):
            with open(file) as f:
                return {"quant_method": method, **json.load(f)}
    return None


# ---- writing: flashquant's format -> GPTQ --------------------------------------------------------------------------
def _as_words(rows: torch.Tensor) -> torch.Tensor:
    """uint8 (R, 4C) -> the int32 (R, C) of the same little-endian bytes (whatever strides size-1 dims have)."""
    _require_little_endian()
    return rows.reshape(-1).view(torch.int32).view(rows.shape[0], -1)


def to_gptq(
    qweight: QuantizedWeight,
    input_perm: torch.Tensor | None = None,
    *,
    checkpoint_format: str = "gptq",
    scales_dtype: torch.dtype = torch.float16,
) -> dict[str, torch.Tensor]:
    """The inverse of :func:`from_gptq`: one linear's {"qweight", "qzeros", "scales", "g_idx"} in GPTQ's layout,
    for serving a model quantized here by other GPTQ loaders (transformers + gptqmodel, vLLM, ...).

    input_perm: a QuantLinear's input_perm (its columns go back to the input's order, groups spread by g_idx).
    checkpoint_format: "gptq" (v1: zeros stored minus one; what other loaders read by default) or "gptq_v2".
    scales_dtype: GPTQ checkpoints hold fp16 scales (bf16 ones convert exactly unless tiny; fp32 ones round).
    Raises ValueError where the format cannot hold the weight: a zero point of 0 in v1 (asymmetric grids can
    have one: use "gptq_v2" or symmetric quantization), N or K not a multiple of 32 / bits.
    """
    if not isinstance(qweight, QuantizedWeight):
        raise TypeError(f"qweight must be a flashquant.QuantizedWeight, got {type(qweight).__name__}")
    if checkpoint_format not in GPTQ_FORMATS:
        raise ValueError(f"checkpoint_format must be one of {GPTQ_FORMATS}, got {checkpoint_format!r}")
    bits, (N, K) = qweight.bits, qweight.shape
    per_word = 32 // bits
    if N % per_word or K % per_word:
        raise ValueError(
            f"GPTQ packs {per_word} int{bits} codes per int32 word along K and (zeros) along N: both must be "
            f"multiples of {per_word}, got (N, K) = {(N, K)}"
        )
    G = qweight.scales.shape[1]
    gs = K // G
    qdata = qweight.qdata
    g_idx = torch.arange(K, dtype=torch.int32, device=qdata.device) // gs
    if input_perm is not None:
        perm = input_perm.to(device=qdata.device, dtype=torch.int64)
        codes = unpack(qdata, bits)
        qdata = pack(torch.empty_like(codes).index_copy_(1, perm, codes), bits)
        g_idx = torch.empty_like(g_idx).index_copy_(0, perm, g_idx)
    if qweight.zeros is None:
        zeros = torch.full((N, G), 1 << (bits - 1), dtype=torch.uint8, device=qdata.device)
    else:
        zeros = qweight.zeros
    if checkpoint_format == "gptq":
        if bool((zeros == 0).any()):
            raise ValueError(
                "a zero point of 0 cannot be stored in the 'gptq' (v1) format, which stores zero - 1: use "
                "checkpoint_format='gptq_v2', or quantize symmetrically"
            )
        zeros = zeros - 1
    # little-endian bytes of flashquant's rows are GPTQ's words along K (see from_gptq), and packing the zeros'
    # transpose the same way gives GPTQ's words along N
    return {
        "qweight": _as_words(qdata).t().contiguous(),
        "qzeros": _as_words(pack(zeros.t().contiguous(), bits)),
        "scales": qweight.scales.t().to(scales_dtype).contiguous(),
        "g_idx": g_idx,
    }


def gptq_state_dict(
    model: nn.Module, *, checkpoint_format: str = "gptq"
) -> tuple[dict[str, torch.Tensor], dict]:
    """A model's state_dict with every QuantLinear in GPTQ's layout (:func:`to_gptq`), and the
    ``quantization_config`` that describes it (for config.json). The QuantLinears must share bits, group size and
    symmetry (GPTQ's settings are per model); tensors that share memory (tied embeddings) are kept once."""
    quant = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not quant:
        raise ValueError("model has no QuantLinear to write in GPTQ's layout")
    settings = {(m.bits, m.group_size, m.symmetric) for m in quant.values()}
    if len(settings) != 1:
        raise ValueError(
            "GPTQ checkpoints have one bits / group_size / symmetric setting per model; this one has "
            f"{sorted(settings)}"
        )
    bits, group_size, symmetric = settings.pop()
    state, seen = {}, set()
    for key, tensor in model.state_dict().items():
        owner = key.rpartition(".")[0]
        if owner in quant:
            continue
        if tensor.data_ptr() in seen and tensor.numel():
            continue  # a tied copy: loaders tie it again
        seen.add(tensor.data_ptr())
        state[key] = tensor.contiguous()
    for name, m in quant.items():
        for key, tensor in to_gptq(m.qweight, m.input_perm, checkpoint_format=checkpoint_format).items():
            state[f"{name}.{key}"] = tensor
        if m.bias is not None:
            state[f"{name}.bias"] = m.bias.to(torch.float16)
    config = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "sym": symmetric,
        "desc_act": any(m.input_perm is not None for m in quant.values()),
        "checkpoint_format": checkpoint_format,
    }
    return state, config
