"""The native bf16 CPU decode step (native/decode.py, decode.cpp, matvec.cpp) against the model's
own forward: the bf16 matvec against float32 arithmetic, a step's logits and cache writes against
model.forward's for three families' tiny checkpoints, the same bits at any thread count, generate
using it, and the models it declines."""

from __future__ import annotations

import pytest
import torch
from conftest import VARIANTS, cpu_step_logits_by_threads, rel_error, token_ids

import moekit
from moekit import native
from moekit.kv_cache import KVCache
from moekit.native import matvec as mv
from moekit.native.decode import CpuDecodeStep, unsupported

pytestmark = pytest.mark.skipif(native.library() is None, reason=f"no native library: {native.unavailable_reason()}")

BF16_TOL = 2e-2  # bf16 rounding of every intermediate, in a different order than PyTorch's


@pytest.mark.parametrize("n,k", [(50, 64), (7, 96), (130, 2048), (3, 40), (257, 128)])
@pytest.mark.parametrize("m", [1, 3, 16])
def test_matvec_matches_reference(n, k, m):
    g = torch.Generator().manual_seed(n * k + m)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    bias = torch.randn(n, generator=g).to(torch.bfloat16)
    for b in (None, bias):
        out = mv.matvec(x, w, b, threads=2)
        expected = mv.reference(x, w, b)
        assert out.dtype == torch.bfloat16 and out.shape == (m, n)
        # float32 sums rounded once to bf16: within one bf16 rounding of the exact result
        assert ((out.float() - expected).abs() <= expected.abs() * 2 ** -8 + 1e-3 * expected.abs().max()).all()
        assert torch.equal(out, mv.matvec(x, w, b, threads=1))


def _moe_reference(x, gate_up, down, ids, weights):
    """decode.cpp's moekit_moe_decode_bf16 in PyTorch: float32 dots, bf16 between the ops, float32 sum."""
    bf = torch.bfloat16
    out = torch.zeros(x.shape[0])
    for e, w in zip(ids.tolist(), weights.tolist()):
        gu = (gate_up[e].float() @ x.float()).to(bf).float()
        g, u = gu.chunk(2)
        h = (torch.nn.functional.silu(g).to(bf).float() * u).to(bf).float()
        out += w * (down[e].float() @ h)
    return out.to(bf)


# (D, I): multiples of 32 take dot_avx2.h's streams on a CPU without bf16 dot products; 48 the portable loop
@pytest.mark.parametrize("d,i", [(256, 96), (160, 64), (64, 48), (288, 160)])
def test_moe_decode_matches_reference(d, i):
    lib = native.library()
    g = torch.Generator().manual_seed(d + i)
    e, a = 6, 3
    x = torch.randn(d, generator=g).to(torch.bfloat16)
    gate_up = (torch.randn(e, 2 * i, d, generator=g) / d ** 0.5).to(torch.bfloat16)
    down = (torch.randn(e, d, i, generator=g) / i ** 0.5).to(torch.bfloat16)
    ids = torch.tensor([4, 1, 5])
    weights = torch.tensor([0.5, 0.3125, 0.1875])
    results = []
    for threads in (1, 2, 3, 5):  # odd splits of the (expert, ffn row) items and of the output rows
        h, hb, out = torch.empty(max(a * i, d)), torch.empty(a * i, dtype=torch.bfloat16), torch.empty(d, dtype=torch.bfloat16)
        assert lib.moekit_moe_decode_bf16(x.data_ptr(), gate_up.data_ptr(), down.data_ptr(), ids.data_ptr(),
                                          weights.data_ptr(), a, d, i, h.data_ptr(), hb.data_ptr(), out.data_ptr(),
                                          threads) == 0
        results.append(out)
    assert all(torch.equal(results[0], r) for r in results[1:])  # each output row sums its experts in order on one thread
    assert rel_error(results[0].float(), _moe_reference(x, gate_up, down, ids, weights).float()) <= 1e-2


def _cpu_flags() -> set[str]:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def test_dot_avx2_runs_exactly_where_it_should():
    """dot_avx2.h's streams run on an AVX2 CPU without AVX512-BF16 (the build is -march=native) and
    never where AVX512-BF16 exists (its vdpbf16ps paths stay); MOEKIT_AVX2_DOT=0 switches them off."""
    import subprocess
    import sys

    flags = _cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags here")
    active = native.library().moekit_dot_avx2_active()
    assert active == int({"avx2", "fma"} <= flags and "avx512_bf16" not in flags)
    code = "from moekit import native; print(native.library().moekit_dot_avx2_active())"
    off = subprocess.run([sys.executable, "-c", code], env={**__import__("os").environ, "MOEKIT_AVX2_DOT": "0"},
                         capture_output=True, text=True, check=True)
    assert off.stdout.strip() == "0"


def test_threaded_one_token_matvec_same_bits_at_any_thread_count():
    """Past 1 MiB of weights the one-token matvec splits rows over threads (the AVX2 streams cut each
    thread's rows in four ranges): every row once, the same bits at 1, 2, 3 and 7 threads."""
    g = torch.Generator().manual_seed(5)
    n, k = 515, 2048  # 2.1 MB of bf16 weights, rows not a multiple of 4 or of any thread count
    x = torch.randn(1, k, generator=g).to(torch.bfloat16)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    outs = [mv.matvec(x, w, None, threads=t) for t in (1, 2, 3, 7)]
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    expected = mv.reference(x, w, None)
    assert ((outs[0].float() - expected).abs() <= expected.abs() * 2 ** -8 + 1e-3 * expected.abs().max()).all()


def test_matvec_refuses():
    with pytest.raises(ValueError, match="matvec takes"):
        mv.matvec(torch.ones(17, 32, dtype=torch.bfloat16), torch.ones(4, 32, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="matvec takes"):
        mv.matvec(torch.ones(1, 32), torch.ones(4, 32))


def test_model_linear_sends_bf16_rows_to_matvec():
    from moekit.linear import Linear

    layer = Linear(64, 48, bias=True).to(torch.bfloat16)
    x = torch.randn(2, 3, 64).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(layer(x), mv.matvec(x.reshape(6, 64), layer.weight, layer.bias).view(2, 3, 48))


def _bf16_model(tiny, variant):
    return moekit.load_model(tiny(variant).path, dtype=torch.bfloat16)


@pytest.mark.parametrize("variant", ["olmoe", "qwen3_moe", "mixtral"])  # q/k norm full, per head, none (GQA)
def test_step_matches_forward(tiny, variant):
    model = _bf16_model(tiny, variant)
    cfg = model.config
    ids = token_ids(1, 12)
    eager, native_cache = (KVCache(cfg, 1, 40, "cpu", torch.bfloat16) for _ in range(2))
    with torch.inference_mode():
        model(ids, cache=eager, start=0)
        model(ids, cache=native_cache, start=0)
        assert unsupported(model, native_cache) is None
        step = CpuDecodeStep(model, native_cache)
        token = 3
        for position in range(12, 30):
            expected = model(torch.tensor([[token]]), cache=eager, start=position)[0]
            logits = step(token, position)
            assert logits.shape == (1, cfg.vocab_size) and logits.dtype == torch.bfloat16
            assert rel_error(logits.float(), expected.float()) <= BF16_TOL
            token = int(expected.argmax())
    for ours, theirs in ((native_cache.keys, eager.keys), (native_cache.values, eager.values)):
        written = [torch.cat([t[:, :, 12:30].float() for t in pools]) for pools in (ours, theirs)]
        assert rel_error(*written) <= BF16_TOL


@pytest.mark.parametrize("variant", ["olmoe", "qwen3_moe"])
def test_one_call_step_is_its_pieces(tiny, variant):
    """decode.cpp's moekit_decode_step_bf16 makes the pieces' calls in C: the same bits, cache included."""
    model = _bf16_model(tiny, variant)
    ids = token_ids(1, 12)
    caches = [KVCache(model.config, 1, 24, "cpu", torch.bfloat16) for _ in range(2)]
    with torch.inference_mode():
        for cache in caches:
            model(ids, cache=cache, start=0)
        whole, pieces = CpuDecodeStep(model, caches[0]), CpuDecodeStep(model, caches[1])
        for i, token in enumerate((3, 9, 4, 4)):
            assert torch.equal(whole(token, 12 + i), pieces.pieces(token, 12 + i))
    assert all(torch.equal(a, b) for a, b in zip(caches[0].keys + caches[0].values, caches[1].keys + caches[1].values))


def test_refuses_positions_and_tokens_outside(tiny):
    from moekit.errors import MoekitError

    model = _bf16_model(tiny, "olmoe")
    step = CpuDecodeStep(model, KVCache(model.config, 1, 4, "cpu", torch.bfloat16))
    with pytest.raises(MoekitError, match="KV cache holds 4 positions"):
        step(1, 4)
    with pytest.raises(MoekitError, match="outside the vocabulary"):
        step(model.config.vocab_size, 0)


def test_greedy_is_torch_argmax(tiny):
    model = _bf16_model(tiny, "olmoe")
    step = CpuDecodeStep(model, KVCache(model.config, 1, 4, "cpu", torch.bfloat16))
    logits = torch.randn(1, model.config.vocab_size).to(torch.bfloat16)
    logits[0, 7] = logits[0, 9] = logits.max() + 1  # a tie: the first wins
    assert step.greedy(logits).tolist() == logits.argmax(-1).tolist() == [7]


def test_step_same_bits_any_thread_count(tiny):
    model = _bf16_model(tiny, "olmoe")
    results = cpu_step_logits_by_threads(model)
    assert torch.equal(results[0], results[1])


def test_generate_uses_it(tiny, monkeypatch):
    model = _bf16_model(tiny, "olmoe")
    ids = token_ids(1, 10)
    stats = moekit.GenerationStats()
    native_tokens = model.generate(ids, max_new_tokens=12, temperature=0, eos_token_ids=(), stats=stats)
    assert stats.extra["native_cpu_step"] is True
    monkeypatch.setenv("MOEKIT_CPU_DECODE", "0")
    stats = moekit.GenerationStats()
    eager_tokens = model.generate(ids, max_new_tokens=12, temperature=0, eos_token_ids=(), stats=stats)
    assert stats.extra["native_cpu_step"] is False
    # bf16 rounding in another order may flip a near-tie, after which the continuations differ
    assert torch.equal(native_tokens[:, :4], eager_tokens[:, :4])


def test_declines_what_it_does_not_implement(tiny, mixtral_model):
    cache = KVCache(mixtral_model.config, 1, 8, "cpu", torch.float32)
    assert unsupported(mixtral_model, cache) == "not a bf16 model on the CPU"
    model = _bf16_model(tiny, "qwen2_moe")  # a shared expert
    assert unsupported(model, KVCache(model.config, 1, 8, "cpu", torch.bfloat16)) is not None
    model = _bf16_model(tiny, "olmoe")
    assert unsupported(model, KVCache(model.config, 2, 8, "cpu", torch.bfloat16)) == "not a batch-1 dense KVCache"
    handle = model.layers[0].mlp.register_forward_hook(lambda *a: None)
    try:
        assert unsupported(model, KVCache(model.config, 1, 8, "cpu", torch.bfloat16)) == "forward hooks on the model"
    finally:
        handle.remove()


# the tiny variants whose config the native step takes (the rest: sliding windows, clipping, shared
# experts, sigmoid routing, LayerNorm, muP scalars, MLA, sinks, dense layers)
STEP_VARIANTS = {"mixtral", "mixtral_tied", "mixtral_yarn", "mixtral_linear", "qwen3_moe", "olmoe"}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_config_check_agrees_with_the_loaded_model(tiny, variant):
    """The CLI picks bf16 on the CPU by config_unsupported before loading: a config it takes must
    give a loaded model the step takes, and the set it takes is the one named here."""
    from moekit.native.decode import config_unsupported

    model = _bf16_model(tiny, variant)
    takes = config_unsupported(model.config) is None
    assert takes == (variant in STEP_VARIANTS)
    if takes:
        assert unsupported(model, KVCache(model.config, 1, 8, "cpu", torch.bfloat16)) is None


def test_advise_huge_pages_keeps_values():
    from moekit.native.hugepages import HUGE_PAGE_BYTES, advise_huge_pages

    fresh = torch.empty(8 * HUGE_PAGE_BYTES // 2, dtype=torch.bfloat16)  # 8 MB: at least 3 whole 2 MB pages
    filled = torch.randn(3 * HUGE_PAGE_BYTES // 4)
    before = filled.clone()
    advised = advise_huge_pages([fresh, filled, filled[10:], torch.ones(3)])
    assert advised % HUGE_PAGE_BYTES == 0
    if advised:  # Linux: the whole 2 MB pages inside each storage, the tied view counted once
        assert advised >= 5 * HUGE_PAGE_BYTES
    fresh.fill_(1.5)
    assert torch.equal(filled, before) and bool((fresh == 1.5).all())
