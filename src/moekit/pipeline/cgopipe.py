"""CGOPipe decode steps (MoE-Lightning): N sequences in micro-batches, layer by layer, attention on
the CPU next to a host-resident paged KV cache, everything else where the model lives.

One decode step runs every micro-batch through layer i before layer i + 1 (FlexGen's zig-zag).
Per (layer i, micro-batch j) there are three tasks (paper Alg. 1, indices as in the artifact):

    PreAttn(i, j)   norm, qkv, rope                       model's device (compute stream)
    CPUAttn(i, j)   k, v into the host pool, attention    the CPU worker thread (native kernel, GIL released)
    PostAttn(i, j)  o-proj, router, experts, residual     model's device (compute stream)

The launch thread issues, for each (i, j) in order:

    wait for CPUAttn(i, j)'s result          (the only host wait: LoadH needs its data)
    LoadH(i, j)         H2D stream           attention output to the device, event
    W_PinToG(m', j..j+1) weight stream       pages of the next MoE layer m' (paged experts)
    PostAttn(i, j)      compute stream       after LoadH's event (j = 0: after m's last page)
    PreAttn + D2H + CPUAttn of the task `lookahead` tasks ahead

Three copy streams: D2H (q, k, v), H2D (attention outputs only) and the paged runtime's weight
stream (expert pages only), so a page never holds up an attention output nor waits behind one; a
page waits on the device for the last expert call of the layer whose buffer it overwrites (two
MoE layers back), not for the compute queued since. The lookahead defaults to a whole layer (the
task launched after PostAttn(i, j) is (i + 1, j)): CPU attention of layer i + 1 then needs only
layer i's PostAttn of the same micro-batch, so it runs while layer i + 1's pages stream and layer
i's experts compute; lookahead=2 is the artifact's order. Between steps nothing drains the device:
generate_pipelined feeds each step the last step's token (argmax or sampled) on the device, so
step s + 1 is issued while step s's last layers run. gpt-oss's sinks and windows run in the CPU kernel; MLA (DeepSeek)
attends in the absorbed form over a joint latent pool (moekit.pipeline.latent). On a CPU-only run every stream is the current thread and events
are None. `trace` and `profile` (moekit.pipeline.timeline) record the
issue order and where the time goes.

Shapes: N sequences of a step, mu per micro-batch, D hidden, H query heads, Hkv kv heads,
Dh head dim, V vocabulary.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ..errors import MoekitError
from ..kv_cache import PagedKVCache, RaggedBatch
from ..mla import LatentAttention
from ..model import Attention, SinkAttention
from ..native.attention import sink_logits
from .graphs import TaskGraphs, graphs_wanted
from .host_attention import NativeAttention, attention_items, cpu_attention
from .latent import (
    LatentHostCache,
    absorbed_query,
    latent_output,
    query_width,
)
from .prefill import empty_host_cache, prefill_timings, prefill_to_host


class Streams:
    """The CUDA streams and events CGOPipe's activation copies run on: D2H (q, k, v to the host)
    and H2D (attention outputs), beside the compute stream (weight pages have the paged
    runtime's own stream). On the CPU both are the current thread: copies are plain and events None."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        if self.cuda:
            self.d2h = torch.cuda.Stream(device)
            self.h2d = torch.cuda.Stream(device)  # attention outputs only: never behind a weight page

    def to_host(self, t: torch.Tensor, into: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """Returns (a host copy of t, the event that marks it complete) after the compute so far;
        `into` (pinned, t's shape and dtype) receives it instead of a new pinned tensor."""
        if not self.cuda:
            return t, None
        ready = torch.cuda.Event()
        ready.record()
        with torch.cuda.stream(self.d2h):
            self.d2h.wait_event(ready)
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True) if into is None else into
            host.copy_(t, non_blocking=True)
            t.record_stream(self.d2h)
            # the worker thread sleeps on it (blocking sync) rather than spin a core the launch
            # thread and the attention threads need
            done = torch.cuda.Event(blocking=True)
            done.record()
        return host, done

    def to_device(self, host: torch.Tensor, timing: tuple | None = None) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """Returns (a device copy of the host tensor, the event marking it complete); `timing`
        (start, end) events from StepProfile.loadh: the end is recorded after the copy."""
        if not self.cuda:
            return host, None
        with torch.cuda.stream(self.h2d):
            dev = host.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            if timing is not None:
                timing[1].record()
        dev.record_stream(torch.cuda.current_stream(self.device))
        return dev, done

    @staticmethod
    def wait(event: torch.cuda.Event | None) -> None:
        """Makes the compute stream wait for `event` (nothing on the CPU)."""
        if event is not None:
            torch.cuda.current_stream().wait_event(event)


@dataclass
class MicroBatch:
    """One micro-batch of a decode step: its sequences' step over the paged cache and residual stream."""

    batch: RaggedBatch  # one token per sequence; tables and lengths on the host
    x: torch.Tensor  # [1, mu, D] residual stream on the model's device
    cos: torch.Tensor  # [mu, Dh] rope of each sequence's position
    sin: torch.Tensor
    # buffers reused by every layer of the step (and later steps of the same size): the flat q, k, v
    # packet [mu * (H + 2 Hkv) * Dh] on the host (pinned on a GPU run), q | k | v each [mu, heads, Dh]
    # in turn so that q needs no copy to be contiguous, and its q, k, v views (made once: the worker
    # splits nothing per task); the attention output [mu, H, Dh]; the packet on the model's device
    # and its views, which PreAttn's outputs are copied into (on the CPU the host packet itself).
    # Task (i + 1, j) reuses them only after task (i, j) is done with them: it is launched after
    # PostAttn(i, j), which waits for CPUAttn(i, j), which waits for D2H(i, j)
    packet: torch.Tensor | None = None
    out: torch.Tensor | None = None
    qkv: tuple[torch.Tensor, ...] | None = None
    device_packet: torch.Tensor | None = None
    device_qkv: tuple[torch.Tensor, ...] | None = None
    native: NativeAttention | None = None  # the prepared kernel call (None: cpu_attention's checks and fallback)


def _usable_cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class PipelinedDecoder:
    """Decode steps of many sequences by CGOPipe's schedule over a host-resident PagedKVCache
    (an MLA model's: a pipeline.latent.LatentHostCache).

    `lookahead`: (layer, micro-batch) tasks whose CPU attention is launched ahead of PostAttn
    (None: one layer, i.e. the step's micro-batch count; 2: the artifact's). `attention_threads`:
    the native kernel's threads (None: all usable cores but two on a GPU run, torch's on the CPU).
    `trace` (a list) receives the issue order (moekit.pipeline.timeline); `profile` (a
    timeline.StepProfile) the step timings. `graphs`: PreAttn and PostAttn replayed as CUDA graphs
    (moekit.pipeline.graphs; None: on a CUDA device unless MOEKIT_PIPELINE_GRAPHS=0; never on the CPU)."""

    PAGES_AHEAD = 2  # pages of the next MoE layer queued by micro-batch j: j and j + 1

    def __init__(self, model, cache: PagedKVCache, micro_batch: int, lookahead: int | None = None,
                 trace: list | None = None, profile=None, attention_threads: int | None = None,
                 graphs: bool | None = None):
        cfg = model.config
        if cache.device.type != "cpu":
            raise MoekitError("CGOPipe keeps the KV cache in host memory: give a PagedKVCache on the CPU")
        self.latent = cfg.mla is not None  # MLA: the absorbed form over a joint host pool (pipeline.latent)
        kinds = (LatentAttention,) if self.latent else (Attention, SinkAttention)
        odd = [type(layer.attn).__name__ for layer in model.layers if type(layer.attn) not in kinds]
        if odd:
            raise MoekitError(f"CGOPipe's CPU attention runs grouped-query attention (with or without sinks) and "
                              f"MLA; {cfg.family} has {odd[0]} layers: decode it with moekit.generate")
        if self.latent and not isinstance(cache, LatentHostCache):
            raise MoekitError(f"{cfg.family} uses multi-head latent attention: CGOPipe's host cache must be a "
                              "pipeline.latent.LatentHostCache (latent and rope key in one row; host_cache makes it)")
        if micro_batch < 1:
            raise MoekitError(f"micro_batch must be >= 1, got {micro_batch}")
        if lookahead is not None and lookahead < 1:
            raise MoekitError(f"lookahead must be >= 1 (or None: one layer), got {lookahead}")
        self.model, self.cache, self.micro_batch, self.lookahead = model, cache, micro_batch, lookahead
        self.trace, self.profile = trace, profile
        self.streams = Streams(model.device)
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moekit-cpu-attention")
        # the native kernel's calls so far (the worker thread's alone): seconds inside, KV bytes read
        self.kernel_seconds, self.kernel_bytes = 0.0, 0
        self._buffers: dict[tuple[int, int], tuple] = {}  # (j, mu) -> MicroBatch's buffers
        self._windows = [layer.attn.cfg.sliding_window for layer in model.layers]
        # gpt-oss's sink logits [H] per layer, float32 on the host once (the worker reads them every task)
        self._sinks = [sink_logits(getattr(layer.attn, "sinks", None), cfg.num_heads) for layer in model.layers]
        # the pools the kernel reads (MLA's joint [latent | rope key] rows as both) and a head's q width
        self._pools = (cache.joint, cache.joint) if self.latent else (cache.keys, cache.values)
        self._width = query_width(cfg)
        # on a GPU run two cores stay free of attention threads: the launch thread (every kernel of
        # PreAttn / PostAttn and each copy) and the CUDA driver's; spinning OpenMP threads on every
        # core would slow the launches the device waits on (MoE-Lightning brief 5.4-4)
        self.attention_threads = max(1, _usable_cores() - 2) if self.streams.cuda else None
        if attention_threads is not None:
            if attention_threads < 1:
                raise MoekitError(f"attention_threads must be >= 1 (or None: all usable cores but two on a GPU "
                                  f"run), got {attention_threads}")
            self.attention_threads = attention_threads
        self.attention_items = attention_items()  # read once: a malformed value stops here, not mid-run
        paged = self._paged()
        if paged is not None:
            paged.trace = trace
            paged.copy_timing = profile is not None and self.streams.cuda
        # PreAttn and PostAttn as CUDA graphs (pipeline.graphs) where the experts are resident or paged
        # (another runtime's calls sync with the host); None: eager (the CPU, MOEKIT_PIPELINE_GRAPHS=0)
        self.graphs = None
        if graphs_wanted(model.device, graphs) and (paged is not None or getattr(model, "expert_runtime", None) is None):
            # kept with the model: a later generation (a benchmark's rows after its warm-up) replays them
            self.graphs = getattr(model, "_pipeline_graphs", None) or TaskGraphs(model, paged)
            model._pipeline_graphs = self.graphs

    def _paged(self):
        """Returns the model's PagedRuntime (experts streamed page by page with the micro-batches), or None."""
        from .paged import PagedRuntime

        runtime = getattr(self.model, "expert_runtime", None)
        return runtime if isinstance(runtime, PagedRuntime) else None

    def close(self) -> None:
        self.worker.shutdown(wait=True)
        paged = self._paged()
        if paged is not None:
            paged.trace, paged.copy_timing, paged.copy_spans, paged.expert_spans = None, False, [], []

    def _host_buffers(self, j: int, rows: int) -> tuple:
        """Returns micro-batch j's (flat q, k, v packet [rows * (H + 2 Hkv) * Dh] on the host (pinned on
        a GPU run), attention output [rows, H, Dh], the packet's q, k, v views [rows, heads, Dh], the
        packet on the model's device (on the CPU: the host one), its views), made once and reused: a
        pinned allocation per task costs the launch thread and the worker a trip through the host
        allocator's lock and events, and views made per task cost both threads the GIL."""
        key = (j, rows)
        if key not in self._buffers:
            cfg, dtype, pin = self.model.config, self.model.dtype, self.streams.cuda
            dims = [(cfg.num_heads, self._width), *cfg.kv_cache_dims()]
            width = sum(h * d for h, d in dims)

            def views(packet: torch.Tensor) -> tuple[torch.Tensor, ...]:
                parts = packet.split([rows * h * d for h, d in dims])
                return tuple(part.view(rows, h, d) for part, (h, d) in zip(parts, dims))  # each contiguous

            packet = torch.empty(rows * width, dtype=dtype, pin_memory=pin)
            out = torch.empty((rows, cfg.num_heads, self._width), dtype=dtype, pin_memory=pin)
            device_packet = torch.empty(rows * width, dtype=dtype, device=self.model.device) if pin else packet
            self._buffers[key] = (packet, out, views(packet), device_packet, views(device_packet))
        return self._buffers[key]

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        """Returns a host tensor on the model's device, through pinned memory on a GPU run (no wait)."""
        if not self.streams.cuda:
            return host
        return host.pin_memory().to(self.model.device, non_blocking=True)

    def _record(self, op: str, key: tuple, waits: tuple = ()) -> None:
        if self.trace is not None:
            self.trace.append((op, key, waits))

    def _attend(self, layer: int, mb: MicroBatch, packet: torch.Tensor, dims: list[tuple[int, int]],
                ready: torch.cuda.Event | None) -> torch.Tensor:
        """CPUAttn (the worker thread): splits the flat packet [mu * (H + 2 Hkv) * Dh] into q, k, v,
        stores k, v [mu, Hkv, Dh] in the pool, returns the attention output [mu, H * Dh] in host memory."""
        import time

        with torch.inference_mode():  # grad mode is per thread
            t0 = time.perf_counter()
            if ready is not None:
                ready.synchronize()  # the worker waits for its own data, never the launch thread
            t1 = time.perf_counter()
            if packet is mb.packet:
                q, k, v = mb.qkv
            else:
                mu = mb.out.shape[0]
                parts = packet.split([mu * h * d for h, d in dims])
                q, k, v = (part.view(mu, h, d) for part, (h, d) in zip(parts, dims))  # each contiguous
            window, sinks = self._windows[layer], self._sinks[layer]
            keys, values = self._pools[0][layer], self._pools[1][layer]
            # the native calls go through ctypes.CDLL, which drops the GIL for their duration: the
            # launch thread keeps issuing while the kernel runs. Back from each, the worker waits
            # for the launch thread to let go of the GIL: the store and the kernel are one call.
            # The output is pinned on a GPU run, so that LoadH's copy is asynchronous
            kernel_s = None
            if mb.native is not None and mb.native.can_store(keys, k, v):
                out, kernel_s = mb.native.store_and_attend(keys, values, q, k, v, mb.out, window,
                                                           self.attention_threads, sinks)
            else:
                self.cache.write(layer, k, v, mb.batch.slots)
                if mb.native is not None:
                    out = mb.native(keys, values, q, mb.out, window, self.attention_threads, sinks)
                else:
                    out = cpu_attention(q, keys, values, mb.batch, window, mb.out, self.attention_threads, sinks)
            t2 = time.perf_counter()
            kernel_s = t2 - t1 if kernel_s is None else kernel_s
            kv_bytes = 0 if mb.native is None else mb.native.read_bytes(window, keys.element_size(), keys is values)
            if kv_bytes:  # the kernel's read rate (bytes over the calls' seconds): the HRM's level
                self.kernel_seconds += kernel_s
                self.kernel_bytes += kv_bytes
            if self.profile is not None:
                self.profile.add("worker_wait_s", t1 - t0)
                self.profile.add("attention_s", t2 - t1)
                self.profile.add("kernel_s", kernel_s)
                self.profile.add("kernel_bytes", kv_bytes)
            return out.reshape(out.shape[0], -1)

    def _launch(self, layer: int, j: int, mb: MicroBatch) -> Future:
        """PreAttn + OffloadQKV + CPUAttn of one (layer, micro-batch j); returns CPUAttn's future."""
        if self.graphs is not None:
            packet, dims = self.graphs.pre(layer, mb.x, mb.cos, mb.sin, mb.device_packet)
        else:
            q, k, v = self.model.layers[layer].pre_attn(mb.x, mb.cos, mb.sin)  # [1, heads, mu, Dh]
            if self.latent:  # MLA: k, v are the latent and the rope key; q the absorbed query
                q = absorbed_query(self.model.layers[layer].attn, q)  # [1, H, mu, r + dr]
            dims = [(z.shape[1], z.shape[3]) for z in (q, k, v)]
            # one flat packet, q | k | v each [mu, heads, Dh] (the artifact's cat(q, k, v)): one D2H
            # copy and one event a task; written in place, one copy each, no cat and no allocation
            for dst, z in zip(mb.device_qkv, (q, k, v)):
                dst.copy_(z[0].transpose(0, 1))
            packet = mb.device_packet
        self._record("pre", (layer, j))
        host, ready = self.streams.to_host(packet, mb.packet)
        self._record("d2h", (layer, j), (("pre", (layer, j)),))
        self._record("attn", (layer, j), (("d2h", (layer, j)),))
        return self.worker.submit(self._attend, layer, mb, host, dims, ready)

    @torch.inference_mode()
    def step(self, work: list[tuple[object, int, int | None]], tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Returns the logits [N, V] of one decode step over (sequence, position, token) triples:
        each token written at its position of the host cache (blocks grown as needed), the
        sequences run in micro-batches of `micro_batch` through every layer in CGOPipe's order.
        `tokens` [N] (on the model's device) gives the tokens instead of the triples: nothing then
        waits for the device, so a step is issued while the last one still runs."""
        import time

        if not work:
            raise MoekitError("a decode step needs at least one sequence")
        model, device, profile = self.model, self.model.device, self.profile
        if profile is not None:
            profile.begin()
        mbs = []
        for at in range(0, len(work), self.micro_batch):
            part = work[at:at + self.micro_batch]
            batch = self.cache.prepare([(seq, position, 1) for seq, position, _ in part])
            # host tensors go over pinned, so that a copy does not wait for the device's queued work
            # (torch.tensor(..., device=cuda) from a list is a blocking copy: the launch thread would
            # wait for everything queued so far)
            if tokens is not None:
                ids = tokens[at:at + len(part)].view(1, -1)
            else:
                ids = self._to_device(torch.tensor([[token for _, _, token in part]], dtype=torch.long))
            cos, sin = model.rope(self._to_device(batch.positions))
            mbs.append(MicroBatch(batch, model.embed_input(ids), cos, sin, *self._host_buffers(len(mbs), len(part)),
                                  NativeAttention.of(self.cache, batch, model.config.num_heads, model.dtype,
                                                     self._pools, self.attention_items)))
        n = len(mbs)
        paged = self._paged()
        moe = set(paged.layers) if paged is not None else set()
        if paged is not None:
            # the prologue: the first MoE layer whole when the last step did not queue it (the first
            # step), and the first pages of the one after it (its buffer's reader is done)
            paged.prefetch(paged.layers[0], n)
            for page in range(min(self.PAGES_AHEAD, n)):
                paged.load_page(paged.next_layer(paged.layers[0]), page, n)
        order = [(i, j) for i in range(len(model.layers)) for j in range(n)]
        ahead = min(self.lookahead or n, n)  # a task launched ahead needs its previous layer done
        pending = {task: self._launch(task[0], task[1], mbs[task[1]]) for task in order[:ahead]}
        logits = [None] * n
        clock = time.perf_counter
        parts = dict.fromkeys(("blocked", "pre", "loadh", "pages", "post"), 0.0)  # launch-thread seconds
        for at, (i, j) in enumerate(order):
            t0 = clock()
            self._record("wait_attn", (i, j))
            attended = pending.pop((i, j)).result()
            t1 = clock()
            timing = profile.loadh(self.streams.h2d) if profile is not None and self.streams.cuda else None
            out, ready = self.streams.to_device(attended, timing)  # LoadH(i, j)
            self._record("loadh", (i, j), (("attn", (i, j)),))
            t2 = clock()
            if paged is not None:  # W_PinToG: pages j and j + 1 of the next MoE layer, on the weight stream
                nxt = paged.next_layer(i)
                for page in range(j, min(j + self.PAGES_AHEAD, n)):
                    paged.load_page(nxt, page, n)
            t3 = clock()
            self.streams.wait(ready)
            mb = mbs[j]
            self._record("post", (i, j), (("loadh", (i, j)),) + ((("weights", i),) if i in moe else ()))
            last = i == len(model.layers) - 1
            if self.graphs is not None:  # PostAttn(i, j) (+ the head): one graph replay
                mb.x, head = self.graphs.post(i, mb.x, out.view(1, out.shape[0], -1), last)
                if last:
                    logits[j] = head
            else:
                attended = (latent_output(model.layers[i].attn, out.view(out.shape[0], -1, self._width))
                            if self.latent else out.view(1, out.shape[0], -1))
                mb.x = model.layers[i].post_attn(mb.x, attended)  # PostAttn(i, j)
                if last:
                    logits[j] = model.head(mb.x)[0]
            if j == n - 1 and profile is not None:
                profile.layer_done()
            t4 = clock()
            if at + ahead < len(order):
                nxt_task = order[at + ahead]
                pending[nxt_task] = self._launch(nxt_task[0], nxt_task[1], mbs[nxt_task[1]])
            t5 = clock()
            parts["blocked"] += t1 - t0
            parts["loadh"] += t2 - t1
            parts["pages"] += t3 - t2
            parts["post"] += t4 - t3
            parts["pre"] += t5 - t4
        if profile is not None:
            profile.add("blocked_s", parts.pop("blocked"))
            for part, seconds in parts.items():
                profile.add(f"issue_{part}_s", seconds)
        result = torch.cat(logits)
        if profile is not None:
            spans, page_bytes, experts = [], {}, []
            if paged is not None:
                spans, paged.copy_spans = paged.copy_spans, []
                experts, paged.expert_spans = paged.expert_spans, []
                page_bytes = {m: paged.streamed_bytes(m) for m in paged.layers}
            profile.end(device, spans, page_bytes, experts)
        return result


@torch.inference_mode()
def generate_pipelined(model, prompts: list, max_new_tokens: int, micro_batch: int,
                       block_size: int = 16, stats=None, on_step=None, lookahead: int | None = None,
                       profile=None, attention_threads: int | None = None, graphs: bool | None = None,
                       temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                       seed: int | None = None) -> list[torch.Tensor]:
    """Returns each prompt's `max_new_tokens` tokens (no early stop at eos, as MoE-Lightning runs a
    batch): prefill on the model's device a micro-batch at a time with the KV moved to a
    host-resident paged cache (prefill_to_host), then decode steps by CGOPipe's schedule
    (PipelinedDecoder; `attention_threads` its CPU attention's threads). Each token is
    moekit.generate.sample's on the device: temperature 0 greedy (argmax), else drawn with top_k /
    top_p (0 / 1: off) from one torch.Generator on the model's device seeded by `seed` (None:
    torch's default generator), the batch's rows together each step. `stats` (a
    moekit.generate.GenerationStats) receives the timings: the
    batch's generated tokens per second are len(prompts) * new_tokens / (prefill_s + decode_s).
    `on_step(tokens_so_far)` is called after the prefill and after every decode step (a benchmark's
    time guard raises from it to stop a run). `lookahead`, `profile` and `graphs` as in PipelinedDecoder."""
    import time

    from ..generate import _generator, prompt_list, sample

    if temperature < 0:
        raise MoekitError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if top_k < 0:
        raise MoekitError(f"top_k must be >= 0 (0 switches it off), got {top_k}")
    if not 0 < top_p <= 1:
        raise MoekitError(f"top_p must be in (0, 1], got {top_p}")
    prompts = prompt_list(model, prompts, max_new_tokens)
    generator = _generator(seed, model.device)
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    t0 = time.perf_counter()
    lengths = [len(p) for p in prompts]
    positions = sum(-(-(n + max_new_tokens) // block_size) * block_size for n in lengths)
    # the pool untouched: its pages are first written by the prefill's per-layer stores (zero_rest),
    # which run while the device computes the next layer, not all before the prefill starts
    cache = empty_host_cache(model.config, positions, block_size, model.dtype)
    host_cache_s = time.perf_counter() - t0
    timings = {} if profile is not None else None
    logits = prefill_to_host(model, cache, prompts, micro_batch, block_size, timings=timings, zero_rest=True)
    # the tokens stay on the device (each step embeds the last step's choice, eagerly on the compute
    # stream, before any graph replay): no step waits for the device to drain, the next one is
    # issued while the last one's final layers run. sample is greedy's argmax at temperature 0; its
    # draws (topk, sort, multinomial, whose checks are asynchronous asserts) do not sync either
    steps = [sample(logits, temperature, top_k, top_p, generator)]  # [N] each
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)  # the prefill's end (its time)
    t1 = time.perf_counter()
    if profile is not None:  # the device is done: the prefill's events can be read
        profile.prefill = prefill_timings(timings, t1 - t0, host_cache_s)
    if on_step is not None:
        on_step(1)
    decoder = PipelinedDecoder(model, cache, micro_batch, lookahead=lookahead, profile=profile,
                               attention_threads=attention_threads, graphs=graphs)
    try:
        for s in range(max_new_tokens - 1):
            work = [(i, lengths[i] + s, None) for i in range(len(prompts))]
            steps.append(sample(decoder.step(work, tokens=steps[-1]), temperature, top_k, top_p, generator))
            if on_step is not None:
                on_step(len(steps))
    finally:
        decoder.close()
    if profile is not None and decoder.graphs is not None:
        profile.graphs = decoder.graphs.report()
    outs = torch.stack(steps, dim=1).tolist()  # [N, new tokens]: the one host copy of the tokens
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    if stats is not None:
        stats.prompt_tokens, stats.new_tokens = sum(lengths), max_new_tokens
        stats.prefill_s, stats.decode_s = t1 - t0, time.perf_counter() - t1
        if decoder.kernel_bytes:  # the CPU attention kernel inside the pipeline (Machine.pipeline_attention_bandwidth)
            stats.extra["cpu_attention"] = {"seconds": decoder.kernel_seconds, "kv_bytes": decoder.kernel_bytes}
    if profile is not None:
        profile.resolve(model.device)
    return [torch.tensor(o, dtype=torch.long) for o in outs]
