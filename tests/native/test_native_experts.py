"""The native CPU expert kernel (native/experts.cpp) against its PyTorch reference: every dtype,
jobs sharing tokens, tokens no job touches, odd sizes, any thread count giving the same bits,
and clear refusals of arguments it cannot take; the same call started on the runner thread gives
the same bits."""

from __future__ import annotations

import pytest
import torch

from moekit import native
from moekit.errors import MoekitError
from moekit.native import experts as ne

pytestmark = pytest.mark.skipif(native.library() is None, reason=f"no native library: {native.unavailable_reason()}")

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def make_jobs(d: int, ffn: int, dtype: torch.dtype, routes: list[list[int]], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    jobs = []
    for toks in routes:
        gate_up = (torch.randn(2 * ffn, d, generator=g) / d ** 0.5).to(dtype)
        down = (torch.randn(d, ffn, generator=g) / ffn ** 0.5).to(dtype)
        weights = torch.rand(len(toks), generator=g).tolist()
        jobs.append((gate_up, down, toks, weights))
    return jobs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d,ffn", [(64, 32), (100, 37), (256, 512)])
def test_matches_reference(dtype, d, ffn):
    routes = [[0, 2], [2], [1, 3, 0], [4]]  # token 2 in two jobs, token 5 in none
    x = torch.randn(6, d).to(dtype)
    jobs = make_jobs(d, ffn, dtype, routes)
    out = ne.expert_ffn(x, jobs, threads=2)
    expected = ne.reference(x, jobs)
    assert out.dtype == dtype and out.shape == x.shape
    scale = expected.abs().max()
    assert (out.float() - expected).abs().max() <= TOL[dtype] * scale
    assert torch.equal(out[5], torch.zeros(d, dtype=dtype))


def test_single_token_decode_and_many_tokens():
    d, ffn = 128, 64
    x = torch.randn(1, d)
    jobs = make_jobs(d, ffn, torch.float32, [[0]] * 8)
    torch.testing.assert_close(ne.expert_ffn(x, jobs), ne.reference(x, jobs), rtol=1e-5, atol=1e-5)
    x = torch.randn(200, d)
    jobs = make_jobs(d, ffn, torch.float32, [list(range(0, 200, 2)), list(range(200))])
    torch.testing.assert_close(ne.expert_ffn(x, jobs), ne.reference(x, jobs), rtol=1e-4, atol=1e-4)


def test_thread_count_does_not_change_bits():
    d, ffn = 96, 80
    x = torch.randn(5, d).to(torch.bfloat16)
    jobs = make_jobs(d, ffn, torch.bfloat16, [[0, 1], [1, 2, 3], [4], [0, 4]])
    outs = [ne.expert_ffn(x, jobs, threads=t) for t in (1, 2, 3)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("n", [1, 100, 4100])
def test_stage2_row_blocks_at_every_token_count(n):
    """Stage 2 takes 64 hidden rows an item at one token, 4096 // n rows at n tokens, and one row
    (the accs buffer) past 4096 tokens; d = 200 leaves a partial last block in each."""
    d, ffn = 200, 24
    x = torch.randn(n, d)
    per_job = min(n, 256)
    routes = [[(j * 7 + i) % n for i in range(per_job)] for j in range(max(8, -(-n // per_job)))]
    jobs = make_jobs(d, ffn, torch.float32, routes)
    outs = [ne.expert_ffn(x, jobs, threads=t) for t in (1, 3)]
    assert torch.equal(outs[0], outs[1])
    torch.testing.assert_close(outs[0], ne.reference(x, jobs), rtol=1e-4, atol=1e-4)


def test_no_jobs_gives_zeros_and_out_is_written_in_place():
    x = torch.randn(3, 16)
    out = torch.full_like(x, 7.0)
    assert ne.expert_ffn(x, [], out=out) is out and torch.equal(out, torch.zeros_like(x))
    jobs = make_jobs(16, 8, torch.float32, [[1]])
    ne.expert_ffn(x, jobs, out=out, scratch=ne.Scratch())
    torch.testing.assert_close(out, ne.reference(x, jobs), rtol=1e-5, atol=1e-5)


def test_prepared_call_gives_expert_ffns_bits_on_every_call():
    x = torch.randn(3, 96).to(torch.bfloat16)
    jobs = make_jobs(96, 80, torch.bfloat16, [[0, 2], [1], [2]])
    call = ne.prepared_expert_ffn(x, jobs, threads=2)
    first = call().clone()
    assert torch.equal(first, ne.expert_ffn(x, jobs, threads=2))
    assert torch.equal(call(), first)  # the arguments stay valid past the first call
    with pytest.raises(ValueError, match="at least one job"):
        ne.prepared_expert_ffn(x, [])
    with pytest.raises(ValueError, match="one dtype"):
        ne.prepared_expert_ffn(x, [(jobs[0][0], jobs[0][1].float(), [0], [1.0])])


def test_refuses_what_it_cannot_take():
    x = torch.randn(2, 32)
    good = make_jobs(32, 16, torch.float32, [[0]])[0]
    with pytest.raises(ValueError, match="contiguous CPU gate_up"):
        ne.expert_ffn(x, [(good[0].t().contiguous().t(), good[1], [0], [1.0])])  # not contiguous
    with pytest.raises(ValueError, match="one dtype"):
        ne.expert_ffn(x, [(good[0], good[1].to(torch.bfloat16), [0], [1.0])])
    with pytest.raises(ValueError, match="outside x"):
        ne.expert_ffn(x, [(good[0], good[1], [2], [1.0])])
    with pytest.raises(ValueError, match="at most 256 tokens"):
        ne.expert_ffn(torch.randn(300, 32), [(good[0], good[1], list(range(300)), [1.0] * 300)])
    with pytest.raises(ValueError, match="contiguous"):
        ne.expert_ffn(x, [good], out=torch.empty(2, 32, dtype=torch.bfloat16))
    assert not ne.usable(x.to(torch.int32), torch.float32)


def test_stream_read_rate_is_measured():
    assert ne.stream_read_bytes_per_s(1 << 22, threads=1, reps=2) > 1e8  # any real machine reads 100 MB/s


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,k", [(1, 37, 64), (5, 130, 100), (13, 33, 96), (16, 64, 256)])  # 13: 8 + 4 + 1
def test_linear_matches_pytorch(dtype, m, n, k):
    x = torch.randn(m, k).to(dtype)
    w = (torch.randn(n, k) / k ** 0.5).to(dtype)
    b = torch.randn(n).to(dtype)
    for bias in (None, b):
        got = ne.linear(x, w, bias, threads=2)
        expected = torch.nn.functional.linear(x.float(), w.float(), None if bias is None else bias.float())
        assert got.dtype == dtype and got.shape == (m, n)
        assert (got.float() - expected).abs().max() <= TOL[dtype] * expected.abs().max()
    with pytest.raises(ValueError, match="linear takes"):
        ne.linear(torch.randn(m, k + 1).to(dtype), w)


def test_kernel_tokens_follow_bf16_hardware(monkeypatch):
    """Without bf16 in hardware the kernels take bf16 calls of up to MAX_JOB_TOKENS rows (PyTorch's
    bf16 GEMM converts in software there); with it, and for other dtypes, SMALL_BATCH_TOKENS."""
    monkeypatch.setattr(ne, "bf16_in_hardware", lambda: False)
    assert ne.kernel_tokens(torch.bfloat16) == ne.MAX_JOB_TOKENS
    assert ne.kernel_tokens(torch.float16) == ne.kernel_tokens(torch.float32) == ne.SMALL_BATCH_TOKENS
    monkeypatch.setattr(ne, "bf16_in_hardware", lambda: True)
    assert ne.kernel_tokens(torch.bfloat16) == ne.SMALL_BATCH_TOKENS


def test_model_linear_takes_the_kernel_only_where_it_applies():
    """moekit.linear.Linear: bf16 decode rows on the CPU through the kernel (close to F.linear);
    float32, long calls and autograd through F.linear (bit-equal)."""
    from moekit.linear import Linear

    layer = Linear(64, 48, bias=True)
    x = torch.randn(2, 3, 64)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))  # float32
    layer = layer.to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    with torch.no_grad():
        got = layer(xb)
        expected = torch.nn.functional.linear(xb.float(), layer.weight.float(), layer.bias.float())
        assert got.shape == (2, 3, 48) and (got.float() - expected).abs().max() <= 2e-2 * expected.abs().max()
        if ne.kernel_tokens(torch.bfloat16) == ne.SMALL_BATCH_TOKENS:  # bf16 in hardware: PyTorch past 16 rows
            long = torch.randn(40, 64).to(torch.bfloat16)
            assert torch.equal(layer(long), torch.nn.functional.linear(long, layer.weight, layer.bias))
        else:  # no bf16 hardware: the kernel for every call, past MAX_JOB_TOKENS rows in pieces
            long = torch.randn(ne.MAX_JOB_TOKENS + 40, 64).to(torch.bfloat16)
            pieces = torch.cat([ne.linear(part, layer.weight, layer.bias) for part in long.split(ne.MAX_JOB_TOKENS)])
            assert torch.equal(layer(long), pieces)
            ref = torch.nn.functional.linear(long.float(), layer.weight.float(), layer.bias.float())
            assert (layer(long).float() - ref).abs().max() <= 2e-2 * ref.abs().max()
    xg = xb.clone().requires_grad_()
    layer(xg).float().sum().backward()  # autograd runs through F.linear
    assert xg.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stacked_pointers_give_the_bits_of_per_expert_views(dtype):
    """expert_ffn_stacked (pointers from the stacks' strides, offload.cpu's decode path) computes
    exactly what expert_ffn computes on each expert's own views."""
    d, ffn, count = 96, 40, 6
    g = torch.Generator().manual_seed(1)
    gate_up = (torch.randn(count, 2 * ffn, d, generator=g) / d ** 0.5).to(dtype)
    down = (torch.randn(count, d, ffn, generator=g) / ffn ** 0.5).to(dtype)
    x = torch.randn(3, d).to(dtype)
    routes = [(4, [0, 2], [0.5, 0.25]), (1, [1], [0.75]), (5, [0, 1, 2], [0.1, 0.2, 0.3])]
    got = ne.expert_ffn_stacked(x, gate_up, down, routes, threads=2)
    expected = ne.expert_ffn(x, [(gate_up[r], down[r], t, w) for r, t, w in routes], threads=2)
    assert torch.equal(got, expected)
    out = torch.empty_like(x)
    assert ne.expert_ffn_stacked(x, gate_up, down, routes, out=out) is out and torch.equal(out, expected)
    assert torch.equal(ne.expert_ffn_stacked(x, gate_up, down, []), torch.zeros_like(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_slices_sum_to_the_whole_expert(dtype):
    """rows=(r0, r1) computes ffn rows r0..r1-1 of every expert (gate and up rows, down columns, the
    experts' own width apart): equal to the whole call on copies cut to those rows, and two slices
    that cover the rows add up to the whole call; on the runner thread too."""
    d, ffn, count = 96, 48, 5
    g = torch.Generator().manual_seed(3)
    gate_up = (torch.randn(count, 2 * ffn, d, generator=g) / d ** 0.5).to(dtype)
    down = (torch.randn(count, d, ffn, generator=g) / ffn ** 0.5).to(dtype)
    x = torch.randn(2, d, generator=g).to(dtype)
    routes = [(3, [0, 1], [0.5, 0.25]), (0, [1], [0.75])]
    for r0, r1 in ((0, 20), (20, 48), (8, 9)):
        cut_gu = torch.cat([gate_up[:, r0:r1], gate_up[:, ffn + r0:ffn + r1]], dim=1).contiguous()
        cut_dn = down[:, :, r0:r1].contiguous()
        want = ne.expert_ffn_stacked(x, cut_gu, cut_dn, routes, threads=2)
        assert torch.equal(ne.expert_ffn_stacked(x, gate_up, down, routes, threads=2, rows=(r0, r1)), want)
        started = ne.expert_ffn_stacked(x, gate_up, down, routes, threads=2, rows=(r0, r1), start=True)
        assert torch.equal(started.wait(), want)
    whole = ne.expert_ffn_stacked(x.float(), gate_up.float(), down.float(), routes, threads=2)
    parts = sum(ne.expert_ffn_stacked(x.float(), gate_up.float(), down.float(), routes, threads=2, rows=r)
                for r in ((0, 20), (20, 48)))
    torch.testing.assert_close(parts, whole, rtol=1e-5, atol=1e-6)
    for bad in ((0, 0), (10, 5), (0, 49), (-1, 4)):
        with pytest.raises(ValueError, match="not a non-empty range"):
            ne.expert_ffn_stacked(x, gate_up, down, routes, rows=bad)


def test_stacked_refuses_strided_experts_and_rows_outside():
    d, ffn = 32, 16
    gate_up, down = torch.randn(4, 2 * ffn, d), torch.randn(4, d, ffn)
    x = torch.randn(1, d)
    with pytest.raises(ValueError, match="row is outside"):
        ne.expert_ffn_stacked(x, gate_up, down, [(4, [0], [1.0])])
    with pytest.raises(ValueError, match="each expert contiguous"):
        ne.expert_ffn_stacked(x, gate_up.transpose(1, 2).contiguous().transpose(1, 2), down, [(0, [0], [1.0])])


# ---- started on the runner thread (async_runner.cpp) -------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_started_call_gives_the_bits_of_the_call(dtype):
    """start=True runs the same call on the runner thread: the same bits, call after call, with
    the scratch shared with synchronous calls between them, per-expert and stacked, for 1 to 5 tokens."""
    d, ffn, count = 96, 40, 6
    g = torch.Generator().manual_seed(2)
    gate_up = (torch.randn(count, 2 * ffn, d, generator=g) / d ** 0.5).to(dtype)
    down = (torch.randn(count, d, ffn, generator=g) / ffn ** 0.5).to(dtype)
    scratch = ne.Scratch()
    for tokens in (1, 5, 2, 5):
        x = torch.randn(tokens, d, generator=g).to(dtype)
        picked = {r: sorted({(r + i) % tokens for i in range(3)}) for r in (4, 1, 5, 0)}  # tokens shared by experts
        routes = [(r, t, torch.rand(len(t), generator=g).tolist()) for r, t in picked.items()]
        expected = ne.expert_ffn_stacked(x, gate_up, down, routes, threads=2, scratch=scratch)
        out = torch.full_like(x, 3.0)
        started = ne.expert_ffn_stacked(x, gate_up, down, routes, out=out, threads=2, scratch=scratch, start=True)
        assert isinstance(started, ne.Started)
        assert started.wait() is out and torch.equal(out, expected)
        assert 0 < started.seconds < 60  # the runner's own time of the call (offload.cpu's cost model learns it)
        views = [(gate_up[r], down[r], t, w) for r, t, w in routes]
        assert torch.equal(ne.expert_ffn(x, views, threads=3, scratch=scratch, start=True).wait(), expected)
    assert torch.equal(ne.expert_ffn(x, [], start=True).wait(), torch.zeros_like(x))


def test_started_call_holds_its_buffers_and_is_one_at_a_time():
    """A started call keeps what it reads alive (its x made here and dropped); a second start before
    the wait is refused, the first still completes; a second wait is refused; the library's wait
    with nothing posted says so; a Started dropped unwaited is waited for, freeing the runner."""
    d, ffn = 64, 32
    x = torch.randn(4, d)
    jobs = make_jobs(d, ffn, torch.float32, [[0, 1], [2], [3, 0]])
    expected = ne.expert_ffn(x, jobs)
    started = ne.expert_ffn(x.clone(), [(gu.clone(), dn.clone(), t, w) for gu, dn, t, w in jobs], start=True)
    with pytest.raises(MoekitError, match="has not been waited for"):
        ne.expert_ffn(x, jobs, start=True)
    assert torch.equal(started.wait(), expected)
    with pytest.raises(MoekitError, match="already waited for"):
        started.wait()
    assert native.library().moekit_async_wait() == ne.ASYNC_IDLE
    dropped = ne.expert_ffn(x, jobs, start=True)
    del dropped
    assert torch.equal(ne.expert_ffn(x, jobs, start=True).wait(), expected)


@pytest.mark.parametrize("xdtype", [torch.bfloat16, torch.float32])
def test_pair_dot_products_match_the_portable_loops(xdtype):
    """bf16 weights: the AVX512-BF16 pair dot products (where compiled in) give what the portable
    loops give to float32 rounding, split activations included (float32 x: hi + lo in bf16), and
    the software prefetch changes no bit."""
    d, ffn = 200, 72  # tails past the 64-element steps in both stages
    x = torch.randn(3, d).to(xdtype)
    jobs = make_jobs(d, ffn, torch.bfloat16, [[0], [0, 2], [1, 2]])
    def poisoned() -> ne.Scratch:  # NaN where a stage reads what no stage of its own call wrote
        scratch = ne.Scratch()
        scratch.get("h", 5 * ffn).fill_(float("nan"))  # the jobs' 5 slots
        return scratch

    try:
        has = ne.tuning(pair_dots=False, prefetch_bytes=0)
        portable = ne.expert_ffn(x, jobs, threads=2, scratch=poisoned()).float()
        ne.tuning(pair_dots=True)
        pairs = ne.expert_ffn(x, jobs, threads=2, scratch=poisoned()).float()
        ne.tuning(prefetch_bytes=ne.DEFAULT_PREFETCH_BYTES)
        prefetched = ne.expert_ffn(x, jobs, threads=3).float()
    finally:
        ne.tuning(pair_dots=True, prefetch_bytes=ne.DEFAULT_PREFETCH_BYTES)
    expected = ne.reference(x, jobs)
    scale = expected.abs().max()
    # float32 x split hi + lo keeps ~16 mantissa bits (measured up to 1.4e-5 of the largest element)
    tol = 3e-5 if xdtype == torch.float32 else TOL[torch.bfloat16]
    assert (pairs - expected).abs().max() <= tol * scale
    assert (portable - expected).abs().max() <= tol * scale
    assert torch.equal(prefetched, pairs)
    if not has:  # without AVX512-BF16 both settings run the portable loops
        assert torch.equal(pairs, portable)


def test_tuning_refuses_a_negative_prefetch():
    with pytest.raises(ValueError, match="prefetch_bytes"):
        ne.tuning(prefetch_bytes=-1)
