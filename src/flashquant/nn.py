"""``QuantLinear`` and ``quantize_model``: drop-in int4/int8 weight-only replacements for ``nn.Linear``;
``fuse_linears``: one linear (float or quantized) for several that read the same input."""

from __future__ import annotations

import fnmatch
import functools
import logging
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ._checks import FLOAT_DTYPES, check_tensor
from .quant import QuantizedWeight, check_quantize_method, quant_matmul_parts, quantize

__all__ = ["QuantLinear", "fuse_linears", "quantize_model"]
log = logging.getLogger("flashquant")


class QuantLinear(nn.Module):
    """``y = x @ dequant(W)^T + b`` with W stored as int4/int8 codes + group scales (see QuantizedWeight).

    Buffers (all in the state_dict): ``qdata`` uint8, ``scales``, ``zeros`` (asymmetric only), ``bias``, and
    ``input_perm`` (only in linears loaded from a GPTQ act-order checkpoint, see :meth:`from_quantized`).
    Build it with :meth:`from_linear` or :meth:`from_quantized`, or construct an empty one and ``load_state_dict``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        bits: int = 4,
        group_size: int = 128,
        symmetric: bool = True,
        dtype: torch.dtype = torch.float16,
        device=None,
        backend: str = "auto",
    ):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits!r}")
        gs = in_features if group_size == -1 else group_size
        if gs <= 0 or in_features % gs != 0:
            raise ValueError(f"group_size={group_size} must divide in_features={in_features} (or be -1)")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.backend = backend
        per_byte = 2 if bits == 4 else 1
        self.register_buffer(
            "qdata", torch.zeros(out_features, in_features // per_byte, dtype=torch.uint8, device=device)
        )
        self.register_buffer(
            "scales", torch.ones(out_features, in_features // gs, dtype=dtype, device=device)
        )
        zeros = (
            None
            if symmetric
            else torch.zeros(out_features, in_features // gs, dtype=torch.uint8, device=device)
        )
        self.register_buffer("zeros", zeros)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.register_buffer("input_perm", None)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        bits: int = 4,
        group_size: int = 128,
        symmetric: bool = True,
        backend: str = "auto",
        *,
        method: str = "minmax",
        hessian: torch.Tensor | None = None,
        act_order: bool = False,
    ) -> QuantLinear:
        """A QuantLinear holding `linear`'s weight quantized by :func:`flashquant.quantize` (bits, group_size,
        symmetric, method, hessian, act_order as there) and its bias, on the linear's device and dtype."""
        mod = cls.empty_like(linear, bits, group_size, symmetric, backend)
        qw = quantize(
            linear.weight.detach(),
            bits=bits,
            group_size=group_size,
            symmetric=symmetric,
            method=method,
            hessian=hessian,
            act_order=act_order,
        )
        mod.qdata.copy_(qw.qdata)
        mod.scales.copy_(qw.scales)
        if qw.zeros is not None:
            mod.zeros.copy_(qw.zeros)
        if linear.bias is not None:
            mod.bias.copy_(linear.bias.detach())
        return mod

    @classmethod
    def from_quantized(
        cls,
        qweight: QuantizedWeight,
        bias: torch.Tensor | None = None,
        input_perm: torch.Tensor | None = None,
        backend: str = "auto",
    ) -> QuantLinear:
        """A QuantLinear holding an already quantized weight (e.g. from :mod:`flashquant.checkpoints`), no copy.

        bias: (out_features,) float or None (stored in qweight.dtype). input_perm: None, or an int (in_features,)
        permutation when the stored columns are the weight's columns reordered, column j = original column
        ``input_perm[j]`` (GPTQ act-order checkpoints, whose groups are not contiguous in the original order): the
        forward then reads ``x[..., input_perm]``, one gather of the activations, and ``self.qweight`` is the
        reordered matrix."""
        if not isinstance(qweight, QuantizedWeight):
            raise TypeError(f"qweight must be a flashquant.QuantizedWeight, got {type(qweight).__name__}")
        out_features, in_features = qweight.shape
        mod = cls(
            in_features,
            out_features,
            False,
            qweight.bits,
            qweight.group_size,
            qweight.zeros is None,
            qweight.dtype,
            "meta",
            backend,
        )
        mod.qdata, mod.scales, mod.zeros = qweight.qdata, qweight.scales.to(qweight.dtype), qweight.zeros
        if bias is not None:
            check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES)
            if bias.shape[0] != out_features:
                raise ValueError(
                    f"bias must have shape (out_features={out_features},), got {tuple(bias.shape)}"
                )
            mod.bias = bias.to(device=qweight.device, dtype=qweight.dtype)
        if input_perm is not None:
            check_tensor("input_perm", input_perm, ndim=1, dtypes=(torch.int32, torch.int64))
            if input_perm.shape[0] != in_features or not torch.equal(
                input_perm.sort().values.cpu(), torch.arange(in_features, dtype=input_perm.dtype)
            ):
                raise ValueError(
                    f"input_perm must be a permutation of range(in_features={in_features}), got shape "
                    f"{tuple(input_perm.shape)}"
                )
            mod.input_perm = input_perm.to(device=qweight.device, dtype=torch.int64)
        return mod

    @classmethod
    def empty_like(
        cls,
        linear: nn.Linear,
        bits: int = 4,
        group_size: int = 128,
        symmetric: bool = True,
        backend: str = "auto",
    ) -> QuantLinear:
        """A QuantLinear with `linear`'s shape, bias, dtype and device and the given format, its codes zero and
        scales one: to be filled by ``load_state_dict``. Reads no weight values (meta-device linears work)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        return cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            bits,
            group_size,
            symmetric,
            w.dtype,
            w.device,
            backend,
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A saved act-order linear carries an input_perm that a linear built empty (quantize_model(...,
        # quantize_weights=False)) has no buffer for yet: make room so that load_state_dict fills it.
        perm = state_dict.get(prefix + "input_perm")
        if perm is not None and self.input_perm is None:
            self.input_perm = torch.empty(perm.shape, dtype=torch.int64, device=self.qdata.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype the weight was quantized from (dequantize()'s default): its scales', which follow ``.to()``."""
        return self.scales.dtype

    @property
    def qweight(self) -> QuantizedWeight:
        return QuantizedWeight(
            self.qdata,
            self.scales,
            self.zeros,
            self.bits,
            self.group_size,
            (self.out_features, self.in_features),
            self.weight_dtype,
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (out_features, in_features) weight in `dtype` (default: weight_dtype), its columns in the order of
        the input x (an ``input_perm`` undone): ``F.linear(x, self.dequantize(), self.bias)`` is the forward."""
        w = self.qweight.dequantize(dtype)
        if self.input_perm is None:
            return w
        return torch.empty_like(w).index_copy_(1, self.input_perm, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # No QuantizedWeight is built per call: this runs once per linear per token (see quant_matmul_parts).
        bias, input_perm = self.bias, self.input_perm
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        if input_perm is not None:
            x = x.index_select(-1, input_perm)
        return quant_matmul_parts(
            x,
            self.qdata,
            self.scales,
            self.zeros,
            self.bits,
            self.group_size,
            (self.out_features, self.in_features),
            bias,
            self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, symmetric={self.symmetric}, bias={self.bias is not None}"
            + (", input_perm" if self.input_perm is not None else "")
        )


def quantize_model(
    model: nn.Module,
    bits: int = 4,
    group_size: int = 128,
    symmetric: bool = True,
    skip=("lm_head",),
    backend: str = "auto",
    *,
    method: str = "minmax",
    calibration: Callable[[nn.Module], object] | None = None,
    hessian_budget_bytes: int = 2 << 30,
    quantize_weights: bool = True,
    act_order: bool = False,
) -> nn.Module:
    """Replace every ``nn.Linear`` in `model` (in place) by a :class:`QuantLinear`, except those whose
    qualified name matches a pattern in `skip` (fnmatch patterns, or plain names matched against the last
    component). Linears whose in_features the format cannot hold (group_size does not divide it, odd K for
    int4) are left in floating point and logged. `method` as in :func:`flashquant.quantize` ("mse": a clip search
    per group, better int4 accuracy for a slower quantization). Returns the model.

    method="gptq" needs `calibration`, a function that runs the model on representative inputs (e.g.
    ``lambda m: [m(ids) for ids in batches]``; it runs under ``torch.no_grad()``). While it runs, hooks sum X^T X
    of each linear's inputs (a K x K fp32 matrix per linear, on its device); each linear is then quantized by
    GPTQ with it. Linears are taken in module order, as many per calibration run as `hessian_budget_bytes`
    allows (at least one), and quantized before the next run: later linears are calibrated on the outputs of the
    quantized earlier ones, as GPTQ does layer by layer. Linears fed the very same input tensor (a layer's q/k/v,
    gate/up) share one matrix. A linear the calibration never reached is quantized with H = identity, i.e. as
    method="mse", and logged. act_order=True: GPTQ's columns by decreasing X^T X diagonal, as in
    :func:`flashquant.quantize`; more accurate on inputs whose channels differ in scale, as LLMs' do.

    quantize_weights=False installs the same QuantLinears empty (no quantization, the float weights are not read),
    to be filled by ``model.load_state_dict`` from a model quantized with the same arguments: a saved quantized
    checkpoint loads without quantizing again. The model may live on the meta device (then load with
    ``assign=True``)."""
    check_quantize_method(method)  # before any linear is skipped or replaced
    if method == "gptq" and quantize_weights and not callable(calibration):
        raise ValueError(
            "method='gptq' needs calibration=<function running the model on sample inputs>, got "
            f"{type(calibration).__name__}"
        )
    if method != "gptq" and (calibration is not None or act_order):
        what = "calibration" if calibration is not None else "act_order=True"
        raise ValueError(f"{what} is used by method='gptq' only, got method={method!r}")
    if isinstance(skip, str):
        skip = (skip,)
    targets = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if any(fnmatch.fnmatch(name, p) or leaf == p for p in skip):
            continue
        gs = mod.in_features if group_size == -1 else group_size
        if mod.in_features % gs or (bits == 4 and mod.in_features % 2):
            log.info(
                "quantize_model: keeping %s in floating point (in_features=%d, group_size=%d)",
                name,
                mod.in_features,
                group_size,
            )
            continue
        targets.append(name)
    args = (bits, group_size, symmetric, backend)
    if method == "gptq" and quantize_weights:
        runs = _calibration_passes(model, targets, hessian_budget_bytes)
        for run, names in enumerate(runs, 1):
            # minutes on a large model: say where it is (logging.getLogger("flashquant").setLevel(logging.INFO))
            log.info("quantize_model: calibration run %d/%d, %s .. %s", run, len(runs), names[0], names[-1])
            start = time.perf_counter()
            hessians = _input_hessians(model, names, calibration)
            log.info("quantize_model: %d X^T X collected in %.1f s", len(names), time.perf_counter() - start)
            start = time.perf_counter()
            for name in names:
                linear = model.get_submodule(name)
                _replace(
                    model,
                    name,
                    QuantLinear.from_linear(
                        linear, *args, method=method, hessian=hessians[name], act_order=act_order
                    ),
                )
            log.info(
                "quantize_model: %d linears quantized by GPTQ in %.1f s",
                len(names),
                time.perf_counter() - start,
            )
            del hessians  # before the next run allocates its own: the budget holds for one run's at a time
        return model
    for name in targets:
        linear = model.get_submodule(name)
        _replace(
            model,
            name,
            QuantLinear.from_linear(linear, *args, method=method)
            if quantize_weights
            else QuantLinear.empty_like(linear, *args),
        )
    return model


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, module)


def _calibration_passes(model: nn.Module, names: list[str], budget_bytes: int) -> list[list[str]]:
    """`names` in order, split into runs whose K x K fp32 matrices fit in budget_bytes (at least one per run)."""
    passes, size = [[]], 0
    for name in names:
        k = model.get_submodule(name).in_features
        if passes[-1] and size + 4 * k * k > budget_bytes:
            passes.append([])
            size = 0
        passes[-1].append(name)
        size += 4 * k * k
    return [p for p in passes if p]


# Calibration rows (tokens) per input channel below which quantize_model warns: on the tiny Llama with random
# tokens, 2 rows per input channel (256 tokens, K = 128 / 384) left GPTQ 1.3 dB below "mse" on held-out tokens,
# 5-64 rows per channel put it 0.75-1.1 dB above (ad-hoc, bench/NOTES.md "Session 21").
GPTQ_MIN_ROWS_PER_INPUT = 4


def _input_hessians(
    model: nn.Module, names: list[str], calibration, share_inputs: bool = True
) -> dict[str, torch.Tensor]:
    """X^T X (fp32, K x K) of what each named linear receives while calibration(model) runs; zeros if nothing.

    Linears fed the very same input tensor one after another (a layer's q/k/v, gate/up) would sum identical
    matrices: the first one sums it, the others share it (one matrix, one addmm per call instead of three). A
    linear shares only if on every call it received the tensor the same other linear had just summed, once per such
    call; any other pattern (a rare model) is detected at the end and that linear is calibrated again on its own."""
    hessians: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    summed_calls: dict[str, int] = {}
    # follower -> [owner, calls shared, the owner's call it last shared]; owner None: the pattern broke
    shared: dict[str, list] = {}
    last = [None]  # (input tensor, its version counter, the linear that summed it, that linear's call number)

    def add(name, module, inputs):
        x = inputs[0]
        prev = last[0]
        if share_inputs and prev is not None and x is prev[0] and x._version == prev[1] and name != prev[2]:
            state = shared.setdefault(name, [prev[2], 0, 0])
            if state[0] != prev[2] or state[2] == prev[3]:  # another owner, or the same call twice
                state[0] = None
            state[1], state[2] = state[1] + 1, prev[3]
            return
        summed_calls[name] = summed_calls.get(name, 0) + 1
        last[0] = (x, x._version, name, summed_calls[name])
        x = x.detach().reshape(-1, module.in_features).float()
        if name not in hessians:
            hessians[name] = torch.zeros(module.in_features, module.in_features, device=x.device)
            rows[name] = 0
        hessians[name].addmm_(x.t(), x)
        rows[name] += x.shape[0]

    handles = [model.get_submodule(n).register_forward_pre_hook(functools.partial(add, n)) for n in names]
    try:
        with torch.no_grad():
            calibration(model)
    finally:
        last[0] = None  # the activation it holds
        for h in handles:
            h.remove()
    again = []
    for n, (owner, calls, _) in shared.items():
        if owner is not None and n not in hessians and calls == summed_calls.get(owner):
            hessians[n], rows[n] = hessians[owner], rows[owner]
        else:
            again.append(n)
    if again:
        log.info(
            "quantize_model: %s did not always share an input; calibrating them again on their own", again
        )
        for n in again:
            hessians.pop(n, None)
            rows.pop(n, None)
        hessians.update(_input_hessians(model, again, calibration, share_inputs=False))  # warns for those
    for n, count in rows.items():
        k = model.get_submodule(n).in_features
        if count < GPTQ_MIN_ROWS_PER_INPUT * k:
            log.warning(
                "quantize_model: %s saw %d calibration rows for its %d inputs; with fewer than %d x that, GPTQ fits"
                " the calibration set and can do worse than method='mse' on other inputs: calibrate on more tokens",
                n,
                count,
                k,
                GPTQ_MIN_ROWS_PER_INPUT,
            )
    for n in names:
        if n not in hessians:
            log.warning("quantize_model: %s saw no calibration input; quantized as method='mse'", n)
            k = model.get_submodule(n).in_features
            hessians[n] = torch.zeros(k, k, device=model.get_submodule(n).weight.device)
    return hessians


def fuse_linears(linears: Sequence[nn.Module]) -> nn.Module:
    """One linear that computes several linears of the same input at once, their outputs concatenated:
    ``fuse_linears([a, b])(x) == torch.cat([a(x), b(x)], -1)`` (up to the matmul's summation order).

    For a decoder layer's q/k/v or gate/up projections: at decode every matmul is a memory-bound GEMV, so one
    launch over the stacked weight replaces several smaller ones (less launch overhead, longer streams).
    Split the output with ``y.split([a.out_features, b.out_features], -1)``.

    Args:
        linears: two or more ``nn.Linear`` (same in_features, dtype and device) or two or more
            :class:`QuantLinear` (also the same bits, group_size, symmetric, backend and input_perm).
            Quantization is per output row, so fusing quantized linears stores exactly what quantizing the fused
            float linear would. A bias is kept if any input has one (zeros for those without).
    Returns:
        a new module of the inputs' type with out_features = their sum; the weights are copied.
    """
    mods = list(linears)
    if len(mods) < 2:
        raise ValueError(f"linears must hold at least two modules to fuse, got {len(mods)}")
    kinds = {type(m) for m in mods}
    if kinds not in ({nn.Linear}, {QuantLinear}):
        raise TypeError(
            "linears must be all torch.nn.Linear or all flashquant.nn.QuantLinear, got "
            f"{[type(m).__name__ for m in mods]}"
        )
    quant = kinds == {QuantLinear}
    first = mods[0]
    attrs = ("in_features", "bits", "group_size", "symmetric", "weight_dtype", "backend") if quant else ()
    for name in attrs or ("in_features",):
        values = [getattr(m, name) for m in mods]
        if len(set(values)) != 1:
            raise ValueError(f"linears must share {name} to be fused, got {values}")
    if quant:
        perms = [m.input_perm for m in mods]
        same = all(p is None for p in perms) or (
            all(p is not None for p in perms) and all(torch.equal(p, perms[0]) for p in perms)
        )
        if not same:
            raise ValueError(
                "linears must share their input_perm to be fused (GPTQ act-order checkpoints give each linear "
                "its own column order; fusing needs one)"
            )
    ref_weight = first.qdata if quant else first.weight
    for m in mods:
        w = m.qdata if quant else m.weight
        if w.dtype != ref_weight.dtype or w.device != ref_weight.device:
            raise ValueError(
                f"linears must share their weights' dtype and device, got {w.dtype} on {w.device} and "
                f"{ref_weight.dtype} on {ref_weight.device}"
            )
    out_features = sum(m.out_features for m in mods)
    has_bias = any(m.bias is not None for m in mods)
    with torch.no_grad():
        if quant:
            fused = QuantLinear(
                first.in_features,
                out_features,
                has_bias,
                first.bits,
                first.group_size,
                first.symmetric,
                first.weight_dtype,
                first.qdata.device,
                first.backend,
            )
            fused.qdata.copy_(torch.cat([m.qdata for m in mods]))
            fused.scales.copy_(torch.cat([m.scales for m in mods]))
            if not first.symmetric:
                fused.zeros.copy_(torch.cat([m.zeros for m in mods]))
            if first.input_perm is not None:
                fused.input_perm = first.input_perm.clone()
        else:
            w = first.weight
            fused = nn.Linear(first.in_features, out_features, has_bias, device=w.device, dtype=w.dtype)
            fused.weight.copy_(torch.cat([m.weight for m in mods]))
        if has_bias:
            fused.bias.copy_(
                torch.cat(
                    [m.bias if m.bias is not None else fused.bias.new_zeros(m.out_features) for m in mods]
                )
            )
    return fused
