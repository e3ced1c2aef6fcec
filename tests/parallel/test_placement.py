"""parallel.placement: experts placed over expert-parallel ranks by counted use (moekit usage
--json): each rank keeps the contiguous split's expert count, the busiest rank's load drops, the
same counts give the same map, bad files and foreign counts are refused in one line."""

from __future__ import annotations

import json
import random

import pytest

from moekit.errors import MoekitError
from moekit.parallel.expert import contiguous_owners
from moekit.parallel.placement import (balanced_owners, placement_report, rank_imbalance, read_usage,
                                       usage_map)


def test_popular_experts_go_to_different_ranks():
    """Contiguous ids put the two hot experts (0 and 1) on rank 0: 2x the mean; balanced, one each."""
    load = [100.0, 90.0, 10.0, 10.0, 5.0, 5.0, 1.0, 1.0]
    assert rank_imbalance(contiguous_owners(8, 2, 0), load, 2) == pytest.approx(2 * 210 / 222)
    owners = balanced_owners(load, 2)
    assert owners[0] != owners[1] and sorted(owners) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert rank_imbalance(owners, load, 2) <= 2 * 112 / 222  # 112 / 110 against 210 / 12


@pytest.mark.parametrize("experts, world", [(8, 2), (64, 4), (60, 8), (7, 3), (5, 5)])
def test_counts_per_rank_kept_and_never_worse_than_contiguous(experts, world):
    rng = random.Random(experts * world)
    for _ in range(20):
        load = [rng.paretovariate(1.2) for _ in range(experts)]  # heavy-tailed, as routers are
        owners = balanced_owners(load, world)
        contiguous = contiguous_owners(experts, world, 0)
        assert sorted(owners) == sorted(contiguous)  # each rank the same number of experts
        assert rank_imbalance(owners, load, world) <= rank_imbalance(contiguous, load, world) + 1e-12
        assert balanced_owners(load, world) == owners  # the same counts, the same map


def test_too_few_experts_for_the_ranks_is_refused():
    with pytest.raises(MoekitError, match="3 experts cannot be placed over 4 ranks"):
        balanced_owners([1.0, 2.0, 3.0], 4)


def usage_file(tmp_path, rows) -> str:
    path = tmp_path / "usage.json"
    path.write_text(json.dumps({"tokens": 10, "top_k": 2, "layers": rows}))
    return str(path)


def test_usage_file_read_and_checked_against_the_model(tmp_path):
    path = usage_file(tmp_path, [{"layer": 0, "experts": 4, "hard": [5, 1, 1, 5]},
                                 {"layer": 2, "experts": 4, "hard": [0, 0, 3, 9]}])
    counts = read_usage(path)
    assert counts == {0: [5.0, 1.0, 1.0, 5.0], 2: [0.0, 0.0, 3.0, 9.0]}
    placed = usage_map(counts, {0: 4, 2: 4}, 2, path)
    assert placed[0][0] != placed[0][3] and placed[2][2] != placed[2][3]
    report = placement_report(placed, counts, 2)
    # layer 0 evens out (5 + 1 each), layer 2 cannot (9 alone against 3): 1.0 and 1.5
    assert report["balanced_mean"] == pytest.approx(1.25) and report["balanced_worst"] == pytest.approx(1.5)
    assert report["contiguous_worst"] == pytest.approx(2.0)
    with pytest.raises(MoekitError, match="the model's MoE layers are \\[0, 1\\]"):
        usage_map(counts, {0: 4, 1: 4}, 2, path)
    with pytest.raises(MoekitError, match="layer 2 has 4 counts, the model 8 experts"):
        usage_map(counts, {0: 4, 2: 8}, 2, path)


@pytest.mark.parametrize("text, message", [
    ("{not json", "not JSON"),
    ('{"tokens": 3}', "no 'layers' list"),
    ('{"layers": [{"layer": 0, "hard": [1, -2]}]}', "non-negative 'hard' counts"),
    ('{"layers": [{"layer": "0", "hard": [1]}]}', "an integer 'layer'"),
])
def test_bad_usage_files_are_one_line(tmp_path, text, message):
    path = tmp_path / "usage.json"
    path.write_text(text)
    with pytest.raises(MoekitError, match=message) as e:
        read_usage(path)
    assert "\n" not in str(e.value)
    with pytest.raises(MoekitError, match="cannot read it"):
        read_usage(tmp_path / "missing.json")


def test_stats_name_the_balance_bought():
    from moekit.parallel.cli import stats_rows

    report = {"ranks": 2, "ep": 2, "tp": 1, "rank": 0, "experts_held": 16, "slots_local": 5, "slots_remote": 5,
              "bytes_sent": 1024, "layer_calls": 8,
              "expert_usage": {"file": "u.json", "balanced_mean": 1.01, "balanced_worst": 1.02,
                               "contiguous_mean": 1.89, "contiguous_worst": 1.9}}
    rows = dict(stats_rows(report))
    assert rows["expert placement"] == ("balanced by u.json: busiest rank 1.01x the mean (worst layer 1.02x), "
                                        "contiguous ids 1.89x (1.90x), as counted")
