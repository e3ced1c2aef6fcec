"""Continuous batching: requests of different lengths, arriving at different steps, under a small
token budget and a small KV cache, give exactly the tokens each gives alone; blocks are freed
when sequences end; a full cache queues and preempts instead of failing."""

from __future__ import annotations

import pytest
import torch

import moekit
from moekit.serve import QueueFull, SamplingParams, Scheduler, SchedulerConfig

from conftest import MAX_POS, VOCAB


def _prompts(lengths, seed=31):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


def _alone(model, prompt, n):
    return model.generate(torch.tensor([prompt]), max_new_tokens=n, temperature=0, eos_token_ids=())[0].tolist()


LENGTHS = [5, 30, 1, 12, 47, 3]


@pytest.mark.parametrize("static_decode", [False, True])
def test_chunked_prefill_beside_decode_equals_alone(mixtral_model, static_decode):
    """Budget 8 tokens per step, at most 3 sequences: long prompts prefill in chunks while the
    others decode; late requests join mid-run. With static_decode, decode-only steps run at
    bucketed static shapes (eagerly here; CUDA graphs on GPUs)."""
    model = mixtral_model
    sched = Scheduler(model, SchedulerConfig(max_seqs=3, max_step_tokens=8, static_decode=static_decode))
    assert (sched.decode is not None) == static_decode
    prompts = _prompts(LENGTHS)
    params = SamplingParams(max_tokens=10)
    requests = [sched.add(p, params) for p in prompts[:4]]
    mixed = False
    for _ in range(6):  # the last two arrive after a few steps
        sched.step()
        mixed |= any(r.output for r in sched.running) and any(r.computed < len(r.prompt) for r in sched.running)
        assert len(sched.running) <= 3
    requests += [sched.add(p, params) for p in prompts[4:]]
    sched.run()
    assert mixed  # some step held a decoding sequence beside a prefilling one
    for prompt, request in zip(prompts, requests):
        assert request.output == _alone(model, prompt, 10)
        assert request.finish_reason == "length"
    assert sched.cache.used_blocks == 0 and sched.stats.requests_finished == len(prompts)
    assert sched.stats.generated_tokens == 10 * len(prompts)
    for r in requests:  # timings for latency figures: one per token, in order, after arrival
        assert len(r.token_times_s) == 10 and r.time_to_first_token_s > 0
        assert len(r.inter_token_s) == 9 and min(r.inter_token_s) > 0
    if static_decode:
        assert set(sched.decode.steps) <= {1, 2, 4} and sched.decode.steps  # buckets of up to 3 sequences


def test_stop_token_retires_at_once(mixtral_model):
    model = mixtral_model
    prompts = _prompts([4, 9], seed=2)
    free = [_alone(model, p, 12) for p in prompts]
    stop = free[0][3]
    sched = Scheduler(model, SchedulerConfig(block_size=4))
    finished = []
    reqs = [sched.add(p, SamplingParams(max_tokens=12, stop_token_ids=(stop,)), on_finish=finished.append)
            for p in prompts]
    while reqs[0] not in finished:
        sched.step()
    assert reqs[0].finish_reason == "stop" and reqs[0].output[-1] == stop
    assert reqs[0] not in sched.cache.tables  # its blocks went back the step it ended
    sched.run()
    for f, r in zip(free, reqs):
        cut = f.index(stop) + 1 if stop in f else len(f)
        assert r.output == f[:cut]


def test_full_cache_queues_and_preempts_without_changing_tokens(mixtral_model):
    """A cache of 6 blocks of 4 positions (24) for requests of up to 20 positions each: requests
    wait for blocks, the newest running sequence is preempted and recomputed, tokens unchanged."""
    model = mixtral_model
    sched = Scheduler(model, SchedulerConfig(max_seqs=4, max_step_tokens=64, kv_tokens=24, block_size=4))
    prompts = _prompts([6, 9, 3, 10], seed=4)
    reqs = [sched.add(p, SamplingParams(max_tokens=10)) for p in prompts]
    queued = False
    while sched.has_work:
        sched.step()
        queued |= bool(sched.waiting) and bool(sched.running)
        assert sched.cache.used_blocks <= 6
    assert queued and sched.stats.preemptions > 0
    for prompt, r in zip(prompts, reqs):
        assert r.output == _alone(model, prompt, 10)
    assert sched.cache.used_blocks == 0


def test_seeded_sampling_equals_alone(mixtral_model):
    model = mixtral_model
    prompts = _prompts([3, 11, 7], seed=5)
    sched = Scheduler(model, SchedulerConfig(max_step_tokens=5))
    params = SamplingParams(max_tokens=8, temperature=1.0, top_k=20, top_p=0.9, seed=3)
    reqs = [sched.add(p, params) for p in prompts]
    sched.run()
    for prompt, r in zip(prompts, reqs):
        alone = model.generate(torch.tensor([prompt]), 8, temperature=1.0, top_k=20, top_p=0.9, seed=3,
                               eos_token_ids=())
        assert r.output == alone[0].tolist()


def test_abort_frees_blocks(mixtral_model):
    sched = Scheduler(mixtral_model, SchedulerConfig(block_size=4))
    a = sched.add(_prompts([20])[0], SamplingParams(max_tokens=20))
    b = sched.add([5, 6], SamplingParams(max_tokens=3))
    sched.step()
    assert sched.cache.used_blocks > 0
    sched.abort(a)
    assert a.finish_reason == "abort" and a not in sched.running and a not in sched.cache.tables
    sched.run()
    assert b.finish_reason == "length" and sched.cache.used_blocks == 0
    assert sched.stats.requests_aborted == 1


def test_offloaded_model_equals_alone(tiny):
    """An offloaded model (prefill chunk and expert cache) under the scheduler."""
    from moekit.offload import OffloadConfig, load_offloaded

    ckpt = tiny("qwen2_moe")
    resident = moekit.load_model(ckpt.path)
    model = load_offloaded(ckpt.path, offload=OffloadConfig(device_memory=1 << 30, prefill_chunk=5))
    sched = Scheduler(model, SchedulerConfig(max_step_tokens=6, max_seqs=2, kv_tokens=40, block_size=4))
    prompts = _prompts([7, 2, 13], seed=6)
    reqs = [sched.add(p, SamplingParams(max_tokens=5)) for p in prompts]
    sched.run()
    for prompt, r in zip(prompts, reqs):
        assert r.output == _alone(resident, prompt, 5)


@pytest.mark.parametrize("prompt, params, match", [
    ([], SamplingParams(), "prompt is empty"),
    ([VOCAB + 1], SamplingParams(), "token ids must be in"),
    ([5] * (MAX_POS - 3), SamplingParams(max_tokens=4), "exceeds the model's context"),
    ([5] * 20, SamplingParams(max_tokens=10), "the KV cache holds 16"),
])
def test_requests_that_can_never_run(mixtral_model, prompt, params, match):
    sched = Scheduler(mixtral_model, SchedulerConfig(kv_tokens=16, block_size=4))
    with pytest.raises(moekit.MoekitError, match=match):
        sched.add(prompt, params)
    assert not sched.has_work


def test_full_queue_raises_queue_full(mixtral_model):
    sched = Scheduler(mixtral_model, SchedulerConfig(max_waiting=2))
    sched.add([5]), sched.add([6])
    with pytest.raises(QueueFull, match="2 requests are queued"):
        sched.add([7])


@pytest.mark.parametrize("kwargs, match", [
    ({"max_tokens": 0}, "max_tokens must be >= 1"),
    ({"temperature": -1.0}, "temperature must be >= 0"),
    ({"top_p": 0.0}, "top_p must be in"),
    ({"top_k": -2}, "top_k must be >= 0"),
])
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(moekit.MoekitError, match=match):
        SamplingParams(**kwargs)


def test_llm_generates_many_text_prompts():
    """The offline entry point on the bundled model: text in, text out, each equal to alone."""
    from moekit.serve import LLM

    llm = LLM()
    prompts = ["Once upon a time", "The cat", "x"]
    done = llm.generate(prompts, SamplingParams(max_tokens=6))
    for prompt, c in zip(prompts, done):
        ids = llm.tokenizer.encode(prompt)
        assert c.prompt_token_ids == ids and c.finish_reason == "length"
        assert c.token_ids == _alone(llm.model, ids, 6)
        assert c.text == llm.tokenizer.decode(c.token_ids)


def test_logprobs_are_the_models(mixtral_model):
    """Each token's log-probability and top alternatives equal log_softmax of the full forward."""
    model = mixtral_model
    sched = Scheduler(model, SchedulerConfig(max_step_tokens=8))
    prompts = _prompts([5, 12], seed=9)
    reqs = [sched.add(p, SamplingParams(max_tokens=4, logprobs=3)) for p in prompts]
    plain = sched.add(prompts[0], SamplingParams(max_tokens=4))
    sched.run()
    assert plain.logprobs == []
    for prompt, r in zip(prompts, reqs):
        assert len(r.logprobs) == 4
        for i, entry in enumerate(r.logprobs):
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([prompt + r.output[:i]]))[0, -1].float(), dim=-1)
            assert entry.logprob == pytest.approx(float(logp[r.output[i]]), abs=1e-4)
            assert [t for t, _ in entry.top] == torch.topk(logp, 3).indices.tolist()
            assert entry.top[0][0] == r.output[i]  # greedy: the chosen token is the top one


@pytest.mark.gpu
def test_cuda_scheduler_graphs_equal_alone(tiny):
    """On a GPU the scheduler's decode steps replay CUDA graphs: tokens equal each prompt alone."""
    model = moekit.load_model(tiny("qwen3_moe").path, device="cuda", dtype="float32")
    sched = Scheduler(model, SchedulerConfig(max_seqs=4, max_step_tokens=16))
    assert sched.decode is not None and sched.decode.use_graphs
    prompts = _prompts(LENGTHS)
    reqs = [sched.add(p, SamplingParams(max_tokens=10)) for p in prompts]
    sched.run()
    assert any(step.graph is not None for step in sched.decode.steps.values())
    for prompt, r in zip(prompts, reqs):
        assert r.output == _alone(model, prompt, 10)


@pytest.mark.gpu
def test_cuda_warmed_buckets_triton_kernel_and_mixed_steps_equal_alone(tiny, monkeypatch):
    """What bench_serve runs on a GPU, small: every decode bucket captured up front
    (PagedDecode.warm), decode steps replaying them with a padding row (3 sequences in bucket 4),
    attention by the Triton paged kernel, prompt chunks beside decode rows every other step;
    tokens equal each prompt alone (float32, so no near-tie flips). A few seconds on a GPU."""
    import moekit.paged_attention as paged_attention

    if not paged_attention.HAVE_TRITON:
        pytest.skip("needs triton")
    kernel_batches = []
    kernel = paged_attention.decode_attention_triton
    monkeypatch.setattr(paged_attention, "decode_attention_triton",
                        lambda q, *rest: kernel_batches.append(q.shape[0]) or kernel(q, *rest))
    model = moekit.load_model(tiny("mixtral").path, device="cuda", dtype="float32")
    sched = Scheduler(model, SchedulerConfig(max_seqs=3, max_step_tokens=8, prefill_interval=2))
    assert sched.decode.warm(3) == [1, 2, 4]
    assert all(step.graph is not None for step in sched.decode.steps.values())
    assert 4 in kernel_batches  # the bucket-4 graph holds the kernel, padding row included
    sizes, decode_step = [], sched.decode._step
    monkeypatch.setattr(sched.decode, "_step", lambda bucket: sizes.append(bucket) or decode_step(bucket))
    prompts = _prompts(LENGTHS, seed=5)
    reqs = [sched.add(p, SamplingParams(max_tokens=12)) for p in prompts]
    mixed = False
    while sched.has_work:
        sched.step()
        mixed |= any(r.output for r in sched.running) and any(r.computed < len(r.prompt) for r in sched.running)
    assert mixed and 4 in sizes and set(sched.decode.steps) == {1, 2, 4}  # no capture after warm()
    assert sched.cache.used_blocks == 0
    for prompt, r in zip(prompts, reqs):
        assert r.output == _alone(model, prompt, 12)


class _TightBudget:
    """An expert runtime whose budget holds at most `limit` KV positions."""

    prefill_chunk = None

    def __init__(self, limit):
        self.limit, self.asked = limit, []

    def reserve(self, batch, positions):
        self.asked.append(positions)
        if batch * positions > self.limit:
            raise moekit.MoekitError(f"{positions} positions do not fit")


def test_offload_budget_sizes_the_kv_cache(tiny, monkeypatch):
    """Unset kv_tokens: max_seqs full contexts where the budget holds them, else one context; a
    kv_tokens the budget cannot hold is refused naming the flags to change."""
    import importlib

    sched_module = importlib.import_module("moekit.serve.scheduler")
    model = moekit.load_model(tiny("mixtral").path)
    runtime = _TightBudget(limit=MAX_POS)
    monkeypatch.setattr(sched_module, "expert_runtime", lambda m: runtime)
    sched = Scheduler(model, SchedulerConfig(max_seqs=4))
    assert runtime.asked == [4 * MAX_POS, MAX_POS]
    assert sched.cache.num_blocks * sched.cache.block_size == MAX_POS
    with pytest.raises(moekit.MoekitError, match="does not fit in the offload budget .* fewer --kv-tokens"):
        Scheduler(model, SchedulerConfig(kv_tokens=2 * MAX_POS))


@pytest.mark.parametrize("bits", ["4", "ternary"])
def test_compressed_model_equals_alone(tiny, tmp_path, bits):
    """A compressed checkpoint (RTN experts in their stored form) under the scheduler."""
    from moekit.quant.compress import compress
    from moekit.quant.config import QuantConfig

    out = tmp_path / f"mixtral-{bits}"
    quant = QuantConfig(bits=bits, method="rtn", **({} if bits == "ternary" else {"group_size": 16}))
    compress(tiny("mixtral").path, out, quant, progress=False)
    model = moekit.load_model(out)
    sched = Scheduler(model, SchedulerConfig(max_step_tokens=6, max_seqs=2))
    prompts = _prompts([7, 2, 13], seed=7)
    reqs = [sched.add(p, SamplingParams(max_tokens=5)) for p in prompts]
    sched.run()
    for prompt, r in zip(prompts, reqs):
        assert r.output == _alone(model, prompt, 5)


def test_prefill_interval_keeps_other_steps_decode_only(mixtral_model):
    """prefill_interval=3: while sequences decode, prompts are admitted and chunked only every third
    step; the tokens do not change."""
    model = mixtral_model
    sched = Scheduler(model, SchedulerConfig(max_seqs=3, max_step_tokens=8, prefill_interval=3))
    prompts = _prompts(LENGTHS, seed=12)
    reqs = [sched.add(p, SamplingParams(max_tokens=8)) for p in prompts]
    seen_decode_only_with_waiting = False
    schedule, planned = sched._schedule, []

    def recorded():  # each step's work as planned: (request, new tokens, tokens pending before it)
        work = schedule()
        planned[:] = [(n, len(r.tokens) - r.computed) for r, n in work]
        return work

    sched._schedule = recorded
    while sched.has_work:
        step = sched.stats.steps
        decoding = any(r.computed == len(r.tokens) - 1 for r in sched.running)
        sched.step()
        if decoding and step % 3:
            assert all(n == 1 and pending == 1 for n, pending in planned)  # decode rows only
            seen_decode_only_with_waiting |= bool(sched.waiting)
    assert seen_decode_only_with_waiting
    for prompt, r in zip(prompts, reqs):
        assert r.output == _alone(model, prompt, 8)


def test_warm_runs_every_size_class_then_leaves_the_cache_empty(mixtral_model, monkeypatch):
    """warm() runs throwaway steps of 1, 2, 3, powers of two and one past each (up to the budget),
    a mixed and a decode-only step, frees their blocks, and later requests give the same tokens;
    the step counters split static from eager steps."""
    import moekit.serve.scheduler as scheduler

    model = mixtral_model
    sched = Scheduler(model, SchedulerConfig(max_seqs=3, max_step_tokens=40, static_decode=True))
    sizes, real = [], scheduler.forward_step
    monkeypatch.setattr(scheduler, "forward_step",
                        lambda m, c, work: sizes.append([len(t) for _, _, t in work]) or real(m, c, work))
    warmed = sched.warm()
    assert warmed["step_tokens"] == [1, 2, 3, 4, 5, 8, 9, 16, 17, 32, 33, 40]
    assert warmed["buckets"] == [1, 2, 4]
    assert [[n] for n in warmed["step_tokens"]] == sizes[:12]
    assert sizes[12:] == [[2], [1, 38], [2, 2], [1, 1]]  # a mixed step, then two decode rows
    assert sched.cache.used_blocks == 0 and not sched.cache.tables and sched.stats.steps == 0
    prompts = _prompts(LENGTHS[:3], seed=7)
    reqs = [sched.add(p, SamplingParams(max_tokens=6)) for p in prompts]
    with pytest.raises(moekit.MoekitError, match="before adding requests"):
        sched.warm()
    sched.run()
    for prompt, r in zip(prompts, reqs):
        assert r.output == _alone(model, prompt, 6)
    stats = sched.stats
    assert stats.static_steps + stats.mixed_steps == stats.steps and stats.static_steps and stats.mixed_steps
    assert LENGTHS[:3] == [5, 30, 1]  # no preemption: each prompt token once; the one-token prompt
    assert stats.prefill_tokens == 5 + 30  # runs as a decode row


@pytest.mark.parametrize("variant", ["mixtral", "mixtral_sliding", "olmoe_clip", "qwen2_moe"])
def test_static_mixed_steps_equal_alone(tiny, variant):
    """static_mixed: steps with prefill chunks run padded to token buckets (eagerly here, under the
    Triton interpreter; CUDA graphs on GPUs), decode-only steps at the decode buckets; the tokens
    are each request's alone, and padding touches no sequence's blocks."""
    from moekit.experts.triton_ops import triton_usable

    if not triton_usable(torch.empty(0)):
        pytest.skip("static_mixed on the CPU needs TRITON_INTERPRET=1")
    model = moekit.load_model(tiny(variant).path)
    sched = Scheduler(model, SchedulerConfig(max_seqs=3, max_step_tokens=40, static_decode=True, static_mixed=True))
    assert sched.warm()["mixed_buckets"] == [64]
    prompts = _prompts(LENGTHS, seed=9)
    reqs = [sched.add(p, SamplingParams(max_tokens=5)) for p in prompts]
    sched.run()
    for prompt, r in zip(prompts, reqs):
        assert r.output == _alone(model, prompt, 5)
    stats = sched.stats
    assert stats.static_mixed_steps and not stats.mixed_steps and stats.static_steps
    assert sched.cache.used_blocks == 0


def test_static_mixed_needs_grouped_query_attention(tiny):
    model = moekit.load_model(tiny("deepseek_v2").path)
    with pytest.raises(moekit.MoekitError, match="grouped-query attention"):
        Scheduler(model, SchedulerConfig(static_mixed=True))


@pytest.mark.gpu
def test_cuda_static_mixed_graphs_equal_eager(tiny):
    """On a GPU, mixed steps replay one CUDA graph per token bucket (nothing captured after
    warm()) and give the eager scheduler's tokens (float32: a padded step may pick other row
    blocks for the expert kernels, which in bf16 could round differently)."""
    model = moekit.load_model(tiny("qwen3_moe").path, device="cuda", dtype="float32")
    prompts = _prompts(LENGTHS, seed=21)
    outputs = []
    for static_mixed in (False, True):
        sched = Scheduler(model, SchedulerConfig(max_seqs=4, max_step_tokens=24, static_mixed=static_mixed))
        warmed = sched.warm()
        if static_mixed:
            assert warmed["mixed_buckets"] == [64] and sched.mixed.steps[64].graph is not None
        reqs = [sched.add(p, SamplingParams(max_tokens=8)) for p in prompts]
        sched.run()
        outputs.append([r.output for r in reqs])
        if static_mixed:
            assert sched.stats.static_mixed_steps and not sched.stats.mixed_steps and set(sched.mixed.steps) == {64}
    assert outputs[0] == outputs[1]
