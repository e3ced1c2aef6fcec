"""How many intra-op threads the CLI gives PyTorch: the cores this process may use, less the
ones other processes keep busy.

PyTorch's default is every core of the machine. In a container with a CPU quota, or on a
machine shared with other jobs, its threads then wait on each other: on a 2-core machine with
one core busy, the bundled model decodes at 8 tok/s with 2 threads and 258 tok/s with 1.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from .errors import MoekitError

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, self_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """Returns the CPU quota of this process's cgroup in cores (cgroup v2 cpu.max, else v1
    cpu.cfs_quota_us / cpu.cfs_period_us), or None when there is none."""
    v2, v1 = "/", "/"  # this process's cgroup paths (v2 unified, v1 cpu controller)
    try:
        for line in self_cgroup.read_text().splitlines():
            hier, controllers, path = line.split(":", 2)
            if hier == "0" and controllers == "":
                v2 = path
            elif "cpu" in controllers.split(","):
                v1 = path
    except (OSError, ValueError):
        pass
    for folder in dict.fromkeys((root / v2.lstrip("/"), root)):
        try:
            quota, period = (folder / "cpu.max").read_text().split()[:2]
        except (OSError, ValueError):
            continue
        return float(quota) / float(period) if quota != "max" and float(period) > 0 else None
    for folder in dict.fromkeys((root / "cpu" / v1.lstrip("/"), root / "cpu")):
        try:
            quota_us = float((folder / "cpu.cfs_quota_us").read_text())
            period_us = float((folder / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    return None


def usable_cores() -> int:
    """Returns the cores this process may run on: its CPU affinity, capped by a cgroup quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        cores = min(cores, max(1, math.ceil(limit)))
    return max(1, cores)


def default_threads() -> int:
    """Returns the thread count the CLI uses without --threads: OMP_NUM_THREADS when set, else
    the usable cores less the 1-minute load average of other work (at least 1). The load is
    counted only when this process may use every core of the machine (otherwise the load
    average describes cores it does not run on)."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    cores = usable_cores()
    try:
        if cores == os.cpu_count():
            busy = os.getloadavg()[0]
            return max(1, min(cores, round(cores - busy)))
    except OSError:
        pass
    return cores


def check_threads(threads: int | None) -> None:
    """Raises MoekitError for a --threads value below 1."""
    if threads is not None and threads < 1:
        raise MoekitError(f"--threads must be >= 1, got {threads}")


def set_threads(threads: int | None) -> int:
    """Returns the intra-op thread count now set in PyTorch: `threads`, or default_threads()."""
    import torch

    check_threads(threads)
    n = threads if threads is not None else default_threads()
    torch.set_num_threads(n)
    return n
