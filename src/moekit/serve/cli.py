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
    add_quantize_dense_arg,
    add_threads_arg,
    check_min,
    check_quantize_dense,
    model_context,
    model_dir,
)
from ..errors import MoekitError


def register(sub: argparse._SubParsersAction) -> None:
    """Adds `moekit serve` to the command parser."""
    from ..offload.cli import add_generate_flags
    from ..parallel.cli import add_expert_usage_flag

    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API (continuous batching)")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model id clients send (default: the model folder's name)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on GPU; fp32 on the CPU, "
                   "the checkpoint's own dtype with --offload)")
    add_quantize_dense_arg(p)
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
    p.add_argument("--parallel", default=None, metavar="ep=N,tp=M",
                   help="serve over N x M processes started by torchrun: rank 0 answers HTTP, schedules and "
                        "samples, every rank runs each step on its shard (ep=N splits the routed experts, tp=M "
                        "the attention heads and MLP widths, tp=M,ep=tp both over M ranks; timeout=S); steps with "
                        "prompt chunks run eagerly; e.g. torchrun --nproc-per-node 2 -m moekit serve MODEL "
                        "--parallel tp=2")
    add_expert_usage_flag(p)
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
    check_quantize_dense(args, device)
    if args.parallel is not None:
        _check_parallel(args)
    else:
        from ..parallel.cli import check_expert_usage

        check_expert_usage(args, None)  # --expert-usage without ranks: refused in one line
    return model_dir(args.model, "MODEL"), device


def _check_parallel(args: argparse.Namespace) -> None:
    from ..parallel.cli import ParallelSpec, check_expert_usage

    check_expert_usage(args, ParallelSpec.parse(args.parallel))
    if args.offload:
        raise MoekitError("--parallel with --offload is not available in `moekit serve` yet (moekit generate "
                          "--parallel ep=N --offload is): drop one of them")
    if args.static_mixed:
        raise MoekitError("--parallel runs steps with prompt chunks eagerly (rank 0 sends each one to the "
                          "others): drop --static-mixed")


def cmd_serve(args: argparse.Namespace) -> int:
    """Loads the model, starts the engine and runs uvicorn until interrupted."""
    import uvicorn

    from ..load import load_model
    from ..offload import cli as offload_cli
    from ..tokenizer import load_tokenizer
    from .app import build_app
    from .engine import Engine

    path, device = check_serve(args)
    if args.parallel is not None:
        return _serve_ranks(args, path, device)
    config = _scheduler_config(args)
    tokenizer = load_tokenizer(path)
    if args.offload:
        args.model = str(path)
        model = offload_cli.load_for_generate(args, device, model_context(path))
    else:
        model = load_model(path, device=device, dtype=args.dtype, dense=args.quantize_dense or "bf16")
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


def _scheduler_config(args: argparse.Namespace, **overrides):
    from .scheduler import SchedulerConfig

    fields = {"max_seqs": args.max_seqs, "max_step_tokens": args.max_step_tokens, "max_waiting": args.max_waiting,
              "kv_tokens": args.kv_tokens, "prefill_interval": args.prefill_interval,
              "static_mixed": args.static_mixed, "max_prefill_tokens": args.max_prefill_tokens}
    return SchedulerConfig(**{**fields, **overrides})


def _serve_ranks(args: argparse.Namespace, path: Path, device: str) -> int:
    """`moekit serve --parallel` under torchrun: rank 0 serves HTTP with a StepMirror on its
    engine, the other ranks follow its steps (moekit.parallel.serve_ranks); returns 0 once the
    server stopped (a signal to rank 0 is the normal way to stop it) and every rank left."""
    import contextlib
    import threading

    import uvicorn

    from ..outputs import Terminated
    from ..parallel.cli import ParallelSpec, RankSetup
    from ..parallel.serve_ranks import StepMirror, follow
    from ..tokenizer import load_tokenizer
    from .app import build_app
    from .engine import Engine

    ranks = RankSetup(ParallelSpec.parse(args.parallel), device)
    try:
        model = ranks.load(str(path), dtype=args.dtype, expert_usage=args.expert_usage)
        if ranks.rank != 0:
            follow(model, ranks.comm)
            return 0
        logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s",
                            stream=sys.stderr)
        # decode steps static (CUDA graphs) where the model allows it, as in one process; steps with
        # prompt chunks eager, and no overlap: the other ranks need each step's tokens before it runs
        config = _scheduler_config(args, static_mixed=False, overlap=False)
        mirror = StepMirror(model, ranks.comm)
        try:
            # on a GPU every rank pays its Triton compiles and graph captures (mirrored) before the first request
            engine = Engine(model, config, warm=model.device.type == "cuda", lockstep=mirror)
        except BaseException:  # no engine thread will stop the others: do it here (best effort)
            with contextlib.suppress(Exception):
                mirror.stop()
            raise
        name = args.served_model_name or path.resolve().name
        app = build_app(engine, load_tokenizer(path), name)
        server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                               access_log=False))

        closing, failed = threading.Event(), []

        def stop_when_the_engine_ends() -> None:  # the other ranks are gone: no step can run, stop serving
            engine._thread.join()
            if not closing.is_set():
                failed.append(engine.error)
                server.should_exit = True

        threading.Thread(target=stop_when_the_engine_ends, name="moekit-lockstep-watch", daemon=True).start()
        cache = engine.scheduler.cache
        print(f"moekit: serving {name} ({ranks.device}, {str(model.dtype).replace('torch.', '')}, "
              f"--parallel {args.parallel}: {ranks.comm.world} ranks in lockstep, {cache.num_blocks} KV blocks of "
              f"{cache.block_size}) on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
        try:
            server.run()
        except (KeyboardInterrupt, Terminated):  # uvicorn re-raises the signal that stopped it
            pass
        finally:
            closing.set()
            engine.close()  # its thread sends the other ranks STOP
        if failed:
            raise MoekitError(f"rank 0 stopped serving: {failed[0]}")
        return 0
    finally:
        ranks.close()


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
