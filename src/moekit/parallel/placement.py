"""Expert placement over expert-parallel ranks balanced by measured use (`moekit usage`).

A rank's share of an expert-parallel layer's work is the routed slots its experts receive. Split
in contiguous runs (expert.contiguous_owners), a rank that happens to hold the popular experts
does most of the layer's work while the others wait at its all_to_all. Given the hard counts of
`moekit usage --json` (times each expert was in the top-k over calibration text), each layer is
placed by longest-processing-time first: experts in falling count, each to the rank with the least
load so far among ranks that still have room -- every rank keeping the contiguous split's expert
count (E // R, the first E % R one more), so each rank's memory stays what it was. Recomputable:
count again on other text, place again (the same file gives the same map on every rank, and the
loader checks that the ranks agree).

Shapes: E = experts of a layer, R = ranks.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..errors import MoekitError


def read_usage(path: str | Path) -> dict[int, list[float]]:
    """Returns {model layer: hard count of each expert} of a `moekit usage --json` file; raises
    MoekitError in one line for a file that is missing, not JSON, or not a usage report."""
    path = Path(path)
    try:
        report = json.loads(path.read_text())
    except OSError as e:
        raise MoekitError(f"--expert-usage {path}: cannot read it ({e.strerror or e})") from None
    except ValueError as e:
        raise MoekitError(f"--expert-usage {path}: not JSON ({e}); write it with moekit usage MODEL --json") from None
    rows = report.get("layers") if isinstance(report, dict) else None
    if not isinstance(rows, list) or not rows:
        raise MoekitError(f"--expert-usage {path}: no 'layers' list; write it with moekit usage MODEL --json")
    counts: dict[int, list[float]] = {}
    for row in rows:
        hard = row.get("hard") if isinstance(row, dict) else None
        layer = row.get("layer") if isinstance(row, dict) else None
        if not isinstance(layer, int) or not isinstance(hard, list) or not hard or \
                not all(isinstance(c, (int, float)) and c >= 0 for c in hard):
            raise MoekitError(f"--expert-usage {path}: a layer entry without an integer 'layer' and a list of "
                              "non-negative 'hard' counts; write it with moekit usage MODEL --json")
        counts[layer] = [float(c) for c in hard]
    return counts


def balanced_owners(load: Sequence[float], world: int) -> list[int]:
    """Returns the owning rank of each expert: longest processing time first under the contiguous
    split's expert count per rank (the first E % R ranks one more), then swaps of an expert of the
    busiest rank with one of another rank while that lowers the busier of the two; never a worse
    busiest rank than the contiguous split's (that split is returned where it is as good). Ties go
    to the lower expert id and the lower rank, so every rank computes the same map."""
    from .expert import contiguous_owners

    experts = len(load)
    if experts < world:
        raise MoekitError(f"{experts} experts cannot be placed over {world} ranks: every rank needs at least one")
    base, extra = divmod(experts, world)
    room = [base + (r < extra) for r in range(world)]
    held = [0.0] * world
    owners = [0] * experts
    for e in sorted(range(experts), key=lambda e: (-load[e], e)):
        r = min((r for r in range(world) if room[r] > 0), key=lambda r: (held[r], r))
        owners[e], held[r], room[r] = r, held[r] + load[e], room[r] - 1
    for _ in range(experts * experts):  # each swap lowers the pair's busier rank: it ends
        busiest = max(range(world), key=lambda r: (held[r], -r))
        best = None  # (the pair's busier load after the swap, expert on busiest, other expert)
        for a in (e for e in range(experts) if owners[e] == busiest):
            for b in (e for e in range(experts) if owners[e] != busiest and load[e] < load[a]):
                after = max(held[busiest] - load[a] + load[b], held[owners[b]] + load[a] - load[b])
                if after < held[busiest] and (best is None or after < best[0]):
                    best = (after, a, b)
        if best is None:
            break
        _, a, b = best
        other = owners[b]
        held[busiest] += load[b] - load[a]
        held[other] += load[a] - load[b]
        owners[a], owners[b] = other, busiest
    contiguous = contiguous_owners(experts, world, 0)
    if rank_imbalance(contiguous, load, world) <= rank_imbalance(owners, load, world):
        return contiguous
    return owners


def rank_imbalance(owners: Sequence[int], load: Sequence[float], world: int) -> float:
    """Returns the busiest rank's load over the mean rank's (1.0: even; nan without load)."""
    per = [0.0] * world
    for e, r in enumerate(owners):
        per[r] += load[e]
    total = sum(per)
    return max(per) * world / total if total > 0 else float("nan")


def usage_map(counts: Mapping[int, Sequence[float]], experts_of: Mapping[int, int], world: int,
              where: str) -> dict[int, list[int]]:
    """Returns {layer: owners} balancing `counts` (read_usage's) for a model whose MoE layers hold
    `experts_of` {layer: E}; raises MoekitError when the counts were taken on another model."""
    if set(counts) != set(experts_of):
        raise MoekitError(f"--expert-usage {where}: counts for layer(s) {sorted(counts)}, the model's MoE layers are "
                          f"{sorted(experts_of)}; count this model's use (moekit usage MODEL --json)")
    wrong = [layer for layer, c in counts.items() if len(c) != experts_of[layer]]
    if wrong:
        layer = wrong[0]
        raise MoekitError(f"--expert-usage {where}: layer {layer} has {len(counts[layer])} counts, the model "
                          f"{experts_of[layer]} experts; count this model's use (moekit usage MODEL --json)")
    return {layer: balanced_owners(counts[layer], world) for layer in sorted(counts)}


def placement_report(expert_map: Mapping[int, Sequence[int]], counts: Mapping[int, Sequence[float]],
                     world: int) -> dict:
    """Returns the placement's mean and worst per-layer rank imbalance under the counts, next to
    the contiguous split's (what the balance bought, as the counts predict it)."""
    from .expert import contiguous_owners

    balanced = [rank_imbalance(expert_map[layer], counts[layer], world) for layer in sorted(expert_map)]
    contiguous = [rank_imbalance(contiguous_owners(len(counts[layer]), world, layer), counts[layer], world)
                  for layer in sorted(expert_map)]
    return {"balanced_mean": sum(balanced) / len(balanced), "balanced_worst": max(balanced),
            "contiguous_mean": sum(contiguous) / len(contiguous), "contiguous_worst": max(contiguous)}
