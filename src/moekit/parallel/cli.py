"""`moekit generate --parallel ep=N,tp=M`: the flag, its checks, and the per-rank setup under torchrun.

    torchrun --nproc-per-node 2 -m moekit generate "def fib(n):" --parallel ep=2
    torchrun --nproc-per-node 4 -m moekit generate "def fib(n):" --parallel ep=2,tp=2
    torchrun --nproc-per-node 2 -m moekit generate "def fib(n):" --parallel tp=2,ep=tp
    torchrun --nproc-per-node 2 -m moekit generate "def fib(n):" --parallel ep=2 --offload --device-memory 12GB

N x M ranks form a grid (parallel.tensor): each row of M ranks splits the attention heads and
dense MLPs, each column of N ranks splits the routed experts; `ep=tp` has the same M ranks split the
heads and, by expert id, the routed experts. Every rank runs the same tokens;
rank 0 prints, the others stay quiet (their errors still reach stderr).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import MoekitError
from .comm import DEFAULT_TIMEOUT_S, ExpertComm


@dataclass(frozen=True)
class ParallelSpec:
    """What --parallel asks for: an ep x tp grid of ranks; collectives wait `timeout_s` at most."""

    ep: int = 1  # ranks the routed experts are split over (a column of the grid)
    tp: int = 1  # ranks the attention heads and MLP widths are split over (a row of the grid)
    timeout_s: float = DEFAULT_TIMEOUT_S  # a collective waits this long before the rank gives up
    ep_over_tp: bool = False  # ep=tp: the tp ranks also split the routed experts by id (ep = tp ranks in all)

    def __post_init__(self) -> None:
        for name in ("ep", "tp"):
            if getattr(self, name) < 1:
                raise MoekitError(f"--parallel {name} must be >= 1, got {getattr(self, name)}")
        if self.ep_over_tp and self.ep != self.tp:
            raise MoekitError(f"--parallel ep=tp puts the experts on the tp ranks: ep must equal tp, got ep={self.ep}, "
                              f"tp={self.tp}")
        if self.timeout_s <= 0:
            raise MoekitError(f"--parallel timeout must be > 0 seconds, got {self.timeout_s:g}")

    @property
    def world(self) -> int:
        """The processes the grid needs (torchrun's --nproc-per-node on one host)."""
        return self.tp if self.ep_over_tp else self.ep * self.tp

    @staticmethod
    def parse(text: str) -> ParallelSpec:
        """Returns the spec of a --parallel value like "ep=2", "tp=2", "ep=2,tp=2,timeout=60", "tp=2,ep=tp"."""
        fields: dict[str, str] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            if not sep or key not in ("ep", "tp", "timeout"):
                raise MoekitError(f"--parallel {text}: give ep=N (expert-parallel ranks) and/or tp=M (tensor-"
                                  "parallel ranks), optionally timeout=SECONDS, e.g. --parallel ep=2,tp=2")
            fields[key] = value
        if "ep" not in fields and "tp" not in fields:
            raise MoekitError(f"--parallel {text}: ep=N or tp=M is missing, e.g. --parallel ep=2")
        over = fields.get("ep") == "tp"
        if over and "tp" not in fields:
            raise MoekitError(f"--parallel {text}: ep=tp needs tp=M too, e.g. --parallel tp=2,ep=tp")
        try:
            tp = int(fields.get("tp", 1))
            return ParallelSpec(tp if over else int(fields.get("ep", 1)), tp,
                                float(fields.get("timeout", DEFAULT_TIMEOUT_S)), ep_over_tp=over)
        except ValueError:
            raise MoekitError(f"--parallel {text}: ep and tp must be integers and timeout a number of "
                              "seconds (or ep=tp)") from None


def add_generate_flags(p: argparse.ArgumentParser) -> None:
    """Adds --parallel and --expert-usage to `moekit generate`."""
    p.add_argument("--parallel", default=None, metavar="ep=N,tp=M",
                   help="run over N x M processes started by torchrun (rank 0 prints): ep=N splits the routed "
                        "experts over N ranks, tp=M the attention heads and MLP widths over M (vLLM's tensor "
                        "parallel); torchrun --nproc-per-node N*M -m moekit generate ... --parallel ep=N,tp=M; "
                        "tp=M,ep=tp: the same M ranks split the heads and (by id) the experts; with --offload "
                        "(ep=N only) each rank offloads its own shard of the experts under --device-memory; "
                        f"timeout=S: seconds a rank waits for the others (default {DEFAULT_TIMEOUT_S:g})")
    add_expert_usage_flag(p)


def add_expert_usage_flag(p: argparse.ArgumentParser) -> None:
    """Adds --expert-usage (with --parallel: experts placed over the ranks by counted use)."""
    p.add_argument("--expert-usage", default=None, metavar="FILE",
                   help="with --parallel ep=N: place each layer's experts over the expert-parallel ranks so that "
                        "their routed load evens out, from the counts of `moekit usage MODEL --json > FILE` (each "
                        "rank keeps the same number of experts; count on other text and run again to recompute; "
                        "default: contiguous runs of expert ids)")


def check_expert_usage(args: argparse.Namespace, spec: ParallelSpec | None) -> None:
    """Raises MoekitError in one line for --expert-usage without expert-parallel ranks or with a
    file that is not a usage report (read before any rank loads)."""
    from .placement import read_usage

    given = getattr(args, "expert_usage", None)
    if given is None:
        return
    if spec is None:
        raise MoekitError("--expert-usage places experts over expert-parallel ranks: give --parallel ep=N too")
    if spec.ep < 2 and not spec.ep_over_tp:
        raise MoekitError(f"--expert-usage places experts over expert-parallel ranks, --parallel {args.parallel} "
                          "has none: give ep=N (or tp=M,ep=tp)")
    read_usage(given)


def check_flags(args: argparse.Namespace) -> ParallelSpec | None:
    """Returns the --parallel spec (None without the flag) after checking it against the other flags."""
    if args.parallel is None:
        check_expert_usage(args, None)
        return None
    spec = ParallelSpec.parse(args.parallel)
    check_expert_usage(args, spec)
    if getattr(args, "offload", None):  # offloaded ranks (parallel.offload): each its own shard, its own budget
        if spec.tp > 1 or spec.ep < 2:
            raise MoekitError("--parallel with --offload runs expert parallelism only (each rank offloads its own "
                              "shard of the experts): give --parallel ep=N without tp")
        given = [flag for flag, on in (("--pregate", args.pregate), ("--pin-counts", args.pin_counts),
                                       ("--strict-pregate", args.strict_pregate),
                                       ("--misses", args.misses not in (None, "fetch", "auto"))) if on]
        if given:
            raise MoekitError(f"{', '.join(given)} is not available with --parallel (a rank knows only its shard "
                              "of the experts): drop it")
    if getattr(args, "compile", False):
        raise MoekitError("--compile is not available with --parallel (collectives run between the captured "
                          "pieces); drop --compile")
    return spec


def stats_rows(report: dict) -> list[tuple[str, str]]:
    """Returns the (name, value) rows --stats adds for a parallel run (rank 0's view)."""
    from ..cli_common import fmt_bytes

    slots = report["slots_local"] + report["slots_remote"]
    remote = report["slots_remote"] / slots if slots else 0.0
    ep, tp = report.get("ep", report["ranks"]), report.get("tp", 1)
    grid = f"tp={tp}, experts by id over the same ranks" if report.get("ep_over_tp") else f"ep={ep} x tp={tp}"
    rows = [("ranks", (f"{report['ranks']} ({grid}); rank {report['rank']} holds "
                       f"{report['experts_held']} experts"))]
    if tp > 1:
        split = "each expert's ffn split too" if report.get("experts_split_by_tp") else "experts replicated"
        rows.append(("tensor parallel", f"attention heads and MLP widths split over {tp} ranks, {split}"))
    if "offload" in report:
        off = report["offload"]
        rows.append(("offloaded ranks", (f"rank {report['rank']}: {off.get('cache_slots', 0)} cache slots for its "
                                         f"{report['experts_held']} experts, hit rate {off.get('hit_rate', 0):.1%}")))
    if "expert_usage" in report:
        u = report["expert_usage"]
        rows.append(("expert placement", (f"balanced by {u['file']}: busiest rank {u['balanced_mean']:.2f}x the mean "
                                          f"(worst layer {u['balanced_worst']:.2f}x), contiguous ids "
                                          f"{u['contiguous_mean']:.2f}x ({u['contiguous_worst']:.2f}x), as counted")))
    if ep > 1:
        rows += [
            ("routed slots", f"{slots} dispatched by rank {report['rank']}, {remote:.1%} to other ranks"),
            ("bytes exchanged", (f"{fmt_bytes(report['bytes_sent'])} sent by rank {report['rank']} "
                                f"({report['layer_calls']} layer calls)")),
        ]
    return rows


class RankSetup:
    """This process's rank: its comm, groups and device, and the model loader of its slices."""

    def __init__(self, spec: ParallelSpec, device: str):
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:  # one GPU per rank on a host
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(dev)
        self.comm = ExpertComm.from_env(dev, spec.timeout_s)
        if self.comm.world != spec.world:
            self.close()
            shape = f"tp={spec.tp},ep=tp needs" if spec.ep_over_tp else f"ep={spec.ep},tp={spec.tp} needs ep x tp ="
            raise MoekitError(f"--parallel {shape} {spec.world} processes, but "
                              f"torchrun started {self.comm.world}: give torchrun --nproc-per-node {spec.world}")
        from .tensor import ParallelGroups

        self.groups = ParallelGroups.create(self.comm, spec.ep, spec.tp, spec.ep_over_tp)
        self.rank, self.device = self.comm.rank, dev
        self.placement: dict | None = None  # --expert-usage's predicted balance (load)
        if self.rank != 0:  # rank 0 prints; the others' stdout goes nowhere
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - held for the life of the process

    def seed(self, seed: int | None) -> int:
        """Returns rank 0's sampling seed on every rank (a random one when none is given): the
        ranks must sample the same tokens, since each runs the whole sequence."""
        return self.comm.broadcast_int(random.randrange(2**62) if seed is None else seed, "sharing the seed")

    def load(self, path: str, dtype: str | None, args: argparse.Namespace | None = None,
             context_tokens: int | None = None, expert_usage: str | None = None):
        """Returns the model with this rank's heads, MLP slices and experts; with `args.offload`,
        this rank's experts offloaded under --device-memory (its own budget), planned for
        `context_tokens` positions; with `expert_usage` (a `moekit usage --json` file) the experts
        placed over the expert-parallel ranks by their counted load (parallel.placement), the
        placement's predicted balance kept in `self.placement`."""
        expert_map = self._usage_map(path, expert_usage) if expert_usage else None
        if args is not None and getattr(args, "offload", False):
            from ..offload.config import OffloadConfig, parse_size
            from .offload import load_offloaded_parallel

            config = OffloadConfig(device_memory=parse_size(args.device_memory) if args.device_memory else None,
                                   cache_policy=args.cache_policy, context_tokens=context_tokens, predictor="none")
            return load_offloaded_parallel(path, self.comm, config, expert_map=expert_map, dtype=dtype)
        from .tensor import load_parallel

        return load_parallel(path, self.groups, expert_map=expert_map, dtype=dtype)

    def _usage_map(self, path: str, usage: str) -> dict[int, list[int]]:
        """Returns {layer: owners} balancing the usage file's counts over this grid's expert-parallel
        ranks; a rank that cannot make it (its file missing or foreign) stops every rank with one
        line, rather than leaving them to wait out the next collective."""
        from ..load import read_config
        from .placement import placement_report, read_usage, usage_map

        failed, expert_map = "", {}
        try:
            cfg = read_config(Path(path))[2]
            experts_of = {layer: cfg.experts_in(layer) for layer in range(cfg.num_layers) if cfg.experts_in(layer)}
            counts = read_usage(usage)
            world = self.groups.ep.world
            expert_map = usage_map(counts, experts_of, world, usage)
            self.placement = {"file": str(usage), **placement_report(expert_map, counts, world)}
        except MoekitError as e:
            failed = str(e)
        flags = self.comm.all_gather(torch.tensor([int(bool(failed))], dtype=torch.uint8, device=self.device),
                                     "placing the experts by --expert-usage")
        bad = [r for r, t in enumerate(flags) if int(t[0])]
        if bad:
            raise MoekitError(failed or f"rank(s) {', '.join(map(str, bad))} could not place the experts by "
                                        f"--expert-usage {usage}; give every rank the same, readable file")
        return expert_map

    def close(self) -> None:
        self.comm.close()
