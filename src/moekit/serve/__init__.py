"""Serving: a continuous-batching scheduler over a paged KV cache (scheduler), an offline
many-prompt entry point on it (llm), and an OpenAI-compatible HTTP server (app)."""

from .llm import LLM, Completion
from .scheduler import (
           QueueFull,
           Request,
           SamplingParams,
           Scheduler,
           SchedulerConfig,
           TokenLogprob,
)

__all__ = ["LLM", "Completion", "QueueFull", "Request", "SamplingParams", "Scheduler", "SchedulerConfig",
           "TokenLogprob"]
