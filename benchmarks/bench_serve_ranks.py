#!/usr/bin/env python3
"""Serving over ranks (issue 16): output tok/s of `moekit serve --parallel` (rank 0 answers HTTP,
every rank runs each step on its shard) next to the single-process server on the same checkpoint,
over real HTTP, and whether their greedy completions agree.

Run on a 2-GPU machine from the repository root (one call, ~3 min expected, unmeasured: never run
on GPUs yet; a server that is not up in --start-timeout-s is recorded as failed and the next runs):

    NCCL_NVLS_ENABLE=0 MOEKIT_GIT_COMMIT=<commit> PYTHONPATH=src python3 benchmarks/bench_serve_ranks.py --out $OUT

Smoke test on the CPU (the bundled tiny model, 2 gloo ranks, ~2 min on 2 busy cores):

    PYTHONPATH=src python3 benchmarks/bench_serve_ranks.py --small --out /tmp/bench

The checkpoint (not --small): a random bf16 OLMoE-layout model (4 layers, hidden 2048, 64 experts
top-8 of ffn 1024, 16 heads, ~3.3 GB) with the bundled model's tokenizer (vocab 4096), written on
the GPU. Rows, in order: `single` (moekit serve, one process: static decode steps in CUDA graphs,
overlap on), then each --parallel value (ranks started as torchrun starts them, RANK/WORLD_SIZE/
MASTER_*, one GPU each; decode-only steps static, piecewise around the expert calls, steps with
prompt chunks eager, no overlap). Per row and concurrency C: a closed loop of C client
threads over --requests-per-slot x C requests (prompts of random token ids, --min-len..--max-len,
--new-tokens each, greedy) after one untimed request: output tok/s, mean time per request; then SIGTERM to rank 0 and every
process's exit code. `agree` is the share of a row's completions equal to the single-process
server's (bf16 sums in another order can flip a near-tie token on random weights).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "examples" / "tiny-moe"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, path: str, body: dict, timeout_s: float = 300) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    conn.request("POST", path, body=json.dumps(body), headers={"content-type": "application/json"})
    response = conn.getresponse()
    data = json.loads(response.read())
    conn.close()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {data}")
    return data


def healthy(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/health")
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except OSError:
        return False


class Launch:
    """`moekit serve MODEL` in one process (parallel None) or over `world` ranks."""

    def __init__(self, model: Path, flags: list[str], logs: Path, parallel: str | None, world: int):
        self.port = free_port()
        argv = [sys.executable, "-m", "moekit", "serve", str(model), "--port", str(self.port), *flags]
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
        envs = [env]
        if parallel is not None:
            argv += ["--parallel", parallel]
            master = str(free_port())
            envs = [dict(env, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                         MASTER_ADDR="127.0.0.1", MASTER_PORT=master) for r in range(world)]
        name = (parallel or "single").replace(",", "_").replace("=", "")
        self.logs = [logs / f"{name}-rank{r}.log" for r in range(len(envs))]
        self.procs = [subprocess.Popen(argv, env=e, stdout=log.open("w"), stderr=subprocess.STDOUT)
                      for e, log in zip(envs, self.logs)]

    def wait_up(self, timeout_s: float) -> float:
        """Returns the seconds until /health answered; raises when a process exits or time runs out."""
        t0 = time.monotonic()
        while not healthy(self.port):
            if any(p.poll() is not None for p in self.procs) or time.monotonic() - t0 > timeout_s:
                raise RuntimeError(f"not up: {self.tail()}")
            time.sleep(0.5)
        return time.monotonic() - t0

    def tail(self) -> str:
        return " | ".join(log.read_text()[-600:] for log in self.logs)

    def stop(self, timeout_s: float = 60) -> list[int | None]:
        """Returns every process's exit code after SIGTERM to rank 0 alone (None: killed after timeout_s)."""
        self.procs[0].send_signal(signal.SIGTERM)
        codes: list[int | None] = []
        deadline = time.monotonic() + timeout_s
        for p in self.procs:
            try:
                codes.append(p.wait(timeout=max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                codes.append(None)
        return codes


def closed_loop(port: int, prompts: list[list[int]], concurrency: int, new_tokens: int) -> tuple[dict, list[str]]:
    """Returns (measures, texts in prompt order) of `concurrency` clients working through `prompts`."""
    texts: list[str] = [""] * len(prompts)
    latencies: list[float] = []
    tokens = 0

    def one(i: int) -> None:
        nonlocal tokens
        t0 = time.perf_counter()
        r = post(port, "/v1/completions", {"model": "m", "prompt": prompts[i], "max_tokens": new_tokens,
                                           "temperature": 0})
        latencies.append(time.perf_counter() - t0)
        texts[i] = r["choices"][0]["text"]
        tokens += r["usage"]["completion_tokens"]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(len(prompts))))
    wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "requests": len(prompts), "completion_tokens": tokens,
            "wall_s": round(wall, 3), "output_tok_s": round(tokens / wall, 1),
            "mean_request_s": round(sum(latencies) / len(latencies), 3)}, texts


def checkpoint(args) -> Path:
    """Returns the model folder the rows serve (written on the GPU unless --small)."""
    if args.small:
        return TINY
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from random_checkpoint import olmoe_hf_config, write_random_checkpoint

    hf = olmoe_hf_config(layers=4, hidden=2048, expert_ffn=1024, experts=64, top_k=8, heads=16, kv_heads=16,
                         vocab=4096, max_positions=4096)
    folder, _, total = write_random_checkpoint(Path(args.tmpdir or tempfile.mkdtemp()) / "olmoe-4l", hf, "cuda",
                                               tokenizer_from=TINY)
    print(f"checkpoint: {total / 1e9:.2f} GB at {folder}", flush=True)
    return folder


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--small", action="store_true", help="the bundled tiny model on the CPU, gloo ranks")
    p.add_argument("--parallel", nargs="+", default=["tp=2", "ep=2", "tp=2,ep=tp"])
    p.add_argument("--concurrency", type=int, nargs="+", default=None, help="default: 1 8 32 (--small: 1 4)")
    p.add_argument("--requests-per-slot", type=int, default=2)
    p.add_argument("--min-len", type=int, default=16)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=None, help="default: 64 (--small: 8)")
    p.add_argument("--start-timeout-s", type=float, default=240)
    p.add_argument("--tmpdir", default=None)
    p.add_argument("--logs", default=None, help="folder for the servers' logs (default: a temporary one)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    concurrency = args.concurrency or ([1, 4] if args.small else [1, 8, 32])
    new_tokens = args.new_tokens or (8 if args.small else 64)
    device = "cpu" if args.small else "cuda"
    flags = ["--max-seqs", str(max(concurrency)), "--max-step-tokens", "512" if not args.small else "64",
             "--log-level", "info", "--device", device, "--served-model-name", "m"]
    if args.small:
        flags += ["--threads", "1"]
    model = checkpoint(args)
    # the servers' logs (each request's time at --log-level info); $OUT takes few files back
    logs = Path(args.logs or tempfile.mkdtemp(prefix="serve-ranks-logs-"))
    logs.mkdir(parents=True, exist_ok=True)
    print(f"server logs in {logs}", flush=True)
    rng = random.Random(0)
    prompts = {c: [[rng.randrange(1, 4096) for _ in range(rng.randint(args.min_len, args.max_len))]
                   for _ in range(args.requests_per_slot * c)] for c in concurrency}
    result = {"commit": os.environ.get("MOEKIT_GIT_COMMIT"), "device": device, "model": str(model),
              "new_tokens": new_tokens, "rows": []}
    reference: dict[int, list[str]] = {}
    for parallel in [None, *args.parallel]:
        world = 2
        row = {"mode": parallel or "single"}
        launch = Launch(model, flags, logs, parallel, world)
        try:
            row["start_s"] = round(launch.wait_up(args.start_timeout_s), 1)
            t0 = time.perf_counter()  # one untimed request first: a first request may pay one-off costs
            post(launch.port, "/v1/completions", {"model": "m", "prompt": [1, 2, 3], "max_tokens": 2})
            row["first_request_s"] = round(time.perf_counter() - t0, 2)
            row["loops"] = []
            for c in concurrency:
                measures, texts = closed_loop(launch.port, prompts[c], c, new_tokens)
                if parallel is None:
                    reference[c] = texts
                elif c in reference:
                    measures["agree"] = round(sum(a == b for a, b in zip(texts, reference[c])) / len(texts), 3)
                row["loops"].append(measures)
                print(row["mode"], measures, flush=True)
        except Exception as e:  # noqa: BLE001 - one failed row is recorded, the next still runs
            row["error"] = f"{type(e).__name__}: {str(e)[:1500]}"
            print(row["mode"], row["error"], flush=True)
        row["exit_codes"] = launch.stop()
        result["rows"].append(row)
        (out / "bench_serve_ranks.json").write_text(json.dumps(result, indent=1))
    print(f"\n{'mode':<12}{'C':>4}{'tok/s':>10}{'vs single':>11}{'agree':>7}")
    base = {m["concurrency"]: m["output_tok_s"] for r in result["rows"] if r["mode"] == "single"
            for m in r.get("loops", [])}
    for r in result["rows"]:
        for m in r.get("loops", []):
            ratio = m["output_tok_s"] / base[m["concurrency"]] if base.get(m["concurrency"]) else float("nan")
            print(f"{r['mode']:<12}{m['concurrency']:>4}{m['output_tok_s']:>10.1f}{ratio:>10.2f}x"
                  f"{m.get('agree', 1.0):>7.2f}")
        print(f"{r['mode']:<12} exit codes {r['exit_codes']}" + (f", error {r['error'][:200]}" if "error" in r else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
