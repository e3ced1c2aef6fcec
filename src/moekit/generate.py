"""Generation: prefill + decode, greedy / temperature / top-k / top-p sampling, stop on eos, a
per-token callback for streaming. Two engines: an equal-length batch [B, T] runs over a
preallocated KV cache with CUDA-graph decode steps on GPUs; a list of prompts of different
lengths runs as ragged steps over a paged KV cache (packed prefill, then decode of every
sequence at its own position), each sequence retired as soon as it ends.

Shapes: B = batch (sequences), T = prompt length, V = vocab, M = max new tokens,
N = packed tokens of one ragged step.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .errors import MoekitError
from .experts.runtime import expert_runtime
from .kv_cache import KVCache, PagedKVCache
from .native.decode import CpuDecodeStep
from .paged_decode import PagedDecode, static_decode_supported
from .piecewise import capture_stream


@dataclass
class GenerationStats:
    """Timings of one generate call (filled in when passed to `generate`)."""

    prompt_tokens: int = 0
    new_tokens: int = 0  # tokens generated per sequence before every sequence stopped
    prefill_s: float = 0.0  # prompt processing and first token
    decode_s: float = 0.0  # all later tokens
    cuda_graph: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def decode_tok_s(self) -> float:
        """Returns decode tokens per second per sequence (tokens after the first)."""
        return (self.new_tokens - 1) / self.decode_s if self.decode_s > 0 and self.new_tokens > 1 else 0.0

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Returns the next token ids [B] for last-position logits [B, V]."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_ids = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # drop a token when the mass before it already reaches top_p (the first always stays)
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, sorted_ids, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sampling_defaults(model, temperature: float | None, top_k: int | None, top_p: float | None,
                      eos_token_ids: tuple[int, ...] | None) -> tuple[float, int, float, tuple[int, ...]]:
    """Returns (temperature, top_k, top_p, eos ids) with unset ones from the model's
    generation_config.json (else greedy, no filters, no eos)."""
    defaults = getattr(model, "generation_defaults", {})
    temperature = defaults.get("temperature", 0.0) if temperature is None else temperature
    top_k = defaults.get("top_k", 0) if top_k is None else top_k
    top_p = defaults.get("top_p", 1.0) if top_p is None else top_p
    if eos_token_ids is None:
        eos_token_ids = defaults.get("eos_token_ids", ())
    return temperature, top_k, top_p, tuple(eos_token_ids)


class _GraphedDecode:
    """One decode step captured as a CUDA graph: static token / position in, logits out.

    With `compile`, the step is first compiled by torch.compile (fusing the small elementwise
    kernels of norms, rope and routing) and the compiled kernels are captured instead.
    """

    def __init__(self, model, cache: KVCache, token: torch.Tensor, position: int, compile: bool = False):
        device = model.device
        # Warm-up and capture write k/v at `position`; the first replay rewrites that slot with
        # the real token, so nothing stale survives.
        self.token = token.clone()
        self.position = torch.tensor(position, dtype=torch.long, device=device)
        step = _compiled_step(model) if compile else model
        stream = capture_stream(model)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up (and compilation) on a side stream
            for _ in range(2):
                step(self.token, cache=cache, start=self.position)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=stream):
            self.logits = step(self.token, cache=cache, start=self.position)

    def __call__(self, token: torch.Tensor, position: int) -> torch.Tensor:
        self.token.copy_(token)
        self.position.fill_(position)
        self.graph.replay()
        return self.logits


def _compiled_step(model):
    """Returns the model's forward compiled for decode steps (kept on the model for reuse)."""
    compiled = getattr(model, "_compiled_decode", None)
    if compiled is None:
        compiled = torch.compile(model.forward, dynamic=False)
        model._compiled_decode = compiled
    return compiled


@torch.inference_mode()
def generate(model, input_ids: torch.Tensor | list, max_new_tokens: int = 16, temperature: float | None = None,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             eos_token_ids: tuple[int, ...] | None = None, stop_at_eos: bool = True,
             on_token: Callable[[torch.Tensor], None] | None = None, cuda_graph: bool | None = None,
             compile: bool = False, stats: GenerationStats | None = None) -> torch.Tensor:
    """Returns new token ids [B, max_new_tokens] generated after input_ids [B, T]; for a list of
    prompts (token id lists or 1-D tensors, of any lengths) a list of 1-D tensors, each prompt's
    new tokens up to its eos (included) or max_new_tokens, equal to what the prompt alone gives.

    temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off; unset options come
    from the model's generation_config.json, else greedy. A sequence that produced an eos token
    is padded with that eos token; when all have, generation stops early. `on_token` receives
    each step's tokens [B] (for streaming). `cuda_graph` (default: on for CUDA) replays decode
    steps from a captured graph; `compile` (CUDA only, off by default: it costs tens of seconds
    the first time) compiles the step with torch.compile before capturing it. A list runs as
    ragged steps over a paged KV cache (generate_ragged: `on_token` sees [B] with finished
    sequences padded, each sequence samples from its own generator seeded with `seed`).
    """
    if isinstance(input_ids, (list, tuple)):
        if compile:
            raise MoekitError("compile is for an equal-length batch tensor [B, T]; a list of prompts decodes "
                              "with uncompiled CUDA graphs (leave compile unset, or pass a tensor)")
        return generate_ragged(model, input_ids, max_new_tokens, temperature=temperature, top_k=top_k,
                               top_p=top_p, seed=seed, eos_token_ids=eos_token_ids, stop_at_eos=stop_at_eos,
                               on_token=on_token, stats=stats, cuda_graph=cuda_graph)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise MoekitError(f"input_ids must be [batch, tokens] with at least one token, got {list(input_ids.shape)}")
    if max_new_tokens <= 0:
        raise MoekitError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    low, high = int(input_ids.min()), int(input_ids.max())  # one sync a call, before anything is reserved
    if low < 0 or high >= model.config.vocab_size:
        raise MoekitError(f"token ids must be in [0, {model.config.vocab_size}), got {low}..{high}: was the prompt "
                          "encoded with another model's tokenizer?")
    temperature, top_k, top_p, eos_token_ids = sampling_defaults(model, temperature, top_k, top_p, eos_token_ids)
    device = model.device
    input_ids = input_ids.to(device)
    batch, prompt_len = input_ids.shape
    total = prompt_len + max_new_tokens
    if total > model.config.max_position_embeddings:
        raise MoekitError(f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
                          f"the model's context of {model.config.max_position_embeddings} positions")
    generator = _generator(seed, device)
    runtime = expert_runtime(model)  # a placement shared by the layers (offload), or None
    if runtime is not None:
        runtime.reserve(batch, total)
    use_graph = device.type == "cuda" if cuda_graph is None else cuda_graph
    if use_graph and device.type != "cuda":
        raise MoekitError("cuda_graph=True needs the model on a CUDA device")
    if compile and not use_graph:
        raise MoekitError("compile=True is for CUDA-graph decode: use it with the model on a CUDA device")
    if compile and runtime is not None and not runtime.compilable:
        raise MoekitError("compile=True is not available for this model's expert placement (its steps are "
                          "captured in pieces between expert calls); leave it off")
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens, stats.cuda_graph = prompt_len, use_graph

    cache = KVCache(model.config, batch, total, device, model.dtype)
    eos = torch.tensor(eos_token_ids, device=device, dtype=torch.long) if eos_token_ids else None
    out = torch.empty(batch, max_new_tokens, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    pad = torch.full((batch,), eos_token_ids[0] if eos_token_ids else 0, dtype=torch.long, device=device)
    # a bf16 model's batch-1 steps on the CPU: native calls instead of ~40 small ops a layer
    cpu_step = CpuDecodeStep.build(model, cache) if device.type == "cpu" and batch == 1 else None
    stats.extra["native_cpu_step"] = cpu_step is not None

    _sync(device)
    t0 = time.perf_counter()
    # prefill in chunks where the placement bounds its activations (offload plans one chunk)
    chunk = getattr(runtime, "prefill_chunk", None) or prompt_len
    for begin in range(0, prompt_len, chunk):
        logits = model(input_ids[:, begin:begin + chunk], cache=cache, start=begin, last_only=True)[:, -1]
    step_fn = None
    produced = 0
    t_first = t0
    for i in range(max_new_tokens):
        if cpu_step is not None and temperature <= 0:
            token = cpu_step.greedy(logits)  # torch's argmax over bf16 logits took 0.2 ms of a 25 ms step
        else:
            token = sample(logits, temperature, top_k, top_p, generator)
        token = torch.where(finished, pad, token)
        out[:, i] = token
        produced = i + 1
        if on_token is not None:
            on_token(token)
        if i == 0:
            _sync(device)
            t_first = time.perf_counter()
            stats.prefill_s = t_first - t0
        if eos is not None and stop_at_eos:
            finished |= torch.isin(token, eos)
            # the early-stop check syncs with the device: on GPUs look only every 8 steps
            if (device.type != "cuda" or i % 8 == 7) and bool(finished.all()):
                out[:, produced:] = pad[:, None]
                break
        if i + 1 == max_new_tokens:
            break
        position = prompt_len + i
        if use_graph:
            if step_fn is None:
                t_capture = time.perf_counter()
                step_fn = _capture(model, cache, token[:, None], position, compile, stats)
                use_graph = stats.cuda_graph = step_fn is not None
                _sync(device)
                stats.extra["graph_capture_s"] = time.perf_counter() - t_capture
        if use_graph:
            logits = step_fn(token[:, None], position)[:, -1]
        elif cpu_step is not None:
            logits = cpu_step(int(token[0]), position)
        else:
            logits = model(token[:, None], cache=cache, start=position)[:, -1]
    _sync(device)
    stats.decode_s = time.perf_counter() - t_first - stats.extra.get("graph_capture_s", 0.0)
    stats.new_tokens = produced
    return out


def _capture(model, cache: KVCache, token: torch.Tensor, position: int, compile: bool,
             stats: GenerationStats):
    """Returns a captured decode step: whole (compiled if asked and possible; an offloaded model
    whose misses are read in place), else in pieces between expert calls (expert sources that
    sync with the host), else None to run eagerly."""
    runtime = expert_runtime(model)
    if runtime is not None:
        step = runtime.capture_decode(model, cache, token, position)  # whole, when the placement allows
        if step is not None:
            stats.extra["graph"] = "whole"
            return step
        return _capture_pieces(model, cache, token, position, stats)
    if compile:
        try:
            step = _GraphedDecode(model, cache, token, position, compile=True)
            stats.extra["compiled"] = True
            return step
        except Exception as e:  # compilers fail in many ways; the uncompiled graph still works
            warnings.warn(f"torch.compile of the decode step failed, capturing it uncompiled: {e}")
            torch.cuda.synchronize()
    try:
        return _GraphedDecode(model, cache, token, position)
    except RuntimeError:  # e.g. an expert source that syncs with the host: capture around it
        torch.cuda.synchronize()
        return _capture_pieces(model, cache, token, position, stats)


def _capture_pieces(model, cache: KVCache, token: torch.Tensor, position: int, stats: GenerationStats):
    """Returns the step as CUDA graphs between eager expert calls (moekit.piecewise), or None."""
    from .piecewise import PiecewiseDecode

    if not any(layer.is_moe for layer in model.layers):
        return None
    try:
        step = PiecewiseDecode(model, cache, token, position)
    except RuntimeError as e:
        warnings.warn(f"CUDA graph capture failed, decoding eagerly: {e}")
        torch.cuda.synchronize()
        return None
    stats.extra["graph"] = "piecewise"
    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- ragged batches --------------------------------------------------------------------------

BLOCK_SIZE = 16  # positions per paged KV block


def prompt_list(model, prompts: list, max_new_tokens: int) -> list[list[int]]:
    """Returns prompts (token id lists or 1-D tensors) as lists of ints, checked against the
    vocabulary and the context; raises MoekitError naming the bad prompt."""
    if max_new_tokens <= 0:
        raise MoekitError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    if not prompts:
        raise MoekitError("give at least one prompt")
    cfg = model.config
    out = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, torch.Tensor):
            if prompt.dim() != 1:
                raise MoekitError(f"prompt {i}: a tensor prompt must be 1-D token ids, got shape {list(prompt.shape)}")
            prompt = prompt.tolist()
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) for t in prompt):
            raise MoekitError(f"prompt {i}: give token ids (a list of ints or a 1-D tensor), got {type(prompt).__name__}")
        if not prompt:
            raise MoekitError(f"prompt {i} is empty; every prompt needs at least one token")
        if min(prompt) < 0 or max(prompt) >= cfg.vocab_size:
            raise MoekitError(f"prompt {i}: token ids must be in [0, {cfg.vocab_size}), got {min(prompt)}..{max(prompt)}")
        if len(prompt) + max_new_tokens > cfg.max_position_embeddings:
            raise MoekitError(f"prompt {i} ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) = "
                              f"{len(prompt) + max_new_tokens} exceeds the model's context of "
                              f"{cfg.max_position_embeddings} positions")
        out.append(list(prompt))
    return out


def forward_step(model, cache: PagedKVCache, work: list[tuple[object, int, list[int]]]) -> torch.Tensor:
    """Returns the last logits [B, V] of one ragged step over (sequence, start, new tokens) triples:
    the new tokens are packed into one forward, each sequence at its own positions."""
    batch = cache.prepare([(seq, start, len(tokens)) for seq, start, tokens in work])
    ids = torch.tensor([t for _, _, tokens in work for t in tokens], dtype=torch.long)[None]
    return model(ids.to(cache.device), cache=cache, start=batch, last_only=True)[:, -1]


def prefill_steps(lengths: list[int], chunk: int) -> list[list[tuple[int, int, int]]]:
    """Returns packed prefill steps of at most `chunk` tokens: lists of (prompt index, start, tokens);
    a prompt longer than what is left of a step continues in the next."""
    steps, step, room = [], [], chunk
    for i, length in enumerate(lengths):
        start = 0
        while start < length:
            n = min(length - start, room)
            step.append((i, start, n))
            start += n
            room -= n
            if room == 0:
                steps.append(step)
                step, room = [], chunk
    if step:
        steps.append(step)
    return steps


def sample_rows(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generators: list[torch.Generator | None]) -> torch.Tensor:
    """Returns next token ids [B] for logits [B, V], row i drawn from generators[i] (greedy: argmax)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    return torch.cat([sample(row[None], temperature, top_k, top_p, g) for row, g in zip(logits, generators)])


@torch.inference_mode()
def generate_ragged(model, prompts: list, max_new_tokens: int = 16, temperature: float | None = None,
                    top_k: int | None = None, top_p: float | None = None, seed: int | list[int] | None = None,
                    eos_token_ids: tuple[int, ...] | None = None, stop_at_eos: bool = True,
                    on_token: Callable[[torch.Tensor], None] | None = None,
                    stats: GenerationStats | None = None, block_size: int = BLOCK_SIZE,
                    cuda_graph: bool | None = None) -> list[torch.Tensor]:
    """Returns each prompt's new token ids (1-D tensors, up to its eos included, else
    max_new_tokens long) for prompts of different lengths, run together as ragged steps over a
    paged KV cache: packed prefill (in chunks of the expert placement's prefill_chunk), then one
    decode step per token for the sequences still running. `on_token` receives each step's
    tokens [B] (finished sequences padded with the first eos id). `cuda_graph` (default: on CUDA
    where the model allows it, moekit.paged_decode) replays decode steps from graphs captured at
    bucketed batch sizes. `seed`: every sequence's generator seeded with it, or a list of one seed
    per prompt (prompts alike then draw differently)."""
    prompts = prompt_list(model, prompts, max_new_tokens)
    seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed] * len(prompts)
    if len(seeds) != len(prompts):
        raise MoekitError(f"seed: {len(seeds)} seeds for {len(prompts)} prompts; give one a prompt, or one int")
    if cuda_graph and model.device.type != "cuda":
        raise MoekitError("cuda_graph=True needs the model on a CUDA device")
    if cuda_graph and not static_decode_supported(model):
        raise MoekitError("cuda_graph=True: this model's ragged decode step cannot be captured (its experts "
                          "are offloaded); leave cuda_graph unset")
    temperature, top_k, top_p, eos_token_ids = sampling_defaults(model, temperature, top_k, top_p, eos_token_ids)
    device, cfg = model.device, model.config
    lengths = [len(p) for p in prompts]
    cache = PagedKVCache.for_tokens(cfg, sum(-(-(n + max_new_tokens) // block_size) * block_size for n in lengths),
                                    block_size, device, model.dtype)
    runtime = expert_runtime(model)
    if runtime is not None:
        runtime.reserve(1, cache.num_blocks * block_size)
    use_graph = device.type == "cuda" and static_decode_supported(model) if cuda_graph is None else cuda_graph
    decode = PagedDecode(model, cache) if use_graph else None
    generators = [_generator(s, device) for s in seeds]
    eos = set(eos_token_ids) if stop_at_eos else set()
    pad = eos_token_ids[0] if eos_token_ids else 0
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens, stats.cuda_graph, stats.prefill_s = sum(lengths), use_graph, 0.0

    _sync(device)
    t0 = time.perf_counter()
    chunk = getattr(runtime, "prefill_chunk", None) or sum(lengths)
    last = torch.empty(len(prompts), cfg.vocab_size, device=device, dtype=model.dtype)
    for step in prefill_steps(lengths, chunk):
        logits = forward_step(model, cache, [(i, start, prompts[i][start:start + n]) for i, start, n in step])
        for row, (i, start, n) in enumerate(step):
            if start + n == lengths[i]:  # the prompt's last token: its logits give the first new token
                last[i] = logits[row]
    outs: list[list[int]] = [[] for _ in prompts]
    running = list(range(len(prompts)))
    logits = last
    t_first = t0
    while running:
        tokens = sample_rows(logits, temperature, top_k, top_p, [generators[i] for i in running]).tolist()
        if on_token is not None:
            step_tokens = torch.full((len(prompts),), pad, dtype=torch.long, device=device)
            step_tokens[running] = torch.tensor(tokens, device=device)
            on_token(step_tokens)
        if stats.prefill_s == 0.0:
            _sync(device)
            t_first = time.perf_counter()
            stats.prefill_s = t_first - t0
        work = []
        for i, token in zip(running, tokens):
            outs[i].append(token)
            if token in eos or len(outs[i]) == max_new_tokens:
                cache.free(i)  # retired at once: its blocks go back to the pool
            else:
                work.append((i, lengths[i] + len(outs[i]) - 1, token))
        running = [i for i, _, _ in work]
        if work and decode is not None:
            logits = decode(work)
        elif work:
            logits = forward_step(model, cache, [(i, position, [token]) for i, position, token in work])
    _sync(device)
    stats.decode_s = time.perf_counter() - t_first
    stats.new_tokens = max(len(o) for o in outs)
    return [torch.tensor(o, dtype=torch.long, device=device) for o in outs]


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator
