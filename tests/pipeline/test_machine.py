"""Machine levels (moekit.pipeline.machine): JSON round trip and refusals, presets and files,
and the profile cached once per machine."""

from __future__ import annotations

import json

import pytest

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
