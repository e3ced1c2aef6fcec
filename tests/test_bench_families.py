"""benchmarks/bench_families.py (issue 15's H200 rows): the MXFP4 rounding of family_shapes against
moekit's decoder, its HBM-bound byte count, and (slow) the --small run on the CPU producing every row."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_families
import common
import family_shapes

from moekit.experts.clamped import FP4_VALUES, decode_mxfp4


@pytest.fixture(autouse=True)
def _clock_from_now(monkeypatch):
    """main()'s --time-budget-s counts from benchmarks.common's import; in a long pytest run that
    was minutes before this test: each test's clock starts with the test."""
    monkeypatch.setattr(common, "T_START", time.perf_counter())


def test_mxfp4_rounding_decodes_to_the_nearest_code():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 96, generator=g) * torch.logspace(-3, 2, 6)[:, None]  # rows over five decades
    blocks, scales = family_shapes.quantize_mxfp4(w)
    assert blocks.shape == (6, 3, 16) and blocks.dtype == torch.uint8 and scales.shape == (6, 3)
    back = decode_mxfp4(blocks, scales, torch.float32)
    # every value lands on its group's grid (e2m1 values times the group's power of two), nearest point
    power = torch.exp2(scales.float() - 127.0).repeat_interleave(32, dim=1)
    grid = torch.tensor(FP4_VALUES[:8])
    nearest = (w.abs() / power)[..., None].sub(grid).abs().min(-1).values * power
    torch.testing.assert_close((back - w).abs(), nearest, rtol=0, atol=1e-6)
    assert torch.equal(torch.sign(back[back != 0]), torch.sign(w[back != 0]))
    # values already on the grid come back exactly
    exact = torch.tensor(FP4_VALUES).repeat(2)[None] * 0.25
    assert torch.equal(decode_mxfp4(*family_shapes.quantize_mxfp4(exact), torch.float32), exact)


def test_decode_step_bytes_counts_distinct_experts():
    groups = {"other": 1000, "embed": 10**6, "experts:layers.1.mlp": 64 * 10, "experts:layers.2.mlp": 64 * 10}
    one = family_shapes.decode_step_bytes(groups, experts=64, top_k=6, batch=1, hidden=8)
    assert one == pytest.approx(1000 + 2 * 8 + 2 * 6 * 10)  # B=1 reads top-k experts a layer, no embedding table
    many = family_shapes.decode_step_bytes(groups, experts=64, top_k=6, batch=10_000, hidden=8)
    assert many == pytest.approx(1000 + 2 * 8 * 10_000 + 2 * 64 * 10)


@pytest.mark.slow
def test_small_run_produces_every_row(tmp_path):
    code = bench_families.main(["--device", "cpu", "--small", "--out", str(tmp_path), "--tmp", str(tmp_path / "ckpt"),
                                "--hf-impls", "default,eager", "--batches", "1,2", "--reps", "1"])
    assert code == 0
    res = json.loads((tmp_path / "bench_families.json").read_text())
    for shape in bench_families.SHAPES:
        phases = res["shapes"][shape]["phases"]
        # a timed row may refuse a figure on a busy CPU (generate(N) no slower than generate(1)): not broken
        broken = {k: v.get("error", v.get("skipped")) for k, v in phases.items()
                  if "skipped" in v or "timing noise" not in v.get("error", "timing noise")}
        assert not broken, broken
        assert phases["correctness"]["logits_rel_error"] < 0.05
    metrics = {(r["shape"], r["engine"].split(" (")[0], r["metric"]) for r in res["table"]}
    for shape in bench_families.SHAPES:
        for batch in (1, 2):  # a row, or on a busy CPU the refusal to time noise (generate(N) <= generate(1))
            hf = res["shapes"][shape]["phases"][f"hf_decode_default_b{batch}"]
            assert "tok_s" in hf or "timing noise" in hf["error"], hf
        assert any(s == shape and e.startswith("moekit") and m == "resident decode B=2" for s, e, m in metrics)
        assert any(s == shape and e == "moekit offloaded" and "10%" in m for s, e, m in metrics)
        assert any(s == shape and e == "transformers + accelerate" and "25%" in m for s, e, m in metrics)
        assert any(s == shape and m.startswith("KV bytes/token") for s, e, m in metrics)
    kv = res["shapes"]["deepseek-v2-lite"]["phases"]["kv_bytes"]
    assert kv["moekit_expanded_total"] > kv["moekit_total"]
    assert kv["moekit_per_layer_bytes_per_token"][0] == kv["formula_per_layer_bf16"]["latent"]
    assert kv["moekit_expanded_per_layer"][0] == kv["formula_per_layer_bf16"]["expanded"]
