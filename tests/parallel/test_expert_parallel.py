"""Expert parallelism on 2 gloo ranks (spawned processes): tokens and logits equal one process's,
for plain, globally pruned and compressed checkpoints, with contiguous and given expert maps; and
the errors (too many ranks, ranks on different checkpoints, a dead rank)."""

from __future__ import annotations

import itertools
import re
import time

import pytest
import torch
from conftest import token_ids
from pruned_models import MATRIX_SHAPE, prune_globally, save_tiny
from ranks import RankError, run_ranks
from workers import die_or_load, generate_cases, sleep_or_load

import moekit
from moekit.errors import MoekitError
from moekit.parallel.expert import check_owners, contiguous_owners, token_chunk
from moekit.quant.compress import compress
from moekit.quant.config import QuantConfig

NEW_TOKENS = 6


# ---- maps (no processes) ----------------------------------------------------------------------------

def test_contiguous_owners_split_unevenly():
    assert contiguous_owners(4, 2, 0) == [0, 0, 1, 1]
    assert contiguous_owners(5, 2, 0) == [0, 0, 0, 1, 1]
    assert contiguous_owners(3, 3, 0) == [0, 1, 2]


def test_more_ranks_than_experts_is_refused():
    with pytest.raises(MoekitError, match="layer 2 has 3 experts, fewer than the 4 ranks"):
        contiguous_owners(3, 4, 2)


def test_given_map_is_checked():
    assert check_owners([1, 0, 1], 3, 2, 0) == [1, 0, 1]
    with pytest.raises(MoekitError, match="gives 2 owners for layer 1, which has 3"):
        check_owners([0, 1], 3, 2, 1)
    with pytest.raises(MoekitError, match=r"names rank\(s\) \[2\]"):
        check_owners([0, 2, 1], 3, 2, 0)


def test_token_chunks_cover_every_token_once():
    for n in (1, 2, 5, 8):
        chunks = [token_chunk(n, 3, r) for r in range(3)]
        assert chunks[0][0] == 0 and chunks[-1][1] == n
        assert all(a[1] == b[0] for a, b in itertools.pairwise(chunks))


# ---- 2 ranks -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoints(tiny, tmp_path_factory):
    """Returns a function name -> checkpoint path, each built once: "plain" the tiny mixtral (4
    experts), "pruned" a globally pruned copy of an 8-expert one (layers keep different counts),
    "int4" an RTN int4 copy of the mixtral, "gpt_oss" the tiny gpt-oss (clamped experts with biases)."""
    root = tmp_path_factory.mktemp("parallel")
    built: dict = {"plain": tiny("mixtral").path, "gpt_oss": tiny("gpt_oss").path}

    def get(name: str):
        if name not in built:
            if name == "pruned":
                src = save_tiny(root / "wide", **MATRIX_SHAPE)
                built["pruned"], built["kept"] = prune_globally(src, root / "pruned", keep=0.5)
                assert len(set(built["kept"])) > 1, built["kept"]  # uneven counts per layer
            elif name == "int4":
                compress(built["plain"], root / "int4", QuantConfig(bits="4", group_size=16, method="rtn"),
                         progress=False)
                built["int4"] = root / "int4"
        return built[name]

    return get


def _spawn(cases: list[dict]):
    """Returns ({name: case}, [rank 0's results, rank 1's]) of one spawn of 2 ranks over the cases."""
    ids = token_ids(2, 5, seed=3)
    for case in cases:
        case.setdefault("ids", ids)
        case["new_tokens"] = NEW_TOKENS
    t0 = time.perf_counter()
    results = run_ranks(2, generate_cases, cases)
    print(f"2 ranks, {len(cases)} cases: {time.perf_counter() - t0:.1f} s")
    return {c["name"]: c for c in cases}, results


@pytest.fixture(scope="module")
def two_ranks(checkpoints):
    """The default set: the plain model, a refused expert map, ranks on different checkpoints."""
    plain = str(checkpoints("plain"))
    return _spawn([
        {"name": "plain", "path": plain, "seed": 7},  # also samples (temperature 0.9) with this seed
        {"name": "one_sequence", "path": plain, "ids": token_ids(1, 4, seed=4)},  # decode: 1 token, 2 ranks
        {"name": "bad_map", "path": plain, "expert_map": {0: [0, 5, 1, 0]}},
        {"name": "maps_disagree", "path": plain, "expert_map": [{0: [0, 0, 1, 1]}, {0: [1, 1, 0, 0]}]},
        {"name": "disagree", "path": [plain, str(checkpoints("int4"))]},  # last: both ranks fail alike
    ])


@pytest.fixture(scope="module")
def two_ranks_more(checkpoints):
    """The slow set: a given uneven map, a globally pruned model, an RTN int4 model."""
    return _spawn([
        {"name": "plain_map", "path": str(checkpoints("plain")), "expert_map": {0: [1, 1, 1, 0], 1: [0, 1, 0, 0]}},
        {"name": "pruned", "path": str(checkpoints("pruned"))},
        {"name": "int4", "path": str(checkpoints("int4"))},
        {"name": "gpt_oss", "path": str(checkpoints("gpt_oss"))},  # biases, clamped SwiGLU, sinks
        {"name": "skip", "path": str(checkpoints("plain")), "load": {"dynamic_skip": 0.9}},  # zero-weight slots stay home
    ])


def _reference(path, ids, **load):
    model = moekit.load_model(path, **load)
    with torch.no_grad():
        logits = model(ids)
    return logits, model.generate(ids, max_new_tokens=NEW_TOKENS, temperature=0, eos_token_ids=())


@pytest.mark.parametrize("name", ["plain", "one_sequence"])
def test_two_ranks_equal_one_process(two_ranks, name):
    _check_equal(two_ranks, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["plain_map", "pruned", "int4", "gpt_oss", "skip"])
def test_two_ranks_equal_one_process_more(two_ranks_more, name):
    _check_equal(two_ranks_more, name)


def _check_equal(spawned, name):
    cases, results = spawned
    case = cases[name]
    logits, tokens = _reference(case["path"], case["ids"], **case.get("load", {}))
    for rank, result in enumerate(results):
        got = result[name]
        assert not isinstance(got, RankError), got
        assert torch.equal(got["tokens"], tokens), (rank, got["tokens"], tokens)
        torch.testing.assert_close(got["logits"], logits, rtol=1e-5, atol=1e-5)
    # each rank holds only its slice: together every expert once
    held = [r[name]["held"] for r in results]
    total = {layer: held[0][layer] + held[1][layer] for layer in held[0]}
    cfg = moekit.load_model(case["path"]).config
    assert total == {i: cfg.experts_in(i) for i in range(cfg.num_layers) if cfg.experts_in(i)}
    assert all(r[name]["report"]["slots_remote"] > 0 for r in results)  # tokens did travel
    for result in results:  # lazy reads: a rank reads its own experts' bytes, no one else's
        assert _experts_read(result[name]["reads"]) == {(layer, e) for layer, local in result[name]["local"].items()
                                                        for e in local}


def _experts_read(reads) -> set[tuple[int, int]]:
    """Returns the (layer, expert) pairs whose weights a rank read: per-expert tensors
    (...layers.L...experts.E...) or one row of a stacked [E, ...] tensor (...layers.L...experts.NAME)."""
    out = set()
    for name, start, stop in reads:
        m = re.search(r"layers\.(\d+)\..*experts\.(\d+)\.", name)
        if m:
            out.add((int(m.group(1)), int(m.group(2))))
            continue
        m = re.search(r"layers\.(\d+)\..*experts\.", name)
        if m:
            assert start is not None, f"{name} read whole: every expert's bytes"
            out.update((int(m.group(1)), e) for e in range(start, stop))
    return out


@pytest.mark.slow
def test_given_map_places_experts(two_ranks_more):
    _, results = two_ranks_more
    assert results[0]["plain_map"]["held"] == {0: 1, 1: 3}
    assert results[1]["plain_map"]["held"] == {0: 3, 1: 1}


@pytest.mark.slow
def test_pruned_layers_keep_their_own_counts(two_ranks_more, checkpoints):
    _, results = two_ranks_more
    checkpoints("pruned")
    kept = checkpoints("kept")
    held = [results[r]["pruned"]["held"] for r in range(2)]
    assert [held[0][i] + held[1][i] for i in sorted(held[0])] == kept


def test_bad_map_is_refused_on_every_rank(two_ranks):
    _, results = two_ranks
    for result in results:
        assert isinstance(result["bad_map"], RankError)
        assert "names rank(s) [5]" in result["bad_map"]


def test_ranks_with_different_expert_maps_are_refused(two_ranks):
    """Each rank makes its map itself (from its --expert-usage file): maps that differ would send
    slots to ranks that do not hold their experts, so every rank stops with one line."""
    _, results = two_ranks
    for rank, result in enumerate(results):
        assert isinstance(result["maps_disagree"], RankError), result["maps_disagree"]
        assert "the ranks disagree on the expert map" in result["maps_disagree"]
        assert "give every rank the same --expert-usage file" in result["maps_disagree"]


def test_ranks_on_different_checkpoints_are_refused(two_ranks):
    _, results = two_ranks
    for rank, result in enumerate(results):
        assert isinstance(result["disagree"], RankError), result["disagree"]
        assert "the ranks disagree on the checkpoint" in result["disagree"]
        assert f"rank {rank}" in result["disagree"]


@pytest.mark.slow
def test_dead_rank_stops_the_others_with_a_message(checkpoints):
    t0 = time.perf_counter()
    results = run_ranks(2, die_or_load, str(checkpoints("plain")), timeout_s=3.0, join_s=60.0)
    assert time.perf_counter() - t0 < 60
    assert isinstance(results[0], RankError), results[0]
    print(results[0])
    assert "rank 0 of 2" in results[0] and "another rank exited or stopped answering" in results[0]


def test_sampling_with_one_seed_equals_one_process(two_ranks):
    cases, results = two_ranks
    case = cases["plain"]
    model = moekit.load_model(case["path"])
    expected = model.generate(case["ids"], max_new_tokens=NEW_TOKENS, temperature=0.9, seed=case["seed"],
                              eos_token_ids=())
    for result in results:
        assert torch.equal(result["plain"]["sampled"], expected)


@pytest.mark.slow
def test_silent_rank_times_out_with_a_message(checkpoints):
    t0 = time.perf_counter()
    results = run_ranks(2, sleep_or_load, str(checkpoints("plain")), 6.0, timeout_s=2.0, join_s=60.0)
    print(results[0], f"{time.perf_counter() - t0:.1f} s")
    assert isinstance(results[0], RankError), results[0]
    assert "rank 0 of 2" in results[0] and "the collective timeout is 2 s" in results[0]


@pytest.mark.slow
def test_zero_weight_slots_are_not_sent(two_ranks_more):
    _, results = two_ranks_more

    def slots(name):
        return sum(r[name]["report"]["slots_local"] + r[name]["report"]["slots_remote"] for r in results)

    assert results[0]["skip"]["report"]["layer_calls"] == results[0]["plain_map"]["report"]["layer_calls"]
    assert slots("skip") < slots("plain_map")  # the same calls, every slot kept there
