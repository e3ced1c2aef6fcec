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

The forms (IntForm, TernaryCodeForm) are experts.forms.StoredForm's: they are the only code that
multiplies a compressed expert, wherever it lives (resident here in CompressedExperts, in the
offload cache and host store, on the CPU). Their fused path, up to SLOT_KERNEL_MAX_SLOTS routed
slots (N * A; batch-1 decode) where the kernels run, is `slot_ffn`: one launch for every slot's
gate_up + SwiGLU, and one for the down matrices that weights each slot and sums each token's A
slots in float32 (no torch reduce after it); expert ids stay on the device (no host sync: a
decode step can be captured whole in a CUDA graph). Otherwise the grouped path: slots sorted by expert (one host sync), one gate_up and
one down call per routed expert.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import CheckpointError, MoekitError
from ..experts.forms import (KINDS, SLOT_KERNEL_MAX_SLOTS, Specs, StoredForm, Tensors, experts_prefix,
                             routes_by_row)
from . import ops
from .code import ROW_BLOCK
from .config import INT, TERNARY_CODE, QuantConfig


class CompressedForm(StoredForm):
    """A compressed stored form (abstract): named per-kind tensors plus per-layer tables, their
    shapes per layer (a ternary code's chunk capacity differs between layers)."""

    STORED: tuple[str, ...] = ()  # per-kind tensor suffixes
    ROW_TENSORS: tuple[str, ...] = ()  # the suffixes whose shape is [E, R, ...] (one entry per row)
    SHARED: tuple[str, ...] = ()  # per-layer tensors (tables)
    bits: int | None = None  # code width of the int form (None: the ternary code)
    NATIVE_FORM = 0  # the layout the native CPU decode step reads (native.compressed.NATIVE_*); 0: none
    why_not_in_place = "its kernels read cache slots, not host memory in place"

    @property
    def cpu_fast(self) -> bool:
        """Whether the native CPU kernels (moekit.native.compressed: decoded in the matvec, each
        packed byte read once) run here; without them the CPU path decodes each whole matrix per
        call, slower than copying the compressed expert to the device."""
        from ..native import library

        return library() is not None

    @property
    def why_not_cpu(self) -> str:
        from ..native import unavailable_reason

        return "" if self.cpu_fast else (f"its CPU kernels are unavailable ({unavailable_reason()}), and its "
                                         "PyTorch path decodes each whole matrix per call")

    def __init__(self, hidden: int, ffn: int, layer_specs: dict[int, Specs], layer_tables: dict[int, Tensors]):
        """`layer_specs` {layer: {name: (one expert's shape, dtype)}}; `layer_tables` {layer: {name: tensor}}."""
        super().__init__(hidden, ffn)
        self.layer_specs, self.layer_tables = layer_specs, layer_tables
        self.per_expert_names = tuple(f"{kind}.{s}" for kind in KINDS for s in self.STORED)

    @classmethod
    def tensor_names(cls) -> list[str]:
        """Returns the stored tensors' names relative to the experts prefix (tables last)."""
        return [f"{kind}.{s}" for kind in KINDS for s in cls.STORED] + list(cls.SHARED)

    @classmethod
    def row_dims(cls, rows: int) -> dict[str, int]:
        """Returns {suffix: size of dimension 1} that a matrix of `rows` rows fixes (the other
        stored tensors' sizes depend on the weights)."""
        return {s: rows for s in cls.ROW_TENSORS}

    def specs_names(self):
        return self.per_expert_names

    def specs(self, layer):
        return self.layer_specs[layer]

    def tables(self, layer):
        return self.layer_tables[layer]

    def table_bytes(self):
        return sum(t.numel() * t.element_size() for tables in self.layer_tables.values() for t in tables.values())

    def cols(self, kind: str) -> int:
        return self.hidden if kind == "gate_up" else self.ffn

    def read(self, ckpt, family, layer, expert, out):
        prefix = experts_prefix(family, layer)
        for name in self.specs_names():
            out[name].copy_(ckpt.read_rows(f"{prefix}.{name}", expert, expert + 1)[0])

    def read_layer(self, ckpt, family, layer, out):
        prefix = experts_prefix(family, layer)
        for name in self.specs_names():
            out[name].copy_(ckpt.read(f"{prefix}.{name}"))

    def fused(self, x, rows, weights, stacked, offsets=None):
        if offsets is None and not x.is_cuda and not ops.use_kernels(x):  # the CPU: native kernels, small calls
            return self.cpu_ffn(x, rows, weights, stacked)
        if offsets is not None or rows.numel() > SLOT_KERNEL_MAX_SLOTS or not ops.use_kernels(x):
            return None
        return slot_ffn(stacked, self.bits, x, rows, weights)

    def native_ffn(self, x: torch.Tensor, jobs: list[tuple[Tensors, list[int], list[float]]],
                   out: torch.Tensor | None = None, threads: int | None = None, scratch=None, start: bool = False):
        """Returns out [N, D]: sum over jobs (one expert's tensors with the layer's tables, as `one`
        gives them; its tokens; their weights) of weight * expert(x[token]), by one call of the
        native CPU kernel (moekit.native.compressed); with `start`, the call's Started (on the
        runner thread: its wait() returns out). Raises ValueError where it cannot run."""
        raise NotImplementedError

    def native_parts(self, one: Tensors) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """Returns (gate_up parts, down parts) of one expert (`one`, as `one` gives it) in the order
        the native kernels take them (moekit.native.compressed: a job's parts)."""
        raise NotImplementedError

    def host_table(self, layer: int) -> torch.Tensor | None:
        """Returns a CPU copy of `layer`'s code table for the native kernels (None: the form has
        none). The tables live on the device beside the cache (offload.layout); the copy is made
        once, here, not by a call inside a captured step, which a copy from the device would wait on."""
        return None

    def cpu_ffn(self, x: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor,
                stacked: Tensors) -> torch.Tensor | None:
        """Returns a CPU call run by the native kernel, or None where it does not apply (no compiler).
        Jobs come from experts.forms.routes_by_row, as for dense experts; past
        MAX_JOB_TOKENS tokens in pieces of that many (each piece reads its experts once, the kernel's
        per-row buffers stay bounded), of MAX_JOB_TOKENS // A where a row comes twice in a token's A
        routes (a job then holds up to A slots a token); None where a routed expert's tensors are not
        contiguous. Why at every size, where dense experts hand big
        calls to PyTorch's GEMMs: this form's PyTorch path decodes each expert's matrices to floats first
        (unpack, dequantize: ~16 ms a 2048 x 2048 int4 matrix on the 2-core VM), and a 64-token CPU
        prefill of the OLMoE-4-layer int4 copy took 6-11 s that way (10.4 and 5.8 tok/s in two runs)."""
        from ..native.compressed import usable
        from ..native.experts import MAX_JOB_TOKENS

        n, top_k = rows.shape
        if not usable(x):
            return None
        piece = MAX_JOB_TOKENS
        if n > MAX_JOB_TOKENS // top_k and top_k > 1:
            ordered = rows.sort(dim=-1).values
            if bool((ordered[..., 1:] == ordered[..., :-1]).any()):
                piece = MAX_JOB_TOKENS // top_k
        parts = [slice(i, i + piece) for i in range(0, n, piece)]
        jobs = [[(self.one(stacked, row), tokens, scales) for row, tokens, scales in routes_by_row(rows[p], weights[p])]
                for p in parts]
        if any(not t.is_contiguous() for piece_jobs in jobs for one, _, _ in piece_jobs for t in one.values()):
            return None  # (before any piece runs)
        out = [self.native_ffn(x[p], piece_jobs) for p, piece_jobs in zip(parts, jobs)]
        return out[0] if len(out) == 1 else torch.cat(out)


class IntForm(CompressedForm):
    """Experts as packed 2/3/4-bit affine codes with a float16 scale and uint8 zero per group."""

    STORED = ROW_TENSORS = ("qweight", "scale", "zero")
    NATIVE_FORM = 1  # native.compressed.NATIVE_INT: the native decode step reads this layout

    def __init__(self, hidden, ffn, layer_specs, layer_tables, bits: int):
        super().__init__(hidden, ffn, layer_specs, layer_tables)
        self.bits = bits
        self.name = f"int{bits}"

    def _parts(self, kind: str, one: Tensors):
        return one[f"{kind}.qweight"], one[f"{kind}.scale"], one[f"{kind}.zero"]

    def linear(self, kind, one, x):
        return ops.int_linear(x, *self._parts(kind, one), self.bits)

    def weight(self, kind, one, dtype=torch.float32):
        return ops.int_weight(*self._parts(kind, one), self.bits, self.cols(kind), dtype)

    def native_parts(self, one):
        return self._parts("gate_up", one), self._parts("down", one)

    def native_ffn(self, x, jobs, out=None, threads=None, scratch=None, start=False):
        from ..native.compressed import int_ffn

        return int_ffn(x, [(*self.native_parts(one), t, w) for one, t, w in jobs],
                       self.bits, out=out, threads=threads, scratch=scratch, start=start)


class TernaryCodeForm(CompressedForm):
    """Ternary experts in the sub-1-bit dictionary code, decoded inside the matmul."""

    name = TERNARY_CODE
    NATIVE_FORM = 2  # native.compressed.NATIVE_CODE
    STORED = ("codewords", "starts", "row_chunks", "block_offsets", "lo", "hi")
    ROW_TENSORS = ("row_chunks", "lo", "hi")
    SHARED = ("code_table",)

    @classmethod
    def row_dims(cls, rows):
        return {**super().row_dims(rows), "block_offsets": -(-rows // ROW_BLOCK)}

    def _parts(self, kind: str, one: Tensors):
        return tuple(one[f"{kind}.{s}"] for s in self.STORED) + (one["code_table"],)

    def linear(self, kind, one, x):
        return ops.code_linear(x, *self._parts(kind, one))

    def weight(self, kind, one, dtype=torch.float32):
        return ops.code_weight(*self._parts(kind, one), self.cols(kind), dtype)

    def __init__(self, hidden, ffn, layer_specs, layer_tables):
        super().__init__(hidden, ffn, layer_specs, layer_tables)
        self._host_tables: dict[int, torch.Tensor] = {}  # layer -> its table's CPU copy (host_table)

    def native_parts(self, one):
        return self._parts("gate_up", one)[:-1], self._parts("down", one)[:-1]

    def host_table(self, layer):
        table = self.layer_tables[layer]["code_table"]
        if table.device.type == "cpu":
            return table
        if layer not in self._host_tables:
            self._host_tables[layer] = table.cpu()
        return self._host_tables[layer]

    def _cpu_table(self, table: torch.Tensor) -> torch.Tensor:
        """Returns the CPU copy of a layer's table (given as `one` holds it: the device's copy when
        offloaded to a GPU; the native kernels read host memory)."""
        if table.device.type == "cpu":
            return table
        for layer, tables in self.layer_tables.items():
            if tables["code_table"] is table:
                return self.host_table(layer)
        return table.cpu()  # a table this form does not hold (never from the offload runtime)

    def native_ffn(self, x, jobs, out=None, threads=None, scratch=None, start=False):
        from ..native.compressed import code_ffn

        if not jobs:
            return code_ffn(x, [], torch.empty(0, 2, dtype=torch.int32), out=out, start=start)
        return code_ffn(x, [(*self.native_parts(one), t, w) for one, t, w in jobs],
                        self._cpu_table(jobs[0][0]["code_table"]), out=out, threads=threads, scratch=scratch,
                        start=start)


def form_class(form: str) -> type[CompressedForm]:
    """Returns the stored form class of a form name (quant.config INT / TERNARY_CODE)."""
    return {INT: IntForm, TERNARY_CODE: TernaryCodeForm}[form]


def compressed_form(form: str, bits: str, hidden: int, ffn: int, layer_specs: dict[int, Specs],
                    layer_tables: dict[int, Tensors]) -> CompressedForm:
    """Returns stored form `form` (quant.config INT, with `bits`, or TERNARY_CODE) over these
    per-layer shapes and tables."""
    if form == INT:
        return IntForm(hidden, ffn, layer_specs, layer_tables, int(bits))
    return TernaryCodeForm(hidden, ffn, layer_specs, layer_tables)


def form_from_checkpoint(quant: QuantConfig, cfg, ckpt, family, device: torch.device | str) -> CompressedForm:
    """Returns the stored form of a compressed checkpoint's experts, laid out from its headers
    (reading only the tables, onto `device`); raises CheckpointError naming the tensor when one
    is missing or contradicts config.json."""
    try:
        quant.check_shapes(cfg.hidden_size, cfg.expert_ffn)  # the int form assumes equal groups
    except MoekitError as e:
        raise CheckpointError(f"{ckpt.path}: quantization_config cannot be read with this model: {e}") from None
    cls = form_class(quant.form)
    specs, tables = {}, {}
    for layer in (i for i, moe in enumerate(cfg.moe_layers) if moe):
        prefix = experts_prefix(family, layer)
        for name in cls.tensor_names():
            if not ckpt.has(f"{prefix}.{name}"):
                raise CheckpointError(f"{ckpt.path}: tensor '{prefix}.{name}' not found; config.json says the "
                                      f"experts are stored as '{quant.form}'. The checkpoint is incomplete")
        layer_specs = {}
        for name in [f"{kind}.{s}" for kind in KINDS for s in cls.STORED]:
            full = f"{prefix}.{name}"
            shape = tuple(ckpt.shape(full))
            layer_specs[name] = (shape[1:], ckpt.dtype(full))
            kind, suffix = name.split(".")
            rows = 2 * cfg.expert_ffn if kind == "gate_up" else cfg.hidden_size
            want = (cfg.experts_in(layer), *((cls.row_dims(rows)[suffix],) if suffix in cls.row_dims(rows) else ()))
            if shape[:len(want)] != want:
                raise CheckpointError(f"{ckpt.path}: tensor '{full}' has shape {list(shape)}, config.json implies "
                                      f"[{', '.join(map(str, want))}, ...]; the weights do not match the config")
        specs[layer] = layer_specs
        tables[layer] = {n: ckpt.read(f"{prefix}.{n}").to(device) for n in cls.SHARED}
    return compressed_form(quant.form, quant.bits, cfg.hidden_size, cfg.expert_ffn, specs, tables)


def form_from_tensors(quant: QuantConfig, cfg, layers: dict[int, Tensors], device: torch.device | str) -> CompressedForm:
    """Returns the stored form of experts given as stored tensors {layer: {name: [E, ...]}} (tables
    included, moved to `device`)."""
    cls = form_class(quant.form)
    specs, tables = {}, {}
    for layer, given in layers.items():
        missing = [n for n in cls.tensor_names() if n not in given]
        if missing:
            raise CheckpointError(f"layer {layer}: stored tensors {missing} of form '{quant.form}' not given")
        specs[layer] = {n: (tuple(given[n].shape[1:]), given[n].dtype) for n in cls.tensor_names() if n not in cls.SHARED}
        _check_rows(cls, specs[layer], cfg, f"layer {layer}")
        tables[layer] = {n: given[n].to(device) for n in cls.SHARED}
    return compressed_form(quant.form, quant.bits, cfg.hidden_size, cfg.expert_ffn, specs, tables)


def _check_rows(cls: type[CompressedForm], specs: Specs, cfg, where: str) -> None:
    for kind, rows in (("gate_up", 2 * cfg.expert_ffn), ("down", cfg.hidden_size)):
        for suffix, size in cls.row_dims(rows).items():
            shape = specs[f"{kind}.{suffix}"][0]
            if shape[0] != size:
                raise CheckpointError(f"{where}: stored tensor '{kind}.{suffix}' has {shape[0]} rows per expert, "
                                      f"config.json implies {size}; the weights do not match the config")


class CompressedExperts(nn.Module):
    """One MoE layer's experts resident on the device in a compressed stored form (buffers; the
    form multiplies)."""

    def __init__(self, form: CompressedForm, layer: int, num_experts: int, tensors: Tensors):
        """`tensors` {name relative to the experts prefix: [E, ...]} (tables included)."""
        super().__init__()
        self.form, self.layer = form, layer
        self.num_experts, self.hidden, self.ffn = num_experts, form.hidden, form.ffn
        self.bits = form.bits
        for name in form.tensor_names():
            self.register_buffer(name.replace(".", "_"), tensors[name])

    def stored(self) -> Tensors:
        """Returns {name relative to the experts prefix: tensor} as stored (tables included)."""
        return {name: getattr(self, name.replace(".", "_")) for name in self.form.tensor_names()}

    def expert_bytes(self) -> int:
        """Returns the stored bytes of one expert (the layer's tables spread over its experts)."""
        total = sum(t.numel() * t.element_size() for t in self.stored().values())
        return total // self.num_experts

    def linear(self, kind: str, expert: int, x: torch.Tensor) -> torch.Tensor:
        """Returns x [n, K] @ W^T [n, R] for matrix `kind` of `expert`."""
        return self.form.linear(kind, self.form.one(self.stored(), expert), x)

    def weight(self, kind: str, expert: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Returns the decoded matrix [R, K] of `kind` of `expert` (a transient copy)."""
        return self.form.weight(kind, self.form.one(self.stored(), expert), dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the dense (gate_up [E, 2I, D], down [E, D, I]) the stored form stands for."""
        return self.form.dequantize(self.stored(), dtype)

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Returns sum_a weights[n,a] * expert_{ids[n,a]}(x[n]) as [N, D] for x [N, D]."""
        return self.form.run(x, expert_ids, weights, self.stored())

    def extra_repr(self) -> str:
        return f"layer={self.layer}, experts={self.num_experts}, form={self.form.name}"


# The down launches that sum each token's top-k slots themselves (ops.int_slot_down / code_slot_down) are
# tested under the interpreter and built for sm_90, but have not run on a GPU and their tiles are untuned
# (they give each program A slots' work): slot_ffn takes them once one H200 run of
# `benchmarks/tune_quant_kernels.py --slots` has timed them against the per-slot down + torch sum below.
SLOT_DOWN_SUM = False


def slot_ffn(stored: Tensors, bits: int | None, x: torch.Tensor, expert_ids: torch.Tensor,
             weights: torch.Tensor) -> torch.Tensor:
    """Returns sum_a weights[n,a] * expert_{ids[n,a]}(x[n]) as [N, D] through the per-slot kernels
    (no host sync; the PyTorch references where the kernels do not run): gate_up, then with
    SLOT_DOWN_SUM one down launch summing each token's slots in float32 in the order a = 0..A-1,
    else the per-slot down (weighted [S, D]) and a torch sum.

    stored: {name relative to the experts prefix: [E, ...]} as CompressedExperts.stored() gives
    (E may be a cache slab's slots seen in one layer's layout), int form when bits is given;
    x [N, D]; expert_ids, weights [N, A] (ids index stored's first dimension)."""
    n, top_k = expert_ids.shape
    ids, w = expert_ids.reshape(-1), weights.reshape(-1)  # [S]
    if bits is not None:
        gate_up, down = (tuple(stored[f"{kind}.{s}"] for s in IntForm.STORED) for kind in KINDS)
        h = ops.int_slot_linear(x, ids, *gate_up, bits, top_k, None, True)  # [S, I] silu(gate) * up
        if SLOT_DOWN_SUM:
            return ops.int_slot_down(h, ids, *down, bits, top_k, w)  # [N, D]
        y = ops.int_slot_linear(h, ids, *down, bits, 1, w, False)  # [S, D] weighted
    else:
        gate_up, down = (tuple(stored[f"{kind}.{s}"] for s in TernaryCodeForm.STORED) + (stored["code_table"],)
                         for kind in KINDS)
        h = ops.code_slot_linear(x, ids, *gate_up, top_k, None, True)
        if SLOT_DOWN_SUM:
            return ops.code_slot_down(h, ids, *down, top_k, w)
        y = ops.code_slot_linear(h, ids, *down, 1, w, False)
    return y.view(n, top_k, -1).sum(dim=1)


def build_experts(form: str, num_experts: int, hidden: int, ffn: int, tensors: Tensors,
                  bits: str, layer: int = 0) -> CompressedExperts:
    """Returns resident CompressedExperts of stored form `form` over `tensors` (named as in
    tensor_names, tables included) for layer `layer`."""
    cls = form_class(form)
    specs = {n: (tuple(tensors[n].shape[1:]), tensors[n].dtype) for n in cls.tensor_names() if n not in cls.SHARED}
    tables = {n: tensors[n] for n in cls.SHARED}
    return CompressedExperts(compressed_form(form, bits, hidden, ffn, {layer: specs}, {layer: tables}), layer,
                             num_experts, tensors)
