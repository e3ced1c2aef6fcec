"""The CPU partner's device kernels (moekit.kernels.partner_flags, expert_gather) compiled for a Hopper GPU (sm_90)
without one: the interpreter the other tests run them under accepts code the compiler may reject
(the system-scope atomics, the polling loop). Needs triton with its NVIDIA backend (ptxas,
cuobjdump), not a GPU; the builds run in one child process without TRITON_INTERPRET."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: sm90_build (the child too)
from sm90_build import assert_no_spills, resource_usage

pytestmark = pytest.mark.slow


def builds():
    """Yields (name, cuobjdump's resource line) of each partner kernel built for sm_90 at bf16."""
    from moekit.kernels import partner_flags as k

    ints = {"hi_base": "*i64"}
    yield "post", resource_usage(k.partner_post_kernel, {
        "x_ptr": "*bf16", "w_ptr": "*fp32", "routes_ptr": "*i64", "hx_base": "*bf16", "hx_off": "i64",
        "hw_base": "*fp32", "hw_off": "i64", **ints, "hr_off": "i64", "N": "i32", "D": "i32", "S": "i32",
        "stride_xn": "i32"}, {"BLOCK_D": 1024, "BLOCK_S": 16}, 4)
    yield "ready", resource_usage(k.partner_ready_kernel, {**ints, "ready_off": "i64", "seq_ptr": "*i64"}, {}, 1)
    yield "combine", resource_usage(k.partner_combine_kernel, {
        "out_ptr": "*bf16", "ho_base": "*bf16", "ho_off": "i64", **ints, "done_off": "i64", "seq_ptr": "*i64",
        "err_off": "i64", "max_polls": "i32", "D": "i32", "stride_on": "i32"}, {"BLOCK_D": 1024}, 4)
    from moekit.kernels.expert_gather import expert_gather_kernel
    from moekit.offload.mapped import GATHER_BLOCK

    yield "gather", resource_usage(expert_gather_kernel, {
        "slab_ptr": "*i32", "srcs_ptr": "*i64", "dst_slots_ptr": "*i64", "offsets_ptr": "*i64", "words": "i32",
        "slot_words": "i32"}, {"BLOCK": GATHER_BLOCK}, 4)


def test_partner_kernels_compile_for_sm90_without_spills():
    from conftest import (
        build_without_interpreter,  # here: this file runs as the child too, where conftest must not load
    )

    build_without_interpreter([__file__])


if __name__ == "__main__":
    for name, usage in builds():
        assert_no_spills(name, usage)
    sys.exit(0)
