"""CPU threads of the CLI (moekit.threads): the cores this process may use, a cgroup quota, the
load of other work, --threads, and the count restored after `main()` returns."""

from __future__ import annotations

import json
import os

import pytest
import torch

from moekit import threads
from moekit.threads import cgroup_cpu_limit, default_threads, usable_cores

from conftest import run_cli


def _cgroup(tmp_path, v2: str | None = None, v1: tuple[str, str] | None = None):
    root = tmp_path / "cgroup"
    (root / "cpu" / "job").mkdir(parents=True)
    (root / "job").mkdir()
    self_cgroup = tmp_path / "self_cgroup"
    self_cgroup.write_text("0::/job\n" if v2 is not None else "3:cpu,cpuacct:/job\n")
    if v2 is not None:
        (root / "job" / "cpu.max").write_text(v2)
    if v1 is not None:
        (root / "cpu" / "job" / "cpu.cfs_quota_us").write_text(v1[0])
        (root / "cpu" / "job" / "cpu.cfs_period_us").write_text(v1[1])
    return root, self_cgroup


@pytest.mark.parametrize("v2, v1, cores", [
    ("150000 100000\n", None, 1.5),
    ("max 100000\n", None, None),
    (None, ("200000", "100000"), 2.0),
    (None, ("-1", "100000"), None),
    (None, None, None),
])
def test_cgroup_quota(tmp_path, v2, v1, cores):
    root, self_cgroup = _cgroup(tmp_path, v2, v1)
    assert cgroup_cpu_limit(root, self_cgroup) == cores


def test_usable_cores_follow_affinity_and_quota(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3, 4, 5, 6, 7}, raising=False)
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: 2.5)
    assert usable_cores() == 3
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: None)
    assert usable_cores() == 8


def test_default_leaves_out_cores_other_work_keeps_busy(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 4)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    for load, expected in [(0.1, 4), (1.2, 3), (3.9, 1), (9.0, 1)]:
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
        assert default_threads() == expected
    # a quota or an affinity mask below the machine's cores: the host's load says nothing about ours
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert default_threads() == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3


def test_threads_flag_is_applied_and_the_count_restored(capsys):
    before = torch.get_num_threads()
    code, out, _ = run_cli(capsys, "generate", "hi", "--device", "cpu", "--max-new-tokens", "2", "--json",
                           "--threads", "2")
    assert code == 0 and json.loads(out)["threads"] == 2
    assert torch.get_num_threads() == before


def test_every_computing_command_takes_threads():
    from moekit.cli import build_parser

    import argparse

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command in ("generate", "eval", "compress", "usage", "prune", "finetune", "pregate"):
        flags = {f for action in sub.choices[command]._actions for f in action.option_strings}
        assert "--threads" in flags, command
