"""benchmarks/bench_parallel.py --small --device cpu: every row's code path on 2 gloo ranks (the
2-GPU run's smoke test), the random checkpoint it loads from, and what its JSON must hold."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

from random_weights import RandomCheckpoint

import moekit
from moekit.errors import CheckpointError


def _hf(layers: int = 2) -> dict:
    from bench_parallel import hf_config

    return hf_config("mixtral-8x7b", small=True, layers=layers)


def test_random_checkpoint_draws_the_same_tensor_by_name():
    a, b = RandomCheckpoint(_hf(), "cpu"), RandomCheckpoint(_hf(), "cpu")
    name = "model.layers.1.block_sparse_moe.experts.3.w1.weight"
    assert a.shape(name) == (64, 64)
    torch.testing.assert_close(a.read(name), b.read(name), rtol=0, atol=0)
    torch.testing.assert_close(a.read_rows(name, 8, 16), a.read(name)[8:16], rtol=0, atol=0)
    assert not torch.equal(a.read(name), a.read(name.replace("experts.3", "experts.2")))
    assert 0.015 < a.read(name).float().std().item() < 0.025
    assert torch.equal(a.read("model.norm.weight"), torch.ones(64, dtype=torch.bfloat16))
    with pytest.raises(CheckpointError, match="not found"):
        a.read("model.layers.9.nothing")


def test_random_checkpoint_loads_like_a_model_directory():
    model = moekit.load_model(RandomCheckpoint(_hf(), "cpu"), dtype="float32")
    tokens = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, temperature=0, eos_token_ids=())
    assert tokens.shape == (1, 4)


def _run(tmp_path, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_parallel.py"), "--small", "--device", "cpu",
                           "--shapes", "mixtral-8x7b", "--out", str(tmp_path), *flags], check=False,
                          capture_output=True, text=True, timeout=240, env=env, cwd=REPO)


@pytest.mark.slow
def test_small_cpu_run_of_two_rows(tmp_path):
    """The fast set (~12 s): bandwidth, 1gpu and ep2tp2 on 2 gloo ranks; ep2tp2's greedy tokens equal
    one process's (float32), its speedup is over the 1gpu row, the table is printed last."""
    r = _run(tmp_path, "--modes", "1gpu,ep2tp2", "--fit-layers", "0")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = json.loads((tmp_path / "bench_parallel.json").read_text())
    assert [row["row"] for row in results["rows"]] == ["bandwidth", "mixtral-8x7b 1gpu", "mixtral-8x7b ep2tp2"]
    row = results["rows"][2]
    for rank in row["ranks"]:
        assert (rank["runtime"]["ep"], rank["runtime"]["tp"], rank["runtime"]["ep_over_tp"]) == (2, 2, True)
    assert all(d["tokens_equal_1gpu"] == 1.0 for d in row["ranks"][0]["decode"].values())
    assert set(row["speedup"]) == {"prefill", "decode_b1", "decode_b4"}
    assert r.stdout.rstrip().endswith("|") and "| mixtral-8x7b ep2tp2 |" in r.stdout


@pytest.mark.slow
def test_small_cpu_run_covers_every_row(tmp_path):
    """One shape (mixtral) on 2 gloo ranks: bandwidth, 1gpu / ep2 / tp2 / ep2tp2, the fit24 rows; every
    parallel mode's greedy tokens equal one process's (float32) (~25 s)."""
    r = _run(tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = json.loads((tmp_path / "bench_parallel.json").read_text())
    rows = {row["row"]: row for row in results["rows"]}
    assert list(rows) == ["bandwidth", "mixtral-8x7b 1gpu", "mixtral-8x7b ep2", "mixtral-8x7b tp2",
                          "mixtral-8x7b ep2tp2", "fit24 offload", "fit24 tp2", "fit24 ep2", "fit24 ep2off"]
    assert results["exit_codes"] == [0, 0]
    bandwidth = rows["bandwidth"]["ranks"][0]
    assert {"mixtral-8x7b N=1", "mixtral-8x7b N=16", "peak 1 MB"} <= set(bandwidth)
    assert all(v["all_reduce_s"] > 0 and v["all_to_all_s"] > 0 for v in bandwidth.values())
    assert rows["mixtral-8x7b 1gpu"]["ranks"][1] == {"idle": True}
    for mode, (ep, tp) in {"ep2": (2, 1), "tp2": (1, 2), "ep2tp2": (2, 2)}.items():
        row = rows[f"mixtral-8x7b {mode}"]
        for rank in row["ranks"]:
            assert "error" not in rank, rank
            assert (rank["runtime"]["ep"], rank["runtime"]["tp"]) == (ep, tp)
            assert rank["runtime"]["experts_held"] == (4 if ep == 2 else 8)  # 2 layers of 4 experts
            assert set(rank["collectives"]) == {"N=1", "N=4", "N=16"}
            for b, d in rank["decode"].items():
                assert d["tok_s"] > 0
        for b, d in row["ranks"][0]["decode"].items():
            assert d["tokens_equal_1gpu"] == 1.0, (mode, b)
        assert set(row["scaling_efficiency"]) == {"prefill", "decode_b1", "decode_b4"}
    offload = rows["fit24 offload"]["ranks"][0]
    assert "error" not in offload, offload
    assert offload["runtime"]["store"] == "host" and offload["runtime"]["cache_slots"] > 0
    for mode in ("tp2", "ep2", "ep2off"):
        assert "speedup" in rows[f"fit24 {mode}"]  # over the offloaded GPU
    for rank in rows["fit24 ep2off"]["ranks"]:  # each rank offloads its own shard
        assert rank["runtime"]["placement"] == "expert_parallel_offloaded" and rank["runtime"]["experts_held"] == 4
    assert rows["fit24 ep2off"]["ranks"][0]["decode"]["1"]["tokens_equal_1gpu"] == 1.0  # vs the offloaded GPU
    assert "| mixtral-8x7b ep2tp2 |" in r.stdout


@pytest.mark.slow
def test_ranks_that_die_in_a_parallel_row_are_restarted_without_graphs(tmp_path):
    """Rank 1 exits in the ep2 row: the launcher records it, restarts both ranks at that row with
    eager decode, and the row still lands in the JSON (~25 s)."""
    r = _run(tmp_path, "--modes", "1gpu,ep2", "--fit-layers", "0", "--die-in-row", "mixtral-8x7b ep2",
             "--collective-timeout-s", "5")
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]  # a death is reported in the exit code
    results = json.loads((tmp_path / "bench_parallel.json").read_text())
    assert [d["row"] for d in results["rank_deaths"]] == ["mixtral-8x7b ep2"]
    assert results["rank_deaths"][0]["exit_codes"][1] == 3
    rows = {row["row"]: row for row in results["rows"]}
    assert list(rows) == ["bandwidth", "mixtral-8x7b 1gpu", "mixtral-8x7b ep2"]
    assert "without CUDA graphs" in rows["mixtral-8x7b ep2"]["note"]
    assert rows["mixtral-8x7b ep2"]["ranks"][0]["decode"]["1"]["tokens_equal_1gpu"] == 1.0
