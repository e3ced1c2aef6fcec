"""A preallocated key/value cache: one [B, Hkv, S, Dh] buffer pair per layer, written in place.

Shapes: B = batch, Hkv = key/value heads, S = capacity in positions, Dh = head dim.
"""

from __future__ import annotations

import torch

from .config import ModelConfig
from .errors import MoekitError


class KVCache:
    """Keys and values of every attention layer for up to `capacity` positions."""

    def __init__(self, config: ModelConfig, batch: int, capacity: int,
                 device: torch.device | str, dtype: torch.dtype):
        shape = (batch, config.num_kv_heads, capacity, config.head_dim)
        self.capacity = capacity
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]

    @property
    def bytes(self) -> int:
        """Returns the device bytes held by the cache."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor,
              start: int | torch.Tensor) -> None:
        """Stores k, v [B, Hkv, T, Dh] at positions start..start+T-1 of `layer`."""
        if isinstance(start, torch.Tensor):
            # Graph-safe path: the position lives on the device, so no host sync.
            index = start + torch.arange(k.shape[2], device=k.device)
            self.keys[layer].index_copy_(2, index, k)
            self.values[layer].index_copy_(2, index, v)
            return
        end = start + k.shape[2]
        if end > self.capacity:
            raise MoekitError(f"KV cache holds {self.capacity} positions, asked to write up to {end}; "
                              "allocate it with room for prompt + max_new_tokens")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
