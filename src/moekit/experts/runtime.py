"""What an engine may ask of the runtime that a model's expert sources share.

A resident model has none (`model.expert_runtime is None`): its decode step is captured whole in
one CUDA graph, optionally compiled, and nothing needs reserving. A placement whose sources
share state across layers (offload: a cache, a store, a copy stream; later the batch pipeline's
pages) implements this protocol, and the engines (moekit.generate, the piecewise capture) call it
without knowing which placement they have.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class ExpertRuntime(Protocol):
    """The engine-facing side of a shared expert placement."""

    compilable: bool  # the decode step may be compiled by torch.compile before capture
    prefill_chunk: int | None  # prompt tokens per forward (bounds activations; None: the whole prompt)

    def reserve(self, batch: int, positions: int) -> None:
        """Makes room on the device for a KV cache of batch x positions (and its workspace) before a
        generation allocates it, or raises MoekitError (one line) with the size it would need."""

    def capture_decode(self, model, cache, token: torch.Tensor, position: int):
        """Returns the decode step captured whole (a callable (token, position) -> logits), or None:
        the engine then captures it in pieces between the expert calls (moekit.piecewise)."""

    def report(self) -> dict:
        """Returns the runtime's statistics and plan, JSON-ready."""


def expert_runtime(model) -> ExpertRuntime | None:
    """Returns the model's shared expert runtime, or None when every source stands alone."""
    return getattr(model, "expert_runtime", None)
