"""Static SASS of the gpt-oss MXFP4 expert kernels for the H200 (sm_90), compiled here without a GPU.

    PYTHONPATH=src python3 benchmarks/probes/sass_clamped_kernels.py [--dump DIR]

For each variant at its default tiles (experts.clamped_ops: per-slot "bytes" and "words", grouped
"bytes" and "words" tiles at 128 slots) and gpt-oss-20b's K = 2880, prints the registers and spill
bytes per thread, the instructions of the K loop (the largest backward branch; static counts), the
weights a thread decodes per step, and their ratio: how the "words" kernels were cut from 19 to
5.9 instructions a weight (per-slot gate_up) before they were timed on a GPU. Each kernel reads
each weight once, so instructions per weight, not tiles, bound a batch-1 call (the H200 issues
~34e12 thread-instructions/s: at 6 a weight, a layer's 100M weights at 4 slots take ~18 us).
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/: common (moekit from src/)
import common

from moekit.experts import clamped_ops
from moekit.kernels import clamped_experts as kernels

K, TOP_K = 2880, 4
CUOBJDUMP = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
TYPES = {"rows_ptr": "*i64", "order_ptr": "*i64", "w_off_ptr": "*i64", "s_off_ptr": "*i64", "b_off_ptr": "*i64",
         "scales_ptr": "*u8", "w_ptr": "*u8", "block_expert_ptr": "*i32", "block_start_ptr": "*i32",
         "block_end_ptr": "*i32", "alpha": "fp32", "limit": "fp32"}


def launches() -> list[tuple[str, str, dict, int, int]]:
    """Returns (variant, kernel name, constexprs, num_warps, weights a program decodes per K step)."""
    (gn, gk, gw), (dn, dk, dw) = clamped_ops.SLOT_CONFIG[True], clamped_ops.SLOT_CONFIG[True]
    (wgn, wgw, wgwarps), (wdn, wdw, wdwarps) = clamped_ops.SLOT_WORDS_CONFIG
    bm, bn, bk, warps = clamped_ops.grouped_config(128, 32, True)
    slot = {"K": K, "OFFSETS": False}
    grouped = {"K": K, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "MXFP4": True, "DOT_PRECISION": "tf32"}
    out = [("slot bytes", "slot_gate_up_kernel", {**slot, "TOP_K": TOP_K, "BLOCK_N": gn, "BLOCK_K": gk, "MXFP4": True},
            gw, 2 * gn * gk),
           ("slot bytes", "slot_down_kernel", {**slot, "BLOCK_N": dn, "BLOCK_K": dk, "MXFP4": True}, dw, dn * dk),
           ("slot words", "slot_gate_up_mxfp4_kernel", {**slot, "TOP_K": TOP_K, "BLOCK_N": wgn, "BLOCK_W": wgw},
            wgwarps, 2 * wgn * 8 * wgw),
           ("slot words", "slot_down_sum_mxfp4_kernel",
            {**slot, "TOP_K": TOP_K, "TOP_K_P2": TOP_K, "BLOCK_N": wdn, "BLOCK_W": wdw}, wdwarps, TOP_K * wdn * 8 * wdw)]
    for name, tiles in (("grouped bytes", {"WORD_TILES": False, "BF16_TILES": False}),
                        ("grouped words", {"WORD_TILES": True, "BF16_TILES": True})):
        out += [(name, "grouped_gate_up_kernel", {**grouped, **tiles, "TOP_K": TOP_K}, warps, 2 * bn * bk),
                (name, "grouped_down_kernel", {**grouped, **tiles}, warps, bn * bk)]
    return out


def k_loop(sass: str) -> list[str]:
    """Returns the instructions of the largest loop (a branch back to a lower address) of a listing."""
    ins = [(int(a, 16), t.strip()) for a, t in re.findall(r"/\*([0-9a-f]{4,5})\*/\s+([^;]*);", sass)]
    spans = [(int(m.group(1), 16), a) for a, t in ins if (m := re.search(r"\bBRA\s+0x([0-9a-f]+)", t))]
    start, end = max((s, e) for s, e in spans if s < e) if any(s < e for s, e in spans) else (0, -1)
    return [t for a, t in ins if start <= a <= end]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dump", help="folder for each kernel's TTGIR and SASS")
    args = ap.parse_args()
    rows = []
    for variant, name, constexprs, warps, weights in launches():
        kernel = getattr(kernels, name)
        signature = {a: TYPES.get(a, "*bf16" if a.endswith("_ptr") else "i32")
                     for a in kernel.arg_names if a not in constexprs}
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
            cubin.write(compiled.asm["cubin"])
            cubin.flush()
            usage = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", cubin.name], capture_output=True,
                                   text=True, check=True).stdout
            sass = subprocess.run([str(CUOBJDUMP), "-sass", cubin.name], capture_output=True, text=True,
                                  check=True).stdout
        regs, stack = (int(re.search(rf"{k}:(\d+)", usage).group(1)) for k in ("REG", "STACK"))
        body = k_loop(sass)
        ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for t in body)
        per_thread = weights / (32 * warps)
        rows.append((variant, name, f"{regs}", f"{stack}", len(body), f"{per_thread:.0f}",
                     f"{len(body) / per_thread:.1f}", ", ".join(f"{o} {c}" for o, c in ops.most_common(6))))
        if args.dump:
            Path(args.dump).mkdir(parents=True, exist_ok=True)
            Path(args.dump, f"{variant.replace(' ', '_')}_{name}.txt").write_text(compiled.asm["ttgir"] + "\n" + sass)
    print(common.markdown_table(["variant", "kernel", "registers", "spill bytes", "K loop instructions",
                                 "weights / thread / step", "instructions / weight", "most common"], rows))


if __name__ == "__main__":
    main()
