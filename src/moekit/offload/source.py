"""The offloaded expert source (the seam's forward) and the runtime all its layers share.

Per MoE layer call: one host sync reads the routing and the next layer's prediction; missing
experts are fetched (demand), then the next layer's predicted experts (prefetch, behind them
on the copy stream); compute waits for this layer's experts only, then runs them from the cache
slab with the resident model's kernels, so outputs equal the resident model's. When a layer needs
more distinct experts than the cache holds (a long prefill on a small budget), it runs in waves.

Shapes: N = tokens, A = experts per token, D = hidden, E = experts.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import MoekitError
from ..experts.resident import GATHER_MAX_SLOTS
from ..experts.routing import group_by_expert
from .cache import ExpertCache
from .config import OffloadConfig
from .forms import ExpertForm
from .planner import BudgetPlan
from .predictors import Predictor
from .stats import OffloadStats


class OffloadedExperts(nn.Module):
    """One MoE layer's experts, served by the shared OffloadRuntime."""

    def __init__(self, layer: int, runtime: "OffloadRuntime"):
        super().__init__()
        self.layer = layer
        self.runtime = runtime  # a plain attribute: not a submodule, holds no parameters

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Returns sum_a weights[n,a] * expert_{ids[n,a]}(x[n]) as [N, D] for x [N, D]."""
        return self.runtime.run(self.layer, x, expert_ids, weights)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, offloaded"


class OffloadRuntime:
    """Cache, store, predictor and stats of one offloaded model (model.offload)."""

    def __init__(self, config: OffloadConfig, model_config: ModelConfig, form: ExpertForm, store,
                 device: torch.device):
        self.config, self.model_config, self.form, self.store, self.device = config, model_config, form, store, device
        self.moe_layers = [i for i, moe in enumerate(model_config.moe_layers) if moe]
        self.next_of = dict(zip(self.moe_layers, self.moe_layers[1:]))
        self.stats = OffloadStats()
        self.cache: ExpertCache | None = None
        self.plan: BudgetPlan | None = None
        self.predictor: Predictor = Predictor()
        self.routers: dict[int, nn.Linear] = {}
        self.predicted: dict[int, tuple[torch.Tensor, list[int]]] = {}  # layer -> (ids [N, k], on host)
        self.calls: dict[int, int] = {}
        self.trace: dict[int, list[torch.Tensor]] = {}
        if config.strict:
            warnings.warn("strict offload runs only the predicted experts: outputs change, and stay "
                          "good only with a model fine-tuned for its pre-gates", stacklevel=2)

    # ---- lifecycle ---------------------------------------------------------------------------
    def reset_stats(self) -> None:
        """Starts counting afresh (the cache keeps its contents); resets the CUDA peak too."""
        self.stats = OffloadStats()
        if self.cache is not None:
            self.cache.stats = self.stats
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def report(self) -> dict:
        """Returns stats, plan and settings as one JSON-ready dict."""
        stats = self.stats
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            stats.peak_device_bytes = torch.cuda.max_memory_allocated(self.device)
        elif self.plan is not None:
            stats.peak_device_bytes = self.plan.planned_bytes
        out = stats.to_dict()
        out.update(predictor=self.predictor.name, device=self.device.type, cache_policy=self.config.cache_policy,
                   store=self.store.kind, form=self.form.name, strict=self.config.strict,
                   cache_slots=self.cache.num_slots if self.cache else 0,
                   pinned_slots=len(self.cache.pinned) if self.cache else 0,
                   plan=self.plan.to_dict() if self.plan else None)
        return out

    def check_generation(self, batch: int, positions: int) -> None:
        """Raises MoekitError when a generation's KV cache is larger than the budget planned for."""
        planned = self.config.batch * (self.config.context_tokens or self.model_config.max_position_embeddings)
        if batch * positions > planned:
            raise MoekitError(
                f"this generation needs a KV cache of {batch}x{positions} positions, but the offload "
                f"budget was planned for {self.config.batch}x{planned // self.config.batch}; reload with "
                f"OffloadConfig(context_tokens={positions}, batch={batch}) (the CLI does this itself)")

    # ---- one layer -----------------------------------------------------------------------------
    def run(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        cache, stats = self.cache, self.stats
        n = x.shape[0]
        call = self.calls.get(layer, 0)
        self.calls[layer] = call + 1
        if layer == self.moe_layers[0]:
            stats.tokens += n
            if n == 1:
                stats.decode_tokens += 1
        decode = n == 1
        if self.config.strict and layer in self.predicted:
            expert_ids, weights = self._strict_routing(layer, x, self.predicted[layer][0])
        nxt = self.next_of.get(layer)
        pred = self.predictor.predict(layer, call, x) if nxt is not None else None
        flat = expert_ids.reshape(-1)
        host = (torch.cat([flat, pred.reshape(-1).to(flat.dtype)]) if pred is not None else flat).tolist()
        routed, predicted = host[: flat.numel()], host[flat.numel():]
        if self.config.record_routing:
            self.trace.setdefault(layer, []).append(expert_ids.detach().cpu())
        needed = sorted(set(routed))
        self._score_prediction(layer, needed)
        self.predicted.pop(layer, None)
        if pred is not None:
            self.predicted[nxt] = (pred, predicted)
        bytes_before = stats.bytes_moved
        capacity = cache.num_slots - len(cache.pinned) + sum(
            1 for e in needed if cache.slot((layer, e)) in cache.pinned)
        if len(needed) <= capacity:
            out = self._run_resident_set(layer, x, expert_ids, weights, routed, needed, nxt, predicted)
        else:
            out = self._run_waves(layer, x, expert_ids, weights, needed, capacity)
        if decode:
            stats.decode_bytes_moved += stats.bytes_moved - bytes_before
        return out

    def _score_prediction(self, layer: int, needed: list[int]) -> None:
        """Counts the prediction made for this layer (at the layer before) against its routing."""
        if layer not in self.predicted:
            return
        chosen = set(self.predicted[layer][1])
        self.stats.predicted += len(chosen)
        self.stats.routed += len(needed)
        self.stats.predicted_correct += len(chosen.intersection(needed))

    def _lookup(self, layer: int, needed: list[int], protected: set[int]) -> list[int]:
        """Returns the slots of `needed` experts of `layer`, fetching the missing ones (demand)."""
        cache, stats = self.cache, self.stats
        slots = []
        for e in needed:
            key = (layer, e)
            slot = cache.slot(key)
            stats.lookups += 1
            if slot is not None:
                stats.hits += 1
                if slot in cache.prefetched:
                    stats.prefetch_hits += 1
                protected.add(slot)
            else:
                stats.demand_fetches += 1
                slot = cache.fetch(key, protected)
                assert slot is not None, "demand waves are sized to the unpinned slots"
            slots.append(slot)
        return slots

    def _prefetch(self, nxt: int | None, predicted: list[int], protected: set[int]) -> None:
        if nxt is None or not predicted:
            return
        for e in dict.fromkeys(predicted):  # unique, in prediction order
            if self.cache.slot((nxt, e)) is None:
                if self.cache.fetch((nxt, e), protected, prefetch=True) is None:
                    return  # every slot is in use: prefetch is best effort
                self.stats.prefetches += 1

    def _run_resident_set(self, layer, x, expert_ids, weights, routed, needed, nxt, predicted):
        cache = self.cache
        protected: set[int] = set()
        slots = self._lookup(layer, needed, protected)
        self._prefetch(nxt, predicted, protected)  # queued behind this layer's demand copies
        cache.use(slots, [(layer, e) for e in needed])
        slot_of = dict(zip(needed, slots))
        slot_ids = torch.tensor([slot_of[e] for e in routed], dtype=torch.long).view(expert_ids.shape)
        slot_ids = slot_ids.to(x.device, non_blocking=True)
        out = self.form.run_slots(x, expert_ids, slot_ids, weights, cache.slab, layer)
        if out is None:  # the grouped path, expert by expert in expert order (as ResidentExperts)
            out = self._grouped(layer, x, expert_ids, weights, lambda e: slot_of[e], needed)
        cache.release(slots)
        return out

    def _grouped(self, layer, x, expert_ids, weights, slot_for, experts) -> torch.Tensor:
        groups = group_by_expert(expert_ids, weights, self.model_config.num_experts)
        xs = x[groups.token_of]  # [S, D] tokens in expert order
        out = torch.empty_like(xs)
        bounds = groups.offsets()
        for e in experts:
            lo, hi = bounds[e], bounds[e + 1]
            if hi > lo:
                out[lo:hi] = self.form.run_one(xs[lo:hi], self.cache.slab, slot_for(e), layer)
        out = out * groups.weight_of[:, None]
        return torch.zeros_like(x).index_add_(0, groups.token_of, out)

    def _run_waves(self, layer, x, expert_ids, weights, needed, capacity):
        """Runs a layer whose experts do not fit the cache at once, `capacity` experts at a time."""
        cache = self.cache
        # per-slot reduction only where the resident source reduces so too (dense, small batches)
        gathered = self.form.gathers and expert_ids.numel() <= GATHER_MAX_SLOTS and not x.is_cuda
        n, top_k = expert_ids.shape
        if gathered:  # per-slot results in slot order, reduced as ResidentExperts._gathered does
            flat = expert_ids.reshape(-1)
            xs = x.repeat_interleave(top_k, dim=0)
            per_slot = torch.empty_like(xs)  # [S, D]
        else:
            groups = group_by_expert(expert_ids, weights, self.model_config.num_experts)
            xs = x[groups.token_of]
            per_slot = torch.empty_like(xs)
            bounds = groups.offsets()
        for start in range(0, len(needed), capacity):
            wave = needed[start:start + capacity]
            protected: set[int] = set()
            slots = self._lookup(layer, wave, protected)
            cache.use(slots, [(layer, e) for e in wave])
            for e, slot in zip(wave, slots):
                if gathered:
                    rows = (flat == e).nonzero().squeeze(-1)
                    slot_ids = torch.full_like(rows, slot)
                    per_slot[rows] = self.form.run_gathered(xs[rows], slot_ids, cache.slab, layer)
                else:
                    lo, hi = bounds[e], bounds[e + 1]
                    per_slot[lo:hi] = self.form.run_one(xs[lo:hi], cache.slab, slot, layer)
            cache.release(slots)
        if gathered:
            return (per_slot.view(n, top_k, -1) * weights[:, :, None]).sum(dim=1)
        per_slot = per_slot * groups.weight_of[:, None]
        return torch.zeros_like(x).index_add_(0, groups.token_of, per_slot)

    def _strict_routing(self, layer: int, x: torch.Tensor, pred: torch.Tensor):
        """Returns (ids, weights) using the predicted experts, weighted by this layer's router."""
        probs = torch.softmax(self.routers[layer](x).float(), dim=-1)
        ids = pred[:, : self.model_config.top_k].to(x.device)
        w = probs.gather(1, ids)
        if self.model_config.norm_topk_prob:
            w = w / w.sum(dim=-1, keepdim=True)
        return ids, w.to(x.dtype)
