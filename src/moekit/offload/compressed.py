"""Compressed expert forms for offload: int-N and the sub-1-bit ternary code stay compressed in the
store, over PCIe and in the device cache, and are decoded inside the matmul (quant.ops: the Triton
kernels on GPUs, their PyTorch references on the CPU).

One expert of layer l is its stored tensors (quant.formats names: gate_up.qweight, gate_up.scale,
... or gate_up.codewords, gate_up.starts, ...) laid end to end as bytes, each at a 16-byte aligned
offset: the layer's `PackedLayout`. A store row and a cache slot are uint8 vectors; a slot is
viewed in the layout of the layer whose expert it holds, so one slab serves every layer.

Slot size. int-N experts have the same layout in every layer. A ternary code matrix is a
variable-length stream per row, each row its own number of chunks (quant.code.encode); the
checkpoint gives every expert of a layer the same chunk capacity T (the most chunks any of that
layer's experts needs, per matrix), so all experts of one layer have the same bytes, and layers
differ (T, W, codeword width). Slots are sized for the largest layer (slot_bytes = max over layers
of the layer's expert bytes); a fetch moves only its own layer's bytes (layer_bytes), which is
what bytes_moved counts. `describe()` reports both.

Per-layer shared tensors (the ternary code's decode table, 2^bits x 8 bytes) belong to no expert:
they stay resident on the device per layer, and the planner counts them (shared_bytes).

Compute. A call of up to SLOT_KERNEL_MAX_SLOTS routed slots (decode) where the kernels run
(run_slots): the whole slab is viewed in the layer's layout as stacked [S, ...] tensors whose
expert stride is slot_bytes (PackedLayout.stacked), and the resident model's per-slot kernels
(quant.formats.slot_ffn) read slot slot_ids[n, a] for each routed slot: two launches per layer,
whatever the experts. Larger calls, and the CPU, run expert by expert (run_one), as the resident
CompressedExperts does.

Shapes: E = experts, n = tokens of one expert, D = hidden, I = expert ffn, B = bytes of a row.
    store layer  {"packed": [E, layer_bytes]} uint8     cache slab  {"packed": [S, slot_bytes]} uint8
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..errors import CheckpointError
from ..experts.resident import SLOT_KERNEL_MAX_SLOTS
from ..quant import ops
from ..quant.config import INT, QuantConfig
from ..quant.formats import form_class, slot_ffn
from ..quant.loader import experts_prefix
from .forms import ExpertForm, Tensors, pinned_empty

ALIGN_BYTES = 16  # every tensor of a packed expert starts here: dtype views and vector loads
@dataclass(frozen=True)
class PackedTensor:
    """One stored tensor of an expert inside its packed bytes."""

    shape: tuple[int, ...]  # one expert's shape (the stored [E, ...] without E)
    dtype: torch.dtype
    offset: int  # bytes from the start of the expert
    nbytes: int


class PackedLayout:
    """Where each stored tensor of one layer's experts lies in an expert's bytes."""

    def __init__(self, specs: dict[str, tuple[tuple[int, ...], torch.dtype]]):
        self.tensors: dict[str, PackedTensor] = {}
        offset = 0
        for name, (shape, dtype) in specs.items():
            numel = 1
            for d in shape:
                numel *= d
            nbytes = numel * torch.empty((), dtype=dtype).element_size()
            self.tensors[name] = PackedTensor(tuple(shape), dtype, offset, nbytes)
            offset = _aligned(offset + nbytes)
        self.nbytes = offset

    def views(self, row: torch.Tensor) -> Tensors:
        """Returns {name: tensor} viewing one expert's bytes row [>= nbytes] uint8 (no copy)."""
        return {name: row[t.offset:t.offset + t.nbytes].view(t.dtype).view(t.shape)
                for name, t in self.tensors.items()}

    def stacked(self, rows: torch.Tensor) -> Tensors:
        """Returns {name: [S, *shape]} viewing every row of rows [S, >= nbytes] uint8 in this
        layout (no copy): expert stride = the row's bytes, which keep every dtype aligned."""
        count = rows.shape[0]
        return {name: rows[:, t.offset:t.offset + t.nbytes].view(t.dtype).view(count, *t.shape)
                for name, t in self.tensors.items()}


class CompressedForm(ExpertForm):
    """Experts of a moekit-compressed checkpoint (int-N or ternary code), packed per expert."""

    gathers = False  # past run_slots, expert by expert, reduced as quant.formats.CompressedExperts does
    # the CPU reference decodes each whole matrix per call (several passes over a dense copy):
    # slower than copying the compressed bytes over PCIe, so misses are never computed on the CPU
    cpu_path = False

    def __init__(self, quant: QuantConfig, hidden: int, ffn: int, layouts: dict[int, PackedLayout],
                 shared: dict[int, Tensors]):
        """`layouts` {layer: PackedLayout}; `shared` {layer: {name: tensor}} already on the device."""
        self.quant, self.hidden, self.ffn = quant, hidden, ffn
        self.layouts, self.shared = layouts, shared
        self.bits = int(quant.bits) if quant.form == INT else None
        self.name = f"int{quant.bits}" if quant.form == INT else quant.form
        self.slot_bytes = max(layout.nbytes for layout in layouts.values())

    # ---- storage -----------------------------------------------------------------------------
    def shapes(self, layer=None):
        nbytes = self.slot_bytes if layer is None else self.layouts[layer].nbytes
        return {"packed": ((nbytes,), torch.uint8)}

    def shared_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for tensors in self.shared.values() for t in tensors.values())

    def describe(self) -> dict:
        """Returns the slot size, each layer's expert bytes and the shared bytes (JSON-ready)."""
        return {"form": self.name, "slot_bytes": self.slot_bytes, "shared_bytes": self.shared_bytes(),
                "layer_bytes": {layer: layout.nbytes for layer, layout in self.layouts.items()},
                "slot_layout": "padded to the largest layer's expert (every expert of a layer has one size)"}

    def read(self, ckpt, family, cfg, layer, expert, out):
        prefix = experts_prefix(family, layer)
        for name, view in self.layouts[layer].views(out["packed"]).items():
            view.copy_(ckpt.read_rows(f"{prefix}.{name}", expert, expert + 1)[0])

    def pack(self, layer, tensors, pin=False):
        """Returns {"packed": [E, layer_bytes]} of one layer's stored tensors {name: [E, ...]}."""
        layout = self.layouts[layer]
        count = next(iter(tensors.values())).shape[0]
        packed = pinned_empty((count, layout.nbytes), torch.uint8) if pin else torch.empty(count, layout.nbytes, dtype=torch.uint8)
        for e in range(count):
            for name, view in layout.views(packed[e]).items():
                view.copy_(tensors[name][e])
        return {"packed": packed}

    def copy(self, dst, src, non_blocking=False, layer=None):
        """Copies one expert's bytes; only its layer's bytes when the buffers are slot sized."""
        n = self.slot_bytes if layer is None else self.layouts[layer].nbytes
        dst["packed"][:n].copy_(src["packed"][:n], non_blocking=non_blocking)

    # ---- compute -----------------------------------------------------------------------------
    def run_slots(self, x, expert_ids, slot_ids, weights, slab, layer=None):
        """Returns sum_a weights[n,a] * expert(x[n]) as [N, D] through the per-slot kernels, slot
        slot_ids[n,a] of the slab read in `layer`'s layout, where the resident CompressedExperts runs
        them too (<= SLOT_KERNEL_MAX_SLOTS slots, kernels usable); else None (the caller runs run_one)."""
        if slot_ids.numel() > SLOT_KERNEL_MAX_SLOTS or not ops.use_kernels(x):
            return None
        # views, built per call (microseconds): cached ones would keep a replaced slab alive
        stored = {**self.layouts[layer].stacked(slab["packed"]), **self.shared[layer]}
        return slot_ffn(stored, self.bits, x, slot_ids, weights)

    def run_one(self, xs, slab, slot, layer=None):
        """Returns the expert in `slot` on xs [n, D] as [n, D], exactly as the resident source does."""
        tensors = self.layouts[layer].views(slab["packed"][slot])
        gate, up = self._linear("gate_up", tensors, layer, xs).chunk(2, dim=-1)  # [n, I] each
        return self._linear("down", tensors, layer, F.silu(gate) * up)

    def _linear(self, kind: str, t: Tensors, layer: int, x: torch.Tensor) -> torch.Tensor:
        if self.bits is not None:
            return ops.int_linear(x, t[f"{kind}.qweight"], t[f"{kind}.scale"], t[f"{kind}.zero"], self.bits)
        parts = [t[f"{kind}.{s}"] for s in form_class(self.quant.form).STORED]
        return ops.code_linear(x, *parts, self.shared[layer]["code_table"])


def compressed_form(quant: QuantConfig, cfg: ModelConfig, device: torch.device, ckpt=None, family=None,
                    layers: dict[int, Tensors] | None = None) -> CompressedForm:
    """Returns the CompressedForm of a compressed model's experts, laid out from the checkpoint's
    headers (reading only the shared tables) or from stored tensors {layer: {name: [E, ...]}}."""
    quant.check_shapes(cfg.hidden_size, cfg.expert_ffn)  # the int form assumes equal groups
    cls = form_class(quant.form)
    per_expert = [f"{kind}.{s}" for kind in ("gate_up", "down") for s in cls.STORED]
    layouts, shared = {}, {}
    for layer in (i for i, moe in enumerate(cfg.moe_layers) if moe):
        specs = {}
        if layers is not None:
            given = layers[layer]
            missing = [n for n in cls.tensor_names() if n not in given]
            if missing:
                raise CheckpointError(f"layer {layer}: stored tensors {missing} of form '{quant.form}' not given")
            for name in per_expert:
                specs[name] = (tuple(given[name].shape[1:]), given[name].dtype)
            shared[layer] = {n: given[n].to(device) for n in cls.SHARED}
        else:
            prefix = experts_prefix(family, layer)
            for name in cls.tensor_names():
                if not ckpt.has(f"{prefix}.{name}"):
                    raise CheckpointError(f"{ckpt.path}: tensor '{prefix}.{name}' not found; config.json says the "
                                          f"experts are stored as '{quant.form}'. The checkpoint is incomplete")
            for name in per_expert:
                full = f"{prefix}.{name}"
                specs[name] = (ckpt.shape(full)[1:], ckpt.dtype(full))
            shared[layer] = {n: ckpt.read(f"{prefix}.{n}").to(device) for n in cls.SHARED}
        for kind, rows in (("gate_up", 2 * cfg.expert_ffn), ("down", cfg.hidden_size)):
            for suffix, size in cls.row_dims(rows).items():
                shape = specs[f"{kind}.{suffix}"][0]
                if shape[0] != size:
                    raise CheckpointError(f"layer {layer}: stored tensor '{kind}.{suffix}' has {shape[0]} rows per "
                                          f"expert, config.json implies {size}; the weights do not match the config")
        layouts[layer] = PackedLayout(specs)
    return CompressedForm(quant, cfg.hidden_size, cfg.expert_ffn, layouts, shared)


def _aligned(n: int) -> int:
    return -(-n // ALIGN_BYTES) * ALIGN_BYTES
