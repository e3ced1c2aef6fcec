"""Machine: the levels of the hierarchical roofline model (HRM) -- peak compute and bandwidth of
the GPU and the host, and the links between them -- measured by a short profiling step and cached
in a small JSON file.

What is measured where: the host levels (memory read bandwidth with the native stream probe,
float32 GEMM FLOP/s, the native CPU attention kernel's KV bytes/s) on any machine; the GPU levels
(bf16 GEMM FLOP/s, HBM copy bandwidth, pinned host-to-device and device-to-host copies) only where
CUDA exists. A CPU-only machine planning for a GPU takes the GPU levels from a file (`--machine
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
    version: int = VERSION

    def __post_init__(self) -> None:
        for name in GPU_FIELDS + HOST_FIELDS:
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
        return dataclasses.replace(self, **known)

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
    out["cpu_attention_bandwidth"] = _attention_rate(quick)
    return out


def _attention_rate(quick: bool) -> float:
    """Returns the native CPU attention kernel's KV bytes/s on a Mixtral-shaped bf16 decode step."""
    import torch

    from ..native import attention

    seqs, length, block = (4, 256, 16) if quick else (32, 512, 16)
    blocks = seqs * length // block
    keys = torch.randn(blocks, block, 8, 128).to(torch.bfloat16)
    values = torch.randn_like(keys)
    tables = torch.arange(blocks, dtype=torch.int32).view(seqs, -1)
    lens = torch.full((seqs,), length, dtype=torch.int32)
    q = torch.randn(seqs, 32, 128).to(torch.bfloat16)
    seconds = _best(lambda: attention.decode_attention(q, keys, values, tables, lens), 3)
    return attention.kv_bytes(keys, lens) / seconds


def profile_gpu(device: str = "cuda") -> dict[str, float]:
    """Returns the measured GPU levels (GPU_FIELDS) of a CUDA device: bf16 GEMM, device copy,
    pinned copies both ways (a few seconds)."""
    import torch

    def timed(fn, reps: int = 5) -> float:
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


def cache_path() -> Path:
    """Returns the JSON file this machine's profile is cached in."""
    from ..native import cache_dir

    return cache_dir().parent / "hrm" / f"machine-{os.uname().nodename}.json"


def this_machine(path: Path | None = None, refresh: bool = False, quick: bool = False) -> Machine:
    """Returns this machine's profile: read from the cache file, else measured (host levels; GPU
    levels where CUDA exists) and written there."""
    import torch

    path = path or cache_path()
    if path.is_file() and not refresh:
        try:
            return Machine.from_dict(json.loads(path.read_text()), where=str(path))
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
