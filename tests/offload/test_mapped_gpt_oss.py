"""gpt-oss experts read in place (misses "mapped", offload/mapped.py): the tiny gpt-oss model, dense
(float32) and MXFP4, offloaded down to a 2-expert cache generates the resident model's greedy
tokens with its misses read through the offsets table, whose rows place every stored tensor of an
expert (weights, biases; MXFP4 blocks and scales) in its cache slot or its packed host row. On the
CPU the per-slot kernels run under TRITON_INTERPRET=1 and the host rows are ordinary tensors; the
GPU test reads page-locked host rows in place and checks that each decode step is captured whole.

Shapes: L = MoE layers, E = experts per layer, C = the form's in-place tensors.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import moekit
from moekit.experts import triton_ops
from moekit.offload import OffloadConfig, load_offloaded

from conftest import token_ids
from family_cases import budget_for

pytestmark = pytest.mark.skipif(not triton_ops.HAVE_TRITON, reason="triton not installed")


@pytest.fixture(scope="module")
def checkpoints(tiny, tmp_path_factory):
    """Returns {"dense": tiny gpt-oss (float32 experts), "mxfp4": a wider one with MXFP4 experts}."""
    from families.test_checkpoint_formats import mxfp4_copy

    mx = mxfp4_copy(tiny("gpt_oss_wide").path, tmp_path_factory.mktemp("mapped_oss") / "mxfp4")
    return {"dense": tiny("gpt_oss").path, "mxfp4": mx}


def check_table(runtime) -> None:
    """Every table row places each of its expert's tensors where the next step reads them: its cache
    slot when the mirror maps it (and the slot holds that expert's bytes), else its host row."""
    mapped = runtime.mapped
    mapped.before_step()
    table = mapped.table.cpu()
    width = len(runtime.form.in_place_tensors)
    assert mapped.names == runtime.form.in_place_tensors and table.shape[2] == width + 1
    for pos, layer in enumerate(mapped.layers):
        host = runtime.layout.view(runtime.store.layers[layer], layer)
        for e in range(runtime.model_config.experts_in(layer)):
            key, row = (layer, e), table[pos, e].tolist()
            if key in mapped.mapped:
                slot = mapped.mapped[key]
                assert row == [slot * step for step in mapped.slot_offsets] + [e + mapped.num_experts], key
                for name, t in mapped.stacked.items():
                    assert torch.equal(t[slot].cpu(), host[name][e]), (key, name)
            else:
                assert row == mapped.host_rows[pos, e].tolist(), key
                for c, name in enumerate(mapped.names):  # the offset lands on this expert's host row
                    base = mapped.stacked[name]
                    assert base.data_ptr() + row[c] * base.element_size() == host[name][e].data_ptr(), (key, name)


@pytest.mark.parametrize("fmt", ["dense", pytest.param("mxfp4", marks=pytest.mark.slow)])  # mxfp4: ~18 s interpreted
def test_greedy_equals_resident_reading_misses_in_place(checkpoints, fmt):
    if not triton_ops.triton_usable(torch.empty(0)):
        pytest.skip("the CPU tests of the mapped path need TRITON_INTERPRET=1 (the gpu test covers CUDA)")
    path = checkpoints[fmt]
    ids = token_ids(1, 6, seed=5)
    resident = moekit.load_model(path).generate(ids, max_new_tokens=8, temperature=0, eos_token_ids=())
    config = OffloadConfig(context_tokens=24, store="host", misses="mapped", predictor="none")
    model = load_offloaded(path, offload=dataclasses.replace(config, device_memory=budget_for(path, config, 2)))
    runtime = model.offload
    assert runtime.misses == "mapped", runtime.misses_note
    assert runtime.mapped is not None, "the in-place self-test failed"  # new_cache drops it when it does
    assert runtime.cache.num_slots == 2 and runtime.form.reads_in_place
    assert torch.equal(model.generate(ids, max_new_tokens=8, temperature=0, eos_token_ids=()), resident)
    check_table(runtime)
    report = runtime.report()
    assert report["lookups"] == report["hits"] + report["demand_fetches"] + report["mapped_reads"]
    assert report["mapped_reads"] > 0 and report["admissions"] > 0 and report["hits"] > 0, report
    assert report["decode_tokens"] == 7


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["dense", "mxfp4"])
def test_gpu_steps_are_captured_whole_and_match_resident(checkpoints, fmt):
    """On CUDA: a 2-slot cache (misses every step, admissions between steps) reading the rest from
    page-locked host rows; every decode step one CUDA graph, the resident model's greedy tokens."""
    from moekit.generate import GenerationStats

    path = checkpoints[fmt]
    ids = token_ids(1, 8, seed=5)
    expected = moekit.load_model(path, device="cuda", dtype="float32").generate(
        ids, max_new_tokens=16, temperature=0, eos_token_ids=())
    model = load_offloaded(path, device="cuda", dtype="float32", offload=OffloadConfig(
        context_tokens=32, misses="mapped", predictor="none"))
    runtime = model.offload
    runtime.new_cache(2)  # what the unbudgeted plan cached (every expert) cut to 2 slots, with a new table
    assert runtime.misses == "mapped" and runtime.mapped is not None, runtime.misses_note
    stats = GenerationStats()
    got = model.generate(ids, max_new_tokens=16, temperature=0, eos_token_ids=(), stats=stats)
    assert stats.extra.get("graph") == "whole", stats.extra
    assert torch.equal(got, expected)
    check_table(runtime)
    report = runtime.report()
    assert report["mapped_reads"] > 0 and report["lookups"] == report["hits"] + report["demand_fetches"] + \
        report["mapped_reads"], report
