"""`moekit <command>`: the command line. Each command parses flags, calls the library, and
prints a short table (or JSON with --json). User mistakes print one line, never a traceback."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable

from . import __version__
from .cli_common import (add_model_args, add_quantize_dense_arg, add_threads_arg, check_quantize_dense,
                         fmt_bytes as _fmt_bytes, fmt_count as _fmt_count, merge_model_args, model_context, model_dir,
                         table as _table)
from .errors import MoekitError


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ---- generate ------------------------------------------------------------------------------

def _cpu_default_dtype(path: str, device: str) -> str | None:
    """generate's dtype on the CPU when --dtype is not given (and neither --offload nor --parallel):
    a checkpoint stored in bf16 (moekit-compressed ones included: their dense weights) stays in
    bf16 where the native decode step runs it (half fp32's bytes a token in ~8 native calls a layer;
    2-core VM: the bundled model 3,146 tok/s against 233 in float32, the OLMoE-4-layer shape's int4
    copy 49.8 against 18.0), else None (float32)."""
    if not device.startswith("cpu"):
        return None
    from .load import read_config
    from .native.decode import config_unsupported

    cfg = read_config(path)[2]
    return "bfloat16" if cfg.dtype.replace("torch.", "") == "bfloat16" and config_unsupported(cfg) is None else None


def check_generate(args: argparse.Namespace) -> tuple[str, str]:
    """Returns (model folder, device) after checking every generate flag, before any loading."""
    if args.max_new_tokens <= 0:
        raise MoekitError(f"--max-new-tokens must be > 0, got {args.max_new_tokens}")
    if not 0 < args.top_p <= 1:
        raise MoekitError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise MoekitError(f"--top-k must be >= 0 (0 switches it off), got {args.top_k}")
    if args.temperature is not None and args.temperature < 0:
        raise MoekitError(f"--temperature must be >= 0, got {args.temperature}")
    from .checkpoint import parse_device, parse_dtype
    from .offload import cli as offload_cli

    device = args.device or _default_device()
    parse_device(device)
    parse_dtype(args.dtype)
    offload_cli.check_flags(args)
    if args.compile and not device.startswith("cuda"):
        raise MoekitError(f"--compile needs a CUDA device (it compiles the CUDA-graph decode step); "
                          f"drop --compile on {device}")
    if args.compile and args.no_cuda_graph:
        raise MoekitError("--compile needs CUDA graphs (it compiles the captured decode step); drop --no-cuda-graph")
    if getattr(args, "cpu_quantize_dense", None) and not device.startswith("cpu"):
        raise MoekitError(f"--cpu-quantize-dense is for the CPU decode step; drop it on {device}")
    check_quantize_dense(args, device, cpu_step=True)
    path = str(model_dir(args.model, "--model"))
    form = getattr(args, "cpu_quantize_dense", None)
    if form in ("int8", "int4"):  # (--quantize-dense int8 on the CPU too: check_quantize_dense set it so)
        if getattr(args, "parallel", None):
            raise MoekitError(f"--cpu-quantize-dense {form} runs in the one-process CPU decode step, which ranks of "
                              "--parallel do not run; drop one of them")
        from .load import read_config
        from .native.decode import config_unsupported

        reason = config_unsupported(read_config(path)[2])
        if reason is not None:
            raise MoekitError(f"--cpu-quantize-dense {form} runs in the native CPU decode step, which does not take this "
                              f"model ({reason}); drop the flag")
    return path, device


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .offload import cli as offload_cli

    from .generate import GenerationStats, generate
    from .load import load_model
    from .parallel import cli as parallel_cli
    from .tokenizer import StreamDecoder, load_tokenizer

    path, device = check_generate(args)
    if getattr(args, "cpu_quantize_dense", None):  # read by native.dense_q8 when the decode step is built
        os.environ["MOEKIT_CPU_DENSE"] = args.cpu_quantize_dense
    spec = parallel_cli.check_flags(args)
    prompt = args.prompt
    if prompt is None:
        if sys.stdin.isatty():
            raise MoekitError("give a PROMPT (e.g. moekit generate \"def fibonacci(n):\"), or pipe text on stdin")
        prompt = sys.stdin.read()
    tokenizer = load_tokenizer(path)
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}]) if args.chat else prompt
    ids = tokenizer.encode(text, add_special_tokens=not args.chat)
    if not ids:
        raise MoekitError("the prompt encodes to no tokens; give a non-empty PROMPT")
    context = model_context(Path(path))
    if len(ids) + args.max_new_tokens > context:  # before planning: an offload plan would ask for the impossible
        raise MoekitError(f"prompt ({len(ids)} tokens) + --max-new-tokens ({args.max_new_tokens}) = "
                          f"{len(ids) + args.max_new_tokens} exceeds the model's context of {context} positions; "
                          "shorten the prompt or lower --max-new-tokens")
    input_ids = torch.tensor([ids], dtype=torch.long)
    ranks = parallel_cli.RankSetup(spec, device) if spec is not None else None  # under torchrun, one per rank
    if ranks is not None:
        device, args.seed = str(ranks.device), ranks.seed(args.seed)
        model = ranks.load(path, dtype=args.dtype, args=args, context_tokens=len(ids) + args.max_new_tokens,
                           expert_usage=args.expert_usage)
    elif args.offload:  # the budget is planned for this prompt plus the new tokens
        model = offload_cli.load_for_generate(args, device, len(ids) + args.max_new_tokens)
    else:
        dtype = args.dtype or _cpu_default_dtype(path, device)
        model = load_model(path, device=device, dtype=dtype, dense=args.quantize_dense or "bf16")

    stream = StreamDecoder(tokenizer)
    eos = set(model.generation_defaults.get("eos_token_ids", ()))
    echoed = False  # the prompt is echoed with the first token, after generate's own checks

    def on_token(token: torch.Tensor) -> None:
        nonlocal echoed
        if not echoed and not args.json and not args.chat:
            sys.stdout.write(prompt)
            echoed = True
        token_id = int(token[0])
        if token_id in eos:
            return
        piece = stream.push(token_id)
        if not args.json:
            sys.stdout.write(piece)
            sys.stdout.flush()

    stats = GenerationStats()
    out = generate(model, input_ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_p=args.top_p, top_k=args.top_k, seed=args.seed, on_token=on_token,
                   cuda_graph=False if args.no_cuda_graph else None, compile=args.compile, stats=stats)
    new_ids = out[0, : stats.new_tokens].tolist()
    while new_ids and new_ids[-1] in eos:
        new_ids.pop()
    result = {
        "prompt": prompt, "text": tokenizer.decode(new_ids), "token_ids": new_ids,
        "prompt_tokens": stats.prompt_tokens, "new_tokens": len(new_ids),
        "time_to_first_token_s": round(stats.prefill_s, 4),
        "decode_tok_s": round(stats.decode_tok_s, 2),
        "tok_s": round(stats.new_tokens / (stats.prefill_s + stats.decode_s), 2)
        if stats.prefill_s + stats.decode_s > 0 else 0.0,
        "device": device, "dtype": str(model.dtype).replace("torch.", ""),
        "cuda_graph": stats.cuda_graph, "threads": torch.get_num_threads(),
    }
    offload = getattr(model, "offload", None)
    if ranks is not None:
        result["parallel"], offload = model.expert_runtime.report(), None
        if ranks.placement is not None:
            result["parallel"]["expert_usage"] = ranks.placement
        ranks.close()
        if ranks.rank != 0:  # rank 0 prints
            return 0
    if offload is not None:
        result["offload"] = offload.report()
    if args.json:
        print(json.dumps(result))
        return 0
    sys.stdout.write("\n")
    if args.stats:
        rows = generation_rows(result)
        if offload is not None:
            rows += offload_cli.stats_rows(result["offload"], result["new_tokens"])
        if "parallel" in result:
            rows += parallel_cli.stats_rows(result["parallel"])
        print(_table(rows), file=sys.stderr)
    print(f"[{result['new_tokens']} tokens, first token {result['time_to_first_token_s'] * 1000:.0f} ms, "
          f"decode {result['decode_tok_s']:.1f} tok/s, {device} {result['dtype']}]", file=sys.stderr)
    return 0


def generation_rows(result: dict) -> list[tuple[str, str]]:
    """Returns the --stats rows every generation has (offloaded or not)."""
    return [
        ("tokens", f"{result['prompt_tokens']} prompt + {result['new_tokens']} new"),
        ("time to first token", f"{result['time_to_first_token_s'] * 1e3:.1f} ms"),
        ("decode", f"{result['decode_tok_s']:.1f} tok/s ({result['tok_s']:.1f} tok/s with the prompt)"),
        ("device / dtype", f"{result['device']} {result['dtype']}, {result['threads']} CPU threads"
                           + (", CUDA graph" if result["cuda_graph"] else "")),
    ]


# ---- inspect -------------------------------------------------------------------------------

def cmd_inspect(args: argparse.Namespace) -> int:
    from .inspect_model import inspect_checkpoint

    report = inspect_checkpoint(model_dir(args.model))
    if args.json:
        print(json.dumps(report.to_dict()))
        return 0
    r = report
    print(_table([
        ("model", r.path),
        ("family", r.family),
        ("layers", f"{r.layers} ({r.moe_layers} MoE)"),
        ("experts / top-k", f"{r.experts} / {r.top_k}"),
        ("hidden / expert ffn", f"{r.hidden} / {r.expert_ffn}"),
        ("vocab", str(r.vocab)),
        ("params total", f"{_fmt_count(r.params_total)}  ({_fmt_bytes(r.bytes_total)})"),
        ("params in experts", f"{_fmt_count(r.params_experts)}  ({_fmt_bytes(r.bytes_experts)})"),
        ("params elsewhere", f"{_fmt_count(r.params_other)}  ({_fmt_bytes(r.bytes_other)})"),
        ("bits per expert param", f"{r.bits_per_expert_param:.3f}"),
        ("active params / token", _fmt_count(r.params_active_per_token)),
        *r.specifics.items(),
    ]))
    return 0


# ---- parser --------------------------------------------------------------------------------

# Commands of the other pillars live next to their code: each module here has
# `register(sub: argparse._SubParsersAction) -> None`, adding its subparsers with set_defaults(func=...).
COMMAND_MODULES: tuple[str, ...] = (
    "moekit.prune.cli",
    "moekit.offload.cli",
    "moekit.quant.cli",
    "moekit.serve.cli",
    "moekit.pipeline.cli",
    "moekit.pipeline.batch_cli",
)

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moekit", description="Run large Mixture-of-Experts models on small GPUs and CPUs.")
    parser.add_argument("--version", action="version", version=f"moekit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    gen = sub.add_parser("generate", help="generate text from a prompt (streams to stdout)")
    gen.add_argument("prompt", nargs="?", help="prompt text (default: read stdin)")
    gen.add_argument("--model", help="HF model directory (default: the bundled tiny MoE)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=None,
                     help="0 = greedy (default: the model's generation_config.json, else greedy)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    gen.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    gen.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on GPU; on the CPU "
                     "bf16 where the checkpoint is stored so and the native decode step runs the model, else fp32; "
                     "with --offload, the checkpoint's own dtype)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    gen.add_argument("--no-cuda-graph", action="store_true", help="run decode steps eagerly on GPUs")
    gen.add_argument("--cpu-quantize-dense", choices=("bf16", "int8", "int4"), default=None,
                     help="the CPU decode step's attention projections and LM head: int8 per row halves their "
                          "bytes; int4 puts the attention projections in int4 (groups of 128) and keeps the LM "
                          "head int8; that step runs bf16 models without --offload, so int8 / int4 load the model "
                          "in bfloat16 (default: $MOEKIT_CPU_DENSE, else bf16)")
    add_quantize_dense_arg(gen)
    gen.add_argument("--compile", action="store_true",
                     help="torch.compile the decode step before capturing it (GPU; slow first call, faster decode)")
    gen.add_argument("--json", action="store_true", help="print one JSON object: text, token ids, tok/s")
    gen.add_argument("--stats", action="store_true",
                     help="print generation statistics after the text (with --offload, the cache's too)")
    add_threads_arg(gen)
    from .offload.cli import add_generate_flags

    add_generate_flags(gen)
    from .parallel.cli import add_generate_flags as add_parallel_flags

    add_parallel_flags(gen)
    gen.set_defaults(func=cmd_generate)

    ins = sub.add_parser("inspect", help="sizes of a model: parameters, bytes, bits per expert parameter")
    add_model_args(ins)
    ins.add_argument("--json", action="store_true")
    ins.set_defaults(func=cmd_inspect)

    import importlib

    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Returns the process exit code of `moekit` run with argv."""
    from .outputs import Terminated, signals_raise
    from .threads import set_threads

    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    import torch

    threads_before = torch.get_num_threads()
    try:
        with signals_raise():  # SIGTERM/SIGHUP unwind like Ctrl-C: writers delete their partial output
            merge_model_args(args)
            if hasattr(args, "threads"):
                set_threads(args.threads)  # before any work: PyTorch's default oversubscribes busy machines
            return func(args)
    except MoekitError as e:
        print(f"moekit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nmoekit: interrupted", file=sys.stderr)
        return 130
    except Terminated as e:
        print(f"\nmoekit: terminated (signal {e.signum})", file=sys.stderr)
        return 128 + e.signum
    finally:
        torch.set_num_threads(threads_before)  # main() also runs inside other programs (and tests)


if __name__ == "__main__":
    sys.exit(main())
