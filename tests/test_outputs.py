"""Output folders (moekit.outputs): what --overwrite may delete, atomic writes, partial folders
removed after signals (a real SIGTERM / SIGKILL of `moekit compress` mid-write)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import moekit
from moekit.outputs import atomic_dir, check_output, is_moekit_output, remove_stale_partials
from moekit.save import write_checkpoint


def _checkpoint(path: Path) -> Path:
    return write_checkpoint(iter([("w", torch.zeros(4))]), path, {"model_type": "none"})


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_moekit_outputs_are_recognised(tmp_path):
    assert is_moekit_output(_checkpoint(tmp_path / "ckpt"))
    assert not is_moekit_output(tmp_path)  # holds a checkpoint, is not one
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {}}))
    assert not is_moekit_output(plain)
    from moekit.offload.pregate import save_pregates

    cfg = moekit.read_config(moekit.default_model_path())[2]
    pregates = save_pregates({0: torch.zeros(cfg.num_experts, cfg.hidden_size)}, cfg, tmp_path / "pg")
    assert is_moekit_output(pregates)


def test_check_output_refuses_inputs_and_foreign_folders(tmp_path):
    model = _checkpoint(tmp_path / "models" / "m")
    data = tmp_path / "text.txt"
    data.write_text("x")
    for out, why in [(model, "is the input"), (tmp_path / "models", "holds the input"),
                     (model / "sub", "is inside the input"), (tmp_path, "holds the input")]:
        with pytest.raises(moekit.MoekitError, match=why):
            check_output(out, [model, None, data], overwrite=True)
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(moekit.MoekitError, match="already exists"):
        check_output(foreign, [model])
    with pytest.raises(moekit.MoekitError, match="not a folder moekit wrote"):
        check_output(foreign, [model], overwrite=True)
    with pytest.raises(moekit.MoekitError, match="not a folder"):
        check_output(data, [model], overwrite=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert check_output(empty, [model]) == empty  # nothing to lose
    other = _checkpoint(tmp_path / "other")
    assert check_output(other, [model], overwrite=True) == other
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_writer_refuses_to_overwrite_a_folder_moekit_did_not_write(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(moekit.MoekitError, match="not a folder moekit wrote"):
        write_checkpoint(iter([("w", torch.zeros(4))]), foreign, {}, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["foreign"] and (foreign / "notes.txt").exists()


def test_stale_partials_of_dead_writers_are_removed(tmp_path):
    out = tmp_path / "out"
    dead, alive = _dead_pid(), os.getpid()
    stale = tmp_path / f".out.partial-{dead}-abc"
    old = tmp_path / f".out.old-{dead}-def"
    live = tmp_path / f".out.partial-{alive}-ghi"
    other = tmp_path / f".other.partial-{dead}-jkl"
    for p in (stale, old, live, other):
        p.mkdir()
        (p / "model-00001.safetensors").write_bytes(b"half")
    _checkpoint(out)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([live.name, other.name, "out"])
    assert remove_stale_partials(tmp_path / "other") == [other]


def test_atomic_dir_replaces_only_at_the_end(tmp_path):
    out = _checkpoint(tmp_path / "out")
    with pytest.raises(RuntimeError):
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "x").write_text("new")
            raise RuntimeError("failed midway")
    assert is_moekit_output(out) and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "x").write_text("new")
    assert [p.name for p in out.iterdir()] == ["x"] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _start_compress(out: Path, pause_s: float) -> subprocess.Popen:
    env = dict(os.environ, MOEKIT_TEST_WRITE_PAUSE_S=str(pause_s), OMP_NUM_THREADS="1")
    # the child takes SIGINT as a terminal would deliver it: a test run started as a background
    # job inherits SIGINT ignored (POSIX shells do that to asynchronous commands), and Python then
    # keeps ignoring it
    return subprocess.Popen([sys.executable, "-m", "moekit.cli", "compress", "--method", "rtn", "--bits", "4",
                             "--device", "cpu", "--out", str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_for_partial_shard(proc: subprocess.Popen, parent: Path, timeout_s: float = 120) -> Path:
    """Returns the writer's partial folder once a shard is in it (the writer then pauses)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for p in parent.glob(".out.partial-*"):
            if list(p.glob("*.safetensors")):
                return p
        if proc.poll() is not None:
            raise AssertionError(f"compress ended before writing: {proc.communicate()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("no partial shard appeared")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_write_leaves_nothing(tmp_path, sig):
    out = tmp_path / "out"
    proc = _start_compress(out, pause_s=60)
    _wait_for_partial_shard(proc, tmp_path)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == (143 if sig == signal.SIGTERM else 130), err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # neither OUT nor a partial folder


def test_partial_left_by_sigkill_is_removed_by_the_next_write(tmp_path):
    out = tmp_path / "out"
    proc = _start_compress(out, pause_s=60)
    partial = _wait_for_partial_shard(proc, tmp_path)
    proc.kill()  # no handler runs: the partial folder stays behind
    proc.communicate(timeout=60)
    assert partial.exists() and not out.exists()
    _checkpoint(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
