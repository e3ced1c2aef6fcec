"""Overlapped decode steps (SchedulerConfig.overlap): the next decode-only step is launched before
the previous one's tokens are read back, its input tokens fed on the device. Tokens, stops,
aborts, preemption, sampling and logprobs are those of the plain scheduler; a sequence that stops
while its next row is already queued frees its blocks all the same. On the CPU the static step
runs eagerly, so the order of launches and reads is what is tested here (the GPU run measures
the time it saves: benchmarks/bench_serve.py)."""

from __future__ import annotations

import pytest
import torch

from moekit.serve import SamplingParams, Scheduler, SchedulerConfig

from conftest import VOCAB


def _prompts(lengths, seed=41):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


def _run(model, prompts, params, overlap, **config):
    """Returns (requests, scheduler) after serving `prompts` (params: one per prompt)."""
    sched = Scheduler(model, SchedulerConfig(static_decode=True, overlap=overlap, **config))
    reqs = [sched.add(p, q) for p, q in zip(prompts, params)]
    sched.run()
    return reqs, sched


def _outputs(reqs):
    return [(r.output, r.finish_reason, [e.top for e in r.logprobs]) for r in reqs]


@pytest.mark.parametrize("config", [
    {"max_seqs": 4, "max_step_tokens": 64},
    {"max_seqs": 3, "max_step_tokens": 8, "prefill_interval": 3},  # prompt chunks wait beside decode rows
    {"max_seqs": 4, "max_step_tokens": 64, "kv_tokens": 40, "block_size": 4},  # queueing and preemption
])
def test_overlap_gives_the_plain_schedulers_tokens(mixtral_model, config):
    """Greedy, stop tokens, max_tokens of 1 and 2 (the in-flight token is the last), seeded sampling
    and logprobs side by side; every block back at the end, one time stamp per token."""
    model = mixtral_model
    prompts = _prompts([5, 17, 2, 9, 30, 3, 11])
    plain_greedy = _run(model, prompts[:1], [SamplingParams(max_tokens=12)], overlap=False)[0][0].output
    stop = next(t for i, t in enumerate(plain_greedy) if i >= 3 and plain_greedy.index(t) == i)  # mid-decode
    params = [SamplingParams(max_tokens=12, stop_token_ids=(stop,)), SamplingParams(max_tokens=10),
              SamplingParams(max_tokens=1), SamplingParams(max_tokens=2),
              SamplingParams(max_tokens=9, temperature=1.0, top_k=20, top_p=0.9, seed=5),
              SamplingParams(max_tokens=6, logprobs=2), SamplingParams(max_tokens=11)]
    plain, _ = _run(model, prompts, params, overlap=False, **config)
    ahead, sched = _run(model, prompts, params, overlap=True, **config)
    assert _outputs(ahead) == _outputs(plain)
    assert ahead[0].finish_reason == "stop" and ahead[0].output == plain_greedy[:plain_greedy.index(stop) + 1]
    assert sched.stats.overlapped_steps > 0 and sched.stats.static_steps > sched.stats.overlapped_steps
    assert sched.cache.used_blocks == 0 and not sched.cache.tables
    assert all(len(r.token_times_s) == len(r.output) for r in ahead)
    assert sched.stats.generated_tokens == sum(len(r.output) for r in ahead)


def test_the_next_step_is_launched_before_the_tokens_are_read(mixtral_model):
    """In steady decode each step() returns the previous step's tokens with the next one already
    launched: every running sequence holds one position more than its tokens so far, and the
    launched step's input is the token step() just returned (fed on the device)."""
    model = mixtral_model
    sched = Scheduler(model, SchedulerConfig(max_seqs=2, static_decode=True))
    reqs = [sched.add(p, SamplingParams(max_tokens=10)) for p in _prompts([6, 4], seed=3)]
    fed = []
    real_fill = sched.decode._step(2).fill  # the bucket of two sequences

    def fill(rows, tokens=None):
        fed.append(None if tokens is None else tokens.tolist())
        return real_fill(rows, tokens)

    sched.decode.steps[2].fill = fill
    sched.step()  # the packed prefill (eager): both first tokens
    produced = sched.step()  # launches step 1 (host tokens) and step 2 (device tokens), returns step 1's
    assert fed == [None, [t for _, t in produced]]
    assert all(r.computed == r.length for r in reqs)  # one row ahead of what was read
    assert sched.stats.overlapped_steps == 1
    sched.run()
    assert all(len(r.output) == 10 for r in reqs) and sched.cache.used_blocks == 0


def test_abort_while_a_step_is_in_flight(mixtral_model):
    """An abort between two step() calls (the engine thread's) drops the aborted row's in-flight
    token, frees its blocks at once, and the other request goes on with its own tokens."""
    model = mixtral_model
    prompts = _prompts([8, 5], seed=9)
    alone = _run(model, prompts[1:], [SamplingParams(max_tokens=12)], overlap=False)[0][0].output
    sched = Scheduler(model, SchedulerConfig(max_seqs=2, static_decode=True, block_size=4))
    a, b = (sched.add(p, SamplingParams(max_tokens=12)) for p in prompts)
    for _ in range(4):
        sched.step()
    assert sched._inflight is not None
    held = len(a.output)
    sched.abort(a)
    assert a not in sched.cache.tables and a.finish_reason == "abort"
    sched.run()
    assert len(a.output) == held and b.output == alone and sched.cache.used_blocks == 0


def test_overlap_off_reads_every_step_back(mixtral_model):
    sched = Scheduler(mixtral_model, SchedulerConfig(static_decode=True, overlap=False))
    reqs = [sched.add(p, SamplingParams(max_tokens=6)) for p in _prompts([4, 7], seed=2)]
    while sched.has_work:
        sched.step()
        assert sched._inflight is None
    assert sched.stats.overlapped_steps == 0 and all(len(r.output) == 6 for r in reqs)


def test_prefill_cap_bounds_prompt_tokens_beside_decode_rows(mixtral_model):
    """max_prefill_tokens=5: while any sequence decodes, a step carries at most 5 prompt tokens
    (admissions and chunks); with none decoding the whole step budget; tokens unchanged."""
    model = mixtral_model
    prompts = _prompts([30, 3, 17, 9, 24], seed=13)
    params = [SamplingParams(max_tokens=7)] * len(prompts)
    plain, _ = _run(model, prompts, params, overlap=True, max_seqs=3, max_step_tokens=32)
    sched = Scheduler(model, SchedulerConfig(max_seqs=3, max_step_tokens=32, static_decode=True,
                                             max_prefill_tokens=5))
    schedule, seen = sched._schedule, []

    def recorded():  # (decode rows, prompt tokens) of each step as planned
        work = schedule()
        seen.append((sum(1 for r, n in work if r.computed == r.length - 1),
                     sum(n for r, n in work if r.computed < r.length - 1)))
        return work

    sched._schedule = recorded
    reqs = [sched.add(p, q) for p, q in zip(prompts, params)]
    sched.run()
    assert [r.output for r in reqs] == [r.output for r in plain]
    assert seen[0] == (0, 32)  # nothing decodes yet: the whole budget
    beside = [tokens for rows, tokens in seen if rows]
    assert max(beside) == 5 and all(t <= 5 for t in beside)


def test_static_mixed_defaults_off_on_the_cpu(mixtral_model):
    """Unset, static_mixed is on only where it runs (CUDA, static decode, a plain GQA model)."""
    sched = Scheduler(mixtral_model, SchedulerConfig(static_decode=True))
    assert not sched.static_mixed and sched.mixed is None


@pytest.mark.parametrize("variant", ["qwen2_moe", "mixtral"])
def test_offloaded_decode_steps_run_cut_at_the_expert_calls(tiny, variant):
    """An offloaded model's decode-only steps run at the static buckets cut at the expert calls
    (moekit.piecewise: CUDA-graph segments on GPUs, plain calls here), the experts only on the
    step's real rows (3 sequences in bucket 4); tokens equal each prompt alone on the resident model."""
    import moekit
    from moekit.offload import OffloadConfig, load_offloaded
    from moekit.paged_decode import _PiecewiseStep

    ckpt = tiny(variant)
    resident = moekit.load_model(ckpt.path)
    model = load_offloaded(ckpt.path, offload=OffloadConfig(device_memory=1 << 30, prefill_chunk=5))
    sched = Scheduler(model, SchedulerConfig(max_step_tokens=64, max_seqs=3, kv_tokens=96, block_size=4,
                                             static_decode=True))
    assert sched.decode is not None and sched.decode.piecewise
    rows = []
    for block in {id(layer.mlp): layer.mlp for layer in model.layers if layer.is_moe}.values():
        real = block.experts.forward
        block.experts.forward = lambda x, ids, w, real=real: rows.append(x.shape[0]) or real(x, ids, w)
    prompts = _prompts([7, 2, 13], seed=6)
    reqs = [sched.add(p, SamplingParams(max_tokens=6)) for p in prompts]
    sched.run()
    for prompt, r in zip(prompts, reqs):
        expected = resident.generate(torch.tensor([prompt]), max_new_tokens=6, temperature=0, eos_token_ids=())
        assert r.output == expected[0].tolist()
    assert isinstance(sched.decode.steps[4], _PiecewiseStep) and sched.stats.static_steps > 0
    assert 3 in rows and 4 not in rows  # bucket 4 ran its experts on the 3 real rows
    assert sched.stats.overlapped_steps == 0 and sched.cache.used_blocks == 0


@pytest.mark.gpu
def test_cuda_offloaded_decode_steps_replay_segment_graphs(tiny):
    """On a GPU an offloaded model's decode steps replay the captured segments (the experts
    eagerly between them), not overlapped (the host waits on each step's routing anyway):
    tokens equal each prompt alone (float32)."""
    import moekit
    from moekit.offload import OffloadConfig, load_offloaded

    ckpt = tiny("qwen3_moe")
    resident = moekit.load_model(ckpt.path, device="cuda", dtype="float32")
    model = load_offloaded(ckpt.path, device="cuda", dtype="float32", offload=OffloadConfig(device_memory=1 << 30))
    sched = Scheduler(model, SchedulerConfig(max_step_tokens=64, max_seqs=3, kv_tokens=96, block_size=4))
    assert sched.decode is not None and sched.decode.piecewise and sched.decode.use_graphs
    prompts = _prompts([7, 2, 13], seed=6)
    reqs = [sched.add(p, SamplingParams(max_tokens=8)) for p in prompts]
    sched.run()
    assert any(step.graph is not None for step in sched.decode.steps.values())
    assert sched.stats.overlapped_steps == 0
    for prompt, r in zip(prompts, reqs):
        expected = resident.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=8, temperature=0,
                                     eos_token_ids=())
        assert r.output == expected[0].tolist()
