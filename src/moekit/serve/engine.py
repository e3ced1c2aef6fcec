"""The scheduler on a background thread, for an asyncio server: requests are added from the
event loop, steps run on the engine thread, and each request's tokens come back through an
asyncio queue (put with call_soon_threadsafe).

One lock guards the scheduler: the engine thread holds it for a step, so a request added while a
step runs joins at the next step boundary. Aborts never wait for the lock: they are queued and
applied by the engine thread before its next step.

With `lockstep` (moekit.parallel.serve_ranks.StepMirror, `moekit serve --parallel`), attached to
the scheduler before anything runs, the engine thread also calls lockstep.idle() every lockstep.heartbeat_s seconds without work and
lockstep.stop() once when it ends, so the other ranks hear every message from this one thread.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

import torch

from .scheduler import Request, SamplingParams, Scheduler, SchedulerConfig, TokenLogprob

log = logging.getLogger("moekit.serve")


class Engine:
    """A Scheduler stepped on its own thread; `add` and `abort` are safe from any thread."""

    def __init__(self, model, config: SchedulerConfig | None = None, warm: bool = False, lockstep=None):
        """`warm` runs Scheduler.warm() first (every Triton compile and CUDA graph capture the
        steps will need), so that the first requests do not wait for them; `lockstep` (see the
        module docstring) is told when the engine idles and when it ends."""
        self.model = model
        self.lockstep = lockstep
        self.scheduler = Scheduler(model, config)
        if lockstep is not None:
            lockstep.attach(self.scheduler)
        self.warmed = self.scheduler.warm() if warm else None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._aborts: deque[Request] = deque()  # appended by any thread, applied by the engine thread
        self.error: BaseException | None = None  # the last step's failure (None once a step succeeds)
        self._thread = threading.Thread(target=self._loop, name="moekit-engine", daemon=True)
        self._thread.start()

    def add(self, prompt: list[int], params: SamplingParams,
            emit: Callable[[int | None, str | None, TokenLogprob | None], None]) -> Request:
        """Returns the queued request; `emit(token, None, logprob)` is called (on the engine
        thread) for each new token (logprob None unless params.logprobs is set) and
        `emit(None, finish_reason, None)` once at the end. Blocks for at most one step; raises
        MoekitError / QueueFull as Scheduler.add does."""

        def on_token(request: Request, token: int) -> None:
            emit(token, None, request.logprobs[-1] if request.logprobs else None)

        def on_finish(request: Request) -> None:
            emit(None, request.finish_reason, None)

        with self._lock:
            request = self.scheduler.add(prompt, params, on_token=on_token, on_finish=on_finish)
        self._wake.set()
        return request

    def abort(self, request: Request) -> None:
        """Stops a request (a client that went away, a stop string) before the next step, which
        frees its blocks; returns at once."""
        self._aborts.append(request)
        self._wake.set()

    def snapshot(self) -> dict:
        """Returns the scheduler's counters and gauges (for /metrics), read under the lock."""
        with self._lock:
            s, cache = self.scheduler.stats, self.scheduler.cache
            out = dict(vars(s), waiting=len(self.scheduler.waiting), running=len(self.scheduler.running),
                       kv_blocks_used=cache.used_blocks, kv_blocks_total=cache.num_blocks)
        stats = getattr(getattr(self.model, "expert_runtime", None), "stats", None)
        if stats is not None and hasattr(stats, "hit_rate"):
            out["expert_cache_hit_rate"] = stats.hit_rate
        return out

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        try:
            self._steps()
        finally:
            if self.lockstep is not None:
                try:
                    self.lockstep.stop()
                except Exception:  # the other ranks are gone already: nothing left to tell them
                    log.exception("stopping the other ranks failed")

    def _steps(self) -> None:
        heartbeat_s = self.lockstep.heartbeat_s if self.lockstep is not None else None
        with torch.inference_mode():
            while not self._stop:
                if not self._wake.wait(heartbeat_s) and not self._stop:
                    self._heartbeat()
                    continue
                with self._lock:
                    while self._aborts:
                        self.scheduler.abort(self._aborts.popleft())
                    if not self.scheduler.has_work:
                        self._wake.clear()
                        continue
                    try:
                        self.scheduler.step()
                        self.error = None
                    except Exception as e:  # a failed step fails its requests, not the server
                        log.exception("engine step failed")
                        self.error = e
                        self._fail_all(e)
                        # over ranks a failed step leaves their collectives out of step: end here
                        self._stop = self._stop or self.lockstep is not None

    def _heartbeat(self) -> None:
        try:
            self.lockstep.idle()
        except Exception as e:  # another rank is gone: no step can run any more
            log.exception("the other ranks stopped answering")
            self.error = e
            self._stop = True

    def _fail_all(self, error: Exception) -> None:
        for request in list(self.scheduler.running) + list(self.scheduler.waiting):
            request.error = f"{type(error).__name__}: {error}"
            self.scheduler.abort(request)
