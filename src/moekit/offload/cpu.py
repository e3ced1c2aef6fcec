"""Computing missed experts on the CPU, beside the device (Fiddler, Kamahori et al. 2024; llama.cpp
--n-cpu-moe): OffloadConfig(misses="cpu" | "auto").

Why. At batch 1 an expert absent from the device cache costs expert_bytes / link rate to copy
(mixtral-8x7b: 352 MB / 55 GB/s = 6.4 ms on PCIe Gen5) but about expert_bytes / host memory rate to
compute where it already is (a matvec reads each weight once: ~2 ms at ~200 GB/s). So in a layer
call of at most `cpu_max_tokens` tokens, the routed experts whose copy has landed run on the
device as before, every other routed expert runs on the CPU from the host store, and the two
partial sums add on the device. Longer calls (prefill) fetch as before: there the CPU's FLOPs,
not its bandwidth, would be the limit.

One layer call on CUDA (OffloadRuntime.run, `_run_split`):
  1. x [N, D] and the routing weights [N, A] are queued for copy into pinned host buffers on the
     compute stream *before* the runtime's one host sync per layer (the routing's `.tolist()`):
     when that sync returns they have arrived. No sync is added.
  2. the calling thread builds the CPU experts' arguments (routes, pointer arrays: ~0.05 ms of
     Python) and starts one native call on the library's runner thread (native/async_runner.cpp),
     whose OpenMP team (`cpu_threads`, by default one fewer than torch's) does the parallel work;
     the start returns at once.
  3. meanwhile the calling thread launches the device part: demand fetches (auto), prefetch, the
     cached experts' kernels (on the rows routed to them, gathered by indices the host already
     knows), admissions; the GPU runs it while the host goes on.
  4. it waits for the native call, then the CPU sum [N, D] (pinned) is queued for copy to the
     device without waiting and added on the stream. The next layer's sync completes that copy
     before the buffer is written again (an event guards it as well).
Why a native runner thread. Launching the device part costs the host ~0.6 ms a layer (issue 12,
H200, OLMoE: device part 0.56 ms, native call 0.89 ms, period 2.03 ms), time the GPU does not
need the host for; run one after the other (the former inline design) the two add up. A Python
worker thread (`CpuWorker(threaded=True)`, the design before that, kept for comparison) bought no
overlap: its Python (building the routes) waited for the GIL while the main thread launched the
device part. Here all Python runs on the calling thread, and both the start and the wait are
ctypes calls, which release the GIL; the runner thread spins ~2 ms after a call before it sleeps
(so the next layer's start finds it awake, not behind a futex wake-up: the cost is a core kept
busy up to 2 ms after each call, as libgomp's idle team members spin a while too), the waiter ~1 ms.
MOEKIT_CPU_ASYNC=0 runs the call inline again (for before/after measurements). A disk store
reads each expert in Python between calls, so it stays inline, as does the PyTorch path.
On a CPU-only machine (device cpu) both parts run on the CPU, one after the other (at once they
would compete for the same cores), from the same store (the disk store reads the expert into a
scratch buffer first).

The CPU part is one native call per layer (moekit.native.experts for dense experts,
moekit.native.compressed for int-N and the ternary code, decoded inside the matvec): a matvec per
weight row, streamed once by all the worker's threads, with one barrier between the gate/up and
the down stage. Where no compiler is found it runs in PyTorch, expert by expert: 3-4 ops each
(and `--misses cpu` refuses compressed forms, whose PyTorch path decodes whole matrices).

Which experts live on the device (batch 1). Every use of a cached expert saves its CPU time; a
fetch costs more link time than the CPU needs to compute the expert once (when host memory is
faster than the link), so in "cpu" mode a miss is never fetched at demand. Instead the cache
should hold the most used experts: the policy decides as before (lfu counts now include the
uses computed on the CPU; --pin-counts pins the most used), and the contents change by prefill
(long calls fetch), by prefetch, and by admission: after computing a miss on the CPU, while
the link is idle, an expert used more than twice as often as the least used cached one (lfu) is
copied in in the background; nothing ever waits for it. With near-uniform routing (random
weights) counts stay even and admissions stop; with skewed routing the cache converges on the
popular experts. An expert whose copy is still in flight runs on the CPU in "cpu" mode (it is
never waited for) and by the cost model in "auto".

Prefetch with a cost model (CUDA): a predicted expert is prefetched only if its copy is expected
to land within this call's CPU time + cpu_s(1 token): landing later, it would lose to the next
layer computing it on the CPU, while its DMA competes with the CPU for host memory bandwidth.
At mixtral's shape a copy (6.4 ms) outlasts computing the expert (~2 ms), so nothing is
prefetched; at qwen3-30b-a3b's (9.4 MB, 0.17 ms) several experts are.

The "auto" cost model. Per layer call, the experts not ready on the device are split between
the link and the CPU so that the call's time, max(device side, CPU side), is smallest:
    device side = the latest landing among the experts it waits for: a copy in flight lands at its
                  modelled time (ExpertCache.eta_s); the k-th demand fetch at queue_s + k * fetch_s
                  (copies run one after another on one stream; fetch_s = expert bytes / link rate)
    CPU side    = sum over CPU experts of cpu_s(tokens routed to it); cpu_s(n) is linear between
                  the times measured at n = 1 and n = cpu_max_tokens (a small-batch matmul reads
                  the weights once; each token adds its FLOPs)
Only a miss the cache would keep may be fetched: one that takes a free slot, or (lfu) replaces
an expert it outnumbers in uses by ADMIT_RATIO, the admission rule (ExpertCache.fetch_room);
the others run on the CPU whatever the link's speed. A demand fetch evicts, and fetching every
miss the link could carry swapped popular experts out for one-off ones (H200, OLMoE, 64 slots,
before this rule: the hit rate fell from 0.58 to 0.35, and "auto" decoded 47.6 tok/s against
"cpu"'s 51.2). Under lru (no counts) only free slots take fetches.
Greedy: everything starts on the device; the expert finishing last there moves to the CPU, again
and again, keeping the best split seen (m misses: m steps). The rates are measured at load:
three back-to-back fetches of layer-0 experts into the cache (a disk store's read included) and
CPU calls of top_k distinct experts at 1 and cpu_max_tokens tokens each, divided by top_k: an
expert's share of a decode call (median of three, after a warm-up; measure_costs says why not
one expert alone). Not modelled: device compute of the cached experts (tens of microseconds), the
call's fixed cost, the sum's copy back (which may queue behind prefetch copies on the link), and
the link's DMA competing with the CPU for host memory bandwidth. On a CPU-only machine nothing
crosses a link (the cache is host memory too), so "auto" fetches.

The in-place share (auto, CUDA, forms the offset kernels read in place: dense). The link need not
carry a miss into the cache to serve it: the device can read it in place from the pinned host
store (offload.mapped), costing no slot and evicting nothing. After the split above, the costliest
CPU experts move to in-place reads while that lowers max(link time: the fetch queue plus their
in-place seconds, the CPU seconds left) (share_in_place), so the CPU and the link stream at once,
as the issue's combined ceiling assumes (H200: 72 + 51.5 GB/s together). Only experts of at least
source.IN_PLACE_MIN_EXPERT_BYTES get the share (H200: +27% on Mixtral's host row, 352 MB experts
split whole 1 + 1; -25% on OLMoE's, 12.6 MB experts). The in-place rate is an
expert's share of a synchronised one-token call of top_k experts, measured at load
(in_place_time), then corrected from the calls' own device time (observe_in_place: two CUDA
events around each call's in-place part, read a call later without waiting).
MOEKIT_IN_PLACE=0 leaves the share out.

The row split (on by default; MOEKIT_ROW_SPLIT=0 turns it off). Whole experts split
coarsely where a token has few: Mixtral's top-2 gives one expert to each side, and one 352 MB
expert read in place (~7.8 ms at the H200's load-time rate) outlasts one computed on the CPU
(~3.8 ms). With the split on, every miss bound for the CPU is cut at one ffn row r (row_split):
the CPU computes rows [0, r) of each (native.experts, rows) while the device reads rows
[r, I) of each in place (the slot kernels, rows), and the two partial outputs add. Only where
every CPU-bound miss is absent from the cache (one native call takes one slice), for dense
experts in a host store (CpuWorker.splits_rows), among experts of IN_PLACE_MIN_EXPERT_BYTES.
Decode steps then run with the CPU as partner, the split inside the captured step (offload.partner:
every missed expert cut at r from the load-time rates, source.partner_rows; MOEKIT_CPU_GRAPH=0
keeps the per-call split above). H200 at 2ef1e0c, Mixtral-8x7B shape cut to 8 layers, all experts in
host memory at llama.cpp's 2.52 GB: 13.7 tok/s whole, 17.7 with the split in the partner's step
(101% of the combined ceiling; llama.cpp 14.7); the per-call form has not been timed.

Shapes: N = tokens of the call, A = experts per token, D = hidden, n = tokens of one expert.
"""

from __future__ import annotations

import os
import statistics
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass

import torch

from ..experts.forms import DenseForm
from ..native.experts import (
    MAX_JOB_TOKENS,
    MAX_ROW,
    Scratch,
    Started,
    check_runner_team,
    expert_ffn_stacked,
    usable,
)
from .layout import SlotLayout
from .store import DiskStore, HostStore

ADMIT_RATIO = 2.0  # a CPU-run expert replaces the least used cached one (lfu) when used this many times as often
PROFILE_ENV = "MOEKIT_PROFILE_CPU_MISSES"  # "1": record host timestamps of every split layer call (MissProfile)
ASYNC_ENV = "MOEKIT_CPU_ASYNC"  # "0": run the native call inline on CUDA too (the path before the runner thread)
IN_PLACE_ENV = "MOEKIT_IN_PLACE"  # "0": misses auto's split has no in-place share (CPU and fetches only)
ROW_SPLIT_ENV = "MOEKIT_ROW_SPLIT"  # "0": the in-place share takes whole experts (the row split is on by default)
ROW_QUANTUM = 64  # a row split's boundary is a multiple of this many ffn rows


class MissProfile:
    """Host timestamps (time.perf_counter seconds) of each layer call that ran experts on the CPU,
    recorded when MOEKIT_PROFILE_CPU_MISSES=1 (read when the worker is made; off, the path pays one
    `is None` test per mark). benchmarks/probes/profile_cpu_misses.py turns them into times.

    One dict per call: layer, cpu_experts, device_experts, and the marks in the order they happen:
    enter (run() starts), sync_start / sync_end (the routing's .tolist(): the host waits for the
    GPU segment and the D2H of ids), split (the device/CPU decision made), device_launched (device
    part, prefetch, admissions queued), cpu_start (the previous sum's copy checked done), kernel_start
    / kernel_end (the native call: its wrapper's checks and ctypes arrays, ~10 us, and the
    kernel; before it the jobs' routes are built in Python), h2d_start / h2d_end (the sum's copy to the device
    queued), exit (run() returns); on CUDA also h2d_events (start, end) around the copy.
    Where the call runs on the runner thread (CpuWorker.asynchronous) the order is split, cpu_start,
    kernel_start (the call posted), device_launched, kernel_wait (the host starts waiting for it),
    kernel_end (the wait returned), h2d_start ...: kernel_start..kernel_end is then the call's
    wall time beside the device part, kernel_wait..kernel_end what the host waited for it."""

    def __init__(self):
        self.calls: list[dict] = []
        self.current: dict | None = None

    def begin(self, layer: int) -> None:
        self.current = {"layer": layer, "enter": time.perf_counter()}
        self.calls.append(self.current)

    def mark(self, name: str) -> None:
        if self.current is not None:
            self.current[name] = time.perf_counter()

    def note(self, **values) -> None:
        if self.current is not None:
            self.current.update(values)

    def clear(self) -> None:
        self.calls, self.current = [], None


# How far one observed CPU call moves CostModel.cpu_scale toward observed / modelled (geometrically):
# ~10 layer calls (under a token of a 16-layer model) follow a persistent change, one odd call moves it ~20%.
CPU_SCALE_STEP = 0.2
CPU_SCALE_RANGE = (1 / 16, 16.0)  # the most a run's calls may correct the load-time measurement


@dataclass
class CostModel:
    """Rates measured at load (see the module docstring), in seconds and bytes, and the CPU side's
    correction learned from the calls since (observe_cpu)."""

    h2d_bytes_per_s: float  # store -> device cache, whole fetches of one expert (disk read included)
    cpu_s_one: float  # an expert's share of a CPU layer call of top_k experts, 1 token each (median)
    cpu_s_max: float  # ... max_tokens tokens each
    max_tokens: int
    cpu_scale: float = 1.0  # observed CPU call seconds / modelled, followed over the run's calls
    cpu_calls: int = 0  # CPU calls observed
    in_place_s_one: float = 0.0  # an expert's share of a device call reading top_k experts in place (0: no in-place share)
    in_place_scale: float = 1.0  # observed in-place seconds / modelled (CUDA events of the calls, read without waiting)
    in_place_calls: int = 0  # in-place parts observed

    def cpu_s(self, tokens: int) -> float:
        """Returns the modelled seconds to compute one expert on the CPU for `tokens` tokens."""
        if self.max_tokens <= 1:
            return self.cpu_scale * self.cpu_s_one
        slope = (self.cpu_s_max - self.cpu_s_one) / (self.max_tokens - 1)
        return self.cpu_scale * (self.cpu_s_one + max(slope, 0.0) * (tokens - 1))

    def observe_cpu(self, modelled_s: float, seconds: float) -> None:
        """Moves cpu_scale toward what a CPU call took (`seconds`, the kernel's own time) against what
        the model gave it (`modelled_s`: cpu_s summed over its experts). The load-time figure is three
        calls on a cold team and varied 0.2-1.2 ms an OLMoE expert between loads on the H200 (issue 12):
        at 1.2 ms "auto" moved ~90% of the missed bytes over the link; the calls themselves say which is right."""
        if modelled_s <= 0 or seconds <= 0:
            return
        lo, hi = CPU_SCALE_RANGE
        self.cpu_scale = min(hi, max(lo, self.cpu_scale * (seconds / modelled_s) ** CPU_SCALE_STEP))
        self.cpu_calls += 1

    def in_place_s(self) -> float:
        """Returns the modelled seconds the device takes to read one expert in place (0: no in-place share)."""
        return self.in_place_scale * self.in_place_s_one

    def observe_in_place(self, modelled_s: float, seconds: float) -> None:
        """Moves in_place_scale toward what an in-place part took on the device (`seconds`, between two
        CUDA events around it) against the model (`modelled_s`), as observe_cpu does for the CPU: the
        load-time figure is read alone, while in a decode call the CPU streams host memory beside it
        (OLMoE, H200: the share cost 25% where the load-time rate said it would pay)."""
        if modelled_s <= 0 or seconds <= 0:
            return
        lo, hi = CPU_SCALE_RANGE
        self.in_place_scale = min(hi, max(lo, self.in_place_scale * (seconds / modelled_s) ** CPU_SCALE_STEP))
        self.in_place_calls += 1

    def fetch_s(self, nbytes: int) -> float:
        """Returns the modelled seconds one fetch of `nbytes` occupies the link."""
        return nbytes / self.h2d_bytes_per_s

    def to_dict(self) -> dict:
        return asdict(self)


def share_in_place(cpu: list[tuple[int, float]], link_s: float, in_place_s: float) -> list[int]:
    """Returns the experts of `cpu` ((expert, its CPU seconds), those the split left to the CPU and
    not on their way to the device) that the device should read in place instead, costliest on the
    CPU first, while that lowers max(link_s + their in-place seconds, the CPU seconds left): the
    link and the CPU finish together (offload.cpu, "The in-place share"). link_s: when the link's
    copy queue drains (the demand fetches the split chose included)."""
    left = sum(c for _, c in cpu)
    moved: list[int] = []
    for e, c in sorted(cpu, key=lambda t: -t[1]):
        if in_place_s <= 0 or max(link_s + in_place_s, left - c) >= max(link_s, left):
            break
        link_s += in_place_s
        left -= c
        moved.append(e)
    return moved


def row_split(cpu_s: float, in_place_s: float, width: int, quantum: int | None = None) -> int | None:
    """Returns r: the CPU computes ffn rows [0, r) of each expert split by rows and the device reads
    rows [r, width) in place, so both take about as long (r / width = in_place_s / (cpu_s +
    in_place_s), per whole expert); r a multiple of `quantum` strictly inside, or None where the
    experts are narrower than two quanta or a rate is missing (offload.cpu, "The row split");
    `quantum` defaults to ROW_QUANTUM."""
    quantum = quantum or ROW_QUANTUM
    if cpu_s <= 0 or in_place_s <= 0 or width < 2 * quantum:
        return None
    r = round(width * in_place_s / (cpu_s + in_place_s) / quantum) * quantum
    return min(max(r, quantum), width - quantum)


def split_misses(inflight: list[tuple[int, float, float]], absent: list[tuple[int, float]], queue_s: float,
                 fetch_s: float, max_fetch: int, cpu_only: list[tuple[int, float]] = ()) -> list[int]:
    """Returns the experts to compute on the CPU, of those not ready on the device, minimising
    max(device wait, CPU time) (the "auto" cost model, greedy; see the module docstring).

    inflight: (expert, seconds until its copy lands, its CPU seconds); absent: (expert, its CPU
    seconds); queue_s: seconds until the copy queue drains; fetch_s: one demand fetch's seconds;
    max_fetch: slots free for demand fetches (the rest of the absent experts must go to the CPU);
    cpu_only: (expert, its CPU seconds) of absent experts that may not be fetched (the cache would
    evict a more valuable one for them: ExpertCache.fetch_room), on the CPU whatever the split."""
    waiting = sorted(inflight, key=lambda t: t[1])  # kept on the device; the latest to land is last
    fetched = sorted(absent, key=lambda t: -t[1])  # fetch the costliest on the CPU first
    cpu = list(cpu_only) + [(e, c) for e, c in fetched[max(max_fetch, 0):]]
    fetched = fetched[:max(max_fetch, 0)]

    def cost() -> float:
        device = max([t[1] for t in waiting] + ([queue_s + len(fetched) * fetch_s] if fetched else []), default=0.0)
        return max(device, sum(c for _, c in cpu))

    best, best_cpu = cost(), list(cpu)
    while waiting or fetched:
        last_fetch = queue_s + len(fetched) * fetch_s if fetched else -1.0
        last_wait = waiting[-1][1] if waiting else -1.0
        if last_fetch >= last_wait:
            cpu.append(fetched.pop())  # one fetch fewer: the cheapest on the CPU of those fetched
        else:
            e, _, c = waiting.pop()
            cpu.append((e, c))
        now = cost()
        if now < best:  # strictly: on a tie the device keeps it (and the cache keeps the copy)
            best, best_cpu = now, list(cpu)
    return [e for e, _ in best_cpu]


def native_usable(layout: SlotLayout, max_tokens: int) -> bool:
    """Returns whether a native CPU kernel computes this layout's experts (dense bf16, fp16 or
    fp32 rows, or a compressed form with its `native_ffn`; calls of at most max_tokens tokens, a
    compiler on this machine)."""
    form = layout.form
    if max_tokens > MAX_JOB_TOKENS or form.ffn > MAX_ROW or form.hidden > MAX_ROW:
        return False
    if isinstance(form, DenseForm):
        return usable(torch.empty(0, form.hidden, dtype=form.dtype), form.dtype)
    return hasattr(form, "native_ffn") and form.cpu_fast  # quant.formats.CompressedForm


class CpuWorker:
    """Runs routed experts on the CPU from the store: beside CUDA the native call on the library's
    runner thread while the caller launches the device part, else inline on the calling thread
    (module docstring), with pinned buffers for x, the routing weights and the sum beside a CUDA device."""

    def __init__(self, layout: SlotLayout, store: HostStore | DiskStore, device: torch.device, max_tokens: int,
                 threads: int = 0, threaded: bool = False, asynchronous: bool | None = None):
        """`threads`: the native call's team (OpenMP, or on the runner thread its own: native/team.h;
        0: beside CUDA one fewer than torch's, leaving a
        core to the host thread that launches the device part (and the CUDA runtime's own threads):
        a team that shares its cores waits for a descheduled member at every barrier; on a CPU-only
        machine torch's). `threaded` runs the experts on a Python worker thread instead (the former
        design, kept for comparison and its test). `asynchronous` (None: beside CUDA with the native
        kernel and a host store, unless MOEKIT_CPU_ASYNC=0) starts the native call on the runner
        thread in `submit` and waits for it in `join`; the call's results are the inline call's."""
        self.layout, self.store, self.device, self.max_tokens = layout, store, device, max_tokens
        self.cuda = device.type == "cuda"
        self.threads = threads or (max(1, torch.get_num_threads() - 1) if self.cuda or threaded
                                   else torch.get_num_threads())
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="moekit-cpu-experts") if threaded else None
        self.buffers: dict[str, torch.Tensor] = {}  # name -> pinned [max_tokens, cols]
        self.sent: torch.cuda.Event | None = None  # the last sum's copy to the device (reads "out")
        self.worker_threads_set = False
        self.native = native_usable(layout, max_tokens)  # the native kernel, else the PyTorch path
        self.scratch = Scratch() if self.native else None
        if asynchronous is None:  # a disk store reads each expert in Python between calls: inline
            asynchronous = self.cuda and os.environ.get(ASYNC_ENV, "1") != "0"
        self.asynchronous = asynchronous and self.native and store.kind != "disk" and not threaded
        if self.asynchronous:  # the runner serves this worker's calls and the partner's steps
            check_runner_team()
        self.profile = MissProfile() if os.environ.get(PROFILE_ENV) == "1" else None

    def _buffer(self, name: str, cols: int, dtype: torch.dtype) -> torch.Tensor:
        buf = self.buffers.get(name)
        if buf is None or buf.shape[1] != cols or buf.dtype != dtype:
            with torch.inference_mode(False):  # a normal tensor: writable in and outside inference mode
                buf = self.buffers[name] = torch.empty(self.max_tokens, cols, dtype=dtype, pin_memory=True)
        return buf

    def stage(self, x: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns host views of x [N, D] and weights [N, A]; on CUDA their copies are only queued
        on the stream: the caller's next host sync completes them."""
        if not self.cuda:
            return x, weights
        n = x.shape[0]
        x_host = self._buffer("x", x.shape[1], x.dtype)[:n]
        w_host = self._buffer("w", weights.shape[1], weights.dtype)[:n]
        x_host.copy_(x, non_blocking=True)
        w_host.copy_(weights, non_blocking=True)
        return x_host, w_host

    @property
    def overlaps(self) -> bool:
        """Returns whether `submit` returns before the CPU part is done (a worker thread or the
        runner thread): then the caller submits before it queues the device part."""
        return self.worker is not None or self.asynchronous

    def submit(self, layer: int, jobs: list[tuple[int, list[int]]], x_host: torch.Tensor,
               w_host: torch.Tensor, rows: tuple[int, int] | None = None) -> Future | tuple:
        """Starts sum over jobs (expert, its flat slots n * A + a) of w[slot] * expert(x[n]) as
        [N, D] on the CPU; returns the handle for `join`. `rows` (r0, r1): only those ffn rows of
        each expert (`splits_rows` says where that is served)."""
        # beside CUDA the sum goes to a pinned buffer (its copy to the device is then asynchronous);
        # on the CPU it is the layer's output: a new tensor
        out = (self._buffer("out", x_host.shape[1], x_host.dtype)[:x_host.shape[0]] if self.cuda
               else torch.empty_like(x_host))
        if rows is not None and not self.splits_rows:
            raise ValueError("this CPU path computes whole experts only (rows need the native kernel on dense "
                             "experts in host memory)")
        if self.worker is None:
            return self._compute(layer, jobs, x_host, w_host, out, rows)
        # inference and grad modes are per thread: the worker runs in the caller's
        return self.worker.submit(self._in_mode, torch.is_inference_mode_enabled(), layer, jobs, x_host, w_host, out,
                                  rows)

    @property
    def splits_rows(self) -> bool:
        """Whether a call may compute a slice of each expert's ffn rows (the native kernel on dense
        experts in a host store)."""
        return self.native and isinstance(self.layout.form, DenseForm) and self.store.kind != "disk"

    def join(self, handle: Future | tuple) -> tuple[torch.Tensor, float, float]:
        """Returns (the CPU sum on the model's device, CPU seconds, seconds waited here for it).
        A started call's CPU seconds are the runner's own time of it (not the span from its start,
        which also holds the device part's launches)."""
        t0 = time.perf_counter()
        if isinstance(handle, Future):
            out, cpu_s = handle.result()
            wait_s = time.perf_counter() - t0
        elif isinstance(handle[0], Started):
            started, began = handle
            if self.profile is not None:
                self.profile.mark("kernel_wait")
            out = started.wait()
            if self.profile is not None:
                self.profile.mark("kernel_end")
            end = time.perf_counter()
            # the runner's own time of the call (the span from its start also holds the device part)
            cpu_s, wait_s = (started.seconds if started.seconds is not None else end - began), end - t0
        else:
            out, cpu_s = handle
            wait_s = cpu_s
        if self.cuda:
            prof = self.profile
            if prof is not None:
                prof.mark("h2d_start")
                events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                events[0].record()
            out = out.to(self.device, non_blocking=True)
            self.sent = torch.cuda.Event()
            self.sent.record()
            if prof is not None:
                events[1].record()
                prof.note(h2d_events=events)
                prof.mark("h2d_end")
        return out, cpu_s, wait_s

    def abandon(self, handle: Future | tuple) -> None:
        """Waits for a submitted call whose result is not wanted (the caller failed after `submit`),
        so that no call is left running on the runner thread: the next submit then starts cleanly."""
        try:
            if isinstance(handle, Future):
                handle.result()
            elif isinstance(handle[0], Started):
                handle[0].wait()
        except Exception:  # noqa: BLE001 -- the caller's own error is the one that propagates
            pass

    def _in_mode(self, inference: bool, *args) -> tuple[torch.Tensor, float]:
        if not self.worker_threads_set:  # the intra-op pool size is per thread too
            torch.set_num_threads(self.threads)
            self.worker_threads_set = True
        with torch.inference_mode(inference), torch.no_grad():
            return self._compute(*args)

    def _compute(self, layer, jobs, x_host, w_host, out, rows=None) -> tuple:
        """Returns (out, CPU seconds) once computed, or asynchronously (a Started, its start time)."""
        if self.sent is not None:
            self.sent.synchronize()  # the previous sum has left `out` (already so after any sync)
        if self.profile is not None:
            self.profile.mark("cpu_start")
        t0 = time.perf_counter()
        if self.native:
            started = self._compute_native(layer, jobs, x_host, w_host, out, rows)
            return (started, t0) if started is not None else (out, time.perf_counter() - t0)
        if self.profile is not None:  # the PyTorch path: its ops are the kernel
            self.profile.mark("kernel_start")
        top_k = w_host.shape[1]
        w_flat = w_host.reshape(-1)
        out.zero_()
        form = self.layout.form
        for expert, flat in jobs:
            rows, row = self.store.host_rows(layer, expert)
            stacked = self.layout.view(rows, layer)
            if x_host.shape[0] == 1:  # decode: one token, each expert once; fewer small ops
                out.add_(form.apply(x_host, stacked, row) * w_flat[flat[0]])
                continue
            slots = torch.tensor(flat)
            tokens = slots // top_k
            y = form.apply(x_host[tokens], stacked, row)  # [n, D]
            out.index_add_(0, tokens, y * w_flat[slots][:, None])
        if self.profile is not None:
            self.profile.mark("kernel_end")
        return out, time.perf_counter() - t0

    def _compute_native(self, layer, jobs, x_host, w_host, out, rows=None) -> Started | None:
        """The layer's CPU experts in one native call (moekit.native.experts): every weight row
        read once, all cores, one parallel region. A disk store reads one expert at a time into
        its scratch, so there each expert is its own call. Returns the Started call where
        `asynchronous` (the caller waits for it), else None once `out` holds the sum."""
        from ..native.experts import expert_ffn

        top_k = w_host.shape[1]
        w_flat = w_host.reshape(-1).tolist()
        form = self.layout.form
        dense = isinstance(form, DenseForm)
        prof = self.profile
        if dense and self.store.kind != "disk":  # experts are rows of the store's stacks: pointers, no views
            stacked = self.layout.view(self.store.host_rows(layer, jobs[0][0])[0], layer)
            routes = []
            for e, flat in jobs:
                routes.append((self.store.host_rows(layer, e)[1], [s // top_k for s in flat], [w_flat[s] for s in flat]))
            if prof is not None:
                prof.mark("kernel_start")
            started = expert_ffn_stacked(x_host, stacked["gate_up"], stacked["down"], routes, out=out,
                                         threads=self.threads, scratch=self.scratch, start=self.asynchronous,
                                         rows=rows)
            if self.asynchronous:
                return started  # join marks kernel_end
            if prof is not None:
                prof.mark("kernel_end")
            return None

        def job(expert: int, flat: list[int]):
            rows, row = self.store.host_rows(layer, expert)
            stacked = self.layout.view(rows, layer)
            tokens, weights = [s // top_k for s in flat], [w_flat[s] for s in flat]
            if dense:
                return stacked["gate_up"][row], stacked["down"][row], tokens, weights
            return form.one(stacked, row), tokens, weights  # a compressed form's stored tensors

        def run(jobs_: list, into: torch.Tensor) -> torch.Tensor:
            if dense:
                return expert_ffn(x_host, jobs_, out=into, threads=self.threads, scratch=self.scratch)
            return form.native_ffn(x_host, jobs_, out=into, threads=self.threads, scratch=self.scratch)

        if self.store.kind != "disk":
            built = [job(e, flat) for e, flat in jobs]
            if prof is not None:
                prof.mark("kernel_start")
            if self.asynchronous:  # dense experts are stacked rows (above): this is a compressed form
                return form.native_ffn(x_host, built, out=out, threads=self.threads, scratch=self.scratch, start=True)
            run(built, out)
            if prof is not None:
                prof.mark("kernel_end")
            return None
        if prof is not None:  # here the disk reads count as the kernel's time
            prof.mark("kernel_start")
        out.zero_()
        partial = torch.empty_like(out)
        for e, flat in jobs:
            out.add_(run([job(e, flat)], partial))
        if prof is not None:
            prof.mark("kernel_end")
        return None

    def close(self) -> None:
        if self.worker is not None:
            self.worker.shutdown(wait=True)


def measure_costs(runtime, dtype: torch.dtype, reps: int = 3) -> CostModel:
    """Returns the CostModel of this machine, measured on the model's own experts: whole fetches
    into the (fresh) cache, and CPU layer calls of top_k distinct experts (cold in the CPU's caches).

    The CPU rate is an expert's share of a call of top_k experts, not one expert alone: a decode
    call runs several, and one expert alone also pays the call's fixed cost (the team's fork and
    barrier) and streams at lower bandwidth (issue 12, H200: one expert 34 GB/s, a layer's top-8
    42-83 GB/s). Measured alone it made the CPU look ~2x slower than in a layer: "auto" sent most
    misses to the link and "cpu" prefetched every predicted expert (a link-bound decode)."""
    cache, cpu, cfg = runtime.cache, runtime.cpu, runtime.model_config
    layer = runtime.moe_layers[0]
    experts = cfg.experts_in(layer)
    fetches = min(reps, cache.num_slots, experts)
    cache.synchronize()
    t0 = time.perf_counter()
    for e in range(fetches):  # back to back, as demand fetches queue: the issue overhead included once each
        cache.fetch((layer, e), set())
    cache.synchronize()
    h2d = fetches * runtime.layout.layer_bytes(layer) / (time.perf_counter() - t0)
    top_k = cfg.top_k
    # calls of `per_call` distinct experts, each call another layer's or another group's: none warm
    groups = [(i, list(range(start, min(start + top_k, cfg.experts_in(i)))))
              for i in reversed(runtime.moe_layers) for start in range(0, cfg.experts_in(i), top_k)]

    def cpu_time(tokens: int, group: tuple[int, list[int]]) -> float:
        layer_, chosen = group
        x = torch.randn(tokens, cfg.hidden_size).to(dtype)
        w = torch.full((tokens, top_k), 1.0 / top_k, dtype=dtype)
        jobs = [(e, [t * top_k + a for t in range(tokens)]) for a, e in enumerate(chosen)]  # slot a of every token
        _, seconds, _ = cpu.join(cpu.submit(layer_, jobs, x, w))
        return seconds / len(chosen)

    measured, turn = {}, 0
    for tokens in dict.fromkeys((1, cpu.max_tokens)):
        cpu_time(tokens, groups[-1])  # warm-up: library primitives, pages
        runs = []
        for _ in range(reps):  # a different group each time, so none is warm in the CPU's caches
            runs.append(cpu_time(tokens, groups[turn % len(groups)]))
            turn += 1
        measured[tokens] = statistics.median(runs)
    costs = CostModel(h2d, measured[1], measured[cpu.max_tokens], cpu.max_tokens)
    if runtime.in_place is not None:
        costs.in_place_s_one = in_place_time(runtime, groups, dtype, reps)
    return costs


def in_place_time(runtime, groups: list[tuple[int, list[int]]], dtype: torch.dtype, reps: int) -> float:
    """Returns an expert's share of a device call reading top_k experts in place for one token
    (median of `reps` calls on different groups after a warm-up, each synchronised: launch included)."""
    in_place, device = runtime.in_place, runtime.device
    x = torch.randn(1, runtime.model_config.hidden_size).to(device, dtype)

    def one(group: tuple[int, list[int]]) -> float:
        layer, chosen = group
        ids = torch.tensor(chosen, device=device).view(-1, 1)
        w = torch.full((len(chosen), 1), 1.0 / len(chosen), dtype=dtype, device=device)
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        in_place.run(layer, x.expand(len(chosen), -1).contiguous(), ids, w)
        torch.cuda.synchronize(device)
        return (time.perf_counter() - t0) / len(chosen)

    one(groups[-1])  # warm-up: the kernel's compilation for this shape
    return statistics.median(one(groups[i % len(groups)]) for i in range(reps))
