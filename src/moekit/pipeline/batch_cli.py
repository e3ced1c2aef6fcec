"""`moekit batch MODEL --input prompts.jsonl --output out.jsonl`: many prompts through the batch
engine (the HRM's policy, paged experts, CGOPipe's schedule), one JSON line per finished prompt.

The output is appended and fsynced a line at a time, so a crash leaves whole lines only (and at
most one torn last line, which the next run cuts away); a rerun skips the ids already written.
Every check (input lines, output lines, flags, policy) runs before anything is written."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from types import SimpleNamespace

from ..cli_common import add_model_args, add_threads_arg, model_dir
from ..parallel.cli import add_expert_usage_flag
from ..errors import MoekitError


def register(sub: argparse._SubParsersAction) -> None:
    """Adds the batch command to moekit's CLI."""
    p = sub.add_parser("batch", help="generate for a JSONL file of prompts with the batch engine (resumable)")
    add_model_args(p)
    p.add_argument("--input", required=True, metavar="FILE",
                   help='prompts, one JSON object a line: {"id": ..., "prompt": "..."} ("text" also read; '
                        'id defaults to the line number); optional per line: "max_tokens" (at most '
                        '--max-new-tokens: the completion is cut there, finish "length") and "stop" (a string or '
                        'a list: the completion is cut before the earliest one, finish "stop"). Sampling is one for '
                        "the whole batch (the flags below): a line's temperature, top_p, top_k or seed is refused")
    p.add_argument("--output", required=True, metavar="FILE",
                   help="JSONL results, appended a line per finished prompt; ids already in it are skipped")
    p.add_argument("--device-memory", default=None, metavar="SIZE",
                   help="GPU memory the plan may hold, e.g. 16GiB (default: the machine's)")
    p.add_argument("--host-memory", default=None, metavar="SIZE",
                   help="host memory the plan may hold (default: the memory available now less max(4 GiB, 5%%); "
                        "with --machine, 80%% of that machine's)")
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="N",
                   help="tokens generated per prompt (default 128); a line's max_tokens only cuts its completion")
    p.add_argument("--temperature", type=float, default=None, metavar="T",
                   help="0 = greedy; one sampler for the whole batch, not per line (default: the model's "
                        "generation_config.json, else greedy)")
    p.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="keep the k likeliest tokens, 0 = off (default: the model's)")
    p.add_argument("--top-p", type=float, default=None, metavar="P",
                   help="nucleus mass in (0, 1], 1 = off (default: the model's)")
    p.add_argument("--seed", type=int, default=None, metavar="N",
                   help="seed of the batch's sampler; chunk k (of the policy's N prompts) draws from seed + k (with "
                        "--parallel the i-th pending prompt from seed + i), so a resumed run draws differently "
                        "(default: torch's default generator)")
    p.add_argument("--policy", default="auto", metavar="auto|FILE|JSON",
                   help="auto: the HRM's plan (moekit plan); else a JSON object (or a .json file) of Policy "
                        "fields: batch, micro_batch, resident_share (r_w of every layer) or resident_experts "
                        "(R in all, spread over the layers)[, attention=cpu]")
    p.add_argument("--machine", default=None, metavar="FILE|PRESET",
                   help="the machine the HRM plans and predicts for (as moekit plan; default: this one's profile)")
    p.add_argument("--reprofile", action="store_true", help="measure this machine again (else the cached profile)")
    p.add_argument("--parallel", default=None, metavar="ep=N,tp=M",
                   help="run over N x M processes started by torchrun (torchrun --nproc-per-node N*M -m moekit batch "
                        "... --parallel ep=N,tp=M[,ep=tp][,timeout=S]): each rank holds its shard of the experts (ep) "
                        "and of the heads and MLP widths (tp), the prompts go through moekit generate's ragged engine "
                        "a chunk of --parallel-chunk at a time, rank 0 writes the output. The pipeline (paged experts, "
                        "CPU attention, --policy) runs in one process only")
    p.add_argument("--parallel-chunk", type=int, default=32, metavar="N",
                   help="prompts a ragged batch holds with --parallel (default 32)")
    add_expert_usage_flag(p)
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: fp32 on CPU, bf16 on GPU)")
    add_threads_arg(p)
    p.set_defaults(func=cmd_batch)


# ---- input and output files ----------------------------------------------------------------------

@dataclass(frozen=True)
class Request:
    """One prompt of the input file."""

    id: object  # as given (a JSON string or number), else the 1-based line number
    prompt: str
    line: int  # 1-based line of the input file
    max_tokens: int | None = None  # the completion's most tokens (None: --max-new-tokens)
    stop: tuple[str, ...] = ()  # the completion text ends before the earliest of these


SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "seed")  # one sampler a batch: refused per line


def read_requests(path: Path, max_new_tokens: int) -> list[Request]:
    """Returns the prompts of a JSONL file (blank lines skipped); raises MoekitError naming the
    first bad line (not JSON, not an object, no "prompt"/"text" string, a repeated id, a
    "max_tokens" that is not an integer in [1, max_new_tokens], a "stop" that is not a string or a
    list of strings, a per-line sampling field)."""
    if not path.is_file():
        raise MoekitError(f"--input {path}: no such file; give a JSONL file of {{\"id\", \"prompt\"}} objects")
    requests, seen = [], {}
    with open(path, encoding="utf-8") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except ValueError as e:
                raise MoekitError(f"--input {path} line {n}: not JSON ({e.msg}); write one JSON object a line")
            if not isinstance(obj, dict):
                raise MoekitError(f"--input {path} line {n}: a JSON {type(obj).__name__}, not an object; "
                                  'write {"id": ..., "prompt": "..."}')
            prompt = obj.get("prompt", obj.get("text"))
            if not isinstance(prompt, str) or not prompt:
                raise MoekitError(f'--input {path} line {n}: no "prompt" (or "text") string; '
                                  'write {"id": ..., "prompt": "..."}')
            rid = obj.get("id", n)
            if not isinstance(rid, (str, int)) or isinstance(rid, bool):
                raise MoekitError(f"--input {path} line {n}: id {rid!r} is not a string or an integer")
            if _key(rid) in seen:
                raise MoekitError(f"--input {path} line {n}: id {rid!r} repeats line {seen[_key(rid)]}; "
                                  "give every prompt its own id")
            seen[_key(rid)] = n
            requests.append(Request(rid, prompt, n, *_limits(obj, f"--input {path} line {n}", max_new_tokens)))
    if not requests:
        raise MoekitError(f"--input {path}: no prompts in it")
    return requests


def _limits(obj: dict, where: str, max_new_tokens: int) -> tuple[int | None, tuple[str, ...]]:
    """Returns a line's (max_tokens or None, stop strings), checked; `where` names the line."""
    given = [k for k in SAMPLING_FIELDS if k in obj]
    if given:
        raise MoekitError(f'{where}: per-line "{given[0]}" is not supported (one sampler for the whole batch); '
                          f"drop it and give --{given[0].replace('_', '-')}")
    cap = obj.get("max_tokens")
    if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 1):
        raise MoekitError(f'{where}: "max_tokens" must be a positive integer, got {cap!r}')
    if cap is not None and cap > max_new_tokens:
        raise MoekitError(f'{where}: "max_tokens" {cap} is over --max-new-tokens {max_new_tokens} (the engine '
                          "generates --max-new-tokens for every prompt); raise --max-new-tokens")
    stop = obj.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or not all(isinstance(x, str) for x in stops):
        raise MoekitError(f'{where}: "stop" must be a string or a list of strings, got {stop!r}')
    return cap, tuple(x for x in stops if x)  # "" stops nothing (as the server takes it)


def finish(new: list[int], request: Request, eos: set[int], tokenizer) -> tuple[list[int], str, str]:
    """Returns (kept tokens, completion text, finish reason) of a prompt's generated tokens: cut at
    the first eos ("eos"), else at the line's max_tokens or the engine's end ("length"); then the
    text before the earliest stop string ("stop"), its tokens up to the one that completes it."""
    end = next((k for k, t in enumerate(new) if t in eos), None)
    reason = "eos"
    if end is None:
        end, reason = len(new), "length"
    if request.max_tokens is not None and request.max_tokens <= end:  # an eos just past it is never reached
        end, reason = request.max_tokens, "length"
    kept = new[:end]
    text = tokenizer.decode(kept)
    hits = [at for at in (text.find(s) for s in request.stop) if at >= 0]
    if not hits:
        return kept, text, reason
    # the fewest tokens whose text holds a stop string (searched only on a hit: a decode per token)
    k = next((k for k in range(1, len(kept) + 1) if any(s in tokenizer.decode(kept[:k]) for s in request.stop)),
             len(kept))
    return kept[:k], text[:min(hits)], "stop"


def _key(rid: object) -> str:
    return json.dumps(rid)  # 1 and "1" are different ids


def read_done(path: Path) -> tuple[set[str], int | None]:
    """Returns (the id keys already in the output, the byte length to cut it to when its last line
    is torn, else None); raises MoekitError when a whole line is not a batch record (not our file)."""
    if not path.exists():
        return set(), None
    if not path.is_file():
        raise MoekitError(f"--output {path}: exists and is not a file; choose another --output")
    data = path.read_bytes()
    whole = data.rfind(b"\n") + 1  # bytes of whole lines; what follows was cut off mid-write
    done = set()
    for n, raw in enumerate(data[:whole].splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except ValueError:
            obj = None
        if not isinstance(obj, dict) or "id" not in obj or "completion" not in obj:
            raise MoekitError(f"--output {path} line {n}: not a moekit batch record; choose another --output "
                              "(moekit batch appends only to its own results)")
        done.add(_key(obj["id"]))
    return done, (whole if whole < len(data) else None)


class ResultWriter:
    """Appends one JSON line per record, flushed and fsynced before the next: a crash loses at most
    the line being written, never a line already reported."""

    def __init__(self, path: Path, cut_to: int | None):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "ab")
        if cut_to is not None:  # a torn last line from a crashed run
            self.file.truncate(cut_to)
            os.fsync(self.file.fileno())

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


# ---- the policy --------------------------------------------------------------------------------

def read_policy(text: str):
    """Returns the Policy of --policy (a JSON object or a .json file of Policy fields), checked."""
    from .hrm import Policy

    source = "--policy"
    if not text.lstrip().startswith("{"):
        path = Path(text)
        if not path.is_file():
            raise MoekitError(f"--policy {text}: not 'auto', a JSON object or a .json file; give one of those")
        source, text = f"--policy {path}", path.read_text(encoding="utf-8")
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise MoekitError(f"{source}: not JSON ({e.msg})")
    if isinstance(obj, dict) and isinstance(obj.get("policy"), dict):
        obj = obj["policy"]  # a `moekit plan --json` plan's policy
    if isinstance(obj, dict) and isinstance(obj.get("plan"), dict) and isinstance(obj["plan"].get("policy"), dict):
        obj = obj["plan"]["policy"]  # `moekit plan --json` output as a whole
    names = {f.name for f in fields(Policy)}
    if not isinstance(obj, dict):
        raise MoekitError(f"{source}: give a JSON object of {', '.join(sorted(names))}")
    unknown, missing = set(obj) - names, {"batch", "micro_batch"} - set(obj)
    if obj.get("resident_share") is None and obj.get("resident_experts") is None:
        missing.add("resident_share or resident_experts")
    if unknown or missing:
        raise MoekitError(f"{source}: " + "; ".join(
            ([f"unknown fields {', '.join(sorted(unknown))}"] if unknown else [])
            + ([f"missing {', '.join(sorted(missing))}"] if missing else []))
            + f" (a policy has {', '.join(sorted(names))})")
    for name in ("batch", "micro_batch"):
        if not isinstance(obj[name], int) or isinstance(obj[name], bool):
            raise MoekitError(f"{source}: {name} must be an integer, got {obj[name]!r}")
    share = obj.get("resident_share", 0.0)
    if not isinstance(share, (int, float)) or isinstance(share, bool):
        raise MoekitError(f"{source}: resident_share must be a number in [0, 1], got {share!r}")
    if obj.get("resident_experts") is not None and (not isinstance(obj["resident_experts"], int)
                                                     or isinstance(obj["resident_experts"], bool)):
        raise MoekitError(f"{source}: resident_experts must be a whole count, got {obj['resident_experts']!r}")
    policy = Policy(**obj)  # raises on bad ranges
    if policy.attention != "cpu":
        raise MoekitError(f"{source}: attention '{policy.attention}' is not supported by the batch engine (CGOPipe "
                          "runs decode attention on the CPU); use attention 'cpu', or moekit generate")
    return policy


def plan_batch(args: argparse.Namespace, path: Path, prompt_tokens: list[int]):
    """Returns (Policy, Plan or None): --policy's (with the HRM's prediction when --machine is
    given) or the HRM's best with CPU attention for these prompts under the memory budgets."""
    from .cli import check_plan_flags, default_host_budget, read_model, resolve_machine
    from .hrm import Workload, evaluate, model_costs, search

    args.prompt_len = max(1, round(sum(prompt_tokens) / len(prompt_tokens)))
    args.gen_len, args.num_prompts, args.expert_bits = args.max_new_tokens, len(prompt_tokens), None
    device_budget, host_budget = check_plan_flags(args)
    workload = Workload(args.prompt_len, args.gen_len, args.num_prompts)
    given = read_policy(args.policy) if args.policy != "auto" else None
    if given is not None and args.machine is None:
        return given, None  # no machine to predict for: profiling this one is not worth a batch's wait
    cfg, expert_bytes, act_bytes, form = read_model(path)
    costs = model_costs(cfg, expert_bytes, act_bytes, form=form)
    machine = resolve_machine(args)
    if given is not None:
        return given, evaluate(costs, machine, given, workload) if not machine.missing() else None
    plan = search(costs, machine, workload, device_budget, default_host_budget(args, host_budget), attention=("cpu",))
    return plan.policy, plan


# ---- the command -------------------------------------------------------------------------------

def cmd_batch(args: argparse.Namespace) -> int:
    from ..checkpoint import parse_device, parse_dtype
    from ..generate import sampling_defaults
    from ..load import read_config
    from ..tokenizer import load_tokenizer
    from .batch import load_paged, resident_experts

    if args.max_new_tokens <= 0:
        raise MoekitError(f"--max-new-tokens must be > 0, got {args.max_new_tokens}")
    if args.temperature is not None and args.temperature < 0:
        raise MoekitError(f"--temperature must be >= 0 (0: greedy), got {args.temperature}")
    if args.top_k is not None and args.top_k < 0:
        raise MoekitError(f"--top-k must be >= 0 (0 switches it off), got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise MoekitError(f"--top-p must be in (0, 1], got {args.top_p}")
    from ..parallel.cli import check_flags

    spec = check_flags(args)  # --parallel and --expert-usage, checked before any other file is read
    if spec is not None:
        if args.policy != "auto" or args.machine is not None:
            raise MoekitError("--policy and --machine plan the pipeline, which runs in one process: drop them with "
                              "--parallel (its ranks run the ragged engine)")
        if args.parallel_chunk <= 0:
            raise MoekitError(f"--parallel-chunk must be > 0, got {args.parallel_chunk}")
    path = model_dir(args.model)
    device = args.device or ("cuda" if _cuda() else "cpu")
    parse_device(device)
    parse_dtype(args.dtype)
    inp, out = Path(args.input), Path(args.output)
    if out.exists() and inp.exists() and out.resolve() == inp.resolve():
        raise MoekitError(f"--output {out} is the --input; write the results to another file")
    requests = read_requests(inp, args.max_new_tokens)
    done, cut_to = read_done(out)
    pending = [r for r in requests if _key(r.id) not in done]
    if not pending:
        if spec is None or os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 says it
            print(f"moekit: batch: all {len(requests)} prompts of {inp} are in {out} already", file=sys.stderr)
        return 0
    tokenizer = load_tokenizer(path)
    context = read_config(path)[2].max_position_embeddings
    ids = []
    for r in pending:
        ids.append(tokenizer.encode(r.prompt, add_special_tokens=True))
        if not ids[-1] or len(ids[-1]) + args.max_new_tokens > context:
            raise MoekitError(f"--input {inp} line {r.line}: prompt of {len(ids[-1])} tokens + --max-new-tokens "
                              f"{args.max_new_tokens} does not fit the model's context of {context}")
    if spec is not None:
        return run_ranks(args, spec, path, device, tokenizer, requests, pending, ids, out, cut_to)
    policy, plan = plan_batch(args, path, [len(t) for t in ids])
    resident = resident_experts(path, SimpleNamespace(policy=policy))  # it reads the plan's policy only
    model = load_paged(path, resident, device, args.dtype)
    temperature, top_k, top_p, _ = sampling_defaults(model, args.temperature, args.top_k, args.top_p, None)
    sampler = Sampler(temperature, top_k, top_p, args.seed)
    writer = ResultWriter(out, cut_to)
    start = time.perf_counter()
    attention = {"seconds": 0.0, "kv_bytes": 0}
    try:
        tokens_total = run_chunks(model, tokenizer, pending, ids, policy, args.max_new_tokens, writer, sampler,
                                  attention)
    finally:
        writer.close()
    seconds = time.perf_counter() - start
    keep_attention_rate(args, attention, device)
    predicted = f"{plan.tok_s:.1f} tok/s predicted by the HRM" if plan is not None else \
        "no HRM prediction (give --machine)"
    print(f"moekit: batch: {len(pending)} prompts ({len(requests) - len(pending)} done before), {tokens_total} tokens "
          f"in {seconds:.1f} s = {tokens_total / seconds:.1f} tok/s ({predicted}); N = {policy.batch}, micro-batch "
          f"{policy.micro_batch}, {resident_words(resident)}, {device}, {sampler}; results in {out}",
          file=sys.stderr)
    return 0


@dataclass(frozen=True)
class Sampler:
    """The batch's one sampling setting (moekit.generate.sample's), flags over the model's defaults."""

    temperature: float  # 0: greedy
    top_k: int  # 0: off
    top_p: float  # 1: off
    seed: int | None  # chunk k draws from seed + k (None: torch's default generator)

    def __str__(self) -> str:
        if self.temperature <= 0:
            return "greedy"
        return (f"sampled at temperature {self.temperature:g}, top-k {self.top_k}, top-p {self.top_p:g}, "
                f"seed {'unset' if self.seed is None else self.seed}")


def resident_words(resident) -> str:
    """Returns resident experts (one count a layer, or a count per MoE layer) in words."""
    if isinstance(resident, int):
        return f"{resident} experts per layer resident"
    return f"{sum(resident)} experts resident ({min(resident)}-{max(resident)} per MoE layer)"


# KV bytes a run's CPU attention must have read for its rate to be kept: a few short prompts run
# small kernel calls (by kv head, little to stream ahead), whose rate says little of a real batch's
KEEP_ATTENTION_MIN_BYTES = 2**30


def keep_attention_rate(args: argparse.Namespace, attention: dict, device: str) -> None:
    """After a GPU run planned for this machine (no --machine) whose CPU attention read at least
    KEEP_ATTENTION_MIN_BYTES: keeps the rate it read its KV at inside the pipeline in this
    machine's cached profile, where the next plans take it (Machine.pipeline_attention_bandwidth),
    and says so."""
    from .machine import record_pipeline_attention

    if args.machine is not None or device == "cpu" or attention["kv_bytes"] < KEEP_ATTENTION_MIN_BYTES \
            or attention["seconds"] <= 0:
        return
    rate = attention["kv_bytes"] / attention["seconds"]
    where = record_pipeline_attention(rate)
    if where is not None:
        print(f"moekit: batch: CPU attention read the KV cache at {rate / 1e9:.1f} GB/s inside the pipeline; "
              f"kept in {where} for the next plans", file=sys.stderr)


def run_chunks(model, tokenizer, pending: list[Request], ids: list[list[int]], policy, max_new_tokens: int,
               writer: ResultWriter, sampler: Sampler, attention: dict | None = None) -> int:
    """Returns the tokens generated for `pending` (token ids `ids`), run in chunks of the policy's N
    through generate_pipelined (its micro-batch; `sampler` its sampling), each
    chunk's records written when it ends, each completion cut by `finish`; the progress counts
    tokens decode step by decode step. `attention` (seconds, kv_bytes) sums the CPU attention
    kernel's calls."""
    from ..generate import GenerationStats
    from ..progress import Progress
    from .cgopipe import generate_pipelined

    eos = set(model.generation_defaults.get("eos_token_ids", ()))
    tokens_total, start = 0, time.perf_counter()
    with Progress(len(pending) * max_new_tokens, "batch", unit="tok") as bar:
        for at in range(0, len(pending), policy.batch):
            chunk, chunk_ids = pending[at:at + policy.batch], ids[at:at + policy.batch]
            counted = 0

            def on_step(steps: int) -> None:  # steps: tokens so far of each sequence in the chunk
                nonlocal counted
                now = len(chunk) * steps
                rate = (tokens_total + now) / max(time.perf_counter() - start, 1e-9)
                bar.update(now - counted, note=f"{rate:.1f} tok/s, {at} prompts written")
                counted = now

            seed = None if sampler.seed is None else sampler.seed + at // policy.batch
            stats = GenerationStats()
            outs = generate_pipelined(model, chunk_ids, max_new_tokens, min(policy.micro_batch, len(chunk)),
                                      on_step=on_step, temperature=sampler.temperature, top_k=sampler.top_k,
                                      top_p=sampler.top_p, seed=seed, stats=stats)
            if attention is not None and "cpu_attention" in stats.extra:
                attention["seconds"] += stats.extra["cpu_attention"]["seconds"]
                attention["kv_bytes"] += stats.extra["cpu_attention"]["kv_bytes"]
            for r, prompt_ids, new in zip(chunk, chunk_ids, outs):
                # the engine runs all max_new_tokens; the completion ends at eos, max_tokens or a stop string
                kept, text, reason = finish(new.tolist(), r, eos, tokenizer)
                writer.write({"id": r.id, "prompt": r.prompt, "completion": text,
                              "tokens": kept, "prompt_tokens": len(prompt_ids), "new_tokens": len(kept),
                              "finish": reason})
            tokens_total += len(chunk) * max_new_tokens
    return tokens_total


def run_ranks(args: argparse.Namespace, spec, path: Path, device: str, tokenizer, requests: list[Request],
              pending: list[Request], ids: list[list[int]], out: Path, cut_to: int | None) -> int:
    """`moekit batch --parallel` on this torchrun rank: the model's shard (parallel.cli.RankSetup),
    the pending prompts through the ragged engine a chunk at a time, every rank in lockstep (the
    collectives inside each step), rank 0's sampler seed on all; rank 0 writes the records and the
    summary."""
    from ..generate import sampling_defaults
    from ..parallel.cli import RankSetup

    ranks = RankSetup(spec, device)
    writer = None
    try:
        # rank 0 opens the output before anything loads; every rank learns whether it could
        failed = ""
        if ranks.rank == 0:
            try:
                writer = ResultWriter(out, cut_to)
            except OSError as e:
                failed = f"--output {out}: cannot write it ({e.strerror or e})"
        if not ranks.comm.broadcast_int(int(not failed), "opening --output on rank 0"):
            raise MoekitError(failed or f"--output {out}: rank 0 cannot write it (its message says why)")
        seed = ranks.seed(args.seed)  # rank 0's (random when none is given) on all: each rank runs every sequence
        model = ranks.load(str(path), dtype=args.dtype, expert_usage=args.expert_usage)
        temperature, top_k, top_p, _ = sampling_defaults(model, args.temperature, args.top_k, args.top_p, None)
        sampler = Sampler(temperature, top_k, top_p, seed)
        start = time.perf_counter()
        tokens_total = run_ragged_chunks(model, tokenizer, pending, ids, args.parallel_chunk, args.max_new_tokens,
                                         writer, sampler, ranks.comm)
        seconds = time.perf_counter() - start
    finally:
        if writer is not None:
            writer.close()
        ranks.close()
    if ranks.rank == 0:
        print(f"moekit: batch: {len(pending)} prompts ({len(requests) - len(pending)} done before), {tokens_total} "
              f"tokens in {seconds:.1f} s = {tokens_total / seconds:.1f} tok/s over {spec.world} ranks "
              f"(--parallel {args.parallel}, chunks of {args.parallel_chunk}, the ragged engine), {sampler}; "
              f"results in {out}", file=sys.stderr)
    return 0


def run_ragged_chunks(model, tokenizer, pending: list[Request], ids: list[list[int]], chunk_size: int,
                      max_new_tokens: int, writer: ResultWriter | None, sampler: Sampler, comm) -> int:
    """Returns the tokens generated for `pending` through generate_ragged, `chunk_size` prompts at a
    time (the i-th pending prompt sampled from seed + i: prompts alike draw differently), each
    chunk's records written when it ends (`writer`: rank 0's; None on the others), each completion
    cut by `finish`; after each chunk rank 0 tells the ranks (`comm`) whether its writes succeeded,
    so that none runs on (or waits out a collective's timeout) after rank 0 failed."""
    from ..generate import generate_ragged

    eos = set(model.generation_defaults.get("eos_token_ids", ()))
    tokens_total = 0
    for at in range(0, len(pending), chunk_size):
        chunk, chunk_ids = pending[at:at + chunk_size], ids[at:at + chunk_size]
        seeds = None if sampler.seed is None else [sampler.seed + at + i for i in range(len(chunk))]
        outs = generate_ragged(model, chunk_ids, max_new_tokens, temperature=sampler.temperature, top_k=sampler.top_k,
                               top_p=sampler.top_p, seed=seeds, eos_token_ids=(), stop_at_eos=False)
        failed = ""
        if writer is not None:
            try:
                for r, prompt_ids, new in zip(chunk, chunk_ids, outs):
                    kept, text, reason = finish(new.tolist(), r, eos, tokenizer)
                    writer.write({"id": r.id, "prompt": r.prompt, "completion": text, "tokens": kept,
                                  "prompt_tokens": len(prompt_ids), "new_tokens": len(kept), "finish": reason})
            except OSError as e:
                failed = f"--output: writing a record failed ({e.strerror or e}); rerun to finish the rest"
        if not comm.broadcast_int(int(not failed), "rank 0's writes of a chunk"):
            raise MoekitError(failed or "--output: rank 0 could not write a record (its message says why)")
        tokens_total += len(chunk) * max_new_tokens
    return tokens_total


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
