"""`moekit serve`: load a model (resident or offloaded, dense or compressed) and serve it over an
OpenAI-compatible HTTP API until interrupted."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from ..cli_common import (
    add_model_args,
    add_threads_arg,
    check_min,
    model_context,
    model_dir,
)
from ..errors import MoekitError


def register(sub: argparse._SubParsersAction) -> None:
    """Adds `moekit serve` to the command parser."""
    from ..offload.cli import add_generate_flags

    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API (continuous batching)")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model id clients send (default: the model folder's name)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: fp32 on CPU, bf16 on GPU)")
    p.add_argument("--max-seqs", type=int, default=32, help="sequences decoded together at most (default: 32)")
    p.add_argument("--max-step-tokens", type=int, default=256,
                   help="tokens per forward step, decode and prefill chunks together (default: 256)")
    p.add_argument("--kv-tokens", type=int, default=None,
                   help="positions of the paged KV cache (default: max-seqs x the context, at most 65536)")
    p.add_argument("--prefill-interval", type=int, default=1, metavar="N",
                   help="while sequences decode, admit and prefill prompts only every Nth step; the others stay "
                        "decode-only (CUDA graphs): more throughput, later first tokens (default: 1, every step)")
    p.add_argument("--static-mixed", action=argparse.BooleanOptionalAction, default=None,
                   help="run steps that carry prompt chunks at static shapes too (token buckets, CUDA graphs) "
                        "instead of eagerly; needs resident experts and grouped-query attention (default: on "
                        "where it runs, a CUDA device with such a model)")
    p.add_argument("--max-prefill-tokens", type=int, default=None, metavar="N",
                   help="prompt tokens per step while sequences decode: a lower cap shortens the steps that "
                        "stall every decoding sequence, in more of them (default: --max-step-tokens)")
    p.add_argument("--max-waiting", type=int, default=1024,
                   help="queued requests before new ones get 429 (default: 1024)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    add_threads_arg(p)
    add_generate_flags(p)
    p.set_defaults(func=cmd_serve, compile=False)


def check_serve(args: argparse.Namespace) -> tuple[Path, str]:
    """Returns (model folder, device) after checking every flag, before any loading."""
    from ..checkpoint import parse_device, parse_dtype
    from ..offload import cli as offload_cli

    if not 0 < args.port < 65536:
        raise MoekitError(f"--port must be in 1..65535, got {args.port}")
    for flag, value in (("--max-seqs", args.max_seqs), ("--max-step-tokens", args.max_step_tokens),
                        ("--max-waiting", args.max_waiting), ("--kv-tokens", args.kv_tokens),
                        ("--prefill-interval", args.prefill_interval),
                        ("--max-prefill-tokens", args.max_prefill_tokens)):
        check_min(flag, value, 1)
    device = args.device or ("cuda" if _cuda() else "cpu")
    parse_device(device)
    parse_dtype(args.dtype)
    offload_cli.check_flags(args)
    return model_dir(args.model, "MODEL"), device


def cmd_serve(args: argparse.Namespace) -> int:
    """Loads the model, starts the engine and runs uvicorn until interrupted."""
    import uvicorn

    from ..load import load_model
    from ..offload import cli as offload_cli
    from ..tokenizer import load_tokenizer
    from .app import build_app
    from .engine import Engine
    from .scheduler import SchedulerConfig

    path, device = check_serve(args)
    config = SchedulerConfig(max_seqs=args.max_seqs, max_step_tokens=args.max_step_tokens,
                             max_waiting=args.max_waiting, kv_tokens=args.kv_tokens,
                             prefill_interval=args.prefill_interval, static_mixed=args.static_mixed,
                             max_prefill_tokens=args.max_prefill_tokens)
    tokenizer = load_tokenizer(path)
    if args.offload:
        args.model = str(path)
        model = offload_cli.load_for_generate(args, device, model_context(path))
    else:
        model = load_model(path, device=device, dtype=args.dtype)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    # on a GPU with resident experts, pay every compile and capture before the first request
    from ..paged_decode import static_decode_supported

    warm = model.device.type == "cuda" and static_decode_supported(model)
    t0 = time.perf_counter()
    engine = Engine(model, config, warm=warm)
    if warm:
        print(f"moekit: warmed {len(engine.warmed['step_tokens'])} step sizes, decode buckets "
              f"{engine.warmed['buckets']}, mixed buckets {engine.warmed['mixed_buckets']} in "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    name = args.served_model_name or path.resolve().name
    app = build_app(engine, tokenizer, name)
    cache = engine.scheduler.cache
    print(f"moekit: serving {name} ({device}, {str(model.dtype).replace('torch.', '')}, "
          f"{cache.num_blocks} KV blocks of {cache.block_size}) on http://{args.host}:{args.port}/v1",
          file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    finally:
        engine.close()
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
