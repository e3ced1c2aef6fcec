"""The engine thread: tokens arrive through the emit callback in order, a failed step fails only
the requests it held (the next ones run), aborts free blocks."""

from __future__ import annotations

import threading

import torch

from moekit.serve import SamplingParams, SchedulerConfig
from moekit.serve.engine import Engine


class Collector:
    """Gathers one request's emitted events; `done` is set at its finish event."""

    def __init__(self):
        self.tokens, self.reason, self.done = [], None, threading.Event()

    def __call__(self, token, reason, logprob):
        if token is not None:
            self.tokens.append(token)
        else:
            self.reason = reason
            self.done.set()


def test_tokens_arrive_in_order_and_equal_alone(mixtral_model):
    engine = Engine(mixtral_model, SchedulerConfig(max_step_tokens=8))
    try:
        prompts = [[5, 6, 7, 8], [9], list(range(10, 30))]
        got = [Collector() for _ in prompts]
        for p, c in zip(prompts, got):
            engine.add(p, SamplingParams(max_tokens=6), c)
        for p, c in zip(prompts, got):
            assert c.done.wait(30) and c.reason == "length"
            alone = mixtral_model.generate(torch.tensor([p]), 6, temperature=0, eos_token_ids=())[0].tolist()
            assert c.tokens == alone
        assert engine.snapshot()["kv_blocks_used"] == 0
    finally:
        engine.close()


def test_a_failed_step_fails_its_requests_and_the_engine_goes_on(mixtral_model, monkeypatch):
    engine = Engine(mixtral_model, SchedulerConfig())
    try:
        step = engine.scheduler.step
        calls = []

        def fail_once():
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("boom")
            return step()

        monkeypatch.setattr(engine.scheduler, "step", fail_once)
        first = Collector()
        request = engine.add([5, 6], SamplingParams(max_tokens=4), first)
        assert first.done.wait(30) and first.reason == "abort" and request.error == "RuntimeError: boom"
        second = Collector()
        engine.add([5, 6], SamplingParams(max_tokens=4), second)
        assert second.done.wait(30) and second.reason == "length" and len(second.tokens) == 4
        assert engine.error is None  # the last step went well
    finally:
        engine.close()


def test_abort_frees_blocks_at_the_next_step(mixtral_model):
    engine = Engine(mixtral_model, SchedulerConfig(block_size=4))
    try:
        c = Collector()
        request = engine.add(list(range(5, 25)), SamplingParams(max_tokens=100), c)
        while not c.tokens:
            c.done.wait(0.01)
        engine.abort(request)
        assert c.done.wait(30) and c.reason == "abort"
        assert engine.snapshot()["kv_blocks_used"] == 0 and len(c.tokens) < 100
    finally:
        engine.close()


def test_warmed_engine_serves_the_same_tokens(mixtral_model):
    """Engine(warm=True) runs Scheduler.warm() before its thread starts; requests then run as ever."""
    engine = Engine(mixtral_model, SchedulerConfig(max_seqs=2, max_step_tokens=8, static_decode=True), warm=True)
    try:
        assert engine.warmed["step_tokens"][-1] == 8 and engine.warmed["buckets"] == [1, 2]
        got = Collector()
        engine.add([5, 6, 7], SamplingParams(max_tokens=4), got)
        assert got.done.wait(30) and got.reason == "length"
        alone = mixtral_model.generate(torch.tensor([[5, 6, 7]]), 4, temperature=0, eos_token_ids=())[0].tolist()
        assert got.tokens == alone and engine.snapshot()["steps"] > 0
    finally:
        engine.close()
