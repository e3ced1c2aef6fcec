"""`moekit generate --offload` and `moekit pregate` on the bundled model."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

from conftest import run_cli


def test_generate_offload_matches_resident_and_reports_stats(capsys):
    code, out, _ = run_cli(capsys, "generate", "--device", "cpu", "def f(x):", "--max-new-tokens", "16", "--json", "--dtype", "bfloat16")
    assert code == 0
    resident = json.loads(out)
    code, out, _ = run_cli(capsys, "generate", "--device", "cpu", "def f(x):", "--max-new-tokens", "16", "--json",
                       "--offload", "--device-memory", "10MB", "--predictor", "speculative")
    assert code == 0
    offloaded = json.loads(out)
    assert offloaded["token_ids"] == resident["token_ids"]
    stats = offloaded["offload"]
    assert stats["plan"]["budget_bytes"] == 10**7 and stats["peak_device_bytes"] <= 10**7
    assert 0 < stats["cache_slots"] < stats["plan"]["total_experts"]
    for key in ("hit_rate", "prefetch_precision", "prefetch_recall", "bytes_per_token", "stall_s"):
        assert key in stats
    assert offloaded["cuda_graph"] is False


def test_generate_offload_stats_table(capsys):
    code, out, err = run_cli(capsys, "generate", "--device", "cpu", "def f(x):", "--max-new-tokens", "8", "--offload",
                         "--device-memory", "10MB", "--stats", "--cache-policy", "lru", "--predictor", "none")
    assert code == 0 and out.startswith("def f(x):")
    assert "cache hit rate" in err and "bytes moved / token" in err and "peak device memory" in err


def test_too_small_budget_is_one_line(capsys):
    code, _, err = run_cli(capsys, "generate", "--device", "cpu", "hi", "--offload", "--device-memory", "5MB")
    assert code == 2
    assert err.count("\n") == 1 and "needs at least" in err and "--device-memory" in err


def test_offload_flags_need_offload(capsys):
    code, _, err = run_cli(capsys, "generate", "--device", "cpu", "hi", "--device-memory", "5MB")
    assert code == 2 and "needs --offload" in err


def test_pregate_command_then_generate(capsys, tmp_path):
    data = Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py"
    code, out, _ = run_cli(capsys, "pregate", "--data", str(data), "--out", str(tmp_path), "--max-tokens", "1024",
                       "--steps", "40", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["loss_end"] < report["loss_start"]
    assert (tmp_path / "pregate.safetensors").exists()
    code, out, _ = run_cli(capsys, "generate", "--device", "cpu", "import os", "--max-new-tokens", "8", "--json", "--offload",
                       "--device-memory", "10MB", "--predictor", "pregate", "--pregate", str(tmp_path),
                       "--pin-counts", str(tmp_path / "expert_counts.json"))
    assert code == 0
    stats = json.loads(out)["offload"]
    assert stats["predictor"] == "pregate" and stats["pinned_slots"] > 0


def test_pregate_predictor_without_pregates_is_refused(capsys, tmp_path):
    code, _, err = run_cli(capsys, "generate", "--device", "cpu", "hi", "--offload", "--predictor", "pregate", "--pregate", str(tmp_path))
    assert code == 2 and "moekit pregate" in err


def test_generate_offload_with_compile_is_refused_in_one_line(capsys):
    code, out, err = run_cli(capsys, "generate", "--device", "cpu", "def f(x):", "--offload", "--compile")
    assert code != 0 and out == ""
    assert "--compile is not available with --offload" in err and "Traceback" not in err


def test_mapped_misses_on_a_cpu_are_refused_in_one_line(capsys, monkeypatch):
    """Where the device cannot read host memory in place (a CPU without the Triton interpreter),
    --misses mapped is refused, naming what to use instead; it used to become fetch silently."""
    from moekit.offload import source

    monkeypatch.setattr(source, "reads_in_place", lambda device: False)
    code, out, err = run_cli(capsys, "generate", "--device", "cpu", "hi", "--max-new-tokens", "4", "--offload",
                             "--device-memory", "10MB", "--misses", "mapped")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "--misses mapped" in err and "use --misses fetch" in err


def test_stats_print_every_reservation_of_the_plan(capsys):
    code, _, err = run_cli(capsys, "generate", "--device", "cpu", "def f(x):", "--max-new-tokens", "4", "--offload",
                           "--device-memory", "10MB", "--stats")
    assert code == 0
    plan = next(line for line in err.splitlines() if line.startswith("budget plan"))
    for part in ("weights", "KV cache", "activations (prefill chunk", "workspace", "expert cache"):
        assert part in plan, plan
