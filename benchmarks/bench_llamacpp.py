"""moekit vs llama.cpp on the same checkpoint in one run (issue 12), with the ceilings beside them.

One random bf16 checkpoint (default: the OLMoE-1B-7B shape, 13.8 GB) is written once; llama.cpp is
built from the trimmed source in ../shared/anchors/llamacpp (copy that folder into a git-ignored
`.anchors/llamacpp` and carry it to the GPU machine), converts the checkpoint to GGUF bf16, and
llama-bench measures decode (64 tokens after none, -fa 1) all on the GPU and with the experts of
all / half of the MoE layers on the CPU (-ncmoe), and prefill 512. While each llama-bench run
works, nvidia-smi samples the GPU's used memory every 50 ms: its peak minus the idle figure is
llama.cpp's footprint. moekit then runs the same checkpoint at those footprints, as
`--device-memory` (its own allocator-enforced budget), with the missed experts computed on the
CPU (`--misses cpu`), split by the cost model (`auto`) or fetched (`fetch`); and all on the GPU.

Ceilings, measured in this run: the host's read rate with all cores (the native kernel's stream
read), pinned host-to-device copies alone, and both at once (they share the host's memory). With
E bytes of missed experts per token, the decode ceiling is 1 / (E / (cpu_rate + h2d_rate)) when
both links run concurrently (the issue's "combined ceiling"), E / cpu_rate for the CPU alone.
The CPU kernel is measured on one expert and on a layer's top-k experts, native vs PyTorch, and
the compressed-expert kernels (int4, int2, ternary code, decoded in the matvec) on a layer's top-k.

    PYTHONPATH=src python3 benchmarks/bench_llamacpp.py --out $OUT                         # H200, ~8 min
    PYTHONPATH=src python3 benchmarks/bench_llamacpp.py --shape tiny --skip-llamacpp --device cpu --out /tmp/l
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import threading
import time
import traceback
from pathlib import Path

import common
import torch
from random_checkpoint import olmoe_hf_config, write_random_checkpoint

import moekit
from moekit.errors import MoekitError

NAME = "bench_llamacpp"
SHAPES = {
    "olmoe-1b-7b": dict(layers=16, hidden=2048, expert_ffn=1024, experts=64, top_k=8, heads=16, kv_heads=16,
                        vocab=50304),
    "olmoe-4-layers": dict(layers=4, hidden=2048, expert_ffn=1024, experts=64, top_k=8, heads=16, kv_heads=16,
                           vocab=50304),  # issue 12's no-GPU comparison
    "tiny": dict(layers=2, hidden=128, expert_ffn=256, experts=16, top_k=4, heads=4, kv_heads=4, vocab=4096),
}
PROMPT, NEW = 64, 64
ROUNDS = 5  # --device cpu: moekit's warm decode calls, interleaved with llama.cpp's decode runs


# ---- ceilings -----------------------------------------------------------------------------------

def cpu_and_link_rates(device: torch.device, threads: int, nbytes: int = 2 << 30, seconds: float = 2.0) -> dict:
    """Returns host read (native stream read, `threads` threads), pinned H2D copy, and both at once
    (bytes/s): what the CPU and the link can give a decode step together."""
    from moekit.native import library

    lib = library()
    out: dict = {"threads": threads}
    host = torch.ones(nbytes // 8, dtype=torch.int64)

    def read_loop(stop: threading.Event, done: list) -> None:
        while not stop.is_set():
            lib.moekit_stream_read(host.data_ptr(), nbytes, threads)
            done.append(nbytes)

    def timed_reads(stop_after: float) -> float:
        stop, done = threading.Event(), []
        t0 = time.perf_counter()
        th = threading.Thread(target=read_loop, args=(stop, done))
        th.start()
        time.sleep(stop_after)
        stop.set()
        th.join()
        return sum(done) / (time.perf_counter() - t0)

    out["cpu_read_alone_bytes_per_s"] = timed_reads(seconds)
    if device.type != "cuda":
        return out
    src = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(1 << 30, dtype=torch.uint8, device=device)

    def copies(duration: float) -> float:
        torch.cuda.synchronize(device)
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < duration:
            dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize(device)
            n += src.numel()
        return n / (time.perf_counter() - t0)

    copies(0.2)
    out["h2d_alone_bytes_per_s"] = copies(seconds)
    stop, done = threading.Event(), []
    th = threading.Thread(target=read_loop, args=(stop, done))
    t0 = time.perf_counter()
    th.start()
    out["h2d_concurrent_bytes_per_s"] = copies(seconds)
    stop.set()
    th.join()
    out["cpu_read_concurrent_bytes_per_s"] = sum(done) / (time.perf_counter() - t0)
    return out


def kernel_rates(cfg, threads: int, reps: int = 5) -> dict:
    """Returns the CPU expert path's read rate (bytes/s) native vs PyTorch, on one expert and on a
    layer's top-k experts (distinct, cold in the caches), bf16, one token."""
    import torch.nn.functional as F

    from moekit.native.experts import Scratch, expert_ffn, stream_read_bytes_per_s

    d, ffn, k = cfg.hidden_size, cfg.expert_ffn, cfg.top_k
    count = max(64, 4 * k * reps)  # more experts than any last-level cache holds
    gate_up = torch.randn(count, 2 * ffn, d).to(torch.bfloat16)
    down = torch.randn(count, d, ffn).to(torch.bfloat16)
    x = torch.randn(1, d).to(torch.bfloat16)
    expert_bytes = 3 * d * ffn * 2
    scratch, turn = Scratch(), [0]

    def native(n: int) -> None:
        ids = [(turn[0] + i) % count for i in range(n)]
        turn[0] += n
        expert_ffn(x, [(gate_up[e], down[e], [0], [1.0 / n]) for e in ids], threads=threads, scratch=scratch)

    def pytorch(n: int) -> None:
        ids = [(turn[0] + i) % count for i in range(n)]
        turn[0] += n
        out = torch.zeros_like(x)
        for e in ids:
            g, u = F.linear(x, gate_up[e]).chunk(2, dim=-1)
            out += F.linear(F.silu(g) * u, down[e]) / n

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    res = {}
    try:
        for n_threads in sorted({1, 4, 8, threads, threads + 1}):  # how the kernel scales with cores
            native(k)
            t0 = time.perf_counter()
            expert_ffn(x, [(gate_up[e], down[e], [0], [1.0 / k]) for e in range(k, 2 * k)], threads=n_threads,
                       scratch=scratch)
            res[f"native_layer_top_k_threads{n_threads}_bytes_per_s"] = k * expert_bytes / (time.perf_counter() - t0)
            res[f"stream_read_threads{n_threads}_bytes_per_s"] = stream_read_bytes_per_s(1 << 30, n_threads, reps=3)
        for name, fn in (("native", native), ("pytorch", pytorch)):
            for n, label in ((1, "one_expert"), (k, "layer_top_k")):
                fn(n)
                times = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    fn(n)
                    times.append(time.perf_counter() - t0)
                res[f"{name}_{label}_bytes_per_s"] = n * expert_bytes / statistics.median(times)
    finally:
        torch.set_num_threads(old)
    return res


def compressed_kernel_rates(cfg, threads: int, reps: int = 5, group_size: int = 128) -> dict:
    """Returns the native CPU kernels' rates on compressed experts (moekit.native.compressed, decoded
    in the matvec), one token, a layer's top-k distinct experts: stored bytes/s and weights/s of
    int4 and int2 (group_size columns per scale, random codes) and the ternary code (RTN of Gaussian
    weights, the dictionary compress would choose), to set beside kernel_rates' bf16 row and the
    stream read. The ternary experts are only top_k + 1 (encoding is slow), so they may stay in the
    last-level cache; its kernel is decode-bound anyway."""
    from moekit.native.compressed import code_ffn, int_ffn, stored_bytes
    from moekit.native.experts import Scratch
    from moekit.quant.code import choose_dictionary, encode, symbol_probabilities
    from moekit.quant.grids import TernaryGrid, pack_codes

    d, ffn, k = cfg.hidden_size, cfg.expert_ffn, cfg.top_k
    weights = 3 * d * ffn
    x = torch.randn(1, d)
    scratch, res = Scratch(), {}

    def int_expert(bits: int, g: torch.Generator):
        def matrix(rows: int, cols: int):
            groups = -(-cols // group_size)
            return (pack_codes(torch.randint(0, 1 << bits, (rows, cols), generator=g), bits),
                    (torch.rand(rows, groups, generator=g) * 0.01).half(),
                    torch.randint(0, 1 << bits, (rows, groups), generator=g).to(torch.uint8))
        return matrix(2 * ffn, d), matrix(d, ffn)

    def ternary_experts(count: int) -> tuple[list, torch.Tensor]:
        grid, mats = TernaryGrid(), []
        for rows, cols in ((2 * ffn, d), (d, ffn)):
            w = torch.randn(count, rows, cols)
            lo, hi = grid.fit(w)
            codes, _ = grid.round(w, (lo, hi))
            mats.append((codes, lo.squeeze(-1).half(), hi.squeeze(-1).half()))
        symbols = torch.cat([m[0].flatten() for m in mats])
        table = choose_dictionary(symbol_probabilities(symbols), symbols.numel(), count * (2 * ffn + d))
        parts = [(encode(codes, table), lo, hi) for codes, lo, hi in mats]
        return [tuple((*(t[e] for t in code), lo[e], hi[e]) for code, lo, hi in parts) for e in range(count)], table.table

    def timed(run, experts: list, label: str, bytes_of) -> None:
        turn = [0]

        def once() -> tuple[float, int]:  # (seconds, stored bytes read)
            ids = [(turn[0] + i) % len(experts) for i in range(k)]
            turn[0] += k
            jobs = [(*experts[e], [0], [1.0 / k]) for e in ids]
            t0 = time.perf_counter()
            run(jobs)
            return time.perf_counter() - t0, bytes_of(jobs)

        once()
        runs = [once() for _ in range(reps)]
        seconds = statistics.median(t for t, _ in runs)
        res[f"native_{label}_layer_top_k_bytes_per_s"] = runs[0][1] / seconds
        res[f"native_{label}_layer_top_k_weights_per_s"] = k * weights / seconds

    g = torch.Generator().manual_seed(0)
    count = max(8 * k, 64)  # distinct experts: int4 at olmoe's shape 200 MB, more than a last-level cache
    for bits in (4, 2):
        experts = [int_expert(bits, g) for _ in range(count)]
        timed(lambda jobs, b=bits: int_ffn(x, jobs, b, threads=threads, scratch=scratch), experts, f"int{bits}_g{group_size}",
              stored_bytes)
        del experts
    experts, table = ternary_experts(k + 1)  # each call reads k of them, starting one further on
    timed(lambda jobs: code_ffn(x, jobs, table, threads=threads, scratch=scratch), experts, "ternary_code", stored_bytes)
    return res


# ---- llama.cpp ------------------------------------------------------------------------------------

class GpuMemorySampler:
    """Samples nvidia-smi's memory.used (MiB) every 50 ms in the background; `peak` after stop."""

    def __init__(self):
        self.proc = None

    def __enter__(self):
        self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                      "-lms", "50"], stdout=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=10)
        values = [int(v) for v in out.split() if v.strip().isdigit()]
        self.peak_mib = max(values) if values else None

    @staticmethod
    def used_mib() -> int | None:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=30, check=False).stdout
            return int(out.split()[0])
        except (OSError, ValueError, IndexError, subprocess.SubprocessError):
            return None


def llama_env(bench: Path) -> dict:
    """Returns the environment llama-bench needs (pip's CUDA libraries when the system lacks them)."""
    env = dict(os.environ)
    missing = "not found" in subprocess.run(["ldd", str(bench)], capture_output=True, text=True, check=False).stdout
    if missing:
        import glob

        try:
            import nvidia

            dirs = sorted({os.path.dirname(p) for r in nvidia.__path__ for p in glob.glob(os.path.join(r, "*", "lib", "lib*.so*"))})
            env["LD_LIBRARY_PATH"] = ":".join(dirs + [env.get("LD_LIBRARY_PATH", "")])
        except ImportError:
            pass
    return env


def start_llamacpp_build(anchor: Path, ckpt: Path, out: Path, cuda: bool = True) -> tuple[subprocess.Popen, float]:
    """Starts the anchor's run.sh build and convert stages in the background (a CPU-only build
    when not `cuda`)."""
    work = out / "llamacpp"
    work.mkdir(parents=True, exist_ok=True)
    log = open(out / "llamacpp_build.log", "w")  # noqa: SIM115 -- closed with the process
    env = {**os.environ, "LCPP_STAGES": "build,convert", "LCPP_CUDA": "1" if cuda else "0"}
    proc = subprocess.Popen(["bash", str(anchor / "run.sh"), str(ckpt), str(work)], stdout=log,
                            stderr=subprocess.STDOUT, env=env)
    return proc, time.perf_counter()


def llamacpp_rows(build: tuple[subprocess.Popen, float], out: Path, cfg, results: dict, save):
    """Waits for the build and conversion, then runs llama-bench per row with the GPU memory
    sampled; fills results['llamacpp']. Returns run(name, extra_args), which runs and records one
    more llama-bench row (the CPU mode's decode again after moekit's), or None after a failure."""
    lc = results["llamacpp"] = {"rows": {}}
    proc, t0 = build
    rc = proc.wait()
    lc["build_convert_s"] = time.perf_counter() - t0
    if rc != 0:
        tail = (out / "llamacpp_build.log").read_text()[-1500:]
        lc["error"] = f"run.sh build,convert failed (rc {rc}): {tail}"
        common.log(lc["error"])
        save()
        return None
    common.log(f"llama.cpp built and converted in {lc['build_convert_s']:.0f} s")
    cuda = torch.cuda.is_available()
    build_dir = "build-cuda" if cuda else "build-cpu"
    bench = Path(os.environ.get("LCPP_ROOT", "/tmp/lcpp")) / "llama.cpp" / build_dir / "bin" / "llama-bench"
    gguf = os.environ.get("LCPP_GGUF", "/dev/shm/model.gguf")
    env = llama_env(bench)
    moe_layers = sum(cfg.moe_layers)
    idle = None
    if cuda:
        common.free_memory(torch.device("cuda"))
        idle = GpuMemorySampler.used_mib()  # this process's context and tensors included: not llama.cpp's
    lc["idle_used_mib"] = idle
    if cuda:
        runs = {"decode_gpu": ["-p", "0", "-n", str(NEW), "-ngl", "99"],
                "decode_cpu_experts": ["-p", "0", "-n", str(NEW), "-ngl", "99", "-ncmoe", str(moe_layers)],
                "decode_half_experts": ["-p", "0", "-n", str(NEW), "-ngl", "99", "-ncmoe", str((moe_layers + 1) // 2)],
                "prefill_gpu": ["-p", "512", "-n", "0", "-ngl", "99"]}
    else:  # no GPU: the CPU build, all cores this process may use
        threads = str(len(os.sched_getaffinity(0)))
        runs = {"decode_cpu_only": ["-p", "0", "-n", str(NEW), "-t", threads],
                "prefill_cpu_only": ["-p", str(PROMPT), "-n", "0", "-t", threads]}

    def run(name: str, extra: list[str]) -> None:
        cmd = [str(bench), "-m", gguf, "-r", "2", "-o", "json", "-fa", "1", *extra]
        t0 = time.perf_counter()
        with GpuMemorySampler() if cuda else _Nothing() as s:
            q = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        row = {"command": " ".join(["llama-bench", *cmd[1:]]), "seconds": time.perf_counter() - t0}
        if q.returncode != 0:
            row["error"] = q.stderr[-1500:]
        else:
            r = json.loads(q.stdout)[0]
            row.update(tok_s=r["avg_ts"], stddev=r["stddev_ts"], n_threads=r["n_threads"], model_size=r.get("model_size"),
                       cpu_info=r.get("cpu_info"), gpu_info=r.get("gpu_info"), build_commit=r.get("build_commit"))
        if getattr(s, "peak_mib", None) is not None and idle is not None:
            row["gpu_used_bytes"] = (s.peak_mib - idle) * 2**20
        if not cuda:
            row["loadavg_after"] = os.getloadavg()
        lc["rows"][name] = row
        common.log(f"llama.cpp {name}: {row.get('tok_s', 'error')} tok/s, GPU used "
                   f"{row.get('gpu_used_bytes', 0) / 1e9:.2f} GB")
        save()

    for name, extra in runs.items():
        run(name, extra)
    return run


# ---- moekit ---------------------------------------------------------------------------------------

def probe_fit(ckpt: Path, tensor_bytes: int, shares: list[float], out: Path) -> dict:
    """Runs `moekit generate --offload` at each budget share with MOEKIT_DEBUG_FIT=1 as a
    subprocess (memory only, no timing: it may overlap the llama.cpp build); returns each run's
    refusal or plan, and keeps the warm-up's debug lines in fit_probe.log."""
    import sys

    env = {**os.environ, "MOEKIT_DEBUG_FIT": "1"}
    res, logs = {}, []
    for share in shares:
        budget = int(share * tensor_bytes)
        cmd = [sys.executable, "-m", "moekit.cli", "generate", "hello", "--model", str(ckpt), "--offload",
               "--device-memory", str(budget), "--max-new-tokens", "8", "--json", "--stats"]
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, timeout=240)
        lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
        row: dict = {"budget_bytes": budget, "returncode": p.returncode}
        if lines:
            rep = json.loads(lines[-1]).get("offload") or {}
            row.update(peak_bytes=rep.get("peak_device_bytes"), plan=rep.get("plan"))
        else:
            row["stderr_tail"] = p.stderr[-1500:]
        res[f"{share:.2f}"] = row
        logs.append(f"=== share {share} budget {budget}\n{p.stderr[-20000:]}")
        common.log(f"fit probe {share:.0%}: rc {p.returncode}, peak {row.get('peak_bytes')}")
    (out / "fit_probe.log").write_text("\n".join(logs))
    return res


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def moekit_row(path: Path, device: torch.device, budget: int | None, misses: str | None, prompt_ids,
               idle_mib: int | None = None, dtype: torch.dtype | None = None, prefill_tokens: int = 512,
               rounds: int = 1, between=None) -> dict:
    """Returns decode tok/s (second of two generate calls), the allocator peak and the GPU memory
    nvidia-smi saw in use (minus `idle_mib`: this process's CUDA context counts, as llama.cpp's does).

    With rounds > 1 (the CPU mode on shared cores), the warm call runs `rounds` times with
    between(i) before each (llama.cpp's decode, interleaved); decode_tok_s is then their median."""
    from moekit.offload import OffloadConfig, load_offloaded

    common.free_memory(device, reset_peak=True)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    row: dict = {"budget_bytes": budget, "misses": misses, "status": "ok"}
    t0 = time.perf_counter()
    model = None
    try:
        if budget is None:
            model = moekit.load_model(path, device=device, dtype=dtype)
        else:
            model = load_offloaded(path, device=device, dtype=dtype,
                                   offload=OffloadConfig(device_memory=budget, misses=misses))
        row["load_s"] = time.perf_counter() - t0
        warm = []
        for call in ["first"] + ["warm"] * rounds:
            if call == "warm" and between is not None:
                between(len(warm))
            stats = moekit.GenerationStats()
            with GpuMemorySampler() if device.type == "cuda" else _Nothing() as sampler:
                model.generate(prompt_ids, max_new_tokens=NEW, temperature=0, eos_token_ids=(), stats=stats)
            row[f"{call}_decode_tok_s"] = stats.decode_tok_s
            if call == "warm":
                warm.append(stats.decode_tok_s)
        if rounds > 1:
            row["warm_rounds_tok_s"] = warm
            row["warm_decode_tok_s"] = statistics.median(warm)
        if device.type == "cpu":  # the native bf16 step (moekit.native.decode) or model.forward
            row["native_cpu_step"] = stats.extra.get("native_cpu_step")
        if getattr(sampler, "peak_mib", None) and idle_mib is not None:  # the process's whole use, context included
            row["gpu_used_bytes"] = (sampler.peak_mib - idle_mib) * 2**20
        row["decode_tok_s"] = row["warm_decode_tok_s"]
        if budget is None:  # prefill all resident (llama.cpp's pp512 on a GPU)
            ids = torch.randint(0, model.config.vocab_size, (1, prefill_tokens), device=device)
            stats = moekit.GenerationStats()
            model.generate(ids, max_new_tokens=1, temperature=0, eos_token_ids=(), stats=stats)
            stats = moekit.GenerationStats()
            model.generate(ids, max_new_tokens=1, temperature=0, eos_token_ids=(), stats=stats)
            row[f"prefill_{prefill_tokens}_tok_s"] = prefill_tokens / stats.prefill_s
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            row["peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
        runtime = getattr(model, "offload", None)
        if runtime is not None:
            rep = runtime.report()
            row["report"] = {k: rep.get(k) for k in ("hit_rate", "cpu_experts", "demand_fetches", "cpu_s",
                                                     "bytes_per_token", "cpu_bytes_per_token", "cache_slots",
                                                     "native_cpu_kernel", "plan", "costs")}
    except MoekitError as e:
        row.update(status="refused", refusal=str(e))
    except Exception as e:  # noqa: BLE001 -- one row failing must not lose the others
        row.update(status="error", error=f"{type(e).__name__}: {e}"[:2000], traceback=traceback.format_exc()[-3000:])
    row["seconds"] = time.perf_counter() - t0
    model = None
    common.free_memory(device)
    return row


def interleaved(results: dict, row: dict) -> dict:
    """Returns both engines' decode tok/s of the interleaved CPU rounds, their medians, bests and
    the ratio of the medians (moekit / llama.cpp)."""
    rows = results["llamacpp"]["rows"]
    theirs = [rows[f"decode_cpu_only_round{i}"].get("tok_s") for i in range(ROUNDS + 1)]
    theirs = [t for t in theirs if t]
    ours = row.get("warm_rounds_tok_s") or []
    out = {"llamacpp_tok_s": theirs, "moekit_tok_s": ours}
    if theirs and ours:
        out.update(llamacpp_median=statistics.median(theirs), moekit_median=statistics.median(ours),
                   llamacpp_best=max(theirs), moekit_best=max(ours),
                   ratio_of_medians=statistics.median(ours) / statistics.median(theirs))
    return out


def least_budget(refusal: str) -> int | None:
    """Returns the budget (bytes) a refusal asks for ('give at least 1123.19MB', 'give
    --device-memory 1.18GB or more'), or None."""
    import re

    from moekit.offload.config import parse_size

    m = re.search(r"give (?:at least|--device-memory) ([0-9.]+\s*[KMGT]B)", refusal)
    return parse_size(m.group(1)) + 2 * 10**6 if m else None


def table(results: dict) -> str:
    lc = (results.get("llamacpp") or {}).get("rows", {})
    rows = []
    mixed = results.get("cpu_interleaved") or {}
    for r in results.get("moekit", []):
        ref = lc.get(r["setting"], {})
        ours, theirs = r.get("decode_tok_s"), ref.get("tok_s")
        if r.get("warm_rounds_tok_s") and mixed.get("llamacpp_median"):  # CPU rounds: median against median
            theirs = mixed["llamacpp_median"]
        rows.append([r["setting"], r.get("misses") or r.get("dtype") or "-", f"{(r.get('budget_bytes') or 0) / 1e9:.2f}",
                     f"{ours:.1f}" if ours else r["status"], f"{theirs:.1f}" if theirs else "-",
                     f"{ours / theirs:.2f}x" if ours and theirs else "-",
                     f"{r['ceiling_tok_s']:.1f}" if r.get("ceiling_tok_s") else "-"])
    return common.markdown_table(["setting", "misses", "budget GB", "moekit tok/s", "llama.cpp tok/s", "ratio",
                                  "ceiling tok/s"], rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_output_args(parser, NAME)
    parser.add_argument("--shape", default="olmoe-1b-7b", choices=tuple(SHAPES))
    parser.add_argument("--anchor", default=str(common.REPO / ".anchors" / "llamacpp"))
    parser.add_argument("--skip-llamacpp", action="store_true")
    parser.add_argument("--tmp", default="/dev/shm/moekit_llamacpp")
    parser.add_argument("--misses", default="cpu,auto")
    parser.add_argument("--probe-fit", default="", help="budget shares to run with MOEKIT_DEBUG_FIT=1 while llama.cpp builds")
    parser.add_argument("--skip-gpu-row", action="store_true", help="no all-on-GPU moekit row (its figure caps the ceiling)")
    parser.add_argument("--footprints", default="", help="GPU bytes 'all,half' to use when llama.cpp is skipped")
    args = parser.parse_args()
    device = torch.device(args.device)
    idle_before_cuda = GpuMemorySampler.used_mib() if device.type == "cuda" else None  # before this process's context
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"meta": common.run_meta(args, device), "shape": args.shape, "cores": cores, "moekit": []}

    def save() -> None:
        common.write_json(results, out, NAME)

    tmp = Path(args.tmp)
    t0 = time.perf_counter()
    ckpt, cfg, tensor_bytes = write_random_checkpoint(tmp / "bf16", olmoe_hf_config(**SHAPES[args.shape]), device,
                                                      tokenizer_from=moekit.default_model_path())
    results["checkpoint"] = {"tensor_bytes": tensor_bytes, "write_s": time.perf_counter() - t0}
    common.log(f"checkpoint: {tensor_bytes / 1e9:.2f} GB in {results['checkpoint']['write_s']:.0f} s")
    build = None if args.skip_llamacpp else start_llamacpp_build(Path(args.anchor), ckpt, out, device.type == "cuda")
    if args.probe_fit:  # memory only: may overlap the build
        results["fit_probe"] = probe_fit(ckpt, tensor_bytes, [float(v) for v in args.probe_fit.split(",")], out)
        save()
    llama_again = None
    if build is not None:
        llama_again = llamacpp_rows(build, out, cfg, results, save)
    from moekit.native import library, unavailable_reason

    results["native_library"] = bool(library()) or unavailable_reason()
    rates = results["rates"] = cpu_and_link_rates(device, max(1, cores - 1))
    rates.update(kernel_rates(cfg, max(1, cores - 1)))
    rates.update(compressed_kernel_rates(cfg, max(1, cores - 1)))
    common.log("rates (GB/s): " + ", ".join(f"{k}={v / 1e9:.1f}" for k, v in rates.items() if k.endswith("_per_s")))
    save()
    lc = (results.get("llamacpp") or {}).get("rows", {})
    footprints = {"decode_cpu_experts": lc.get("decode_cpu_experts", {}).get("gpu_used_bytes"),
                  "decode_half_experts": lc.get("decode_half_experts", {}).get("gpu_used_bytes")}
    if args.footprints:
        given = [int(float(v)) for v in args.footprints.split(",")]
        footprints = {k: footprints[k] or v for k, v in zip(footprints, given)}
    results["footprints"] = footprints
    prompt = torch.randint(0, cfg.vocab_size, (1, PROMPT), device=device)
    expert_bytes = 3 * cfg.hidden_size * cfg.expert_ffn * 2
    per_token = sum(cfg.moe_layers) * cfg.top_k * expert_bytes
    idle_mib = results["idle_used_mib_before_cuda"] = idle_before_cuda
    def record(row: dict, what: str) -> None:
        results["moekit"].append(row)
        common.log(f"moekit {what}: {row.get('decode_tok_s')} tok/s ({row['status']}) {row.get('refusal', '')[:200]}")
        save()

    if device.type == "cpu":  # no GPU: everything on the CPU, bf16 as llama.cpp's GGUF
        decode_args = ["-p", "0", "-n", str(NEW), "-t", str(cores)]
        for dtype in (torch.bfloat16, torch.float32):
            load_before = os.getloadavg()  # the cores are shared: a figure taken under load is not the engine's
            # bf16 (llama.cpp's GGUF type): ROUNDS warm calls, each after a llama.cpp decode run, so
            # both engines sample the same drifting host (a VM: its neighbours' load shows nowhere)
            between = None
            if dtype == torch.bfloat16 and llama_again is not None:
                def between(i: int) -> None:
                    llama_again(f"decode_cpu_only_round{i}", decode_args)
            row = moekit_row(ckpt, device, None, None, prompt, dtype=dtype, prefill_tokens=PROMPT,
                             rounds=ROUNDS if dtype == torch.bfloat16 else 1, between=between)
            row.update(setting="decode_cpu_only", dtype=str(dtype).removeprefix("torch."), threads=torch.get_num_threads(),
                       loadavg_before=load_before, loadavg_after=os.getloadavg())
            record(row, f"--device cpu {row['dtype']} (prefill {row.get(f'prefill_{PROMPT}_tok_s')} tok/s)")
            if between is not None:
                llama_again(f"decode_cpu_only_round{ROUNDS}", decode_args)  # brackets the last moekit call
                results["cpu_interleaved"] = interleaved(results, row)
                common.log(f"interleaved: {results['cpu_interleaved']}")
        footprints = {}  # no offloaded rows without a GPU
    gpu: dict = {}
    if device.type == "cuda" and not args.skip_gpu_row:
        gpu = moekit_row(ckpt, device, None, None, prompt, idle_mib)
        gpu["setting"] = "decode_gpu"
        record(gpu, f"all on GPU (prefill {gpu.get('prefill_512_tok_s')} tok/s)")
    combined = rates.get("cpu_read_concurrent_bytes_per_s", 0) + rates.get("h2d_concurrent_bytes_per_s", 0)
    for setting, budget in footprints.items():
        if not budget:
            continue
        for misses in args.misses.split(","):
            row = moekit_row(ckpt, device, int(budget), misses, prompt, idle_mib)
            row["setting"] = setting
            # ceiling: every expert missed (none cached at batch 1 is the worst case), both links at once
            cached = (row.get("report") or {}).get("cache_slots") or 0
            total = sum(cfg.experts_in(i) for i, m in enumerate(cfg.moe_layers) if m)
            missed = per_token * max(0.0, 1 - cached / total)
            row["missed_bytes_per_token_uniform"] = missed
            if missed and combined:
                row["ceiling_tok_s"] = min(combined / missed, gpu.get("decode_tok_s") or float("inf"))
            record(row, f"{setting} {misses} at {budget / 1e9:.2f} GB")
            least = least_budget(row.get("refusal") or "")
            if least:  # refused at llama.cpp's footprint: the same row at the least budget moekit takes
                again = moekit_row(ckpt, device, least, misses, prompt, idle_mib)
                again["setting"] = setting + "_at_least"
                record(again, f"{setting} {misses} at {least / 1e9:.2f} GB")
    print(table(results))
    results["table"] = table(results)
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
