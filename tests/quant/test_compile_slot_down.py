"""The compressed down kernels with the top-k sum (quant.kernels int_slot_down_kernel,
code_slot_down_kernel) compiled for a Hopper GPU (sm_90) without one, at the decode shapes and
tiles moekit launches: the interpreter the other tests run them under accepts code the compiler
rejects, and a tile that spills to local memory would be slow (the int kernel unrolls its A slots,
so its registers grow with A). Needs triton with its NVIDIA backend (ptxas, cuobjdump), not a GPU;
the builds run in one child process without TRITON_INTERPRET."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: sm90_build (the child too)
from sm90_build import assert_no_spills, resource_usage

pytestmark = pytest.mark.slow

# int4 group 128 (SCALE_MODE 2: one scale per word): (A, words per row, BLOCK_N, BLOCK_K, warps) at
# Qwen3-30B-A3B's down (K = 768, A = 8) and Mixtral's (K = 14336, A = 2), default and tuner tiles
INT_CASES = [(8, 96, 4, 1024, 4), (8, 96, 1, 1024, 4), (8, 96, 8, 512, 4), (2, 1792, 4, 1024, 4)]
# 8-bit codewords read four to an int32 (PACKED): (A, codewords per chunk W, BLOCK_R, words per step, warps)
CODE_CASES = [(8, 32, 4, 32, 1), (8, 32, 1, 128, 1), (2, 64, 1, 128, 1), (2, 64, 4, 32, 1)]


def builds():
    """Yields (case, cuobjdump's resource line) of every case."""
    from moekit.quant.kernels import code_matmul, int_matmul

    shared = {"h_ptr": "*bf16", "ids_ptr": "*i64", "weights_ptr": "*bf16"}
    int_args = shared | {"q_ptr": "*i32", "scale_ptr": "*fp16", "zero_ptr": "*u8", "out_ptr": "*bf16", "R": "i32",
                         "K": "i32", "GROUP_COLS": "i32"}
    for top_k, words, bn, bk, warps in INT_CASES:
        constexprs = {"TOP_K": top_k, "NUM_WORDS": words, "BITS": 4, "LANES": 8, "SCALE_MODE": 2, "BLOCK_N": bn,
                      "BLOCK_KW": bk // 8}
        yield ("int", top_k, words, bn, bk, warps), resource_usage(int_matmul.int_slot_down_kernel, int_args, constexprs, warps)
    code_args = shared | {"words_ptr": "*u8", "starts_ptr": "*i16", "chunks_ptr": "*u8", "offsets_ptr": "*i32",
                          "lo_ptr": "*fp16", "hi_ptr": "*fp16", "table_ptr": "*i64", "out_ptr": "*bf16", "R": "i32",
                          "K": "i32"}
    for top_k, w, br, step, warps in CODE_CASES:
        constexprs = {"TOP_K": top_k, "W": w, "WP": w, "CHUNKS_PER_STEP": max(1, step // w), "ROW_BLOCK": 16,
                      "BLOCK_R": br, "HW_POPC": True, "PACKED": True}
        yield ("code", top_k, w, br, step, warps), resource_usage(code_matmul.code_slot_down_kernel, code_args,
                                                                  constexprs, warps)


def test_slot_down_kernels_compile_for_sm90_without_spills():
    # imported here: this file runs as the child too, where conftest must not load
    from conftest import build_without_interpreter

    build_without_interpreter([__file__])


if __name__ == "__main__":
    for case, usage in builds():
        assert_no_spills(case, usage)
    sys.exit(0)
