"""CGOPipe's overlap, checked without a GPU: a decode step of the bundled tiny model with paged
experts records its issue order (PipelinedDecoder(trace=[])); the order is checked directly (the
next MoE layer's pages are queued before the launch thread waits for the next attention result;
a page waits only for the last expert call of the layer whose buffer it takes), and replayed on
model resources (moekit.pipeline.timeline.replay) with an H200-like cost per op: a step must come
near L x max(h2d, cpu, gpu) per layer, where the order before (pages behind the compute queued
so far, attention outputs in the pages' FIFO, the first pages carrying whole experts) is not."""

from __future__ import annotations

import pytest
import torch

from moekit.generate import forward_step
from moekit.kv_cache import PagedKVCache
from moekit.load import load_model
from moekit.pipeline.cgopipe import PipelinedDecoder
from moekit.pipeline.paged import PagedLoader
from moekit.pipeline.timeline import replay

SEQUENCES, MICRO_BATCH = 8, 2  # 4 micro-batches a layer
# ms per op; per layer (4 micro-batches): pages 4 x 1.6 = 6.4 (h2d), attention 4 x 1.0 (cpu),
# post + pre 4 x 0.75 = 3.0 (gpu) -- the H200 run's ratios (25.5 : 16 : 11)
COSTS = {"pre": 0.05, "d2h": 0.02, "attn": 1.0, "loadh": 0.02, "page": 1.6, "post": 0.7, "issue": 0.005}


def traced_steps(lookahead=None, steps=3) -> tuple[list[list], PipelinedDecoder]:
    """Returns the traces of `steps` decode steps (the first one loads layer 0 whole) and the decoder."""
    model = load_model(device="cpu", dtype="float32", experts=PagedLoader(resident=4))
    cache = PagedKVCache.for_tokens(model.config, 1024, 16, "cpu", torch.float32)
    prompts = [[5 + s, 17, 300, 42 + s] for s in range(SEQUENCES)]
    with torch.inference_mode():
        tokens = forward_step(model, cache, [(i, 0, p) for i, p in enumerate(prompts)]).argmax(-1).tolist()
    trace: list = []
    traces = []
    decoder = PipelinedDecoder(model, cache, MICRO_BATCH, lookahead=lookahead, trace=trace)
    try:
        for step in range(steps):
            trace.clear()
            logits = decoder.step([(i, len(p) + step, tokens[i]) for i, p in enumerate(prompts)])
            tokens = logits.argmax(-1).tolist()
            traces.append(list(trace))
    finally:
        decoder.close()
    assert model.expert_runtime.trace is None  # close() detaches the runtime
    return traces, decoder


def chained(traces: list[list], layers: int) -> list:
    """Returns the steps' traces as one, layer indices made global (step s's layer i is s * L + i)
    and a "sync" between steps (the logits' host copy): a page queued during layer i for a layer
    m <= i is the next step's, and a page waits for the latest layer m's last expert call."""
    out = []
    for s, trace in enumerate(traces):
        current = -1
        for op, key, waits in trace:
            if op == "page":
                m, p = key
                key = ((s + (m <= current)) * layers + m, p)
                waits = tuple(("read", max(g for g in range(key[0]) if g % layers == w[1]) if any(
                    g % layers == w[1] for g in range(key[0])) else -1) for w in waits)
            else:
                current = key[0]
                key = (s * layers + key[0], key[1])
                waits = tuple((w[0], s * layers + w[1]) if w[0] == "weights"
                              else (w[0], (s * layers + w[1][0], w[1][1])) for w in waits)
            out.append((op, key, waits))
        out.append(("sync", None, ()))
    return out


def step_ms(traces: list[list], layers: int, costs: dict, **kw) -> float:
    """Returns the last step's replayed duration: between the ends of the last two steps' last PostAttn."""
    done = replay(chained(traces, layers), costs, **kw)["done"]
    ends = [max(t for (op, key), t in done.items() if op == "post" and key[0] == (s + 1) * layers - 1)
            for s in range(len(traces))]
    return ends[-1] - ends[-2]


@pytest.fixture(scope="module")
def trace_and_decoder():
    return traced_steps()


def test_pages_are_queued_before_the_launch_thread_waits(trace_and_decoder):
    traces, decoder = trace_and_decoder
    trace = traces[-1]
    runtime = decoder.model.expert_runtime
    n = SEQUENCES // MICRO_BATCH
    position = {(op, key): at for at, (op, key, _) in enumerate(trace)}
    layers = len(decoder.model.layers)
    for i in range(layers):
        nxt = runtime.next_layer(i)
        for j in range(n - 1):
            # page j + 1 of the next layer is on the weight stream before the launch thread blocks
            # for the attention of micro-batch j + 1 (and all of them before layer i + 1's first)
            assert position[("page", (nxt, j + 1))] < position[("wait_attn", (i, j + 1))]
        if i + 1 < layers:
            assert max(position[("page", (nxt, p))] for p in range(n)) < position[("wait_attn", (i + 1, 0))]
    # the launch thread's only waits are for attention results, one per task
    assert sum(op == "wait_attn" for op, _, _ in trace) == layers * n


def test_a_page_waits_only_for_the_evicted_layers_last_expert_call(trace_and_decoder):
    traces, decoder = trace_and_decoder
    trace = traces[-1]
    layers = decoder.model.expert_runtime.layers
    for op, (layer, page), waits in (e for e in trace if e[0] == "page"):
        if page == 0:  # the first page issued of a layer takes the buffer: two MoE layers back is done with it
            evicted = layers[layers.index(layer) - 2]
            assert set(waits) == {("read", evicted), ("read", layer)}
        else:
            assert waits == ()
    for op, key, waits in trace:  # attention outputs wait only for their own attention
        if op == "loadh":
            assert waits == (("attn", key),)


def test_replayed_step_is_near_the_slowest_resource(trace_and_decoder):
    traces, decoder = trace_and_decoder
    layers = len(decoder.model.layers)
    n = SEQUENCES // MICRO_BATCH
    per_layer = {"h2d": n * COSTS["page"], "cpu": n * COSTS["attn"], "gpu": n * (COSTS["post"] + COSTS["pre"])}
    bound = layers * max(per_layer.values())
    serial = layers * sum(per_layer.values())
    now = step_ms(traces, layers, COSTS)
    # the order before: the artifact's lookahead of 2, pages expert-aligned (4 streamed experts in
    # 16 micro-batches on the H200: the first pages carry whole experts, here the first half two
    # each), every page behind all the compute queued when it was issued, attention outputs in the
    # pages' FIFO
    before, _ = traced_steps(lookahead=2)
    before = [[(op, key, (("queued", "gpu"),) if op == "page" else waits) for op, key, waits in t] for t in before]
    front = {**COSTS, "page": lambda key: 2 * COSTS["page"] if key[1] < n // 2 else 0.0}
    old = step_ms(before, layers, front, resources={"loadh": "weights"})
    print(f"replayed step: {now:.1f} ms (bound {bound:.1f}, serial {serial:.1f}); the order before {old:.1f} ms")
    assert bound * 0.95 <= now <= 1.15 * bound
    assert old >= 1.3 * now


@pytest.mark.parametrize("attn_ms", [0.5, 2.5])
def test_replay_follows_the_bound_resource(trace_and_decoder, attn_ms):
    """CPU attention cheaper or dearer than the pages: the step follows whichever is slower."""
    traces, decoder = trace_and_decoder
    layers = len(decoder.model.layers)
    n = SEQUENCES // MICRO_BATCH
    costs = {**COSTS, "attn": attn_ms}
    bound = layers * n * max(costs["page"], costs["attn"], costs["post"] + costs["pre"])
    took = step_ms(traces, layers, costs)
    print(f"attention {attn_ms} ms a micro-batch: step {took:.1f} ms, bound {bound:.1f}")
    assert took <= 1.2 * bound


def test_artifact_lookahead_order_also_overlaps():
    """lookahead=2 (Alg. 1): CPU attention of layer i waits for layer i's weights (its PreAttn
    queues behind PostAttn(i, j - 2)), yet with pages gated only by their buffer it stays near the bound."""
    traces, decoder = traced_steps(lookahead=2)
    layers = len(decoder.model.layers)
    n = SEQUENCES // MICRO_BATCH
    bound = layers * n * max(COSTS["page"], COSTS["attn"], COSTS["post"] + COSTS["pre"])
    took = step_ms(traces, layers, COSTS)
    print(f"lookahead 2: step {took:.1f} ms, bound {bound:.1f}")
    assert took <= 1.3 * bound


def test_replay_by_hand():
    trace = [("pre", (0, 0), ()), ("d2h", (0, 0), (("pre", (0, 0)),)), ("attn", (0, 0), (("d2h", (0, 0)),)),
             ("page", (1, 0), (("read", 9),)), ("wait_attn", (0, 0), ()),
             ("loadh", (0, 0), (("attn", (0, 0)),)), ("post", (0, 0), (("loadh", (0, 0)), ("weights", 0)))]
    r = replay(trace, {"pre": 1, "d2h": 1, "attn": 3, "page": 10, "loadh": 1, "post": 2})
    assert r["done"][("attn", (0, 0))] == 5 and r["done"][("page", (1, 0))] == 10
    assert r["done"][("post", (0, 0))] == 8 and r["launch_blocked"] == 5 and r["end"] == 10
    assert r["busy"] == {"gpu": 3, "d2h": 1, "cpu": 3, "weights": 10, "h2d": 1}
