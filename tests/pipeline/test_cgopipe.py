"""CGOPipe decode steps on the CPU (moekit.pipeline.cgopipe): micro-batches layer by layer, CPU
attention from the host KV pool, experts through the seam -- the same greedy tokens as
moekit.generate's ragged decode for the bundled tiny model, whatever the micro-batch size."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moekit.errors import MoekitError
from moekit.generate import generate_ragged
from moekit.load import load_model
from moekit.pipeline.cgopipe import (
    NativeAttention,
    PipelinedDecoder,
    Streams,
    generate_pipelined,
)

PROMPTS = [[5, 17, 300, 42, 9, 11, 7], [1000, 3], [77] * 20, [8, 9, 10, 11, 12], [2048, 1, 4095, 31]]


@pytest.fixture(scope="module")
def tiny():
    return load_model(device="cpu", dtype="float32")


@pytest.mark.parametrize("micro_batch", [1, 2, 5])
def test_tokens_equal_generate(tiny, micro_batch):
    from moekit.generate import GenerationStats

    expected = generate_ragged(tiny, PROMPTS, max_new_tokens=8, temperature=0.0, stop_at_eos=False)
    stats = GenerationStats()
    got = generate_pipelined(tiny, PROMPTS, max_new_tokens=8, micro_batch=micro_batch, stats=stats)
    assert [g.tolist() for g in got] == [e.tolist() for e in expected]
    assert stats.new_tokens == 8 and stats.prompt_tokens == sum(map(len, PROMPTS))
    assert stats.prefill_s > 0 and stats.decode_s > 0
    from moekit import native

    if native.library() is not None:  # the kernel's calls: every decode step's KV of every layer, read once
        cfg = tiny.config
        positions = sum(len(p) + s for p in PROMPTS for s in range(1, 8))  # step s attends prompt + s positions
        window = cfg.sliding_window  # None for the bundled model
        assert window is None
        row = cfg.num_kv_heads * cfg.head_dim * 4
        attention = stats.extra["cpu_attention"]
        assert attention["kv_bytes"] == positions * row * 2 * cfg.num_layers and attention["seconds"] > 0


def test_cpu_streams_are_the_current_thread():
    s = Streams(torch.device("cpu"))
    t = torch.ones(3)
    assert s.to_host(t) == (t, None) and s.to_device(t) == (t, None)
    s.wait(None)


def test_refuses_a_device_cache_and_empty_steps(tiny):
    from moekit.kv_cache import PagedKVCache

    cache = PagedKVCache(tiny.config, 4, 16, "meta", torch.float32)
    with pytest.raises(MoekitError, match="host memory"):
        PipelinedDecoder(tiny, cache, 2)
    decoder = PipelinedDecoder(tiny, PagedKVCache(tiny.config, 4, 16, "cpu", torch.float32), 2)
    with pytest.raises(MoekitError, match="at least one sequence"):
        decoder.step([])
    decoder.close()


@pytest.mark.parametrize("lookahead", [2, None])
def test_schedule_runs_cpu_attention_ahead(tiny, monkeypatch, lookahead):
    """After PostAttn(i, j) comes the launch of the task `lookahead` tasks later (2: Alg. 1's
    (i, j + 2), wrapping to layer i + 1; None: a layer ahead, (i + 1, j)); the attention runs in
    the native kernel on the worker thread."""
    import threading

    from moekit import native
    from moekit.kv_cache import PagedKVCache
    from moekit.native import attention as native_attention

    events, threads = [], set()
    decoder = PipelinedDecoder(tiny, PagedKVCache(tiny.config, 8, 16, "cpu", torch.float32), 2, lookahead=lookahead)
    launch = decoder._launch

    def logged_launch(layer, j, mb):
        events.append(("launch", layer, j))
        return launch(layer, j, mb)

    monkeypatch.setattr(decoder, "_launch", logged_launch)
    for i, layer in enumerate(tiny.layers):
        post = layer.post_attn
        monkeypatch.setattr(layer, "post_attn", lambda x, a, post=post, i=i: (events.append(("post", i)), post(x, a))[1])
    kernel = native_attention.decode_attention
    monkeypatch.setattr(native_attention, "decode_attention",
                        lambda *a, **k: (threads.add(threading.current_thread().name), kernel(*a, **k))[1])
    for name in ("__call__", "store_and_attend"):  # the kernel's calls with the step's checked tables
        prepared = getattr(NativeAttention, name)
        monkeypatch.setattr(NativeAttention, name, lambda self, *a, _p=prepared: (
            threads.add(threading.current_thread().name), _p(self, *a))[1])
    decoder.cache.prepare([(s, 0, 3) for s in range(5)])  # three cached positions each
    logits = decoder.step([(s, 3, 10 + s) for s in range(5)])  # 3 micro-batches: 2 + 2 + 1
    decoder.close()
    assert logits.shape == (5, tiny.config.vocab_size)
    layers = len(tiny.layers)
    ahead = lookahead or 3
    tasks = [(i, j) for i in range(layers) for j in range(3)]
    expected = [("launch", *t) for t in tasks[:ahead]]
    for at, (i, _) in enumerate(tasks):
        expected.append(("post", i))
        if at + ahead < len(tasks):
            expected.append(("launch", *tasks[at + ahead]))
    assert events == expected
    if native.library() is not None:
        assert threads and all(name.startswith("moekit-cpu-attention") for name in threads)


def test_native_attention_is_prepared_once_a_step_and_equals_the_kernel(tiny):
    """The prepared call (tables and lengths checked once a step) gives the kernel's output; a
    micro-batch whose tables name a block outside the pool gets none (decode_attention's checks
    and message then apply)."""
    from moekit import native
    from moekit.kv_cache import PagedKVCache
    from moekit.native import attention as native_attention

    if native.library() is None:
        pytest.skip(f"no native library: {native.unavailable_reason()}")
    cfg = tiny.config
    cache = PagedKVCache(cfg, 8, 16, "cpu", torch.float32)
    g = torch.Generator().manual_seed(0)
    for pool in cache.keys + cache.values:
        pool.copy_(torch.randn(pool.shape, generator=g))
    batch = cache.prepare([(0, 20, 1), (1, 5, 1)])
    call = NativeAttention.of(cache, batch, cfg.num_heads, torch.float32)
    assert call is not None
    q = torch.randn(2, cfg.num_heads, cfg.head_dim, generator=g)
    got = call(cache.keys[1], cache.values[1], q, torch.empty_like(q), None, 1)
    want = native_attention.decode_attention(q, cache.keys[1], cache.values[1], batch.block_tables,
                                             batch.context_lens, threads=1)
    torch.testing.assert_close(got, want)
    bad = dataclasses.replace(batch, block_tables=batch.block_tables + 100)
    assert NativeAttention.of(cache, bad, cfg.num_heads, torch.float32) is None


def test_refuses_a_lookahead_below_one(tiny):
    from moekit.kv_cache import PagedKVCache

    with pytest.raises(MoekitError, match="lookahead"):
        PipelinedDecoder(tiny, PagedKVCache(tiny.config, 4, 16, "cpu", torch.float32), 2, lookahead=0)
    with pytest.raises(MoekitError, match="attention_threads must be >= 1"):
        PipelinedDecoder(tiny, PagedKVCache(tiny.config, 4, 16, "cpu", torch.float32), 2, attention_threads=0)
    decoder = PipelinedDecoder(tiny, PagedKVCache(tiny.config, 4, 16, "cpu", torch.float32), 2, attention_threads=3)
    assert decoder.attention_threads == 3
    decoder.close()


def test_attention_items_are_read_once_at_construction(tiny, monkeypatch):
    """$MOEKIT_CPU_ATTENTION_ITEMS is read when the decoder is built (a malformed value stops there
    in one line, not mid-run) and given to every prepared call."""
    from moekit.kv_cache import PagedKVCache

    monkeypatch.setenv("MOEKIT_CPU_ATTENTION_ITEMS", "rows")
    with pytest.raises(MoekitError, match="MOEKIT_CPU_ATTENTION_ITEMS='rows'.*auto, head, sequence"):
        PipelinedDecoder(tiny, PagedKVCache(tiny.config, 4, 16, "cpu", torch.float32), 2)
    monkeypatch.setenv("MOEKIT_CPU_ATTENTION_ITEMS", "sequence")
    decoder = PipelinedDecoder(tiny, PagedKVCache(tiny.config, 4, 16, "cpu", torch.float32), 2)
    assert decoder.attention_items == 2
    decoder.close()


def test_cpu_attention_releases_the_gil():
    """The native kernel is called through ctypes.CDLL (the GIL is dropped for the call), not
    ctypes.PyDLL (which would hold it and stall the launch thread for the whole kernel)."""
    import ctypes

    from moekit import native

    lib = native.library()
    if lib is None:
        pytest.skip(f"no native library: {native.unavailable_reason()}")
    assert isinstance(lib, ctypes.CDLL) and not isinstance(lib, ctypes.PyDLL)


def test_prefill_to_host_moves_each_micro_batch_kv(tiny):
    """The micro-batched prefill (a staging cache per micro-batch, its blocks copied to the host
    pool) leaves every sequence's keys and values as one packed prefill does."""
    from moekit.generate import forward_step
    from moekit.kv_cache import PagedKVCache
    from moekit.paged_attention import gather_sequence
    from moekit.pipeline.cgopipe import prefill_to_host

    cfg = tiny.config
    host = PagedKVCache.for_tokens(cfg, 256, 16, "cpu", torch.float32)
    direct = PagedKVCache.for_tokens(cfg, 256, 16, "cpu", torch.float32)
    with torch.inference_mode():
        logits = prefill_to_host(tiny, host, PROMPTS, micro_batch=2)
        expected = forward_step(tiny, direct, [(i, 0, p) for i, p in enumerate(PROMPTS)])
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    for i, p in enumerate(PROMPTS):
        for layer in (0, cfg.num_layers - 1):
            for got, want in ((host.keys, direct.keys), (host.values, direct.values)):
                a = gather_sequence(got[layer], torch.tensor(host.tables[i]), len(p))
                b = gather_sequence(want[layer], torch.tensor(direct.tables[i]), len(p))
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("micro_batch", [1, 2, 5])
@pytest.mark.parametrize("fragmented", [False, True])
def test_prefill_kv_in_host_pool_equals_the_sequential_engine(tiny, micro_batch, fragmented):
    """Every layer's keys and values in the host pool after prefill_to_host are the sequential
    engine's (one packed prefill into a cache of its own), whether the host blocks of the prompts
    are consecutive (one slice copy a layer) or scattered by an earlier sequence (index copies)."""
    from moekit.generate import forward_step
    from moekit.kv_cache import PagedKVCache
    from moekit.paged_attention import gather_sequence
    from moekit.pipeline.cgopipe import prefill_to_host

    cfg = tiny.config
    host = PagedKVCache.for_tokens(cfg, 512, 16, "cpu", torch.float32)
    if fragmented:  # blocks 0-2 free again, 3-5 held: the prompts' blocks are not one run
        host.grow("a", 40)
        host.grow("b", 40)
        host.free("a")
    direct = PagedKVCache.for_tokens(cfg, 256, 16, "cpu", torch.float32)
    timings = {}
    with torch.inference_mode():
        prefill_to_host(tiny, host, PROMPTS, micro_batch=micro_batch, timings=timings)
        forward_step(tiny, direct, [(i, 0, p) for i, p in enumerate(PROMPTS)])
    blocks = [b for i in range(len(PROMPTS)) for b in host.tables[i]]
    assert (blocks == list(range(blocks[0], blocks[0] + len(blocks)))) != fragmented
    for layer in range(cfg.num_layers):
        for got, want in ((host.keys, direct.keys), (host.values, direct.values)):
            for i, p in enumerate(PROMPTS):
                a = gather_sequence(got[layer], torch.tensor(host.tables[i]), len(p))
                b = gather_sequence(want[layer], torch.tensor(direct.tables[i]), len(p))
                assert a.abs().sum() > 0, f"layer {layer}, prompt {i}: nothing in the host pool"
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"layer {layer}, prompt {i}")
    if fragmented:  # the earlier sequence's blocks are untouched
        assert all(host.keys[layer][host.tables["b"]].abs().sum() == 0 for layer in range(cfg.num_layers))
    assert timings["kv_store_s"] >= 0 and timings["setup_s"] >= 0


def test_generate_pipelined_profiles_the_prefill(tiny):
    """A profiled run says where its prefill went (host seconds by part; the parts within the total)."""
    from moekit.pipeline.timeline import StepProfile

    profile = StepProfile()
    with torch.inference_mode():
        generate_pipelined(tiny, PROMPTS, 3, micro_batch=2, profile=profile)
    prefill = profile.summary()["prefill"]
    parts = ("host_cache_s", "setup_s", "issue_s", "kv_wait_s", "kv_store_s")
    assert all(prefill[k] >= 0 for k in parts)
    assert sum(prefill[k] for k in parts) <= prefill["total_s"]


def test_temperature_zero_and_top_k_one_are_todays_greedy(tiny):
    """temperature 0 (the default) is the argmax path bit for bit: the ragged engine's greedy
    tokens; top_k 1 at temperature 1 leaves one token to draw, so it is greedy too."""
    expected = [e.tolist() for e in generate_ragged(tiny, PROMPTS, max_new_tokens=8, temperature=0.0,
                                                    stop_at_eos=False)]
    greedy = [g.tolist() for g in generate_pipelined(tiny, PROMPTS, max_new_tokens=8, micro_batch=2,
                                                     temperature=0.0, seed=5)]
    top1 = [g.tolist() for g in generate_pipelined(tiny, PROMPTS, max_new_tokens=8, micro_batch=2,
                                                   temperature=1.0, top_k=1, seed=5)]
    assert greedy == expected and top1 == expected


def test_sampling_is_seeded_and_feeds_the_sampled_token(tiny):
    """Same seed, same tokens; another seed, other tokens (the tiny model's next-token
    distributions are flat enough for sampling to matter); one prompt draws exactly what the
    ragged engine draws from the same seed, so each step embeds the sampled token, not the argmax."""
    from moekit.generate import forward_step
    from moekit.kv_cache import PagedKVCache

    with torch.inference_mode():
        cache = PagedKVCache.for_tokens(tiny.config, 256, 16, "cpu", torch.float32)
        first = forward_step(tiny, cache, [(i, 0, p) for i, p in enumerate(PROMPTS)])
    assert torch.softmax(first, dim=-1).max() < 0.6  # no prompt's next token is near certain

    def run(seed, prompts=PROMPTS, **kw):
        return [g.tolist() for g in generate_pipelined(tiny, prompts, max_new_tokens=8, micro_batch=2,
                                                       temperature=1.0, seed=seed, **kw)]

    greedy = [e.tolist() for e in generate_ragged(tiny, PROMPTS, max_new_tokens=8, temperature=0.0,
                                                  stop_at_eos=False)]
    a, b, c = run(0), run(0), run(1)
    assert a == b and a != c and a != greedy
    knobs = {"temperature": 0.8, "top_k": 50, "top_p": 0.9}
    ragged = generate_ragged(tiny, PROMPTS[:1], max_new_tokens=8, seed=3, stop_at_eos=False, **knobs)
    piped = generate_pipelined(tiny, PROMPTS[:1], max_new_tokens=8, micro_batch=1, seed=3, **knobs)
    assert piped[0].tolist() == ragged[0].tolist() != greedy[0]


@pytest.mark.parametrize("knob, message", [({"temperature": -0.5}, "temperature must be >= 0"),
                                           ({"top_k": -1}, "top_k must be >= 0"),
                                           ({"top_p": 0.0}, r"top_p must be in \(0, 1\]")])
def test_refuses_bad_sampling_settings(tiny, knob, message):
    with pytest.raises(MoekitError, match=message):
        generate_pipelined(tiny, PROMPTS, max_new_tokens=2, micro_batch=2, **knob)
