"""The paged KV cache (blocks, tables, growth, freeing) and attention read through it: the Triton
decode kernel and the packed prefill path against plain attention over contiguous keys.

On CPU machines the kernel runs under TRITON_INTERPRET=1 (set in conftest.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import moekit
from moekit.kv_cache import QUERY_TILE, OutOfBlocks, PagedKVCache, query_tiles
from moekit.paged_attention import (HAVE_TRITON, decode_attention_reference, decode_attention_triton,
                                    prefill_attention, prefill_attention_reference, prefill_attention_triton,
                                    prefill_launch)

from conftest import kernel_device


def _config(heads=4, kv_heads=2, head_dim=8):
    """Returns the bundled model's config with the attention shape of a test."""
    from dataclasses import replace

    cfg = moekit.read_config(moekit.default_model_path())[2]
    return replace(cfg, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim)


# ---- blocks and tables ---------------------------------------------------------------------

def test_blocks_follow_the_tokens_held():
    cache = PagedKVCache(_config(), num_blocks=6, block_size=4, device="cpu", dtype=torch.float32)
    cache.grow("a", 5)  # 2 blocks
    cache.grow("b", 4)  # 1 block
    assert cache.used_blocks == 3 and cache.free_blocks == 3
    cache.grow("a", 8)  # still 2
    assert len(cache.tables["a"]) == 2
    cache.grow("a", 9)
    assert len(cache.tables["a"]) == 3
    assert len(set(cache.tables["a"]) | set(cache.tables["b"])) == 4  # no block shared
    cache.free("a")
    assert cache.used_blocks == 1 and "a" not in cache.tables
    cache.free("never seen")


def test_out_of_blocks_takes_nothing():
    cache = PagedKVCache(_config(), num_blocks=3, block_size=4, device="cpu", dtype=torch.float32)
    cache.grow("a", 8)
    with pytest.raises(OutOfBlocks, match="1 free blocks"):
        cache.grow("b", 9)
    assert "b" not in cache.tables and cache.free_blocks == 1
    with pytest.raises(OutOfBlocks, match="this step needs 3"):
        cache.prepare([("a", 8, 1), ("c", 0, 5)])
    assert cache.free_blocks == 1 and len(cache.tables["a"]) == 2


def test_prepare_packs_positions_and_slots():
    cache = PagedKVCache(_config(), num_blocks=8, block_size=4, device="cpu", dtype=torch.float32)
    cache.grow("x", 2)  # takes block 0 so the sequences below get later blocks
    batch = cache.prepare([("a", 0, 3), ("x", 2, 3)])
    a, x = cache.tables["a"], cache.tables["x"]
    assert batch.positions.tolist() == [0, 1, 2, 2, 3, 4]
    assert batch.slots.tolist() == [a[0] * 4, a[0] * 4 + 1, a[0] * 4 + 2, x[0] * 4 + 2, x[0] * 4 + 3, x[1] * 4]
    assert batch.context_lens.tolist() == [3, 5] and batch.last_index.tolist() == [2, 5]
    assert batch.block_tables.shape == (2, 2) and batch.block_tables[0, 1] == 0  # padded past a's end
    assert not batch.is_decode and cache.prepare([("a", 3, 1)]).is_decode


@pytest.mark.parametrize("kwargs, match", [
    ({"num_blocks": 0, "block_size": 16}, "at least one block"),
    ({"num_blocks": 4, "block_size": 12}, "power of two"),
])
def test_bad_cache_shapes(kwargs, match):
    with pytest.raises(moekit.MoekitError, match=match):
        PagedKVCache(_config(), device="cpu", dtype=torch.float32, **kwargs)


# ---- attention through the block tables ----------------------------------------------------

def _filled_cache(lengths, block_size, heads, kv_heads, head_dim, device, dtype, seed=0):
    """Returns (cache, contiguous keys and values per sequence [Hkv, S, Dh]) with random k/v
    written through `prepare`, sequences interleaved so their blocks are not in order."""
    g = torch.Generator().manual_seed(seed)
    cfg = _config(heads, kv_heads, head_dim)
    total = sum(-(-n // block_size) for n in lengths) + 3
    cache = PagedKVCache(cfg, total, block_size, device, dtype)
    keys = [torch.randn(kv_heads, n, head_dim, generator=g).to(device, dtype) for n in lengths]
    values = [torch.randn(kv_heads, n, head_dim, generator=g).to(device, dtype) for n in lengths]
    cache.grow("pad", 1)  # block 0 belongs to nobody we read: padding entries of tables point at it
    done = [0] * len(lengths)
    while any(d < n for d, n in zip(done, lengths)):  # grow the sequences a few positions at a time
        for i, n in enumerate(lengths):
            step = min(3, n - done[i])
            if step == 0:
                continue
            batch = cache.prepare([(i, done[i], step)])
            k = keys[i][:, done[i]:done[i] + step].transpose(0, 1)
            v = values[i][:, done[i]:done[i] + step].transpose(0, 1)
            cache.write(0, k, v, batch.slots)
            done[i] += step
    return cache, keys, values


def _plain_attention(q, k, v, window):
    """Attention of the last position: q [H, Dh] over k, v [Hkv, S, Dh] (the unpaged truth)."""
    s = k.shape[1]
    mask = None
    if window is not None:
        mask = (torch.arange(s, device=q.device) >= s - window)[None, :]  # [1, S]
    out = F.scaled_dot_product_attention(q[None, :, None].float(), k[None].float(), v[None].float(),
                                         attn_mask=mask, enable_gqa=k.shape[0] != q.shape[0])
    return out[0, :, 0]


# (sequence lengths, block size, heads, kv heads, head dim, window)
DECODE_SHAPES = [
    ([1, 7, 16, 33], 4, 4, 2, 8, None),  # GQA, a one-position sequence, exact block boundary
    ([5, 40], 16, 4, 4, 16, None),  # plain multi-head
    ([9, 30, 2], 8, 8, 2, 24, 5),  # sliding window, head dim not a power of two, 4 heads per kv head
    ([64, 3], 16, 6, 2, 16, 20),  # 3 heads per kv head (padded group)
    ([300, 130, 1], 16, 4, 4, 32, None),  # the kernel reads 64 positions (4 blocks) per iteration
    ([300, 45], 16, 4, 4, 32, 150),  # ... with a window starting inside an iteration
]


@pytest.mark.parametrize("shape", DECODE_SHAPES)
def test_decode_reference_equals_plain_attention(shape):
    lengths, block_size, heads, kv_heads, head_dim, window = shape
    cache, keys, values = _filled_cache(lengths, block_size, heads, kv_heads, head_dim, "cpu", torch.float32)
    q = torch.randn(len(lengths), heads, head_dim, generator=torch.Generator().manual_seed(1))
    batch = cache.prepare([(i, n - 1, 1) for i, n in enumerate(lengths)])  # tables as a decode step sees them
    out = decode_attention_reference(q, cache.keys[0], cache.values[0], batch.block_tables, batch.context_lens, window)
    for i in range(len(lengths)):
        torch.testing.assert_close(out[i], _plain_attention(q[i], keys[i], values[i], window), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not HAVE_TRITON, reason="triton not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", DECODE_SHAPES)
def test_decode_kernel_equals_reference(shape, dtype):
    device = kernel_device()
    lengths, block_size, heads, kv_heads, head_dim, window = shape
    cache, _, _ = _filled_cache(lengths, block_size, heads, kv_heads, head_dim, device, dtype)
    q = torch.randn(len(lengths), heads, head_dim, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    batch = cache.prepare([(i, n - 1, 1) for i, n in enumerate(lengths)])
    args = (q, cache.keys[0], cache.values[0], batch.block_tables, batch.context_lens, window)
    expected = decode_attention_reference(*(a.float() if a.is_floating_point() else a for a in args[:3]), *args[3:])
    got = decode_attention_triton(*args)
    assert got.dtype == dtype and got.shape == q.shape
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("window", [None, 6])
def test_packed_prefill_equals_plain_causal_attention(window):
    """Two sequences in one packed step: one fresh (positions 0..9), one continuing (12..19 after
    12 cached), each causal over its own positions only."""
    heads, kv_heads, head_dim, block_size = 4, 2, 8, 4
    cache, keys, values = _filled_cache([10, 20], block_size, heads, kv_heads, head_dim, "cpu", torch.float32)
    q = torch.randn(10 + 8, heads, head_dim, generator=torch.Generator().manual_seed(2))
    batch = cache.prepare([(0, 0, 10), (1, 12, 8)])
    out = prefill_attention(q, cache.keys[0], cache.values[0], batch, window)
    for i, (start, n, offset) in enumerate([(0, 10, 0), (12, 8, 10)]):
        s = start + n
        pos_q = torch.arange(start, s)[:, None]
        pos_k = torch.arange(s)[None, :]
        mask = pos_k <= pos_q
        if window is not None:
            mask &= pos_k > pos_q - window
        expected = F.scaled_dot_product_attention(q[offset:offset + n].transpose(0, 1)[None], keys[i][None],
                                                  values[i][None], attn_mask=mask, enable_gqa=True)
        torch.testing.assert_close(out[offset:offset + n], expected[0].transpose(0, 1), atol=1e-5, rtol=1e-5)


def test_ragged_forward_needs_a_paged_cache(mixtral_model):
    cache = PagedKVCache(mixtral_model.config, 4, 16, "cpu", torch.float32)
    batch = cache.prepare([("a", 0, 3)])
    with pytest.raises(moekit.MoekitError, match="needs a PagedKVCache"):
        mixtral_model(torch.tensor([[5, 6, 7]]), cache=None, start=batch)
    with pytest.raises(moekit.MoekitError, match=r"input_ids \[1, 3\]"):
        mixtral_model(torch.tensor([[5, 6]]), cache=cache, start=batch)


def test_mixed_step_decodes_single_tokens_together(monkeypatch):
    """A step of two one-token sequences beside a prefill chunk: the two attend in one decode
    call, the chunk on its own; each equals plain attention over its own positions."""
    import moekit.paged_attention as pa

    heads, kv_heads, head_dim, block_size = 4, 2, 8, 4
    cache, keys, values = _filled_cache([7, 13, 9], block_size, heads, kv_heads, head_dim, "cpu", torch.float32)
    calls = []
    real = pa.decode_attention
    monkeypatch.setattr(pa, "decode_attention", lambda q, *a: calls.append(q.shape[0]) or real(q, *a))
    batch = cache.prepare([(0, 6, 1), (1, 10, 3), (2, 8, 1)])  # sequence 1 brings its last 3 positions
    q = torch.randn(5, heads, head_dim, generator=torch.Generator().manual_seed(4))
    out = pa.prefill_attention(q, cache.keys[0], cache.values[0], batch, None)
    assert calls == [2]
    torch.testing.assert_close(out[0], _plain_attention(q[0], keys[0], values[0], None), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[4], _plain_attention(q[4], keys[2], values[2], None), atol=1e-5, rtol=1e-5)
    for j, pos in enumerate((10, 11, 12)):  # causal within sequence 1
        k, v = keys[1][:, :pos + 1], values[1][:, :pos + 1]
        torch.testing.assert_close(out[1 + j], _plain_attention(q[1 + j], k, v, None), atol=1e-5, rtol=1e-5)


# ---- the packed prefill kernel -------------------------------------------------------------

def test_query_tiles_cut_each_sequence_into_runs():
    tiles = query_tiles((0, 12, 8), (10, 130, 1), tile=64)
    assert tiles == [[0, 0, 10, 0], [1, 10, 64, 12], [1, 74, 64, 76], [1, 138, 2, 140], [2, 140, 1, 8]]
    cfg = _config()
    cache = PagedKVCache(cfg, 64, 4, "cpu", torch.float32)
    assert cache.prepare([("a", 0, 1), ("b", 0, 1)]).query_tiles is None  # a decode step needs none
    batch = cache.prepare([("a", 1, 1), ("c", 0, QUERY_TILE + 1)])
    assert batch.query_tiles.tolist() == [[0, 0, 1, 1], [1, 1, QUERY_TILE, 0], [1, QUERY_TILE + 1, 1, QUERY_TILE]]
    assert batch.query_tiles.dtype == torch.int32


# (step work as (cached positions before, new tokens), block size, heads, kv heads, head dim, window)
PREFILL_SHAPES = [
    ([(0, 10), (12, 8)], 4, 4, 2, 8, None),  # a fresh prompt and a continuing chunk (GQA)
    ([(0, 10), (12, 8)], 4, 4, 2, 8, 6),  # ... with a sliding window
    ([(6, 1), (10, 3), (8, 1)], 4, 4, 2, 8, None),  # decode rows beside a chunk (a mixed step)
    ([(12, 138), (0, 70), (5, 1)], 16, 4, 4, 16, None),  # several tiles of one sequence, a partial tile
    ([(12, 138), (40, 30)], 8, 8, 2, 24, 50),  # window inside a chunk, head dim not a power of two
    ([(0, 65), (3, 2)], 16, 6, 2, 16, 20),  # 3 heads per kv head, a tile boundary at 64
]


@pytest.mark.parametrize("shape", PREFILL_SHAPES)
def test_prefill_reference_equals_plain_causal_attention(shape):
    work, block_size, heads, kv_heads, head_dim, window = shape
    lengths = [start + n for start, n in work]
    cache, keys, values = _filled_cache(lengths, block_size, heads, kv_heads, head_dim, "cpu", torch.float32)
    batch = cache.prepare([(i, start, n) for i, (start, n) in enumerate(work)])
    q = torch.randn(batch.num_tokens, heads, head_dim, generator=torch.Generator().manual_seed(2))
    out = prefill_attention_reference(q, cache.keys[0], cache.values[0], batch, window)
    offset = 0
    for i, (start, n) in enumerate(work):
        for j in range(n):
            pos = start + j
            k, v = keys[i][:, :pos + 1], values[i][:, :pos + 1]
            torch.testing.assert_close(out[offset + j], _plain_attention(q[offset + j], k, v, window),
                                       atol=1e-5, rtol=1e-5)
        offset += n


@pytest.mark.skipif(not HAVE_TRITON, reason="triton not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", PREFILL_SHAPES)
def test_prefill_kernel_equals_reference(shape, dtype):
    device = kernel_device()
    work, block_size, heads, kv_heads, head_dim, window = shape
    lengths = [start + n for start, n in work]
    cache, _, _ = _filled_cache(lengths, block_size, heads, kv_heads, head_dim, device, dtype)
    batch = cache.prepare([(i, start, n) for i, (start, n) in enumerate(work)])
    q = torch.randn(batch.num_tokens, heads, head_dim, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    expected = prefill_attention_reference(q.float(), cache.keys[0].float(), cache.values[0].float(), batch, window)
    got = prefill_attention_triton(q, cache.keys[0], cache.values[0], batch.block_tables, batch.query_tiles, window)
    assert got.dtype == dtype and got.shape == q.shape
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), expected, atol=tol, rtol=tol)


def test_prefill_launch_depends_on_the_model_shape_only():
    """The kernel's constexprs come from dtype, head dim and block size: never from a step's token
    count, table width or window, so ragged steps reuse one compiled kernel."""
    launches = {tuple(sorted(prefill_launch(torch.bfloat16, 128, 16).items())) for _ in range(3)}
    assert len(launches) == 1
    from moekit.kernels.paged_attention import paged_decode_kernel, paged_prefill_kernel

    for kernel in (paged_decode_kernel, paged_prefill_kernel):
        assert {"WINDOW", "stride_tb"} <= set(_unspecialized(kernel))


def _unspecialized(kernel) -> list[str]:
    """Returns the argument names a Triton kernel does not specialize on (jit or interpreter)."""
    fn = getattr(kernel, "fn", kernel)
    names = list(getattr(fn, "arg_names", None) or fn.__code__.co_varnames[:fn.__code__.co_argcount])
    marked = getattr(kernel, "do_not_specialize", None)
    if marked is None:
        marked = getattr(kernel, "kwargs", {}).get("do_not_specialize", ())
    return [names[i] if isinstance(i, int) else i for i in marked]


def test_ragged_steps_compile_one_attention_kernel_each(monkeypatch):
    """Many ragged steps (1..300 packed tokens, tables 1..40 blocks wide, q a strided view as the
    model passes it) launch the prefill and decode kernels under one specialization key each."""
    import moekit.paged_attention as pa
    from moekit.experts.triton_ops import specialization_key

    keys = {"prefill": set(), "decode": set()}

    class Recorder:
        def __init__(self, kernel, name):
            self.kernel, self.name = kernel, name

        def __getitem__(self, grid):
            return lambda *a, **k: keys[self.name].add(specialization_key(self.kernel, a, k))

    monkeypatch.setattr(pa, "paged_prefill_kernel", Recorder(pa.paged_prefill_kernel, "prefill"))
    monkeypatch.setattr(pa, "paged_decode_kernel", Recorder(pa.paged_decode_kernel, "decode"))
    heads, kv_heads, head_dim, block_size = 4, 2, 16, 16
    cache = PagedKVCache(_config(heads, kv_heads, head_dim), 2048, block_size, "cpu", torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    for step in range(60):
        work = [(("s", step, i), int(torch.randint(0, 600, (1,), generator=g)),
                 int(torch.randint(1, 60 if i else 300, (1,), generator=g))) for i in range(1 + step % 5)]
        batch = cache.prepare(work)
        projected = torch.empty(1, batch.num_tokens, heads, head_dim, dtype=torch.bfloat16)  # [1, N, H, Dh]
        q = projected.transpose(1, 2)[0].transpose(0, 1)  # [N, H, Dh] as the model's ragged attention sees it
        if batch.query_tiles is not None:
            pa.prefill_attention_triton(q, cache.keys[0], cache.values[0], batch.block_tables, batch.query_tiles,
                                        None)
        pa.decode_attention_triton(q[:len(work)], cache.keys[0], cache.values[0], batch.block_tables,
                                   batch.context_lens, None, splits=1)  # the split kernels: test_paged_decode
        for seq, _, _ in work:
            cache.free(seq)
    assert len(keys["prefill"]) == 1 and len(keys["decode"]) == 1
