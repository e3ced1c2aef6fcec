"""Offloaded ranks (parallel.offload) on 2 gloo ranks: each rank offloads its own shard of the
experts under its own budget, with a cache smaller than its shard, and the greedy tokens equal one
process's with every expert resident (float32); and the refusals (compressed experts, a rank
owning fewer experts of a layer than top-k)."""

from __future__ import annotations

import pytest
import torch
from conftest import token_ids
from pruned_models import MATRIX_SHAPE, save_tiny
from ranks import RankError, run_ranks
from workers import offloaded_cases

import moekit
from moekit.errors import MoekitError
from moekit.quant.compress import compress
from moekit.quant.config import QuantConfig

NEW_TOKENS = 6
BUDGET_BYTES = 520_000  # the planner's least (430 KB: non-expert weights, activations, 2 experts) + ~3 experts


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """One spawn of 2 ranks over the cases: a tiny mixtral of 8 experts (top-2) in 3 layers (4 experts
    per layer per rank), an int4 copy, and an expert map leaving rank 0 one expert of layer 0."""
    root = tmp_path_factory.mktemp("offloaded_ranks")
    wide = save_tiny(root / "wide", **MATRIX_SHAPE)
    compress(wide, root / "int4", QuantConfig(bits="4", group_size=16, method="rtn"), progress=False)
    ids = token_ids(2, 5, seed=3)
    cases = [{"name": "wide", "path": str(wide)},
             {"name": "int4", "path": str(root / "int4")},
             {"name": "one_expert", "path": str(wide), "expert_map": {0: [0, 1, 1, 1, 1, 1, 1, 1]}}]
    for case in cases:
        case.update(budget_bytes=BUDGET_BYTES, ids=ids, new_tokens=NEW_TOKENS)
    return wide, ids, run_ranks(2, offloaded_cases, cases, timeout_s=60.0, join_s=300.0)


def test_each_rank_offloads_its_shard_and_tokens_equal_one_process(spawned):
    wide, ids, results = spawned
    expected = moekit.load_model(wide).generate(ids, max_new_tokens=NEW_TOKENS, temperature=0, eos_token_ids=())
    for result in results:
        got = result["wide"]
        assert not isinstance(got, RankError), got
        assert torch.equal(got["tokens"], expected)
        report, offload = got["report"], got["report"]["offload"]
        assert report["placement"] == "expert_parallel_offloaded"
        assert report["experts_held"] == 12 and report["slots_remote"] > 0  # 4 of 8 in each of 3 layers
        assert 2 <= offload["cache_slots"] < 12  # the cache holds less than the shard: experts move
        assert offload["bytes_moved"] > 0 and offload["predictor"] == "none"


def test_compressed_experts_are_refused_on_every_rank(spawned):
    for result in spawned[2]:
        assert isinstance(result["int4"], RankError)
        assert "offloaded ranks hold dense experts only for now" in result["int4"]


def test_a_rank_with_fewer_experts_than_top_k_is_refused(spawned):
    for result in spawned[2]:
        assert isinstance(result["one_expert"], RankError)
        assert "rank 0 owns 1 experts of layer 0, fewer than the 2 a token may need" in result["one_expert"]


@pytest.mark.parametrize("misses", ["cpu", "mapped"])
def test_misses_other_than_fetch_are_refused_before_loading(misses):
    """A rank fetches its shard's misses: cpu and mapped are refused in one line (auto, the default,
    runs as fetch; the spawned cases above load with it)."""
    from moekit.offload import OffloadConfig
    from moekit.parallel.offload import OffloadedParallelLoader

    with pytest.raises(MoekitError, match=f"misses '{misses}' is not available with expert parallelism"):
        OffloadedParallelLoader(None, OffloadConfig(misses=misses))  # refused before it touches the group
