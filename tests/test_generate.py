"""Generation: greedy and sampling, eos handling, streaming callback, argument errors."""

from __future__ import annotations

import pytest
import torch

import moekit
from moekit.generate import GenerationStats, sample

from conftest import MAX_POS, VOCAB, token_ids


@pytest.fixture(scope="module")
def model(tiny):
    """A private tiny mixtral (tests here may change its generation defaults)."""
    return moekit.load_model(tiny("mixtral").path)


def greedy(model, ids, n=16):
    return model.generate(ids, max_new_tokens=n, temperature=0, eos_token_ids=())


# ---- sampling ----------------------------------------------------------------------------

def test_seed_reproducible(model):
    ids = token_ids(2, 6)
    a = model.generate(ids, 16, temperature=1.0, seed=123, eos_token_ids=())
    b = model.generate(ids, 16, temperature=1.0, seed=123, eos_token_ids=())
    c = model.generate(ids, 16, temperature=1.0, seed=124, eos_token_ids=())
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_temperature_gives_valid_ids(model):
    out = model.generate(token_ids(3, 5), 16, temperature=1.5, top_k=10, top_p=0.9, seed=0,
                         eos_token_ids=())
    assert out.shape == (3, 16) and out.dtype == torch.long
    assert ((out >= 0) & (out < VOCAB)).all()


def test_sampling_differs_from_greedy(model):
    ids = token_ids(1, 6)
    hot = model.generate(ids, 16, temperature=5.0, seed=0, eos_token_ids=())
    assert not torch.equal(hot, greedy(model, ids))


def test_top_k_1_is_greedy(model):
    ids = token_ids(2, 6, seed=3)
    out = model.generate(ids, 16, temperature=1.0, top_k=1, seed=7, eos_token_ids=())
    assert torch.equal(out, greedy(model, ids))


def test_tiny_top_p_is_greedy(model):
    ids = token_ids(2, 6, seed=4)
    out = model.generate(ids, 16, temperature=1.0, top_p=1e-6, seed=7, eos_token_ids=())
    assert torch.equal(out, greedy(model, ids))


def test_sample_top_k_and_top_p_filter():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    picks = lambda **kw: {int(sample(logits, temperature=1.0, generator=g, **kw)) for _ in range(200)}
    assert picks(top_k=2) == {0, 1}
    assert picks(top_p=0.6) == {0, 1}  # 0.5 < 0.6: the second token is needed to reach it
    assert picks(top_p=0.5) == {0}  # the first alone reaches 0.5
    assert picks(top_p=0.9) == {0, 1, 2}
    assert picks() == {0, 1, 2, 3}
    assert int(sample(logits, temperature=0)) == 0


# ---- eos ---------------------------------------------------------------------------------

def _first_index(row: torch.Tensor, token: int) -> int | None:
    hits = (row == token).nonzero()
    return int(hits[0]) if len(hits) else None


def test_eos_stops_and_pads(model):
    ids = token_ids(1, 6, seed=11)
    free = greedy(model, ids)
    eos = int(free[0, 4])
    stop = _first_index(free[0], eos)
    stats = GenerationStats()
    out = model.generate(ids, 16, temperature=0, eos_token_ids=(eos,), stats=stats)
    assert out.shape == (1, 16)
    assert torch.equal(out[0, :stop + 1], free[0, :stop + 1])
    assert (out[0, stop + 1:] == eos).all()
    assert stats.new_tokens == stop + 1  # stopped early
    assert stats.prompt_tokens == 6


def test_eos_in_a_batch_pads_the_finished_row_only(model):
    ids = token_ids(2, 6, seed=12)
    free = greedy(model, ids)
    # an eos that row 0 produces early and row 1 never does
    eos = next(int(t) for t in free[0, :8] if t not in free[1])
    out = model.generate(ids, 16, temperature=0, eos_token_ids=(eos,))
    assert _first_index(free[1], eos) is None and (out[0, -1] == eos)
    for row in range(2):
        stop = _first_index(free[row], eos)
        if stop is None:
            assert torch.equal(out[row], free[row])
        else:
            assert torch.equal(out[row, :stop + 1], free[row, :stop + 1])
            assert (out[row, stop + 1:] == eos).all()


def test_stop_at_eos_false_keeps_going(model):
    ids = token_ids(1, 6, seed=11)
    free = greedy(model, ids)
    out = model.generate(ids, 16, temperature=0, eos_token_ids=(int(free[0, 1]),), stop_at_eos=False)
    assert torch.equal(out, free)


@pytest.mark.parametrize("variant", ["mixtral", "qwen3_moe"])
def test_eos_matches_transformers(tiny, variant):
    """With an eos it hits, transformers stops too: equal up to its end, moekit pads with eos."""
    ckpt = tiny(variant)
    model = moekit.load_model(ckpt.path)
    ids = token_ids(2, 8, seed=13)
    free = greedy(model, ids)
    eos = int(free[1, 3])
    ours = model.generate(ids, 16, temperature=0, eos_token_ids=(eos,))
    from transformers import GenerationConfig

    gen = GenerationConfig(do_sample=False, max_new_tokens=16, eos_token_id=eos, pad_token_id=eos)
    with torch.no_grad():
        theirs = ckpt.hf.generate(ids, generation_config=gen, attention_mask=torch.ones_like(ids))[:, 8:]
    n = theirs.shape[1]
    assert torch.equal(ours[:, :n], theirs)
    assert (ours[:, n:] == eos).all()


def test_generation_defaults_are_used(tiny):
    model = moekit.load_model(tiny("mixtral").path)
    ids = token_ids(1, 6, seed=11)
    free = greedy(model, ids)
    model.generation_defaults = {"eos_token_ids": (int(free[0, 2]),), "temperature": 0.0}
    out = model.generate(ids, 16)  # greedy, stopping at the default eos
    stop = _first_index(free[0], int(free[0, 2]))
    assert torch.equal(out[0, :stop + 1], free[0, :stop + 1])
    assert (out[0, stop + 1:] == free[0, 2]).all()


# ---- streaming and stats -----------------------------------------------------------------

def test_on_token_sees_every_step(model):
    seen = []
    out = model.generate(token_ids(2, 5), 7, temperature=0, eos_token_ids=(), on_token=seen.append)
    assert len(seen) == 7
    assert torch.equal(torch.stack(seen, dim=1), out)


def test_stats(model):
    stats = GenerationStats()
    model.generate(token_ids(1, 9), 8, temperature=0, eos_token_ids=(), stats=stats)
    assert stats.prompt_tokens == 9 and stats.new_tokens == 8
    assert stats.prefill_s > 0 and stats.decode_s > 0
    assert stats.decode_tok_s > 0 and stats.prefill_tok_s > 0
    assert not stats.cuda_graph


def test_generate_function_equals_method(model):
    ids = token_ids(1, 5)
    assert torch.equal(moekit.generate(model, ids, max_new_tokens=5, temperature=0, eos_token_ids=()),
                       greedy(model, ids, 5))


def test_exactly_fills_the_context(model):
    out = greedy(model, token_ids(1, MAX_POS - 4), 4)
    assert out.shape == (1, 4)


# ---- argument errors ---------------------------------------------------------------------

@pytest.mark.parametrize("n", [0, -3])
def test_max_new_tokens_must_be_positive(model, n):
    with pytest.raises(moekit.MoekitError, match="max_new_tokens must be > 0"):
        model.generate(token_ids(1, 4), max_new_tokens=n)


def test_too_long_for_the_context(model):
    with pytest.raises(moekit.MoekitError, match=f"exceeds the model's context of {MAX_POS}"):
        model.generate(token_ids(1, MAX_POS - 4), max_new_tokens=5)


@pytest.mark.parametrize("shape", [(1, 0), (5,)])
def test_bad_input_shape(model, shape):
    with pytest.raises(moekit.MoekitError, match="input_ids must be"):
        model.generate(torch.zeros(shape, dtype=torch.long), max_new_tokens=2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU message")
def test_cuda_graph_needs_cuda(model):
    with pytest.raises(moekit.MoekitError, match="cuda_graph=True needs"):
        model.generate(token_ids(1, 4), max_new_tokens=2, cuda_graph=True)


# ---- GPU ---------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["mixtral", "qwen2_moe", "olmoe_clip"])
@pytest.mark.parametrize("batch", [1, 3])
def test_cuda_graph_decode_equals_eager(tiny, variant, batch):
    model = moekit.load_model(tiny(variant).path, device="cuda", dtype="float32")
    ids = token_ids(batch, 7).cuda()
    stats = GenerationStats()
    graphed = model.generate(ids, 16, temperature=0, eos_token_ids=(), cuda_graph=True, stats=stats)
    eager = model.generate(ids, 16, temperature=0, eos_token_ids=(), cuda_graph=False)
    assert stats.cuda_graph
    assert torch.equal(graphed, eager)
    assert torch.equal(graphed.cpu(), tiny(variant).hf_greedy(ids.cpu(), 16))


@pytest.mark.gpu
def test_cuda_seeded_sampling_reproducible(tiny):
    model = moekit.load_model(tiny("mixtral").path, device="cuda")
    ids = token_ids(2, 5).cuda()
    a = model.generate(ids, 12, temperature=1.0, top_p=0.9, seed=5, eos_token_ids=())
    b = model.generate(ids, 12, temperature=1.0, top_p=0.9, seed=5, eos_token_ids=())
    assert torch.equal(a, b) and a.device.type == "cuda"
