"""`moekit generate --parallel ep=N,tp=M`: flag checks in process; 2 and 4 ranks under torchrun (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import run_cli
from ranks import free_port

from moekit.parallel.cli import ParallelSpec


def torchrun(*argv: str, ranks: int = 2, timeout: float = 180) -> subprocess.CompletedProcess:
    """Returns `torchrun --nproc-per-node RANKS -m moekit ARGV` run to its end on 127.0.0.1 (one
    intra-op thread a rank: the machine has two cores)."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
                           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "moekit", *argv],
                          capture_output=True, text=True, timeout=timeout, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("value, message", [
    ("ep=0", "--parallel ep must be >= 1, got 0"),
    ("ep=2,tp=0", "--parallel tp must be >= 1, got 0"),
    ("dp=2", "give ep=N (expert-parallel ranks) and/or tp=M"),
    ("timeout=5", "ep=N or tp=M is missing"),
    ("ep=two", "ep and tp must be integers"),
    ("ep=2,timeout=0", "--parallel timeout must be > 0 seconds"),
    ("ep=tp", "ep=tp needs tp=M too"),
])
def test_bad_parallel_flag_is_one_line(capsys, value, message):
    code, _, err = run_cli(capsys, "generate", "hi", "--device", "cpu", "--parallel", value)
    assert code == 2 and message in err and "Traceback" not in err


def test_spec_parses_a_grid():
    assert ParallelSpec.parse("ep=2,tp=2,timeout=9") == ParallelSpec(2, 2, 9.0)
    assert ParallelSpec.parse("tp=4").world == 4 and ParallelSpec.parse("ep=3").world == 3
    over = ParallelSpec.parse("tp=2,ep=tp")  # heads and experts over the same 2 ranks
    assert over == ParallelSpec(2, 2, ep_over_tp=True) and over.world == 2


def test_parallel_without_torchrun_says_how(capsys, monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    code, _, err = run_cli(capsys, "generate", "hi", "--device", "cpu", "--max-new-tokens", "2", "--parallel", "ep=2")
    assert code == 2 and "torchrun --nproc-per-node N -m moekit generate" in err


@pytest.mark.parametrize("flags, message", [
    (["--parallel", "tp=2"], "--parallel with --offload runs expert parallelism only"),
    (["--parallel", "tp=2,ep=tp"], "--parallel with --offload runs expert parallelism only"),
    (["--parallel", "ep=2", "--misses", "cpu"], "--misses is not available with --parallel"),
])
def test_parallel_with_offload_is_checked(capsys, flags, message):
    code, _, err = run_cli(capsys, "generate", "hi", "--device", "cpu", "--offload", *flags)
    assert code == 2 and message in err


@pytest.mark.slow
@pytest.mark.parametrize("ranks, value", [(2, "ep=2"), (2, "tp=2"), (4, "ep=2,tp=2"), (2, "tp=2,ep=tp")])
def test_torchrun_ranks_print_once_and_equal_one_process(capsys, ranks, value):
    args = ["generate", "Once upon a time", "--max-new-tokens", "8", "--temperature", "0", "--threads", "1",
            "--device", "cpu", "--dtype", "float32", "--json"]
    code, out, _ = run_cli(capsys, *args)
    assert code == 0
    expected = json.loads(out)["token_ids"]
    proc = torchrun(*args, "--parallel", f"{value},timeout=30", ranks=ranks)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stdout  # rank 0 printed; the others stayed quiet
    result = json.loads(lines[0])
    assert result["token_ids"] == expected
    spec = ParallelSpec.parse(value)
    report = result["parallel"]
    assert (report["ranks"], report["ep"], report["tp"]) == (ranks, spec.ep, spec.tp)
    assert (report["slots_remote"] > 0) == (spec.ep > 1)


@pytest.mark.slow
def test_torchrun_with_the_wrong_number_of_ranks_says_how_many():
    proc = torchrun("generate", "hi", "--device", "cpu", "--max-new-tokens", "2", "--parallel", "ep=2,tp=2,timeout=30",
                    timeout=120)
    assert proc.returncode != 0
    assert "needs ep x tp = 4 processes, but torchrun started 2: give torchrun --nproc-per-node 4" in proc.stderr


@pytest.mark.slow
def test_torchrun_offloaded_ranks_equal_one_process(capsys):
    """--parallel ep=2 --offload: each rank offloads its own 16 experts under 16.5 MB (the least is 14.9 MB:
    a cache of a few experts), and the tokens are one process's."""
    args = ["generate", "Once upon a time", "--max-new-tokens", "8", "--temperature", "0", "--threads", "1",
            "--device", "cpu", "--dtype", "float32", "--json"]
    code, out, _ = run_cli(capsys, *args)
    assert code == 0
    expected = json.loads(out)["token_ids"]
    proc = torchrun(*args, "--parallel", "ep=2,timeout=30", "--offload", "--device-memory", "16.5MB")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["token_ids"] == expected
    report = result["parallel"]
    assert report["placement"] == "expert_parallel_offloaded" and report["experts_held"] == 16
    assert 2 <= report["offload"]["cache_slots"] < 16 and report["offload"]["bytes_moved"] > 0


# ---- moekit batch --parallel ------------------------------------------------------------------------

BATCH_LINES = [{"id": "a", "prompt": "Once upon a time"}, {"id": "b", "prompt": "def fibonacci(n):", "max_tokens": 4},
               {"id": "c", "prompt": "The capital of France is"}]


def batch_files(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(line) + "\n" for line in BATCH_LINES))
    return inp, tmp_path / "out.jsonl"


@pytest.mark.parametrize("flags, message", [
    (["--parallel", "tp=2", "--policy", '{"batch": 2, "micro_batch": 1, "resident_share": 0.25}'],
     "--policy and --machine plan the pipeline"),
    (["--parallel", "tp=2", "--machine", "h200"], "--policy and --machine plan the pipeline"),
    (["--parallel", "tp=2", "--parallel-chunk", "0"], "--parallel-chunk must be > 0"),
    (["--parallel", "dp=2"], "give ep=N (expert-parallel ranks) and/or tp=M"),
])
def test_batch_parallel_flags_are_checked_in_one_line(capsys, tmp_path, flags, message):
    inp, out = batch_files(tmp_path)
    code, _, err = run_cli(capsys, "batch", "--input", str(inp), "--output", str(out), "--device", "cpu", *flags)
    assert code == 2 and message in err and "Traceback" not in err and not out.exists()


def test_batch_parallel_without_torchrun_says_how(capsys, tmp_path, monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    inp, out = batch_files(tmp_path)
    code, _, err = run_cli(capsys, "batch", "--input", str(inp), "--output", str(out), "--device", "cpu",
                           "--parallel", "ep=2")
    assert code == 2 and "moekit generate|serve|batch ... --parallel" in err and not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("value", ["tp=2", "ep=2"])
def test_torchrun_batch_equals_one_process(capsys, tmp_path, value):
    """Two ranks run the prompts through the ragged engine a chunk at a time; rank 0's output lines
    equal the one-process batch's (the pipeline, greedy, float32), a line's max_tokens included, and
    a rerun finds every id done."""
    inp, one = batch_files(tmp_path)
    common = ["--input", str(inp), "--max-new-tokens", "8", "--temperature", "0", "--device", "cpu",
              "--dtype", "float32", "--threads", "1"]
    code, _, _ = run_cli(capsys, "batch", *common, "--output", str(one),
                         "--policy", '{"batch": 2, "micro_batch": 1, "resident_share": 0.25}')
    assert code == 0
    two = tmp_path / "two.jsonl"
    run = ["batch", *common, "--output", str(two), "--parallel", f"{value},timeout=60", "--parallel-chunk", "2"]
    proc = torchrun(*run, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3 prompts (0 done before)" in proc.stderr and "over 2 ranks" in proc.stderr
    assert [json.loads(line) for line in two.read_text().splitlines()] == \
        [json.loads(line) for line in one.read_text().splitlines()]
    again = torchrun(*run, timeout=240)
    assert again.returncode == 0 and again.stderr.count("all 3 prompts") == 1  # rank 0 says it
    assert len(two.read_text().splitlines()) == 3


# ---- --expert-usage ----------------------------------------------------------------------------------

def bundled_usage(tmp_path, skew: bool = True) -> str:
    """A `moekit usage --json`-shaped file for the bundled model (4 MoE layers of 8 experts): experts
    0 and 1 of every layer hot, so contiguous ids would load rank 0 most."""
    rows = [{"layer": layer, "experts": 8, "hard": [90, 80, 5, 5, 4, 3, 2, 1] if skew else [1] * 8}
            for layer in range(4)]
    path = tmp_path / "usage.json"
    path.write_text(json.dumps({"tokens": 100, "top_k": 2, "layers": rows}))
    return str(path)


@pytest.mark.parametrize("command", ["generate", "serve", "batch"])
@pytest.mark.parametrize("flags, message", [
    ([], "give --parallel ep=N too"),
    (["--parallel", "tp=2"], "has none: give ep=N"),
    (["--parallel", "ep=2", "BAD"], "not JSON"),
])
def test_expert_usage_is_checked_in_one_line(capsys, tmp_path, command, flags, message):
    usage = bundled_usage(tmp_path)
    if "BAD" in flags:
        flags = flags[:-1]
        (tmp_path / "usage.json").write_text("{oops")
    args = {"generate": ["generate", "hi", "--max-new-tokens", "2"],
            "serve": ["serve"],
            "batch": ["batch", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl")]}[command]
    code, _, err = run_cli(capsys, *args, "--device", "cpu", "--expert-usage", usage, *flags)
    assert code == 2 and message in err and "Traceback" not in err


@pytest.mark.slow
def test_torchrun_balanced_placement_equals_one_process(capsys, tmp_path):
    """ep=2 with the experts placed by counted use: the same tokens as one process, the hot experts
    on different ranks, and the report's predicted balance (the busiest rank 1.0x the mean here,
    1.9x with contiguous ids)."""
    args = ["generate", "Once upon a time", "--max-new-tokens", "8", "--temperature", "0", "--threads", "1",
            "--device", "cpu", "--dtype", "float32", "--json"]
    code, out, _ = run_cli(capsys, *args)
    assert code == 0
    expected = json.loads(out)["token_ids"]
    proc = torchrun(*args, "--parallel", "ep=2,timeout=30", "--expert-usage", bundled_usage(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads([line for line in proc.stdout.splitlines() if line.strip()][0])
    assert result["token_ids"] == expected
    placed = result["parallel"]["expert_usage"]
    assert placed["balanced_worst"] < 1.05 and placed["contiguous_worst"] > 1.8


def moekit_frames(stderr: str) -> list[str]:
    """Returns the traceback frames of moekit's own files in a run's stderr."""
    return [line for line in stderr.splitlines() if line.strip().startswith('File "') and "moekit" in line
            and "site-packages/torch" not in line]


@pytest.mark.slow
def test_torchrun_batch_stops_every_rank_when_rank_0_cannot_write(tmp_path):
    """An --output rank 0 cannot open (its folder is a file) stops both ranks at once with one line,
    before the model loads: the other rank does not wait out a collective's timeout."""
    inp, _ = batch_files(tmp_path)
    (tmp_path / "notadir").write_text("")
    proc = torchrun("batch", "--input", str(inp), "--output", str(tmp_path / "notadir" / "out.jsonl"),
                    "--device", "cpu", "--dtype", "float32", "--threads", "1", "--max-new-tokens", "4",
                    "--parallel", "tp=2,timeout=120", timeout=100)
    assert proc.returncode != 0
    assert "cannot write it" in proc.stderr and "rank 0 cannot write it" in proc.stderr  # rank 0's and the other's
    assert not moekit_frames(proc.stderr)  # torchrun prints its own traceback of the failed child, no moekit frame


@pytest.mark.slow
def test_torchrun_foreign_usage_file_stops_every_rank(tmp_path):
    """Counts taken on another model (5 layers) stop both ranks with the placement's one line."""
    rows = [{"layer": layer, "experts": 8, "hard": [1] * 8} for layer in range(5)]
    usage = tmp_path / "usage.json"
    usage.write_text(json.dumps({"layers": rows}))
    proc = torchrun("generate", "hi", "--max-new-tokens", "2", "--device", "cpu", "--threads", "1",
                    "--parallel", "ep=2,timeout=120", "--expert-usage", str(usage), timeout=100)
    assert proc.returncode != 0 and "the model's MoE layers are [0, 1, 2, 3]" in proc.stderr
    assert not moekit_frames(proc.stderr)  # torchrun prints its own traceback of the failed child, no moekit frame
