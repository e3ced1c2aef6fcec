"""Paged experts (moekit.pipeline.paged): R experts per layer resident, the rest streamed into two
device buffers page by page. The model gives its resident self's logits and tokens under
moekit.generate (layers loaded whole) and under CGOPipe (pages in step with micro-batches, none
loaded late after the first step)."""

from __future__ import annotations

import pytest
import torch

from moekit.errors import MoekitError
from moekit.generate import generate_ragged
from moekit.load import load_model
from moekit.pipeline.cgopipe import generate_pipelined
from moekit.pipeline.paged import PagedLoader, PagedRuntime

PROMPTS = [[5, 17, 300, 42, 9, 11, 7], [1000, 3], [77] * 20, [8, 9, 10, 11, 12], [2048, 1, 4095, 31]]


@pytest.fixture(scope="module")
def resident():
    return load_model(device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def expected(resident):
    return [t.tolist() for t in generate_ragged(resident, PROMPTS, max_new_tokens=6, temperature=0.0,
                                                stop_at_eos=False)]


@pytest.mark.parametrize("keep", [0, 3, 8])
def test_paged_model_equals_resident_under_generate(resident, expected, keep):
    paged = load_model(device="cpu", dtype="float32", experts=PagedLoader(resident=keep))
    assert isinstance(paged.expert_runtime, PagedRuntime)
    ids = torch.tensor([PROMPTS[0]])
    assert torch.equal(paged(ids), resident(ids))
    got = generate_ragged(paged, PROMPTS, max_new_tokens=6, temperature=0.0, stop_at_eos=False)
    assert [t.tolist() for t in got] == expected
    if keep < 8:
        assert paged.expert_runtime.whole_loads > 0


def test_pipelined_pages_arrive_with_the_micro_batches(expected):
    from moekit.generate import forward_step
    from moekit.kv_cache import PagedKVCache
    from moekit.pipeline.cgopipe import PipelinedDecoder

    paged = load_model(device="cpu", dtype="float32", experts=PagedLoader(resident=3))
    runtime = paged.expert_runtime
    got = generate_pipelined(paged, PROMPTS, max_new_tokens=6, micro_batch=2)
    assert [t.tolist() for t in got] == expected
    # step by step: after the first step (its prologue loads the first layer's pages) every
    # layer's 3 pages (5 streamed experts cut 2 + 2 + 1) arrive with the 3 micro-batches, none late
    cache = PagedKVCache.for_tokens(paged.config, 512, 16, "cpu", torch.float32)
    with torch.inference_mode():
        tokens = forward_step(paged, cache, [(i, 0, p) for i, p in enumerate(PROMPTS)]).argmax(-1).tolist()
    decoder = PipelinedDecoder(paged, cache, micro_batch=2)
    layers = len(runtime.layers)
    for step in range(4):
        if step == 1:
            whole, pages = runtime.whole_loads, runtime.pages_loaded
        logits = decoder.step([(i, len(p) + step, tokens[i]) for i, p in enumerate(PROMPTS)])
        tokens = logits.argmax(-1).tolist()
        assert tokens == [e[step + 1] for e in expected]
    decoder.close()
    assert runtime.whole_loads == whole and runtime.pages_loaded - pages == 3 * layers * 3
    assert runtime.page_range(runtime.layers[0], 2, 3) == (7, 8)


def test_refuses_more_resident_experts_than_a_layer_has():
    with pytest.raises(MoekitError, match="resident experts per layer"):
        load_model(device="cpu", dtype="float32", experts=PagedLoader(resident=9))


@pytest.mark.parametrize("num_layers,pages", [(3, 2), (1, 3), (2, 1)])
def test_buffers_alternate_over_any_layer_count(num_layers, pages):
    """The engine's order (pages of the next MoE layer during this one, wrapping to the first) keeps
    every layer's experts right, whatever the parity of the layer count or the pages."""
    from moekit.experts.forms import DenseForm
    from moekit.offload.layout import layout_for

    form = DenseForm(16, 8, torch.float32)
    layout = layout_for(form, list(range(num_layers)))
    g = torch.Generator().manual_seed(0)
    stores = {i: {"gate_up": torch.randn(5, 16, 16, generator=g), "down": torch.randn(5, 16, 8, generator=g)}
              for i in range(num_layers)}
    runtime = PagedRuntime(layout, stores, resident=2, device="cpu")
    x = torch.randn(4, 16, generator=g)
    ids = torch.tensor([[0, 4], [3, 1], [2, 4], [3, 0]])
    w = torch.rand(4, 2, generator=g)
    for _ in range(3):  # steps
        for layer in range(num_layers):
            for j in range(pages):
                runtime.load_page(runtime.next_layer(layer), j, pages)
                torch.testing.assert_close(runtime.run(layer, x, ids, w), form.run(x, ids, w, stores[layer]))
    assert runtime.whole_loads <= 1  # only a layer cut short before its first call (one MoE layer)


def test_zigzag_prefill_loads_each_layer_once(expected):
    from moekit.kv_cache import PagedKVCache
    from moekit.pipeline.cgopipe import prefill_to_host

    paged = load_model(device="cpu", dtype="float32", experts=PagedLoader(resident=3))
    host = PagedKVCache.for_tokens(paged.config, 256, 16, "cpu", torch.float32)
    with torch.inference_mode():
        first = prefill_to_host(paged, host, PROMPTS, micro_batch=2).argmax(-1).tolist()
    assert first == [e[0] for e in expected]
    runtime = paged.expert_runtime
    # each layer queued whole, ahead of its call (none loaded at its call), once -- not once per
    # micro-batch -- and the decode's first layer after the last
    assert runtime.whole_loads == 0 and runtime.pages_loaded == len(runtime.layers) + 1


def test_per_layer_resident_counts_place_and_page_each_layer():
    """Counts that differ by layer (one full, one streaming all, one between): the slab holds each
    layer's own resident slots and two buffers of the widest stream; every call equals the dense
    reference through the engine's page order, a full layer loads no page, and bad counts get one line."""
    from moekit.experts.forms import DenseForm
    from moekit.offload.layout import layout_for

    form = DenseForm(16, 8, torch.float32)
    layout = layout_for(form, [0, 1, 2])
    g = torch.Generator().manual_seed(1)
    stores = {i: {"gate_up": torch.randn(5, 16, 16, generator=g), "down": torch.randn(5, 16, 8, generator=g)}
              for i in range(3)}
    runtime = PagedRuntime(layout, stores, resident=[5, 0, 2], device="cpu")
    assert runtime.resident == (5, 0, 2) and runtime.streamed == 5 and runtime.buffer_start == [7, 12]
    assert runtime.slab["gate_up"].shape[0] == 7 + 2 * 5
    assert [runtime.streamed_bytes(m) for m in range(3)] == [0, 5 * 384 * 4, 3 * 384 * 4]
    assert runtime.page_range(2, 0, 2) == (2, 4) and runtime.report()["resident_total"] == 7
    x = torch.randn(4, 16, generator=g)
    ids = torch.tensor([[0, 4], [3, 1], [2, 4], [3, 0]])
    w = torch.rand(4, 2, generator=g)
    for _ in range(3):
        for layer in range(3):
            for j in range(2):
                runtime.load_page(runtime.next_layer(layer), j, 2)
            torch.testing.assert_close(runtime.run(layer, x, ids, w), form.run(x, ids, w, stores[layer]))
    # layers 1 and 2 page 2 pages each ahead of their first call and then keep a buffer each (two
    # streaming layers, two buffers: nothing evicts them); layer 0 never pages
    assert 0 not in runtime.pages_done and runtime.whole_loads == 0 and runtime.pages_loaded == 2 * 2
    assert PagedRuntime(layout, stores, resident=2, device="cpu").resident == 2  # one count for all, as before
    with pytest.raises(MoekitError, match="2 counts given for 3 MoE layers"):
        PagedRuntime(layout, stores, resident=[1, 2], device="cpu")
    with pytest.raises(MoekitError, match="must be in 0..5, got 6 for layer 1"):
        PagedRuntime(layout, stores, resident=[1, 6, 0], device="cpu")
