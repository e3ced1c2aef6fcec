"""Generation: greedy and sampling, eos handling, streaming callback, argument errors."""

from __future__ import annotations

import pytest
import torch

import moekit
from moekit.generate import GenerationStats, sample

from conftest import FAMILY_VARIANTS, MAX_POS, VOCAB, token_ids


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


@pytest.mark.parametrize("bad", [-1, "vocab"])
def test_token_ids_outside_the_vocabulary_are_refused(model, bad):
    """A prompt encoded with a tokenizer larger than the model's embedding gets a message, not an
    IndexError from inside the embedding."""
    ids = token_ids(1, 4)
    ids[0, 2] = model.config.vocab_size if bad == "vocab" else bad
    with pytest.raises(moekit.MoekitError, match=rf"token ids must be in \[0, {model.config.vocab_size}\)"):
        model.generate(ids, max_new_tokens=2)


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


# ---- ragged batches (a list of prompts of different lengths) -------------------------------

def _prompts(lengths, seed=21):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g) for n in lengths]


RAGGED_LENGTHS = [1, 9, 3, 40, 17, 100]


@pytest.mark.parametrize("variant", FAMILY_VARIANTS + ["mixtral_sliding"])
def test_ragged_equals_each_prompt_alone_and_transformers(tiny, variant):
    """Prompts of lengths 1..100 in one ragged batch: each gets exactly the tokens it gets alone
    (moekit's static path) and from transformers."""
    ckpt = tiny(variant)
    model = moekit.load_model(ckpt.path)
    prompts = _prompts(RAGGED_LENGTHS)
    outs = model.generate(prompts, max_new_tokens=8, temperature=0, eos_token_ids=())
    assert len(outs) == len(prompts)
    for prompt, out in zip(prompts, outs):
        alone = greedy(model, prompt[None], 8)[0]
        assert torch.equal(out, alone)
        assert torch.equal(out, ckpt.hf_greedy(prompt[None], 8)[0])


def test_ragged_prefill_in_chunks_equals_whole(model, monkeypatch):
    """Packed prefill cut into steps of 7 tokens (prompts split across steps) gives the same tokens."""
    import importlib

    gen = importlib.import_module("moekit.generate")  # the module (moekit.generate is the function)

    class Chunked:
        prefill_chunk = 7

        def reserve(self, batch, positions):
            self.reserved = (batch, positions)

    prompts = _prompts([5, 23, 2, 11], seed=3)
    whole = model.generate(prompts, max_new_tokens=6, temperature=0, eos_token_ids=())
    runtime = Chunked()
    monkeypatch.setattr(gen, "expert_runtime", lambda m: runtime)
    chunked = model.generate(prompts, max_new_tokens=6, temperature=0, eos_token_ids=())
    assert runtime.reserved[0] == 1 and runtime.reserved[1] >= sum(len(p) + 6 for p in prompts)
    assert all(torch.equal(a, b) for a, b in zip(whole, chunked))


def test_prefill_steps_pack_and_split():
    steps = gen_prefill_steps([5, 3, 9], 4)
    assert steps == [[(0, 0, 4)], [(0, 4, 1), (1, 0, 3)], [(2, 0, 4)], [(2, 4, 4)], [(2, 8, 1)]]
    assert all(sum(n for _, _, n in s) <= 4 for s in steps)
    assert gen_prefill_steps([2, 1], 100) == [[(0, 0, 2), (1, 0, 1)]]


def gen_prefill_steps(lengths, chunk):
    from moekit.generate import prefill_steps

    return prefill_steps(lengths, chunk)


def test_ragged_eos_retires_each_sequence(model):
    prompts = _prompts([4, 12, 7], seed=5)
    free = model.generate(prompts, max_new_tokens=12, temperature=0, eos_token_ids=())
    eos = int(free[1][3])
    outs = model.generate(prompts, max_new_tokens=12, temperature=0, eos_token_ids=(eos,))
    for f, o in zip(free, outs):
        stop = _first_index(f, eos)
        expected = f if stop is None else f[:stop + 1]
        assert torch.equal(o, expected)
    assert len(outs[1]) <= 4 < max(len(o) for o in outs)  # one retired early, another ran on


def test_ragged_seeded_sampling_equals_alone(model):
    prompts = _prompts([3, 14, 8], seed=6)
    outs = model.generate(prompts, 10, temperature=1.0, top_k=20, top_p=0.95, seed=9, eos_token_ids=())
    for prompt, out in zip(prompts, outs):
        alone = model.generate(prompt[None], 10, temperature=1.0, top_k=20, top_p=0.95, seed=9, eos_token_ids=())
        assert torch.equal(out, alone[0])


def test_ragged_takes_a_seed_per_prompt(model):
    """One seed: a prompt given twice draws the same tokens twice; a seed a prompt: each the tokens
    it draws alone with its seed (moekit batch --parallel samples the i-th prompt from seed + i)."""
    from moekit.errors import MoekitError
    from moekit.generate import generate_ragged

    prompt = _prompts([6], seed=2)[0]
    same = generate_ragged(model, [prompt, prompt], 12, temperature=1.0, seed=5, eos_token_ids=())
    assert torch.equal(same[0], same[1])
    own = generate_ragged(model, [prompt, prompt], 12, temperature=1.0, seed=[5, 6], eos_token_ids=())
    assert torch.equal(own[0], same[0]) and not torch.equal(own[0], own[1])
    alone = generate_ragged(model, [prompt], 12, temperature=1.0, seed=[6], eos_token_ids=())
    assert torch.equal(own[1], alone[0])
    with pytest.raises(MoekitError, match="2 seeds for 1 prompts"):
        generate_ragged(model, [prompt], 4, seed=[1, 2])


def test_ragged_on_token_and_stats(model):
    seen = []
    stats = GenerationStats()
    prompts = [[5, 6, 7], [8]]
    outs = model.generate(prompts, 5, temperature=0, eos_token_ids=(), on_token=seen.append, stats=stats)
    assert len(seen) == 5 and all(t.shape == (2,) for t in seen)
    assert torch.equal(torch.stack(seen, dim=1), torch.stack(outs))
    assert stats.prompt_tokens == 4 and stats.new_tokens == 5 and stats.prefill_s > 0


@pytest.mark.parametrize("prompts, match", [
    ([], "at least one prompt"),
    ([[5], []], "prompt 1 is empty"),
    ([[5], [VOCAB]], "prompt 1: token ids must be in"),
    ([[5], "abc"], "prompt 1: give token ids"),
    ([torch.zeros(2, 2, dtype=torch.long)], "prompt 0: a tensor prompt must be 1-D"),
    ([[5], [4] * (MAX_POS - 2)], "prompt 1 .* exceeds the model's context"),
])
def test_ragged_bad_prompts(model, prompts, match):
    with pytest.raises(moekit.MoekitError, match=match):
        model.generate(prompts, max_new_tokens=4)


def test_ragged_refuses_compile_and_cpu_graphs(model):
    with pytest.raises(moekit.MoekitError, match="equal-length batch tensor"):
        model.generate([[5, 6], [7]], max_new_tokens=2, compile=True)
    if not torch.cuda.is_available():
        with pytest.raises(moekit.MoekitError, match="cuda_graph=True needs"):
            model.generate([[5, 6], [7]], max_new_tokens=2, cuda_graph=True)


def test_ragged_offloaded_equals_resident(tiny):
    """An offloaded model (experts in a 2-slot cache, prefill chunk 5) runs ragged batches too."""
    from moekit.offload import OffloadConfig, load_offloaded

    ckpt = tiny("mixtral")
    resident = moekit.load_model(ckpt.path)
    offloaded = load_offloaded(ckpt.path, offload=OffloadConfig(device_memory=1 << 30, prefill_chunk=5))
    prompts = _prompts([6, 13, 2], seed=8)
    expected = resident.generate(prompts, 6, temperature=0, eos_token_ids=())
    got = offloaded.generate(prompts, 6, temperature=0, eos_token_ids=())
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["mixtral", "qwen3_moe", "mixtral_sliding", "olmoe_clip"])
def test_cuda_ragged_equals_alone(tiny, variant):
    """On a GPU, ragged decode attends through the Triton paged kernel: tokens still equal each
    prompt alone (float32) and transformers."""
    ckpt = tiny(variant)
    model = moekit.load_model(ckpt.path, device="cuda", dtype="float32")
    prompts = _prompts(RAGGED_LENGTHS)
    outs = model.generate([p.cuda() for p in prompts], max_new_tokens=8, temperature=0, eos_token_ids=())
    for prompt, out in zip(prompts, outs):
        assert out.is_cuda
        assert torch.equal(out.cpu(), ckpt.hf_greedy(prompt[None], 8)[0])


@pytest.mark.parametrize("variant", ["qwen3_moe", "mixtral_sliding"])
def test_ragged_prompts_up_to_200_tokens(tmp_path, variant):
    """Lengths 1..200 in one batch (a 256-position copy of the tiny family): each prompt's tokens
    equal transformers' greedy tokens for it alone."""
    from conftest import build_hf_model
    from transformers import GenerationConfig

    hf = build_hf_model(variant, max_position_embeddings=256)
    hf.save_pretrained(tmp_path)
    model = moekit.load_model(tmp_path)
    prompts = _prompts([200, 1, 64, 13, 130], seed=23)
    outs = model.generate(prompts, max_new_tokens=6, temperature=0, eos_token_ids=())
    gen = GenerationConfig(do_sample=False, max_new_tokens=6, eos_token_id=None, pad_token_id=0)
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            theirs = hf.generate(prompt[None], generation_config=gen, attention_mask=torch.ones_like(prompt[None]))
        assert torch.equal(out, theirs[0, len(prompt):])
