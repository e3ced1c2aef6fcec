"""What every benchmark shares: logging, timing, the run's provenance (git commit and dirty flag,
device, versions, command) and its JSON file, plus the ceilings of BENCH.md.

Scripts in benchmarks/ import it as `import common` (their own folder is on sys.path when run as
`python3 benchmarks/NAME.py`); scripts in benchmarks/probes/ put benchmarks/ on sys.path first.
Importing it also makes `import moekit` work from a source checkout without PYTHONPATH=src.

Timing: `do_bench_s` (triton.testing.do_bench, median, L2 flushed) for single kernels on CUDA;
`times_s` / `median_s` (CUDA events, optional L2 flush; perf_counter on the CPU) for calls that
sync with the host or are not kernels (a generate call, a copy).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
try:  # a source checkout run without PYTHONPATH=src: use the tree next to this file
    import moekit  # noqa: F401
except ImportError:
    sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402

# Ceilings measured on the GPU machine (BENCH.md); re-measure in the run where it matters.
HBM_BYTES_PER_S = 4.2e12  # HBM device-to-device copy, read + write counted
BF16_FLOP_PER_S = 790e12  # bf16 GEMM 8192x4096x14336
H2D_PINNED_BYTES_PER_S = 55e9  # host-to-device copy from page-locked memory (pageable: 8.5e9)

T_START = time.perf_counter()


# ---- logging ----------------------------------------------------------------------------------

def log(msg: str) -> None:
    """Prints `msg` with the wall-clock time and the seconds since the script started."""
    print(f"[{time.strftime('%H:%M:%S')} {time.perf_counter() - T_START:7.1f}s] {msg}", flush=True)


# ---- provenance -------------------------------------------------------------------------------

def _git(*args: str) -> str | None:
    try:
        r = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def git_commit() -> str:
    """Returns MOEKIT_GIT_COMMIT (the GPU machine's copy has no .git), else HEAD, else 'unknown'."""
    for var in ("MOEKIT_GIT_COMMIT", "GIT_COMMIT"):
        if os.environ.get(var):
            return os.environ[var]
    return _git("rev-parse", "HEAD") or "unknown"


def git_dirty() -> bool | None:
    """Returns whether tracked files differ from HEAD (MOEKIT_GIT_DIRTY=0/1 where there is no .git),
    None when unknown."""
    if os.environ.get("MOEKIT_GIT_DIRTY") in ("0", "1"):
        return os.environ["MOEKIT_GIT_DIRTY"] == "1"
    status = _git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)


def cpu_model() -> dict[str, Any]:
    """Returns the host CPU's model name and the vector extensions the native kernels choose by
    (avx512_bf16, avx512_vnni, avx2, ...) from /proc/cpuinfo; {} where it cannot be read. The 2-core
    VMs differ from one run to the next (Zen 3 with AVX2, Zen 4 with AVX512-BF16), and each takes
    other kernel paths."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    wanted = ("avx512_bf16", "avx512_vnni", "avx_vnni", "avx512f", "avx2", "amx_bf16")
    return {"cpu_model": model, "cpu_vector": [f for f in wanted if f in flags]}


def device_info(device: str | torch.device) -> dict[str, Any]:
    """Returns what the run ran on: the accelerator's name, memory and SMs, or the CPU's."""
    device = torch.device(device)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info: dict[str, Any] = {"device": str(device), "cpus_usable": cpus, "cpu_count": os.cpu_count(),
                            "cpu": platform.processor() or platform.machine(), **cpu_model()}
    if device.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, memory_bytes=props.total_memory, sm_count=props.multi_processor_count,
                    capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda)
    else:
        info["name"] = f"CPU ({info['cpu']}, {cpus} cores usable)"
    return info


def versions() -> dict[str, str | None]:
    """Returns the versions of python, torch, triton and transformers (None where not installed;
    transformers only when already imported: importing it costs seconds)."""
    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    tf = sys.modules.get("transformers")
    out["transformers"] = getattr(tf, "__version__", None)
    return out


def run_meta(args: argparse.Namespace | None = None, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Returns the provenance block of a results file: date, command, commit, dirty flag, device,
    versions and the parsed arguments."""
    import moekit

    env = [f"{k}={os.environ[k]}" for k in ("MOEKIT_GIT_COMMIT", "PYTHONPATH") if os.environ.get(k)]
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": shlex.join([*env, "python3", *sys.argv]),
            "commit": git_commit(), "dirty": git_dirty(), "moekit": str(Path(moekit.__file__).parent),
            "device": device_info(device), **versions(),
            "args": {k: v for k, v in vars(args).items()} if args is not None else None}


def device_name(device: str | torch.device) -> str:
    """Returns the short name of `device` ('NVIDIA H200', 'CPU (x86_64, 2 cores usable)')."""
    return device_info(device)["name"]


# ---- timing -------------------------------------------------------------------------------------

def sync(device: str | torch.device) -> None:
    """Waits for the device's queued work (nothing to wait for on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class _L2Flush:
    """A 256 MB buffer whose zeroing evicts L2 (50 MB on the H200) before a timed call."""

    _buffers: dict[str, torch.Tensor] = {}

    @classmethod
    def run(cls, device: torch.device) -> None:
        key = str(device)
        if key not in cls._buffers:
            cls._buffers[key] = torch.empty(256 << 20, dtype=torch.uint8, device=device)
        cls._buffers[key].zero_()


def times_s(fn: Callable[[], Any], device: str | torch.device, reps: int = 25, warmup: int = 3,
            flush_l2: bool = False) -> list[float]:
    """Returns the seconds of `reps` calls of fn after `warmup` untimed ones: CUDA events around
    each call on a GPU (L2 flushed before each when flush_l2), perf_counter on the CPU."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(reps):
        if device.type == "cuda":
            if flush_l2:
                _L2Flush.run(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return out


def median_s(fn: Callable[[], Any], device: str | torch.device, reps: int = 25, warmup: int = 3,
             flush_l2: bool = False) -> float:
    """Returns the median seconds of fn over `reps` calls (see times_s)."""
    return statistics.median(times_s(fn, device, reps, warmup, flush_l2))


def graph_us_per_call(calls: list[Callable[[], Any]], reps: int = 30) -> float:
    """Returns the median microseconds a call of `calls` (each a no-argument function) takes when all
    of them run in one captured CUDA graph, as a decode step runs its layers (launch gaps included).
    Each call runs once first on a side stream (Triton builds, cuBLAS and SDPA plans), as generate's
    warm-up does."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for call in calls:
            call()
    return 1e6 * statistics.median(times_s(graph.replay, "cuda", reps=reps, warmup=3)) / len(calls)


def do_bench_s(fn: Callable[[], Any], warmup: int = 10, rep: int = 50, device: str | torch.device = "cuda") -> float:
    """Returns the median seconds of one call of fn: triton.testing.do_bench on CUDA (warmup and
    rep in milliseconds of running, L2 flushed before each call), median_s on the CPU."""
    if torch.device(device).type != "cuda":
        return median_s(fn, device, reps=3, warmup=1)
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median") * 1e-3


def nbytes(*tensors: torch.Tensor) -> int:
    """Returns the bytes the tensors hold (views counted in full)."""
    return sum(t.numel() * t.element_size() for t in tensors)


def free_memory(device: str | torch.device | None = None, reset_peak: bool = False) -> None:
    """Returns cached device memory to the driver once the caller has dropped its references
    (and resets the allocator's peak counter when reset_peak)."""
    gc.collect()
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.empty_cache()
        if reset_peak:
            torch.cuda.reset_peak_memory_stats()


# ---- output -------------------------------------------------------------------------------------

def host_info() -> dict[str, Any]:
    """Returns what shapes host-memory rates on this machine: usable cores, transparent huge pages'
    mode, NUMA nodes and their CPUs, and lscpu's threads per core, sockets, model and L3 (each None
    where this machine does not say)."""
    def read(path: str) -> str | None:
        try:
            return Path(path).read_text().strip()
        except OSError:
            return None

    nodes = sorted(Path("/sys/devices/system/node").glob("node[0-9]*"))
    info: dict[str, Any] = {"cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
                            "thp": read("/sys/kernel/mm/transparent_hugepage/enabled"),
                            "numa_nodes": {n.name: read(str(n / "cpulist")) for n in nodes}}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    for line in out.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("Model name", "Thread(s) per core", "Core(s) per socket", "Socket(s)", "L3 cache",
                           "NUMA node(s)"):
            info[key.strip()] = value.strip()
    return info


def add_output_args(parser: argparse.ArgumentParser, name: str, device_default: str | None = None) -> None:
    """Adds --out (folder for NAME.json, default benchmarks/results) and --device."""
    parser.add_argument("--out", default=os.environ.get("OUT", str(RESULTS_DIR)),
                        help=f"folder for {name}.json (default: $OUT, else benchmarks/results)")
    parser.add_argument("--device", default=device_default or ("cuda" if torch.cuda.is_available() else "cpu"),
                        help="cuda or cpu (default: cuda when available)")


def write_json(results: Any, out: str | Path, name: str) -> Path:
    """Returns the path of out/NAME.json after writing `results` to it atomically (a reader never
    sees half a file; the folder is made)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str))
    os.replace(tmp, path)
    return path


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Returns a markdown table; None cells print as empty."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join("" if c is None else str(c) for c in row) + " |")
    return "\n".join(lines)
