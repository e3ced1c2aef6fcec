"""The offloaded expert source (the seam's forward) and the runtime all its layers share.

Per MoE layer call: one host sync reads the routing and the next layer's prediction; missing
experts are fetched (demand), then the next layer's predicted experts (prefetch, behind them
on the copy stream); compute waits for this layer's experts only, then hands the stored form
(experts.forms) the cache slab viewed in the layer's layout (offload.layout) with each routed
expert's slot: the form runs them exactly as it runs a resident layer, so outputs equal the
resident model's. The runtime never multiplies an expert itself. When a layer needs
more distinct experts than the cache holds (a long prefill on a small budget), it runs in waves.
With misses "cpu" or "auto", a call of few tokens computes the experts that are not on the
device on the CPU instead, overlapped with the device part (offload.cpu); on a GPU, for small dense
experts, their decode steps are instead captured whole with the CPU serving every layer's misses
from one native call (offload.partner). With misses "mapped", a decode step reads missed experts in
place from host memory and is captured whole, the cache managed between steps (offload.mapped).

The runtime is the model's expert runtime (experts.runtime): generate asks it to reserve a
generation's KV cache (taken from the expert cache: offload.planner) and to capture decode steps.

Shapes: N = tokens, A = experts per token, D = hidden, E = experts.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections import deque

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import MoekitError
from ..routers import weights_of
from .cache import ExpertCache
from .config import OffloadConfig
from .cpu import (ADMIT_RATIO, IN_PLACE_ENV, ROW_SPLIT_ENV, CostModel, CpuWorker, row_split, share_in_place,
                  split_misses)
from ..experts.forms import DenseForm, needs_grad
from .layout import SlotLayout
from .planner import BudgetPlan, decimal_size, kv_cache_bytes, prefill_activation_bytes
from .predictors import Predictor
from .stats import OffloadStats
from .store import HostStore


def reads_in_place(device: torch.device) -> bool:
    """Returns whether the device can read host memory in place through the expert kernels (a GPU,
    or the CPU under the Triton interpreter: the tests)."""
    from ..experts import triton_ops

    return triton_ops.triton_usable(torch.empty(0, device=device))


def device_index(values: list, device: torch.device) -> torch.Tensor:
    """Returns `values` (ints, nested lists) as a long tensor on `device`; on CUDA copied from pinned
    memory, which leaves the host free (from pageable memory the copy may wait for the stream,
    stalling the launches behind it). The pinned block is PyTorch's cached host allocation: it is
    reused only once the copy that read it has run (the allocator records an event for it)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=torch.long).to(device)
    return torch.tensor(values, dtype=torch.long, pin_memory=True).to(device, non_blocking=True)


# misses auto reads misses in place (mapped) where the cache holds at least this share of the experts
# and they are small: on the H200 (OLMoE shape, bf16, 12.6 MB experts) mapped ran 606.5 tok/s against the
# CPU/PCIe split's 199.1 with ~55% of the experts cached, and 52.1 against 66.9 with 6%
# (bench_llamacpp_olmoe_misses_ab07f17.json); the crossing between the two is not measured
AUTO_MAPPED_SHARE = 0.5
# experts of at least this many bytes never run as mapped under auto, and only they get the split's
# in-place share (offload.cpu): a layer call's host sync and launches are small beside reading them.
# H200, Mixtral shape (352 MB experts), one run (bench_llamacpp_mixtral_inplace_f51a719.json): at a
# 13.8 GB budget (56% cached) mapped decoded 22.2 tok/s against the CPU split's 34.5; at 2.52 GB the
# split with the in-place share 14.6 against 11.5 without. OLMoE (12.6 MB), the same session: the
# in-place share 40.7 against 54.2 without (bench_llamacpp_olmoe_inplace_f51a719.json). Between 12.6
# and 352 MB nothing is measured
IN_PLACE_MIN_EXPERT_BYTES = 64 * 2**20


def auto_reads_in_place(cache_slots: int, total_experts: int, expert_bytes: int = 0) -> bool:
    """Returns whether misses auto runs as mapped for a cache of `cache_slots` of `total_experts`
    experts of `expert_bytes` each."""
    return (total_experts > 0 and cache_slots >= AUTO_MAPPED_SHARE * total_experts
            and expert_bytes < IN_PLACE_MIN_EXPERT_BYTES)


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

    def __init__(self, config: OffloadConfig, model_config: ModelConfig, layout: SlotLayout, store,
                 device: torch.device, dtype: torch.dtype, plan: BudgetPlan):
        self.config, self.model_config, self.layout, self.store, self.device = config, model_config, layout, store, device
        self.dtype, self.plan = dtype, plan
        self.form = layout.form  # multiplies; the runtime only moves its stored tensors
        self.moe_layers = [i for i, moe in enumerate(model_config.moe_layers) if moe]
        self.next_of = dict(zip(self.moe_layers, self.moe_layers[1:]))
        self.stats = OffloadStats()
        self.baseline_bytes = 0  # device bytes allocated before the load (not ours; set by the loader)
        self.cache: ExpertCache | None = None
        self.prefill_chunk = plan.prefill_chunk  # generate prefills this many tokens per forward
        self.pinned_keys: list[tuple[int, int]] = []  # most used experts, pinned in every new cache
        self.mapped_checked = False  # the in-place read self-test runs once per runtime
        self.in_place_checked = False  # ... and once for the split's in-place share
        self.in_place_refused: str | None = None  # why the device could not read in place (the self-test)
        self.partner_checked: set[int | None] = set()  # the CPU partner's round trip, checked once per runtime and row split
        self.partner_refused: str | None = None  # why the CPU partner could not run (then never retried)
        self.gather_checked = False  # the partner's gather (compressed forms), checked once per runtime
        self.gather_refused: str | None = None  # why it could not run (the CPU then computes every miss)
        self.gather_room_note: str | None = None  # why the present cache has no scratch slots for it
        self.predictor: Predictor = Predictor()
        self.routers: dict[int, nn.Linear] = {}
        self.predicted: dict[int, tuple[torch.Tensor, list[int]]] = {}  # layer -> (ids [N, k], on host)
        self.calls: dict[int, int] = {}
        self.trace: dict[int, list[torch.Tensor]] = {}
        self.misses = config.misses  # what runs: "auto" falls back to "fetch" where it cannot help
        self.misses_note: str | None = None  # why it fell back
        self.cpu: CpuWorker | None = None  # the CPU expert path (misses cpu/auto)
        self.costs: CostModel | None = None  # measured rates (CUDA, misses cpu/auto)
        self.mapped = None  # offload.mapped.MappedTable (misses mapped), attached to each new cache
        self.in_place = None  # offload.mapped.InPlaceReads (misses auto's in-place share), attached to each new cache
        self.row_split_on = False  # the in-place share cuts experts by rows (MOEKIT_ROW_SPLIT=0: whole experts)
        self.in_place_pending: deque = deque()  # ((start, end) CUDA events, modelled seconds) of in-place parts
        self.in_place_spare: list = []  # event pairs already read, recorded again by later parts
        self._choose_misses()
        if config.strict:
            warnings.warn("strict offload runs only the predicted experts: outputs change, and stay "
                          "good only with a model fine-tuned for its pre-gates", stacklevel=2)

    # ---- lifecycle ---------------------------------------------------------------------------
    def _choose_misses(self) -> None:
        """Sets where misses run (offload.cpu, offload.mapped), or refuses in one line a combination
        that cannot work, naming what to use instead."""
        from .cpu import CpuWorker

        misses, form, device = self.config.misses, self.form, self.device
        if misses == "fetch":
            return
        if misses == "auto" and self.config.strict:  # strict mode runs the predicted experts, fetched
            self.misses, self.misses_note = "fetch", "strict mode fetches the predicted experts: misses are fetched"
            return
        plan = self.plan
        if misses == "auto" and device.type == "cuda" and form.reads_in_place and \
                auto_reads_in_place(plan.cache_slots, plan.total_experts, plan.expert_bytes) and \
                reads_in_place(device):
            self.misses, self.misses_note = "mapped", (
                f"the cache holds {plan.cache_slots / plan.total_experts:.0%} of the experts: misses are read in "
                f"place and each decode step runs as one CUDA graph (misses mapped)")
            return
        if misses == "mapped":
            if not form.reads_in_place:
                raise MoekitError(f"--misses mapped: experts stored as {form.name} cannot be read in place "
                                  f"({form.why_not_in_place}); use --misses fetch")
            if not reads_in_place(device):
                raise MoekitError("--misses mapped reads missed experts in place from host memory over the GPU's "
                                  "link; on the CPU nothing crosses a link: use --misses fetch")
            if self.config.predictor not in ("none", "auto"):
                self.misses_note = (f"decode steps read misses in place and consult no predictor; "
                                    f"'{self.config.predictor}' serves prefill calls only")
            return
        if not form.cpu_fast:
            if misses == "cpu":
                raise MoekitError(f"--misses cpu: experts stored as {form.name} have no fast CPU path "
                                  f"({form.why_not_cpu}); use --misses fetch, or auto (which fetches them)")
            self.misses, self.misses_note = "fetch", f"{form.name} experts have no CPU path: misses are fetched"
            return
        if misses == "auto" and device.type != "cuda":
            self.misses, self.misses_note = "fetch", (
                "the device is the CPU: nothing crosses a link, so a miss is copied into the host-memory cache")
            return
        self.cpu = CpuWorker(self.layout, self.store, device, self.config.cpu_max_tokens, self.config.cpu_threads)

    def predictor_name(self) -> str:
        """Returns the predictor the config asks for, `auto` resolved to speculative (which calls
        run split between the CPU and the device leave unconsulted: `split_predicts`)."""
        return "speculative" if self.config.predictor == "auto" else self.config.predictor

    @property
    def split_predicts(self) -> bool:
        """Whether calls whose misses run on the CPU (misses cpu/auto, decode-sized) prefetch the next
        layer's predicted experts: not with predictor auto, since on the H200 speculative prefetch cost
        14-24% there (profile_cpu_misses_0284941); prefill-sized calls, which fetch, still do."""
        return self.config.predictor != "auto"

    def attach(self, model, trace: dict | None = None, pinned: list[tuple[int, int]] | None = None) -> None:
        """Links the runtime to its loaded model: the routers (strict mode), the predictor, the
        experts to pin, the first cache, and (misses cpu/auto on CUDA) the measured rates."""
        from .predictors import build_predictor

        cfg = self.config
        self.routers = {i: model.layers[i].mlp.router for i in self.moe_layers}
        k = cfg.prefetch_k or self.model_config.top_k
        self.predictor = build_predictor(self.predictor_name(), model, self.next_of, k, cfg.pregate_path, trace)
        self.pinned_keys = list(pinned or [])
        self.new_cache(self.plan.cache_slots)
        if self.cpu is not None and self.device.type == "cuda":
            from .cpu import measure_costs

            self.costs = measure_costs(self, self.dtype)
            self.cache.h2d_bytes_per_s = self.costs.h2d_bytes_per_s
            rows = self.partner_rows()  # the partner's row split needs the rates just measured
            if rows is not None and self.partner_refused is None and self._partner_serves() and (
                    self.mapped is None or self.mapped.cpu_rows != rows):
                self.new_cache(self.cache.num_slots)

    def forget_calls(self) -> None:
        """Drops what earlier calls left (call numbers, predictions, routing trace): a fresh start."""
        self.calls.clear()
        self.predicted.clear()
        self.trace.clear()

    def new_cache(self, slots: int) -> None:
        """Gives the runtime a fresh, empty cache of `slots` experts (the old one freed first, so
        the two never coexist on the device), pinned experts pinned again, and with misses mapped
        its offset table (checking once that the device reads host memory in place correctly;
        where it does not, misses are fetched)."""
        from .cache import ExpertCache

        if self.cache is not None:
            if self.mapped is not None and self.mapped.partner is not None:
                self.mapped.partner.close()  # a started step's CPU side reads the old table's buffers
            self.cache.close()
            self.cache = self.mapped = self.in_place = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        with torch.inference_mode(False):  # normal tensors, writable in and out of inference mode (reserve runs in it)
            self.cache = ExpertCache(self.layout, self.store, slots, self.device, self.config.cache_policy, self.stats)
            self._attach(slots)

    def _attach(self, slots: int) -> None:
        if self.costs is not None:  # the cache's copy-queue model runs at the measured rate
            self.cache.h2d_bytes_per_s = self.costs.h2d_bytes_per_s
        if self.pinned_keys:
            self.cache.pin(self.pinned_keys[:int(self.config.pin_experts * slots)])
        if self.misses == "auto" and self.cpu is not None:
            self._attach_in_place()
        if self._partner_serves() and self._attach_partner():
            return
        if self.misses != "mapped":
            return
        from .mapped import MappedTable, self_test

        self.mapped = MappedTable(self)
        if self.mapped_checked:
            return
        self.mapped_checked = True
        why = self_test(self.mapped)
        if why is not None:
            self.cache.listener = self.mapped = None
            self.misses, self.misses_note = "fetch", f"{why}: misses are fetched"

    def _attach_partner(self) -> bool:
        """Gives the new cache a table with the CPU as partner (offload.partner), its round trip
        checked once per runtime; returns False (misses then run split per layer call, and the
        report says why) where it cannot be built or the check fails."""
        from .mapped import MappedTable

        if self.partner_refused is not None:
            return False
        gather = self.partner_gather()  # outside the try: a malformed MOEKIT_PARTNER_GATHER is the user's to fix
        try:
            rows = self.partner_rows()
            table = MappedTable(self, partner=True, cpu_rows=rows, gather=gather)
            why = None if rows in self.partner_checked else table.partner.self_test()
            if why is None and table.gather_slots and not self.gather_checked:
                self.gather_checked = True
                self.gather_refused = table.gather_self_test()
            if self.gather_refused is not None:
                table.stop_gather()
            self.gather_room_note = None  # this cache's, not sticky: a larger cache may have the room
            if gather and table.by_slot and not table.gather_slots and self.gather_refused is None:
                self.gather_room_note = (f"{gather} scratch slot(s) would leave fewer than top-k slots of the "
                                         f"{self.cache.num_slots}-slot cache to cache experts in")
        except (MoekitError, ValueError, RuntimeError) as e:
            table, why = None, str(e).splitlines()[0]
        if why is not None:
            self.cache.listener = None
            self.cache.release_blank()  # a compressed form's table took it
            if table is not None:
                table.partner.close()
            self.partner_refused = why
            self.misses_note = f"the CPU partner could not run ({why}): misses run split per layer call"
            return False
        self.partner_checked.add(rows)
        self.mapped = table
        return True

    def partner_gather(self) -> int:
        """Returns the scratch slots of the partner's gather (compressed forms from a host store:
        partner.gather_slots says how many)."""
        from .partner import gather_slots

        if isinstance(self.form, DenseForm) or not isinstance(self.store, HostStore):
            return 0
        return gather_slots(self.device, self.plan.expert_bytes, IN_PLACE_MIN_EXPERT_BYTES,
                            self.model_config.top_k, self.store.pin)

    def partner_rows(self) -> int | None:
        """Returns r where the partner splits each missed expert by rows (the CPU computes ffn rows
        [0, r), the device reads the rest in place; with the in-place share unless MOEKIT_ROW_SPLIT=0, experts
        of IN_PLACE_MIN_EXPERT_BYTES), from the load-time rates of one expert on each side
        (cpu.row_split); None: whole experts on the CPU."""
        if not self.row_split_on or self.costs is None or not isinstance(self.form, DenseForm):
            return None
        return row_split(self.costs.cpu_s(1), self.costs.in_place_s(), self.form.ffn)

    def _partner_serves(self) -> bool:
        """Whether decode steps run captured whole with the CPU computing the misses (offload.partner:
        misses cpu or auto, experts a native kernel computes from a host store (dense, int-N, the
        ternary code; other forms only with MOEKIT_CPU_GRAPH=1);
        `partner.wanted` says where by default). Not where a layer call must be seen
        by the host: strict mode (runs the predicted experts), a recorded routing trace, a predictor
        asked for by name (its prefetches)."""
        from .partner import ENV as PARTNER_ENV
        from .partner import wanted

        cfg = self.config
        if cfg.strict or cfg.record_routing or cfg.predictor not in ("auto", "none"):
            return False
        native = isinstance(self.form, DenseForm) or getattr(self.form, "NATIVE_FORM", 0) != 0
        asked = wanted(self.device, self.plan.expert_bytes, IN_PLACE_MIN_EXPERT_BYTES, native,
                       self.form.reads_in_place) or (
            self.row_split_on and os.environ.get(PARTNER_ENV) != "0"
            and self.partner_rows() is not None)  # large experts: only split by rows (whole, the split per call wins)
        return (asked and self.cpu is not None
                and self.misses in ("cpu", "auto") and self.cpu.native and isinstance(self.store, HostStore)
                and (self.store.pin or self.device.type != "cuda") and reads_in_place(self.device))

    def _attach_in_place(self) -> None:
        """Gives misses auto's split its in-place share (offload.cpu) where experts are large
        (IN_PLACE_MIN_EXPERT_BYTES) and the device reads the pinned host store in place (checked once,
        as for misses mapped); MOEKIT_IN_PLACE=0 leaves it out."""
        from .mapped import InPlaceReads, self_test

        self.in_place = None
        self.row_split_on = False
        if (os.environ.get(IN_PLACE_ENV, "1") == "0" or self.plan.expert_bytes < IN_PLACE_MIN_EXPERT_BYTES
                or self.device.type != "cuda" or not self.form.reads_in_place
                or not isinstance(self.store, HostStore) or not self.store.pin or not reads_in_place(self.device)):
            return
        self.in_place = InPlaceReads(self)
        if not self.in_place_checked:
            self.in_place_checked = True
            self.in_place_refused = self_test(self.in_place)
        if self.in_place_refused is not None:
            self.in_place = None
        else:
            self.row_split_on = os.environ.get(ROW_SPLIT_ENV, "1") != "0" and self.cpu.splits_rows

    def capture_decode(self, model, cache, token: torch.Tensor, position: int):
        """Returns a decode step captured whole (misses mapped), or None: capture it in pieces."""
        if self.mapped is None:
            return None
        from .mapped import capture_step

        return capture_step(self.mapped, model, cache, token, position)

    def reset_stats(self) -> None:
        """Starts counting afresh (the cache keeps its contents); resets the CUDA peak too."""
        if self.mapped is not None:
            self.mapped.drain()  # steps already run count in the old stats
        self.stats = OffloadStats()
        if self.cache is not None:
            self.cache.stats = self.stats
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def report(self) -> dict:
        """Returns stats, plan and settings as one JSON-ready dict."""
        if self.mapped is not None:
            self.mapped.drain()
        stats = self.stats
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            stats.peak_device_bytes = torch.cuda.max_memory_allocated(self.device) - self.baseline_bytes
        elif self.plan is not None:
            stats.peak_device_bytes = self.plan.planned_bytes
        out = stats.to_dict()
        out.update(predictor=self.predictor.name, predictor_in_split_calls=self.split_predicts,
                   device=self.device.type, cache_policy=self.config.cache_policy,
                   store=self.store.kind, form=self.layout.name, strict=self.config.strict,
                   cache_slots=self.cache.num_slots if self.cache else 0,
                   pinned_slots=(len(self.cache.pinned) - (self.cache.blank is not None) - len(self.cache.scratch)
                                 if self.cache else 0),
                   misses=self.config.misses, misses_used=self.misses, misses_note=self.misses_note,
                   cpu_max_tokens=self.config.cpu_max_tokens, cpu_threads=self.cpu.threads if self.cpu else 0,
                   native_cpu_kernel=bool(self.cpu and self.cpu.native),
                   in_place_share=self.in_place is not None, in_place_refused=self.in_place_refused,
                   row_split=self.row_split_on, cpu_partner=bool(self.mapped is not None and self.mapped.partner),
                   cpu_partner_rows=self.mapped.cpu_rows if self.mapped is not None else None,
                   cpu_partner_refused=self.partner_refused,
                   gather_slots=len(self.cache.scratch) if self.cache else 0,
                   gather_refused=self.gather_refused or self.gather_room_note,
                   cost_model=self.costs.to_dict() if self.costs else None,
                   plan=self.plan.to_dict() if self.plan else None)
        return out

    compilable = False  # steps are captured in pieces between expert calls (or whole, misses mapped)

    def reserve(self, batch: int, positions: int) -> None:
        """Makes room for a generation's KV cache of batch x positions (and the activations of its
        prefill chunks) when the plan holds less: first from the budget the plan left unspent (less
        than one expert), then by shrinking the expert cache; raises MoekitError (one line, with the
        budget it would need) when a token's experts would no longer fit."""
        plan, cfg = self.plan, self.model_config
        kv = kv_cache_bytes(cfg, self.dtype, batch, positions)
        act = prefill_activation_bytes(cfg, self.dtype, batch, min(self.prefill_chunk, positions), positions, self.device)
        grow = max(0, kv - plan.kv_cache_bytes) + max(0, act - plan.activation_bytes)
        if grow == 0:
            return
        unspent = max(0, plan.budget_bytes - plan.planned_bytes)
        slots = self.cache.num_slots - -(-max(0, grow - unspent) // plan.expert_bytes)  # ceil division
        if slots < plan.min_slots:
            need = plan.budget_bytes + (plan.min_slots - slots) * plan.expert_bytes
            raise MoekitError(
                f"a generation of {batch}x{positions} positions needs {decimal_size(kv)} of KV cache; with --device-memory "
                f"{decimal_size(plan.budget_bytes)} that leaves fewer than the {plan.min_slots} experts a token needs: "
                f"give --device-memory {decimal_size(need, up=True)} or more, or a shorter prompt / fewer new tokens")
        if slots != self.cache.num_slots:
            self.new_cache(slots)
        self.plan = dataclasses.replace(plan, kv_cache_bytes=max(kv, plan.kv_cache_bytes), cache_slots=slots,
                                        activation_bytes=max(act, plan.activation_bytes),
                                        kv_positions=max(batch * positions, plan.kv_positions))

    # ---- one layer -----------------------------------------------------------------------------
    def run(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.mapped is not None and self.mapped.serves(expert_ids):  # no host decision: capturable
            return self.mapped.run(layer, x, expert_ids, weights)
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
        split = self.misses in ("cpu", "auto") and n <= self.config.cpu_max_tokens
        pred = self.predictor.predict(layer, call, x) if nxt is not None and (self.split_predicts or not split) \
            else None
        flat = expert_ids.reshape(-1)
        prof = self.cpu.profile if split else None  # MOEKIT_PROFILE_CPU_MISSES=1 (offload.cpu.MissProfile)
        if prof is not None:
            prof.begin(layer)
        if split:  # queued before the sync below, so it completes them: no sync of its own
            x_host, w_host = self.cpu.stage(x, weights)
        if prof is not None:
            prof.mark("sync_start")
        host = (torch.cat([flat, pred.reshape(-1).to(flat.dtype)]) if pred is not None else flat).tolist()
        if prof is not None:
            prof.mark("sync_end")
        routed, predicted = host[: flat.numel()], host[flat.numel():]
        if self.config.record_routing:
            self.trace.setdefault(layer, []).append(expert_ids.detach().cpu())
        needed = sorted(set(routed))
        self._score_prediction(layer, needed)
        self.predicted.pop(layer, None)
        if pred is not None:
            self.predicted[nxt] = (pred, predicted)
        bytes_before, cpu_bytes_before = stats.bytes_moved, stats.cpu_bytes
        capacity = cache.num_slots - len(cache.pinned) + sum(
            1 for e in needed if cache.slot((layer, e)) in cache.pinned)
        if split:
            out = self._run_split(layer, x, expert_ids, weights, routed, needed, nxt, predicted, capacity,
                                  x_host, w_host)
        elif len(needed) <= capacity:
            out = self._run_resident_set(layer, x, expert_ids, weights, routed, needed, nxt, predicted)
        else:
            out = self._run_waves(layer, x, expert_ids, weights, needed, capacity)
        if decode:
            stats.decode_bytes_moved += stats.bytes_moved - bytes_before
            stats.decode_cpu_bytes += stats.cpu_bytes - cpu_bytes_before
        if prof is not None:
            prof.mark("exit")
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
        slots = [cache.slot((layer, e)) for e in needed]
        stats.lookups += len(needed)
        for slot in slots:  # every hit protected before the first fetch, which must not evict one
            if slot is not None:
                stats.hits += 1
                if slot in cache.prefetched:
                    stats.prefetch_hits += 1
                protected.add(slot)
        for i, e in enumerate(needed):
            if slots[i] is None:
                stats.demand_fetches += 1
                slots[i] = cache.fetch((layer, e), protected)
                assert slots[i] is not None, "demand waves are sized to the unpinned slots"
        return slots

    def _prefetch(self, nxt: int | None, predicted: list[int], protected: set[int],
                  horizon_s: float | None = None) -> None:
        """Fetches the next layer's predicted experts; with `horizon_s`, only those whose copy is
        modelled to land within that many seconds (a later one would lose to the CPU)."""
        if nxt is None or not predicted:
            return
        for e in dict.fromkeys(predicted):  # unique, in prediction order
            if self.cache.slot((nxt, e)) is None:
                if horizon_s is not None and (self.cache.queue_s() + self.costs.fetch_s(self.layout.layer_bytes(nxt))
                                              > horizon_s):
                    return  # copies queue one after another: the next would land later still
                if self.cache.fetch((nxt, e), protected, prefetch=True) is None:
                    return  # every slot is in use: prefetch is best effort
                self.stats.prefetches += 1

    def _run_resident_set(self, layer, x, expert_ids, weights, routed, needed, nxt, predicted, horizon_s=None):
        cache = self.cache
        protected: set[int] = set()
        slots = self._lookup(layer, needed, protected)
        self._prefetch(nxt, predicted, protected, horizon_s)  # queued behind this layer's demand copies
        cache.use(slots, [(layer, e) for e in needed])
        slot_of = dict(zip(needed, slots))
        slot_ids = device_index([slot_of[e] for e in routed], x.device).view(expert_ids.shape)
        out = self.form.run(x, slot_ids, weights, self.layout.view(cache.slab, layer), ids=expert_ids, row_of=slot_of,
                            count=self.model_config.experts_in(layer))
        cache.release(slots)
        return out

    # ---- misses on the CPU (offload.cpu) ---------------------------------------------------------
    def _split(self, layer: int, needed: list[int], flat_of: dict[int, list[int]], capacity: int):
        """Returns (experts run on the device from its cache, experts run on the CPU, experts the device
        reads in place, prefetch horizon seconds or None, row split or None: (experts, r), each
        computed on the CPU for ffn rows [0, r) and read in place for the rest)."""
        cache, costs = self.cache, self.costs
        ready, inflight, absent, in_place = [], [], [], []
        for e in needed:
            slot = cache.slot((layer, e))
            (absent if slot is None else ready if cache.ready(slot) else inflight).append(e)
        if self.misses == "cpu" or costs is None:
            device, cpu = ready, inflight + absent
        else:  # auto: the cost model splits what is not ready between the link and the CPU
            fetch_s = costs.fetch_s(self.layout.layer_bytes(layer))
            queue_s = cache.queue_s()
            waits = []
            for e in inflight:
                eta = cache.eta_s(cache.slot((layer, e)))
                waits.append((e, queue_s + fetch_s if eta is None else eta, costs.cpu_s(len(flat_of[e]))))
            # only misses the cache would keep may be fetched: a fetch that evicts a more used expert
            # costs later tokens that expert's hits (offload.cpu: "Only a miss the cache would keep")
            present = {cache.slot((layer, e)) for e in ready + inflight}  # never evicted for this layer's misses
            room = {e for _, e in cache.fetch_room([(layer, e) for e in absent], present, ADMIT_RATIO)}
            fetchable = [(e, costs.cpu_s(len(flat_of[e]))) for e in absent if e in room]
            cpu_only = [(e, costs.cpu_s(len(flat_of[e]))) for e in absent if e not in room]
            on_cpu = set(split_misses(waits, fetchable, queue_s, fetch_s, capacity - len(ready) - len(inflight),
                                      cpu_only))
            self._observe_in_place()
            if self.in_place is not None and costs.in_place_s() > 0:  # the link's share beside the CPU's
                fetched = sum(1 for e in absent if e not in on_cpu)
                movable = [(e, costs.cpu_s(len(flat_of[e]))) for e in absent if e in on_cpu]
                r = None
                if self.row_split_on and movable and len(movable) == len(on_cpu):  # every CPU miss absent
                    r = row_split(sum(c for _, c in movable) / len(movable), costs.in_place_s(), self.form.ffn)
                if r is not None:  # each CPU-bound miss cut at row r (offload.cpu, "The row split")
                    split = [e for e in needed if e in on_cpu]
                    device = [e for e in needed if e not in on_cpu]
                    horizon = sum(c for _, c in movable) * r / self.form.ffn + costs.cpu_s(1)
                    return device, [], [], horizon, (split, r)
                in_place = share_in_place(movable, queue_s + fetched * fetch_s, costs.in_place_s())
                on_cpu.difference_update(in_place)
            device = [e for e in needed if e not in on_cpu and e not in in_place]
            cpu = [e for e in needed if e in on_cpu]
        horizon = None
        if costs is not None:
            horizon = sum(costs.cpu_s(len(flat_of[e])) for e in cpu) + costs.cpu_s(1)
        return device, cpu, in_place, horizon, None

    def _run_split(self, layer, x, expert_ids, weights, routed, needed, nxt, predicted, capacity, x_host, w_host):
        """Runs a call of few tokens: experts on the device where they are, the rest on the CPU."""
        cache, stats = self.cache, self.stats
        top_k = expert_ids.shape[1]
        flat_of: dict[int, list[int]] = {}  # expert -> its flat slots n * A + a
        for i, e in enumerate(routed):
            flat_of.setdefault(e, []).append(i)
        device, cpu, in_place, horizon, split = self._split(layer, needed, flat_of, capacity)
        prof = self.cpu.profile
        if prof is not None:
            prof.note(cpu_experts=len(cpu), device_experts=len(device))
            prof.mark("split")
        if not cpu and not in_place and split is None:
            return self._run_resident_set(layer, x, expert_ids, weights, routed, needed, nxt, predicted, horizon)
        sliced, r = split if split is not None else ([], 0)  # experts cut at ffn row r (offload.cpu, the row split)
        width = self.form.ffn
        rows_cpu = (0, r) if sliced else None
        jobs = [(e, flat_of[e]) for e in (sliced or cpu)]
        # a call that overlaps (the runner thread, a worker thread) starts first, the longest part, and
        # runs while this thread queues the device part; inline, the device part is queued first, so
        # the GPU runs it while this thread computes the CPU part (offload.cpu)
        job = self.cpu.submit(layer, jobs, x_host, w_host, rows_cpu) if jobs and self.cpu.overlaps else None
        try:
            expert_bytes = self.layout.layer_bytes(layer)
            stats.lookups += len(cpu) + len(in_place) + len(sliced)
            stats.cpu_experts += len(cpu)
            stats.row_split_experts += len(sliced)
            stats.cpu_bytes += len(cpu) * expert_bytes + len(sliced) * expert_bytes * r // width
            cache.count_uses([(layer, e) for e in cpu + in_place + sliced])
            # copies in flight that the CPU outran stay (the split's fetch_room counted them as kept)
            protected = {slot for slot in (cache.slot((layer, e)) for e in cpu) if slot is not None}
            slots = self._lookup(layer, device, protected)  # hits (auto: and the fetches it chose)
            self._prefetch(nxt, predicted, protected, horizon)
            out = None
            if device:
                cache.use(slots, [(layer, e) for e in device])
                slot_of = dict(zip(device, slots))
                rows = [i for e in device for i in flat_of[e]]  # in expert order
                index = device_index([rows, [slot_of[routed[i]] for i in rows]], x.device)
                tokens, slot_ids = index[0] // top_k, index[1].view(-1, 1)
                ids = expert_ids.reshape(-1)[index[0]].view(-1, 1)
                xs, ws = x[tokens], weights.reshape(-1)[index[0]].view(-1, 1)  # [S, D], [S, 1]
                part = self.form.run(xs, slot_ids, ws, self.layout.view(cache.slab, layer), ids=ids, row_of=slot_of,
                                     count=self.model_config.experts_in(layer))  # [S, D], weighted
                out = torch.zeros_like(x).index_add_(0, tokens, part)
            timing = self._in_place_events(in_place, sliced, r, width) if in_place or sliced else None
            for part_of, ffn_rows in ((in_place, None), (sliced, (r, width))):
                if not part_of:
                    continue
                # read from host memory by the device, beside the CPU's share (whole experts, or the rows
                # past r of the experts the CPU computes up to r)
                rows = [i for e in part_of for i in flat_of[e]]
                flat = device_index(rows, x.device)
                tokens = flat // top_k
                part = self.in_place.run(layer, x[tokens], expert_ids.reshape(-1)[flat].view(-1, 1),
                                         weights.reshape(-1)[flat].view(-1, 1), ffn_rows=ffn_rows)
                out = (torch.zeros_like(x) if out is None else out).index_add_(0, tokens, part)
                moved = len(part_of) * expert_bytes * (width - r if ffn_rows else width) // width
                stats.in_place_experts += len(part_of) if ffn_rows is None else 0
                stats.mapped_reads += len(rows)
                stats.mapped_bytes += moved
                if x.shape[0] == 1:
                    stats.decode_mapped_bytes += moved
            if timing is not None:
                timing[1].record()
            for e in sorted(cpu + in_place + sliced, key=lambda e: -cache.uses[(layer, e)]):  # popular ones in
                if not cache.link_idle() or cache.admit((layer, e), protected, ADMIT_RATIO) is None:
                    break
                stats.admissions += 1
            if prof is not None:
                prof.mark("device_launched")
            if job is None and jobs:
                job = self.cpu.submit(layer, jobs, x_host, w_host, rows_cpu)
        except BaseException:
            if job is not None:  # the started call must end before its buffers go (and before the next start)
                self.cpu.abandon(job)
            raise
        if jobs:
            cpu_out, cpu_s, wait_s = self.cpu.join(job)
            if self.costs is not None:  # the CPU side of the split follows what its calls take
                share = r / width if sliced else 1.0  # a row split's CPU part reads that share of each expert
                self.costs.observe_cpu(share * sum(self.costs.cpu_s(len(flat)) for _, flat in jobs), cpu_s)
            stats.cpu_s += cpu_s
            stats.cpu_wait_s += wait_s
            out = cpu_out if out is None else out.add_(cpu_out)
        if device:
            cache.release(slots)
        return out

    def _in_place_events(self, whole: list[int], sliced: list[int], r: int, width: int) -> tuple | None:
        """Returns the (start, end) CUDA events around this call's in-place part, its start recorded
        (the caller records the end), queued with the part's modelled seconds for _observe_in_place;
        None off CUDA or without a cost model. Pairs are reused once read (at most a few in flight)."""
        if self.costs is None or self.device.type != "cuda":
            return None
        pair = self.in_place_spare.pop() if self.in_place_spare else (
            torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        pair[0].record()
        modelled = self.costs.in_place_s() * (len(whole) + len(sliced) * (width - r) / width)
        self.in_place_pending.append((pair, modelled))
        return pair

    def _observe_in_place(self) -> None:
        """Teaches the cost model the device time of the in-place parts whose events have completed
        (oldest first, without waiting)."""
        while self.in_place_pending and self.in_place_pending[0][0][1].query():
            pair, modelled = self.in_place_pending.popleft()
            self.costs.observe_in_place(modelled, pair[0].elapsed_time(pair[1]) / 1e3)
            self.in_place_spare.append(pair)

    def _run_waves(self, layer, x, expert_ids, weights, needed, capacity):
        """Runs a layer whose experts do not fit the cache at once, `capacity` experts at a time,
        each expert on the rows the resident layer gives it, reduced as the resident layer does."""
        cache, form = self.cache, self.form
        plan = form.plan(expert_ids, weights, self.model_config.experts_in(layer), grad=needs_grad(x, weights, {}))
        xs = plan.inputs(x)  # [S, D]
        per_slot = torch.empty_like(xs)
        rows_of = ({e: (plan.expert_of == e).nonzero().squeeze(-1) for e in needed} if plan.gathered
                   else {e: slice(lo, hi) for e, lo, hi in plan.runs()})
        for start in range(0, len(needed), capacity):
            wave = needed[start:start + capacity]
            protected: set[int] = set()
            slots = self._lookup(layer, wave, protected)
            cache.use(slots, [(layer, e) for e in wave])
            stacked = self.layout.view(cache.slab, layer)
            for e, slot in zip(wave, slots):
                if e not in rows_of:  # every slot of this expert has a zero weight (dynamic skip)
                    continue
                rows = rows_of[e]
                index = torch.full_like(rows, slot) if plan.gathered else slot
                per_slot[rows] = form.apply(xs[rows], stacked, index)
            cache.release(slots)
        return plan.reduce(per_slot, x)

    def _strict_routing(self, layer: int, x: torch.Tensor, pred: torch.Tensor):
        """Returns (ids, weights) using the predicted experts, weighted by this layer's router."""
        ids = pred[:, : self.model_config.top_k].to(x.device)
        cfg = self.model_config  # each family's rule (softmax, sigmoid, scaled), not softmax alone
        w = weights_of(self.routers[layer](x), ids, cfg.router, cfg.norm_topk_prob)
        return ids, w.to(x.dtype)
