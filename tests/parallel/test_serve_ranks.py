"""`moekit serve --parallel`: 2 gloo ranks (processes started as torchrun would, so that the test can
signal rank 0 alone) serve the bundled model; the official openai client's concurrent greedy
completions equal the single-process server's, an idle gap past the collective timeout is bridged
by heartbeats, only rank 0 listens on the HTTP port, and a SIGTERM to rank 0 ends every rank with
exit code 0. Flags that cannot combine fail in one line. In process (no HTTP): a Scheduler whose
steps a StepMirror sends, warm-up included, gives the single-process tokens, and every rank ran as
many steps as rank 0 sent."""

from __future__ import annotations

import asyncio
import http.client
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_cli
from ranks import free_port, run_ranks
from serve_workers import scheduler_in_lockstep

import moekit

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

TIMEOUT_S = 12  # --parallel timeout=: the idle gap below outlasts it
FLAGS = ("--max-seqs", "4", "--max-step-tokens", "32", "--threads", "1", "--device", "cpu", "--log-level", "warning")
# (prompt, max_tokens): different lengths, so that prefill chunks and decode rows share steps
REQUESTS = [("Once upon a time", 10), ("def fibonacci(n):" + " n" * 20, 6), ("The", 12),
            ("import torch\nimport numpy as np\n\nclass Model:", 8), ("Hello", 3), ("x = 1\ny = 2\n# the sum", 9)]


def _health(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/health")
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except OSError:
        return False


class Servers:
    """`moekit serve` in one process, or over `world` ranks (RANK/WORLD_SIZE/MASTER_* set as torchrun sets them)."""

    def __init__(self, logs: Path, parallel: str | None = None, world: int = 2):
        self.port = free_port()
        base = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        base["OMP_NUM_THREADS"] = "1"
        argv = [sys.executable, "-m", "moekit", "serve", str(moekit.default_model_path()), "--port", str(self.port),
                *FLAGS]
        if parallel is None:
            envs = [base]
        else:
            argv += ["--parallel", f"{parallel},timeout={TIMEOUT_S}"]
            master = str(free_port())
            envs = [{**base, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
                     "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": master}
                    for r in range(world)]
        self.logs = [logs / f"{parallel or 'single'}-rank{r}-{self.port}.log" for r in range(len(envs))]
        self.procs = [subprocess.Popen(argv, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
                      for env, log in zip(envs, self.logs)]
        deadline = time.monotonic() + 180
        while not _health(self.port):
            if any(p.poll() is not None for p in self.procs) or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"the server did not come up: {self.output()}")
            time.sleep(0.3)

    def output(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in self.logs)

    def complete(self, requests: list[tuple[str, int]]) -> list[tuple[str, str, int]]:
        """Returns (text, finish reason, completion tokens) of greedy completions sent all at once."""

        async def together():
            async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="unused",
                                          max_retries=0, timeout=120) as c:
                rs = await asyncio.gather(*(c.completions.create(model="tiny-moe", prompt=p, max_tokens=n,
                                                                 temperature=0) for p, n in requests))
            return [(r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens) for r in rs]

        return asyncio.run(together())

    def stop(self, timeout_s: float = 60) -> list[int]:
        """Returns every process's exit code after SIGTERM to the first (rank 0) alone."""
        self.procs[0].send_signal(signal.SIGTERM)
        try:
            return [p.wait(timeout=timeout_s) for p in self.procs]
        finally:
            self.kill()

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _listeners(pid: int, port: int) -> bool:
    """Returns whether process `pid` holds a TCP socket listening on `port` (Linux /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A" and fields[9] in inodes:
                return True
    return False


@pytest.fixture(scope="module")
def expected(tmp_path_factory):
    """The single-process server's answers to REQUESTS."""
    single = Servers(tmp_path_factory.mktemp("single"))
    try:
        return single.complete(REQUESTS)
    finally:
        single.stop()


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads listening sockets from Linux /proc")
@pytest.mark.parametrize("parallel", ["ep=2", "tp=2"])
def test_ranks_serve_what_one_process_serves(tmp_path, expected, parallel):
    servers = Servers(tmp_path, parallel)
    try:
        assert servers.complete(REQUESTS) == expected
        assert _listeners(servers.procs[0].pid, servers.port)
        assert not _listeners(servers.procs[1].pid, servers.port)  # only rank 0 answers HTTP
        time.sleep(TIMEOUT_S + 2)  # idle past the collective timeout: rank 0's heartbeats keep rank 1 waiting
        assert servers.complete(REQUESTS[:2]) == expected[:2], servers.output()
    except BaseException:
        servers.kill()
        raise
    codes = servers.stop()
    assert codes == [0, 0], servers.output()
    assert "Traceback" not in servers.output()


@pytest.mark.parametrize("flags, message", [
    (["--parallel", "ep=2", "--offload"], "--parallel with --offload is not available in `moekit serve`"),
    (["--parallel", "tp=2", "--static-mixed"], "--parallel runs steps with prompt chunks eagerly"),
    (["--parallel", "dp=2"], "give ep=N (expert-parallel ranks) and/or tp=M"),
])
def test_flags_that_cannot_combine_fail_in_one_line(capsys, flags, message):
    code, _, err = run_cli(capsys, "serve", str(moekit.default_model_path()), "--device", "cpu", *flags)
    assert code == 2 and message in err and "Traceback" not in err


@pytest.mark.slow
def test_rank_0_stops_serving_when_another_rank_dies(tmp_path):
    servers = Servers(tmp_path, "ep=2")
    try:
        servers.procs[1].kill()
        servers.procs[1].wait()
        with pytest.raises(openai.APIError):  # the step fails (or the server is already stopping)
            servers.complete(REQUESTS[:1])
        code = servers.procs[0].wait(timeout=3 * TIMEOUT_S)  # its heartbeat or step failed: no hang
    finally:
        servers.kill()
    out = servers.output()
    assert code == 2, out
    assert "moekit: error: rank 0 stopped serving" in out and "another rank exited or stopped answering" in out


@pytest.mark.parametrize("ep, tp, static_decode", [pytest.param(2, 1, False, marks=pytest.mark.slow), (1, 2, True),
                                                    (2, 1, True)])
def test_mirrored_scheduler_equals_one_process(ep, tp, static_decode):
    from moekit.serve.scheduler import SamplingParams, Scheduler, SchedulerConfig

    path = moekit.default_model_path()
    # prompts longer than a step (24 tokens): prefill chunks beside decode rows; 4 requests over 3 seqs
    requests = [([(7 * i + 3 * j) % 4000 + 1 for j in range(n)], m) for i, (n, m) in enumerate([(30, 5), (3, 7),
                                                                                                 (11, 4), (1, 6)])]
    model = moekit.load_model(path)
    alone = Scheduler(model, SchedulerConfig(max_seqs=3, max_step_tokens=24))
    added = [alone.add(prompt, SamplingParams(max_tokens=n)) for prompt, n in requests]
    alone.run()
    rank0, rank1 = run_ranks(2, scheduler_in_lockstep, str(path), ep, tp, requests, tp == 2, static_decode,
                             timeout_s=60.0, join_s=240.0)
    assert isinstance(rank0, dict) and isinstance(rank1, dict), (rank0, rank1)  # else a RankError: its message
    assert rank0["outputs"] == [r.output for r in added]
    assert rank1["steps"] == rank0["steps"]
    assert (rank0["static"] > 0) == static_decode  # decode steps went through the mirrored PagedDecode
    if tp == 2:  # warmed: its throwaway steps were mirrored too
        assert rank0["steps"] > alone.stats.steps
    else:
        assert rank0["steps"] == alone.stats.steps
