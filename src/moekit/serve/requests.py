"""What the scheduler is asked and what it keeps per request: sampling parameters, the
scheduler's limits, a request's state and tokens, and the counters /metrics reads."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import MoekitError
from ..generate import BLOCK_SIZE

MAX_LOGPROBS = 20  # top alternatives per token a request may ask for


class QueueFull(MoekitError):
    """The scheduler's queue holds max_waiting requests already (a server answers 429)."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it stops."""

    max_tokens: int = 16  # new tokens at most
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass kept (1 = off)
    top_k: int = 0  # most likely tokens kept (0 = off)
    seed: int | None = None  # the request's own generator (None: the global one)
    stop_token_ids: tuple[int, ...] = ()  # tokens that end the sequence (kept in its output)
    logprobs: int | None = None  # record each new token's log-probability and this many top alternatives

    def __post_init__(self):
        if self.max_tokens < 1:
            raise MoekitError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise MoekitError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise MoekitError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise MoekitError(f"top_k must be >= 0 (0 switches it off), got {self.top_k}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise MoekitError(f"seed must fit in 64 bits, got {self.seed}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise MoekitError(f"logprobs must be in 0..{MAX_LOGPROBS} (top alternatives per token), got {self.logprobs}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one continuous-batching scheduler."""

    max_seqs: int = 32  # sequences running at once
    max_step_tokens: int = 256  # tokens per forward (decode tokens and prefill chunks together)
    max_waiting: int = 1024  # queued requests before add() raises QueueFull
    kv_tokens: int | None = None  # paged KV cache positions (default: max_seqs x the model's context, capped)
    block_size: int = BLOCK_SIZE  # positions per KV block
    static_decode: bool | None = None  # decode-only steps at bucketed static shapes, CUDA graphs on GPUs
    # (default: on CUDA for models that allow it, moekit.paged_decode; True on the CPU runs it eagerly)
    # steps with prefill chunks at static shapes too (token buckets, CUDA graphs on GPUs,
    # moekit.paged_decode.PagedMixed) instead of eagerly; needs grouped-query attention and, on
    # the CPU, TRITON_INTERPRET=1 (its packed attention kernel). Default: on with static decode
    # on CUDA where the model allows it (H200, OLMoE shape, C=32: mixed steps 41 -> 27 ms mean,
    # served 3,776 -> 4,140 tok/s); off on the CPU
    static_mixed: bool | None = None
    # prefill (admitting requests, prompt chunks) only every Nth step while sequences decode: the
    # others stay decode-only (graph-replayed) at the cost of time to first token (1 = every step)
    prefill_interval: int = 1
    # prompt tokens (chunks and admissions) per step while sequences decode (default: no cap
    # beyond max_step_tokens): bounds how long one step that carries prompts stalls every
    # decoding sequence (inter-token latency p99), at the cost of more such steps
    max_prefill_tokens: int | None = None
    # decode-only steps launched before the previous one's tokens are read back (static decode
    # only; see the module docstring): the host's per-step work hides under the device's
    overlap: bool = True

    def __post_init__(self):
        for name in ("max_seqs", "max_step_tokens", "max_waiting", "prefill_interval"):
            if getattr(self, name) < 1:
                raise MoekitError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_prefill_tokens is not None and self.max_prefill_tokens < 1:
            raise MoekitError(f"max_prefill_tokens must be >= 1 (or None: no cap), got {self.max_prefill_tokens}")
        if self.kv_tokens is not None and self.kv_tokens < self.block_size:
            raise MoekitError(f"kv_tokens must hold at least one block ({self.block_size}), got {self.kv_tokens}")


@dataclass(frozen=True)
class TokenLogprob:
    """A new token's log-probability under the model (before temperature and filters) and the
    most likely alternatives, as (token id, log-probability) in descending order."""

    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclass(eq=False)
class Request:
    """One sequence: its prompt, what it generated, and where its KV cache stands."""

    id: str
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator | None = None
    output: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per output token, when params.logprobs is set
    computed: int = 0  # positions of prompt + output held in the KV cache
    finish_reason: str | None = None  # "stop" (a stop token), "length" (max_tokens) or "abort"
    error: str | None = None  # why an aborted request failed (a step that raised), else None
    on_token: Callable[[Request, int], None] | None = None  # called after each new token
    on_finish: Callable[[Request], None] | None = None  # called once, when it leaves the scheduler
    arrival_s: float = 0.0  # time.perf_counter() when it was added
    token_times_s: list[float] = field(default_factory=list)  # perf_counter() when each output token was read

    @property
    def time_to_first_token_s(self) -> float | None:
        return self.token_times_s[0] - self.arrival_s if self.token_times_s else None

    @property
    def inter_token_s(self) -> list[float]:
        """Returns the gaps between consecutive output tokens (seconds)."""
        return [b - a for a, b in itertools.pairwise(self.token_times_s)]

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def length(self) -> int:
        """Returns len(tokens) without building the list (the scheduler asks per sequence per step)."""
        return len(self.prompt) + len(self.output)

    @property
    def last_token(self) -> int:
        return self.output[-1] if self.output else self.prompt[-1]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class SchedulerStats:
    """Counters since the scheduler started (for /metrics)."""

    requests_added: int = 0
    requests_finished: int = 0
    requests_aborted: int = 0
    prompt_tokens: int = 0  # prompt tokens of finished requests
    generated_tokens: int = 0
    steps: int = 0
    static_steps: int = 0  # decode-only steps at static shapes (graph-replayed on CUDA)
    static_mixed_steps: int = 0  # steps with prefill chunks at static shapes (SchedulerConfig.static_mixed)
    mixed_steps: int = 0  # steps run as one eager ragged forward (prefill chunks, with any decode rows)
    prefill_tokens: int = 0  # tokens of rows that are not at their last token (prompt chunks, recomputation)
    preemptions: int = 0
    overlapped_steps: int = 0  # decode-only steps launched while the previous step still ran (config.overlap)
    device_wait_s_sum: float = 0.0  # host time blocked reading sampled tokens back (the rest of a step is host work)
    first_token_s_sum: float = 0.0  # time to first token, summed over finished requests
    inter_token_s_sum: float = 0.0  # gaps between output tokens, summed over finished requests
    inter_token_count: int = 0
