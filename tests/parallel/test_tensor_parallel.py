"""Tensor parallelism and ep x tp grids on 2 and 4 gloo ranks (spawned processes): greedy tokens
equal one process's (float32) for mixtral, qwen3_moe, olmoe ("full" q/k norm), qwen2_moe (shared
expert, a dense layer) and deepseek_v2 (latent attention, shared experts, a dense layer), at tp=2,
tp=4 (kv heads replicated), ep=2 x tp=2, and tp=2,ep=tp (heads and experts over the same 2 ranks); gpt-oss (sinks, clamped experts replicated over the
row), glm4_moe, deepseek_v3 (q_lora), an int4 model and a globally pruned one (slow); and the
refusals (sizes that do not divide, a grid that is not the world)."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch
from conftest import token_ids
from pruned_models import MATRIX_SHAPE, prune_globally, save_tiny
from ranks import RankError, run_ranks
from test_expert_parallel import _experts_read
from workers import cut_steps, grid_cases, tp_sleep_or_step

import moekit
from moekit.errors import MoekitError
from moekit.load import read_config
from moekit.parallel import ExpertComm
from moekit.parallel.tensor import ParallelGroups, check_tensor_parallel, kv_heads_of
from moekit.quant.compress import compress
from moekit.quant.config import QuantConfig

NEW_TOKENS = 6
FAMILIES = ["mixtral", "qwen3_moe", "olmoe", "qwen2_moe", "deepseek_v2"]


# ---- checks (no processes) ---------------------------------------------------------------------------

def test_kv_heads_split_or_replicate():
    assert [kv_heads_of(4, 2, 2, r) for r in range(2)] == [(0, 1), (1, 2)]
    assert [kv_heads_of(4, 2, 4, r) for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]  # replicated
    assert [kv_heads_of(8, 4, 2, r) for r in range(2)] == [(0, 2), (2, 4)]
    with pytest.raises(MoekitError, match="the 3 key/value heads can neither be split over 2 ranks"):
        kv_heads_of(6, 3, 2, 0)


def test_sizes_that_do_not_divide_are_refused(tiny):
    cfg = read_config(tiny("qwen2_moe").path)[2]  # 4 heads, expert ffn 24, shared 40, dense 48
    check_tensor_parallel(cfg, 4, split_experts=True)
    with pytest.raises(MoekitError, match="tp=3 does not divide the 4 attention heads"):
        check_tensor_parallel(cfg, 3, split_experts=True)
    cfg = dataclasses.replace(cfg, num_heads=8, num_kv_heads=8)  # tp=8 divides 48, 40 and 24
    check_tensor_parallel(cfg, 8, split_experts=True)
    with pytest.raises(MoekitError, match="tp=8 does not divide the dense MLP ffn width 44; give a tp that divides 44"):
        check_tensor_parallel(dataclasses.replace(cfg, dense_ffn=44), 8, split_experts=True)
    with pytest.raises(MoekitError, match="tp=8 does not divide the shared expert ffn width 20"):
        check_tensor_parallel(dataclasses.replace(cfg, shared_expert_ffn=20), 8, split_experts=True)
    with pytest.raises(MoekitError, match="tp=8 does not divide the expert ffn width 20"):
        check_tensor_parallel(dataclasses.replace(cfg, expert_ffn=20), 8, split_experts=True)
    check_tensor_parallel(dataclasses.replace(cfg, expert_ffn=20), 8, split_experts=False)  # replicated experts


def test_latent_attention_splits_by_query_heads_only(tiny):
    cfg = read_config(tiny("deepseek_v2").path)[2]  # 4 heads; kv heads do not matter (one latent)
    check_tensor_parallel(dataclasses.replace(cfg, num_kv_heads=1), 4, split_experts=True)
    with pytest.raises(MoekitError, match="tp=3 does not divide the 4 attention heads"):
        check_tensor_parallel(cfg, 3, split_experts=True)


def test_grid_must_cover_the_world():
    with pytest.raises(MoekitError, match="ep=2,tp=2 needs ep x tp = 4 processes, but there are 2: give torchrun "
                                          "--nproc-per-node 4"):
        ParallelGroups.create(ExpertComm(0, 2, torch.device("cpu")), 2, 2)
    with pytest.raises(MoekitError, match="tp=4,ep=tp splits heads and experts over the same ranks and needs tp = 2 "
                                          "processes"):
        ParallelGroups.create(ExpertComm(0, 2, torch.device("cpu")), 4, 4, ep_over_tp=True)
    world = ExpertComm(0, 2, torch.device("cpu"))
    groups = ParallelGroups.create(world, 2, 2, ep_over_tp=True)  # no collective: both views are the world
    assert groups.tp is world and groups.ep is world and groups.ep_over_tp


# ---- ranks ---------------------------------------------------------------------------------------------

def _spawn(world: int, cases: list[dict]):
    """Returns ({name: case}, [each rank's results]) of one spawn of `world` ranks over the cases."""
    ids = token_ids(2, 5, seed=3)
    for case in cases:
        case.setdefault("ids", ids)
        case["new_tokens"] = NEW_TOKENS
    t0 = time.perf_counter()
    results = run_ranks(world, grid_cases, cases, timeout_s=60.0, join_s=300.0)
    print(f"{world} ranks, {len(cases)} cases: {time.perf_counter() - t0:.1f} s")
    return {c["name"]: c for c in cases}, results


def _case(tiny, variant: str, ep: int, tp: int, over: bool = False) -> dict:
    name = f"{variant}_ep=tp{tp}" if over else f"{variant}_{ep}x{tp}"
    return {"name": name, "path": str(tiny(variant).path), "ep": ep, "tp": tp, "over": over}


OVER = ["mixtral", "qwen2_moe", "deepseek_v2"]  # dense experts, a shared expert and a dense layer, latent attention


@pytest.fixture(scope="module")
def two_ranks(tiny):
    """tp=2 on the five families, ep=2 through the same loader, tp=2,ep=tp on three."""
    return _spawn(2, [*(_case(tiny, v, 1, 2) for v in FAMILIES), _case(tiny, "mixtral", 2, 1),
                      *(_case(tiny, v, 2, 2, over=True) for v in OVER)])


@pytest.fixture(scope="module")
def four_ranks(tiny):
    """The fast 4-rank set: ep=2 x tp=2 on mixtral, qwen2_moe and deepseek_v2, tp=4 on olmoe; each also
    generates for two prompts of different lengths (a paged KV cache of local heads)."""
    cases = [_case(tiny, "mixtral", 2, 2), _case(tiny, "qwen2_moe", 2, 2), _case(tiny, "deepseek_v2", 2, 2),
             _case(tiny, "olmoe", 1, 4)]
    for case in cases:
        case["ragged"] = True
    return _spawn(4, cases)


@pytest.fixture(scope="module")
def more_checkpoints(tiny, tmp_path_factory):
    """Returns {"int4": an RTN int4 copy of the tiny mixtral, "pruned": a globally pruned 8-expert one}."""
    root = tmp_path_factory.mktemp("tensor_parallel")
    compress(tiny("mixtral").path, root / "int4", QuantConfig(bits="4", group_size=16, method="rtn"), progress=False)
    pruned, kept = prune_globally(save_tiny(root / "wide", **MATRIX_SHAPE), root / "pruned", keep=0.5)
    assert len(set(kept)) > 1, kept
    return {"int4": str(root / "int4"), "pruned": str(pruned)}


@pytest.fixture(scope="module")
def two_ranks_more(tiny, more_checkpoints):
    """The slow 2-rank set: gpt-oss, attention biases and clipping, a dense first layer, int4."""
    cases = [_case(tiny, v, 1, 2) for v in ("gpt_oss", "olmoe_clip", "qwen3_moe_bias", "glm4_moe", "deepseek_v3")]
    return _spawn(2, [*cases, {"name": "int4_1x2", "path": more_checkpoints["int4"], "ep": 1, "tp": 2}])


@pytest.fixture(scope="module")
def four_ranks_more(tiny, more_checkpoints):
    """The slow 4-rank set: every family at tp=4 and ep=2 x tp=2, the pruned and int4 models at 2 x 2."""
    cases = [_case(tiny, v, ep, tp) for v in FAMILIES for ep, tp in ((1, 4), (2, 2))]
    cases += [{"name": f"{name}_2x2", "path": more_checkpoints[name], "ep": 2, "tp": 2} for name in ("pruned", "int4")]
    return _spawn(4, cases)


def _check_equal(spawned, name: str) -> None:
    """Every rank's greedy tokens equal one process's, logits within float32 reduction noise; each
    rank holds its heads and expert slices only."""
    cases, results = spawned
    case = cases[name]
    model = moekit.load_model(case["path"])
    with torch.no_grad():
        logits = model(case["ids"])
    tokens = model.generate(case["ids"], max_new_tokens=NEW_TOKENS, temperature=0, eos_token_ids=())
    ids = case["ids"]
    ragged = (model.generate([ids[0, :2], ids[1]], max_new_tokens=NEW_TOKENS, temperature=0, eos_token_ids=())
              if case.get("ragged") else None)
    cfg, ep, tp, over = model.config, case["ep"], case["tp"], case.get("over", False)
    world = tp if over else ep * tp
    for rank, result in enumerate(results):
        got = result[name]
        assert not isinstance(got, RankError), got
        assert torch.equal(got["tokens"], tokens), (rank, got["tokens"], tokens)
        if ragged is not None:
            assert all(torch.equal(a, b) for a, b in zip(got["ragged"], ragged, strict=True)), (got["ragged"], ragged)
        torch.testing.assert_close(got["logits"], logits, rtol=1e-4, atol=1e-4)
        assert got["heads"] == cfg.num_heads // tp  # the KV cache is sized from these
        assert got["kv_heads"] == max(cfg.num_kv_heads // tp, 1)
        report = got["report"]
        assert (report["ranks"], report["ep"], report["tp"], report["ep_over_tp"]) == (world, ep, tp, over)
        if over:  # whole experts, split by id
            assert report["experts_split_by_tp"] is False and got["expert_ffn"] == cfg.expert_ffn
        if report["experts_split_by_tp"]:
            assert got["expert_ffn"] == cfg.expert_ffn // tp
            # gate and up: this rank's rows only; down (columns) whole
            routed = [r for r in got["reads"] if ".experts." in r[0]]
            rows = [stop - start for _, start, stop in routed if start is not None]
            assert rows and set(rows) == {cfg.expert_ffn // tp} and len(rows) == 2 * (len(routed) - len(rows))
    # the experts of a column (ep_over_tp: of every rank): together every expert once; a rank reads only its own
    columns = [list(range(world))] if over else [[e * tp + t for e in range(ep)] for t in range(tp)]
    for ranks in columns:
        column = [results[r][name] for r in ranks]
        held = {layer: sum(c["held"][layer] for c in column) for layer in column[0]["held"]}
        assert held == {i: cfg.experts_in(i) for i in range(cfg.num_layers) if cfg.experts_in(i)}
        if ep > 1:
            for c in column:
                routed = [r for r in c["reads"] if "shared_expert" not in r[0]]  # shared experts: every rank
                assert _experts_read(routed) == {(layer, e) for layer, local in c["local"].items() for e in local}


@pytest.mark.parametrize("variant", FAMILIES)
def test_tp2_equals_one_process(two_ranks, variant):
    _check_equal(two_ranks, f"{variant}_1x2")


def test_ep2_through_the_grid_loader_equals_one_process(two_ranks):
    _check_equal(two_ranks, "mixtral_2x1")


@pytest.mark.parametrize("variant", OVER)
def test_heads_and_experts_over_the_same_two_ranks_equal_one_process(two_ranks, variant):
    _check_equal(two_ranks, f"{variant}_ep=tp2")


@pytest.mark.slow
def test_decode_steps_cut_at_the_expert_calls_equal_whole_steps(tiny):
    """The piecewise step (what CUDA graphs capture around the expert exchanges on GPUs) of ep=2, tp=2
    and tp=2,ep=tp models gives the whole step's logits exactly, step after step."""
    cases = [_case(tiny, "mixtral", 2, 1), _case(tiny, "mixtral", 1, 2), _case(tiny, "qwen2_moe", 2, 2, over=True)]
    for case in cases:
        case.update(ids=token_ids(2, 5, seed=4), steps=3)
    for result in run_ranks(2, cut_steps, cases, timeout_s=60.0, join_s=300.0):
        for case in cases:
            assert result[case["name"]] == [True] * 3, (case["name"], result[case["name"]])


@pytest.mark.parametrize("name", ["mixtral_2x2", "qwen2_moe_2x2", "deepseek_v2_2x2", "olmoe_1x4"])
def test_four_ranks_equal_one_process(four_ranks, name):
    _check_equal(four_ranks, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt_oss_1x2", "olmoe_clip_1x2", "qwen3_moe_bias_1x2", "glm4_moe_1x2",
                                  "deepseek_v3_1x2", "int4_1x2"])
def test_tp2_more_equals_one_process(two_ranks_more, name):
    _check_equal(two_ranks_more, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", [f"{v}_{g}" for v in FAMILIES for g in ("1x4", "2x2")] + ["pruned_2x2", "int4_2x2"])
def test_four_ranks_more_equal_one_process(four_ranks_more, name):
    _check_equal(four_ranks_more, name)


@pytest.mark.slow
def test_compressed_experts_are_replicated_over_the_row(two_ranks_more):
    _, results = two_ranks_more
    for result in results:
        assert result["int4_1x2"]["report"]["experts_split_by_tp"] is False
        assert result["gpt_oss_1x2"]["report"]["experts_split_by_tp"] is False


@pytest.mark.slow
@pytest.mark.parametrize("ep, tp, who", [(1, 2, "rank 0 of 2"), (2, 2, "rank 2 of 4 (tp rank 0 of 2)")])
def test_silent_rank_stops_the_all_reduce_with_a_message(tiny, ep, tp, who):
    t0 = time.perf_counter()
    results = run_ranks(ep * tp, tp_sleep_or_step, str(tiny("mixtral").path), 8.0, ep, tp, timeout_s=3.0,
                        join_s=60.0)
    waiting = results[ep * tp - 2]  # the silent rank's neighbour in its tp row
    print(waiting, f"{time.perf_counter() - t0:.1f} s")
    assert isinstance(waiting, RankError), waiting
    assert f"{who}: the attention all-reduce of layer 0 failed" in waiting
    assert "the collective timeout is 3 s" in waiting


# ---- 2 GPUs (NCCL) ------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_nccl_ranks_equal_one_process_with_cuda_graphs(tiny):
    """ep=2, tp=2 and tp=2,ep=tp on cuda:0 and cuda:1 (NCCL, float32): greedy tokens equal one CPU
    process's; decode is captured whole under tp=2 (NCCL all-reduces in the graph) and in pieces
    around the expert exchanges otherwise."""
    cases = [_case(tiny, "mixtral", 2, 1), _case(tiny, "mixtral", 1, 2), _case(tiny, "qwen2_moe", 2, 2, over=True)]
    ids = token_ids(2, 5, seed=3)
    for case in cases:
        case.update(ids=ids, new_tokens=NEW_TOKENS, load={"dtype": "float32"})
    results = run_ranks(2, grid_cases, cases, timeout_s=120.0, join_s=600.0, backend="nccl")
    graphs = {"mixtral_2x1": "piecewise", "mixtral_1x2": "whole", "qwen2_moe_ep=tp2": "piecewise"}
    for case in cases:
        expected = moekit.load_model(case["path"]).generate(ids, max_new_tokens=NEW_TOKENS, temperature=0,
                                                            eos_token_ids=())
        for result in results:
            got = result[case["name"]]
            assert not isinstance(got, RankError), got
            assert torch.equal(got["tokens"], expected), (case["name"], got["tokens"], expected)
            assert got["graph"] == graphs[case["name"]]

