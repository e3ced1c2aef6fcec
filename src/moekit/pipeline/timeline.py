"""Where CGOPipe's decode steps spend their time: `StepProfile` (host clocks of the launch thread
and the attention worker; on CUDA, timing events of each layer's compute, weight pages and
attention-output loads) and `replay` (a decode step's issue trace run on model resources: what
overlaps when the order and dependencies are the engine's, without a GPU).

A trace (PipelinedDecoder(trace=[])) is the engine's issue order as (op, key, waits) triples:

    op          runs on    key         what
    pre         gpu        (i, j)      PreAttn: norm, qkv, rope of micro-batch j at layer i
    d2h         d2h        (i, j)      q, k, v to the host
    attn        cpu        (i, j)      CPUAttn on the worker thread (one task at a time, in order)
    wait_attn   launch     (i, j)      the launch thread blocks until attn (i, j) is done
    loadh       h2d        (i, j)      the attention output to the device
    page        weights    (m, p)      page p of MoE layer m's streamed experts
    post        gpu        (i, j)      PostAttn: o-proj, router, experts, residual

(and "sync": the launch thread waits for the compute stream, as the step's logits do), and waits are keys
of earlier entries ("attn", (i, j)), or ("read", m) -- the last post of MoE
layer m (the buffer a page overwrites is free) -- or ("weights", m) -- every page of m queued so
far has arrived. Each resource runs its ops one at a time in issue order (a CUDA stream, the
single worker), so one pass over the trace gives every op's start and end.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable

import torch

ISSUE_PARTS = ("pre", "loadh", "pages", "post")  # the launch thread's issuing, by part (StepProfile)
RESOURCES = {"pre": "gpu", "post": "gpu", "d2h": "d2h", "attn": "cpu", "loadh": "h2d", "page": "weights"}


def replay(trace: list[tuple], seconds: dict[str, float | Callable[[tuple], float]],
           resources: dict[str, str] | None = None) -> dict:
    """Returns {"end": seconds until the last op ends, "done": {(op, key): end}, "busy": {resource:
    seconds busy}, "launch_blocked": seconds the launch thread waited} of the trace run with
    `seconds[op]` per op (a number, or a function of the key). `resources` overrides where an op
    runs (e.g. {"loadh": "weights"}: attention outputs in the weights' FIFO). A wait ("queued",
    resource) waits for everything issued to that resource so far."""
    where = {**RESOURCES, **(resources or {})}
    free: dict[str, float] = defaultdict(float)
    busy: dict[str, float] = defaultdict(float)
    done: dict[tuple, float] = {}
    last_read: dict[int, float] = {}
    arrived: dict[int, float] = {}
    now = blocked = 0.0
    issue = float(seconds.get("issue", 0.0))  # the launch thread's cost of issuing one op
    for op, key, waits in trace:
        if op in ("wait_attn", "sync"):
            t = done[("attn", key)] if op == "wait_attn" else free["gpu"]
            blocked += max(0.0, t - now)
            now = max(now, t)
            continue
        ready = now
        for w in waits:
            if w[0] == "read":
                ready = max(ready, last_read.get(w[1], 0.0))
            elif w[0] == "weights":
                ready = max(ready, arrived.get(w[1], 0.0))
            elif w[0] == "queued":
                ready = max(ready, free[w[1]])
            else:
                ready = max(ready, done[w])
        cost = seconds[op]
        cost = cost(key) if callable(cost) else float(cost)
        res = where[op]
        start = max(ready, free[res])
        free[res] = end = start + cost
        busy[res] += cost
        done[(op, key)] = end
        if op == "post":
            last_read[key[0]] = end
        elif op == "page":
            arrived[key[0]] = max(arrived.get(key[0], 0.0), end)
        now += issue
    return {"end": max(done.values(), default=0.0), "done": done, "busy": dict(busy), "launch_blocked": blocked}


class StepProfile:
    """Accumulates where decode steps go (PipelinedDecoder(profile=StepProfile(...))): host seconds
    of the launch thread (blocked on CPU attention results, or issuing) and of the attention
    worker (waiting for q, k, v; attending); on CUDA, per step, events on the compute stream at
    each layer's end, around each attention-output load, and (PagedRuntime.copy_timing) around
    each MoE layer's weight pages. `summary()` gives means per step, the first step (its
    prologue loads a layer whole) left out when there are more."""

    def __init__(self, cuda: bool = False):
        self.cuda = cuda
        self.steps: list[dict] = []
        self._lock = threading.Lock()
        self._step: dict = {}
        self._events: dict = {}
        self._unresolved: list[tuple] = []  # CUDA: closed steps whose events are not read yet
        self.graphs: dict | None = None  # the engine's CUDA graphs (graphs.TaskGraphs.report), when it ran them
        self.prefill: dict | None = None  # where the prefill went (prefill.prefill_timings), set by generate_pipelined

    # ---- the engine's side ----------------------------------------------------------------------
    def begin(self) -> None:
        self._step = {"step_s": time.perf_counter(), "blocked_s": 0.0, "attention_s": 0.0, "worker_wait_s": 0.0,
                      "kernel_s": 0.0, "kernel_bytes": 0.0}
        self._events = {"start": self._event(), "layers": [], "loadh": []}

    def _event(self):
        if not self.cuda:
            return None
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def add(self, name: str, seconds: float) -> None:
        """Adds host seconds to this step's `name` (any thread)."""
        with self._lock:
            self._step[name] = self._step.get(name, 0.0) + seconds

    def layer_done(self) -> None:
        """Marks the end of a layer's last PostAttn on the compute stream."""
        if self.cuda:
            self._events["layers"].append(self._event())

    def loadh(self, stream) -> tuple | None:
        """Returns (start event recorded on `stream`, its end to record after the copy), or None."""
        if not self.cuda:
            return None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        self._events["loadh"].append((start, end))
        return start, end

    def end(self, device=None, spans: list | None = None, page_bytes: dict[int, int] | None = None,
            experts: list | None = None) -> None:
        """Closes the step (its events are read by `resolve`, once the device is done: no step waits
        for it). `spans` are the runtime's (layer, first page start, last page end) events
        of the pages queued in this step, `page_bytes` the bytes a layer's pages carry, `experts`
        the runtime's (layer, start, end) events around each expert call."""
        step = self._step
        step["step_s"] = time.perf_counter() - step["step_s"]
        self.steps.append(step)
        if self.cuda:  # the events are read once the device is done (resolve): no step waits for it
            self._unresolved.append((step, self._events, spans, page_bytes, experts))

    def resolve(self, device=None) -> None:
        """Waits for the device and turns the closed steps' events into milliseconds (summary
        calls it; an engine may call it earlier, after its own final synchronisation)."""
        if not self._unresolved:
            return
        torch.cuda.synchronize(device)
        for step, events, spans, page_bytes, experts in self._unresolved:
            self._resolve_step(step, events, spans, page_bytes, experts)
        self._unresolved = []

    def _resolve_step(self, step: dict, events: dict, spans, page_bytes, experts) -> None:
        """Turns one closed step's events into milliseconds (the device done)."""
        start = events["start"]
        ends = [start.elapsed_time(e) for e in events["layers"]]
        step["layer_ms"] = [b - a for a, b in zip([0.0, *ends[:-1]], ends)]
        step["gpu_end_ms"] = ends[-1] if ends else 0.0
        loads = [a.elapsed_time(b) for a, b in events["loadh"]]
        step["loadh_ms_mean"] = sum(loads) / len(loads) if loads else 0.0
        step["loadh_ms_max"] = max(loads, default=0.0)
        copies = []
        for layer, a, b in spans or []:
            ms = a.elapsed_time(b)
            copies.append({"layer": layer, "start_ms": start.elapsed_time(a), "span_ms": ms,
                           "gb_s": (page_bytes or {}).get(layer, 0) / ms / 1e6 if ms > 0 else None})
        step["copies"] = copies
        per_layer: dict[int, float] = defaultdict(float)
        for layer, a, b in experts or []:
            per_layer[layer] += a.elapsed_time(b)
        step["experts_ms"] = dict(per_layer)

    # ---- the reader's side ----------------------------------------------------------------------
    def summary(self) -> dict:
        """Returns the steps' means (ms per step; per layer lists) and the last step's timeline."""
        if self._unresolved:
            self.resolve()
        steps = self.steps[1:] if len(self.steps) > 1 else self.steps
        if not steps:
            return {"steps": 0, "prefill": self.prefill}

        def mean(key: str) -> float:
            return 1e3 * sum(s[key] for s in steps) / len(steps)

        kernel_bytes, kernel_s = sum(s["kernel_bytes"] for s in steps), sum(s["kernel_s"] for s in steps)
        out = {"steps": len(steps), "step_ms": mean("step_s"),
               "launch_blocked_ms": mean("blocked_s"),  # the launch thread waiting for CPU attention results
               "launch_issuing_ms": mean("step_s") - mean("blocked_s"),
               "worker_attention_ms": mean("attention_s"),  # KV write + the attention kernel, worker thread
               # of which inside the native store + kernel call (the rest: Python, and the GIL's wait
               # for the launch thread after the call)
               "worker_kernel_ms": mean("kernel_s"),
               # the KV bytes the native kernel read over its calls' seconds (None: no native calls)
               "worker_kernel_gb_s": kernel_bytes / kernel_s / 1e9 if kernel_bytes and kernel_s else None,
               "worker_wait_ms": mean("worker_wait_s")}  # the worker waiting for q, k, v (the D2H event)
        # the launch thread's issuing by part (host ms per step): PreAttn + D2H + the worker's task,
        # LoadH, weight pages, PostAttn (+ the head); what is left of issuing is the loop itself
        for part in ISSUE_PARTS:
            out[f"issue_{part}_ms"] = mean(f"issue_{part}_s") if all(f"issue_{part}_s" in s for s in steps) else None
        out["graphs"] = self.graphs
        out["prefill"] = self.prefill
        if self.cuda:
            layers = max(len(s["layer_ms"]) for s in steps)
            out["layer_ms"] = [sum(s["layer_ms"][i] for s in steps if i < len(s["layer_ms"])) / len(steps)
                               for i in range(layers)]
            out["gpu_step_ms"] = sum(s["gpu_end_ms"] for s in steps) / len(steps)
            out["loadh_ms_mean"] = sum(s["loadh_ms_mean"] for s in steps) / len(steps)
            out["loadh_ms_max"] = max(s["loadh_ms_max"] for s in steps)
            spans = [c for s in steps for c in s["copies"]]
            out["copy_span_ms_mean"] = sum(c["span_ms"] for c in spans) / len(spans) if spans else None
            rates = [c["gb_s"] for c in spans if c["gb_s"]]
            out["copy_gb_s_mean"] = sum(rates) / len(rates) if rates else None
            out["last_step_copies"] = steps[-1]["copies"]
            # the expert calls' own GPU time (events around each call, after its waits): per step, and
            # per MoE layer (all its micro-batches)
            expert_layers = sorted({m for s in steps for m in s.get("experts_ms", {})})
            out["experts_gpu_ms"] = sum(sum(s.get("experts_ms", {}).values()) for s in steps) / len(steps)
            out["experts_gpu_ms_per_layer"] = [sum(s.get("experts_ms", {}).get(m, 0.0) for s in steps) / len(steps)
                                               for m in expert_layers]
        return out


def launch_task_seconds(model, micro_batch: int, reps: int = 8, trials: int = 3, graphs: bool | None = None) -> float:
    """Returns the host seconds CGOPipe's launch thread takes to issue one (layer, micro-batch) task
    of `model` at `micro_batch` sequences: PreAttn, the q/k/v packet and its D2H copy, an attention
    output's H2D copy, PostAttn (router and experts) on its first MoE layer -- the best of `trials`
    runs of `reps` tasks, the device drained before each run (so the launch queue never fills and
    only the host's time counts; on the CPU the compute is the host's too). Issue time is a
    resource of its own: the HRM bounds a layer by N / mu of it (Machine.launch_task_s). `graphs`
    as in cgopipe.PipelinedDecoder: PreAttn and PostAttn replayed as CUDA graphs (moekit.pipeline.graphs)."""
    from .cgopipe import Streams
    from .graphs import TaskGraphs, graphs_wanted, qkv_packet
    from .latent import absorbed_query, latent_output, query_width
    from .paged import PagedRuntime

    cfg, device, dtype = model.config, model.device, model.dtype
    index = next((i for i in range(cfg.num_layers) if cfg.moe_layers[i]), 0)
    layer = model.layers[index]
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(1, micro_batch, cfg.hidden_size, device=device, dtype=dtype, generator=g) * 0.1
    cos, sin = model.rope(torch.arange(micro_batch, device=device))
    streams = Streams(device)
    pin = device.type == "cuda"
    (hk, dk), (hv, dv) = cfg.kv_cache_dims()
    width, latent = query_width(cfg), cfg.mla is not None  # MLA: the absorbed query, W_uv after (pipeline.latent)
    packet_host = torch.empty(micro_batch * (cfg.num_heads * width + hk * dk + hv * dv), dtype=dtype,
                              pin_memory=pin)
    out_host = torch.zeros(micro_batch, cfg.num_heads * width, dtype=dtype, pin_memory=pin)

    def drain() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    runtime = getattr(model, "expert_runtime", None)
    paged = runtime if isinstance(runtime, PagedRuntime) else None
    task_graphs = TaskGraphs(model, paged) if graphs_wanted(device, graphs) and (paged or runtime is None) else None

    def task() -> None:
        if task_graphs is not None:
            packet, _ = task_graphs.pre(index, x, cos, sin)
        else:
            q, k, v = layer.pre_attn(x, cos, sin)
            packet = qkv_packet(absorbed_query(layer.attn, q) if latent else q, k, v)
        streams.to_host(packet, packet_host if pin else None)
        out, ready = streams.to_device(out_host)
        streams.wait(ready)
        if task_graphs is not None:
            task_graphs.post(index, x, out.view(1, micro_batch, -1), False)
        else:
            rows = out.view(micro_batch, -1, width)  # [mu, H, width]
            attended = latent_output(layer.attn, rows) if latent else rows.view(1, micro_batch, -1)
            layer.post_attn(x, attended)

    best = float("inf")
    with torch.inference_mode():
        task()  # kernels built, the layer's experts loaded
        task()  # the graphs captured (with graphs)
        for _ in range(trials):
            drain()
            t0 = time.perf_counter()
            for _ in range(reps):
                task()
            best = min(best, (time.perf_counter() - t0) / reps)
        drain()
    return best
