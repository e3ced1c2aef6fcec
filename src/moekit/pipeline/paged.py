"""Paged experts (CGOPipe's weight paging): R experts of every MoE layer stay on the device; the
other E - R of each layer live in a host store and are streamed into one of two device buffers
(double buffering: layer i computes from one while layer i + 1 fills the other), in pages.

The pipelined engine (moekit.pipeline.cgopipe) sends the pages of the next MoE layer in step with
the attention outputs of this one (`load_page`), on the runtime's own weight stream: a page waits
only for the last expert call of the layer whose buffer it overwrites (an event `run` records),
never for the compute queued after it, and a layer's first expert call waits (on the device) for
all of its pages. Any other engine (moekit.generate: prefill, plain decode) just calls the layer:
a layer whose pages are not all there is loaded whole first, so the model runs anywhere,
token-equal to its resident self.

Where experts lie: one device slab of slots (offload.layout: the stored form as is, packed for
compressed forms), laid out as [R resident slots of each MoE layer | buffer 0 | buffer 1], each
buffer E - R slots. A layer's `rows` table maps expert id -> slot for the buffer that holds it,
and the form runs the slab like an offload cache slab (ids, row_of, count: the same reduction as
a resident layer). A page is an equal share of the bytes of each stored tensor's streamed part
(as the artifact's byte ranges: every page costs the same PCIe time, so no page holds a hidden-
state load behind a whole expert); where the slots are packed wider than a layer's experts,
pages are expert-aligned ranges (`page_range`).

Shapes: E experts of a layer, R resident, S slots, N tokens, A experts per token, D hidden.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import MoekitError
from ..experts.forms import DenseForm, Tensors
from ..experts.loader import ExpertLoader, LoadContext

PAGE_ALIGN = 2048  # elements a page boundary is a multiple of (4 KiB of bf16: whole pages of the DMA)


class PagedRuntime:
    """The device slab, the host store and the page state every PagedExperts layer shares."""

    compilable = False
    prefill_chunk = None

    def __init__(self, layout, stores: dict[int, Tensors], resident: int, device: torch.device):
        self.layout, self.stores, self.device = layout, stores, torch.device(device)
        self.layers = sorted(stores)
        self.experts = {layer: next(iter(t.values())).shape[0] for layer, t in stores.items()}
        if not 0 <= resident <= min(self.experts.values()):
            raise MoekitError(f"resident experts per layer must be in 0..{min(self.experts.values())}, got {resident}")
        self.resident = resident
        self.streamed = max(self.experts.values()) - resident  # slots of one buffer
        slots = len(self.layers) * resident + 2 * self.streamed
        self.slab = layout.empty(max(slots, 1), self.device)
        self.buffer_start = [len(self.layers) * resident, len(self.layers) * resident + self.streamed]
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
        self._span_start: dict[int, torch.cuda.Event] = {}
        self.next_half = 0
        self.pages_loaded = 0  # pages copied, all layers (statistics, tests)
        self.whole_loads = 0  # layers loaded whole at their call (not ahead, page by page)
        for i, layer in enumerate(self.layers):  # the resident experts, once
            self._copy(layer, 0, resident, i * resident, non_blocking=False)
        self._rows = {(layer, h): self._row_table(layer, h) for layer in self.layers for h in (0, 1)}
        # the same tables on the device: indexing them with the router's ids needs no host copy (a
        # per-call torch.tensor(..., device=cuda) is a blocking copy that stalls the launch thread)
        self._rows_device = {key: torch.tensor(rows, device=self.device) for key, rows in self._rows.items()}

    # ---- placement -----------------------------------------------------------------------------
    def _row_table(self, layer: int, half: int) -> list[int]:
        base = self.layers.index(layer) * self.resident
        return [base + e if e < self.resident else self.buffer_start[half] + e - self.resident
                for e in range(self.experts[layer])]

    def _copy(self, layer: int, lo: int, hi: int, slot: int, non_blocking: bool) -> None:
        """Copies experts lo..hi-1 of `layer` from the host store into slots slot.. of the slab."""
        if hi <= lo:
            return
        for name, src in self.stores[layer].items():
            dst = self.slab[name][slot:slot + hi - lo]
            if dst.shape[1:] != src.shape[1:]:  # packed slots sized for the largest layer
                dst = dst[:, :src.shape[1]]
            dst.copy_(src[lo:hi], non_blocking=non_blocking)

    def page_range(self, layer: int, page: int, pages: int) -> tuple[int, int]:
        """Returns the streamed experts [lo, hi) of page `page` of `pages` of a layer."""
        per = -(-(self.experts[layer] - self.resident) // pages)
        lo = self.resident + page * per
        return lo, min(self.experts[layer], lo + per)

    def next_layer(self, layer: int) -> int:
        """Returns the MoE layer after `layer` (the first one after the last: the next step's)."""
        later = [m for m in self.layers if m > layer]
        return later[0] if later else self.layers[0]

    def streamed_bytes(self, layer: int) -> int:
        """Returns the bytes of the layer's streamed experts (what its pages carry)."""
        return (self.experts[layer] - self.resident) * sum(t[0].numel() * t.element_size()
                                                           for t in self.stores[layer].values())

    def flat_pages(self, layer: int) -> bool:
        """Returns whether the layer's pages are byte ranges (its slots are as wide as its experts
        and the stores contiguous), else expert-aligned ranges."""
        return all(self.slab[name].shape[1:] == src.shape[1:] and src.is_contiguous() and self.slab[name].is_contiguous()
                   for name, src in self.stores[layer].items())

    def _copy_page(self, layer: int, page: int, pages: int, half: int, non_blocking: bool) -> None:
        """Copies page `page` of `pages` of the layer's streamed experts into buffer `half`."""
        streamed = self.experts[layer] - self.resident
        base = self.buffer_start[half]
        if not self.flat_pages(layer):
            lo, hi = self.page_range(layer, page, pages)
            self._copy(layer, lo, hi, base + lo - self.resident, non_blocking)
            return
        for name, src in self.stores[layer].items():
            total = streamed * src[0].numel()
            a = total * page // pages // PAGE_ALIGN * PAGE_ALIGN
            b = total if page == pages - 1 else total * (page + 1) // pages // PAGE_ALIGN * PAGE_ALIGN
            if b > a:
                dst = self.slab[name][base:base + streamed].reshape(-1)[a:b]
                dst.copy_(src[self.resident:].reshape(-1)[a:b], non_blocking=non_blocking)

    def load_page(self, layer: int, page: int, pages: int, stream=None) -> None:
        """Copies page `page` of `pages` of the layer's streamed experts into its buffer (the first
        page claims the buffer the layer before last used). On CUDA it is queued on `stream`
        (default: the runtime's weight stream) behind the last expert call of the layer whose
        buffer it takes -- not behind the compute queued since -- and the last page records the
        event the layer's expert calls wait for."""
        if self.streamed == 0 or self.loaded(layer) or page in self.pages_done.get(layer, set()):
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
        return self.streamed == 0 or (layer in self.half_of and len(self.pages_done[layer]) == self.pages_of[layer])

    def run(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Returns sum_a weights[n,a] * expert_{ids[n,a]}(x[n]) as [N, D], loading the layer whole
        first when its pages are not all there."""
        if not self.loaded(layer):
            self.whole_loads += 1
            self.half_of.pop(layer, None)  # (a layer cut short is loaded again, whole)
            self.pages_done.pop(layer, None)
            self.load_page(layer, 0, 1)
        half = self.half_of.get(layer, 0)
        if self.cuda and layer in self.ready:
            torch.cuda.current_stream(self.device).wait_event(self.ready[layer])
        row_of = self._rows[(layer, half)]
        rows = self._rows_device[(layer, half)][ids]  # [N, A] slots
        stacked = self.layout.view(self.slab, layer)
        out = self.layout.form.run(x, rows, weights, stacked, ids=ids, row_of=row_of, count=self.experts[layer])
        if self.cuda:  # the buffer's latest reader: a page that overwrites it waits for this, nothing later
            done = torch.cuda.Event()
            done.record()
            self.read_done[layer] = done
        return out

    # ---- the engines' side (experts.runtime.ExpertRuntime) ----------------------------------------
    def reserve(self, batch: int, positions: int) -> None:
        """Nothing to make room for: the slab is fixed (the HRM planned it)."""

    def capture_decode(self, model, cache, token, position):
        return None

    def report(self) -> dict:
        return {"resident_per_layer": self.resident, "streamed_per_layer": self.streamed,
                "pages_loaded": self.pages_loaded, "whole_loads": self.whole_loads,
                "slab_bytes": sum(t.numel() * t.element_size() for t in self.slab.values())}


class PagedExperts(nn.Module):
    """One MoE layer's experts, served by the shared PagedRuntime."""

    def __init__(self, layer: int, num_experts: int):
        super().__init__()
        self.layer, self.num_experts = layer, num_experts
        self.runtime: PagedRuntime | None = None  # set when every layer is built (PagedLoader.finish)

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Returns sum_a weights[n,a] * expert_{ids[n,a]}(x[n]) as [N, D] for x [N, D]."""
        return self.runtime.run(self.layer, x, expert_ids, weights)


class PagedLoader(ExpertLoader):
    """Builds paged experts while a model loads: every layer's experts into the host store (pinned
    on a GPU machine), `resident` of each layer also on the device. `host_layers` ({layer:
    {name: [E, ...]}}, as DenseForm stores them: gate_up [E, 2I, D], down [E, D, I]) gives the host
    store directly (benchmarks: random experts made in pinned memory, no checkpoint read)."""

    def __init__(self, resident: int, host_layers: dict[int, Tensors] | None = None):
        self.resident = resident
        self.host_layers = host_layers
        self.stores: dict[int, Tensors] = {}
        self.sources: list[PagedExperts] = []
        self.layout = None

    def build(self, ctx: LoadContext, layer: int) -> nn.Module:
        from ..offload.layout import layout_for
        from ..quant.config import is_moekit_quantized

        cfg = ctx.config
        if not cfg.plain_experts or is_moekit_quantized(ctx.ckpt.config):
            raise MoekitError("paged experts take plain dense SwiGLU experts for now; load this checkpoint "
                              "resident or offloaded (moekit.offload)")
        form = DenseForm(cfg.hidden_size, cfg.expert_ffn, ctx.dtype)
        if self.layout is None:
            self.layout = layout_for(form, [i for i, moe in enumerate(cfg.moe_layers) if moe])
        count = cfg.experts_in(layer)
        if self.host_layers is not None:
            stacked = self.host_layers.get(layer)
            want = {name: (count, *shape) for name, (shape, _) in self.layout.shapes(layer).items()}
            got = {name: tuple(t.shape) for name, t in (stacked or {}).items()}
            if got != want:
                raise MoekitError(f"host_layers[{layer}]: expected tensors {want}, got {got}")
        else:
            stacked = self.layout.empty(count, "cpu", pin=ctx.device.type == "cuda", layer=layer)
            with torch.no_grad():
                form.read_layer(ctx.ckpt, ctx.family, layer, stacked)
        self.stores[layer] = stacked
        source = PagedExperts(layer, count)
        self.sources.append(source)
        return source

    def finish(self, model: nn.Module, ctx: LoadContext) -> PagedRuntime:
        runtime = PagedRuntime(self.layout, self.stores, self.resident, ctx.device)
        for source in self.sources:
            source.runtime = runtime
        return runtime
