"""GPTQ: quantization that uses calibration inputs (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization
for Generative Pre-trained Transformers").

Round-to-nearest quantizes each weight on its own. GPTQ quantizes the columns (input channels) of W one at a time
and after each one moves the error it made onto the columns not yet quantized, weighted by the inverse of
H = X^T X (X: the layer's calibration inputs), so that the layer's *output* error ||X (W - Q)^T|| stays small where
the inputs actually are: channels that move together compensate each other. The result is an ordinary
:class:`~flashquant.QuantizedWeight` (same format, same kernels): group scales and zero points are chosen when
the column loop reaches each group, from the error-updated weights, by the "mse" clip search.

act_order=True quantizes the columns by decreasing H diagonal instead (the input channels with the most energy
first, while the most columns are left to absorb their error). The packed format has no column permutation, so the
group grids are then fixed before the loop, from the weights as given ("static groups"), and each column is coded on
its own group's grid wherever the order puts it.
"""

from __future__ import annotations

import torch

from .quant import mse_clip_ratios
from .reference import quant as ref


def gptq_block_size(group_size: int, K: int) -> int:
    """Columns per lazy-update block. Every group must start at a block's start or lie inside one block, so that
    its scale is chosen from weights that have received every earlier column's update."""
    gs = K if group_size == -1 else group_size
    return 128 if gs == K or 128 % gs == 0 or gs % 128 == 0 else gs


def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    damp: float = 0.01,
    chunk_elements: int = 1 << 20,
    act_order: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """w (N, K) float, hessian (K, K) = X^T X of the calibration inputs (any positive multiple) ->
    (codes uint8 (N, K), scales (N, K // group_size) in w.dtype, zeros uint8 or None), as quantize_ref returns.

    damp: added to H's diagonal as a fraction of its mean, so that H is safely invertible. Input channels the
    calibration never excited (zero diagonal) get H = 1 there: they are quantized to nearest and pass no error on.
    With H = identity this is exactly quantize(method="mse") (nothing is passed on). chunk_elements: the clip search
    of a group's grid runs over this many weights at a time (a per-channel group is a whole N x K matrix).
    act_order: columns in order of decreasing H diagonal, on static group grids (module docstring); with H =
    identity also exactly the "mse" quantization."""
    N, K = w.shape
    gs = K if group_size == -1 else group_size
    H = hessian.to(device=w.device, dtype=torch.float32).clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    H.diagonal().add_(damp * float(H.diagonal().mean()))
    # The loop's column order: position p quantizes column order[p] of w (stable: ties keep w's order).
    order = torch.arange(K, device=w.device)
    if act_order:
        order = torch.argsort(H.diagonal(), descending=True, stable=True)
        H = H[order[:, None], order[None, :]]
    # The upper Cholesky factor of H^-1: row j holds how column j's error spreads over the columns after it
    # (scaled by its diagonal), which is all the column loop needs.
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    # Transposed (K, N): row p is the column quantized at loop position p, so each step reads and updates whole
    # contiguous rows (a column of a row-major W would be a strided gather of N values).
    Wt = (w.float()[:, order] if act_order else w.float()).t().contiguous()
    codes_t = torch.empty(K, N, dtype=torch.uint8, device=w.device)  # row k: the codes of w's column k
    # group g's grid as fp32 rows (the scales already rounded to w.dtype, so converting back at the end is exact)
    scales_t = torch.empty(K // gs, N, dtype=torch.float32, device=w.device)
    zeros_t = torch.empty(K // gs, N, dtype=torch.float32, device=w.device)

    def choose_grid(cols: torch.Tensor, g: int) -> None:
        rows = max(1, chunk_elements // cols.shape[1])  # in cache-sized row chunks, as quantize() does
        clip = torch.cat(
            [mse_clip_ratios(cols[r : r + rows].to(w.dtype), bits, -1, symmetric) for r in range(0, N, rows)]
        )
        scale, zero = ref.group_grid(cols[:, None, :], bits, symmetric, w.dtype, clip)
        scales_t[g], zeros_t[g] = scale[:, 0].float(), zero[:, 0]

    if act_order:  # static groups: every grid from w as given, before any update
        w32 = w.float()
        for g in range(K // gs):
            choose_grid(w32[:, g * gs : (g + 1) * gs], g)
    block = 128 if act_order else gptq_block_size(group_size, K)
    # Inside a block, the updates are lazy once more: a column's error goes at once only to the rest of its
    # sub-block (rank-1 updates of <= 16 rows), and to the block's later rows as one product per sub-block. Without
    # act_order a group must start at a sub-block's start, where all earlier columns' updates have arrived.
    sub = 16 if block % 16 == 0 and (act_order or gs >= block or gs % 16 == 0) else block
    order_list = order.tolist()
    for b0 in range(0, K, block):
        b1 = min(b0 + block, K)
        Wb, Ub = Wt[b0:b1], U[b0:b1, b0:b1]  # Wb: a view, updated in place
        err = torch.empty(b1 - b0, N, dtype=torch.float32, device=w.device)
        for s0 in range(0, b1 - b0, sub):
            s1 = min(s0 + sub, b1 - b0)
            for j in range(s0, s1):
                col = order_list[b0 + j]  # b0 + j without act_order
                g = col // gs
                if not act_order and col % gs == 0:
                    # a group starts: its grid from its columns as updated so far (in this block, or from b1 on)
                    choose_grid(torch.cat([Wb[j : j + gs], Wt[b1 : col + gs]]).t(), g)
                scale, zero = scales_t[g], zeros_t[g]
                code = ref.codes_on_grid(Wb[j, :, None], scale, zero, bits)[:, 0]
                codes_t[col] = code.to(torch.uint8)
                err[j] = (Wb[j] - (code - zero) * scale) / Ub[j, j]
                if j + 1 < s1:
                    Wb[j + 1 : s1].addr_(Ub[j, j + 1 : s1], err[j], alpha=-1)
            if s1 < b1 - b0:
                Wb[s1:] -= Ub[s0:s1, s1:].t() @ err[s0:s1]
        if b1 < K:
            Wt[b1:] -= U[b0:b1, b1:].t() @ err
    codes = codes_t.t().contiguous()
    scales = scales_t.t().to(w.dtype).contiguous()
    return codes, scales, None if symmetric else zeros_t.t().to(torch.uint8).contiguous()
