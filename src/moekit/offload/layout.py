"""Where a stored form's experts lie in the offload tiers: host-store rows and device-cache slots.

The offload runtime moves and caches an expert's stored tensors without looking inside them, and
the stored form (experts.forms, quant.formats) multiplies them: a layout only says how one
expert's tensors are laid out in a row of the store or a slot of the cache, and hands the form a
stacked view of them (`view`). Offload, like every placement, moves the stored form, never a
decoded copy.

Two layouts:
  * TensorLayout (dense): the form's own tensors, one stacked tensor per name; every layer's
    experts have the same shapes. A slot holds {name: [*shape]}.
  * PackedLayout (compressed forms): one expert's tensors laid end to end as bytes, each at a
    16-byte aligned offset (their shapes may differ between layers: a ternary code's chunk
    capacity T is the most any expert of that layer needs). A store row and a cache slot are uint8
    vectors; slots are sized for the largest layer, and a slot is viewed in the layout of the
    layer whose expert it holds, so one slab serves every layer. A fetch moves only its own
    layer's bytes (layer_bytes), which is what bytes_moved counts.
Per-layer tables (a ternary code's dictionary, 2^bits x 8 bytes) belong to no expert: they stay
resident on the device beside the cache, and the planner counts them (shared_bytes).

Shapes: E = experts of a layer, S = cache slots, B = bytes of a packed expert.
    TensorLayout  store layer {name: [E, *shape]}          cache slab {name: [S, *shape]}
    PackedLayout  store layer {"packed": [E, layer_bytes]}  cache slab {"packed": [S, slot_bytes]} uint8
"""

from __future__ import annotations

import math
import mmap
import weakref
from dataclasses import dataclass

import torch

from ..experts.forms import DenseForm, Specs, StoredForm, Tensors, nbytes
from ..native.hugepages import advise_huge_pages

PAGE_BYTES = mmap.PAGESIZE  # what cudaHostRegister locks: whole pages
ALIGN_BYTES = 16  # every tensor of a packed expert starts here: dtype views and vector loads


class SlotLayout:
    """How experts of `form` lie in store rows and cache slots (abstract)."""

    def __init__(self, form: StoredForm, moe_layers: list[int]):
        self.form, self.moe_layers = form, list(moe_layers)

    @property
    def name(self) -> str:
        return self.form.name

    def shapes(self, layer: int | None = None) -> Specs:
        """Returns {tensor name: (shape, dtype)} of one expert in a cache slot (layer None: room for
        any layer's expert) or in `layer`'s store rows."""
        raise NotImplementedError

    def expert_bytes(self) -> int:
        """Returns the bytes of one cache slot (the planner's unit; an expert of any layer fits)."""
        return nbytes(self.shapes())

    def layer_bytes(self, layer: int) -> int:
        """Returns the bytes one expert of `layer` moves per fetch (what crosses PCIe)."""
        return nbytes(self.shapes(layer))

    def shared_bytes(self) -> int:
        """Returns the bytes of the form's per-layer tables kept resident on the device."""
        return self.form.table_bytes()

    def empty(self, count: int, device: torch.device | str, pin: bool = False, layer: int | None = None) -> Tensors:
        """Returns uninitialised storage for `count` experts: {name: [count, *shape]} (slots when
        layer is None, else experts of `layer`)."""
        shapes = self.shapes(layer)
        if pin:
            return {name: pinned_empty((count, *shape), dtype) for name, (shape, dtype) in shapes.items()}
        return {name: torch.empty((count, *shape), dtype=dtype, device=device) for name, (shape, dtype) in shapes.items()}

    def pack(self, layer: int, tensors: Tensors, pin: bool = False) -> Tensors:
        """Returns one layer's experts given as the form stores them ({name: [E, ...]}) in store rows."""
        raise NotImplementedError

    def read(self, ckpt, family, layer: int, expert: int, out: Tensors) -> None:
        """Fills `out` (one expert's row or slot, any device) from the checkpoint, reading only it."""
        raise NotImplementedError

    def copy(self, dst: Tensors, src: Tensors, non_blocking: bool = False, layer: int | None = None) -> None:
        """Copies one expert (the stored form, as is) from src into dst."""
        for name, tensor in dst.items():
            tensor.copy_(src[name], non_blocking=non_blocking)

    def view(self, rows: Tensors, layer: int) -> Tensors:
        """Returns the form's stacked tensors {name: [S, ...]} (and `layer`'s tables) viewing rows or
        slots {name: [S, ...]} that hold experts of `layer` (no copy)."""
        raise NotImplementedError

    def describe(self) -> dict:
        """Returns the slot size, each layer's expert bytes and the tables' bytes (JSON-ready)."""
        return {"form": self.name, "slot_bytes": self.expert_bytes(), "shared_bytes": self.shared_bytes(),
                "layer_bytes": {layer: self.layer_bytes(layer) for layer in self.moe_layers}}


class TensorLayout(SlotLayout):
    """The form's tensors as they are, one stacked tensor per name (shapes equal in every layer)."""

    def shapes(self, layer=None):
        return self.form.specs(self.moe_layers[0] if layer is None else layer)

    def pack(self, layer, tensors, pin=False):
        stacked = {name: tensors[name] for name in self.shapes(layer)}
        if not pin or all(self._as_stored(t, name, layer) for name, t in stacked.items()):
            return stacked  # page-locked already, in the store's dtype, shape and order: kept, not copied
        out = self.empty(next(iter(stacked.values())).shape[0], "cpu", pin=True, layer=layer)
        for name, t in out.items():
            t.copy_(stacked[name])
        return out

    def _as_stored(self, t: torch.Tensor, name: str, layer: int) -> bool:
        """Returns whether t [E, ...] is pinned, contiguous, and of the stored tensor's dtype and shape
        (the native kernels read it by raw pointer and row stride)."""
        shape, dtype = self.shapes(layer)[name]
        return t.is_pinned() and t.is_contiguous() and t.dtype == dtype and tuple(t.shape[1:]) == tuple(shape)

    def read(self, ckpt, family, layer, expert, out):
        self.form.read(ckpt, family, layer, expert, out)

    def view(self, rows, layer):
        return {**rows, **self.form.tables(layer)}


@dataclass(frozen=True)
class PackedTensor:
    """One stored tensor of an expert inside its packed bytes."""

    shape: tuple[int, ...]  # one expert's shape (the stored [E, ...] without E)
    dtype: torch.dtype
    offset: int  # bytes from the start of the expert
    nbytes: int


class ExpertBytes:
    """Where each stored tensor of one layer's experts lies in an expert's bytes."""

    def __init__(self, specs: Specs):
        self.tensors: dict[str, PackedTensor] = {}
        offset = 0
        for name, (shape, dtype) in specs.items():
            size = nbytes({name: (shape, dtype)})
            self.tensors[name] = PackedTensor(tuple(shape), dtype, offset, size)
            offset = _aligned(offset + size)
        self.nbytes = offset

    def views(self, row: torch.Tensor) -> Tensors:
        """Returns {name: tensor} viewing one expert's bytes row [>= nbytes] uint8 (no copy)."""
        return {name: row[t.offset:t.offset + t.nbytes].view(t.dtype).view(t.shape) for name, t in self.tensors.items()}

    def stacked(self, rows: torch.Tensor) -> Tensors:
        """Returns {name: [S, *shape]} viewing every row of rows [S, >= nbytes] uint8 in this
        layout (no copy): expert stride = the row's bytes, which keep every dtype aligned."""
        count = rows.shape[0]
        return {name: rows[:, t.offset:t.offset + t.nbytes].view(t.dtype).view(count, *t.shape)
                for name, t in self.tensors.items()}


class PackedLayout(SlotLayout):
    """A compressed form's experts packed per expert into bytes (module docstring)."""

    def __init__(self, form: StoredForm, moe_layers: list[int]):
        super().__init__(form, moe_layers)
        self.bytes_of = {layer: ExpertBytes(form.specs(layer)) for layer in self.moe_layers}
        self.slot_bytes = max(b.nbytes for b in self.bytes_of.values())

    def shapes(self, layer=None):
        size = self.slot_bytes if layer is None else self.bytes_of[layer].nbytes
        return {"packed": ((size,), torch.uint8)}

    def describe(self):
        return {**super().describe(),
                "slot_layout": "padded to the largest layer's expert (every expert of a layer has one size)"}

    def read(self, ckpt, family, layer, expert, out):
        self.form.read(ckpt, family, layer, expert, self.bytes_of[layer].views(out["packed"]))

    def pack(self, layer, tensors, pin=False):
        """Returns {"packed": [E, layer_bytes]} of one layer's stored tensors {name: [E, ...]}."""
        layout = self.bytes_of[layer]
        count = tensors[next(iter(layout.tensors))].shape[0]
        packed = (pinned_empty((count, layout.nbytes), torch.uint8) if pin
                  else torch.empty(count, layout.nbytes, dtype=torch.uint8))
        for e in range(count):
            for name, view in layout.views(packed[e]).items():
                view.copy_(tensors[name][e])
        return {"packed": packed}

    def copy(self, dst, src, non_blocking=False, layer=None):
        """Copies one expert's bytes; only its layer's bytes when the buffers are slot sized."""
        n = self.slot_bytes if layer is None else self.bytes_of[layer].nbytes
        dst["packed"][:n].copy_(src["packed"][:n], non_blocking=non_blocking)

    def view(self, rows, layer):
        # views, built per call (microseconds): cached ones would keep a replaced slab alive
        return {**self.bytes_of[layer].stacked(rows["packed"]), **self.form.tables(layer)}


def layout_for(form: StoredForm, moe_layers: list[int]) -> SlotLayout:
    """Returns the layout offload keeps `form`'s experts in: dense experts as their own tensors
    (the in-place reads of misses "mapped" point into them), compressed ones packed."""
    if isinstance(form, DenseForm):
        return TensorLayout(form, moe_layers)
    return PackedLayout(form, moe_layers)


def pinned_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Returns an uninitialised page-locked host tensor of its own size rounded up to whole pages.

    PyTorch's pinned allocator rounds each block up to a power of two (up to +100% for a layer of
    experts); page-locking an ordinary allocation with cudaHostRegister costs only its bytes. CUDA
    locks whole pages, and malloc packs small allocations side by side: a second registration
    touching a page already locked fails ("already mapped") and leaves that error for the next
    kernel launch to raise. So the tensor lives in an anonymous mapping of its own (page-aligned,
    shared with nothing), and its storage starts where the registration does (is_pinned holds).
    The registration is undone when the returned tensor object is freed: keep it, not only its views."""
    size = math.prod(shape) * dtype.itemsize
    if size == 0 or not torch.cuda.is_available():
        tensor = torch.empty(shape, dtype=dtype)
        advise_huge_pages([tensor])  # the CPU kernels stream it (native.hugepages says why)
        return tensor
    locked = -(-size // PAGE_BYTES) * PAGE_BYTES
    pages = mmap.mmap(-1, locked)  # the storage keeps the mapping alive
    tensor = torch.frombuffer(pages, dtype=torch.uint8)[:size].view(dtype).view(shape)
    # 2 MB pages before the registration faults the pages in: CPU misses stream these experts
    # (native.hugepages: 4 KB pages stop the prefetchers at every page)
    advise_huge_pages([tensor])
    cudart = torch.cuda.cudart()
    if int(cudart.cudaHostRegister(tensor.data_ptr(), locked, 0)) != 0:
        return torch.empty(shape, dtype=dtype).pin_memory()  # refused: the pinned allocator instead
    weakref.finalize(tensor, cudart.cudaHostUnregister, tensor.data_ptr())  # keep the returned tensor alive
    return tensor


def _aligned(n: int) -> int:
    return -(-n // ALIGN_BYTES) * ALIGN_BYTES
