"""Machine: the levels of the hierarchical roofline model (HRM) -- peak compute and bandwidth of
the GPU and the host, and the links between them -- measured by a short profiling step and cached
in a small JSON file.

What is measured where: the host levels (memory read bandwidth with the native stream probe,
float32 GEMM FLOP/s, the native CPU attention kernel's KV bytes/s) on any machine; the GPU levels
(bf16 GEMM FLOP/s, HBM copy bandwidth, pinned host-to-device and device-to-host copies) only where
CUDA exists. Two optional levels need both: host memory read by the DMA and the CPU at once
(`profile_shared`: what the weight pages and CPU attention share in a CGOPipe layer) and the
grouped expert kernels' weight bytes/s at a model's decode shape (`profile_experts`: a few tokens
an expert reads each expert's weights at well below the HBM copy rate) and their FLOP/s at a
prefill micro-batch (`profile_prefill_experts`: many tokens an expert, compute-bound, yet well
below the dense GEMM's rate -- 204-474 of 785 TFLOP/s on the H200). A CPU-only machine planning for a GPU takes the GPU levels from a file (`--machine
FILE`, any subset of the fields) or a preset (`--machine h200`: the figures measured on the H200
machine, docs BENCH.md). All rates are per second; sizes are bytes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import MoekitError

VERSION = 1
GPU_FIELDS = ("gpu_flops", "gpu_bandwidth", "gpu_memory", "h2d_bandwidth", "d2h_bandwidth")
HOST_FIELDS = ("host_flops", "host_bandwidth", "host_memory", "cpu_attention_bandwidth")
SHARED_FIELDS = ("host_shared_bandwidth", "expert_bandwidth", "prefill_expert_flops", "launch_task_s",
                 "pipeline_attention_bandwidth")  # optional, measured where both exist


@dataclass(frozen=True)
class Machine:
    """Peak rates and capacities of one GPU + host machine (version 1); None = not known."""

    name: str = "this machine"
    gpu_flops: float | None = None  # bf16 GEMM FLOP/s of the GPU
    gpu_bandwidth: float | None = None  # HBM bytes/s (a device copy's read + write)
    gpu_memory: int | None = None  # device memory, bytes
    h2d_bandwidth: float | None = None  # host-to-device bytes/s from pinned memory
    d2h_bandwidth: float | None = None  # device-to-host bytes/s into pinned memory
    host_flops: float | None = None  # float32 GEMM FLOP/s of all host cores
    host_bandwidth: float | None = None  # host memory read bytes/s, all cores
    host_memory: int | None = None  # host memory, bytes
    cpu_attention_bandwidth: float | None = None  # KV bytes/s of the native CPU attention kernel (all cores)
    # KV bytes the attention probe read a call: past the last-level cache its rate is DRAM's, as in a
    # pipeline's decode (None: a profile from before this field, measured over 67 MB that a large L3 holds)
    cpu_attention_kv_bytes: int | None = None
    # host memory bytes/s read by a pinned host-to-device copy and the CPU together (their sum while
    # both run): the DMA of the weight pages and CPU attention share it (None: host_bandwidth)
    host_shared_bandwidth: float | None = None
    # weight bytes/s the grouped dense expert kernels read at decode (a few tokens an expert; None: gpu_bandwidth)
    expert_bandwidth: float | None = None
    # FLOP/s the grouped dense expert kernels reach on a prefill micro-batch of the model planned for
    # (profile_prefill_experts at one token count; None: gpu_flops, the dense GEMM's rate)
    prefill_expert_flops: float | None = None
    # host seconds CGOPipe's launch thread takes to issue one (layer, micro-batch) task of the model
    # planned for (timeline.launch_task_seconds; None: not counted)
    launch_task_s: float | None = None
    # KV bytes/s the batch pipeline's CPU attention worker read in a run on this machine (moekit
    # batch keeps its last run's; bench_pipeline a short run of its plan): the HRM takes it over
    # cpu_attention_bandwidth, which the probe reads alone, faster (061be12, 32 layers of the
    # Mixtral shape: 67.7 GB/s alone; inside the pipeline 478 ms of kernel a step over ~19 GB, ~40)
    pipeline_attention_bandwidth: float | None = None
    version: int = VERSION

    def __post_init__(self) -> None:
        for name in GPU_FIELDS + HOST_FIELDS + SHARED_FIELDS + ("cpu_attention_kv_bytes",):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise MoekitError(f"machine '{self.name}': {name} must be > 0 (or left out), got {value}")
        if self.version != VERSION:
            raise MoekitError(f"machine '{self.name}': version {self.version} is not {VERSION}; profile again "
                              "(delete the cached file) or fix the file")

    @property
    def has_gpu(self) -> bool:
        """Whether every GPU level is known."""
        return all(getattr(self, f) is not None for f in GPU_FIELDS)

    def missing(self) -> list[str]:
        """Returns the fields the HRM needs that are not known (cpu_attention_bandwidth is optional)."""
        need = GPU_FIELDS + ("host_flops", "host_bandwidth", "host_memory")
        return [f for f in need if getattr(self, f) is None]

    def merged(self, other: Machine) -> Machine:
        """Returns this machine with every field `other` knows taken from `other`."""
        known = {f.name: getattr(other, f.name) for f in dataclasses.fields(other)
                 if f.name not in ("version",) and getattr(other, f.name) is not None}
        if other.cpu_attention_bandwidth is not None:  # a rate and the bytes it was read over go together
            known["cpu_attention_kv_bytes"] = other.cpu_attention_kv_bytes
        return dataclasses.replace(self, **known)

    @property
    def attention_rate(self) -> float | None:
        """The CPU attention kernel's KV bytes/s the HRM plans with: inside the pipeline where a run
        measured it, else the probe's."""
        return self.pipeline_attention_bandwidth or self.cpu_attention_bandwidth

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "machine") -> Machine:
        """Returns the Machine of a JSON object; raises MoekitError naming unknown fields."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise MoekitError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        try:
            return cls(**data)
        except TypeError as e:
            raise MoekitError(f"{where}: {e}") from None


# The H200 machine (DESIGN.md, BENCH.md): measured there; host bandwidth and FLOP/s as the
# MoE-Lightning brief assumes for it (75 GB/s DRAM, 1.2 TFLOP/s), its 128 GiB of host memory.
PRESETS: dict[str, Machine] = {
    "h200": Machine(name="h200", gpu_flops=790e12, gpu_bandwidth=4.2e12, gpu_memory=139 * 2**30,
                    h2d_bandwidth=55e9, d2h_bandwidth=55e9, host_flops=1.2e12, host_bandwidth=75e9,
                    host_memory=128 * 2**30),
}


def read_machine(text: str) -> Machine:
    """Returns the machine a --machine value names: a preset (h200) or a JSON file of fields."""
    if text in PRESETS:
        return PRESETS[text]
    path = Path(text)
    if not path.is_file():
        raise MoekitError(f"--machine {text}: neither a preset ({', '.join(PRESETS)}) nor a JSON file")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MoekitError(f"--machine {path}: not a JSON object of machine fields ({e})") from None
    if not isinstance(data, dict):
        raise MoekitError(f"--machine {path}: expected a JSON object of machine fields")
    return Machine.from_dict({"name": path.stem, **data}, where=str(path))


# ---- profiling ---------------------------------------------------------------------------------

def host_memory_bytes() -> int:
    """Returns the host's physical memory in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def host_memory_available(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """Returns the host memory the kernel says a new allocation can take without swapping
    (MemAvailable: free memory plus reclaimable caches), bytes; None where it does not say."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def host_reserve_bytes(total: int | None = None) -> int:
    """Returns the host memory a plan leaves free for everything it does not count (the Python
    process, CUDA's context and staging, the allocators' slack): 4 GiB or 5% of the host, the larger."""
    total = host_memory_bytes() if total is None else total
    return max(4 << 30, total // 20)


def free_host_budget(held: int = 0, meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """Returns the host bytes a plan may hold on this machine: the memory available now, plus
    `held` (what the plan counts that is allocated already: a host expert store loaded before
    planning), less host_reserve_bytes; None where the kernel does not say what is available (the
    HRM then plans within 80% of host memory). Issue 14: the KV pool is sized from the host memory
    actually free -- 80% of a 135 GB host capped Mixtral's 32 layers in bf16 at N=512 where ~1000
    sequences' KV fit beside the 93 GB of weights."""
    available = host_memory_available(meminfo)
    if available is None:
        return None
    return max(0, available + held - host_reserve_bytes())


def _best(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def profile_host(quick: bool = False) -> dict[str, float]:
    """Returns the measured host levels {host_flops, host_bandwidth, host_memory,
    cpu_attention_bandwidth} (about a second; `quick`: smaller probes, for tests)."""
    import torch

    from ..native import experts as native_experts
    from ..native import library

    out: dict[str, float] = {"host_memory": host_memory_bytes()}
    n = 256 if quick else 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    out["host_flops"] = 2 * n ** 3 / _best(lambda: a @ b, 2 if quick else 3)
    if library() is None:
        buf = torch.ones((16 if quick else 256) << 20, dtype=torch.uint8)
        out["host_bandwidth"] = buf.numel() / _best(lambda: buf.sum(dtype=torch.int64), 3)
        return out
    out["host_bandwidth"] = native_experts.stream_read_bytes_per_s((32 if quick else 512) << 20, reps=3)
    out["cpu_attention_bandwidth"], out["cpu_attention_kv_bytes"] = _attention_rate(quick)
    return out


def last_level_cache_bytes(root: Path = Path("/sys/devices/system/cpu")) -> int | None:
    """Returns the bytes of the host's last cache level (sysfs): every distinct instance of the
    highest level summed (several sockets or AMD's per-CCD L3s), or None where it cannot be read."""
    instances: dict[tuple[int, str], int] = {}  # (level, the CPUs sharing it) -> bytes
    for index in root.glob("cpu[0-9]*/cache/index[0-9]*"):
        try:
            level = int((index / "level").read_text())
            text = (index / "size").read_text().strip()
            shared = (index / "shared_cpu_list").read_text().strip()
        except (OSError, ValueError):
            continue
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
        digits = text[:-1] if unit != 1 else text
        if digits.isdigit():
            instances[(level, shared)] = int(digits) * unit
    if not instances:
        return None
    top = max(level for level, _ in instances)
    return sum(size for (level, _), size in instances.items() if level == top)


def attention_probe_bytes() -> int:
    """Returns the KV bytes the attention probe reads a call: 4x the last-level cache (so the rate
    is DRAM's, as a pipeline's decode reads gigabytes of KV a step: at c8f8092 and 13a0b14 the
    pipeline's worker read 28-33 GB/s while a 67 MB probe, inside the H200 host's 300 MiB L3, read
    68-78), at least 512 MiB, at most 2 GiB and an eighth of host memory."""
    llc = last_level_cache_bytes() or 256 << 20
    return int(min(max(4 * llc, 512 << 20), 2 << 30, host_memory_bytes() // 8))


def _attention_rate(quick: bool) -> tuple[float, int]:
    """Returns (the native CPU attention kernel's KV bytes/s, KV bytes a call) on a Mixtral-shaped
    bf16 decode step: sequences of 144 positions (an MTBench-like prompt plus half of 128 new
    tokens) in 16-position blocks drawn at random from the pool, as many sequences as
    attention_probe_bytes() holds (quick: 4 of 256 positions, for tests)."""
    import torch

    from ..native import attention
    from ..native.hugepages import advise_huge_pages

    block, hkv, dh = 16, 8, 128
    if quick:
        seqs, length = 4, 256
    else:
        length = 144
        seqs = max(1, attention_probe_bytes() // (length * 2 * hkv * dh * 2))
    per = -(-length // block)
    blocks = seqs * per
    keys = torch.empty(blocks, block, hkv, dh, dtype=torch.bfloat16)
    values = torch.empty_like(keys)
    advise_huge_pages([keys, values])  # as the pipeline's pool (prefill.empty_host_cache)
    tile = torch.randn(block, hkv, dh).to(torch.bfloat16)  # random values, written fast: one block repeated
    keys.copy_(tile.expand_as(keys))
    values.copy_(tile.flip(0).expand_as(values))
    gen = torch.Generator().manual_seed(0)
    tables = torch.randperm(blocks, generator=gen).to(torch.int32).view(seqs, per)
    lens = torch.full((seqs,), length, dtype=torch.int32)
    q = torch.randn(seqs, 32, dh, generator=gen).to(torch.bfloat16)
    seconds = _best(lambda: attention.decode_attention(q, keys, values, tables, lens), 3)
    nbytes = attention.kv_bytes(keys, lens)
    return nbytes / seconds, int(nbytes)


def profile_gpu(device: str = "cuda") -> dict[str, float]:
    """Returns the measured GPU levels (GPU_FIELDS) of a CUDA device: bf16 GEMM, device copy,
    pinned copies both ways (a few seconds)."""
    import torch

    def timed(fn) -> float:
        return _gpu_best(fn, device, 5)

    n = 8192
    mats = [torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2)]
    flops = 2 * n ** 3 / timed(lambda: mats[0] @ mats[1])
    mats.clear()
    size = 1 << 30
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    hbm = 2 * size / timed(lambda: dst.copy_(src))
    host = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    h2d = size / timed(lambda: src.copy_(host, non_blocking=True))
    d2h = size / timed(lambda: host.copy_(src, non_blocking=True))
    total = torch.cuda.get_device_properties(device).total_memory
    return {"gpu_flops": flops, "gpu_bandwidth": hbm, "gpu_memory": total, "h2d_bandwidth": h2d, "d2h_bandwidth": d2h}


def profile_shared(device: str = "cuda", nbytes: int = 1 << 30, threads: int | None = None) -> dict[str, float]:
    """Returns {host_shared_bandwidth, h2d_shared, cpu_read_shared} (bytes/s): pinned host-to-device
    copies of `nbytes` / 4 issued back to back while `threads` host threads (default: all usable but
    two, as CGOPipe's attention) read `nbytes` of host memory 8 times with the native stream probe;
    each rate over its own run, the shared level their sum. Needs CUDA and the native library."""
    import threading

    import torch

    from ..native import library

    lib = library()
    if lib is None:
        raise MoekitError("profile_shared needs the native library (moekit.native)")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = threads or max(1, cores - 2)
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    buf = torch.ones(nbytes // 8, dtype=torch.int64)
    dst.copy_(src, non_blocking=True)  # warm both paths
    torch.cuda.synchronize(device)
    lib.moekit_stream_read(buf.data_ptr(), buf.numel() * 8, threads)
    passes, cpu = 8, {}
    chunk = max(1, nbytes // 4)  # copies of a quarter: the DMA's tail past the reader's end stays short

    def read() -> None:
        t0 = time.perf_counter()
        for _ in range(passes):
            lib.moekit_stream_read(buf.data_ptr(), buf.numel() * 8, threads)  # ctypes: the GIL is released
        cpu["s"] = time.perf_counter() - t0

    reader = threading.Thread(target=read)
    copies = 0
    t0 = time.perf_counter()
    reader.start()
    while reader.is_alive() or copies == 0:
        dst[:chunk].copy_(src[:chunk], non_blocking=True)
        torch.cuda.synchronize(device)
        copies += 1
    dma_s = time.perf_counter() - t0
    reader.join()
    h2d, cpu_rate = copies * chunk / dma_s, passes * nbytes / cpu["s"]
    return {"host_shared_bandwidth": h2d + cpu_rate, "h2d_shared": h2d, "cpu_read_shared": cpu_rate}


def _expert_call(hidden: int, ffn: int, experts: int, top_k: int, tokens: int, device: str):
    """Returns (a call of the grouped dense expert kernels on `tokens` random bf16 tokens over
    `experts` SwiGLU experts of hidden x ffn, routed top-k uniformly at random; the experts it touches)."""
    import torch

    from ..experts import triton_ops

    g = torch.Generator(device=device).manual_seed(0)
    gate_up = torch.randn(experts, 2 * ffn, hidden, device=device, dtype=torch.bfloat16, generator=g) * 0.02
    down = torch.randn(experts, hidden, ffn, device=device, dtype=torch.bfloat16, generator=g) * 0.02
    x = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16, generator=g)  # [T, D]
    ids = torch.rand(tokens, experts, device=device, generator=g).topk(top_k, dim=1).indices  # [T, A]
    weights = torch.full((tokens, top_k), 1.0 / top_k, device=device, dtype=torch.bfloat16)
    return (lambda: triton_ops.grouped_expert_ffn(x, ids, weights, gate_up, down)), int(torch.unique(ids).numel())


def profile_experts(hidden: int, ffn: int, experts: int, top_k: int, tokens: int, device: str = "cuda",
                    reps: int = 5) -> float:
    """Returns the weight bytes/s the grouped dense expert kernels (experts.triton_ops) read on a
    call of `tokens` tokens over `experts` bf16 SwiGLU experts of hidden x ffn, top-k routed
    uniformly at random: the experts touched times their bytes over the call's time (CUDA)."""
    call, touched = _expert_call(hidden, ffn, experts, top_k, tokens, device)
    return touched * 3 * hidden * ffn * 2 / _gpu_best(call, device, reps)


def profile_prefill_experts(hidden: int, ffn: int, experts: int, top_k: int, tokens: int, device: str = "cuda",
                            reps: int = 5) -> float:
    """Returns the FLOP/s of the grouped dense expert kernels on a prefill call of `tokens` tokens
    (a micro-batch's packed prompts) over `experts` bf16 SwiGLU experts of hidden x ffn, top-k
    routed uniformly at random: top_k expert FLOPs a token over the call's time (CUDA); the
    Machine's prefill_expert_flops."""
    call, _ = _expert_call(hidden, ffn, experts, top_k, tokens, device)
    return tokens * top_k * 3 * hidden * ffn * 2 / _gpu_best(call, device, reps)


def _gpu_best(fn, device: str, reps: int) -> float:
    """Returns the fastest of `reps` timed calls of fn on the device (seconds; CUDA events), after one
    untimed call."""
    import torch

    fn()
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return best


def cache_path() -> Path:
    """Returns the JSON file this machine's profile is cached in."""
    from ..native import cache_dir

    return cache_dir().parent / "hrm" / f"machine-{os.uname().nodename}.json"


def record_pipeline_attention(rate: float, path: Path | None = None) -> Path | None:
    """Keeps `rate` (KV bytes/s the pipeline's attention worker read) in this machine's cached
    profile for the next plans; returns the file, or None where there is no readable profile to
    keep it in (nothing written then). The file is replaced whole, never half-written."""
    path = path or cache_path()
    try:
        machine = Machine.from_dict(json.loads(path.read_text()), where=str(path))
    except (MoekitError, json.JSONDecodeError, OSError):
        return None
    data = dataclasses.replace(machine, pipeline_attention_bandwidth=rate).to_dict()
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, path)
    except OSError:  # a read-only or full cache folder: the run's results stand, the profile stays as it was
        tmp.unlink(missing_ok=True)
        return None
    return path


def this_machine(path: Path | None = None, refresh: bool = False, quick: bool = False) -> Machine:
    """Returns this machine's profile: read from the cache file, else measured (host levels; GPU
    levels where CUDA exists) and written there."""
    import torch

    path = path or cache_path()
    if path.is_file() and not refresh:
        try:
            cached = Machine.from_dict(json.loads(path.read_text()), where=str(path))
            # a profile whose attention rate was read inside the cache (before cpu_attention_kv_bytes) is measured again
            if cached.cpu_attention_bandwidth is None or cached.cpu_attention_kv_bytes is not None:
                return cached
        except (MoekitError, json.JSONDecodeError, OSError):
            pass  # a damaged or old cache is measured again
    levels: dict[str, Any] = profile_host(quick)
    if torch.cuda.is_available():
        levels.update(profile_gpu())
    machine = Machine(name=os.uname().nodename, **levels)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(machine.to_dict(), indent=2))
    os.replace(tmp, path)
    return machine
