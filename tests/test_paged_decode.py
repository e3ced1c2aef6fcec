"""Ragged decode at static shapes (moekit.paged_decode): the batch padded to a bucket, block
tables padded to the whole context, padding rows confined to the scratch block. Eager on the CPU,
CUDA graphs on GPUs; either way equal to the plain ragged step."""

from __future__ import annotations

import pytest
import torch

import moekit
from moekit.generate import forward_step
from moekit.kv_cache import PagedKVCache
from moekit.paged_decode import PagedDecode, bucket_for, static_decode_supported

from conftest import VOCAB, build_without_interpreter


def test_buckets_are_powers_of_two():
    assert [bucket_for(b) for b in (1, 2, 3, 4, 5, 8, 9, 33)] == [1, 2, 4, 4, 8, 8, 16, 64]


def _prefilled(model, lengths, device="cpu"):
    """Returns (cache, prompts) with each prompt prefilled (one packed step)."""
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]
    cache = PagedKVCache(model.config, 24, 4, device, model.dtype)
    with torch.no_grad():
        forward_step(model, cache, [(i, 0, p) for i, p in enumerate(prompts)])
    return cache, prompts


def _decode_both(model, device, graphs):
    """Returns (static logits, plain logits, scratch touched, a sequence block touched) of one
    decode step of 3 sequences (bucket 4: one padding row)."""
    cache, prompts = _prefilled(model, [5, 11, 2], device)
    work = [(i, len(p), 7 + i) for i, p in enumerate(prompts)]
    static = PagedDecode(model, cache, graphs=graphs)
    untouched = [k.clone() for k in cache.keys]
    with torch.no_grad():
        got = static(work).clone()
        expected = forward_step(model, cache, [(i, pos, [tok]) for i, pos, tok in work])
    return got, expected, cache, untouched


@pytest.mark.parametrize("variant", ["mixtral", "mixtral_sliding", "qwen2_moe", "olmoe_clip", "deepseek_v2",
                                     "gpt_oss"])
def test_static_step_equals_plain_ragged_step(tiny, variant):
    """Grouped-query (full and sliding), latent (deepseek) and sink (gpt-oss) attention."""
    model = moekit.load_model(tiny(variant).path)
    assert static_decode_supported(model)
    got, expected, cache, before = _decode_both(model, "cpu", graphs=False)
    assert got.shape == expected.shape == (3, VOCAB)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    held = {b for table in cache.tables.values() for b in table}
    for layer, old in zip(cache.keys, before):
        free = [b for b in range(cache.num_blocks) if b not in held]
        assert torch.equal(layer[free], old[free])  # padding rows wrote only the scratch block


@pytest.mark.parametrize("variant", ["mixtral", "qwen2_moe", "deepseek_v2"])
def test_offloaded_step_is_cut_at_the_expert_calls(tiny, variant):
    """An offloaded model's step is not captured whole (its experts move between steps) but cut
    at the expert calls (moekit.piecewise); equal to the plain ragged step, padding rows
    confined to the scratch block (3 sequences in bucket 4)."""
    from moekit.offload import OffloadConfig, load_offloaded
    from moekit.paged_decode import piecewise_decode_supported

    model = load_offloaded(tiny(variant).path, offload=OffloadConfig(device_memory=1 << 30))
    assert not static_decode_supported(model) and piecewise_decode_supported(model)
    got, expected, cache, before = _decode_both(model, "cpu", graphs=False)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    held = {b for table in cache.tables.values() for b in table}
    for layer, old in zip(cache.keys, before):
        free = [b for b in range(cache.num_blocks) if b not in held]
        assert torch.equal(layer[free], old[free])


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["mixtral", "qwen3_moe", "mixtral_sliding", "deepseek_v2", "gpt_oss"])
def test_cuda_graph_step_equals_plain_ragged_step(tiny, variant):
    model = moekit.load_model(tiny(variant).path, device="cuda", dtype="float32")
    got, expected, _, _ = _decode_both(model, "cuda", graphs=True)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_a_short_step_after_a_long_one_ignores_stale_table_columns(mixtral_model):
    """A step of short tables after one with a long table (same bucket) copies fewer columns; the
    stale ones beyond each row's context are never read."""
    model = mixtral_model
    results = []
    for static in (True, False):
        cache, _ = _prefilled(model, [30, 3, 2], "cpu")
        decode = PagedDecode(model, cache, graphs=False)
        with torch.no_grad():
            first = [(0, 30, 5), (1, 3, 6)]  # row 0 holds 8 blocks of 4
            second = [(2, 2, 9), (1, 4, 8)]  # at most 2 blocks each
            if static:
                decode(first)
                results.append(decode(second).clone())
            else:
                forward_step(model, cache, [(i, p, [t]) for i, p, t in first])
                results.append(forward_step(model, cache, [(i, p, [t]) for i, p, t in second]))
        if static:
            assert decode.steps[2].meta[0, 4 + 7] != 0  # a stale column of the long table is still there
    torch.testing.assert_close(results[0], results[1], atol=1e-5, rtol=1e-5)


def test_warm_builds_every_bucket_before_any_step(mixtral_model):
    """warm(5) makes the steps of buckets 1..8 up front (captured on GPUs) without touching any
    sequence's blocks; a step after it (outside inference mode) equals the plain ragged step."""
    model = mixtral_model
    cache, prompts = _prefilled(model, [5, 11, 2])
    decode = PagedDecode(model, cache, graphs=False)
    before = [k.clone() for k in cache.keys]
    assert decode.warm(5) == [1, 2, 4, 8] and set(decode.steps) == {1, 2, 4, 8}
    assert all(torch.equal(k, old) for k, old in zip(cache.keys, before))
    work = [(i, len(p), 7 + i) for i, p in enumerate(prompts)]
    with torch.no_grad():
        got = decode(work).clone()
        expected = forward_step(model, cache, [(i, pos, [tok]) for i, pos, tok in work])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_a_dropped_offloaded_step_frees_at_once(tiny):
    """No reference cycle between a piecewise step and its pieces: with the garbage collector
    off, dropping the PagedDecode frees its buffers (an offload budget counts them)."""
    import gc
    import weakref

    from moekit.offload import OffloadConfig, load_offloaded

    model = load_offloaded(tiny("mixtral").path, offload=OffloadConfig(device_memory=1 << 30))
    cache, prompts = _prefilled(model, [5, 3])
    decode = PagedDecode(model, cache, graphs=False)
    with torch.no_grad():
        decode([(i, len(p), 7) for i, p in enumerate(prompts)])
    meta = weakref.ref(decode.steps[2].meta)
    gc.disable()
    try:
        del decode
        assert meta() is None
    finally:
        gc.enable()


# (sequence lengths, block size, heads, kv heads, head dim, window, splits)
SPLIT_SHAPES = [
    ([1, 7, 16, 33], 4, 4, 2, 8, None, 3),  # one position: its later runs are empty
    ([300, 130, 1], 16, 4, 4, 32, None, 4),  # runs of 64-position iterations
    ([300, 45], 16, 4, 4, 32, 150, 2),  # a window starting inside a run
    ([9, 30, 2], 8, 8, 2, 24, 5, 16),  # more runs than iterations; a padded group and head dim
    ([400], 16, 16, 16, 128, None, 16),  # the OLMoE decode shape at batch 1 (G = 1 padded to 16 dot rows)
    ([70, 640, 1], 16, 32, 4, 128, None, 4),  # the Qwen3-30B-A3B shape: G = 8 padded to 16
    ([300, 200], 128, 4, 2, 16, 70, 4),  # blocks of 128 > 64 positions a chunk: a window's first chunks and
    # run wholly before it (no position attended: p = 0 there, not NaN)
    ([100, 37], 16, 4, 2, 256, None, 2),  # head dim 256: 32 positions a chunk
]


@pytest.mark.parametrize("shape", SPLIT_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_decode_kernel_equals_reference(shape, dtype):
    """The flash-decoding kernels (each sequence's positions cut into runs, then reduced) against
    the PyTorch reference; the one-pass kernel (splits=1) alongside."""
    from conftest import kernel_device

    from moekit.paged_attention import (
        decode_attention_reference,
        decode_attention_triton,
    )

    device = kernel_device()
    lengths, block_size, heads, kv_heads, head_dim, window, splits = shape
    g = torch.Generator().manual_seed(5)
    from dataclasses import replace

    cfg = replace(moekit.read_config(moekit.default_model_path())[2], num_heads=heads, num_kv_heads=kv_heads,
                  head_dim=head_dim)
    cache = PagedKVCache(cfg, sum(-(-n // block_size) for n in lengths) + 2, block_size, device, dtype)
    cache.grow("pad", 1)  # block 0 belongs to nobody read: tables' padding entries point at it
    for i, n in enumerate(lengths):
        batch = cache.prepare([(i, 0, n)])
        k, v = (torch.randn(n, kv_heads, head_dim, generator=g).to(device, dtype) for _ in range(2))
        cache.write(0, k, v, batch.slots)
    batch = cache.prepare([(i, n - 1, 1) for i, n in enumerate(lengths)])
    q = torch.randn(len(lengths), heads, head_dim, generator=g).to(device, dtype)
    args = (q, cache.keys[0], cache.values[0], batch.block_tables, batch.context_lens, window)
    expected = decode_attention_reference(*(a.float() if a.is_floating_point() else a for a in args[:3]), *args[3:])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for s in (splits, 1):
        got = decode_attention_triton(*args, splits=s)
        assert got.dtype == dtype and got.shape == q.shape
        torch.testing.assert_close(got.float(), expected, atol=tol, rtol=tol)


def test_decode_splits_fill_the_gpu_then_stop():
    from moekit.paged_attention import (
        MAX_DECODE_SPLITS,
        _multiprocessors,
        decode_splits,
    )

    assert decode_splits(1, 16, torch.device("cpu")) == 1
    if torch.cuda.is_available():
        sms = _multiprocessors(torch.device("cuda"))
        assert decode_splits(1, 16, torch.device("cuda")) == min(MAX_DECODE_SPLITS, 2 * sms // 16)
        assert decode_splits(128, 16, torch.device("cuda")) == 1


def test_split_decode_compiles_one_key_per_split_count(monkeypatch):
    """Ragged decode steps of 1..5 sequences, contexts 1..600, tables 1..40 blocks wide: the split
    and reduce kernels launch under one specialization key each for a given split count."""
    import moekit.paged_attention as pa
    from moekit.experts.triton_ops import specialization_key

    if not pa.HAVE_TRITON:
        pytest.skip("triton not installed")
    keys = {"split": set(), "reduce": set()}

    class Recorder:
        def __init__(self, kernel, name):
            self.kernel, self.name = kernel, name

        def __getitem__(self, grid):
            return lambda *a, **k: keys[self.name].add(specialization_key(self.kernel, a, k))

    monkeypatch.setattr(pa, "paged_decode_split_kernel", Recorder(pa.paged_decode_split_kernel, "split"))
    monkeypatch.setattr(pa, "paged_decode_reduce_kernel", Recorder(pa.paged_decode_reduce_kernel, "reduce"))
    from dataclasses import replace

    cfg = replace(moekit.read_config(moekit.default_model_path())[2], num_heads=4, num_kv_heads=2, head_dim=16)
    cache = PagedKVCache(cfg, 2048, 16, "cpu", torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    for step in range(40):
        work = [(("s", step, i), int(torch.randint(0, 600, (1,), generator=g)), 1) for i in range(1 + step % 5)]
        batch = cache.prepare(work)
        q = torch.empty(1, len(work), 4, 16, dtype=torch.bfloat16).transpose(1, 2)[0].transpose(0, 1)  # [B, H, Dh]
        pa.decode_attention_triton(q, cache.keys[0], cache.values[0], batch.block_tables, batch.context_lens,
                                   None, splits=4)
        for seq, _, _ in work:
            cache.free(seq)
    assert len(keys["split"]) == 1 and len(keys["reduce"]) == 1


# builds both decode kernels for sm_90 without a GPU (the interpreter the tests above run them
# under accepts code the compiler rejects: layouts, dot operands, shared memory)
_SM90_BUILD = """
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from moekit.kernels.paged_attention import paged_decode_kernel, paged_decode_split_kernel
from moekit.paged_attention import decode_launch
for kernel in (paged_decode_kernel, paged_decode_split_kernel):
    for dtype, head_dim, group in ((torch.bfloat16, 128, 8), (torch.bfloat16, 128, 1), (torch.float32, 24, 3)):
        launch = decode_launch(dtype, head_dim, group, 16)
        options = {"num_warps": launch.pop("num_warps"), "num_stages": launch.pop("num_stages")}
        launch.update(SLIDING=True, **({"SPLITS": 16} if kernel is paged_decode_split_kernel else {}))
        element = "*bf16" if dtype == torch.bfloat16 else "*fp32"
        types = {"table_ptr": "*i32", "ctx_ptr": "*i32", "part_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32",
                 "scale": "fp32"}
        signature = {n: "constexpr" if n in launch else types.get(n, element if n.endswith("_ptr") else "i32")
                     for n in kernel.arg_names}
        aligned = [n for n, t in signature.items() if t.startswith("*") or n.startswith("stride") and n != "stride_tb"]
        source = ASTSource(fn=kernel, signature=signature, constexprs=launch,
                           attrs={(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned})
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
        assert compiled.asm.get("cubin"), (kernel, dtype)
        assert dtype == torch.float32 or "mma.sync" in compiled.asm["ptx"], (kernel, "no tensor-core dot")
        assert compiled.metadata.shared <= 227 * 1024, compiled.metadata.shared
"""


@pytest.mark.slow
def test_decode_kernels_compile_for_sm90_with_tensor_core_dots():
    """bf16 decode kernels (G = 8 and G = 1 heads padded to 16 rows) built for Hopper use mma
    instructions and fit its shared memory; float32 with a padded group and head dim builds too."""
    build_without_interpreter(["-c", _SM90_BUILD])
