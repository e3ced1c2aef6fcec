"""Predictors of the next MoE layer's experts, run at layer i on layer i's expert input x [N, D].

    none         predicts nothing: every expert is fetched when its layer needs it
    speculative  the next layer's router on x, rescaled by the ratio of the two layers' post-attention
                 norm weights (x is normed by layer i's; the next router expects the next layer's)
    pregate      small trained pre-gates, one [E, D] matrix per layer (moekit pregate)
    oracle       the true routing, replayed from a trace recorded by an earlier identical run
"""

from __future__ import annotations

import torch

from ..errors import MoekitError
from .speculative import speculative_weights


class Predictor:
    """Maps (layer i, call number, x [N, D]) to predicted expert ids [N, k] of the next MoE layer."""

    name = "none"

    def predict(self, layer: int, call: int, x: torch.Tensor) -> torch.Tensor | None:
        return None


class LinearPredictor(Predictor):
    """Top-k of x @ W[layer]^T: the speculative and pregate predictors (W [E, D] per layer)."""

    def __init__(self, name: str, weights: dict[int, torch.Tensor], k: int):
        self.name, self.weights, self.k = name, weights, k

    def predict(self, layer, call, x):
        w = self.weights.get(layer)
        if w is None:
            return None
        return torch.topk(x @ w.to(x.dtype).T, self.k, dim=-1, sorted=False).indices  # [N, k]

    def logits(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weights[layer].to(x.dtype).T


class OraclePredictor(Predictor):
    """Replays recorded routing: trace[layer][call] is that call's expert ids [N, A]."""

    name = "oracle"

    def __init__(self, trace: dict[int, list[torch.Tensor]], next_of: dict[int, int]):
        self.trace, self.next_of = trace, next_of

    def predict(self, layer, call, x):
        calls = self.trace.get(self.next_of.get(layer, -1), [])
        if call >= len(calls):
            return None  # beyond the recorded run: predict nothing
        ids = calls[call].to(x.device)
        return ids if ids.shape[0] == x.shape[0] else None


def build_predictor(name: str, model, next_of: dict[int, int], k: int, pregate_path: str | None = None,
                    trace: dict[int, list[torch.Tensor]] | None = None) -> Predictor:
    """Returns the predictor called `name` for this model."""
    if name == "none":
        return Predictor()
    if name == "speculative":
        return LinearPredictor("speculative", speculative_weights(model, next_of), k)
    if name == "pregate":
        from .pregate import load_pregates, find_pregates

        path = find_pregates(pregate_path, getattr(model, "source_path", None))
        weights = load_pregates(path, model.config)
        return LinearPredictor("pregate", {i: w.to(model.device, model.dtype) for i, w in weights.items()}, k)
    if name == "oracle":
        if trace is None:
            raise MoekitError("the oracle predictor replays a recorded routing: pass trace=runtime.trace "
                              "of an earlier run with record_routing=True on the same inputs")
        return OraclePredictor(trace, next_of)
    raise MoekitError(f"unknown predictor '{name}'")
