"""Offloaded ranks: expert parallelism where each rank offloads its own shard of the experts.

Each rank holds the whole non-expert model on its device and its slice of every layer's routed
experts (parallel.expert) in host memory, served through its own expert cache under its own
device budget (moekit.offload): a model that fits neither one GPU's budget nor all of the GPUs'
budgets resident runs with every rank fetching only its shard's misses.

    comm = ExpertComm.from_env("cuda")
    model = load_offloaded_parallel(path, comm, OffloadConfig(device_memory=24 * 10**9))

The rank's offload runtime sees its shard as a model of E_r experts per layer (rows 0..E_r-1 in
expert-id order; ModelConfig.experts_per_layer): the budget plan, the cache and the host store
count this rank's experts only. Two things differ from a one-GPU offload, both because a rank
knows only its shard: no predictor (predictions name global expert ids: `predictor` is forced
to "none"), and no measured warm-up (CUDA: the cache is sized from the plan's estimate; the
measured fit runs generate calls whose collectives the other ranks would have to join in step).

Shapes: E = experts of a layer, E_r = this rank's, D = hidden.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..errors import MoekitError
from ..experts.forms import DenseForm
from ..experts.loader import LoadContext
from .comm import ExpertComm
from .expert import ExpertParallelLoader, ExpertParallelRuntime, ShardedExperts


class OffloadedParallelRuntime(ExpertParallelRuntime):
    """ExpertParallelRuntime whose local experts are offloaded: the engine's KV reservation and
    prefill chunking go to this rank's offload runtime (every rank plans alike, so every rank
    chunks a prompt alike and the collectives stay in step)."""

    def __init__(self, comm: ExpertComm):
        super().__init__(comm)
        self.offload = None  # the rank's OffloadRuntime, set by the loader

    @property
    def prefill_chunk(self) -> int | None:
        return None if self.offload is None else self.offload.prefill_chunk

    @prefill_chunk.setter
    def prefill_chunk(self, value) -> None:  # the base class assigns None
        pass

    def reserve(self, batch: int, positions: int) -> None:
        self.offload.reserve(batch, positions)

    def report(self) -> dict:
        out = super().report()
        out["placement"] = "expert_parallel_offloaded"
        out["offload"] = self.offload.report()
        return out


class OffloadedParallelLoader(ExpertParallelLoader):
    """Builds each MoE layer's ShardedExperts over this rank's shard, read into host memory and
    served by an offload runtime of its own (dense experts; compressed forms are refused for now)."""

    def __init__(self, comm: ExpertComm, offload, expert_map: Mapping[int, Sequence[int]] | None = None):
        from ..offload.loader import OffloadLoader

        # misses: a rank fetches its shard's (auto, the default, runs as fetch; cpu and mapped are refused)
        if offload.misses not in ("fetch", "auto"):
            raise MoekitError(f"misses '{offload.misses}' is not available with expert parallelism (a rank fetches "
                              "the misses of its shard): use misses 'fetch'")
        super().__init__(comm, expert_map)
        # no predictor (it would name global ids), and the input embedding stays on the device (the
        # one-device loader moves it to host memory in a step this loader does not take)
        offload = dataclasses.replace(offload, predictor="none", strict=False, host_embedding=False, misses="fetch")
        self.offload_config = offload
        self.runtime = OffloadedParallelRuntime(comm)
        self.host_layers: dict[int, dict[str, torch.Tensor]] = {}
        self.inner = OffloadLoader(offload, host_layers=self.host_layers)
        self.shard_ctx: LoadContext | None = None

    def _start(self, ctx: LoadContext) -> None:
        super()._start(ctx)
        if type(self.form) is not DenseForm:
            raise MoekitError(f"offloaded ranks hold dense experts only for now ({ctx.ckpt.path} stores them as "
                              f"{self.form.name}): run expert parallelism resident, or offload on one device")
        cfg = ctx.config
        counts = []
        for layer in range(cfg.num_layers):
            owners = self.owners.get(layer, [])
            held = [owners.count(r) for r in range(self.comm.world)]
            short = [r for r, n in enumerate(held) if cfg.moe_layers[layer] and n < cfg.top_k]
            if short:  # every rank knows every owner: all refuse alike, none waits for the others
                raise MoekitError(f"rank {short[0]} owns {held[short[0]]} experts of layer {layer}, fewer than the "
                                  f"{cfg.top_k} a token may need at once from one rank's cache; give every rank at "
                                  "least top-k experts of each layer (fewer ranks, or another expert map)")
            counts.append(held[self.comm.rank])
        # this rank's shard as a model of its own: E_r experts per layer, rows in expert-id order
        shard = dataclasses.replace(cfg, experts_per_layer=tuple(counts))
        self.shard_ctx = dataclasses.replace(ctx, config=shard)

    def build(self, ctx: LoadContext, layer: int) -> nn.Module:
        if self.form is None:
            self._start(ctx)
        form, owners = self.form, self.owners[layer]
        local = [e for e, r in enumerate(owners) if r == self.comm.rank]
        tensors = form.empty(len(local), layer, "cpu")  # pinned by the store
        with torch.no_grad():
            for row, e in enumerate(local):
                form.read(ctx.ckpt, ctx.family, layer, e, {k: v[row] for k, v in tensors.items()})
        self.host_layers[layer] = tensors
        source = self.inner.build(self.shard_ctx, layer)  # OffloadedExperts over rows 0..E_r-1
        self.host_layers.pop(layer)  # the store holds (a pinned copy of) them now
        self.runtime.owned[layer] = len(local)
        return ShardedExperts(form, layer, owners, self.comm, {}, self.runtime, local_source=source)

    def finish(self, model: nn.Module, ctx: LoadContext):
        offload = self.inner.runtime
        if offload is None:
            raise MoekitError(f"{ctx.ckpt.path}: the model has no MoE layer, nothing to offload")
        offload.attach(model)
        offload.reset_stats()
        self.runtime.offload = offload
        return self.runtime


def load_offloaded_parallel(path, comm: ExpertComm, offload, expert_map: Mapping[int, Sequence[int]] | None = None,
                            dtype: str | torch.dtype | None = None, **kwargs) -> nn.Module:
    """Returns the model at `path` on comm.device with this rank's slice of every layer's experts
    offloaded under `offload` (an OffloadConfig: this rank's device budget); every rank of comm must
    call it with the same arguments. A rank fetches its misses: misses auto (the default) runs as
    fetch; cpu and mapped are refused."""
    from ..errors import MoekitError
    from ..load import load_model

    if getattr(offload, "dense", "bf16") != "bf16" or kwargs.get("dense", "bf16") != "bf16":
        raise MoekitError("int8 projections (--quantize-dense int8) are not available with expert parallelism "
                          "yet: load with dense='bf16'")
    return load_model(path, device=comm.device, dtype=dtype,
                      experts=OffloadedParallelLoader(comm, offload, expert_map), **kwargs)
