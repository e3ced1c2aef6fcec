"""What each rank runs in tests/parallel (imported by the spawned processes: moekit only, no
transformers, so a rank starts quickly)."""

from __future__ import annotations

import os

import torch
from ranks import RankError


def log_checkpoint_reads() -> list:
    """Returns the list this rank's checkpoint reads are appended to from now on (the worker
    process's Checkpoint is patched for good): (tensor name, first row, one past the last; None:
    the whole tensor)."""
    from moekit.checkpoint import Checkpoint

    reads: list = []
    read, read_rows = Checkpoint.read, Checkpoint.read_rows

    def logged_read(self, name, *args, **kwargs):
        reads.append((name, None, None))
        return read(self, name, *args, **kwargs)

    def logged_read_rows(self, name, start, stop):
        reads.append((name, start, stop))
        return read_rows(self, name, start, stop)

    Checkpoint.read, Checkpoint.read_rows = logged_read, logged_read_rows
    return reads


def generate_cases(comm, cases: list[dict]) -> dict:
    """Returns {case name: {"tokens", "logits", "held", "local", "report", "reads"} or RankError} for each case
    {"name", "path" (one, or one per rank), "expert_map" (one, or one per rank), "load" (load_model's keywords), "ids" [B, T],
    "new_tokens", "seed" (also samples with it)}."""
    from moekit.parallel import load_expert_parallel

    reads = log_checkpoint_reads()
    out: dict = {}
    for case in cases:
        path = case["path"][comm.rank] if isinstance(case["path"], list) else case["path"]
        reads.clear()
        try:
            expert_map = case.get("expert_map")
            if isinstance(expert_map, list):  # one map per rank
                expert_map = expert_map[comm.rank]
            model = load_expert_parallel(path, comm, expert_map, **case.get("load", {}))
            ids = case["ids"]
            with torch.no_grad():
                logits = model(ids)
            tokens = model.generate(ids, max_new_tokens=case["new_tokens"], temperature=0, eos_token_ids=())
            sampled = (model.generate(ids, max_new_tokens=case["new_tokens"], temperature=0.9, seed=case["seed"],
                                      eos_token_ids=()) if "seed" in case else None)
            runtime = model.expert_runtime
            local = {m.layer: m.local for m in model.modules() if hasattr(m, "local") and hasattr(m, "layer")}
            out[case["name"]] = {"tokens": tokens, "logits": logits, "held": dict(runtime.owned),
                                 "local": local, "report": runtime.report(), "reads": list(reads),
                                 "sampled": sampled}
        except Exception as e:  # noqa: BLE001 - every rank's message goes back to the test
            out[case["name"]] = RankError(f"{type(e).__name__}: {e}")
    return out


def die_or_load(comm, path: str) -> str:
    """Rank 1 exits at once; rank 0 loads the model (its first collective must fail, not hang)."""
    from moekit.parallel import load_expert_parallel

    if comm.rank == 1:
        os._exit(3)
    load_expert_parallel(path, comm)
    return "loaded"


def sleep_or_load(comm, path: str, sleep_s: float) -> str:
    """Rank 1 stays alive but joins no collective for sleep_s; rank 0 loads the model (its first
    collective must time out with a message)."""
    import time

    from moekit.parallel import load_expert_parallel

    if comm.rank == 1:
        time.sleep(sleep_s)
        return "slept"
    load_expert_parallel(path, comm)
    return "loaded"


def grid_cases(comm, cases: list[dict]) -> dict:
    """Returns {case name: {"tokens", "logits", "report", "heads", "kv_heads", "expert_ffn", "local", "held",
    "reads", "ragged"} or RankError}
    for each case {"name", "path", "ep", "tp", "over" (ep_over_tp: heads and experts over the same ranks), "ids"
    [B, T], "new_tokens", "ragged" (also generate for two prompts of different lengths: the paged path)}: the
    model split over an ep x tp grid of the ranks (parallel.tensor), groups made once per grid shape."""
    from moekit.parallel.tensor import ParallelGroups, load_parallel

    reads = log_checkpoint_reads()
    grids: dict = {}
    out: dict = {}
    for case in cases:
        reads.clear()
        try:
            shape = (case["ep"], case["tp"], case.get("over", False))
            if shape not in grids:
                grids[shape] = ParallelGroups.create(comm, *shape)
            model = load_parallel(case["path"], grids[shape], **case.get("load", {}))
            from moekit.generate import GenerationStats

            ids = case["ids"].to(model.device)
            with torch.no_grad():
                logits = model(ids)
            stats = GenerationStats()
            tokens = model.generate(ids, max_new_tokens=case["new_tokens"], temperature=0, eos_token_ids=(),
                                    stats=stats)
            ragged = (model.generate([ids[0, :2], ids[1]], max_new_tokens=case["new_tokens"], temperature=0,
                                     eos_token_ids=()) if case.get("ragged") else None)  # a paged KV cache
            experts = [m for m in model.modules() if hasattr(m, "form") and hasattr(m, "layer")]
            if ragged is not None:
                ragged = [t.cpu() for t in ragged]
            tokens, logits = tokens.cpu(), logits.cpu()  # NCCL ranks (GPU tests) hand back CPU tensors
            out[case["name"]] = {"tokens": tokens, "logits": logits, "report": model.expert_runtime.report(),
                                 "graph": stats.extra.get("graph", "whole" if stats.cuda_graph else "eager"),
                                 "heads": model.config.num_heads, "kv_heads": model.config.num_kv_heads,
                                 "expert_ffn": experts[0].form.ffn if experts else None,
                                 "local": {m.layer: m.local for m in experts if hasattr(m, "local")},
                                 "held": dict(model.expert_runtime.owned), "reads": list(reads), "ragged": ragged}
        except Exception as e:  # noqa: BLE001 - every rank's message goes back to the test
            out[case["name"]] = RankError(f"{type(e).__name__}: {e}")
    return out


def tp_sleep_or_step(comm, path: str, sleep_s: float, ep: int = 1, tp: int = 2) -> str:
    """Every rank loads the model on an ep x tp grid; then the last rank stays alive but runs no
    forward for sleep_s, and the others run one (the last rank's tp row must time out in its first
    all_reduce, with a message)."""
    import time

    from moekit.parallel.tensor import ParallelGroups, load_parallel

    model = load_parallel(path, ParallelGroups.create(comm, ep, tp))
    if comm.rank == comm.world - 1:
        time.sleep(sleep_s)
        return "slept"
    with torch.no_grad():
        model(torch.tensor([[3, 4, 5]]))
    return "stepped"


def cut_steps(comm, cases: list[dict]) -> dict:
    """Returns {case name: [(cut step logits == whole step logits) per step], or RankError} for
    each case {"name", "path", "ep", "tp", "over", "ids" [B, T], "steps"}: decode steps of the parallel
    model cut at its expert calls (moekit.piecewise, as CUDA graphs capture an expert-parallel step;
    here without graphs) against whole steps, each with its own KV cache."""
    from moekit.kv_cache import KVCache
    from moekit.parallel.tensor import ParallelGroups, load_parallel
    from moekit.piecewise import PiecewiseDecode

    out: dict = {}
    grids: dict = {}
    for case in cases:
        try:
            shape = (case["ep"], case["tp"], case.get("over", False))
            if shape not in grids:
                grids[shape] = ParallelGroups.create(comm, *shape)
            model = load_parallel(case["path"], grids[shape])
            ids = case["ids"]
            caches = [KVCache(model.config, ids.shape[0], 16, model.device, model.dtype) for _ in range(2)]
            with torch.no_grad():
                token = model(ids, cache=caches[0], start=0, last_only=True)[:, -1].argmax(-1)[:, None]
                model(ids, cache=caches[1], start=0, last_only=True)
                step = PiecewiseDecode(model, caches[1], token, ids.shape[1], graphs=False)
                same = []
                for position in range(ids.shape[1], ids.shape[1] + case["steps"]):
                    expected = model(token, cache=caches[0], start=torch.tensor(position))
                    same.append(torch.equal(step(token, position), expected))
                    token = expected[:, -1].argmax(-1)[:, None]
            out[case["name"]] = same
        except Exception as e:  # noqa: BLE001 - every rank's message goes back to the test
            out[case["name"]] = RankError(f"{type(e).__name__}: {e}")
    return out



def offloaded_cases(comm, cases: list[dict]) -> dict:
    """Returns {case name: {"tokens", "report"} or RankError} of greedy generation for each case {"name",
    "path", "budget_bytes", "expert_map", "ids", "new_tokens"}, this rank's expert shard offloaded under
    the budget (parallel.offload)."""
    from moekit.offload.config import OffloadConfig
    from moekit.parallel.offload import load_offloaded_parallel

    out: dict = {}
    for case in cases:
        try:
            model = load_offloaded_parallel(case["path"], comm, OffloadConfig(device_memory=case["budget_bytes"]),
                                            case.get("expert_map"))
            tokens = model.generate(case["ids"], max_new_tokens=case["new_tokens"], temperature=0, eos_token_ids=())
            out[case["name"]] = {"tokens": tokens, "report": model.expert_runtime.report()}
        except Exception as e:  # noqa: BLE001 - every rank's message goes back to the test
            out[case["name"]] = RankError(f"{type(e).__name__}: {e}")
    return out
