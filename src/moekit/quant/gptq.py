"""GPTQ over a group of experts at once, and round-to-nearest, on the same grids.

Every expert of the group has its own Hessian H = 2/n X^T X of the inputs routed to it; the
Hessians are stacked and factorised in one batched Cholesky, and the column-by-column GPTQ
update runs on all experts of the group together. An expert whose (damped) Hessian is not
positive definite, or that saw no calibration tokens, falls back to rounding and is counted.

Shape legend:
    G = experts in the group, R = rows (outputs), C = columns (inputs), n = tokens of an expert,
    P = column groups per row (1 without a group size)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .grids import IntGrid, TernaryGrid


@dataclass
class QuantizedGroup:
    """The codes and grid of a group of experts' matrices of one kind (e.g. gate_up)."""

    codes: torch.Tensor  # [G, R, C] uint8
    params: tuple[torch.Tensor, torch.Tensor]  # ternary: (lo, hi) [G, R, 1]; int: (scale, zero) [G, R, P]
    failed: torch.Tensor  # [G] bool: Cholesky failed, rounded instead
    no_tokens: torch.Tensor  # [G] bool: no calibration tokens, rounded instead

    def dequantize(self, grid: TernaryGrid | IntGrid) -> torch.Tensor:
        """Returns the float weights [G, R, C] the codes stand for."""
        from .grids import dequantize_int, dequantize_ternary
        if isinstance(grid, TernaryGrid):
            return dequantize_ternary(self.codes, *self.params)
        return dequantize_int(self.codes, *self.params)


def hessian(x: torch.Tensor) -> torch.Tensor:
    """Returns 2/n X^T X [C, C] (float32) of inputs x [n, C] (zeros when n = 0)."""
    x = x.float()
    if x.shape[0] == 0:
        return torch.zeros(x.shape[1], x.shape[1], device=x.device)
    return (2.0 / x.shape[0]) * (x.T @ x)


def _fit_all(grid: TernaryGrid | IntGrid, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns the grid params [G, R, P] fitted on w [G, R, C] (per group of columns if any)."""
    size = grid.group_size or w.shape[-1]
    parts = [grid.fit(w[..., c:c + size]) for c in range(0, w.shape[-1], size)]
    return torch.cat([p[0] for p in parts], dim=-1), torch.cat([p[1] for p in parts], dim=-1)


def _round_all(grid: TernaryGrid | IntGrid, w: torch.Tensor, params) -> torch.Tensor:
    size = grid.group_size or w.shape[-1]
    codes = [grid.round(w[..., c:c + size], tuple(p[..., j:j + 1] for p in params))[0]
             for j, c in enumerate(range(0, w.shape[-1], size))]
    return torch.cat(codes, dim=-1)


def rtn_quantize(w: torch.Tensor, grid: TernaryGrid | IntGrid) -> QuantizedGroup:
    """Returns w [G, R, C] rounded to the nearest point of its grid (the baseline)."""
    w = w.float()
    params = _fit_all(grid, w)
    none = torch.zeros(w.shape[0], dtype=torch.bool, device=w.device)
    return QuantizedGroup(_round_all(grid, w, params), params, none, none.clone())


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, grid: TernaryGrid | IntGrid, damp: float = 0.01,
                  block: int = 128) -> QuantizedGroup:
    """Returns GPTQ's codes for w [G, R, C] given Hessians h [G, C, C] (batched over G).

    damp adds damp * mean(diag H) to the diagonal of each expert's Hessian. Columns that saw only
    zeros keep their weights and are rounded. With a group size, each group's grid is fitted when
    GPTQ reaches it (on the weights as updated so far)."""
    w = w.float().clone()
    g, rows, cols = w.shape
    h = h.float().clone()
    diag = h.diagonal(dim1=1, dim2=2)  # [G, C] (a view)
    no_tokens = (diag == 0).all(dim=1)  # [G]
    diag[diag == 0] = 1.0
    mean_diag = diag.mean(dim=1)  # [G]
    eye = torch.eye(cols, device=w.device)
    h += (damp * mean_diag)[:, None, None] * eye
    failed = torch.zeros(g, dtype=torch.bool, device=w.device)
    chol, info = torch.linalg.cholesky_ex(h)
    failed |= info != 0
    hinv = torch.cholesky_inverse(torch.where(failed[:, None, None], eye, chol))
    upper, info = torch.linalg.cholesky_ex(hinv, upper=True)  # [G, C, C]
    failed |= info != 0
    rounded = failed | no_tokens
    upper = torch.where(rounded[:, None, None], eye, upper)  # identity: plain rounding
    size = grid.group_size or cols
    if grid.group_size:
        block = size * max(1, block // size) if size <= block else size  # no group straddles blocks
    params_per_group: list[tuple[torch.Tensor, torch.Tensor]] = []
    if not grid.group_size:
        params_per_group.append(grid.fit(w))
    codes = torch.empty(g, rows, cols, dtype=torch.uint8, device=w.device)
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        w1 = w[:, :, b0:b1].clone()  # [G, R, B]
        err1 = torch.zeros_like(w1)
        u1 = upper[:, b0:b1, b0:b1]  # [G, B, B]
        for i in range(b1 - b0):
            c = b0 + i
            if grid.group_size and c % size == 0:
                params_per_group.append(grid.fit(w1[:, :, i:i + size]))
            col = w1[:, :, i:i + 1]  # [G, R, 1]
            q, deq = grid.round(col, params_per_group[-1])
            codes[:, :, c] = q[:, :, 0]
            err = (col - deq) / u1[:, i, i][:, None, None]  # [G, R, 1]
            w1[:, :, i:] -= err * u1[:, i:i + 1, i:]  # [G, R, 1] * [G, 1, B-i]
            err1[:, :, i:i + 1] = err
        w[:, :, b1:] -= err1 @ upper[:, b0:b1, b1:]
    params = (torch.cat([p[0] for p in params_per_group], dim=-1),
              torch.cat([p[1] for p in params_per_group], dim=-1))
    return QuantizedGroup(codes, params, failed & ~no_tokens, no_tokens)
