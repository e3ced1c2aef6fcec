"""The per-slot decode expert kernels (moekit.kernels.moe_slots) compiled for a Hopper GPU (sm_90)
without one, at the shapes and tiles moekit launches: the interpreter the other tests run them
under accepts code the compiler rejects (a constexpr named in a static loop, for one), and a tile
that spills to local memory would be slow. Needs triton with its NVIDIA backend (ptxas,
cuobjdump), not a GPU; the builds run in one child process without TRITON_INTERPRET."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: sm90_build (the child too)
from sm90_build import assert_no_spills, resource_usage

pytestmark = pytest.mark.slow

# (kernel, K, A, BLOCK_N, BLOCK_K, warps, OFFSETS, SLOTS_PER_STEP, SKIP): the defaults at OLMoE (K within
# one step), DeepSeek-V2-Lite's down (K = 1408: split tail, or one masked step at BLOCK_K 2048), the
# offload path's offsets, one slot a step, Mixtral's 14-step K loop, and the CPU partner's skipping
# variants (offload.partner) at the Qwen3 shape's tiles
CASES = [("gate_up", 2048, 8, 4, 1024, 4, False, None, False), ("gate_up", 2048, 6, 8, 1024, 4, True, None, False),
         ("down", 1024, 8, 1, 1024, 4, False, 8, False), ("down", 1408, 6, 1, 1024, 4, False, 8, False),
         ("down", 1408, 6, 1, 2048, 4, False, 8, False), ("down", 1408, 6, 1, 1024, 4, True, 8, False),
         ("down", 1024, 8, 4, 1024, 4, False, 1, False), ("down", 14336, 2, 1, 1024, 4, False, 2, False),
         ("gate_up", 2048, 8, 2, 2048, 4, True, None, True), ("down", 768, 8, 2, 1024, 4, True, 8, True)]


def build(case: tuple) -> str:
    """Returns cuobjdump's resource line of `case` built for sm_90 (raises where the compiler rejects it)."""
    from moekit.kernels import moe_slots

    kind, k, top_k, bn, bk, warps, offsets, per_step, skip = case
    bf16, ids = "*bf16", "*i64"
    if kind == "gate_up":
        kernel = moe_slots.slot_gate_up_swiglu_kernel
        args = {"x_ptr": bf16, "expert_ids_ptr": ids, "w_ptr": bf16, "off_ptr": ids, "out_ptr": bf16, "FFN": "i32",
                "UP": "i32"}
        constexprs = {}
    else:
        kernel = moe_slots.slot_down_kernel
        args = {"h_ptr": bf16, "expert_ids_ptr": ids, "weights_ptr": bf16, "w_ptr": bf16, "off_ptr": ids,
                "out_ptr": bf16, "N": "i32"}
        constexprs = {"SLOTS_PER_STEP": per_step}
    constexprs |= {"TOP_K": top_k, "K": k, "BLOCK_N": bn, "BLOCK_K": bk, "OFFSETS": offsets, "SKIP": skip}
    # as a launch specializes: tensors 16-byte aligned, widths and strides multiples of 16 (not stride_off)
    return resource_usage(kernel, args, constexprs, warps, aligned=lambda name, kind: kind.startswith("*") or name in (
        "FFN", "UP", "N") or (name.startswith("stride") and name != "stride_off"))


def test_slot_kernels_compile_for_sm90_without_spills():
    from conftest import (
        build_without_interpreter,  # here: this file runs as the child too, where conftest must not load
    )

    build_without_interpreter([__file__])


if __name__ == "__main__":
    for case in CASES:
        assert_no_spills(case, build(case))
    sys.exit(0)
