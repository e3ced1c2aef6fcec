"""Stored forms of compressed experts: what a compressed checkpoint holds, and expert sources that
keep that form in memory and multiply with it (the decoded matrix is never kept).

Shapes: E = experts, I = expert ffn width, D = hidden, and for each matrix kind
(gate_up: R = 2I rows, K = D columns; down: R = D rows, K = I columns):

IntExperts (form "int", bits 2/3/4), per layer, with k = 32 // bits codes per word:
    experts.{kind}.qweight   [E, R, ceil(K / k)]  int32    codes, code j of a word in bits j*bits..
    experts.{kind}.scale     [E, R, P]            float16  P = ceil(K / group_size), or 1 per row
    experts.{kind}.zero      [E, R, P]            uint8    weight = scale * (code - zero)

TernaryCodeExperts (form "ternary_code", the sub-1-bit code of quant.code: each row keeps its own
chunk count, rows laid end to end; T = the layer's chunk capacity per expert, NB = ceil(R / 16)):
    experts.{kind}.codewords      [E, T, W]    uint8 (8-bit dictionary) or int16 (16-bit, as uint16)
    experts.{kind}.starts         [E, T]       int16 (int32 when K > 32767): column of each chunk
    experts.{kind}.row_chunks     [E, R]       uint8 (int16 / int32 for longer rows): chunks per row
    experts.{kind}.block_offsets  [E, NB]      int32    first chunk of each block of 16 rows
    experts.{kind}.lo             [E, R]       float16  the row's negative level
    experts.{kind}.hi             [E, R]       float16  the row's positive level
    experts.code_table            [2^bits, 2]  int32    the layer's dictionary (decode table)

Tensor names are prefixed with the family's experts module (e.g.
model.layers.3.block_sparse_moe.experts.gate_up.qweight).

Forward: up to SLOT_KERNEL_MAX_SLOTS routed slots (N * A; batch-1 decode) where the kernels run,
`slot_ffn`: one launch for every slot's gate_up + SwiGLU, one for every slot's down with its
routing weight, and a sum over each token's A slots; expert ids stay on the device (no host
sync: a decode step can be captured whole in a CUDA graph). Otherwise the grouped path: slots
sorted by expert (one host sync), one gate_up and one down call per routed expert.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..experts import group_by_expert
from ..experts.resident import SLOT_KERNEL_MAX_SLOTS
from . import ops
from .code import ROW_BLOCK
from .config import INT, TERNARY_CODE

KINDS = ("gate_up", "down")


class CompressedExperts(nn.Module):
    """Base of the stored forms: the seam's forward, one expert's matmul at a time."""

    STORED: tuple[str, ...] = ()  # per-kind tensor suffixes
    ROW_TENSORS: tuple[str, ...] = ()  # the suffixes whose shape is [E, R, ...] (one entry per row)
    SHARED: tuple[str, ...] = ()  # per-layer tensors
    bits: int | None = None  # code width of the int form (None: not an int form)

    def __init__(self, num_experts: int, hidden: int, ffn: int, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self.num_experts, self.hidden, self.ffn = num_experts, hidden, ffn
        for name in self.tensor_names():
            self.register_buffer(name.replace(".", "_"), tensors[name])

    @classmethod
    def tensor_names(cls) -> list[str]:
        """Returns the stored tensors' names relative to the experts prefix."""
        return [f"{kind}.{s}" for kind in KINDS for s in cls.STORED] + list(cls.SHARED)

    @classmethod
    def row_dims(cls, rows: int) -> dict[str, int]:
        """Returns {suffix: size of dimension 1} that a matrix of `rows` rows fixes (the other
        stored tensors' sizes depend on the weights)."""
        return {s: rows for s in cls.ROW_TENSORS}

    def stored(self) -> dict[str, torch.Tensor]:
        """Returns {name relative to the experts prefix: tensor} as stored."""
        return {name: getattr(self, name.replace(".", "_")) for name in self.tensor_names()}

    def expert_bytes(self) -> int:
        """Returns the stored bytes of one expert (shared tables spread over the experts)."""
        total = sum(t.numel() * t.element_size() for t in self.stored().values())
        return total // self.num_experts

    def cols(self, kind: str) -> int:
        return self.hidden if kind == "gate_up" else self.ffn

    def linear(self, kind: str, expert: int, x: torch.Tensor) -> torch.Tensor:
        """Returns x [n, K] @ W^T [n, R] for matrix `kind` of `expert`."""
        raise NotImplementedError

    def weight(self, kind: str, expert: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Returns the decoded matrix [R, K] of `kind` of `expert` (a transient copy)."""
        raise NotImplementedError

    def dequantize(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the dense (gate_up [E, 2I, D], down [E, D, I]) the stored form stands for."""
        return tuple(torch.stack([self.weight(kind, e, dtype) for e in range(self.num_experts)])
                     for kind in KINDS)  # type: ignore[return-value]

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Returns sum_a weights[n,a] * expert_{ids[n,a]}(x[n]) as [N, D] for x [N, D]."""
        if expert_ids.numel() <= SLOT_KERNEL_MAX_SLOTS and ops.use_kernels(x):
            return slot_ffn(self.stored(), self.bits, x, expert_ids, weights)
        groups = group_by_expert(expert_ids, weights, self.num_experts)
        xs = x[groups.token_of]  # [S, D] in expert order
        out = torch.empty_like(xs)
        bounds = groups.offsets()
        for e in range(self.num_experts):
            lo, hi = bounds[e], bounds[e + 1]
            if hi > lo:
                gate, up = self.linear("gate_up", e, xs[lo:hi]).chunk(2, dim=-1)
                out[lo:hi] = self.linear("down", e, F.silu(gate) * up)
        out = out * groups.weight_of[:, None].to(out.dtype)
        return torch.zeros_like(x).index_add_(0, groups.token_of, out)


class IntExperts(CompressedExperts):
    """Experts as packed 2/3/4-bit affine codes with a float16 scale and uint8 zero per group."""

    form = INT
    STORED = ROW_TENSORS = ("qweight", "scale", "zero")

    def __init__(self, num_experts, hidden, ffn, tensors, bits: int):
        super().__init__(num_experts, hidden, ffn, tensors)
        self.bits = bits

    def _parts(self, kind: str, e: int):
        return (getattr(self, f"{kind}_qweight")[e], getattr(self, f"{kind}_scale")[e],
                getattr(self, f"{kind}_zero")[e])

    def linear(self, kind, expert, x):
        return ops.int_linear(x, *self._parts(kind, expert), self.bits)

    def weight(self, kind, expert, dtype=torch.float32):
        return ops.int_weight(*self._parts(kind, expert), self.bits, self.cols(kind), dtype)


class TernaryCodeExperts(CompressedExperts):
    """Ternary experts in the sub-1-bit dictionary code, decoded inside the matmul."""

    form = TERNARY_CODE
    STORED = ("codewords", "starts", "row_chunks", "block_offsets", "lo", "hi")
    ROW_TENSORS = ("row_chunks", "lo", "hi")
    SHARED = ("code_table",)

    @classmethod
    def row_dims(cls, rows):
        return {**super().row_dims(rows), "block_offsets": -(-rows // ROW_BLOCK)}

    def _parts(self, kind: str, e: int):
        return tuple(getattr(self, f"{kind}_{s}")[e] for s in self.STORED) + (self.code_table,)

    def linear(self, kind, expert, x):
        return ops.code_linear(x, *self._parts(kind, expert))

    def weight(self, kind, expert, dtype=torch.float32):
        return ops.code_weight(*self._parts(kind, expert), self.cols(kind), dtype)


def slot_ffn(stored: dict[str, torch.Tensor], bits: int | None, x: torch.Tensor, expert_ids: torch.Tensor,
             weights: torch.Tensor) -> torch.Tensor:
    """Returns sum_a weights[n,a] * expert_{ids[n,a]}(x[n]) as [N, D] through the per-slot kernels
    (two launches, no host sync; the PyTorch references where the kernels do not run).

    stored: {name relative to the experts prefix: [E, ...]} as CompressedExperts.stored() gives
    (E may be a cache slab's slots seen in one layer's layout), int form when bits is given;
    x [N, D]; expert_ids, weights [N, A] (ids index stored's first dimension)."""
    n, top_k = expert_ids.shape
    ids, w = expert_ids.reshape(-1), weights.reshape(-1)  # [S]
    h = _slot_linear(stored, bits, "gate_up", x, ids, top_k, None)  # [S, I] silu(gate) * up
    y = _slot_linear(stored, bits, "down", h, ids, 1, w)  # [S, D] weighted
    return y.view(n, top_k, -1).sum(dim=1)


def _slot_linear(t: dict[str, torch.Tensor], bits: int | None, kind: str, x: torch.Tensor, ids: torch.Tensor,
                 top_k: int, weights: torch.Tensor | None) -> torch.Tensor:
    swiglu = kind == "gate_up"
    if bits is not None:
        return ops.int_slot_linear(x, ids, t[f"{kind}.qweight"], t[f"{kind}.scale"], t[f"{kind}.zero"], bits,
                                   top_k, weights, swiglu)
    parts = [t[f"{kind}.{s}"] for s in TernaryCodeExperts.STORED]
    return ops.code_slot_linear(x, ids, *parts, t["code_table"], top_k, weights, swiglu)


def form_class(form: str) -> type[CompressedExperts]:
    """Returns the expert source class of a stored form name."""
    return {INT: IntExperts, TERNARY_CODE: TernaryCodeExperts}[form]


def build_experts(form: str, num_experts: int, hidden: int, ffn: int, tensors: dict[str, torch.Tensor],
                  bits: str) -> CompressedExperts:
    """Returns the expert source of stored form `form` over `tensors` (named as in tensor_names)."""
    if form == INT:
        return IntExperts(num_experts, hidden, ffn, tensors, int(bits))
    return TernaryCodeExperts(num_experts, hidden, ffn, tensors)
