"""Continuous batching: requests join and leave a running batch at step boundaries.

Each step is one ragged forward (moekit.generate.forward_step) over a paged KV cache. The
scheduler fills it under a token budget: first every running sequence (one token each when
decoding, the next chunk of its prompt while prefilling), then waiting requests in arrival order
while the budget, the sequence limit and the free KV blocks allow; a request that does not fit
waits in the queue. A sequence that samples its stop token or reaches max_tokens is retired at
once and its blocks freed. When a running sequence needs a block and none is free, the newest
running sequence is preempted: its blocks are freed and it is queued first, to be recomputed
from its tokens so far (prompt and output) when blocks free up; nothing crashes.

Decode-only steps run at bucketed static shapes (CUDA graphs, moekit.paged_decode.PagedDecode;
with offloaded experts the graphs are cut at the expert calls, which run eagerly between them);
steps with prefill chunks run eagerly, or with config.static_mixed padded to token buckets and
graph-replayed too (PagedMixed). warm() pays every compile and capture before the first request.

Overlap (config.overlap, with static decode): a decode-only step samples on the device and copies
its tokens to the host without waiting; while it runs, step() launches the next decode-only step
over the same sequences (its tokens fed from the device) before it reads the first one's tokens
back, so the host's work of a step (scheduling, filling the static buffers, callbacks) runs under
the device's. A sequence that stops there had one extra row computed, never read; its blocks are
freed after that row was queued, so a later owner's writes come after it in stream order. The
next step is launched ahead only when it is certain to be decode-only over the same sequences:
no request would be admitted, none reaches max_tokens, none asks for logprobs (those read the
logits, which the next replay overwrites), and every sequence has a block for its next position.

Shapes: B = sequences in a step, V = vocab.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import MoekitError
from ..experts.runtime import expert_runtime
from ..generate import forward_step, sample
from ..kv_cache import PagedKVCache
from ..paged_decode import (
    PagedDecode,
    PagedMixed,
    piecewise_decode_supported,
    static_decode_supported,
    static_mixed_supported,
)
from .requests import (  # noqa: F401 -- MAX_LOGPROBS and the types are importable from here too
    MAX_LOGPROBS,
    QueueFull,
    Request,
    SamplingParams,
    SchedulerConfig,
    SchedulerStats,
    TokenLogprob,
)

_DEFAULT_KV_CAP = 1 << 16  # positions: the default cache never asks for more


@dataclass
class _InFlight:
    """A decode-only step launched (overlap) whose sampled tokens are not read back yet."""

    requests: list[Request]  # its rows, in order
    tokens: torch.Tensor  # [B] int64 on the device: the next step's input
    host: torch.Tensor  # [B] int64, the host copy (pinned on CUDA), valid once `copied` completed
    copied: torch.cuda.Event | None  # None on the CPU (the copy was synchronous)


class Scheduler:
    """Runs many requests through one model as ragged steps over a shared paged KV cache."""

    def __init__(self, model, config: SchedulerConfig | None = None):
        self.model, self.config = model, config or SchedulerConfig()
        cfg, device = model.config, model.device
        kv_tokens = self._reserve_kv(model)
        self.cache = PagedKVCache.for_tokens(cfg, kv_tokens, self.config.block_size, device, model.dtype)
        static = self.config.static_decode
        # offloaded experts: the static step cut at the expert calls, which run eagerly between its
        # captured segments (as `moekit generate --offload` decodes); resident: captured whole
        supported = static_decode_supported(model) or piecewise_decode_supported(model)
        if static is None:
            static = device.type == "cuda" and supported
        elif static and not supported:
            raise MoekitError("static_decode needs resident experts or offloaded ones with a MoE layer to cut the "
                              "step at; leave it unset for this model")
        self.decode = PagedDecode(model, self.cache) if static else None
        self._mixed: PagedMixed | None = None
        # static_mixed unset: on where it can run (a CUDA device, static decode, a plain GQA model)
        self._auto_static_mixed = (self.decode is not None and device.type == "cuda"
                                   and static_mixed_supported(model) and _triton_usable(device))
        self._check_static_mixed()
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order: the last is the newest
        self.stats = SchedulerStats()
        self._ids = itertools.count()
        self._inflight: _InFlight | None = None
        # two host buffers for sampled tokens, used in turn: one step's copy lands in one while
        # the previous step's tokens are read from the other
        pinned = device.type == "cuda"
        self._token_hosts = [torch.zeros(self.config.max_seqs, dtype=torch.long, pin_memory=pinned)
                             for _ in range(2)]
        self._token_turn = 0

    @property
    def static_mixed(self) -> bool:
        """Returns whether steps with prefill chunks run at static shapes (config.static_mixed, or
        its default where unset)."""
        on = self.config.static_mixed
        return self._auto_static_mixed if on is None else on

    @property
    def mixed(self) -> PagedMixed | None:
        """The static-shape mixed steps while static_mixed is on (made on first use), else None."""
        if not self.static_mixed:
            return None
        if self._mixed is None:
            self._check_static_mixed()
            self._mixed = PagedMixed(self.model, self.cache, self.config.max_seqs, self.config.max_step_tokens,
                                     pool=self.decode.pool if self.decode is not None else None)
        return self._mixed

    def _check_static_mixed(self) -> None:
        if not self.config.static_mixed:  # unset: on only where it runs
            return
        if not static_mixed_supported(self.model):
            raise MoekitError("static_mixed needs resident experts and grouped-query attention in every layer "
                              "(latent and sink attention run a step's sequences one by one); leave it off")
        if not _triton_usable(self.model.device):
            raise MoekitError("static_mixed needs the Triton prefill kernel: a CUDA device, or TRITON_INTERPRET=1 "
                              "with triton installed on the CPU; leave it off")

    def _reserve_kv(self, model) -> int:
        """Returns the KV cache positions to allocate, made room for in an offloaded model's budget
        (which shrinks its expert cache): the configured size, else max_seqs full contexts (capped),
        else, where the budget cannot hold that, one full context."""
        cfg, config = model.config, self.config
        block = config.block_size
        wanted = config.kv_tokens or min(config.max_seqs * cfg.max_position_embeddings, _DEFAULT_KV_CAP)
        runtime = expert_runtime(model)
        if runtime is None:
            return wanted
        choices = [wanted]
        if not config.kv_tokens and wanted > cfg.max_position_embeddings:
            choices.append(cfg.max_position_embeddings)  # the default, shrunk where the budget is tight
        for positions in choices:
            try:
                runtime.reserve(1, -(-positions // block) * block)
                return positions
            except MoekitError as e:
                why = e
        raise MoekitError(f"a paged KV cache of {choices[-1]} positions does not fit in the offload budget ({why}); "
                          "give more --device-memory or fewer --kv-tokens")

    # ---- requests --------------------------------------------------------------------------

    def add(self, prompt: list[int], params: SamplingParams | None = None, request_id: str | None = None,
            on_token: Callable[[Request, int], None] | None = None,
            on_finish: Callable[[Request], None] | None = None) -> Request:
        """Returns the queued Request for prompt token ids; raises MoekitError when it can never
        run (empty, too long for the context or the whole KV cache) and QueueFull when the queue is full."""
        params = params or SamplingParams()
        cfg = self.model.config
        if not prompt:
            raise MoekitError("the prompt is empty; give at least one token")
        if min(prompt) < 0 or max(prompt) >= cfg.vocab_size:
            raise MoekitError(f"token ids must be in [0, {cfg.vocab_size}), got {min(prompt)}..{max(prompt)}")
        total = len(prompt) + params.max_tokens
        if total > cfg.max_position_embeddings:
            raise MoekitError(f"the prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) = {total} "
                              f"exceeds the model's context of {cfg.max_position_embeddings} positions")
        if self.cache.blocks_for(total) > self.cache.num_blocks:
            raise MoekitError(f"the prompt + max_tokens needs {total} positions, the KV cache holds "
                              f"{self.cache.num_blocks * self.cache.block_size}; lower max_tokens or give more KV memory")
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFull(f"{len(self.waiting)} requests are queued already (the limit); retry later")
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.model.device)
            generator.manual_seed(params.seed)
        request = Request(request_id or f"req-{next(self._ids)}", list(prompt), params, generator,
                          on_token=on_token, on_finish=on_finish, arrival_s=time.perf_counter())
        self.waiting.append(request)
        self.stats.requests_added += 1
        return request

    def abort(self, request: Request) -> None:
        """Stops a request wherever it is (queued or running) and frees its blocks at once."""
        if request.finished:
            return
        if request in self.waiting:
            self.waiting.remove(request)
        if request in self.running:
            self.running.remove(request)
        self.stats.requests_aborted += 1
        self._finish(request, "abort")

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step --------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[tuple[Request, int]]:
        """Runs one forward over the scheduled work; returns the (request, new token) pairs it
        produced (a request retired in this step has finish_reason set). With overlap, a
        decode-only step's tokens are returned by the call after the one that launched it, and
        that call has launched the next decode-only step already where it could."""
        if self._inflight is not None:
            return self._land()
        work = self._schedule()
        if not work:
            return []
        decode_rows = sum(1 for r, _ in work if r.computed == r.length - 1)
        if self.decode is not None and decode_rows == len(work) and self._overlappable([r for r, _ in work]):
            self._launch([r for r, _ in work])
            return self._land()
        if self.decode is not None and decode_rows == len(work):
            logits = self.decode([(r, r.computed, r.last_token) for r, _ in work])  # [B, V]
            self.stats.static_steps += 1
        else:
            rows = [(r, r.computed, r.tokens[r.computed:r.computed + n]) for r, n in work]
            mixed = self.mixed
            if mixed is not None and mixed.runs(rows):
                logits = mixed(rows)  # [B, V]
                self.stats.static_mixed_steps += 1
            else:
                logits = forward_step(self.model, self.cache, rows)  # [B, V]
                self.stats.mixed_steps += 1
        self.stats.steps += 1
        self.stats.prefill_tokens += sum(n for _, n in work) - decode_rows
        ready = []  # rows whose sequence has all its tokens in the cache: they sample
        for row, (request, n) in enumerate(work):
            request.computed += n
            if request.computed == request.length:
                ready.append((row, request))
        if not ready:
            return []
        tokens = self._sample_device(logits, ready).tolist()  # read back to the host: the step is done
        now = time.perf_counter()
        produced = []
        for (row, request), token in zip(ready, tokens):
            if request.params.logprobs is not None:
                request.logprobs.append(_logprob(logits[row], token, request.params.logprobs))
            produced.append((request, token))
            self._emit(request, token, now)
        return produced

    def _emit(self, request: Request, token: int, now: float) -> None:
        """Appends a new token to its request, calls on_token, and retires the request if it stops."""
        request.output.append(token)
        request.token_times_s.append(now)
        self.stats.generated_tokens += 1
        if request.on_token is not None:
            request.on_token(request, token)
        reason = self._stop_reason(request, token)
        if reason is not None:
            self.running.remove(request)
            self._finish(request, reason)

    def _overlappable(self, requests: list[Request]) -> bool:
        """Returns whether a decode-only step over `requests` may run without reading anything
        back before the next step launches: overlap on, no logprobs asked, none finished, and a
        step the host does not wait on anyway (an offloaded model's expert calls read their
        routing on the host: launching ahead would only report the tokens a step late)."""
        return (self.config.overlap and not self.decode.piecewise
                and all(r.params.logprobs is None and not r.finished for r in requests))

    def _launch(self, requests: list[Request], tokens: torch.Tensor | None = None) -> None:
        """Launches a decode-only step over `requests` (inputs from `tokens` [B] on the device, else
        each one's last token), samples it on the device and starts its tokens' copy to the host."""
        logits = self.decode([(r, r.computed, r.last_token if tokens is None else 0) for r in requests],
                             tokens)  # [B, V]
        for r in requests:
            r.computed += 1
        self.stats.steps += 1
        self.stats.static_steps += 1
        sampled = self._sample_device(logits, list(enumerate(requests)))  # [B]
        host = self._token_hosts[self._token_turn][:len(requests)]
        self._token_turn ^= 1
        host.copy_(sampled, non_blocking=True)
        copied = None
        if sampled.is_cuda:
            copied = torch.cuda.Event()
            copied.record()
        self._inflight = _InFlight(requests, sampled, host, copied)

    def _land(self) -> list[tuple[Request, int]]:
        """Launches the next decode-only step where it is certain to be one (same sequences), then
        reads the in-flight step's tokens back; returns its (request, new token) pairs."""
        inflight, self._inflight = self._inflight, None
        if self._ahead_ok(inflight.requests):
            self._launch(inflight.requests, inflight.tokens)
            self.stats.overlapped_steps += 1
        if inflight.copied is not None:
            t_wait = time.perf_counter()
            inflight.copied.synchronize()
            self.stats.device_wait_s_sum += time.perf_counter() - t_wait
        tokens = inflight.host.tolist()
        now = time.perf_counter()
        produced = []
        for request, token in zip(inflight.requests, tokens):
            if request.finished:  # aborted while its step ran
                continue
            produced.append((request, token))
            self._emit(request, token, now)
        return produced

    def _ahead_ok(self, requests: list[Request]) -> bool:
        """Returns whether the step after the in-flight one over `requests` is certain to be the
        same decode-only step _schedule would make: every request still runs and stays below
        max_tokens after its in-flight token, none would be admitted (or the next step defers
        prefill) and nothing else runs but prompts waiting for a prefill step, and each request's
        next position has a block without preempting anyone."""
        if not self._overlappable(requests) or len(requests) > self.config.max_step_tokens:
            return False
        if any(len(r.output) + 2 > r.params.max_tokens for r in requests):
            return False  # the in-flight token is its last
        prefill = self.stats.steps % self.config.prefill_interval == 0
        if prefill and (self.waiting or len(self.running) != len(requests)):
            return False
        if not prefill and len(self.running) != len(requests):
            rows = set(map(id, requests))  # the others must all be mid-prompt (they wait for a prefill step)
            if any(id(r) not in rows and r.computed >= r.length - 1 for r in self.running):
                return False
        # the in-flight token is not appended yet: the next position is r.computed (== r.length)
        needed = sum(self.cache.blocks_needed(r, r.computed + 1) for r in requests)
        return needed <= self.cache.free_blocks

    @torch.inference_mode()
    def warm(self) -> dict[str, list[int]]:
        """Returns {"step_tokens": token counts run, "buckets": decode buckets, "mixed_buckets":
        token buckets of static mixed steps (config.static_mixed)} after running
        throwaway ragged steps whose token counts reach every size class the kernels compile or
        pick a configuration for (1, 2, 3, powers of two and one past each, up to max_step_tokens:
        the expert kernels' row blocks, Triton's specialization of sizes equal to 1 or divisible
        by 16), a mixed and a decode-only step, then capturing the decode buckets of up to
        max_seqs sequences (and the mixed steps' token buckets); so that no timed step pays for a
        compile or a capture. Call it before
        adding requests (it uses free KV blocks and frees them again)."""
        if self.running or self.waiting:
            raise MoekitError("warm() runs throwaway steps: call it before adding requests")
        cfg, cache = self.model.config, self.cache
        most = min(self.config.max_step_tokens, cfg.max_position_embeddings - 1,
                   (cache.free_blocks - 2) * cache.block_size)  # two sequences' partial blocks spare
        sizes = {1, 2, 3, most} | {p + d for k in range(most.bit_length()) for p in (1 << k,) for d in (0, 1)}
        sizes = sorted(n for n in sizes if 1 <= n <= most)
        tokens = [(7919 * i + 11) % cfg.vocab_size for i in range(most + 1)]
        for n in sizes:  # one fresh prompt of n tokens
            self._throwaway([(0, tokens[:n])])
        if most >= 3:  # a decode row beside a prefill chunk, then two decode rows (the eager decode path)
            self._throwaway([(0, tokens[:2])], [(2, tokens[2:3]), (0, tokens[:most - 2])])
            self._throwaway([(0, tokens[:2]), (0, tokens[:2])], [(2, tokens[2:3]), (2, tokens[2:3])])
        buckets = self.decode.warm(self.config.max_seqs) if self.decode is not None else []
        mixed = self.mixed.warm() if self.mixed is not None else []
        return {"step_tokens": sizes, "buckets": buckets, "mixed_buckets": mixed}

    def _throwaway(self, *steps: list[tuple[int, list[int]]]) -> None:
        """Runs ragged steps over fresh throwaway sequences (row i of every step is sequence i:
        (start, tokens)), then frees their blocks."""
        seqs = [object() for _ in range(max(len(step) for step in steps))]
        try:
            for step in steps:
                forward_step(self.model, self.cache, [(seqs[i], start, toks) for i, (start, toks) in enumerate(step)])
        finally:
            for seq in seqs:
                self.cache.free(seq)

    def run(self) -> None:
        """Steps until every request has finished."""
        while self.has_work:
            self.step()

    def _schedule(self) -> list[tuple[Request, int]]:
        """Returns this step's (request, new tokens) work: running sequences first (preempting the
        newest when blocks run out), then waiting ones admitted while budget and blocks last.
        Between every prefill_interval-th step, only decoding sequences run (when there are any)."""
        budget = self.config.max_step_tokens
        work: list[tuple[Request, int]] = []
        decoding = any(r.computed == r.length - 1 for r in self.running)
        prefill = not decoding or self.stats.steps % self.config.prefill_interval == 0
        # prompt tokens this step may carry: capped while others decode (they all wait for it)
        prompt_budget = self.config.max_prefill_tokens if decoding and self.config.max_prefill_tokens else budget
        preempted = self.stats.preemptions
        for request in list(self.running):
            if budget == 0:
                break
            # preempted by an older sequence of this step? (a list lookup only after a preemption:
            # at 128 sequences one per row cost ~0.2 ms a step)
            if self.stats.preemptions != preempted and request not in self.running:
                continue
            chunk = request.computed < request.length - 1
            if chunk and (not prefill or prompt_budget == 0):
                continue  # a prompt chunk: it waits for the next prefill step
            n = min(request.length - request.computed, budget, prompt_budget if chunk else budget)
            if not self._make_room(request, request.computed + n, work):
                continue
            work.append((request, n))
            budget -= n
            if chunk:
                prompt_budget -= n
        while (prefill and self.waiting and min(budget, prompt_budget) > 0
               and len(self.running) < self.config.max_seqs):
            request = self.waiting[0]
            n = min(request.length - request.computed, budget, prompt_budget)
            if self.cache.blocks_needed(request, request.computed + n) > self.cache.free_blocks:
                break  # it waits until blocks free up
            self.waiting.popleft()
            self.cache.grow(request, request.computed + n)
            self.running.append(request)
            work.append((request, n))
            budget -= n
            prompt_budget -= n
        return work

    def _make_room(self, request: Request, positions: int, work: list[tuple[Request, int]]) -> bool:
        """Returns whether `request` got blocks for `positions`, preempting the newest running
        sequences (never one already in this step's work) until it does; False when it was the
        newest itself and was preempted."""
        while self.cache.blocks_needed(request, positions) > self.cache.free_blocks:
            scheduled = {id(r) for r, _ in work}
            victims = [r for r in self.running if id(r) not in scheduled]
            victim = victims[-1]  # the request itself is unscheduled, so there is always one
            self._preempt(victim)
            if victim is request:
                return False
        self.cache.grow(request, positions)
        return True

    def _preempt(self, request: Request) -> None:
        """Frees a running request's blocks and queues it first, to be recomputed later."""
        self.running.remove(request)
        self.cache.free(request)
        request.computed = 0
        self.waiting.appendleft(request)
        self.stats.preemptions += 1

    def _sample_device(self, logits: torch.Tensor, ready: list[tuple[int, Request]]) -> torch.Tensor:
        """Returns the next token of each ready (row, request) from logits [B, V] as [R] int64 on
        the device: greedy rows by one argmax, sampled rows each from its own generator (no sync)."""
        if len(ready) == logits.shape[0]:  # every row samples (decode steps): no index to copy over
            tokens = logits.argmax(dim=-1)  # [R]
        else:
            rows = torch.tensor([row for row, _ in ready]).to(logits.device, non_blocking=True)
            tokens = logits[rows].argmax(dim=-1)  # [R]
        for i, (row, request) in enumerate(ready):
            p = request.params
            if p.temperature > 0:
                tokens[i] = sample(logits[row:row + 1], p.temperature, p.top_k, p.top_p, request.generator)[0]
        return tokens

    def _stop_reason(self, request: Request, token: int) -> str | None:
        if token in request.params.stop_token_ids:
            return "stop"
        if len(request.output) >= request.params.max_tokens:
            return "length"
        return None

    def _finish(self, request: Request, reason: str) -> None:
        request.finish_reason = reason
        self.cache.free(request)
        if reason != "abort":
            stats = self.stats
            stats.requests_finished += 1
            stats.prompt_tokens += len(request.prompt)
            stats.first_token_s_sum += request.time_to_first_token_s
            stats.inter_token_s_sum += sum(request.inter_token_s)
            stats.inter_token_count += len(request.inter_token_s)
        if request.on_finish is not None:
            request.on_finish(request)


def _triton_usable(device: torch.device) -> bool:
    from ..experts.triton_ops import triton_usable

    return triton_usable(torch.empty(0, device=device))


def _logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """Returns token's log-probability under logits [V] and the `top` most likely alternatives."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    values, ids = torch.topk(logp, top) if top > 0 else (logp[:0], logp[:0].long())
    return TokenLogprob(float(logp[token]), tuple(zip(ids.tolist(), values.tolist())))
