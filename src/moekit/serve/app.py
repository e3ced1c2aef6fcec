"""The OpenAI-compatible HTTP app (FastAPI): /v1/models, /v1/completions, /v1/chat/completions
(streamed as server-sent events or not), /health and /metrics, over one Engine.

Every bad request gets a 4xx in OpenAI's error shape (protocol.error_body), a full queue a 429;
a client that goes away has its sequences aborted (their KV blocks freed at the next step).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from ..errors import MoekitError
from ..tokenizer import StreamDecoder, Tokenizer
from .engine import Engine
from .protocol import ChatRequest, CompletionRequest, error_body
from .scheduler import QueueFull, SamplingParams, TokenLogprob

log = logging.getLogger("moekit.serve")

MAX_N = 16  # choices per request


class HTTPError(Exception):
    """A request error with its HTTP status (400 unless said otherwise)."""

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


class _Disconnected(Exception):
    """The client went away before its response was complete."""


class _Choice:
    """One generated sequence of a response: its text so far, cut at a stop string."""

    def __init__(self, index: int, prompt_tokens: int, tokenizer: Tokenizer, stops: list[str],
                 eos: tuple[int, ...]):
        self.index, self.prompt_tokens = index, prompt_tokens
        self.decoder, self.stops, self.eos = StreamDecoder(tokenizer), stops, eos
        self.holdback = max((len(s) for s in stops), default=1) - 1  # a stop string may still be forming
        self.text, self.sent = "", 0
        self.tokens = 0
        self.finish_reason: str | None = None
        self.request = None  # the scheduler's Request
        self.logprobs: list[tuple[int, TokenLogprob]] = []  # (token, its logprob) when asked for
        self.logprobs_sent = 0

    def push(self, token: int, logprob: TokenLogprob | None = None) -> bool:
        """Adds a new token; returns True when the text now holds a stop string (cut before it)."""
        self.tokens += 1
        if logprob is not None:
            self.logprobs.append((token, logprob))
        if token in self.eos:
            return False
        self.text += self.decoder.push(token)
        hits = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            return True
        return False

    def delta(self) -> str:
        """Returns the text not sent yet that no stop string can still claim."""
        end = len(self.text) if self.finish_reason else max(self.sent, len(self.text) - self.holdback)
        out, self.sent = self.text[self.sent:end], end
        return out

    def new_logprobs(self) -> list[tuple[int, TokenLogprob]]:
        """Returns the logprob entries not sent yet (streaming)."""
        out, self.logprobs_sent = self.logprobs[self.logprobs_sent:], len(self.logprobs)
        return out


class _AccessLog:
    """ASGI middleware: one log line per request (client, method, path, status, duration of the
    whole response, streams included) and a count per (path, status). Plain ASGI rather than
    BaseHTTPMiddleware, which would hide a client's disconnect from the handlers."""

    def __init__(self, app, counts: dict[tuple[str, int], int]):
        self.app, self.counts = app, counts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            key = (scope["path"], status[0])
            self.counts[key] = self.counts.get(key, 0) + 1
            client = scope["client"][0] if scope.get("client") else "-"
            log.info('%s "%s %s" %d %.1f ms', client, scope["method"], scope["path"], status[0],
                     (time.perf_counter() - t0) * 1e3)


def build_app(engine: Engine, tokenizer: Tokenizer, model_name: str) -> FastAPI:
    """Returns the FastAPI app serving `engine`'s model under `model_name`."""
    app = FastAPI(title="moekit", docs_url=None, redoc_url=None)
    model, cfg = engine.model, engine.model.config
    context = cfg.max_position_embeddings
    eos = tuple(model.generation_defaults.get("eos_token_ids", ()))
    started = int(time.time())
    http_counts: dict[tuple[str, int], int] = {}

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return _error(_validation_message(exc), 400)

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, exc: HTTPError):
        return _error(str(exc), exc.status, exc.param)

    @app.exception_handler(MoekitError)
    async def _moekit_error(request: Request, exc: MoekitError):
        return _error(str(exc), 429 if isinstance(exc, QueueFull) else 400)

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception):
        log.exception("request failed")
        return _error(f"internal error: {type(exc).__name__}: {exc}", 500)

    app.add_middleware(_AccessLog, counts=http_counts)

    @app.get("/health")
    async def health():
        if engine.error is not None:
            return JSONResponse({"status": "error", "error": str(engine.error)}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": started,
                                            "owned_by": "moekit", "max_model_len": context}]}

    @app.get("/metrics")
    async def metrics():
        snap = await asyncio.to_thread(engine.snapshot)
        return PlainTextResponse(_prometheus(snap, http_counts), media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check_common(body, model_name)
        prompts = _completion_prompts(body.prompt, tokenizer)
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        return await _respond(request, body, prompts, max_tokens, chat=False, logprobs=body.logprobs)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        _check_common(body, model_name)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        if not tokenizer.chat_template:
            raise HTTPError(f"model {model_name} has no chat template (tokenizer_config.json chat_template); "
                            "use /v1/completions")
        prompt = tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if max_tokens is None:  # as much as the context (and the KV cache) leaves
            cache = engine.scheduler.cache
            max_tokens = max(1, min(context, cache.num_blocks * cache.block_size) - len(prompt))
        if body.top_logprobs is not None and not body.logprobs:
            raise HTTPError("top_logprobs needs logprobs: true", param="top_logprobs")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        return await _respond(request, body, [prompt], max_tokens, chat=True, logprobs=logprobs)

    async def _respond(request: Request, body, prompts: list[list[int]], max_tokens: int, chat: bool,
                       logprobs: int | None):
        stops = [s for s in ([body.stop] if isinstance(body.stop, str) else body.stop or []) if s]  # "" stops nothing
        base = _sampling(body, max_tokens, model.generation_defaults, eos, logprobs)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        choices: list[_Choice] = []
        try:
            for prompt in prompts:
                for j in range(body.n):
                    choice = _Choice(len(choices), len(prompt), tokenizer, stops, eos)
                    seed = None if base.seed is None else base.seed + j  # n samples differ, reproducibly
                    params = SamplingParams(**{**vars(base), "seed": seed})
                    emit = _emitter(loop, queue, choice.index)
                    choice.request = await asyncio.to_thread(engine.add, prompt, params, emit)
                    choices.append(choice)
        except BaseException:
            for c in choices:
                engine.abort(c.request)
            raise
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        usage_prompt = sum(len(p) for p in prompts)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            stream = _stream(request, queue, choices, rid, chat, include_usage, usage_prompt)
            return StreamingResponse(stream, media_type="text/event-stream")
        try:
            checked = time.monotonic()
            while any(c.finish_reason is None for c in choices):
                await _next_event(request, queue, choices, timeout=1.0)
                if time.monotonic() - checked > 1.0:  # tokens keep coming: look for a gone client anyway
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        raise _Disconnected
        except _Disconnected:
            return _error("the client disconnected", 499)  # nobody reads it; the log line says what happened
        finally:
            _abort_unfinished(choices)
        out = [_choice_body(c, chat, logprobs is not None, tokenizer) for c in choices]
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": model_name, "choices": out, "usage": _usage(usage_prompt, choices)}

    async def _next_event(request: Request, queue: asyncio.Queue, choices: list[_Choice], timeout: float) -> int | None:
        """Applies the next engine event to its choice; returns that choice's index (None on a
        timeout). Raises HTTPError 500 when the engine failed, _Disconnected when the client has gone."""
        try:
            index, token, reason, logprob = await asyncio.wait_for(queue.get(), timeout)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                raise _Disconnected from None
            return None
        choice = choices[index]
        if choice.finish_reason is not None:
            return None  # events after a stop string cut it (its abort is on its way)
        if token is not None and choice.push(token, logprob):
            choice.finish_reason = "stop"
            engine.abort(choice.request)
        elif reason == "abort":
            raise HTTPError(f"generation failed: {choice.request.error or 'aborted'}", 500)
        elif reason is not None:
            choice.finish_reason = reason
        return index

    async def _stream(request: Request, queue: asyncio.Queue, choices: list[_Choice], rid: str, chat: bool,
                      include_usage: bool, usage_prompt: int) -> AsyncIterator[str]:
        created = int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(entries: list[dict], usage: dict | None = None) -> str:
            body = {"id": rid, "object": kind, "created": created, "model": model_name, "choices": entries}
            if usage is not None:
                body["usage"] = usage
            return f"data: {json.dumps(body)}\n\n"

        try:
            if chat:
                yield chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for c in choices])
            while any(c.finish_reason is None for c in choices):
                index = await _next_event(request, queue, choices, timeout=1.0)
                if index is None:
                    continue
                c = choices[index]
                text = c.delta()
                if text or c.finish_reason:
                    entry = _chunk_choice(c, text, chat)
                    if c.logprobs:
                        entry["logprobs"] = _logprobs_body(c.new_logprobs(), chat, tokenizer)
                    yield chunk([entry])
            if include_usage:
                yield chunk([], _usage(usage_prompt, choices))
        except HTTPError as e:
            yield f"data: {json.dumps(error_body(str(e), e.status))}\n\n"
        except _Disconnected:
            return
        finally:
            _abort_unfinished(choices)
        yield "data: [DONE]\n\n"

    def _abort_unfinished(choices: list[_Choice]) -> None:
        for c in choices:
            if c.request is not None and not c.request.finished:
                engine.abort(c.request)

    app.state.engine = engine
    return app


# ---- request checks ------------------------------------------------------------------------

def _check_common(body, model_name: str) -> None:
    if body.model is not None and body.model != model_name:
        raise HTTPError(f"the model `{body.model}` does not exist; this server serves `{model_name}` "
                        "(GET /v1/models)", 404, "model")
    if not 1 <= body.n <= MAX_N:
        raise HTTPError(f"n must be in 1..{MAX_N}, got {body.n}", param="n")
    if body.max_tokens is not None and body.max_tokens < 1:
        raise HTTPError(f"max_tokens must be >= 1, got {body.max_tokens}", param="max_tokens")


def _completion_prompts(prompt, tokenizer: Tokenizer) -> list[list[int]]:
    """Returns token id lists for OpenAI's prompt forms: str, [str], [int], [[int]]."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise HTTPError("prompt is empty; give a string, a list of strings or token ids", param="prompt")
    if isinstance(prompt[0], int):
        return [list(prompt)]
    out = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompt]
    for i, ids in enumerate(out):
        if not ids:
            raise HTTPError(f"prompt {i} encodes to no tokens; give a non-empty prompt", param="prompt")
    return out


def _sampling(body, max_tokens: int, defaults: dict, eos: tuple[int, ...], logprobs: int | None) -> SamplingParams:
    """Returns the request's SamplingParams; unset fields from generation_config.json, else OpenAI's
    defaults (temperature 1). Raises MoekitError (a 400) on values out of range."""
    temperature = body.temperature if body.temperature is not None else defaults.get("temperature", 1.0)
    return SamplingParams(
        max_tokens=max_tokens, temperature=temperature,
        top_p=body.top_p if body.top_p is not None else defaults.get("top_p", 1.0),
        top_k=body.top_k if body.top_k is not None else defaults.get("top_k", 0),
        seed=body.seed, stop_token_ids=eos, logprobs=logprobs)


def _emitter(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, index: int):
    def emit(token: int | None, reason: str | None, logprob: TokenLogprob | None) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, (index, token, reason, logprob))
    return emit


# ---- response bodies -----------------------------------------------------------------------

def _choice_body(c: _Choice, chat: bool, logprobs: bool, tokenizer: Tokenizer) -> dict:
    lp = _logprobs_body(c.logprobs, chat, tokenizer) if logprobs else None
    if chat:
        return {"index": c.index, "message": {"role": "assistant", "content": c.text}, "logprobs": lp,
                "finish_reason": c.finish_reason}
    return {"index": c.index, "text": c.text, "logprobs": lp, "finish_reason": c.finish_reason}


def _logprobs_body(entries: list[tuple[int, TokenLogprob]], chat: bool, tokenizer: Tokenizer) -> dict:
    """Returns OpenAI's logprobs object for (token, logprob) entries: chat's `content` list, or
    the completions' parallel lists (tokens, token_logprobs, top_logprobs, text_offset)."""
    def piece(t: int) -> str:
        return tokenizer.decode([t], skip_special_tokens=False)

    if chat:
        def item(t: int, lp: float) -> dict:
            return {"token": piece(t), "logprob": lp, "bytes": list(piece(t).encode())}
        return {"content": [{**item(t, e.logprob), "top_logprobs": [item(a, v) for a, v in e.top]}
                            for t, e in entries]}
    tokens = [piece(t) for t, _ in entries]
    offsets = [sum(len(x) for x in tokens[:i]) for i in range(len(tokens))]
    return {"tokens": tokens, "token_logprobs": [e.logprob for _, e in entries],
            "top_logprobs": [{piece(a): v for a, v in e.top} for _, e in entries], "text_offset": offsets}


def _chunk_choice(c: _Choice, text: str, chat: bool) -> dict:
    if chat:
        return {"index": c.index, "delta": {"content": text} if text else {}, "logprobs": None,
                "finish_reason": c.finish_reason}
    return {"index": c.index, "text": text, "logprobs": None, "finish_reason": c.finish_reason}


def _usage(prompt_tokens: int, choices: list[_Choice]) -> dict:
    completion = sum(c.tokens for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


def _error(message: str, status: int, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, status, param), status_code=status)


def _validation_message(exc: RequestValidationError) -> str:
    """Returns pydantic's complaints as one line: `field: problem; ...`."""
    parts = []
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            return f"malformed JSON body: {err.get('ctx', {}).get('error', 'cannot be parsed')}"
        loc = ".".join(str(x) for x in err.get("loc", ())[1:]) or "body"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(dict.fromkeys(parts))


def _prometheus(snap: dict, http_counts: dict[tuple[str, int], int]) -> str:
    """Returns the metrics as Prometheus text exposition."""
    lines = []

    def metric(name: str, kind: str, help_text: str, value: float, labels: str = "") -> None:
        lines.extend([f"# HELP moekit_{name} {help_text}", f"# TYPE moekit_{name} {kind}",
                      f"moekit_{name}{labels} {value}"])

    metric("requests_added_total", "counter", "sequences queued", snap["requests_added"])
    metric("requests_finished_total", "counter", "sequences that ended (stop or length)", snap["requests_finished"])
    metric("requests_aborted_total", "counter", "sequences aborted (disconnect, stop string)",
           snap["requests_aborted"])
    metric("prompt_tokens_total", "counter", "prompt tokens of finished sequences", snap["prompt_tokens"])
    metric("generation_tokens_total", "counter", "tokens generated", snap["generated_tokens"])
    metric("steps_total", "counter", "forward steps run", snap["steps"])
    metric("preemptions_total", "counter", "sequences preempted for KV blocks", snap["preemptions"])
    metric("time_to_first_token_seconds_sum", "counter", "time to first token, summed over finished sequences",
           round(snap["first_token_s_sum"], 6))
    metric("inter_token_seconds_sum", "counter", "gaps between output tokens, summed", round(snap["inter_token_s_sum"], 6))
    metric("inter_token_count_total", "counter", "gaps between output tokens counted", snap["inter_token_count"])
    metric("queue_depth", "gauge", "sequences waiting", snap["waiting"])
    metric("running_sequences", "gauge", "sequences in the running batch", snap["running"])
    metric("kv_blocks_used", "gauge", "paged KV cache blocks held", snap["kv_blocks_used"])
    metric("kv_blocks_total", "gauge", "paged KV cache blocks", snap["kv_blocks_total"])
    if "expert_cache_hit_rate" in snap:
        metric("expert_cache_hit_rate", "gauge", "offloaded expert cache hit rate", snap["expert_cache_hit_rate"])
    lines += ["# HELP moekit_http_requests_total HTTP requests by path and status",
              "# TYPE moekit_http_requests_total counter"]
    lines += [f'moekit_http_requests_total{{path="{p}",status="{s}"}} {n}' for (p, s), n in sorted(http_counts.items())]
    return "\n".join(lines) + "\n"
