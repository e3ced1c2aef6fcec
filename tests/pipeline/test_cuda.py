"""The pipeline on a GPU (skipped without CUDA; a few seconds on one): CGOPipe with q/k/v and
attention outputs crossing on their own streams, CPU attention from the host pool, experts
resident or paged into the double buffer on the H2D stream -- greedy tokens against the
sequential engine (moekit.generate's ragged decode, all on the device) for the bundled tiny model
in float32. The agreement fraction is printed (pytest -s) and must be high; exact equality is not
asked for: the CPU attention kernel and the device's sum in another order."""

from __future__ import annotations

import pytest
import torch

from moekit.generate import generate_ragged
from moekit.load import load_model
from moekit.pipeline.cgopipe import generate_pipelined
from moekit.pipeline.paged import PagedLoader

PROMPTS = [[5, 17, 300, 42, 9, 11, 7], [1000, 3], [77] * 20, [8, 9, 10, 11, 12], [2048, 1, 4095, 31]]
NEW_TOKENS = 8


def agreement(got: list[list[int]], want: list[list[int]]) -> float:
    """Returns the share of positions whose tokens agree, each sequence counted up to its first
    disagreement (after it the two continue from different tokens)."""
    same = 0
    for g, w in zip(got, want):
        for a, b in zip(g, w):
            if a != b:
                break
            same += 1
    return same / sum(len(w) for w in want)


@pytest.fixture(scope="module")
def expected():
    model = load_model(device="cuda", dtype="float32")
    return [t.tolist() for t in generate_ragged(model, PROMPTS, max_new_tokens=NEW_TOKENS, temperature=0.0,
                                                stop_at_eos=False)]


@pytest.mark.gpu
@pytest.mark.parametrize("resident,micro_batch", [(None, 2), (3, 2), (0, 5)])
def test_cuda_pipeline_agrees_with_the_sequential_engine(expected, resident, micro_batch):
    experts = None if resident is None else PagedLoader(resident=resident)
    model = load_model(device="cuda", dtype="float32", experts=experts)
    got = [t.tolist() for t in generate_pipelined(model, PROMPTS, max_new_tokens=NEW_TOKENS, micro_batch=micro_batch)]
    share = agreement(got, expected)
    print(f"CUDA pipeline (resident {resident}, micro-batch {micro_batch}): {100 * share:.1f}% of greedy tokens "
          "agree with the sequential engine")
    assert share >= 0.9, f"{got} vs {expected}"
    if resident is not None:
        runtime = model.expert_runtime
        assert runtime.pages_loaded > 0 and runtime.whole_loads <= len(runtime.layers)  # the prefill's, no more
        assert all(t.is_pinned() for store in runtime.stores.values() for t in store.values())
    torch.cuda.synchronize()


def test_agreement_counts_up_to_the_first_difference():
    assert agreement([[1, 2, 3], [4, 5]], [[1, 2, 3], [4, 5]]) == 1.0
    assert agreement([[1, 9, 3], [4, 5]], [[1, 2, 3], [4, 5]]) == 3 / 5


@pytest.mark.gpu
def test_cuda_step_profile_times_pages_and_layers(expected):
    """The step profile on CUDA: per-layer compute-stream times, each MoE layer's weight-page span,
    the attention-output loads; the tokens unchanged by profiling."""
    from moekit.pipeline.timeline import StepProfile

    model = load_model(device="cuda", dtype="float32", experts=PagedLoader(resident=3))
    profile = StepProfile(cuda=True)
    got = [t.tolist() for t in generate_pipelined(model, PROMPTS, max_new_tokens=NEW_TOKENS, micro_batch=2,
                                                  profile=profile)]
    assert agreement(got, expected) >= 0.9
    summary = profile.summary()
    assert summary["steps"] == NEW_TOKENS - 2  # the first decode step left out
    assert len(summary["layer_ms"]) == len(model.layers) and all(ms >= 0 for ms in summary["layer_ms"])
    assert summary["copy_span_ms_mean"] > 0 and summary["copy_gb_s_mean"] > 0
    assert 0 <= summary["loadh_ms_mean"] <= summary["loadh_ms_max"]
    # the expert calls' GPU time: every MoE layer's, within the compute stream's step
    assert len(summary["experts_gpu_ms_per_layer"]) == len(model.expert_runtime.layers)
    assert 0 < summary["experts_gpu_ms"] <= summary["gpu_step_ms"]
    assert model.expert_runtime.copy_timing is False and model.expert_runtime.copy_spans == []
    assert model.expert_runtime.expert_spans == []


@pytest.mark.gpu
def test_shared_host_and_expert_kernel_probes():
    """The machine's two optional levels: host memory read by the DMA and the CPU at once (each part
    positive, the level their sum), and the grouped expert kernels' weight bytes/s (positive, and not
    above twice the HBM copy rate: the copy counts a read and a write)."""
    from moekit import native
    from moekit.pipeline.machine import profile_experts, profile_gpu, profile_shared

    if native.library() is not None:
        shared = profile_shared("cuda", nbytes=1 << 26)
        assert shared["h2d_shared"] > 0 and shared["cpu_read_shared"] > 0
        assert shared["host_shared_bandwidth"] == pytest.approx(shared["h2d_shared"] + shared["cpu_read_shared"])
    rate = profile_experts(256, 512, 8, 2, 32)
    assert 0 < rate <= 2 * profile_gpu("cuda")["gpu_bandwidth"]
