"""Static SASS of the sub-1-bit code kernel for the H200 (sm_90), compiled here without a GPU.

    PYTHONPATH=src python3 benchmarks/probes/sass_code_kernel.py                 # batch-1 tiles, packed 8-bit path
    PYTHONPATH=src python3 benchmarks/probes/sass_code_kernel.py --bytewise      # the one-byte-at-a-time path
    PYTHONPATH=src python3 benchmarks/probes/sass_code_kernel.py --dump out.sass # the whole listing too

Triton compiles for a target without a device, and ships ptxas, nvdisasm and cuobjdump. For each
tile this prints the registers per thread (32 blocks of one warp fit an SM at <= 64) and the
instructions in the step loop and in the rounds loop inside it (static counts: a step runs its
rounds ~2 times on RTN-ternary mixtral matrices, profile_code_kernel.py counts them), which is how
the batch-1 path was cut from 329 to 229 instructions per step of two rounds (tile (4, 32, 1))
before it was timed on the GPU.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/: common (moekit from src/)
import common  # noqa: E402,F401

from moekit.quant.code import ROW_BLOCK  # noqa: E402
from moekit.quant.kernels.code_matmul import code_matmul_kernel  # noqa: E402

TILES = [(4, 32, 1), (2, 64, 1), (1, 128, 1), (8, 32, 1), (8, 32, 2), (4, 128, 4)]
TOOLS = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin")


def compile_tile(block_r: int, words: int, warps: int, chunk: int, packed: bool, dict_bits: int = 8):
    """Returns the compiled batch-1 code_matmul_kernel for one tile (sm_90)."""
    sig = {"xt_ptr": "*bf16", "words_ptr": "*u8" if dict_bits == 8 else "*i16", "starts_ptr": "*i16",
           "chunks_ptr": "*u8", "offsets_ptr": "*i32", "lo_ptr": "*fp16", "hi_ptr": "*fp16", "table_ptr": "*i64",
           "out_ptr": "*bf16", "B": "i32", "R": "i32", "K": "i32", "stride_xk": "constexpr", "stride_ob": "i32"}
    const = {"stride_xk": 1, "W": chunk, "WP": chunk, "CHUNKS_PER_STEP": max(1, words // chunk),
             "ROW_BLOCK": ROW_BLOCK, "BLOCK_B": 1, "BLOCK_R": block_r, "HW_POPC": True, "PACKED": packed}
    sig.update({k: "constexpr" for k in const})
    return triton.compile(ASTSource(code_matmul_kernel, sig, const), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": warps})


def _tool(name: str, cubin: bytes, *args: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([os.path.join(TOOLS, name), *args, f.name], capture_output=True, text=True,
                              check=True).stdout


def loop_sizes(sass: str) -> list[int]:
    """Returns the instruction count of every loop (a backward branch to a label), innermost first."""
    index, count, sizes = {}, 0, []
    for line in sass.splitlines():
        s = line.strip()
        if s.startswith(".L_x_") and s.endswith(":"):
            index[s[:-1]] = count
        elif s.startswith("/*") and ";" in s:
            if "BRA" in s and "`(" in s:
                label = s.split("`(")[1].split(")")[0]
                if label in index:
                    sizes.append(count - index[label] + 1)
            count += 1
    return sizes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bytewise", action="store_true", help="the path for unaligned or 16-bit codewords")
    ap.add_argument("--chunk", type=int, default=32, help="codewords per chunk (W)")
    ap.add_argument("--dump", default=None, help="write the first tile's SASS here")
    args = ap.parse_args()
    for i, (br, words, warps) in enumerate(TILES):
        k = compile_tile(br, words, warps, args.chunk, packed=not args.bytewise)
        cubin = k.asm["cubin"]
        sass = _tool("nvdisasm", cubin, "-c")
        regs = [l.split("REG:")[1].split()[0] for l in _tool("cuobjdump", cubin, "--dump-resource-usage").splitlines()
                if "REG:" in l]
        sizes = loop_sizes(sass)
        rounds, step = (sizes[0], sizes[1]) if len(sizes) > 1 else (None, None)
        print(f"tile {(br, words, warps)}: {regs[0] if regs else '?'} registers, step loop {step} instructions "
              f"(rounds loop {rounds} of them)")
        if args.dump and i == 0:
            with open(args.dump, "w") as f:
                f.write(sass)


if __name__ == "__main__":
    main()
