"""The fused MLA, sink-attention, router and SwiGLU kernels compiled for a Hopper GPU (sm_90)
without one: the interpreter the other tests run them under accepts code the compiler rejects
(pointer and mask shapes, loop bounds, constexpr use), so each is built here to a cubin at
DeepSeek-V2-Lite / V3 and gpt-oss-20b widths. Needs triton with its NVIDIA backend (ptxas), not a
GPU. Each build runs in a child process without TRITON_INTERPRET (conftest sets it, and
@triton.jit then gives interpreted functions)."""

from __future__ import annotations

import sys

import pytest

# ~4 s a build (a child process compiling to a cubin): the slow set, which CI runs; the kernels'
# numerics are checked by the default set under the interpreter
pytestmark = pytest.mark.slow

NAMES = ("grouped_topk_v2_groups", "grouped_topk_v3", "mla_attention", "mla_attention_gemms_outside",
         "mla_attention_paged", "mla_project", "mla_project_v3_rotate_half", "sink_attention_full",
         "sink_attention_paged", "sink_attention_window", "swiglu",
         "mla_split", "mla_split_paged", "mla_split_v3", "mla_combine")


def cases() -> dict:
    """Returns {name: (kernel, runtime argument types, constexprs, warps)} as moekit.fused launches them."""
    from moekit.kernels import fused_decode, mla_decode, router_topk, sink_decode

    bf16 = "*bf16"
    attention = {"q_ptr": bf16, "w_ptr": bf16, "qlat_ptr": bf16, "lat_ptr": bf16, "rope_ptr": bf16, "kc_ptr": bf16,
                 "rc_ptr": bf16, "start_ptr": "*i64", "out_ptr": bf16, "tables_ptr": "*i64", "N": "i32", "T": "i32",
                 "S": "i32", "scale": "fp32", "stride_kc_b": "i32", "stride_kc_s": "i32", "stride_rc_b": "i32",
                 "stride_rc_s": "i32", "stride_tb": "i32", "page": "i32"}
    paged = {**attention, "start_ptr": "*i32", "tables_ptr": "*i32"}  # context lengths, block tables
    project = {"q_ptr": bf16, "kv_ptr": bf16, "w_ptr": bf16, "cos_ptr": bf16, "sin_ptr": bf16, "q_out_ptr": bf16,
               "latent_ptr": bf16, "rope_ptr": bf16, "T": "i32", "stride_q": "i32", "stride_kv": "i32",
               "stride_cos": "i32", "stride_sin": "i32", "eps": "fp32"}
    topk = {"logits_ptr": bf16, "bias_ptr": "*fp32", "ids_ptr": "*i64", "weights_ptr": "*fp32", "stride_l": "i32",
            "skip_below": "fp32", "scaling": "fp32"}
    v2_lite = {"H": 16, "DN": 128, "DR": 64, "R": 512, "DR_PAD": 64, "R_PAD": 512}
    attend = {**v2_lite, "DV": 128, "BLOCK_S": 32, "BLOCK_W": 32}
    split = {"qlat_ptr": bf16, "q_ptr": bf16, "lat_ptr": bf16, "rope_ptr": bf16, "kc_ptr": bf16, "rc_ptr": bf16,
             "start_ptr": "*i64", "tables_ptr": "*i64", "part_ptr": "*fp32", "max_ptr": "*fp32", "sum_ptr": "*fp32",
             "N": "i32", "T": "i32", "S": "i32", "scale": "fp32", "stride_kc_b": "i32", "stride_kc_s": "i32",
             "stride_rc_b": "i32", "stride_rc_s": "i32", "stride_tb": "i32", "page": "i32"}
    runs = {**v2_lite, "HEADS_BLOCK": 16, "BLOCK_S": 32, "SPLITS": 16, "DOT_FP32": False}
    sink = {"q_ptr": bf16, "k_ptr": bf16, "v_ptr": bf16, "sinks_ptr": bf16, "kc_ptr": bf16, "vc_ptr": bf16,
            "start_ptr": "*i64", "tables_ptr": "*i64", "slots_ptr": "*i64", "out_ptr": bf16, "T": "i32", "S": "i32",
            "window": "i32", "scale": "fp32", **{s: "i32" for s in ("sq_b", "sq_h", "sq_t", "sk_b", "sk_h", "sk_t",
                                                                    "sv_b", "sv_h", "sv_t", "sc_b", "sc_h", "sc_s")},
            "stride_tb": "i32", "stride_slot": "i32", "page": "i32"}
    sink_paged = {**sink, "start_ptr": "*i32", "tables_ptr": "*i32"}  # context lengths, block tables
    import torch

    from moekit import sinks

    launch = sinks.sink_launch(torch.bfloat16, 64, 8)  # gpt-oss-20b's heads, as moekit.sinks launches them
    gpt_oss_20b = {"H": 64, **{k: v for k, v in launch.items() if k not in ("num_warps", "num_stages")}}
    sink_warps = launch["num_warps"]
    return {
        "sink_attention_full": (sink_decode.sink_attention_kernel, sink,
                                {**gpt_oss_20b, "WINDOW": False, "PAGED": False, "STORE": True}, sink_warps),
        "sink_attention_window": (sink_decode.sink_attention_kernel, sink,
                                  {**gpt_oss_20b, "WINDOW": True, "PAGED": False, "STORE": True}, sink_warps),
        "sink_attention_paged": (sink_decode.sink_attention_kernel, sink_paged,
                                 {**gpt_oss_20b, "WINDOW": True, "PAGED": True, "STORE": True}, sink_warps),
        "mla_attention": (mla_decode.mla_attention_kernel, attention, {**attend, "WEIGHTS": True, "PAGED": False}, 8),
        "mla_attention_gemms_outside": (mla_decode.mla_attention_kernel, attention,
                                        {**attend, "WEIGHTS": False, "PAGED": False}, 8),
        "mla_attention_paged": (mla_decode.mla_attention_kernel, paged, {**attend, "WEIGHTS": True, "PAGED": True}, 8),
        "mla_split": (mla_decode.mla_split_kernel, split, {**runs, "PAGED": False}, 4),
        "mla_split_paged": (mla_decode.mla_split_kernel, {**split, "start_ptr": "*i32", "tables_ptr": "*i32"},
                            {**runs, "PAGED": True}, 4),
        "mla_split_v3": (mla_decode.mla_split_kernel, split, {**runs, "H": 128, "SPLITS": 2, "PAGED": False}, 4),
        "mla_combine": (mla_decode.mla_combine_kernel,
                        {"part_ptr": "*fp32", "max_ptr": "*fp32", "sum_ptr": "*fp32", "ctx_ptr": bf16, "N": "i32"},
                        {"H": 16, "R": 512, "R_PAD": 512, "SPLITS": 16, "SPLITS_PAD": 16}, 4),
        "mla_project": (mla_decode.mla_project_kernel, project,
                        {**v2_lite, "INTERLEAVE": True, "HEADS_BLOCK": 16, "DQK_PAD": 256}, 4),
        "mla_project_v3_rotate_half": (mla_decode.mla_project_kernel, project,
                                       {**v2_lite, "H": 128, "INTERLEAVE": False, "HEADS_BLOCK": 16, "DQK_PAD": 256}, 4),
        "grouped_topk_v3": (router_topk.grouped_topk_kernel, topk,
                            {"E": 256, "G": 8, "TOPK_GROUP": 4, "TOP_K": 8, "G_PAD": 8, "EG_PAD": 32, "A_PAD": 8,
                             "SIGMOID": True, "HAS_BIAS": True, "GROUP_TOP2": True, "RENORM": True, "SKIP": False}, 1),
        "grouped_topk_v2_groups": (router_topk.grouped_topk_kernel, topk,
                                   {"E": 160, "G": 8, "TOPK_GROUP": 3, "TOP_K": 6, "G_PAD": 8, "EG_PAD": 32, "A_PAD": 8,
                                    "SIGMOID": False, "HAS_BIAS": False, "GROUP_TOP2": False, "RENORM": False,
                                    "SKIP": True}, 1),
        "swiglu": (fused_decode.swiglu_kernel,
                   {"x_ptr": bf16, "y_ptr": bf16, "FFN": "i32", "stride_x": "i32", "stride_y": "i32"},
                   {"BLOCK": 1024}, 4),
    }


def build(name: str) -> None:
    """Compiles case `name` for sm_90 (raises where the compiler rejects it)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    table = cases()
    assert set(table) == set(NAMES)
    kernel, args, constexprs, warps = table[name]
    signature = dict(args) | {k: "constexpr" for k in constexprs}
    assert set(signature) == set(kernel.arg_names), f"{name}: arguments {set(kernel.arg_names) ^ set(signature)}"
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    assert compiled.asm.get("cubin"), f"{name}: no cubin"


@pytest.mark.parametrize("name", NAMES)
def test_kernel_compiles_for_sm90(name):
    from conftest import build_without_interpreter  # here: this file runs as the child too, where conftest must not load

    build_without_interpreter([__file__, name])


if __name__ == "__main__":
    build(sys.argv[1])
