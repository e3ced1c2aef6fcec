"""Read rate of the native bf16 expert layer kernel (experts.cpp, moekit_expert_ffn) on one token
through a layer's top-8 experts at OLMoE's shapes (gate_up [2048, 2048], down [2048, 1024]), by
stage, next to one thread's (and all threads') stream read measured in the same run (issue 12).

Cases, each reading its weights from DRAM (--experts distinct experts cycled, past the L3):
  layer    8 distinct experts in one call (the decode step's CPU share)
  serial   the same 8 experts as 8 one-expert calls (what "one expert" measures, 8 times)
  stage1   8 distinct gate_up, one shared (cache-hot) down: stage 1's bytes from DRAM
  stage2   one shared (cache-hot) gate_up, 8 distinct down: stage 2's bytes from DRAM
A stage's rate counts only its DRAM bytes, so the cached other stage makes it a lower bound.
--lib PATH (repeatable) times other builds of the library in the same process, interleaved with
this tree's (e.g. one built from the previous commit's sources) for an A/B under the same noise.

    cd /work/main && PYTHONPATH=src nice .venv/bin/python benchmarks/probes/probe_cpu_layer_kernel.py  # ~30 s
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import time

import torch

from moekit.native import library
from moekit.native.experts import acc_stride

HIDDEN, FFN, TOP_K = 2048, 1024, 8  # OLMoE-1B-7B's layer


def load(path: str) -> ctypes.CDLL:
    """Returns another build of the native library with moekit_expert_ffn's signature declared."""
    lib = ctypes.CDLL(path)
    i64, i32p, i64p, f32p, vp = ctypes.c_int64, ctypes.POINTER(ctypes.c_int32), ctypes.POINTER(ctypes.c_int64), \
        ctypes.POINTER(ctypes.c_float), ctypes.c_void_p
    lib.moekit_expert_ffn.argtypes = [ctypes.c_int, ctypes.c_int, vp, vp, i64, i64, i64, i64, i64p, i64p, i32p, i32p,
                                      f32p, f32p, f32p, f32p, ctypes.c_int]
    lib.moekit_expert_ffn.restype = ctypes.c_int
    lib.moekit_stream_read.argtypes = [vp, i64, ctypes.c_int]
    lib.moekit_stream_read.restype = ctypes.c_double
    return lib


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lib", action="append", default=[], help="another library build to time beside this tree's")
    p.add_argument("--experts", type=int, default=32, help="distinct experts cycled (32 = 384 MB)")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--json", action="store_true")
    a = p.parse_args()

    libs = {"tree": library()} | {path: load(path) for path in a.lib}
    gate_up = torch.randn(a.experts, 2 * FFN, HIDDEN).to(torch.bfloat16)  # [E, 2I, D]
    down = torch.randn(a.experts, HIDDEN, FFN).to(torch.bfloat16)  # [E, D, I]
    x = torch.randn(1, HIDDEN).to(torch.bfloat16)
    out = torch.empty_like(x)
    gu_bytes, dn_bytes = gate_up[0].numel() * 2, down[0].numel() * 2
    h = torch.empty(TOP_K * FFN)
    xf = torch.empty(HIDDEN)
    accs = torch.empty(8 * acc_stride(1))
    fp = lambda t: ctypes.cast(t.data_ptr(), ctypes.POINTER(ctypes.c_float))  # noqa: E731
    turn = [0]

    def call(lib, gus: list[int], dns: list[int], threads: int) -> None:
        j = len(gus)
        starts = (ctypes.c_int32 * (j + 1))(*range(j + 1))
        toks = (ctypes.c_int32 * j)(*([0] * j))
        ws = (ctypes.c_float * j)(*([1.0 / j] * j))
        code = lib.moekit_expert_ffn(0, 0, x.data_ptr(), out.data_ptr(), 1, HIDDEN, FFN, j,
                                     (ctypes.c_int64 * j)(*[gate_up[e].data_ptr() for e in gus]),
                                     (ctypes.c_int64 * j)(*[down[e].data_ptr() for e in dns]),
                                     starts, toks, ws, fp(h), fp(xf), fp(accs), threads)
        assert code == 0, code

    def case(lib, name: str, threads: int) -> tuple[float, int]:
        """Returns (seconds, DRAM bytes) of one run of a case on the next experts in the cycle."""
        ids = [(turn[0] + i) % a.experts for i in range(TOP_K)]
        turn[0] += TOP_K
        hot = (ids[0] + a.experts // 2) % a.experts  # another expert, read first to bring it in cache
        t0 = time.perf_counter()
        if name == "layer":
            call(lib, ids, ids, threads)
            nbytes = TOP_K * (gu_bytes + dn_bytes)
        elif name == "serial":
            for e in ids:
                call(lib, [e], [e], threads)
            nbytes = TOP_K * (gu_bytes + dn_bytes)
        elif name == "stage1":
            call(lib, [hot], [hot], threads)
            t0 = time.perf_counter()
            call(lib, ids, [hot] * TOP_K, threads)
            nbytes = TOP_K * gu_bytes
        else:
            call(lib, [hot], [hot], threads)
            t0 = time.perf_counter()
            call(lib, [hot] * TOP_K, ids, threads)
            nbytes = TOP_K * dn_bytes
        return time.perf_counter() - t0, nbytes

    stream = torch.ones((1 << 30) // 8, dtype=torch.int64)
    cases = ("layer", "serial", "stage1", "stage2")
    times: dict = {}
    for _ in range(a.reps):  # interleaved: every case of every library once per round
        for threads in a.threads:
            t0 = time.perf_counter()
            libs["tree"].moekit_stream_read(stream.data_ptr(), stream.numel() * 8, threads)
            times.setdefault(("stream", "", threads), []).append((time.perf_counter() - t0, stream.numel() * 8))
            for label, lib in libs.items():
                for name in cases:
                    times.setdefault((name, label, threads), []).append(case(lib, name, threads))
    rows = []
    for (name, label, threads), runs in times.items():
        gbs = statistics.median(n / t for t, n in runs) / 1e9
        ceiling = statistics.median(n / t for t, n in times[("stream", "", threads)]) / 1e9
        rows.append({"case": name, "lib": label, "threads": threads, "gb_per_s": round(gbs, 2),
                     "of_stream_read": round(gbs / ceiling, 3)})
    if a.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{'case':8} {'threads':>7} {'GB/s':>7} {'of read':>8}  lib   (median of {a.reps}, interleaved)")
    for r in sorted(rows, key=lambda r: (r["threads"], r["case"], r["lib"])):
        print(f"{r['case']:8} {r['threads']:7} {r['gb_per_s']:7.2f} {r['of_stream_read']:8.0%}  {r['lib']}")


if __name__ == "__main__":
    main()
