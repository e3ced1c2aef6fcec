"""Machine levels (moekit.pipeline.machine): JSON round trip and refusals, presets and files,
and the profile cached once per machine."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from moekit import native
from moekit.errors import MoekitError
from moekit.pipeline import machine as mm
from moekit.pipeline.machine import PRESETS, Machine, read_machine


def test_round_trip_merge_and_refusals(tmp_path):
    m = PRESETS["h200"]
    assert Machine.from_dict(json.loads(json.dumps(m.to_dict()))) == m
    assert m.has_gpu and m.missing() == []
    host_only = Machine(host_flops=1e9, host_bandwidth=2e9, host_memory=10**9)
    assert not host_only.has_gpu and "gpu_flops" in host_only.missing()
    merged = host_only.merged(Machine(gpu_flops=5e12, h2d_bandwidth=1e10))
    assert merged.gpu_flops == 5e12 and merged.host_bandwidth == 2e9
    with pytest.raises(MoekitError, match="unknown field.*pcie"):
        Machine.from_dict({"pcie": 1})
    with pytest.raises(MoekitError, match="h2d_bandwidth must be > 0"):
        Machine(h2d_bandwidth=0)


def test_read_machine_preset_and_file(tmp_path):
    assert read_machine("h200") is PRESETS["h200"]
    f = tmp_path / "l4.json"
    f.write_text(json.dumps({"gpu_flops": 1.2e14, "h2d_bandwidth": 1.6e10}))
    m = read_machine(str(f))
    assert m.name == "l4" and m.gpu_flops == 1.2e14 and m.host_flops is None
    with pytest.raises(MoekitError, match="neither a preset"):
        read_machine(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("[1]")
    with pytest.raises(MoekitError, match="JSON object"):
        read_machine(str(tmp_path / "bad.json"))


@pytest.mark.skipif(native.library() is None, reason="no native library")
def test_profile_is_measured_once_and_cached(tmp_path, monkeypatch):
    path = tmp_path / "machine.json"
    first = mm.this_machine(path, quick=True)
    assert first.host_flops > 0 and first.host_bandwidth > 0 and first.cpu_attention_bandwidth > 0
    assert first.host_memory == mm.host_memory_bytes()
    monkeypatch.setattr(mm, "profile_host", lambda quick=False: pytest.fail("profiled again"))
    assert mm.this_machine(path) == first
    path.write_text("{not json")  # a damaged cache is measured again
    monkeypatch.setattr(mm, "profile_host", lambda quick=False: {"host_flops": 1.0, "host_bandwidth": 2.0,
                                                                 "host_memory": 3})
    assert mm.this_machine(path).host_flops == 1.0


def test_prefill_expert_rate_round_trips_and_old_files_load(tmp_path):
    """prefill_expert_flops is optional: a machine JSON written before it (no such key) loads with
    None, one with it round-trips, and a non-positive rate is refused."""
    old = {k: v for k, v in PRESETS["h200"].to_dict().items() if k != "prefill_expert_flops"}
    f = tmp_path / "old.json"
    f.write_text(json.dumps(old))
    assert read_machine(str(f)).prefill_expert_flops is None
    assert Machine.from_dict(old) == PRESETS["h200"]
    measured = Machine.from_dict({**old, "prefill_expert_flops": 474e12})
    assert Machine.from_dict(json.loads(json.dumps(measured.to_dict()))) == measured
    assert measured.prefill_expert_flops == 474e12
    assert PRESETS["h200"].merged(Machine(prefill_expert_flops=2e14)).prefill_expert_flops == 2e14
    with pytest.raises(MoekitError, match="prefill_expert_flops must be > 0"):
        Machine(prefill_expert_flops=0)


def test_prefill_expert_probe_counts_top_k_expert_flops_a_token(monkeypatch):
    """profile_prefill_experts runs the grouped kernels on a random routing and counts 2 x 3 x D x I
    FLOPs per routed (token, expert): with the timer held at 1 ms its rate is those FLOPs x 1000."""
    from conftest import kernel_device

    device = kernel_device()
    calls = []

    def timed(fn, dev, reps):
        calls.append(fn())  # the real call: [T, D] out
        return 1e-3

    monkeypatch.setattr(mm, "_gpu_best", timed)
    rate = mm.profile_prefill_experts(hidden=32, ffn=64, experts=4, top_k=2, tokens=16, device=device)
    assert rate == pytest.approx(16 * 2 * 3 * 32 * 64 * 2 * 1e3)
    assert calls[0].shape == (16, 32) and bool(calls[0].isfinite().all())


def test_attention_probe_reads_past_the_last_level_cache():
    """The attention probe's KV is 4x the last-level cache (at least 512 MiB, at most 2 GiB): a
    probe inside a large L3 measured a cache rate twice the pipeline's (13a0b14)."""
    llc = mm.last_level_cache_bytes()
    assert llc is None or llc > 0
    nbytes = mm.attention_probe_bytes()
    assert min(512 << 20, mm.host_memory_bytes() // 8) <= nbytes <= 2 << 30
    if llc is not None and 4 * llc <= min(2 << 30, mm.host_memory_bytes() // 8):
        assert nbytes >= 4 * llc


def test_cached_profile_with_an_in_cache_attention_rate_is_measured_again(tmp_path, monkeypatch):
    """A cached profile from before cpu_attention_kv_bytes (its attention rate read inside the cache)
    is profiled again; one that records the probe's bytes is kept."""
    path = tmp_path / "machine.json"
    old = {"name": "old", "host_flops": 1e12, "host_bandwidth": 9e10, "host_memory": 2**37,
           "cpu_attention_bandwidth": 7.8e10}
    path.write_text(json.dumps(old))
    fresh = {"host_flops": 1e12, "host_bandwidth": 9e10, "host_memory": 2**37, "cpu_attention_bandwidth": 3.3e10,
             "cpu_attention_kv_bytes": 1 << 30}
    monkeypatch.setattr(mm, "profile_host", lambda quick=False: dict(fresh))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # host levels only
    first = mm.this_machine(path)
    assert first.cpu_attention_bandwidth == 3.3e10 and first.cpu_attention_kv_bytes == 1 << 30
    monkeypatch.setattr(mm, "profile_host", lambda quick=False: pytest.fail("profiled again"))
    assert mm.this_machine(path) == first
    with pytest.raises(MoekitError, match="cpu_attention_kv_bytes must be > 0"):
        Machine(cpu_attention_kv_bytes=0)


@pytest.mark.skipif(native.library() is None, reason="no native library")
def test_full_attention_probe_reads_what_attention_probe_bytes_says(monkeypatch):
    """The full probe (not quick) sizes its step from attention_probe_bytes(): within one
    144-position sequence of it (shrunk here to 8 MiB to stay fast)."""
    monkeypatch.setattr(mm, "attention_probe_bytes", lambda: 8 << 20)
    rate, nbytes = mm._attention_rate(False)
    assert rate > 0 and (8 << 20) - 144 * 2 * 8 * 128 * 2 < nbytes <= 8 << 20


def test_last_level_cache_sums_distinct_instances(tmp_path):
    """Two L3 instances (two sockets, or AMD's CCDs) count twice; CPUs sharing one count once."""
    for cpu, shared in ((0, "0-1"), (1, "0-1"), (2, "2-3")):
        for index, level, size in ((0, 1, "48K"), (3, 3, "32768K")):
            d = tmp_path / f"cpu{cpu}" / "cache" / f"index{index}"
            d.mkdir(parents=True)
            (d / "level").write_text(f"{level}\n")
            (d / "size").write_text(size + "\n")
            (d / "shared_cpu_list").write_text((shared if level == 3 else str(cpu)) + "\n")
    assert mm.last_level_cache_bytes(tmp_path) == 2 * (32 << 20)
    assert mm.last_level_cache_bytes(tmp_path / "none") is None


def test_merged_rate_takes_its_probe_bytes():
    """A machine file's attention rate replaces the profile's together with the bytes it was read
    over (None: read inside the cache), so an old in-cache rate does not pass for a DRAM one."""
    here = Machine(host_flops=1.0, cpu_attention_bandwidth=3.3e10, cpu_attention_kv_bytes=1 << 30)
    assert here.merged(Machine(cpu_attention_bandwidth=7.8e10)).cpu_attention_kv_bytes is None
    assert here.merged(Machine(host_flops=2.0)).cpu_attention_kv_bytes == 1 << 30


def test_pipeline_attention_rate_is_kept_in_the_cached_profile(tmp_path):
    """record_pipeline_attention writes the rate into the cached profile whole (the other fields as
    they were); with no readable profile it writes nothing; a profile from before the field loads."""
    path = tmp_path / "machine.json"
    assert mm.record_pipeline_attention(4e10, path) is None and not path.exists()
    old = PRESETS["h200"].to_dict()
    del old["pipeline_attention_bandwidth"]  # written before the field existed
    path.write_text(json.dumps(old))
    assert Machine.from_dict(json.loads(path.read_text())).pipeline_attention_bandwidth is None
    assert mm.record_pipeline_attention(4e10, path) == path
    kept = Machine.from_dict(json.loads(path.read_text()))
    assert kept.pipeline_attention_bandwidth == 4e10 and kept.attention_rate == 4e10
    assert kept == dataclasses.replace(PRESETS["h200"], pipeline_attention_bandwidth=4e10)
    assert not list(tmp_path.glob("*.tmp"))
    def refuse(self, *a, **k):
        raise PermissionError("read-only folder")

    with pytest.MonkeyPatch.context() as mp:  # a folder it cannot write: the profile stays as it was
        mp.setattr(type(path), "write_text", refuse)
        assert mm.record_pipeline_attention(6e10, path) is None
    assert Machine.from_dict(json.loads(path.read_text())).pipeline_attention_bandwidth == 4e10
    assert not list(tmp_path.glob("*.tmp"))
    path.write_text("{damaged")
    assert mm.record_pipeline_attention(5e10, path) is None and path.read_text() == "{damaged"
    with pytest.raises(MoekitError, match="pipeline_attention_bandwidth must be > 0"):
        Machine(pipeline_attention_bandwidth=0)


def test_free_host_budget_is_memory_available_plus_held_less_the_reserve(tmp_path):
    from moekit.pipeline.machine import free_host_budget, host_memory_available, host_reserve_bytes

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       131072000 kB\nMemFree:         1000000 kB\nMemAvailable:   40000000 kB\n")
    assert host_memory_available(meminfo) == 40000000 * 1024
    reserve = host_reserve_bytes()
    assert reserve >= 4 << 30
    assert free_host_budget(meminfo=meminfo) == 40000000 * 1024 - reserve
    assert free_host_budget(held=93 * 10**9, meminfo=meminfo) == 40000000 * 1024 + 93 * 10**9 - reserve
    meminfo.write_text("MemTotal:       1000 kB\nMemAvailable:   1000 kB\n")  # less than the reserve
    assert free_host_budget(meminfo=meminfo) == 0
    meminfo.write_text("MemTotal:       1000 kB\n")  # an old kernel: no MemAvailable
    assert host_memory_available(meminfo) is None and free_host_budget(meminfo=meminfo) is None
    assert free_host_budget(meminfo=tmp_path / "absent") is None
    assert host_reserve_bytes(10**12) == 5 * 10**10  # 5% of a large host
