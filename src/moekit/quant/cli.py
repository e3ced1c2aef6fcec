"""`moekit compress` and `moekit eval`: the compression pillar's commands."""

from __future__ import annotations

import argparse
import json

from ..cli_common import (add_model_args, add_overwrite_arg, add_threads_arg, check_min, data_path, model_context,
                          model_dir, refuse_compressed, table)
from ..errors import MoekitError


def _device(name: str | None) -> str:
    import torch

    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def check_compress(args: argparse.Namespace):
    """Returns (model folder, QuantConfig, device) after checking every flag and path, before any
    loading or calibration."""
    from ..checkpoint import parse_device
    from ..outputs import check_output
    from .config import QuantConfig

    quant = QuantConfig(bits=args.bits, group_size=args.group_size, method=args.method, damp=args.damp,
                        max_tokens_per_expert=args.max_tokens_per_expert, expert_batch=args.expert_batch)
    if args.method == "gptq":
        if args.calib is None:
            raise MoekitError("GPTQ needs calibration text: give --calib PATH (a text file, a JSONL file or "
                              "a folder; never the held-out text you evaluate on), or use --method rtn")
        check_min("--samples", args.samples, 1)
        check_min("--seqlen", args.seqlen, 2)
    device = _device(args.device)
    parse_device(device)
    src = model_dir(args.model)
    refuse_compressed(src, "compress")
    if args.method == "gptq" and args.seqlen > model_context(src):
        raise MoekitError(f"--seqlen {args.seqlen} exceeds the model's context ({model_context(src)} positions)")
    calib = data_path(args.calib, "--calib")
    check_output(args.out, [src, calib], args.overwrite)
    return src, quant, device


def cmd_compress(args: argparse.Namespace) -> int:
    from ..calibrate import calibration_tokens
    from ..data import load_text
    from ..progress import heartbeat
    from ..tokenizer import load_tokenizer
    from .compress import compress, report_rows

    src, quant, device = check_compress(args)
    tokens = None
    if args.method == "gptq":
        tokens = calibration_tokens(load_text(args.calib), load_tokenizer(src), args.samples, args.seqlen, args.seed)
    with heartbeat(f"compressing {src} ({quant.method}, {quant.bits} bits)"):
        report = compress(src, args.out, quant, tokens, device=device, overwrite=args.overwrite)
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        print(table(report_rows(report)))
    return 0


def check_eval(args: argparse.Namespace):
    """Returns (model folder, device, seqlen) after checking every flag and path, before loading."""
    from ..checkpoint import parse_device, parse_dtype

    device = _device(args.device)
    parse_device(device)
    parse_dtype(args.dtype)
    path = model_dir(args.model)
    context = model_context(path)
    if args.seqlen is not None and not 1 <= args.seqlen <= context:
        raise MoekitError(f"--seqlen {args.seqlen} must be in 1..{context} (the model's context); "
                          f"give --seqlen {context} or less")
    if args.max_tokens is not None and args.max_tokens < 2:
        raise MoekitError(f"--max-tokens must be >= 2 (one token is predicted from the one before), "
                          f"got {args.max_tokens}")
    data_path(args.data, "--data")
    return path, device, args.seqlen if args.seqlen is not None else min(512, context)


def cmd_eval(args: argparse.Namespace) -> int:
    from ..eval import evaluate

    path, device, seqlen = check_eval(args)
    r = evaluate(path, args.data, seqlen=seqlen, device=device, dtype=args.dtype,
                 max_tokens=args.max_tokens, progress=True, dense=args.quantize_dense or "bf16")
    if args.json:
        print(json.dumps(r.to_dict()))
        return 0
    q = r.quantization
    form = "dense" if q is None or "method" not in q else (
        f"{q.get('method')} {q.get('bits')}{'' if q.get('bits') == 'ternary' else '-bit'}")
    if q is not None and q.get("dense"):
        form += f", {q['dense']} projections"
    print(table([("model", f"{r.model} ({form})"), ("data", r.data), ("perplexity", f"{r.perplexity:.3f}"),
                 ("tokens scored", f"{r.tokens_scored:,}"), ("seqlen", str(r.seqlen)), ("time", f"{r.seconds:.1f} s")]))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Adds the compress and eval commands to the moekit parser."""
    c = sub.add_parser("compress", help="quantize a model's experts (QMoE: GPTQ, ternary sub-1-bit code, 2/3/4-bit)")
    add_model_args(c)
    c.add_argument("--out", required=True, help="output directory (written atomically; must not exist, or be empty)")
    c.add_argument("--method", choices=("gptq", "rtn"), default="gptq", help="gptq, or rtn (round to nearest)")
    c.add_argument("--bits", choices=("ternary", "2", "3", "4"), default="ternary",
                   help="ternary (stored in the sub-1-bit code) or 2/3/4-bit int")
    c.add_argument("--group-size", type=int, default=None, help="columns per scale group (int grids; default per row)")
    c.add_argument("--calib", help="calibration text: a file, a .jsonl file or a folder (GPTQ)")
    c.add_argument("--samples", type=int, default=128, help="calibration windows")
    c.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window")
    c.add_argument("--seed", type=int, default=0, help="seed of the calibration windows")
    c.add_argument("--damp", type=float, default=0.01, help="GPTQ damping, relative to the mean Hessian diagonal")
    c.add_argument("--max-tokens-per-expert", type=int, default=4096, help="cap on calibration tokens per expert")
    c.add_argument("--expert-batch", type=int, default=16, help="experts quantized together (batched Cholesky)")
    c.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    add_overwrite_arg(c)
    add_threads_arg(c)
    c.add_argument("--json", action="store_true", help="print the report as one JSON object")
    c.set_defaults(func=cmd_compress)

    e = sub.add_parser("eval", help="perplexity of a model (dense or compressed) on held-out text")
    add_model_args(e)
    e.add_argument("--data", required=True, help="evaluation text: a file, a .jsonl file or a folder")
    e.add_argument("--seqlen", type=int, default=None,
                   help="tokens per scored window (default: 512, or the model's context when shorter)")
    e.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens")
    add_threads_arg(e)
    e.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    e.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16")
    e.add_argument("--quantize-dense", choices=("bf16", "int8"), default=None,
                   help="score with the projections as --quantize-dense int8 holds them on a GPU (here on any "
                        "device: what int8 rows cost in perplexity)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(func=cmd_eval)
