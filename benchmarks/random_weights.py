"""A checkpoint that draws its tensors on read: random bf16 weights made on the device that asks.

`RandomCheckpoint(hf_config, device)` stands where a model directory would (load_model,
load_parallel, load_offloaded accept it): every weight is N(0, std) drawn from a generator seeded
by the tensor's name, so two processes (two GPUs, a 1-GPU baseline and its shards) read the same
values without a byte on disk; norms are ones. A 93 GB Mixtral shape loads in seconds on an H200
and costs no disk or host memory. Routing of random weights is near-uniform: fine for speed,
useless for quality.

Shape legend: L = layers, D = hidden, I = expert ffn, E = experts, V = vocab.
"""

from __future__ import annotations

import tempfile
import zlib
from pathlib import Path

import torch
from random_checkpoint import non_expert_tensors

from moekit.checkpoint import Checkpoint
from moekit.errors import CheckpointError
from moekit.families import family_for


class RandomCheckpoint(Checkpoint):
    """Checkpoint's reading interface over tensors drawn on `device` from their names (no files)."""

    def __init__(self, hf: dict, device: str | torch.device, seed: int = 0, std: float = 0.02):
        self.path = Path(tempfile.gettempdir()) / "moekit-random-checkpoint"  # named in messages, never read
        self.config = hf
        self._handles, self.checksums, self._verified = {}, {}, set()
        self.fp8_block = None
        self.device, self.seed, self.std = torch.device(device), seed, std
        family = family_for(hf, where="RandomCheckpoint")
        cfg = family.config(hf)
        meta = lambda *shape: torch.empty(shape, device="meta", dtype=torch.bfloat16)
        named = non_expert_tensors(family, cfg, meta)
        self.shapes = {name: tuple(t.shape) for name, t in named.items()}
        self.ones = {name for name, t in named.items() if t.device.type != "meta"}  # the norms
        d, ffn = cfg.hidden_size, cfg.expert_ffn
        for layer in range(cfg.num_layers):
            for e in range(cfg.experts_in(layer)):
                gate, up, down = family.expert_names(layer, e)
                self.shapes.update({gate: (ffn, d), up: (ffn, d), down: (d, ffn)})
        self.weight_map = {name: "random" for name in self.shapes}

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.shapes:
            self.file_of(name)  # raises the checkpoint's "not found" message
        return self.shapes[name]

    def dtype(self, name: str) -> torch.dtype:
        return torch.bfloat16

    def itemsize(self, name: str) -> int:
        return 2

    def _draw(self, name: str) -> torch.Tensor:
        """Returns tensor `name` [shape] in bf16 on self.device (the same values on every device)."""
        shape = self.shape(name)
        if name in self.ones:
            return torch.ones(shape, dtype=torch.bfloat16, device=self.device)
        gen = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        return torch.randn(shape, generator=gen, dtype=torch.bfloat16, device=self.device).mul_(self.std)

    def read(self, name: str, shape: tuple[int, ...] | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Returns tensor `name` drawn on self.device, checked against `shape`, cast to `dtype`."""
        if shape is not None and self.shape(name) != tuple(shape):
            raise CheckpointError(f"random tensor '{name}' has shape {list(self.shape(name))}, asked for {list(shape)}")
        t = self._draw(name)
        return t if dtype is None else t.to(dtype)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Returns rows start..stop-1 of tensor `name` (drawn whole: the same values as read)."""
        return self._draw(name)[start:stop]

    def total_bytes(self) -> int:
        total = 0
        for shape in self.shapes.values():
            n = 1
            for s in shape:
                n *= s
            total += 2 * n
        return total
