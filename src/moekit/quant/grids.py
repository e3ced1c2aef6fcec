"""Quantization grids: ternary {lo, 0, hi} per row, and affine 2/3/4-bit per row or per group of
columns, with the packing of their integer codes into int32 words.

Shape legend (batched over a group of experts):
    G = experts in the group, R = rows (output features), C = columns (input features),
    P = column groups per row (1 without a group size)

Ternary codes are the symbols of the sub-1-bit code: 0 = zero, 1 = lo (the row minimum,
<= 0), 2 = hi (the row maximum, >= 0). Affine codes q in [0, 2^bits - 1] stand for
scale * (q - zero).
"""

from __future__ import annotations

import torch

TERNARY = "ternary"
ZERO, LO, HI = 0, 1, 2


class TernaryGrid:
    """{lo, 0, hi} per row: lo = min(row), hi = max(row) (QMoE's ternary grid)."""

    bits_per_code = 2  # as packed in int32 words; the sub-1-bit code is what gets stored
    group_size = None

    def fit(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (lo, hi) [G, R, 1] for w [G, R, C]."""
        tiny = 1e-8
        lo = w.amin(dim=-1, keepdim=True).clamp(max=-tiny)
        hi = w.amax(dim=-1, keepdim=True).clamp(min=tiny)
        return _as_stored(lo), _as_stored(hi)

    def round(self, w: torch.Tensor, params: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (codes uint8, dequantised float) of w [G, R, c] on the fitted grid."""
        lo, hi = params
        codes = torch.where(w > hi / 2, HI, torch.where(w < lo / 2, LO, ZERO)).to(torch.uint8)
        return codes, dequantize_ternary(codes, lo, hi)


def dequantize_ternary(codes: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Returns the float weights of ternary codes [..., R, C] with lo, hi [..., R, 1]."""
    lo, hi = lo.float(), hi.float()
    return torch.where(codes == HI, hi, torch.where(codes == LO, lo, torch.zeros_like(hi)))


class IntGrid:
    """Affine `bits`-bit grid, min/max (including 0) per row or per group of `group_size` columns."""

    def __init__(self, bits: int, group_size: int | None = None):
        if bits not in (2, 3, 4, 8):
            raise ValueError(f"bits must be 2, 3, 4 or 8, got {bits}")
        self.bits, self.group_size = bits, group_size
        self.maxq = (1 << bits) - 1
        self.bits_per_code = bits

    def fit(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (scale, zero) [G, R, 1] for the columns w [G, R, c] of one group (or the row)."""
        xmin = w.amin(dim=-1, keepdim=True).clamp(max=0)
        xmax = w.amax(dim=-1, keepdim=True).clamp(min=0)
        scale = (xmax - xmin) / self.maxq
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.round(-xmin / scale)
        return _as_stored(scale), zero

    def round(self, w: torch.Tensor, params: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (codes uint8, dequantised float) of w [G, R, c] on the fitted grid."""
        scale, zero = params
        codes = torch.clamp(torch.round(w / scale) + zero, 0, self.maxq)
        return codes.to(torch.uint8), scale * (codes - zero)


def _as_stored(levels: torch.Tensor) -> torch.Tensor:
    """Returns levels rounded to float16 (how they are stored), so GPTQ rounds to the stored grid."""
    return levels.clamp(-65504, 65504).half().float()


def make_grid(bits: str | int, group_size: int | None = None) -> TernaryGrid | IntGrid:
    """Returns the grid for --bits (ternary, 2, 3, 4) and --group-size."""
    if str(bits) == TERNARY:
        if group_size:
            raise ValueError("the ternary grid is per row; drop --group-size")
        return TernaryGrid()
    return IntGrid(int(bits), group_size)


def dequantize_int(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Returns float weights [..., R, C] of affine codes [..., R, C] with scale, zero [..., R, P]."""
    groups = scale.shape[-1]
    cols = codes.shape[-1]
    size = -(-cols // groups)
    scale = scale.float().repeat_interleave(size, dim=-1)[..., :cols]
    zero = zero.float().repeat_interleave(size, dim=-1)[..., :cols]
    return scale * (codes.float() - zero)


# ---- packing -----------------------------------------------------------------------------------

def codes_per_word(bits: int) -> int:
    """Returns how many `bits`-bit codes one int32 word holds (3-bit: 10, wasting 2 bits)."""
    return 32 // bits


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Returns int32 words [..., ceil(C / k)] holding codes [..., C] (k = 32 // bits), code j of
    a word in bits j*bits .. (j+1)*bits - 1; the last word is padded with zeros."""
    k = codes_per_word(bits)
    cols = codes.shape[-1]
    padded = -(-cols // k) * k
    c = torch.nn.functional.pad(codes.to(torch.int64), (0, padded - cols))
    c = c.view(*codes.shape[:-1], padded // k, k)
    shifts = torch.arange(k, device=codes.device, dtype=torch.int64) * bits
    words = (c << shifts).sum(dim=-1)  # < 2^32, as int64
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def unpack_codes(words: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Returns the codes [..., cols] (uint8) packed in int32 words [..., W] (see pack_codes)."""
    k = codes_per_word(bits)
    shifts = torch.arange(k, device=words.device, dtype=torch.int64) * bits
    c = (words.to(torch.int64)[..., None] >> shifts) & ((1 << bits) - 1)
    return c.reshape(*words.shape[:-1], -1)[..., :cols].to(torch.uint8)
