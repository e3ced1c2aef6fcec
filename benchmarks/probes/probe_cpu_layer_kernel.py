"""Read rate of the native CPU expert layer kernels on one token through a layer's top-8 experts at
OLMoE's shapes (gate_up [2048, 2048], down [2048, 1024]; --shape qwen3: [1536, 2048], [2048, 768];
--experts N experts a call), by stage, next to one thread's (and all
threads') stream read measured in the same run (issue 12): bf16 (experts.cpp, moekit_expert_ffn)
and the compressed forms (compressed_layer.h's run_layer: moekit_int_ffn with int8 activations,
moekit_code_ffn).

Forms: bf16; int4_g128, int2_g128, int2_g256 (random codes, group = columns per scale);
ternary (RTN of Gaussian weights, 8 experts encoded with the dictionary compress would choose,
then copied: the copies are other memory, which is all a read rate needs).
Cases, each reading its weights from DRAM (each form cycles through --cycle-mb of distinct
experts, past the 32 MB L3):
  layer    8 distinct experts in one call (the decode step's CPU share)
  serial   the same 8 experts as 8 one-expert calls (what "one expert" measures, 8 times)
  stage1   8 distinct gate_up, one shared (cache-hot) down: stage 1's bytes from DRAM
  stage2   one shared (cache-hot) gate_up, 8 distinct down: stage 2's bytes from DRAM
  gapped   (--gap-us) --layers layer calls, each after a pause of the calling thread alone: a partner
           step's CPU side, whose threads idle while the GPU runs the rest of each layer
--spinners N keeps N more cores busy (processes spinning) throughout: the partner step's launching
thread spins on the device's sync while the team computes.
Rates are of stored bytes; a stage's rate counts only its DRAM bytes, so the cached other stage
makes it a lower bound.
--lib PATH (repeatable) times other builds of the library in the same process, interleaved with
this tree's (e.g. one built from the previous commit's sources) for an A/B under the same noise.
Within one process each loaded copy of a build runs the int-N forms at its own steady offset (up to
+-10% between two copies of one file; bf16 +-1%), so --copies N loads every build N times (copies
of the file) and pools their runs; compare several processes, too:

    mkdir /tmp/old && git archive HEAD~1 src/moekit/native | tar -x -C /tmp/old
    g++ -O3 -march=native -fopenmp -shared -fPIC -std=c++17 /tmp/old/src/moekit/native/*.cpp -o /tmp/old.so
    cd /work/main && PYTHONPATH=src nice .venv/bin/python benchmarks/probes/probe_cpu_layer_kernel.py \\
        --lib /tmp/old.so --copies 3  # ~20 s on the 2-core VM
"""

from __future__ import annotations

import argparse
import ctypes
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from moekit.native import compressed as nc
from moekit.native import library
from moekit.native.experts import acc_stride

HIDDEN, FFN, TOP_K = 2048, 1024, 8  # OLMoE-1B-7B's layer (--shape, --experts set them)
SHAPES = {"olmoe": (2048, 1024), "qwen3": (2048, 768)}  # (hidden, expert ffn): OLMoE-1B-7B, Qwen3-30B-A3B
FORMS = ("bf16", "int4_g128", "int2_g128", "int2_g256", "ternary")


def load(path: str) -> ctypes.CDLL:
    """Returns another build of the native library with the layer kernels' signatures declared."""
    lib = ctypes.CDLL(path)
    i64, i32p, i64p, f32p, vp = ctypes.c_int64, ctypes.POINTER(ctypes.c_int32), ctypes.POINTER(ctypes.c_int64), \
        ctypes.POINTER(ctypes.c_float), ctypes.c_void_p
    # LD after I since the row slices (a build from before them takes one argument fewer)
    lib.moekit_expert_ffn.argtypes = [ctypes.c_int, ctypes.c_int, vp, vp, i64, i64, i64, i64, i64, i64p, i64p, i32p,
                                      i32p, f32p, f32p, f32p, f32p, ctypes.c_int]
    lib.moekit_expert_ffn.restype = ctypes.c_int
    lib.moekit_stream_read.argtypes = [vp, i64, ctypes.c_int]
    lib.moekit_stream_read.restype = ctypes.c_double
    nc._declare(lib)  # moekit_int_ffn, moekit_code_ffn
    return lib


def fp(t: torch.Tensor):
    return ctypes.cast(t.data_ptr(), ctypes.POINTER(ctypes.c_float))


@dataclass
class Form:
    """One stored form's experts and its layer call: call(lib, gate_up experts, down experts, threads)
    runs one token through len(gus) jobs (job j: gate_up of expert gus[j], down of dns[j])."""

    experts: int
    gu_bytes: int  # stored bytes of one expert's gate_up, of its down
    dn_bytes: int
    call: Callable[[ctypes.CDLL, list[int], list[int], int], None]


def routes(j: int):
    """Returns (tok_start, tok, w) ctypes arrays of j jobs of the one token, weights 1 / j."""
    return (ctypes.c_int32 * (j + 1))(*range(j + 1)), (ctypes.c_int32 * j)(*([0] * j)), \
        (ctypes.c_float * j)(*([1.0 / j] * j))


def count_for(expert_bytes: int, cycle_bytes: int) -> int:
    return max(2 * TOP_K, -(-cycle_bytes // expert_bytes))


def bf16_form(cycle_bytes: int) -> Form:
    experts = count_for(3 * HIDDEN * FFN * 2, cycle_bytes)
    gate_up = torch.randn(experts, 2 * FFN, HIDDEN).to(torch.bfloat16)  # [E, 2I, D]
    down = torch.randn(experts, HIDDEN, FFN).to(torch.bfloat16)  # [E, D, I]
    x = torch.randn(1, HIDDEN).to(torch.bfloat16)
    out = torch.empty_like(x)
    h, xf, accs = torch.empty(TOP_K * FFN), torch.empty(HIDDEN), torch.empty(8 * acc_stride(1))

    def call(lib, gus: list[int], dns: list[int], threads: int) -> None:
        j = len(gus)
        code = lib.moekit_expert_ffn(0, 0, x.data_ptr(), out.data_ptr(), 1, HIDDEN, FFN, FFN, j,
                                     (ctypes.c_int64 * j)(*[gate_up[e].data_ptr() for e in gus]),
                                     (ctypes.c_int64 * j)(*[down[e].data_ptr() for e in dns]),
                                     *routes(j), fp(h), fp(xf), fp(accs), threads)
        assert code == 0, code

    return Form(experts, gate_up[0].numel() * 2, down[0].numel() * 2, call)


def int_form(bits: int, group: int, cycle_bytes: int) -> Form:
    """Random words (random codes), scales and zeros; the permuted layout and int8 activations, as
    int_ffn runs int-N g128 / g256 by default."""
    k = 32 // bits

    def matrix(experts: int, rows: int, cols: int) -> list[torch.Tensor]:
        return [torch.randint(-(1 << 31), 1 << 31, (experts, rows, cols // k), dtype=torch.int32),
                (torch.rand(experts, rows, cols // group) * 0.01).half(),
                torch.randint(0, 1 << bits, (experts, rows, cols // group), dtype=torch.uint8)]

    nbytes = lambda parts: sum(t[0].numel() * t.element_size() for t in parts)
    experts = count_for(nbytes(matrix(1, 2 * FFN, HIDDEN)) + nbytes(matrix(1, HIDDEN, FFN)), cycle_bytes)
    gate_up, down = matrix(experts, 2 * FFN, HIDDEN), matrix(experts, HIDDEN, FFN)
    x = torch.randn(HIDDEN)  # already in the permuted layout (its values do not matter here)
    out, h, accs = torch.empty(HIDDEN), torch.zeros(TOP_K * FFN), torch.empty(8 * acc_stride(1))

    def call(lib, gus: list[int], dns: list[int], threads: int) -> None:
        j = len(gus)
        ptrs = [t[e].data_ptr() for g, d in zip(gus, dns) for e, parts in ((g, gate_up), (d, down)) for t in parts]
        code = lib.moekit_int_ffn(bits, fp(x), fp(out), 1, HIDDEN, FFN, j, (ctypes.c_int64 * len(ptrs))(*ptrs),
                                  HIDDEN // group, FFN // group, 1, *routes(j), fp(h), fp(accs), threads, 1)
        assert code == 0, code

    return Form(experts, nbytes(gate_up), nbytes(down), call)


def ternary_form(cycle_bytes: int) -> Form:
    from moekit.quant.code import choose_dictionary, encode, symbol_probabilities
    from moekit.quant.grids import TernaryGrid

    grid, encoded = TernaryGrid(), 8
    mats = []
    for rows, cols in ((2 * FFN, HIDDEN), (HIDDEN, FFN)):
        w = torch.randn(encoded, rows, cols)
        lo, hi = grid.fit(w)
        mats.append((grid.round(w, (lo, hi))[0], lo.squeeze(-1).half(), hi.squeeze(-1).half()))
    symbols = torch.cat([m[0].flatten() for m in mats])
    dictionary = choose_dictionary(symbol_probabilities(symbols), symbols.numel(), encoded * (2 * FFN + HIDDEN))
    table = dictionary.table
    parts = [[*encode(codes, dictionary), lo, hi] for codes, lo, hi in mats]  # per matrix: 6 tensors [8, ...]
    nbytes = lambda ts: sum(t[0].numel() * t.element_size() for t in ts)
    experts = count_for(nbytes(parts[0]) + nbytes(parts[1]), cycle_bytes)
    copies = -(-experts // encoded)
    gate_up, down = ([t.repeat(copies, *([1] * (t.dim() - 1))) for t in ts] for ts in parts)  # other memory
    sizes = [v for ts in (gate_up, down) for v in (ts[0].shape[-1], ts[1].element_size(), ts[2].element_size())]
    masks, lengths = nc.code_masks(table)
    table_ptr = ctypes.cast(table.data_ptr(), ctypes.POINTER(ctypes.c_int32))
    x, out = torch.randn(HIDDEN + nc.CODE_PAD), torch.empty(HIDDEN)
    h, accs = torch.zeros(TOP_K * FFN + nc.CODE_PAD), torch.empty(8 * acc_stride(1))

    def call(lib, gus: list[int], dns: list[int], threads: int) -> None:
        j = len(gus)
        ptrs = [t[e].data_ptr() for g, d in zip(gus, dns) for e, ts in ((g, gate_up), (d, down)) for t in ts]
        code = lib.moekit_code_ffn(fp(x), fp(out), 1, HIDDEN, FFN, j, (ctypes.c_int64 * len(ptrs))(*ptrs), table_ptr,
                                   masks.data_ptr(), lengths.data_ptr(), gate_up[0].element_size(),
                                   (ctypes.c_int64 * (6 * j))(*(sizes * j)), *routes(j), fp(h), fp(accs), threads)
        assert code == 0, code

    return Form(copies * encoded, nbytes(gate_up), nbytes(down), call)


def make(name: str, cycle_bytes: int) -> Form:
    if name == "bf16":
        return bf16_form(cycle_bytes)
    if name == "ternary":
        return ternary_form(cycle_bytes)
    bits, group = name[3:].split("_g")
    return int_form(int(bits), int(group), cycle_bytes)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lib", action="append", default=[], help="another library build to time beside this tree's")
    p.add_argument("--forms", nargs="+", choices=FORMS, default=list(FORMS))
    p.add_argument("--cycle-mb", type=int, default=384, help="stored MB of distinct experts cycled, per form")
    p.add_argument("--copies", type=int, default=1, help="loads of each build (file copies), runs pooled")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--json", action="store_true")
    p.add_argument("--shape", choices=tuple(SHAPES), default="olmoe", help="the layer's hidden and expert ffn")
    p.add_argument("--gap-us", type=float, default=0.0, help="adds case 'gapped': --layers layer calls, each after "
                   "this many microseconds of the calling thread alone (the GPU's share of a partner step, when the "
                   "other threads idle); its rate counts the calls' time only")
    p.add_argument("--layers", type=int, default=24, help="calls of the gapped case (Qwen3-30B-A3B: 48; the bench's cut: 24)")
    p.add_argument("--spinners", type=int, default=0, help="processes that keep a core busy throughout (the "
                   "partner step's launching thread spins on the device's sync meanwhile)")
    p.add_argument("--experts", type=int, default=8, help="experts a layer call computes (the missed ones: "
                   "Qwen3's partner row missed ~1.6 a layer at 80%% hits)")
    a = p.parse_args()
    global HIDDEN, FFN, TOP_K
    (HIDDEN, FFN), TOP_K = SHAPES[a.shape], a.experts

    tree = library()
    builds = {"tree": tree._name} | {path: path for path in a.lib}
    folder = Path(tempfile.mkdtemp(prefix="probe_cpu_layer_"))
    libs = []  # (label, library): copy c of every build, then copy c + 1
    for c in range(a.copies):
        for k, (label, path) in enumerate(builds.items()):
            if c == 0:
                libs.append((label, tree if label == "tree" else load(path)))
            else:
                libs.append((label, load(shutil.copy(path, folder / f"{k}_{c}.so"))))
    forms = {name: make(name, a.cycle_mb << 20) for name in a.forms}
    turn = [0]

    def case(form: Form, lib, name: str, threads: int) -> tuple[float, int]:
        """Returns (seconds, DRAM bytes) of one run of a case on the next experts in the cycle."""
        ids = [(turn[0] + i) % form.experts for i in range(TOP_K)]
        turn[0] += TOP_K
        hot = (ids[0] + form.experts // 2) % form.experts  # another expert, read first to bring it in cache
        t0 = time.perf_counter()
        if name == "layer":
            form.call(lib, ids, ids, threads)
            nbytes = TOP_K * (form.gu_bytes + form.dn_bytes)
        elif name == "gapped":  # --layers calls, each after --gap-us of the caller alone (the partner's step)
            spent = 0.0
            for _ in range(gap_layers):
                until = time.perf_counter() + gap_s
                while time.perf_counter() < until:
                    pass
                ids = [(turn[0] + i) % form.experts for i in range(TOP_K)]
                turn[0] += TOP_K
                t0 = time.perf_counter()
                form.call(lib, ids, ids, threads)
                spent += time.perf_counter() - t0
            return spent, gap_layers * TOP_K * (form.gu_bytes + form.dn_bytes)
        elif name == "serial":
            for e in ids:
                form.call(lib, [e], [e], threads)
            nbytes = TOP_K * (form.gu_bytes + form.dn_bytes)
        elif name == "stage1":
            form.call(lib, [hot], [hot], threads)
            t0 = time.perf_counter()
            form.call(lib, ids, [hot] * TOP_K, threads)
            nbytes = TOP_K * form.gu_bytes
        else:
            form.call(lib, [hot], [hot], threads)
            t0 = time.perf_counter()
            form.call(lib, [hot] * TOP_K, ids, threads)
            nbytes = TOP_K * form.dn_bytes
        return time.perf_counter() - t0, nbytes

    stream = torch.ones((1 << 30) // 8, dtype=torch.int64)
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(a.spinners)]
    cases = ("layer", "serial", "stage1", "stage2") + (("gapped",) if a.gap_us > 0 else ())
    gap_layers, gap_s = a.layers, a.gap_us * 1e-6
    times: dict = {}
    for rep in range(a.reps):  # interleaved: every case of every form and library once per round
        order = libs[rep % len(libs):] + libs[:rep % len(libs)]  # each library first in turn
        for threads in a.threads:
            t0 = time.perf_counter()
            tree.moekit_stream_read(stream.data_ptr(), stream.numel() * 8, threads)
            times.setdefault(("", "stream", "", threads), []).append((time.perf_counter() - t0, stream.numel() * 8))
            for form_name, form in forms.items():
                for label, lib in order:
                    for name in cases:
                        times.setdefault((form_name, name, label, threads), []).append(case(form, lib, name, threads))
    for proc in spinners:
        proc.kill()
    shutil.rmtree(folder)
    rows = []
    for (form_name, name, label, threads), runs in times.items():
        gbs = statistics.median(n / t for t, n in runs) / 1e9
        ceiling = statistics.median(n / t for t, n in times[("", "stream", "", threads)]) / 1e9
        rows.append({"form": form_name, "case": name, "lib": label, "threads": threads, "gb_per_s": round(gbs, 2),
                     "of_stream_read": round(gbs / ceiling, 3)})
    if a.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{'form':10} {'case':8} {'threads':>7} {'GB/s':>7} {'of read':>8}  lib   "
          f"(median of {a.reps} x {a.copies} copies, interleaved)")
    for r in sorted(rows, key=lambda r: (r["threads"], r["form"], r["case"], r["lib"])):
        print(f"{r['form']:10} {r['case']:8} {r['threads']:7} {r['gb_per_s']:7.2f} {r['of_stream_read']:8.0%}  {r['lib']}")


if __name__ == "__main__":
    main()
