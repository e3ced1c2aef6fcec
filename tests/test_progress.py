"""Progress of long work (moekit.progress): periodic lines on stderr when it is not a terminal,
from `eval`, `finetune` and `pregate` alike."""

from __future__ import annotations

import io
import re
import sysconfig
import time
from pathlib import Path

import pytest

from moekit import progress
from moekit.progress import Progress, heartbeat

from conftest import run_cli


@pytest.fixture
def every_step(monkeypatch):
    """A progress line at every update (they come every EVERY_S seconds otherwise)."""
    monkeypatch.setattr(progress, "EVERY_S", 0.0)


def test_lines_off_a_terminal(every_step):
    out = io.StringIO()
    with Progress(4, "scoring", unit="windows", stream=out) as bar:
        for _ in range(4):
            bar.update(note="loss 2.5")
    lines = out.getvalue().splitlines()
    assert len(lines) == 5  # one per update, and the last one again at the end
    assert re.fullmatch(r"moekit: scoring: 2/4 windows \(50%\), loss 2\.5, \d+ s elapsed, ~\d+ s left", lines[1])


def test_quiet_when_disabled_or_short():
    out = io.StringIO()
    with Progress(4, "scoring", stream=out) as bar:  # done well within EVERY_S: nothing to say
        bar.update(4)
    with Progress(4, "scoring", enabled=False, stream=out, every_s=0) as bar:
        bar.update(4)
    assert out.getvalue() == ""


def test_heartbeat_while_a_library_call_runs():
    out = io.StringIO()
    with heartbeat("training", every_s=0.01, stream=out):
        time.sleep(0.1)
    assert "moekit: training (" in out.getvalue()


def test_eval_and_finetune_report_progress_off_a_terminal(every_step, tmp_path, capsys):
    text = tmp_path / "t.py"
    text.write_text("def add(a, b):\n    return a + b\n" * 40)
    code, _, err = run_cli(capsys, "eval", "--data", str(text), "--seqlen", "32", "--device", "cpu")
    assert code == 0 and "moekit: scoring: " in err
    code, _, err = run_cli(capsys, "finetune", "--data", str(text), "--samples", "4", "--seqlen", "32", "--steps", "2",
                           "--top-k", "1", "--device", "cpu", "--out", str(tmp_path / "tuned"))
    assert code == 0 and "moekit: fine-tuning: 2/2 steps" in err


def test_pregate_reports_while_training(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(progress, "EVERY_S", 0.01)
    data = Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py"
    code, _, err = run_cli(capsys, "pregate", "--data", str(data), "--out", str(tmp_path / "pg"), "--max-tokens", "512",
                           "--steps", "20", "--device", "cpu")
    assert code == 0 and "moekit: training pre-gates" in err
