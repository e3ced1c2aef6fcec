"""Stored forms of one expert: its tensors, its bytes, how it is copied and how it computes.

The offload runtime moves and caches a form's tensors and never looks inside them, so a
compressed form (its own packed tensors and fused matmul) plugs in by implementing `ExpertForm`
(offload.compressed: int-N and the sub-1-bit ternary code). A form's slot may hold experts of
different layers in different layouts, so storage, copies and compute take the expert's layer.

Shapes: N = tokens, A = experts per token, S = cache slots, D = hidden, I = expert ffn.
Dense form, per expert:   gate_up [2I, D] (gate rows first, then up), down [D, I]
           in a slab:     gate_up [S, 2I, D], down [S, D, I]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checkpoint import Checkpoint
from ..config import ModelConfig
from ..experts import triton_ops
from ..experts.resident import GATHER_MAX_SLOTS, SLOT_KERNEL_MAX_SLOTS
from ..families.base import Family

Tensors = dict[str, torch.Tensor]


class ExpertForm:
    """The interface: what the offload runtime needs from a stored form of one expert."""

    name = "abstract"
    gathers = True  # run_gathered's batched per-slot results reduce as the resident source does
    cpu_path = True  # run_one on the store's host tensors is fast enough to compute misses on the CPU

    def shapes(self, layer: int | None = None) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Returns {tensor name: (shape, dtype)} of one expert as stored: in a cache slot (layer
        None, room for any layer's expert) or as layer `layer` stores it (a store's rows)."""
        raise NotImplementedError

    def expert_bytes(self) -> int:
        """Returns the bytes of one cache slot (the planner's unit; an expert of any layer fits)."""
        return _nbytes(self.shapes())

    def layer_bytes(self, layer: int) -> int:
        """Returns the bytes one expert of `layer` moves per fetch (what crosses PCIe)."""
        return _nbytes(self.shapes(layer))

    def shared_bytes(self) -> int:
        """Returns the bytes of per-layer tensors kept resident on the device (e.g. code tables)."""
        return 0

    def empty(self, count: int, device: torch.device | str, pin: bool = False, layer: int | None = None) -> Tensors:
        """Returns uninitialised storage for `count` experts: {name: [count, *shape]} (slots when
        layer is None, else experts of `layer`)."""
        shapes = self.shapes(layer)
        if pin:
            return {name: pinned_empty((count, *shape), dtype) for name, (shape, dtype) in shapes.items()}
        return {name: torch.empty((count, *shape), dtype=dtype, device=device)
                for name, (shape, dtype) in shapes.items()}

    def pack(self, layer: int, tensors: Tensors, pin: bool = False) -> Tensors:
        """Returns one layer's experts given as the checkpoint stores them ({name: [E, ...]}) in
        this form's store rows (the dense form stores them as they are)."""
        return tensors

    def read(self, ckpt: Checkpoint, family: Family, cfg: ModelConfig, layer: int, expert: int,
             out: Tensors) -> None:
        """Fills `out` (one expert's tensors, any device) from the checkpoint, reading only it."""
        raise NotImplementedError

    def copy(self, dst: Tensors, src: Tensors, non_blocking: bool = False, layer: int | None = None) -> None:
        """Copies one expert's tensors (the stored form, as is) from src into dst."""
        for name, tensor in dst.items():
            tensor.copy_(src[name], non_blocking=non_blocking)

    def run_slots(self, x: torch.Tensor, expert_ids: torch.Tensor, slot_ids: torch.Tensor,
                  weights: torch.Tensor, slab: Tensors, layer: int | None = None) -> torch.Tensor | None:
        """Returns sum_a weights[n,a] * expert(x[n]) as [N, D], expert expert_ids[n,a] of `layer`
        held in slab slot slot_ids[n,a] (every routed expert present), or None: the caller then
        runs the experts one by one (run_one)."""
        return None

    def run_one(self, xs: torch.Tensor, slab: Tensors, slot: int, layer: int | None = None) -> torch.Tensor:
        """Returns the expert of `layer` in `slot` applied to its tokens xs [n, D] as [n, D] (no weights)."""
        raise NotImplementedError

    def run_gathered(self, xs: torch.Tensor, slots: torch.Tensor, slab: Tensors,
                     layer: int | None = None) -> torch.Tensor:
        """Returns each row of xs [S, D] through the expert in slots[s], as [S, D]."""
        out = torch.empty_like(xs)
        for s in slots.unique().tolist():
            rows = (slots == s).nonzero().squeeze(-1)
            out[rows] = self.run_one(xs[rows], slab, s, layer)
        return out


class DenseForm(ExpertForm):
    """A SwiGLU expert as plain tensors in `dtype` (bf16, fp16, fp32)."""

    name = "dense"

    def __init__(self, hidden: int, ffn: int, dtype: torch.dtype):
        self.hidden, self.ffn, self.dtype = hidden, ffn, dtype

    def shapes(self, layer=None):
        return {"gate_up": ((2 * self.ffn, self.hidden), self.dtype), "down": ((self.hidden, self.ffn), self.dtype)}

    def read(self, ckpt, family, cfg, layer, expert, out):
        d, ffn = self.hidden, self.ffn
        fused_gate_up, fused_down = family.stacked_expert_names(layer)
        if ckpt.has(fused_gate_up):  # fused [E, ...] tensors: slice one expert out of the mmap
            out["gate_up"].copy_(ckpt.read_rows(fused_gate_up, expert, expert + 1)[0])
            out["down"].copy_(ckpt.read_rows(fused_down, expert, expert + 1)[0])
            return
        gate, up, down = family.expert_names(layer, expert)
        out["gate_up"][:ffn].copy_(ckpt.read(gate, shape=(ffn, d)))
        out["gate_up"][ffn:].copy_(ckpt.read(up, shape=(ffn, d)))
        out["down"].copy_(ckpt.read(down, shape=(d, ffn)))

    def run_slots(self, x, expert_ids, slot_ids, weights, slab, layer=None):
        # the same kernel choice as ResidentExperts, so outputs match the resident model's
        gate_up, down = slab["gate_up"], slab["down"]
        slots = slot_ids.numel()
        if x.is_cuda and triton_ops.triton_usable(x):
            if slots <= SLOT_KERNEL_MAX_SLOTS:
                return triton_ops.slot_expert_ffn(x, slot_ids, weights, gate_up, down)
            return triton_ops.grouped_expert_ffn(x, slot_ids, weights, gate_up, down)
        if slots <= GATHER_MAX_SLOTS:
            n, top_k = slot_ids.shape
            flat = slot_ids.reshape(-1)
            xs = x.repeat_interleave(top_k, dim=0)[:, :, None]  # [S, D, 1]
            gate, up = torch.bmm(gate_up[flat], xs).squeeze(-1).chunk(2, dim=-1)  # [S, I]
            h = (F.silu(gate) * up)[:, :, None]
            out = torch.bmm(down[flat], h).view(n, top_k, self.hidden)  # [N, A, D]
            return (out * weights[:, :, None]).sum(dim=1)
        return None  # the caller runs the grouped path expert by expert (run_one)

    def run_one(self, xs, slab, slot, layer=None):
        gate, up = F.linear(xs, slab["gate_up"][slot]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, slab["down"][slot])

    def run_gathered(self, xs: torch.Tensor, slots: torch.Tensor, slab: Tensors,
                     layer: int | None = None) -> torch.Tensor:
        """Returns each of xs [S, D] through the expert in slots[s] as [S, D] (one batched matmul)."""
        gate, up = torch.bmm(slab["gate_up"][slots], xs[:, :, None]).squeeze(-1).chunk(2, dim=-1)
        return torch.bmm(slab["down"][slots], (F.silu(gate) * up)[:, :, None]).squeeze(-1)


def dense_form(cfg: ModelConfig, dtype: torch.dtype) -> DenseForm:
    """Returns the dense form of this model's experts in `dtype`."""
    return DenseForm(cfg.hidden_size, cfg.expert_ffn, dtype)


def _nbytes(shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> int:
    total = 0
    for shape, dtype in shapes.values():
        numel = 1
        for d in shape:
            numel *= d
        total += numel * torch.empty((), dtype=dtype).element_size()
    return total


def pinned_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Returns an uninitialised page-locked host tensor of exactly its own size.

    PyTorch's pinned allocator rounds each block up to a power of two (up to +100% for a layer of
    experts); page-locking an ordinary allocation with cudaHostRegister costs only its bytes. The
    registration is undone when this (base) tensor object is freed: keep it, not only its views."""
    import weakref

    tensor = torch.empty(shape, dtype=dtype)
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0 or not torch.cuda.is_available():
        return tensor
    cudart = torch.cuda.cudart()
    if int(cudart.cudaHostRegister(tensor.data_ptr(), nbytes, 0)) != 0:
        return tensor.pin_memory()  # registration refused: fall back to the pinned allocator
    weakref.finalize(tensor, cudart.cudaHostUnregister, tensor.data_ptr())  # keep the base tensor alive
    return tensor
