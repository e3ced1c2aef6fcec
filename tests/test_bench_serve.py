"""benchmarks/bench_serve.py (issue 13) without a checkpoint on disk: the drawn weights' bytes and
choice, the offloaded host store read from a RandomCheckpoint, transformers built from the config,
and (slow) the --small CPU run producing every row from disk and from drawn weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_serve
import serve_weights
from random_weights import RandomCheckpoint

import moekit
from moekit.experts.forms import DenseForm
from moekit.load import read_config
from moekit.offload import OffloadConfig, load_offloaded
from moekit.offload.planner import activation_bytes, kv_cache_bytes, resident_bytes
from moekit.offload.store import HostStore

CONTEXT = 24


def test_auto_writes_olmoe_and_draws_qwen3():
    olmoe = serve_weights.shape_bytes(bench_serve.SHAPES["olmoe-1b-7b"](False))
    qwen3 = serve_weights.shape_bytes(bench_serve.SHAPES["qwen3-30b-a3b"](False))
    assert olmoe == 13_838_323_712  # the bytes the f472762 H200 run wrote (bench_serve.json)
    assert 61.0e9 < qwen3 < 61.1e9
    assert serve_weights.weights_mode("auto", olmoe, 20.0) == "disk"
    assert serve_weights.weights_mode("auto", qwen3, 20.0) == "drawn"
    assert serve_weights.weights_mode("disk", qwen3, 20.0) == "disk"
    assert serve_weights.weights_mode("drawn", olmoe, 20.0) == "drawn"
    with pytest.raises(ValueError, match="--weights"):
        serve_weights.weights_mode("ram", olmoe, 20.0)
    cfg = read_config(RandomCheckpoint(bench_serve.SHAPES["qwen3-30b-a3b"](False), "cpu"))[2]
    assert serve_weights.routed_expert_bytes(cfg) == 48 * 128 * 3 * 2048 * 768 * 2  # what the pinned store holds
    assert serve_weights.offload_setup_estimate_s(12_900_000_000) == pytest.approx(21.7, abs=0.1)  # OLMoE: 22.3 s


@pytest.mark.parametrize("shape", ["olmoe-1b-7b", "qwen3-30b-a3b"])
def test_drawn_and_written_weights_hold_the_same_bytes(tmp_path, shape):
    hf = bench_serve.SHAPES[shape](True)
    drawn = serve_weights.prepare_weights(hf, "drawn", tmp_path / "drawn", shape, torch.device("cpu"))
    disk = serve_weights.prepare_weights(hf, "disk", tmp_path / "disk", shape, torch.device("cpu"))
    assert drawn.nbytes == disk.nbytes == serve_weights.shape_bytes(hf)
    assert drawn.folder is None and not (tmp_path / "drawn").exists()  # nothing written
    assert (tmp_path / "disk" / shape / "config.json").exists()
    assert drawn.cfg == disk.cfg
    assert isinstance(drawn.moekit_source(), RandomCheckpoint) and disk.moekit_source() == tmp_path / "disk" / shape
    assert drawn.describe()["mode"] == "drawn" and "near-uniform" in drawn.describe()["note"]
    # transformers' own init, built from the config: the same shapes, so the same bytes
    hf_model = drawn.transformers_model()
    setup = serve_weights.transformers_setup(hf_model)
    assert setup["weight_bytes"] == drawn.nbytes and setup["dtype"] == "torch.bfloat16"
    out = serve_weights.transformers_padded(hf_model, [[5, 6, 7], [8, 9]], 2, 3, torch.device("cpu"), 1, 30.0)
    assert out["output_tokens"] == 2 * 3 and out["stopped_by_max_time"] == 0


def test_offloaded_host_store_reads_a_random_checkpoint():
    """What the H200 run's offloaded row does (HostStore filled expert by expert from drawn
    tensors), on the CPU: the same greedy tokens as the resident model of the same checkpoint."""
    hf = bench_serve.SHAPES["qwen3-30b-a3b"](True)
    resident = moekit.load_model(RandomCheckpoint(hf, "cpu"), dtype="float32")
    cfg = resident.config
    expert = DenseForm(cfg.hidden_size, cfg.expert_ffn, torch.float32).expert_bytes(0)
    budget = (resident_bytes(cfg, torch.float32) + kv_cache_bytes(cfg, torch.float32, 1, CONTEXT)
              + activation_bytes(cfg, torch.float32, CONTEXT, 1) + (cfg.top_k + 4) * expert)
    model = load_offloaded(RandomCheckpoint(hf, "cpu"), dtype="float32",
                           offload=OffloadConfig(device_memory=budget, context_tokens=CONTEXT, store="host"))
    store = model.offload.store
    assert isinstance(store, HostStore) and store.host_bytes() == cfg.num_layers * cfg.num_experts * expert
    assert model.offload.cache.num_slots < cfg.num_experts * cfg.num_layers  # some experts must miss
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    want = resident.generate(ids, max_new_tokens=8, temperature=0, eos_token_ids=())
    got = model.generate(ids, max_new_tokens=8, temperature=0, eos_token_ids=())
    assert torch.equal(got, want)


def _run(out: Path, *flags: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_serve.py"), "--small", "--device", "cpu",
                        "--out", str(out), "--concurrency", "1", "8", "--alt-no-overlap", "--alt-eager-mixed",
                        "--alt-prefill-cap", "0", "--time-budget-s", "400", *flags],
                       check=False, capture_output=True, text=True, timeout=420, env=env, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads((out / "bench_serve.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["disk", "drawn"])
def test_small_cpu_run_gives_every_row(tmp_path, weights):
    """~25 s each on a 2-core CPU: both weight sources give the resident, static, transformers and
    offloaded rows; only the disk run writes a checkpoint; no alternative row was asked for."""
    res = _run(tmp_path, "--shapes", "qwen3-30b-a3b", "--weights", weights)
    shape = res["shapes"]["qwen3-30b-a3b"]
    assert "error" not in shape, shape.get("traceback")
    assert shape["weights"]["mode"] == weights and shape["weights"]["bytes"] == shape["checkpoint_bytes"]
    assert ("checkpoint_write_s" in shape) == (weights == "disk")
    assert shape["transformers_load"].get("source") == ("from_pretrained" if weights == "disk" else "from_config"), \
        shape["transformers_load"]
    for c in (1, 8):
        row = shape[f"c{c}"]
        assert sorted(k for k in row if k.startswith("moekit_serve")) == ["moekit_serve"]
        for engine in ("moekit_serve", "moekit_static", "transformers"):
            assert row[engine].get("output_tok_s", row[engine].get("decode_tok_s", 0)) > 0, (c, engine, row[engine])
        served = row["moekit_serve"]
        assert served["output_tokens"] == served["requests"] * 8, served  # --small: 8 new tokens each
    offload = shape["offload_c1"]["moekit_serve"]
    assert offload.get("output_tok_s", 0) > 0 and 0.0 <= offload["expert_hit_rate"] <= 1.0, offload
    assert [r[1] for r in res["table"]] == ["resident", "resident", "offload 25%"], res["table"]
