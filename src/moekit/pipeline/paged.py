"""Paged experts (CGOPipe's weight paging): R_l experts of MoE layer l stay on the device (the same
count in every layer, or counts that differ by layer: the HRM spreads a total over the layers); the
other E - R_l of each layer live in a host store and are streamed into one of two device buffers
(double buffering: layer i computes from one while layer i + 1 fills the other), in pages.

The pipelined engine (moekit.pipeline.cgopipe) sends the pages of the next MoE layer in step with
the attention outputs of this one (`load_page`), on the runtime's own weight stream: a page waits
only for the last expert call of the layer whose buffer it overwrites (an event `run` records),
never for the compute queued after it, and a layer's first expert call waits (on the device) for
all of its pages. Any other engine (moekit.generate: prefill, plain decode) just calls the layer:
a layer whose pages are not all there is loaded whole first, so the model runs anywhere,
token-equal to its resident self.

Where experts lie: one device slab of slots (offload.layout), laid out as [R_l resident slots of
each MoE layer l | buffer 0 | buffer 1], each buffer max_l(E - R_l) slots (the layer that streams
the most); a layer's resident experts are its first R_l ids, the rest stream. A layer's `rows` table maps expert
id -> slot for the buffer that holds it, and the form runs the slab like an offload cache slab
(ids, row_of, count: the same reduction as a resident layer).

What a page holds is the stored form as stored, never a decoded copy (DESIGN: paging moves the
stored form): dense experts (TensorLayout) page their bf16/fp32 gate_up and down; int-N and the
ternary code (PackedLayout) page each expert's stored tensors laid end to end as bytes -- packed
codes, scales and zeros (int), codewords, chunk starts, row tables and levels (ternary code) --
exactly as the offload cache holds them; a code's dictionary (code_table, 2^bits x 8 bytes per
layer) is the form's table, resident on the device beside the slab, never paged. The layer's
expert call then views its slots in the form's layout (layout.view) and computes from them in
place: `form.run` (for compressed forms the per-slot decode-in-matmul kernels for <=
SLOT_KERNEL_MAX_SLOTS routed slots; on the CPU the native kernels or the PyTorch references) --
except a compressed form past the per-slot kernels where the kernels run (`decode_layers`): the
layer's experts are decoded once, in two launches a matrix kind (its resident slots, its buffer
slots), into a dense workspace [E, 2I, D] + [E, D, I] in the activations' dtype, and every
micro-batch of the layer runs the grouped dense kernels (experts.triton_ops) on the router's
expert ids: no host sync (the per-expert path sorts slots on the host) and one decode a layer
rather than one per routed expert per micro-batch; the slab stays compressed. gpt-oss's experts
(biases and the clamped SwiGLU around bf16, MXFP4, int-N or ternary-code matrices: experts.clamped)
page the same way, each expert's stored tensors and biases as one packed row, and always run
through their form's own calls (bf16 and MXFP4: the clamped slot kernels on a GPU; int-N and the
ternary code with biases: per expert, no fused kernel yet), never the grouped SwiGLU ones.

A page is an equal share of the bytes of each stored tensor's streamed part (as the artifact's
byte ranges: every page costs the same PCIe time, so no page holds a hidden-state load behind a
whole expert). A packed layer narrower than the slots (a ternary code's chunk capacity differs
between layers; slots fit the largest) copies its byte range row by row into the slots' first
bytes; a store that is not contiguous is paged in expert-aligned ranges (`page_range`).

Shapes: E experts of a layer, R_l resident in layer l, S slots, N tokens, A experts per token, D hidden.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..errors import MoekitError
from ..experts.forms import (
    KINDS,
    SLOT_KERNEL_MAX_SLOTS,
    DenseForm,
    StoredForm,
    Tensors,
    needs_grad,
)
from ..experts.loader import ExpertLoader, LoadContext
from .costs import WHOLE_LAYER_FORMS
from .pages import bits_per_weight, copy_range, decode_into, range_views  # noqa: F401 (copy_range: re-exported)

PAGE_ALIGN_BYTES = 4096  # a page boundary is a multiple of this many bytes (whole pages of the DMA)
PAGED_FORMS = ("dense", *WHOLE_LAYER_FORMS)  # stored forms the pages carry (forms' names), gpt-oss's wrapped ones too


class PagedRuntime:
    """The device slab, the host store and the page state every PagedExperts layer shares."""

    compilable = False
    prefill_chunk = None

    def __init__(self, layout, stores: dict[int, Tensors], resident, device: torch.device):
        """`resident`: experts each MoE layer keeps on the device -- one count for every layer, or
        a sequence of counts, one per MoE layer in layer order (resident_counts)."""
        self.layout, self.stores, self.device = layout, stores, torch.device(device)
        self.layers = sorted(stores)
        self.experts = {layer: next(iter(t.values())).shape[0] for layer, t in stores.items()}
        self.resident_of = resident_counts(resident, [self.experts[m] for m in self.layers], self.layers)
        counts = tuple(self.resident_of[m] for m in self.layers)
        self.resident = counts[0] if len(set(counts)) == 1 else counts  # as given: one count, or one a layer
        self.resident_start, start = {}, 0  # layer -> its first resident slot
        for m in self.layers:
            self.resident_start[m], start = start, start + self.resident_of[m]
        self.streamed = max(self.experts[m] - self.resident_of[m] for m in self.layers)  # slots of one buffer
        self.slab = layout.empty(max(start + 2 * self.streamed, 1), self.device)
        self.buffer_start = [start, start + self.streamed]
        self.cuda = self.device.type == "cuda"
        # the weight stream: expert pages only, so a page never waits behind (or holds up) activations
        self.h2d = torch.cuda.Stream(self.device) if self.cuda else None
        self.half_of: dict[int, int] = {}  # layer -> buffer holding (or filling with) its streamed experts
        self.pages_done: dict[int, set[int]] = {}  # layer -> pages copied into its buffer
        self.pages_of: dict[int, int] = {}  # layer -> pages its streamed experts were cut into
        self.ready: dict[int, torch.cuda.Event] = {}  # layer -> event after its last page (CUDA)
        self.read_done: dict[int, torch.cuda.Event] = {}  # layer -> event after its last queued expert call (CUDA)
        self.gates: dict[int, tuple[int, ...]] = {}  # layer -> layers whose last expert call its first page waits for
        self.trace: list | None = None  # when a list: ("page", (layer, page), waits) per page issued (schedule tests)
        self.copy_timing = False  # CUDA: record timing events around each layer's pages (copy_spans)
        self.copy_spans: list[tuple[int, torch.cuda.Event, torch.cuda.Event]] = []  # (layer, first page start, last page end)
        # with copy_timing: (layer, start, end) events around each expert call on the compute stream
        # (the experts' own GPU time, pages' waits left out: the start is recorded after them)
        self.expert_spans: list[tuple[int, torch.cuda.Event, torch.cuda.Event]] = []
        self._span_start: dict[int, torch.cuda.Event] = {}
        self.next_half = 0
        self._page_views: dict[tuple[int, int, int, int], list] = {}  # (layer, page, pages, half) -> views to copy
        # compressed forms past the per-slot kernels, where the kernels run: the layer's experts decoded
        # once into a dense workspace, every micro-batch of the layer through the grouped dense kernels
        # (no host sync; the per-expert path sorts slots on the host). False: the per-expert path.
        self.decode_layers = True
        self._workspace: Tensors | None = None  # {"gate_up": [E, 2I, D], "down": [E, D, I]} in the activations' dtype
        self._decoded: tuple | None = None  # (layer, half, dtype) the workspace holds, until its pages reload
        self._external: int | None = None  # inside external_call: the buffer half its calls compute from
        self.layer_decodes = 0  # layers decoded into the workspace (statistics, tests)
        self.pages_loaded = 0  # pages copied, all layers (statistics, tests)
        self.whole_loads = 0  # layers loaded whole at their call (not ahead, page by page)
        for layer in self.layers:  # the resident experts, once
            self._copy(layer, 0, self.resident_of[layer], self.resident_start[layer], non_blocking=False)
        self._rows = {(layer, h): self._row_table(layer, h) for layer in self.layers for h in (0, 1)}
        # the same tables on the device: indexing them with the router's ids needs no host copy (a
        # per-call torch.tensor(..., device=cuda) is a blocking copy that stalls the launch thread)
        self._rows_device = {key: torch.tensor(rows, device=self.device) for key, rows in self._rows.items()}

    # ---- placement -----------------------------------------------------------------------------
    def _row_table(self, layer: int, half: int) -> list[int]:
        base, kept = self.resident_start[layer], self.resident_of[layer]
        return [base + e if e < kept else self.buffer_start[half] + e - kept for e in range(self.experts[layer])]

    def _copy(self, layer: int, lo: int, hi: int, slot: int, non_blocking: bool) -> None:
        """Copies experts lo..hi-1 of `layer` from the host store into slots slot.. of the slab."""
        for dst, src in self._expert_views(layer, lo, hi, slot):
            dst.copy_(src, non_blocking=non_blocking)

    def _expert_views(self, layer: int, lo: int, hi: int, slot: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Returns (slab view, store view) pairs of experts lo..hi-1 of `layer` and slots slot..."""
        if hi <= lo:
            return []
        views = []
        for name, src in self.stores[layer].items():
            dst = self.slab[name][slot:slot + hi - lo]
            if dst.shape[1:] != src.shape[1:]:  # packed slots sized for the largest layer
                dst = dst[:, :src.shape[1]]
            views.append((dst, src[lo:hi]))
        return views

    def page_range(self, layer: int, page: int, pages: int) -> tuple[int, int]:
        """Returns the streamed experts [lo, hi) of page `page` of `pages` of a layer."""
        per = -(-(self.experts[layer] - self.resident_of[layer]) // pages)
        lo = self.resident_of[layer] + page * per
        return lo, min(self.experts[layer], lo + per)

    def next_layer(self, layer: int) -> int:
        """Returns the MoE layer after `layer` (the first one after the last: the next step's)."""
        later = [m for m in self.layers if m > layer]
        return later[0] if later else self.layers[0]

    def streamed_bytes(self, layer: int) -> int:
        """Returns the bytes of the layer's streamed experts (what its pages carry)."""
        return (self.experts[layer] - self.resident_of[layer]) * sum(t[0].numel() * t.element_size()
                                                           for t in self.stores[layer].values())

    def flat_pages(self, layer: int) -> bool:
        """Returns whether the layer's pages are byte ranges (its stores contiguous), else
        expert-aligned ranges."""
        return all(src.is_contiguous() and self.slab[name].is_contiguous() for name, src in self.stores[layer].items())

    def _copy_page(self, layer: int, page: int, pages: int, half: int, non_blocking: bool) -> None:
        """Copies page `page` of `pages` of the layer's streamed experts into buffer `half`."""
        key = (layer, page, pages, half)
        views = self._page_views.get(key)
        if views is None:  # worked out once: a decode step issues every page of every layer
            views = self._page_views[key] = self._page_plan(layer, page, pages, half)
        for dst, src in views:
            dst.copy_(src, non_blocking=non_blocking)

    def _page_plan(self, layer: int, page: int, pages: int, half: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Returns the (slab view, store view) pairs page `page` of `pages` of the layer's
        streamed experts copies into buffer `half`."""
        kept = self.resident_of[layer]
        streamed = self.experts[layer] - kept
        base = self.buffer_start[half]
        if not self.flat_pages(layer):
            lo, hi = self.page_range(layer, page, pages)
            return self._expert_views(layer, lo, hi, base + lo - kept)
        views = []
        for name, src in self.stores[layer].items():
            width = src[0].numel()  # elements of one expert in the store
            total = streamed * width
            align = max(1, PAGE_ALIGN_BYTES // src.element_size())
            a = total * page // pages // align * align
            b = total if page == pages - 1 else total * (page + 1) // pages // align * align
            if b > a:
                views += range_views(self.slab[name][base:base + streamed], src[kept:], a, b)
        return views

    def load_page(self, layer: int, page: int, pages: int, stream=None) -> None:
        """Copies page `page` of `pages` of the layer's streamed experts into its buffer (the first
        page claims the buffer the layer before last used). On CUDA it is queued on `stream`
        (default: the runtime's weight stream) behind the last expert call of the layer whose
        buffer it takes -- not behind the compute queued since -- and the last page records the
        event the layer's expert calls wait for."""
        if self.loaded(layer) or page in self.pages_done.get(layer, set()):
            return
        if layer not in self.half_of:
            # the buffer the MoE layer before this one does not use: that layer computes while this
            # one loads; the other buffer's layer is done
            before = self.layers[self.layers.index(layer) - 1]
            half = 1 - self.half_of[before] if before in self.half_of and before != layer else self.next_half
            self.next_half = 1 - half
            evicted = [m for m, h in self.half_of.items() if h == half]
            for other in evicted:
                del self.half_of[other]
                self.pages_done.pop(other, None)
            # the buffer's readers: the evicted layer's last expert call (and this layer's own, when
            # it was cut short and takes its old buffer again)
            self.gates[layer] = tuple(dict.fromkeys([*evicted, layer]))
            self.half_of[layer], self.pages_of[layer], self.pages_done[layer] = half, pages, set()
        elif self.pages_of[layer] != pages:  # cut again (another micro-batch count), same buffer
            self.pages_of[layer], self.pages_done[layer] = pages, set()
        half = self.half_of[layer]
        first, last = not self.pages_done[layer], len(self.pages_done[layer]) + 1 == pages
        if first and self._decoded is not None and self._decoded[0] == layer:
            self._decoded = None  # its buffer is refilled: the workspace no longer holds it
        waits = self.gates.get(layer, ()) if first else ()
        if self.trace is not None:
            self.trace.append(("page", (layer, page), tuple(("read", m) for m in waits)))
        if self.cuda:
            stream = stream or self.h2d
            with torch.cuda.stream(stream):
                for m in waits:
                    if m in self.read_done:
                        stream.wait_event(self.read_done[m])
                if first and self.copy_timing:
                    self._span_start[layer] = torch.cuda.Event(enable_timing=True)
                    self._span_start[layer].record()
                self._copy_page(layer, page, pages, half, non_blocking=True)
                if last:
                    event = torch.cuda.Event(enable_timing=self.copy_timing and layer in self._span_start)
                    event.record()
                    self.ready[layer] = event
                    if self.copy_timing and layer in self._span_start:
                        self.copy_spans.append((layer, self._span_start.pop(layer), event))
        else:
            self._copy_page(layer, page, pages, half, non_blocking=False)
        self.pages_done[layer].add(page)
        self.pages_loaded += 1

    def prefetch(self, layer: int, pages: int = 1) -> None:
        """Queues every page of the layer not yet queued (nothing when it is loaded)."""
        for page in range(pages):
            self.load_page(layer, page, pages)

    def loaded(self, layer: int) -> bool:
        """Returns whether every page of the layer's streamed experts is in its buffer."""
        return (self.experts[layer] == self.resident_of[layer]  # nothing streams (all of it resident)
                or (layer in self.half_of and len(self.pages_done[layer]) == self.pages_of[layer]))

    def run(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Returns sum_a weights[n,a] * expert_{ids[n,a]}(x[n]) as [N, D], loading the layer whole
        first when its pages are not all there. Inside `external_call` (an engine that does the
        call's bookkeeping itself, around a CUDA graph) only the computation runs."""
        if self._external is not None:
            return self._compute(layer, self._external, x, ids, weights)
        half = self.begin_call(layer)
        start = self.span_event()
        out = self._compute(layer, half, x, ids, weights)
        self.end_call(layer, start)
        return out

    def begin_call(self, layer: int) -> int:
        """Returns the buffer half the layer's streamed experts are in, after loading the layer
        whole when its pages are not all there; on CUDA the compute stream then waits for its last page."""
        if not self.loaded(layer):
            self.whole_loads += 1
            self.half_of.pop(layer, None)  # (a layer cut short is loaded again, whole)
            self.pages_done.pop(layer, None)
            self.load_page(layer, 0, 1)
        half = self.half_of.get(layer, 0)
        if self.cuda and layer in self.ready:
            torch.cuda.current_stream(self.device).wait_event(self.ready[layer])
        return half

    def span_event(self) -> torch.cuda.Event | None:
        """Returns a timing event recorded on the compute stream (copy_timing on CUDA), else None."""
        if not (self.cuda and self.copy_timing):
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def end_call(self, layer: int, start: torch.cuda.Event | None = None) -> None:
        """Marks the end of the layer's expert call on the compute stream: the event a page that
        overwrites its buffer waits for (CUDA), and the call's timing span (from `start`)."""
        if start is not None:
            self.expert_spans.append((layer, start, self.span_event()))
        if self.cuda:  # the buffer's latest reader: a page that overwrites it waits for this, nothing later
            done = torch.cuda.Event()
            done.record()
            self.read_done[layer] = done

    @contextmanager
    def external_call(self, layer: int, half: int, x: torch.Tensor, slots: int):
        """Within it the layer's expert calls only compute, from buffer `half` (the engine called
        begin_call and calls end_call; a CUDA graph captures what runs inside). A layer decoded
        whole (`_decodes_whole`) is decoded into the workspace first, outside: a graph replays the
        grouped kernels on the workspace, never the decode."""
        if self._decodes_whole(x, slots, needs_grad(x, x, {})):
            self._decode_layer(layer, half, self.layout.view(self.slab, layer), x.dtype)
        self._external = half
        try:
            yield
        finally:
            self._external = None

    def _compute(self, layer: int, half: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Returns the layer's expert call on x [N, D] from the slab, its streamed experts in buffer `half`."""
        rows = self._rows_device[(layer, half)][ids]  # [N, A] slots
        stacked = self.layout.view(self.slab, layer)
        if self._decodes_whole(x, rows.numel(), needs_grad(x, weights, {})):
            from ..experts import triton_ops

            gate_up, down = self._decode_layer(layer, half, stacked, x.dtype)
            return triton_ops.grouped_expert_ffn(x, ids, weights.to(x.dtype), gate_up, down)
        return self.layout.form.run(x, rows, weights, stacked, ids=ids, row_of=self._rows[(layer, half)],
                                    count=self.experts[layer])

    def _decodes_whole(self, x: torch.Tensor, slots: int, grad: bool) -> bool:
        """Returns whether a call of `slots` routed slots decodes the layer whole (`decode_layers`):
        a compressed form, more routed slots than the per-slot kernels take, the kernels running,
        no autograd."""
        form = self.layout.form
        if not self.decode_layers or not plain_compressed(form) or slots <= SLOT_KERNEL_MAX_SLOTS:
            return False
        from ..experts import triton_ops
        from ..quant import ops

        return ops.use_kernels(x) and triton_ops.triton_usable(x) and x.dtype in ops.DECODE_DTYPES and not grad

    def _decode_layer(self, layer: int, half: int, stacked: Tensors, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the layer's experts decoded in expert order, (gate_up [E, 2I, D], down [E, D, I])
        in dtype: views of the workspace, decoded on the compute stream unless it holds them already
        (the layer's earlier micro-batches). Expert order is [resident slots | buffer slots], two
        contiguous ranges of the slab, so each kind takes two decode launches."""
        form, count = self.layout.form, self.experts[layer]
        width = max(self.experts.values())
        if self._workspace is None or self._workspace["gate_up"].dtype != dtype:
            self._workspace = None
            self._workspace = {"gate_up": torch.empty((width, 2 * form.ffn, form.hidden), dtype=dtype, device=self.device),
                               "down": torch.empty((width, form.hidden, form.ffn), dtype=dtype, device=self.device)}
        ws = {kind: t[:count] for kind, t in self._workspace.items()}
        if self._decoded != (layer, half, dtype):
            kept = self.resident_of[layer]
            for lo, hi, slot in ((0, kept, self.resident_start[layer]), (kept, count, self.buffer_start[half])):
                if hi > lo:
                    part = form.one(stacked, slice(slot, slot + hi - lo))  # [hi - lo, ...] of each stored tensor
                    for kind in KINDS:
                        decode_into(form, kind, part, ws[kind][lo:hi])
            self._decoded = (layer, half, dtype)
            self.layer_decodes += 1
        return ws["gate_up"], ws["down"]

    # ---- the engines' side (experts.runtime.ExpertRuntime) ----------------------------------------
    def reserve(self, batch: int, positions: int) -> None:
        """Nothing to make room for: the slab is fixed (the HRM planned it)."""

    def capture_decode(self, model, cache, token, position):
        return None

    def report(self) -> dict:
        form = self.layout.form
        return {"form": form.name, "bits_per_weight": bits_per_weight(self.layout, form),
                "resident_per_layer": self.resident, "resident_total": sum(self.resident_of.values()),
                "streamed_per_layer": self.streamed,
                "pages_loaded": self.pages_loaded, "whole_loads": self.whole_loads,
                "slab_bytes": sum(t.numel() * t.element_size() for t in self.slab.values()),
                "workspace_bytes": sum(t.numel() * t.element_size() for t in (self._workspace or {}).values()),
                "layer_decodes": self.layer_decodes}


def resident_counts(resident, experts: list[int], layers: list[int]) -> dict[int, int]:
    """Returns {MoE layer: experts it keeps resident} for `resident` -- one count for every layer or
    a sequence of one per layer (`experts`: each layer's count, `layers`: their ids, in order);
    raises MoekitError naming the bad count."""
    if isinstance(resident, bool) or not isinstance(resident, (int, list, tuple)):
        raise MoekitError(f"resident experts: give a count or a list of one per MoE layer, got {resident!r}")
    counts = [resident] * len(layers) if isinstance(resident, int) else list(resident)
    if len(counts) != len(layers):
        raise MoekitError(f"resident experts: {len(counts)} counts given for {len(layers)} MoE layers; give one a layer")
    for layer, count, have in zip(layers, counts, experts):
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= have:
            raise MoekitError(f"resident experts per layer must be in 0..{have}, got {count!r} for layer {layer}")
    return dict(zip(layers, counts))


class PagedExperts(nn.Module):
    """One MoE layer's experts, served by the shared PagedRuntime."""

    def __init__(self, layer: int, num_experts: int):
        super().__init__()
        self.layer, self.num_experts = layer, num_experts
        self.runtime: PagedRuntime | None = None  # set when every layer is built (PagedLoader.finish)

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Returns sum_a weights[n,a] * expert_{ids[n,a]}(x[n]) as [N, D] for x [N, D]."""
        return self.runtime.run(self.layer, x, expert_ids, weights)


def plain_compressed(form: StoredForm) -> bool:
    """Returns whether `form` is int-N or the ternary code around a plain SwiGLU, which a layer
    decoded whole runs through the grouped SwiGLU kernels (gpt-oss's biased, clamped experts and
    dense ones never are)."""
    return form.name in WHOLE_LAYER_FORMS


def pageable_form(ctx: LoadContext, host_layers: dict[int, Tensors] | None = None) -> StoredForm:
    """Returns the stored form a checkpoint's experts are paged in: dense (its dtype), int-N or the
    ternary code of a moekit-compressed checkpoint (tables on the device); gpt-oss's experts with
    their biases and clamped SwiGLU around either, or in the MXFP4 blocks and scales it ships
    (experts.clamped); raises MoekitError in one line naming the alternative for forms the pages
    cannot carry."""
    from ..quant.config import QuantConfig, is_moekit_quantized

    cfg, where = ctx.config, ctx.ckpt.path / "config.json"
    if not is_moekit_quantized(ctx.ckpt.config):
        if not cfg.plain_experts:  # gpt-oss: biases and the clamped SwiGLU, bf16 or the MXFP4 it ships
            from ..experts.clamped import form_for

            return form_for(ctx)
        return DenseForm(cfg.hidden_size, cfg.expert_ffn, ctx.dtype)
    from ..quant.formats import form_from_checkpoint, form_from_tensors

    quant = QuantConfig.from_dict(ctx.ckpt.config["quantization_config"], str(where))
    form = (form_from_tensors(quant, cfg, host_layers, ctx.device) if host_layers is not None
            else form_from_checkpoint(quant, cfg, ctx.ckpt, ctx.family, ctx.device))
    if form.name not in PAGED_FORMS:
        raise MoekitError(f"{where}: paged experts cannot page stored form '{form.name}' (they page "
                          f"{', '.join(PAGED_FORMS)}); run it offloaded instead (moekit.offload.load_offloaded)")
    if not cfg.plain_experts:  # a compressed gpt-oss: the codes with its biases and clamp around them
        from ..experts.clamped import BiasedCompressedForm

        form = BiasedCompressedForm.of(form, cfg, ctx.dtype)
    return form


class PagedLoader(ExpertLoader):
    """Builds paged experts while a model loads: every layer's experts, in their stored form
    (dense, int-N or ternary code: `pageable_form`), into the host store (pinned on a GPU
    machine), `resident` of each layer also on the device (one count, or one per MoE layer in
    layer order: PagedRuntime). `host_layers` ({layer: {name: [E,
    ...]}}, as the form stores them: dense gate_up [E, 2I, D], down [E, D, I]; a compressed
    checkpoint's stored tensors named as quant.formats names them, code_table included) gives the
    host store directly (benchmarks: experts made in pinned memory, no checkpoint read)."""

    def __init__(self, resident, host_layers: dict[int, Tensors] | None = None):
        self.resident = resident
        self.host_layers = host_layers
        self.stores: dict[int, Tensors] = {}
        self.sources: list[PagedExperts] = []
        self.layout = None

    def build(self, ctx: LoadContext, layer: int) -> nn.Module:
        from ..offload.layout import PackedLayout, layout_for

        cfg = ctx.config
        if self.layout is None:
            form = pageable_form(ctx, self.host_layers)
            self.layout = layout_for(form, [i for i, moe in enumerate(cfg.moe_layers) if moe])
        layout, pin = self.layout, ctx.device.type == "cuda"
        count = cfg.experts_in(layer)
        if self.host_layers is not None:
            given = self.host_layers.get(layer) or {}
            if isinstance(layout, PackedLayout):  # the stored tensors, packed per expert (tables stay with the form)
                stacked = layout.pack(layer, given, pin=pin)
            else:
                stacked = given
            want = {name: (count, *shape) for name, (shape, _) in layout.shapes(layer).items()}
            got = {name: tuple(t.shape) for name, t in stacked.items()}
            if got != want:
                raise MoekitError(f"host_layers[{layer}]: expected tensors {want}, got {got}")
        else:
            stacked = layout.empty(count, "cpu", pin=pin, layer=layer)
            with torch.no_grad():  # read straight into the store rows (views of the packed bytes)
                layout.form.read_layer(ctx.ckpt, ctx.family, layer, layout.view(stacked, layer))
        self.stores[layer] = stacked
        source = PagedExperts(layer, count)
        self.sources.append(source)
        return source

    def finish(self, model: nn.Module, ctx: LoadContext) -> PagedRuntime:
        if self.layout is None:
            raise MoekitError(f"{ctx.ckpt.path}: the model has no MoE layer, nothing to page")
        runtime = PagedRuntime(self.layout, self.stores, self.resident, ctx.device)
        for source in self.sources:
            source.runtime = runtime
        return runtime
