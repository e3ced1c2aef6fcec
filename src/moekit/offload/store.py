"""Expert stores: where the full set of experts lives, outside the budgeted device tier.

HostStore holds every expert in (pinned, on GPU machines) host memory; DiskStore reads each
expert from the checkpoint's safetensors in place (memory-mapped), so nothing is copied ahead.
Both hand out one expert's tensors in its stored form; the cache copies them to the device.
"""

from __future__ import annotations


from ..checkpoint import Checkpoint
from ..config import ModelConfig
from ..families.base import Family
from ..experts.forms import Tensors
from .layout import SlotLayout


class HostStore:
    """Every expert of every MoE layer in host memory: per layer {name: [E, *shape]}."""

    kind = "host"

    def __init__(self, layout: SlotLayout, pin: bool):
        self.layout, self.pin = layout, pin
        self.layers: dict[int, Tensors] = {}

    def add_layer(self, layer: int, tensors: Tensors) -> None:
        """Takes one layer's stacked experts as the checkpoint names them {name: [E, ...]} (pinned
        when the store pins; a compressed form packs them into its own rows here)."""
        self.layers[layer] = self.layout.pack(layer, tensors, pin=self.pin)

    def load_layer(self, ckpt: Checkpoint, family: Family, cfg: ModelConfig, layer: int) -> None:
        """Reads one layer's experts from the checkpoint into fresh (pinned) host memory."""
        stacked = self.layout.empty(cfg.experts_in(layer), "cpu", pin=self.pin, layer=layer)
        for e in range(cfg.experts_in(layer)):
            self.layout.read(ckpt, family, layer, e, {k: v[e] for k, v in stacked.items()})
        self.layers[layer] = stacked

    def get(self, layer: int, expert: int) -> Tensors:
        """Returns one expert's host tensors (views, no copy)."""
        return {k: v[expert] for k, v in self.layers[layer].items()}

    def host_rows(self, layer: int, expert: int) -> tuple[Tensors, int]:
        """Returns (stacked host tensors, row) holding one expert, for computing it on the CPU in place."""
        return self.layers[layer], expert

    def host_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers.values() for t in layer.values())


class DiskStore:
    """Experts read on demand from the checkpoint's memory-mapped safetensors shards."""

    kind = "disk"
    pin = False

    def __init__(self, layout: SlotLayout, ckpt: Checkpoint, family: Family, cfg: ModelConfig):
        self.layout, self.ckpt, self.family, self.cfg = layout, ckpt, family, cfg
        self.scratch: Tensors | None = None  # one expert, for host_rows

    def read_into(self, layer: int, expert: int, out: Tensors) -> None:
        """Fills `out` with one expert straight from the checkpoint (host memory near one tensor)."""
        self.layout.read(self.ckpt, self.family, layer, expert, out)

    def host_rows(self, layer: int, expert: int) -> tuple[Tensors, int]:
        """Returns (host tensors, row) holding one expert read from the checkpoint into a scratch
        buffer, for computing it on the CPU (one caller at a time: the CPU expert worker)."""
        if self.scratch is None:
            self.scratch = self.layout.empty(1, "cpu")
        self.read_into(layer, expert, {k: v[0] for k, v in self.scratch.items()})
        return self.scratch, 0

    def host_bytes(self) -> int:
        return 0
