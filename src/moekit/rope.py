"""Rotary position embedding: inverse frequencies (default, linear, YaRN) and cos/sin for positions.

Shapes: T = tokens, Dh = head dim.
"""

from __future__ import annotations

import math

import torch

from .config import RopeConfig
from .errors import MoekitError


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    """Returns (inv_freq [Dh/2] float32, attention scale applied to cos and sin)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / (rope.theta ** exponents)
    if rope.scaling == "default":
        return inv_freq, 1.0
    if rope.scaling == "linear":
        return inv_freq / rope.factor, 1.0
    if rope.scaling == "longrope":  # Phi-3.5: per-frequency divisors; its long factors are not used
        if len(rope.short_factor) != head_dim // 2:
            raise MoekitError(f"longrope short_factor has {len(rope.short_factor)} entries, the rotated "
                              f"head width {head_dim} needs {head_dim // 2}; fix rope_scaling in config.json")
        inv_freq = inv_freq / torch.tensor(rope.short_factor, dtype=torch.float32)
        scale = rope.attention_factor
        if scale is None:
            original = rope.original_max_position or 4096
            scale = math.sqrt(1 + math.log(rope.factor) / math.log(original)) if rope.factor > 1 else 1.0
        return inv_freq, float(scale)
    # YaRN (Peng et al. 2023): interpolate low-frequency dimensions, extrapolate high-frequency
    # ones, with a linear ramp between, and scale attention by ~0.1 ln(factor) + 1.
    original = rope.original_max_position or 4096

    def dim_for_rotations(rotations: float) -> float:
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = dim_for_rotations(rope.beta_fast), dim_for_rotations(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1.0 - ramp  # weight of the original frequency
    inv_freq = (inv_freq / rope.factor) * (1 - extrapolate) + inv_freq * extrapolate
    scale = rope.attention_factor
    if scale is None:
        if rope.mscale and rope.mscale_all_dim:
            scale = yarn_mscale(rope.factor, rope.mscale) / yarn_mscale(rope.factor, rope.mscale_all_dim)
        else:
            scale = yarn_mscale(rope.factor)
    return inv_freq, float(scale)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """Returns YaRN's attention temperature 0.1 * mscale * ln(factor) + 1 (1 when not extending)."""
    return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0


def cos_sin(inv_freq: torch.Tensor, scale: float, positions: torch.Tensor,
            dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (cos, sin) [T, Dh] for integer positions [T], computed in float32 then cast."""
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # [T, Dh/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, Dh]
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Returns x [B, H, T, Dh] rotated by (cos, sin) [T, Dh] (the rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
