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
from ..errors import MoekitError


def register(sub: argparse._SubParsersAction) -> None:
    """Adds the batch command to moekit's CLI."""
    p = sub.add_parser("batch", help="generate for a JSONL file of prompts with the batch engine (resumable)")
    add_model_args(p)
    p.add_argument("--input", required=True, metavar="FILE",
                   help='prompts, one JSON object a line: {"id": ..., "prompt": "..."} ("text" also read; '
                        "id defaults to the line number)")
    p.add_argument("--output", required=True, metavar="FILE",
                   help="JSONL results, appended a line per finished prompt; ids already in it are skipped")
    p.add_argument("--device-memory", default=None, metavar="SIZE",
                   help="GPU memory the plan may hold, e.g. 16GiB (default: the machine's)")
    p.add_argument("--host-memory", default=None, metavar="SIZE",
                   help="host memory the plan may hold (default: 80%% of the machine's)")
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="tokens generated per prompt (default 128)")
    p.add_argument("--policy", default="auto", metavar="auto|FILE|JSON",
                   help="auto: the HRM's plan (moekit plan); else a JSON object (or a .json file) of Policy "
                        "fields: batch, micro_batch, resident_share[, attention=cpu]")
    p.add_argument("--machine", default=None, metavar="FILE|PRESET",
                   help="the machine the HRM plans and predicts for (as moekit plan; default: this one's profile)")
    p.add_argument("--reprofile", action="store_true", help="measure this machine again (else the cached profile)")
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


def read_requests(path: Path) -> list[Request]:
    """Returns the prompts of a JSONL file (blank lines skipped); raises MoekitError naming the
    first bad line (not JSON, not an object, no "prompt"/"text" string, a repeated id)."""
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
            requests.append(Request(rid, prompt, n))
    if not requests:
        raise MoekitError(f"--input {path}: no prompts in it")
    return requests


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
    unknown, missing = set(obj) - names, {"batch", "micro_batch", "resident_share"} - set(obj)
    if unknown or missing:
        raise MoekitError(f"{source}: " + "; ".join(
            ([f"unknown fields {', '.join(sorted(unknown))}"] if unknown else [])
            + ([f"missing {', '.join(sorted(missing))}"] if missing else []))
            + f" (a policy has {', '.join(sorted(names))})")
    for name in ("batch", "micro_batch"):
        if not isinstance(obj[name], int) or isinstance(obj[name], bool):
            raise MoekitError(f"{source}: {name} must be an integer, got {obj[name]!r}")
    if not isinstance(obj["resident_share"], (int, float)) or isinstance(obj["resident_share"], bool):
        raise MoekitError(f"{source}: resident_share must be a number in [0, 1], got {obj['resident_share']!r}")
    policy = Policy(**obj)  # raises on bad ranges
    if policy.attention != "cpu":
        raise MoekitError(f"{source}: attention '{policy.attention}' is not supported by the batch engine (CGOPipe "
                          "runs decode attention on the CPU); use attention 'cpu', or moekit generate")
    return policy


def plan_batch(args: argparse.Namespace, path: Path, prompt_tokens: list[int]):
    """Returns (Policy, Plan or None): --policy's (with the HRM's prediction when --machine is
    given) or the HRM's best with CPU attention for these prompts under the memory budgets."""
    from .cli import check_plan_flags, read_model, resolve_machine
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
    plan = search(costs, machine, workload, device_budget, host_budget, attention=("cpu",))
    return plan.policy, plan


# ---- the command -------------------------------------------------------------------------------

def cmd_batch(args: argparse.Namespace) -> int:
    from ..checkpoint import parse_device, parse_dtype
    from ..load import read_config
    from ..tokenizer import load_tokenizer
    from .batch import load_paged, resident_experts

    if args.max_new_tokens <= 0:
        raise MoekitError(f"--max-new-tokens must be > 0, got {args.max_new_tokens}")
    path = model_dir(args.model)
    device = args.device or ("cuda" if _cuda() else "cpu")
    parse_device(device)
    parse_dtype(args.dtype)
    inp, out = Path(args.input), Path(args.output)
    if out.exists() and inp.exists() and out.resolve() == inp.resolve():
        raise MoekitError(f"--output {out} is the --input; write the results to another file")
    requests = read_requests(inp)
    done, cut_to = read_done(out)
    pending = [r for r in requests if _key(r.id) not in done]
    if not pending:
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
    policy, plan = plan_batch(args, path, [len(t) for t in ids])
    resident = resident_experts(path, SimpleNamespace(policy=policy))  # it reads the plan's policy only
    model = load_paged(path, resident, device, args.dtype)
    writer = ResultWriter(out, cut_to)
    start = time.perf_counter()
    try:
        tokens_total = run_chunks(model, tokenizer, pending, ids, policy, args.max_new_tokens, writer)
    finally:
        writer.close()
    seconds = time.perf_counter() - start
    predicted = f"{plan.tok_s:.1f} tok/s predicted by the HRM" if plan is not None else \
        "no HRM prediction (give --machine)"
    print(f"moekit: batch: {len(pending)} prompts ({len(requests) - len(pending)} done before), {tokens_total} tokens "
          f"in {seconds:.1f} s = {tokens_total / seconds:.1f} tok/s ({predicted}); N = {policy.batch}, micro-batch "
          f"{policy.micro_batch}, {resident} experts per layer resident, {device}; results in {out}", file=sys.stderr)
    return 0


def run_chunks(model, tokenizer, pending: list[Request], ids: list[list[int]], policy, max_new_tokens: int,
               writer: ResultWriter) -> int:
    """Returns the tokens generated for `pending` (token ids `ids`), run in chunks of the policy's N
    through generate_pipelined (its micro-batch), each chunk's records written when it ends; the
    progress counts tokens decode step by decode step."""
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

            outs = generate_pipelined(model, chunk_ids, max_new_tokens, min(policy.micro_batch, len(chunk)),
                                      on_step=on_step)
            for r, prompt_ids, new in zip(chunk, chunk_ids, outs):
                new = new.tolist()  # the engine runs all max_new_tokens; the completion ends at the first eos
                stop = next((k for k, t in enumerate(new) if t in eos), None)
                kept = new if stop is None else new[:stop]
                writer.write({"id": r.id, "prompt": r.prompt, "completion": tokenizer.decode(kept),
                              "tokens": kept, "prompt_tokens": len(prompt_ids), "new_tokens": len(kept),
                              "finish": "length" if stop is None else "eos"})
            tokens_total += len(chunk) * max_new_tokens
    return tokens_total


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
