"""CUDA graphs of a CGOPipe task's device parts (moekit.pipeline.cgopipe): PreAttn (norm, qkv, rope
and the flat q | k | v packet) and PostAttn (o-proj, norm, router, experts, residual; the head
on the last layer) each replayed as one graph instead of launched op by op by the one launch
thread, which issued ~3 ms a (layer, micro-batch) task on the H200 for ~0.7 ms of GPU work.

One graph per (part, layer, micro-batch size, expert buffer half, head): a task's shapes are
static, and a paged layer's streamed experts sit in one of two fixed buffers, so its graph reads
the same slab whichever pages it holds (the half is in the key). Each graph has static inputs,
copied in before a replay (the residual stream, rope, attention output), and static outputs,
copied out after it (the next replay of the same graph, another micro-batch's, overwrites them).
What a graph cannot hold stays outside it, around the replay: the paged runtime's bookkeeping
(a layer loaded whole when its pages are not all there, the wait for its last page, the event a
page that overwrites its buffer waits for, a compressed layer's decode into the workspace:
PagedRuntime.begin_call / external_call / end_call).

A key runs eagerly the first time (kernels built, lazy state made), is captured the second time
and replayed from then on. A capture that fails (an op that syncs with the host, a kernel that
cannot be captured) leaves its key eager for good, the reason in `failed`. MOEKIT_PIPELINE_GRAPHS=0
(or PipelinedDecoder(graphs=False)) runs every task eagerly as before; on the CPU there are no
graphs (graphs=True there runs each part eagerly through TaskGraphs: the tests' check of its
bookkeeping).

Shapes: mu sequences of a micro-batch, D hidden, H query heads, Hkv kv heads, Dh head dim, V vocabulary.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch


def graphs_wanted(device: torch.device, graphs: bool | None) -> bool:
    """Returns whether CGOPipe runs its tasks through TaskGraphs: `graphs` when given (True on
    the CPU: every part eager, through the same bookkeeping), else on a CUDA device unless
    MOEKIT_PIPELINE_GRAPHS=0."""
    if graphs is not None:
        return graphs
    return device.type == "cuda" and os.environ.get("MOEKIT_PIPELINE_GRAPHS", "1") != "0"


def qkv_packet(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Returns the flat packet [mu * (H + 2 Hkv) * Dh] of q [1, H, mu, Dh], k, v [1, Hkv, mu, Dh]:
    q | k | v each [mu, heads, Dh] in turn (the artifact's cat(q, k, v): one D2H copy a task)."""
    return torch.cat([z[0].transpose(0, 1).reshape(-1) for z in (q, k, v)])


class TaskGraphs:
    """The captured graphs of one model's tasks, and their static buffers (one memory pool)."""

    def __init__(self, model, paged=None):
        self.model, self.paged = model, paged
        self.capturable = model.device.type == "cuda"  # elsewhere every part runs eagerly (the CPU tests' path)
        self.pool = torch.cuda.graph_pool_handle() if self.capturable else None
        # captures run here (a capture needs a stream of its own)
        self.stream = torch.cuda.Stream(model.device) if self.capturable else None
        # key -> (graph, static inputs, static outputs)
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, tuple, tuple]] = {}
        self.seen: set[tuple] = set()  # keys run eagerly once
        self.failed: dict[tuple, str] = {}  # keys left eager: why their capture failed
        self.replays = 0

    def pre(self, layer: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            into: torch.Tensor | None = None) -> tuple[torch.Tensor, list]:
        """Returns (the q | k | v packet [mu * (H + 2 Hkv) * Dh] of PreAttn(layer) on x [1, mu, D],
        the (heads, Dh) of q, k, v); a replay copies the packet into `into` (when given) and returns it."""
        from .latent import absorbed_query, query_width

        cfg, block = self.model.config, self.model.layers[layer]
        dims = [(cfg.num_heads, query_width(cfg)), *cfg.kv_cache_dims()]

        def part(x, cos, sin):
            q, k, v = block.pre_attn(x, cos, sin)
            if cfg.mla is not None:  # MLA: the absorbed query (pipeline.latent), k, v the latent and rope key
                q = absorbed_query(block.attn, q)
            return (qkv_packet(q, k, v),)

        return self._run(("pre", layer, x.shape[1]), part, (x, cos, sin), None if into is None else (into,))[0], dims

    def post(self, layer: int, x: torch.Tensor, attn_out: torch.Tensor, head: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns (the residual stream [1, mu, D] after PostAttn(layer), the logits [mu, V] when
        `head`) for x [1, mu, D] and the attention output [1, mu, H * Dh] (MLA: [1, mu, H * (r + dr)],
        W_uv applied in the graph, pipeline.latent); a paged MoE layer's
        bookkeeping runs around the graph. A replay writes the residual stream into x itself (its
        copy into the graph's input is queued before) instead of a new tensor."""
        from .latent import latent_output, query_width

        model, paged = self.model, self.paged
        block, latent = model.layers[layer], model.config.mla is not None
        width = query_width(model.config)

        def part(x, attn_out):
            if latent:
                attn_out = latent_output(block.attn, attn_out.view(attn_out.shape[1], -1, width))
            y = block.post_attn(x, attn_out)
            return (y, model.head(y)[0]) if head else (y,)

        if paged is None or layer not in paged.experts:
            outs = self._run(("post", layer, x.shape[1], None, head), part, (x, attn_out), (x,))
        else:
            half = paged.begin_call(layer)
            start = paged.span_event()
            slots = x.shape[1] * block.mlp.top_k
            with paged.external_call(layer, half, x.reshape(-1, x.shape[-1]), slots):
                outs = self._run(("post", layer, x.shape[1], half, head), part, (x, attn_out), (x,))
            paged.end_call(layer, start)
        return outs[0], (outs[1] if head else None)

    def _run(self, key: tuple, part: Callable[..., tuple], inputs: tuple, into: tuple | None = None) -> tuple:
        """Returns part(*inputs): eagerly the first time (and for keys whose capture failed), else
        the key's graph replayed (captured first) on copies of the inputs, its outputs copied out:
        into the first tensors of `into` (no allocation a task), the rest into new ones."""
        if key in self.failed or key not in self.seen or not self.capturable:
            self.seen.add(key)
            return part(*inputs)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._capture(key, part, inputs)
            if entry is None:
                return part(*inputs)
        graph, static_in, static_out = entry
        for s, t in zip(static_in, inputs):
            s.copy_(t)
        graph.replay()
        self.replays += 1
        into = into or ()
        return tuple(into[i].copy_(t) if i < len(into) else t.clone() for i, t in enumerate(static_out))

    def _capture(self, key: tuple, part: Callable[..., tuple], inputs: tuple):
        """Returns (graph, static inputs, static outputs) of part captured on copies of `inputs`,
        or None (the reason in `failed`) when the capture fails."""
        static_in = tuple(t.clone() for t in inputs)
        graph = torch.cuda.CUDAGraph()
        current = torch.cuda.current_stream(self.model.device)
        self.stream.wait_stream(current)  # the static inputs' copies come first
        try:
            with torch.cuda.stream(self.stream):
                # thread_local: the attention worker's CUDA calls (its event waits) do not break the capture
                graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
                try:
                    static_out = part(*static_in)
                finally:
                    graph.capture_end()
        except Exception as e:  # noqa: BLE001 -- any op the capture refuses leaves the key eager
            self.failed[key] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            return None
        finally:
            current.wait_stream(self.stream)
        self.graphs[key] = (graph, static_in, static_out)
        return self.graphs[key]

    def report(self) -> dict:
        """Returns the graphs' counts: captured, replays, keys left eager and why."""
        return {"captured": len(self.graphs), "replays": self.replays,
                "failed": {"/".join(map(str, k)): why for k, why in self.failed.items()}}


class StandInGraph:
    """torch.cuda.CUDAGraph's stand-in on the CPU (tests, probes/launch-cost runs): a replay runs the
    captured part again on the graph's static inputs and writes its static outputs in place, as a
    graph's kernels would; what the launch thread does around the replays is the GPU's graph path."""

    def capture_begin(self, pool=None, capture_error_mode="global"):
        pass

    def capture_end(self):
        pass

    def replay(self):
        for static, fresh in zip(self.static_out, self.part(*self.static_in)):
            static.copy_(fresh)


class _NoStream:
    def wait_stream(self, other):
        pass


def stand_in_graphs(model, set_attr: Callable = setattr) -> TaskGraphs:
    """Makes a CPU model's CGOPipe tasks run through TaskGraphs with StandInGraph and returns them;
    `set_attr` sets each patched attribute of torch.cuda and the graphs (pytest's
    monkeypatch.setattr undoes them after a test)."""
    import contextlib

    graphs = TaskGraphs(model, model.expert_runtime)
    graphs.capturable, graphs.stream = True, _NoStream()
    capture = graphs._capture

    def capture_linked(key, part, inputs):
        entry = capture(key, part, inputs)
        if entry is not None:
            entry[0].part, entry[0].static_in, entry[0].static_out = part, entry[1], entry[2]
        return entry

    set_attr(graphs, "_capture", capture_linked)
    set_attr(torch.cuda, "CUDAGraph", StandInGraph)
    set_attr(torch.cuda, "current_stream", lambda device=None: _NoStream())
    set_attr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    model._pipeline_graphs = graphs
    return graphs
