"""Probe: the host cost of one CGOPipe task -- what the launch thread spends per (layer,
micro-batch) of a decode step, by part, in microseconds and in torch (aten) ops (issue 14).

    PYTHONPATH=src nice python3 benchmarks/probe_launch_task.py                       # CPU, ~30 s
    PYTHONPATH=src nice python3 benchmarks/probe_launch_task.py --stand-in-graphs     # CPU, the graph path
    PYTHONPATH=src python3 benchmarks/probe_launch_task.py --device cuda --dtype bfloat16 --out $OUT   # GPU

(from the repository root). A toy Mixtral (--shape tiny: hidden 64, ffn 128, 8 experts top-2,
8/2 heads; or bench_pipeline's shapes) with `--layers` layers, experts paged (`--resident` of 8 on the
device), `--sequences` sequences in micro-batches of `--micro-batch`, `--gen` tokens; the first
decode step (its prologue loads a layer whole) is left out.

Three runs of the same decode: a plain one (the engine's own split of the launch thread: blocked,
PreAttn + D2H, LoadH, pages, PostAttn; StepProfile), one with wrappers (a little time of their
own) that split the issuing finer, and one that counts the aten ops of each part on the launch
thread (a TorchDispatchMode is per thread: the attention worker's ops are not counted; its
times are not used, every op then goes through Python). Parts (exclusive: a part's time leaves out the parts it calls):

    pre_attn    norm, qkv, rope (DecoderLayer.pre_attn)
    packet_out  the q|k|v packet and its D2H (PipelinedDecoder._launch less pre_attn, Streams.to_host)
    attn_in     the attention output's H2D and the compute stream's wait (Streams.to_device, wait)
    post_attn   o-proj, residual add, norm; the MoE output's residual add; the head (last layer)
    router      MoEBlock.route
    experts     the expert call and its page bookkeeping (PagedRuntime.run)
    pages       weight pages issued (PagedRuntime.load_page)
    loop        the rest of the step loop (per-step setup spread over its tasks, trace, clocks)

On a GPU the parts run as CUDA graphs (moekit.pipeline.graphs) unless MOEKIT_PIPELINE_GRAPHS=0:
pre_attn and post_attn are then the replays with their copies in and out (and the paged
bookkeeping around PostAttn), what the launch thread still issues. On a CPU run the ops' compute is on the host too: the op counts carry over to a GPU, the
microseconds are an upper bound of the host's share. Sync-class ops (those that make a CUDA
launch thread wait for the device: _local_scalar_dense (.item(), bool(), int()), nonzero,
unique, bincount, masked_select, repeat_interleave without output_size) are listed with where
they were called.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
import traceback
from collections import Counter, defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

# the toy Mixtral cut down until the host's compute is small next to its per-op cost (hidden 64)
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 8, "num_key_value_heads": 2,
        "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 1000}
SYNC_OPS = ("_local_scalar_dense", "nonzero", "unique", "bincount", "masked_select", "repeat_interleave")


class Parts(TorchDispatchMode):
    """Counts aten ops by the innermost open part, and times parts exclusively."""

    def __init__(self):
        super().__init__()
        self.stack: list[list] = []  # [name, start, child seconds]
        self.seconds: dict[str, float] = defaultdict(float)
        self.ops: dict[str, int] = defaultdict(int)
        self.kernels: dict[str, int] = defaultdict(int)  # ops that are not views
        self.syncs: Counter = Counter()
        self.on = False
        self.muted = 0  # inside a part whose ops are not counted (a stand-in graph's replay)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.on and not self.muted:
            part = self.stack[-1][0] if self.stack else "outside"
            self.ops[part] += 1
            if not func.is_view:
                self.kernels[part] += 1
            name = func.__name__.split(".")[0]
            if name in SYNC_OPS and not (name == "repeat_interleave" and (kwargs or {}).get("output_size")):
                where = [f"{Path(f.filename).name}:{f.lineno}" for f in traceback.extract_stack()[-8:-2]
                         if "moekit" in f.filename]
                self.syncs[(name, " <- ".join(reversed(where[-3:])))] += 1
        return func(*args, **(kwargs or {}))

    def wrap(self, owner, attr: str, part: str, count: bool = True) -> None:
        original = getattr(owner, attr)

        def wrapped(*a, **k):
            if not self.on or self.muted:  # inside a muted part its time and ops are that part's
                return original(*a, **k)
            frame = [part, time.perf_counter(), 0.0]
            self.stack.append(frame)
            self.muted += not count
            try:
                return original(*a, **k)
            finally:
                self.muted -= not count
                self.stack.pop()
                spent = time.perf_counter() - frame[1]
                self.seconds[part] += spent - frame[2]
                if self.stack:
                    self.stack[-1][2] += spent

        static = isinstance(inspect.getattr_static(owner, attr), staticmethod)
        setattr(owner, attr, staticmethod(wrapped) if static else wrapped)


def instrument(parts: Parts) -> None:
    from moekit.model import DecoderLayer, MoEBlock, MoEModel
    from moekit.pipeline import cgopipe
    from moekit.pipeline.paged import PagedRuntime

    parts.wrap(cgopipe.PipelinedDecoder, "step", "loop")
    parts.wrap(cgopipe.PipelinedDecoder, "_launch", "packet_out")
    parts.wrap(DecoderLayer, "pre_attn", "pre_attn")
    parts.wrap(cgopipe.Streams, "to_host", "packet_out")
    parts.wrap(cgopipe.Streams, "to_device", "attn_in")
    parts.wrap(cgopipe.Streams, "wait", "attn_in")
    parts.wrap(DecoderLayer, "post_attn", "post_attn")
    parts.wrap(MoEModel, "head", "post_attn")
    parts.wrap(MoEBlock, "route", "router")
    parts.wrap(PagedRuntime, "run", "experts")
    parts.wrap(PagedRuntime, "load_page", "pages")
    try:  # with CUDA graphs (on a GPU unless MOEKIT_PIPELINE_GRAPHS=0) a part's replay and its copies in and out
        from moekit.pipeline import graphs
    except ImportError:  # an engine before them (an A/B run against an older tree)
        return
    parts.wrap(graphs.TaskGraphs, "pre", "pre_attn")
    parts.wrap(graphs.TaskGraphs, "post", "post_attn")
    parts.wrap(graphs.StandInGraph, "replay", "replay", count=False)


def decode(model, prompts, gen: int, micro_batch: int, parts: Parts | None, graphs: bool | None = None):
    """Runs generate_pipelined; returns (StepProfile summary, tasks counted, tokens)."""
    from moekit.pipeline.cgopipe import generate_pipelined
    from moekit.pipeline.timeline import StepProfile

    profile = StepProfile(cuda=model.device.type == "cuda")

    def on_step(done: int) -> None:
        if parts is not None:
            parts.on = done >= 2  # the first decode step (the prologue's whole layer) left out

    tokens = generate_pipelined(model, prompts, gen, micro_batch, profile=profile, on_step=on_step,
                                **({} if graphs is None else {"graphs": graphs}))
    if parts is not None:
        parts.on = False
    n_mb = -(-len(prompts) // micro_batch)
    tasks = (gen - 2) * model.config.num_layers * n_mb
    return profile.summary(), tasks, [t.tolist() for t in tokens]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="float32 on a CPU: its GEMMs are faster than bf16's")
    p.add_argument("--shape", default="tiny", help="tiny (this file's) or bench_pipeline's small / mixtral-8x7b")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--resident", type=int, default=4, help="experts of 8 per layer kept on the device")
    p.add_argument("--sequences", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--gen", type=int, default=10)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--threads", type=int, default=1,
                   help="torch's threads (and the attention kernel's): 1 keeps OpenMP's spinning threads off the launch thread's core")
    p.add_argument("--stand-in-graphs", action="store_true",
                   help="CPU: the tasks through the CUDA-graph path with a stand-in graph (StandInGraph): what the "
                        "launch thread issues around the replays")
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/probe_launch_task"))
    args = p.parse_args()
    import bench_pipeline

    from moekit.pipeline.batch import load_paged, synthetic_prompts

    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    bench_pipeline.SHAPES.setdefault("tiny", TINY)
    folder, cfg, host, _ = bench_pipeline.build(args.shape, args.layers, device, root / "model")
    model = load_paged(folder, args.resident, args.device, args.dtype, host)
    prompts = synthetic_prompts(args.sequences, args.prompt_len, cfg.vocab_size)
    graphs = None
    if args.stand_in_graphs:
        from moekit.pipeline.graphs import stand_in_graphs

        stand_in_graphs(model)
        graphs = True
    decode(model, prompts, 3, args.micro_batch, None, graphs)  # warm-up (kernels, buffers; graphs captured)
    plain, tasks, want = decode(model, prompts, args.gen, args.micro_batch, None, graphs)
    parts = Parts()
    instrument(parts)
    _, _, got = decode(model, prompts, args.gen, args.micro_batch, parts, graphs)  # times: the wrappers alone
    seconds, parts.seconds = parts.seconds, defaultdict(float)
    with parts:  # op counts: every op through Python (slow; its times are not used)
        decode(model, prompts, args.gen, args.micro_batch, parts, graphs)
    parts.seconds = seconds
    steps = plain["steps"]
    per_task_us = lambda ms: None if ms is None else 1e3 * ms * steps / tasks
    result = {
        "args": vars(args), "tasks": tasks, "steps": steps, "graphs": os.environ.get("MOEKIT_PIPELINE_GRAPHS"),
        "stand_in_graphs": args.stand_in_graphs, "graph_report": plain.get("graphs"),
        "tokens_equal_between_runs": got == want,
        "plain_us_per_task": {"issuing": per_task_us(plain["launch_issuing_ms"]),
                              "blocked": per_task_us(plain["launch_blocked_ms"]),
                              **{part: per_task_us(plain[f"issue_{part}_ms"]) for part in ("pre", "loadh", "pages", "post")}},
        "parts_us_per_task": {k: 1e6 * v / tasks for k, v in sorted(parts.seconds.items())},
        "aten_ops_per_task": {k: v / tasks for k, v in sorted(parts.ops.items())},
        "non_view_ops_per_task": {k: v / tasks for k, v in sorted(parts.kernels.items())},
        "sync_class_ops": [{"op": op, "where": where, "per_task": n / tasks} for (op, where), n in parts.syncs.items()],
    }
    (root / "probe_launch_task.json").write_text(json.dumps(result, indent=1))
    print(f"{tasks} tasks over {steps} steps ({args.layers} layers x {-(-args.sequences // args.micro_batch)} "
          f"micro-batches of {args.micro_batch}), {args.device} {args.dtype}")
    print("engine split, us/task:", {k: round(v, 1) for k, v in result["plain_us_per_task"].items() if v is not None})
    print("| part | us/task | aten ops/task | non-view ops/task |")
    print("|---|---|---|---|")
    for part in sorted(set(parts.seconds) | set(parts.ops)):
        print(f"| {part} | {result['parts_us_per_task'].get(part, 0):.1f} | {result['aten_ops_per_task'].get(part, 0):.1f}"
              f" | {result['non_view_ops_per_task'].get(part, 0):.1f} |")
    print(f"| total | {sum(result['parts_us_per_task'].values()):.1f} | {sum(result['aten_ops_per_task'].values()):.1f}"
          f" | {sum(result['non_view_ops_per_task'].values()):.1f} |")
    for s in result["sync_class_ops"]:
        print(f"sync-class: {s['op']} x{s['per_task']:.2f}/task at {s['where']}")
    print(f"tokens equal between the two runs: {result['tokens_equal_between_runs']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
