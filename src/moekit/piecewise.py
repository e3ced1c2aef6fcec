"""Decode steps as CUDA graphs between expert calls, for expert sources that cannot be captured.

An offloaded expert source reads its routing on the host (one sync per MoE layer) and moves
experts between steps, and a compressed source may run its experts one at a time: neither can
live inside one captured decode step. Run eagerly, though, a step launches some 60 small kernels
per layer from Python (norms, rope, attention, residuals, router, top-k), and that host time,
not the GPU, sets the speed (H200, qwen3-30b-a3b shape: 1.1 ms per layer call eager, measured
by benchmarks/profile_offload.py).

So the step is cut at the expert calls. Segment 0 embeds the token and runs layer 0 up to its
routing; segment i adds layer i-1's expert output to the residual stream and runs layer i up to
its routing (dense layers in between run whole); the last segment adds the last experts' output
and computes the logits. Each segment is one CUDA graph reading and writing static buffers; the
expert source runs eagerly between replays on the same stream, exactly as it does in an eager
step, so outputs are those of the eager model.

Shapes: B = batch, D = hidden, N = B tokens (one per sequence), A = experts per token, V = vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kv_cache import KVCache


def capture_stream(model) -> torch.cuda.Stream:
    """Returns the side stream every warm-up and capture of `model` runs on (made once).

    cuBLAS keeps a workspace per stream in PyTorch's allocator (32 MiB each on Hopper) and never
    frees it: a fresh stream per capture would leave one more behind every generate call (and the
    offload loader's measured warm-up would not have counted the one a later capture makes)."""
    stream = getattr(model, "_capture_stream", None)
    if stream is None:
        stream = torch.cuda.Stream(model.device)
        model._capture_stream = stream
    return stream


@dataclass
class _Routed:
    """What a segment leaves for the expert call after it (all static graph outputs)."""

    block: torch.nn.Module  # the layer's MoE block (its expert source is block.experts)
    resid: torch.Tensor  # [B, 1, D] residual stream after attention
    flat: torch.Tensor  # [N, D] post-attention-normed input of the experts
    ids: torch.Tensor  # [N, A]
    weights: torch.Tensor  # [N, A]
    shared: torch.Tensor | None  # [N, D] gated shared-expert output, if the block has one


class PiecewiseDecode:
    """One decode step as len(MoE layers) + 1 CUDA graphs with the experts run eagerly between."""

    def __init__(self, model, cache: KVCache, token: torch.Tensor, position: int,
                 graphs: bool | None = None):
        """`graphs` (default: on CUDA) captures the segments; without, they run as plain calls
        (the same cut, testable on the CPU)."""
        self.model, self.cache = model, cache
        device = model.device
        self.use_graphs = device.type == "cuda" if graphs is None else graphs
        self.token = token.clone()  # [B, 1]
        self.position = torch.tensor(position, dtype=torch.long, device=device)
        b, d = token.shape[0], model.config.hidden_size
        # the experts' output of the layer before a segment (the one input not made by a graph)
        self.moe_out = torch.zeros(b, d, device=device, dtype=model.dtype)
        moe = [i for i, layer in enumerate(model.layers) if layer.is_moe]
        if not moe:
            raise ValueError("piecewise decode needs a MoE layer to cut at")
        bounds = [(None, moe[0])] + list(zip(moe, moe[1:])) + [(moe[-1], None)]
        # segments as (after, upto) bounds, not closures: a closure over self stored on self would
        # make a reference cycle, and the graphs' memory pool would outlive `del step` until a
        # garbage collection (the H200 warm-up saw ~36 MB more held after every measurement)
        self.bounds = bounds
        self.rope: tuple[torch.Tensor, torch.Tensor] | None = None
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.routed: list[_Routed] = []
        if not self.use_graphs:
            return
        self.stream = capture_stream(model)
        pool = torch.cuda.graph_pool_handle()
        # Capture in order: each segment's graph is captured after a warm-up call, and the experts
        # after it run eagerly on its outputs so the next segment has real inputs.
        # Warm-ups and captures write k/v at `position`; the first replay rewrites that slot.
        prev: _Routed | None = None
        for bound in self.bounds:
            self.stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(self.stream):
                self._segment(*bound, prev)  # warm-up: lazy inits (cuBLAS handles, Triton compiles) outside the capture
            torch.cuda.current_stream(device).wait_stream(self.stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=self.stream):
                out = self._segment(*bound, prev)
            self.graphs.append(graph)
            if isinstance(out, torch.Tensor):
                self.logits = out
                break
            graph.replay()
            self.routed.append(out)
            self._experts(out)
            prev = out

    def _segment(self, after: int | None, upto: int | None, prev: _Routed | None):
        """Runs the layers after MoE layer `after` up to MoE layer `upto`'s expert call (None: from
        the embedding / to the logits); returns what the experts need, or the logits."""
        model, cache = self.model, self.cache
        layers = model.layers
        if prev is None:
            input_ids, positions, self.start = self._inputs()
            cos, sin = model.rope(positions)
            self.rope = (cos, sin)  # static outputs of segment 0, read by the later segments
            x = model.embed_input(input_ids)
        else:
            x = layers[0].combine(prev.resid, self.moe_out, prev.shared)
        cos, sin = self.rope
        start = self.start
        first = 0 if after is None else after + 1
        last = len(layers) if upto is None else upto
        for j in range(first, last):  # whole layers (dense MLPs) before the next MoE layer
            x = layers[j](x, cos, sin, cache, start)
        if upto is None:
            return self._head(x)
        layer = layers[upto]
        q, k, v = layer.pre_attn(x, cos, sin)
        resid, flat, ids, weights, shared = layer.route(x, layer.attn.attend(q, k, v, cache, start))
        return _Routed(layer.mlp, resid, flat, ids, weights, shared)

    def _inputs(self):
        """Returns (input ids, positions, start) of the step from its static buffers (a subclass
        for ragged steps over a paged cache reads them from its own: moekit.paged_decode)."""
        return self.token, self.position + torch.arange(1, device=self.position.device), self.position

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.head(x)

    def _experts(self, routed: _Routed) -> None:
        self.moe_out.copy_(routed.block.experts(routed.flat, routed.ids, routed.weights))

    def __call__(self, token: torch.Tensor, position: int) -> torch.Tensor:
        """Returns logits [B, 1, V] of token [B, 1] at `position` (k/v written to the cache)."""
        self.token.copy_(token)
        self.position.fill_(position)
        return self.run()

    def run(self) -> torch.Tensor:
        """Returns the logits of the step its static buffers describe (segments, experts between)."""
        if not self.use_graphs:
            prev = None
            for bound in self.bounds[:-1]:
                prev = self._segment(*bound, prev)
                self._experts(prev)
            return self._segment(*self.bounds[-1], prev)
        for graph, routed in zip(self.graphs, self.routed):
            graph.replay()
            self._experts(routed)
        self.graphs[-1].replay()
        return self.logits
