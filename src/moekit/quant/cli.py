"""`moekit compress` and `moekit eval`: the compression pillar's commands."""

from __future__ import annotations

import argparse
import json

from ..errors import MoekitError


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _device(name: str | None) -> str:
    import torch

    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def cmd_compress(args: argparse.Namespace) -> int:
    from ..calibrate import calibration_tokens
    from ..data import load_text
    from ..load import default_model_path
    from ..tokenizer import load_tokenizer
    from .compress import compress, report_rows
    from .config import QuantConfig

    src = args.model if args.model is not None else default_model_path()
    quant = QuantConfig(bits=args.bits, group_size=args.group_size, method=args.method, damp=args.damp,
                        max_tokens_per_expert=args.max_tokens_per_expert, expert_batch=args.expert_batch)
    tokens = None
    if args.method == "gptq":
        if args.calib is None:
            raise MoekitError("GPTQ needs calibration text: give --calib PATH (a text file, a JSONL file or "
                              "a folder; never the held-out text you evaluate on), or use --method rtn")
        tokens = calibration_tokens(load_text(args.calib), load_tokenizer(src), args.samples, args.seqlen, args.seed)
    report = compress(src, args.out, quant, tokens, device=_device(args.device), overwrite=args.overwrite)
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        print(_table(report_rows(report)))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ..eval import evaluate

    r = evaluate(args.model, args.data, seqlen=args.seqlen, device=_device(args.device), dtype=args.dtype,
                 max_tokens=args.max_tokens)
    if args.json:
        print(json.dumps(r.to_dict()))
        return 0
    q = r.quantization
    form = "dense" if q is None else f"{q.get('method')} {q.get('bits')}{'' if q.get('bits') == 'ternary' else '-bit'}"
    print(_table([("model", f"{r.model} ({form})"), ("data", r.data), ("perplexity", f"{r.perplexity:.3f}"),
                  ("tokens scored", f"{r.tokens_scored:,}"), ("seqlen", str(r.seqlen)), ("time", f"{r.seconds:.1f} s")]))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Adds the compress and eval commands to the moekit parser."""
    c = sub.add_parser("compress", help="quantize a model's experts (QMoE: GPTQ, ternary sub-1-bit code, 2/3/4-bit)")
    c.add_argument("model", nargs="?", help="HF model directory (default: the bundled tiny MoE)")
    c.add_argument("--out", required=True, help="output directory (written atomically; must not exist)")
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
    c.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    c.add_argument("--json", action="store_true", help="print the report as one JSON object")
    c.set_defaults(func=cmd_compress)

    e = sub.add_parser("eval", help="perplexity of a model (dense or compressed) on held-out text")
    e.add_argument("model", nargs="?", help="HF model directory (default: the bundled tiny MoE)")
    e.add_argument("--data", required=True, help="evaluation text: a file, a .jsonl file or a folder")
    e.add_argument("--seqlen", type=int, default=512, help="tokens per scored window")
    e.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens")
    e.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    e.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(func=cmd_eval)
