"""Loading a model with offloaded experts: the ExpertLoader that builds the offload runtime.

    model = load_offloaded("path/to/model", device="cuda", offload=OffloadConfig(device_memory=8 * 10**9))
    model.generate(ids)             # identical tokens to the resident model
    model.offload.report()          # hit rate, bytes per token, prefetch precision/recall, stalls

On a CPU-only machine the same runtime runs with host memory as the budgeted tier and the
checkpoint on disk as the store. A moekit-compressed checkpoint (quantization_config in config.json)
is offloaded in its stored form (offload.compressed): compressed in the store, over PCIe and in
the cache, decoded inside the matmul.
"""

from __future__ import annotations

import dataclasses

import json
from pathlib import Path

import torch

from ..errors import MoekitError
from ..load import ExpertLoader, LoadContext, load_model
from .config import OffloadConfig
from ..experts.forms import DenseForm
from .layout import SlotLayout, layout_for
from .planner import plan_budget
from .predictors import build_predictor
from .source import OffloadedExperts, OffloadRuntime
from .store import DiskStore, HostStore


class OffloadLoader(ExpertLoader):
    """Builds OffloadedExperts for every MoE layer; plans the budget before any expert is read."""

    def __init__(self, config: OffloadConfig | None = None, pin_counts: dict[int, list[float]] | None = None,
                 trace: dict | None = None, host_layers: dict[int, dict[str, torch.Tensor]] | None = None):
        """`pin_counts` {layer: per-expert use counts} pins the most used experts (config.pin_experts);
        `trace` is an earlier runtime's routing (oracle); `host_layers` gives the experts directly
        as stacked host tensors {layer: {name: [E, ...]}} instead of reading the checkpoint (the
        dense gate_up/down, or a compressed checkpoint's stored tensors named as quant.formats
        names them, code_table included)."""
        self.config = config or OffloadConfig()
        self.pin_counts, self.trace, self.host_layers = pin_counts, trace, host_layers
        self.runtime: OffloadRuntime | None = None
        # The budget counts what this model holds: device memory allocated before the load
        # (the caller's own tensors, other models) is not ours and is left out of every measure.
        self.baseline_bytes = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0

    def _start(self, ctx: LoadContext) -> OffloadRuntime:
        from ..quant.config import QuantConfig, is_moekit_quantized

        cfg, device = ctx.config, ctx.device
        if is_moekit_quantized(ctx.ckpt.config):
            from ..quant.formats import form_from_checkpoint, form_from_tensors

            quant = QuantConfig.from_dict(ctx.ckpt.config["quantization_config"], str(ctx.ckpt.path / "config.json"))
            form = (form_from_tensors(quant, cfg, self.host_layers, device) if self.host_layers is not None
                    else form_from_checkpoint(quant, cfg, ctx.ckpt, ctx.family, device))
        else:
            form = DenseForm(cfg.hidden_size, cfg.expert_ffn, ctx.dtype)
        moe_layers = [i for i, moe in enumerate(cfg.moe_layers) if moe]
        layout: SlotLayout = layout_for(form, moe_layers)
        kind = self.config.store
        if kind == "auto":
            kind = "host" if device.type == "cuda" or self.host_layers is not None or self._reads_in_place(device) else "disk"
        self.plan = plan_budget(cfg, ctx.dtype, layout.expert_bytes(), self.config, device, disk_store=kind == "disk",
                                shared_bytes=layout.shared_bytes())
        if kind == "host":
            store = HostStore(layout, pin=device.type == "cuda")
        else:
            if self.host_layers is not None:
                raise MoekitError("experts given as host tensors need store='host' (or 'auto')")
            store = DiskStore(layout, ctx.ckpt, ctx.family, cfg)
        runtime = OffloadRuntime(self.config, cfg, layout, store, device, ctx.dtype, self.plan)
        self._choose_misses(runtime, ctx)
        return runtime

    def _reads_in_place(self, device: torch.device) -> bool:
        """Returns whether misses "mapped" can run on `device` (GPU, or the CPU under the Triton interpreter)."""
        from ..experts import triton_ops

        return self.config.misses == "mapped" and triton_ops.triton_usable(torch.empty(0, device=device))

    def _choose_misses(self, runtime: OffloadRuntime, ctx: LoadContext) -> None:
        """Sets where misses run (offload.cpu), or refuses a combination that cannot work."""
        from .cpu import CpuExperts

        misses = self.config.misses
        if misses == "fetch":
            return
        form, device = runtime.form, ctx.device
        if misses == "mapped":
            if not form.reads_in_place:
                raise MoekitError(f"--misses mapped: experts stored as {form.name} cannot be read in place "
                                  f"({form.why_not_in_place}); use --misses fetch")
            if not self._reads_in_place(device):
                raise MoekitError("--misses mapped reads missed experts in place from host memory over the GPU's "
                                  "link; on the CPU nothing crosses a link: use --misses fetch")
            if self.config.predictor != "none":
                runtime.misses_note = (f"decode steps read misses in place and consult no predictor; "
                                       f"'{self.config.predictor}' serves prefill calls only")
            return
        if not form.cpu_fast:
            if misses == "cpu":
                raise MoekitError(f"--misses cpu: experts stored as {form.name} have no fast CPU path "
                                  f"({form.why_not_cpu}); use --misses fetch, or auto (which fetches them)")
            runtime.misses, runtime.misses_note = "fetch", f"{form.name} experts have no CPU path: misses are fetched"
            return
        if misses == "auto" and device.type != "cuda":
            runtime.misses, runtime.misses_note = "fetch", (
                "the device is the CPU: nothing crosses a link, so a miss is copied into the host-memory cache")
            return
        runtime.cpu = CpuExperts(runtime.layout, runtime.store, device, self.config.cpu_max_tokens,
                                 self.config.cpu_threads)

    def build(self, ctx: LoadContext, layer: int) -> OffloadedExperts:
        if self.runtime is None:
            self.runtime = self._start(ctx)
        store = self.runtime.store
        if isinstance(store, HostStore):
            if self.host_layers is not None:
                store.add_layer(layer, self.host_layers[layer])
            else:
                store.load_layer(ctx.ckpt, ctx.family, ctx.config, layer)
        return OffloadedExperts(layer, self.runtime)

    def finish(self, model, ctx: LoadContext) -> OffloadRuntime:
        runtime = self.runtime
        if runtime is None:
            raise MoekitError(f"{ctx.ckpt.path}: the model has no MoE layer, nothing to offload")
        cfg = self.config
        if self.plan.host_embedding_bytes:
            from .embedding import HostEmbedding

            model.embed = HostEmbedding.from_embedding(model.embed)
        if cfg.pin_experts > 0 and self.pin_counts:
            runtime.pinned_keys = most_used(self.pin_counts, int(cfg.pin_experts * self.plan.total_experts))
        runtime.new_cache(self.plan.cache_slots)
        runtime.routers = {i: model.layers[i].mlp.router for i in runtime.moe_layers}
        k = cfg.prefetch_k or ctx.config.top_k
        runtime.predictor = build_predictor(cfg.predictor, model, runtime.next_of, k, cfg.pregate_path, self.trace)
        if runtime.cpu is not None and ctx.device.type == "cuda":
            from .cpu import measure_costs

            runtime.costs = measure_costs(runtime, ctx.dtype)  # before the warm-up: it uses them
            runtime.cache.h2d_bytes_per_s = runtime.costs.h2d_bytes_per_s
        if ctx.device.type == "cuda":
            self._fit_measured(model, ctx)
        runtime.reset_stats()
        return runtime

    def _fit_measured(self, model, ctx: LoadContext) -> None:
        """Sizes the expert cache so that the measured device peak fills the budget (CUDA only).

        The plan can only estimate what libraries allocate (cuBLAS and cuBLASLt keep a 32 MiB
        workspace per stream and handle in PyTorch's allocator on Hopper, measured). So a prefill of
        one chunk (the most generate runs at once) and a decode step (captured as generate captures
        it) run now, with a KV cache of the planned size; the allocator's peak above what was
        allocated before the load must fit the budget, else the cache loses slots; when it leaves
        room for more experts, the cache gains them (once) and is measured again. The warm-up's
        cache contents and counters are discarded: generation starts from a fresh cache.
        """
        from ..kv_cache import KVCache
        from ..piecewise import PiecewiseDecode

        runtime, plan, cfg, device = self.runtime, self.plan, ctx.config, ctx.device
        batch = self.config.batch
        warm = max(1, min(plan.prefill_chunk, cfg.max_position_embeddings - 1))
        context = max(plan.kv_positions // batch, warm + 1)
        slots, grown = runtime.cache.num_slots, False
        for _ in range(5):
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            cache = KVCache(cfg, batch, context, device, ctx.dtype)
            ids = torch.zeros(batch, warm, dtype=torch.long, device=device)
            with torch.inference_mode():
                model(ids, cache=cache, start=0, last_only=True)
                # decode as generate runs it: captured whole (misses mapped) or in pieces between
                # the expert calls (the graphs' pool and the capture stream's workspaces count too)
                step = runtime.capture_decode(model, cache, ids[:, :1], warm) or PiecewiseDecode(
                    model, cache, ids[:, :1], warm)
                step(ids[:, :1], warm)
                if runtime.mapped is not None:
                    runtime.mapped.drain()
            runtime.cache.synchronize()
            torch.cuda.synchronize(device)
            del cache, ids, step
            need = torch.cuda.max_memory_allocated(device) - self.baseline_bytes
            room = (plan.budget_bytes - need) // plan.expert_bytes
            if need <= plan.budget_bytes and (grown or room < 1 or slots >= plan.total_experts):
                break
            if need <= plan.budget_bytes:  # the plan over-estimated: give the rest to the cache (once)
                grown = True
                slots = min(plan.total_experts, slots + int(room))
            else:
                slots -= -(-(need - plan.budget_bytes) // plan.expert_bytes)  # ceil division
                grown = True  # after a shrink, never grow back (it would only overshoot again)
            if slots < plan.min_slots:
                raise MoekitError(
                    f"--device-memory {plan.budget_bytes / 1e6:.2f}MB is too small on this GPU: measured "
                    f"{need / 1e6:.2f}MB with {runtime.cache.num_slots} experts cached (libraries' workspaces "
                    f"included); give at least {(need + (plan.min_slots - runtime.cache.num_slots) * plan.expert_bytes) / 1e6 + 0.01:.2f}MB")
            runtime.new_cache(slots)
        else:
            raise MoekitError(f"could not fit the expert cache under --device-memory {plan.budget_bytes / 1e6:.2f}MB "
                              f"after 5 measurements (last: {need / 1e6:.2f}MB); give a larger budget")
        # a fresh cache and counters: the warm-up's experts, routing trace and call numbers go
        runtime.new_cache(runtime.cache.num_slots)
        self.plan = runtime.plan = dataclasses.replace(runtime.plan, cache_slots=runtime.cache.num_slots,
                                                       measured_peak_bytes=need)
        runtime.baseline_bytes = self.baseline_bytes
        runtime.calls.clear()
        runtime.predicted.clear()
        runtime.trace.clear()


def most_used(counts: dict[int, list[float]], how_many: int) -> list[tuple[int, int]]:
    """Returns the `how_many` (layer, expert) keys with the highest counts, most used first."""
    ranked = sorted(((c, int(layer), e) for layer, row in counts.items() for e, c in enumerate(row)), reverse=True)
    return [(layer, e) for _, layer, e in ranked[:how_many]]


def read_counts(path: str | Path) -> dict[int, list[float]]:
    """Returns {layer: per-expert counts} from an expert_counts.json (written by moekit pregate)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        return {int(k): [float(c) for c in v] for k, v in data["counts"].items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MoekitError(f"{path}: not an expert_counts.json with a 'counts' map ({e})") from None


def load_offloaded(path=None, device: str | torch.device = "cpu", dtype=None,
                   offload: OffloadConfig | None = None, **loader_kwargs):
    """Returns the model at `path` with offloaded experts (model.offload is the runtime)."""
    return load_model(path, device=device, dtype=dtype, experts=OffloadLoader(offload, **loader_kwargs))
