"""Stored forms of experts: how a layer's experts are stored, and every way they multiply.

A form knows the tensors one expert is stored as, the per-layer tables it needs beside them, how
to read one expert from a checkpoint, how to decode a matrix, and how to run routed tokens. This
is the only place an expert multiplies: every placement -- resident (experts.resident), the
offload cache's slab, the host store the CPU computes misses from, reads in place from host
memory -- holds *stacked* tensors of some experts and calls `form.run` (or its pieces,
`plan` + `apply`, when it brings experts in by waves). dense is here; quant.formats adds int-N
and the sub-1-bit ternary code.

Stacked tensors: {name: [S, *shape]} for S experts (a layer's experts, or cache slots viewed in
one layer's layout; any stride between experts), plus the layer's tables by name. A call routes
each token to A rows of the stack: `rows` [N, A] (expert ids for a resident layer, slot ids for a
cache slab).

Paths of `run`, chosen once here for every placement:
  fused     the form's kernels (dense: Triton per-slot kernels for <= SLOT_KERNEL_MAX_SLOTS slots,
            grouped kernels above; compressed: per-slot decode-in-matmul kernels for few slots):
            no host sync, so a decode step can be captured in a CUDA graph;
  gathered  small calls without kernels (dense, no autograd): one batched matmul over the slots;
  grouped   slots sorted by expert (one host sync), one matmul per expert present (autograd,
            prefill, and the CPU).
A placement that must bring experts in by waves keeps the same per-expert rows and the same
reduction (`SlotPlan`), so its outputs equal the resident ones bit for bit on the CPU.

Shapes: N = tokens, A = experts per token, S = stacked experts (or slots), D = hidden,
I = expert ffn width; n = tokens of one expert.
Dense form, one expert:  gate_up [2I, D] (gate rows first, then up),  down [D, I]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import triton_ops

Tensors = dict[str, torch.Tensor]
Specs = dict[str, tuple[tuple[int, ...], torch.dtype]]
KINDS = ("gate_up", "down")  # the two matrices of a SwiGLU expert

# Below this many routed slots (N * A) the PyTorch path gathers the chosen experts' weights and
# runs one batched matmul: no host sync, so a decode step can be captured in a CUDA graph.
GATHER_MAX_SLOTS = 16
# Up to this many slots (batch-1 decode of top-8 models) the per-slot kernels run instead of the
# grouped ones: no sorting or block map, a third of the small launches per layer. GPUs use the
# grouped Triton kernels above it with no upper limit: at 8192 slots (a 1024-token prefill,
# olmoe-1b-7b shape) they ran 2.9x faster than cuBLAS per expert on an H200.
SLOT_KERNEL_MAX_SLOTS = 16


def experts_prefix(family, layer: int) -> str:
    """Returns the name prefix of layer `layer`'s experts module (no trailing dot)."""
    return family.stacked_expert_names(layer)[0].rsplit(".", 1)[0]


def nbytes(specs: Specs) -> int:
    """Returns the bytes of tensors of these (shape, dtype)s."""
    total = 0
    for shape, dtype in specs.values():
        numel = 1
        for d in shape:
            numel *= d
        total += numel * torch.empty((), dtype=dtype).element_size()
    return total


@dataclass
class SlotPlan:
    """The routed slots of one call in the order the reduction reads them.

    gathered: per-slot rows in slot order (n * A + a), reduced by a weighted sum over each token's
    A slots. grouped: slots sorted by expert (stable), reduced by index_add in that order. Slots
    with a zero weight (dynamic skip) are left out of the grouped order when `skip_zero`."""

    gathered: bool
    expert_of: torch.Tensor  # [S'] expert id of each planned slot
    token_of: torch.Tensor  # [S'] token of each planned slot
    weight_of: torch.Tensor  # [S'] routing weight of each planned slot
    shape: tuple[int, int]  # (N, A)
    counts: torch.Tensor | None = None  # grouped: [E] planned slots per expert

    @staticmethod
    def of(ids: torch.Tensor, weights: torch.Tensor, count: int, gathered: bool, skip_zero: bool) -> "SlotPlan":
        """Returns the plan of ids, weights [N, A] over `count` experts."""
        n, top_k = ids.shape
        flat, w = ids.reshape(-1), weights.reshape(-1)
        if gathered:
            tokens = torch.arange(n, device=ids.device).repeat_interleave(top_k)
            return SlotPlan(True, flat, tokens, w, (n, top_k))
        order = torch.argsort(flat, stable=True)
        if skip_zero:
            order = order[w[order] != 0]
        expert_of = flat[order]
        return SlotPlan(False, expert_of, order // top_k, w[order], (n, top_k),
                        torch.bincount(expert_of, minlength=count))

    def runs(self) -> list[tuple[int, int, int]]:
        """Returns (expert, first planned slot, one past its last) for each expert present
        (grouped plans; one host sync)."""
        out, start = [], 0
        for e, c in enumerate(self.counts.tolist()):
            if c:
                out.append((e, start, start + c))
                start += c
        return out

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """Returns the input row of each planned slot, [S', D]."""
        return x[self.token_of]

    def reduce(self, per_slot: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Returns [N, D]: each token's planned slots' outputs (unweighted, [S', D]) weighted and summed."""
        if self.gathered:
            n, top_k = self.shape
            return (per_slot.view(n, top_k, -1) * self.weight_of.view(n, top_k, 1)).sum(dim=1)
        per_slot = per_slot * self.weight_of[:, None].to(per_slot.dtype)
        return torch.zeros_like(x).index_add_(0, self.token_of, per_slot)


class StoredForm:
    """A SwiGLU expert's stored form (abstract): storage, reading, decoding, and compute."""

    name = "abstract"
    gathers = False  # small calls without kernels run as batched per-slot matmuls (`gathered`)
    cpu_fast = True  # its CPU path reads each weight once (fit to compute missed experts on the CPU)
    reads_in_place = False  # its fused kernels take an offsets table (offload misses "mapped")
    why_not_cpu = ""  # when not cpu_fast: why, for the refusal
    why_not_in_place = ""  # when not reads_in_place: why, for the refusal

    def __init__(self, hidden: int, ffn: int):
        self.hidden, self.ffn = hidden, ffn

    # ---- storage -----------------------------------------------------------------------------
    def specs(self, layer: int) -> Specs:
        """Returns {name: (shape, dtype)} of one expert of `layer` as stored."""
        raise NotImplementedError

    def tables(self, layer: int) -> Tensors:
        """Returns the per-layer tensors every expert of `layer` shares (e.g. a code's dictionary)."""
        return {}

    def expert_bytes(self, layer: int) -> int:
        """Returns the stored bytes of one expert of `layer` (tables not included)."""
        return nbytes(self.specs(layer))

    def table_bytes(self) -> int:
        """Returns the bytes of every layer's tables (kept resident beside any placement)."""
        return 0

    def empty(self, count: int, layer: int, device: torch.device | str = "cpu") -> Tensors:
        """Returns uninitialised storage for `count` experts of `layer`: {name: [count, *shape]}."""
        return {name: torch.empty((count, *shape), dtype=dtype, device=device)
                for name, (shape, dtype) in self.specs(layer).items()}

    def read(self, ckpt, family, layer: int, expert: int, out: Tensors) -> None:
        """Fills `out` (one expert's tensors, any device) from the checkpoint, reading only it."""
        raise NotImplementedError

    def read_layer(self, ckpt, family, layer: int, out: Tensors) -> None:
        """Fills stacked `out` {name: [E, ...]} with every expert of `layer`, one at a time."""
        count = next(iter(out.values())).shape[0]
        for e in range(count):
            self.read(ckpt, family, layer, e, {k: v[e] for k, v in out.items()})

    # ---- decoding ------------------------------------------------------------------------------
    def weight(self, kind: str, one: Tensors, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Returns the decoded matrix `kind` [R, K] of one expert's tensors (and the layer's tables)."""
        raise NotImplementedError

    def dequantize(self, stacked: Tensors, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the dense (gate_up [S, 2I, D], down [S, D, I]) of stacked experts."""
        count = self.count(stacked)
        return tuple(torch.stack([self.weight(kind, self.one(stacked, e), dtype) for e in range(count)])
                     for kind in KINDS)  # type: ignore[return-value]

    # ---- compute -------------------------------------------------------------------------------
    def linear(self, kind: str, one: Tensors, x: torch.Tensor) -> torch.Tensor:
        """Returns x [n, K] @ W^T as [n, R] for matrix `kind` of one expert."""
        raise NotImplementedError

    def fused(self, x: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, stacked: Tensors,
              offsets: torch.Tensor | None = None) -> torch.Tensor | None:
        """Returns the kernels' sum_a weights[n,a] * expert_{rows[n,a]}(x[n]) as [N, D] (no host
        sync), or None where this call runs in PyTorch. `offsets` (forms that read in place)
        places each row elsewhere (experts.triton_ops.slot_expert_ffn)."""
        return None

    def apply(self, xs: torch.Tensor, stacked: Tensors, row: int | torch.Tensor) -> torch.Tensor:
        """Returns expert `row` of the stack on its tokens xs [n, D] as [n, D] (unweighted); `row`
        a tensor [n] (gathering forms) runs each token through its own row in one batched matmul."""
        one = self.one(stacked, row)
        gate, up = self.linear("gate_up", one, xs).chunk(2, dim=-1)  # [n, I] each
        return self.linear("down", one, F.silu(gate) * up)

    def plan(self, rows: torch.Tensor, weights: torch.Tensor, count: int, gathered: bool | None = None,
             grad: bool | None = None) -> SlotPlan:
        """Returns how a PyTorch-path call of rows, weights [N, A] over `count` rows is computed and
        reduced (the same plan wherever the experts live, so outputs match); `gathered` forces
        the gathered (True) or grouped (False) path; `grad` (default: grad mode is on) says
        whether autograd runs through the call (then the grouped path, every slot kept)."""
        grad = torch.is_grad_enabled() if grad is None else grad
        if gathered is None:
            gathered = self.gathers and not grad and rows.numel() <= GATHER_MAX_SLOTS
        return SlotPlan.of(rows, weights, count, gathered, skip_zero=not grad)

    def run(self, x: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, stacked: Tensors,
            ids: torch.Tensor | None = None, row_of: dict[int, int] | list[int] | None = None,
            count: int | None = None) -> torch.Tensor:
        """Returns sum_a weights[n,a] * expert_{rows[n,a]}(x[n]) as [N, D] for x [N, D].

        rows [N, A] index the stack. A placement whose stack rows are not expert ids (a cache
        slab) also gives the expert ids [N, A], `row_of` (expert id -> stack row) and `count`
        (experts in the layer): the PyTorch path then plans over the ids, as a resident layer
        does, so the two reduce in the same order."""
        grad = needs_grad(x, weights, stacked)
        if not grad:
            out = self.fused(x, rows, weights, stacked)
            if out is not None:
                return out
        if ids is None:
            return self.run_planned(x, rows, weights, stacked, grad=grad)
        return self.run_planned(x, ids, weights, stacked, row_of, count, grad=grad, rows=rows)

    def run_planned(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, stacked: Tensors,
                    row_of: dict[int, int] | list[int] | None = None, count: int | None = None,
                    gathered: bool | None = None, grad: bool | None = None,
                    rows: torch.Tensor | None = None) -> torch.Tensor:
        """The PyTorch path of `run`: plans over ids [N, A] (`count` ids; default the stack's
        size), runs expert id e from stack row row_of[e] (default e); a gathered plan reads the
        stack rows [N, A] of each slot from `rows` (default: the ids)."""
        count = self.count(stacked) if count is None else count
        grad = needs_grad(x, weights, stacked) if grad is None else grad
        plan = self.plan(ids, weights, count, gathered, grad)
        xs = plan.inputs(x)
        if plan.gathered:  # slots in routing order n * A + a, as rows holds them
            return plan.reduce(self.apply(xs, stacked, (ids if rows is None else rows).reshape(-1)), x)
        per_slot = torch.empty_like(xs)
        for e, lo, hi in plan.runs():
            per_slot[lo:hi] = self.apply(xs[lo:hi], stacked, e if row_of is None else row_of[e])
        return plan.reduce(per_slot, x)

    # ---- helpers -------------------------------------------------------------------------------
    def count(self, stacked: Tensors) -> int:
        """Returns S, the experts in a stack (its per-expert tensors' first dimension)."""
        name = next(iter(self.specs_names()))
        return stacked[name].shape[0]

    def specs_names(self) -> list[str]:
        """Returns the names of the per-expert tensors (the same in every layer)."""
        raise NotImplementedError

    def one(self, stacked: Tensors, row: int | torch.Tensor) -> Tensors:
        """Returns one expert's tensors (views) of a stack, with the layer's tables beside them."""
        per_expert = self.specs_names()
        return {name: (t[row] if name in per_expert else t) for name, t in stacked.items()}


def needs_grad(x: torch.Tensor, weights: torch.Tensor, stacked: Tensors) -> bool:
    """Returns whether autograd runs through a call (grad mode on and some input requires grad):
    training takes the grouped PyTorch path; a call under no_grad, or on frozen buffers (a
    compressed form), may take the kernels."""
    if not torch.is_grad_enabled():
        return False
    return x.requires_grad or weights.requires_grad or any(t.requires_grad for t in stacked.values())


class DenseForm(StoredForm):
    """A SwiGLU expert as plain tensors in `dtype` (bf16, fp16, fp32)."""

    name = "dense"
    gathers = True
    reads_in_place = True

    def __init__(self, hidden: int, ffn: int, dtype: torch.dtype):
        super().__init__(hidden, ffn)
        self.dtype = dtype

    def specs(self, layer=None):
        return {"gate_up": ((2 * self.ffn, self.hidden), self.dtype), "down": ((self.hidden, self.ffn), self.dtype)}

    def specs_names(self):
        return KINDS

    def read(self, ckpt, family, layer, expert, out):
        from ..errors import CheckpointError

        d, ffn = self.hidden, self.ffn
        fused_gate_up, fused_down = family.stacked_expert_names(layer)
        if ckpt.has(fused_gate_up):  # the fused [E, 2I, D] layout some tools write
            for name, shape in ((fused_gate_up, (2 * ffn, d)), (fused_down, (d, ffn))):
                if tuple(ckpt.shape(name)[1:]) != shape:
                    raise CheckpointError(
                        f"{ckpt.file_of(name)}: tensor '{name}' has shape {list(ckpt.shape(name))}, config.json "
                        f"implies [E, {', '.join(map(str, shape))}]; the weights do not match the config")
            out["gate_up"].copy_(ckpt.read_rows(fused_gate_up, expert, expert + 1)[0])
            out["down"].copy_(ckpt.read_rows(fused_down, expert, expert + 1)[0])
            return
        gate, up, down = family.expert_names(layer, expert)
        out["gate_up"][:ffn].copy_(ckpt.read(gate, shape=(ffn, d), dtype=out["gate_up"].dtype))
        out["gate_up"][ffn:].copy_(ckpt.read(up, shape=(ffn, d), dtype=out["gate_up"].dtype))
        out["down"].copy_(ckpt.read(down, shape=(d, ffn), dtype=out["down"].dtype))

    def read_layer(self, ckpt, family, layer, out):
        from ..errors import CheckpointError

        fused_gate_up, fused_down = family.stacked_expert_names(layer)
        count = out["gate_up"].shape[0]
        if ckpt.has(fused_gate_up):
            for name, key in ((fused_gate_up, "gate_up"), (fused_down, "down")):
                if tuple(ckpt.shape(name)) != tuple(out[key].shape):
                    raise CheckpointError(
                        f"{ckpt.file_of(name)}: tensor '{name}' has shape {list(ckpt.shape(name))}, config.json "
                        f"implies {list(out[key].shape)}; the weights do not match the config")
        for e in range(count):
            self.read(ckpt, family, layer, e, {k: v[e] for k, v in out.items()})

    def weight(self, kind, one, dtype=torch.float32):
        return one[kind].to(dtype)

    def linear(self, kind, one, x):
        return F.linear(x, one[kind])

    def apply(self, xs, stacked, row):
        if isinstance(row, torch.Tensor):  # one batched matmul, each token through its own row
            gate, up = torch.bmm(stacked["gate_up"][row], xs[:, :, None]).squeeze(-1).chunk(2, dim=-1)
            return torch.bmm(stacked["down"][row], (F.silu(gate) * up)[:, :, None]).squeeze(-1)
        return super().apply(xs, stacked, row)

    def fused(self, x, rows, weights, stacked, offsets=None, ffn_rows=None, skip=False):
        """`ffn_rows` (r0, r1), reading in place only: those ffn rows of each expert (a partial
        output; the CPU computes the others: offload.cpu, the row split). `skip` (with offsets):
        experts whose offsets are -1 are left out (the CPU computes them: offload.partner)."""
        if skip and (offsets is None or not triton_ops.triton_usable(x)):
            raise ValueError("skip leaves out experts by their offsets in the slot kernels only")
        if ffn_rows is not None and (offsets is None or not triton_ops.triton_usable(x)):
            raise ValueError("ffn_rows slices experts read in place by the slot kernels only")
        if not x.is_cuda and offsets is None:  # the CPU: the native kernel for small calls
            return cpu_expert_ffn(x, rows, weights, stacked["gate_up"], stacked["down"])
        # CUDA tensors, or CPU tensors under the Triton interpreter when reading in place (tests)
        if not triton_ops.triton_usable(x):
            return None
        gate_up, down = stacked["gate_up"], stacked["down"]
        if offsets is not None or rows.numel() <= SLOT_KERNEL_MAX_SLOTS:
            return triton_ops.slot_expert_ffn(x, rows, weights, gate_up, down, offsets=offsets, rows=ffn_rows, skip=skip)
        return triton_ops.grouped_expert_ffn(x, rows, weights, gate_up, down)


def routes_by_row(rows: torch.Tensor, weights: torch.Tensor) -> list[tuple[int, list[int], list[float]]]:
    """Returns (stack row, its tokens, their routing weights) for each row of rows [N, A], rows in
    order of first use in routing order (n * A + a): the native CPU kernels' jobs, in an order two
    placements of the same experts (expert ids or cache slots) share (one host sync)."""
    tokens: dict[int, list[int]] = {}
    scales: dict[int, list[float]] = {}
    top_k = rows.shape[1]
    for slot, (row, w) in enumerate(zip(rows.reshape(-1).tolist(), weights.reshape(-1).float().tolist())):
        tokens.setdefault(row, []).append(slot // top_k)
        scales.setdefault(row, []).append(w)
    return [(row, tokens[row], scales[row]) for row in tokens]


def cpu_expert_ffn(x: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                   down: torch.Tensor) -> torch.Tensor | None:
    """Returns a small CPU call of dense experts run by the native kernel (moekit.native.experts:
    one parallel region per call, each weight row read once; jobs from `routes_by_row`), or None
    where it does not apply (more than native.experts.kernel_tokens tokens: PyTorch's GEMMs win; no
    compiler; other dtypes). Past MAX_JOB_TOKENS tokens (bf16 on a CPU without bf16 hardware) in
    pieces of that many tokens."""
    from ..native.experts import MAX_JOB_TOKENS, SMALL_BATCH_TOKENS, expert_ffn_stacked, kernel_tokens, usable

    n, limit = x.shape[0], kernel_tokens(gate_up.dtype)
    if ((n > limit and limit != MAX_JOB_TOKENS) or gate_up.dim() != 3 or down.dim() != 3 or not usable(x, gate_up.dtype)
            or gate_up.stride()[1:] != (gate_up.shape[2], 1) or down.stride()[1:] != (down.shape[2], 1)):
        return None  # an expert's matrices not contiguous (a strided view): PyTorch's path
    if n > SMALL_BATCH_TOKENS and rows.shape[-1] > 1:  # a row twice in a token's routes: a job could pass 256
        ordered = rows.sort(dim=-1).values
        if bool((ordered[..., 1:] == ordered[..., :-1]).any()):
            return None
    # pointers from the stacks' strides: no tensor view per expert; past MAX_JOB_TOKENS in pieces
    if n <= MAX_JOB_TOKENS:
        return expert_ffn_stacked(x, gate_up, down, routes_by_row(rows, weights))
    return torch.cat([expert_ffn_stacked(x[i:i + MAX_JOB_TOKENS], gate_up, down,
                                         routes_by_row(rows[i:i + MAX_JOB_TOKENS], weights[i:i + MAX_JOB_TOKENS]))
                      for i in range(0, n, MAX_JOB_TOKENS)])
