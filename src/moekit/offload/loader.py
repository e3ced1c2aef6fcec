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
import gc
import json
import os
from pathlib import Path

import torch

from ..errors import MoekitError
from ..experts.forms import DenseForm
from ..load import ExpertLoader, LoadContext, load_model
from .config import OffloadConfig
from .layout import SlotLayout, layout_for
from .planner import plan_budget
from .source import OffloadedExperts, OffloadRuntime, reads_in_place
from .store import DiskStore, HostStore

FIT_MARGIN_BYTES = 16 * 2**20  # at least this (or 1% of the budget) is left unused by the measured warm-up


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
            if not cfg.plain_experts:  # gpt-oss: biases and the clamped SwiGLU around the codes
                from ..experts.clamped import BiasedCompressedForm

                form = BiasedCompressedForm.of(form, cfg, ctx.dtype)
        elif not cfg.plain_experts:  # gpt-oss: biases and the clamped SwiGLU
            from ..experts.clamped import form_for

            form = form_for(ctx)  # dense, or the MXFP4 bytes gpt-oss ships
        else:
            form = DenseForm(cfg.hidden_size, cfg.expert_ffn, ctx.dtype)
        moe_layers = [i for i, moe in enumerate(cfg.moe_layers) if moe]
        layout: SlotLayout = layout_for(form, moe_layers)
        kind = self.config.store
        if kind == "auto":
            in_place = self.config.misses == "mapped" and reads_in_place(device)
            kind = "host" if device.type == "cuda" or self.host_layers is not None or in_place else "disk"
        self.plan = plan_budget(cfg, ctx.dtype, layout.expert_bytes(), self.config, device, disk_store=kind == "disk",
                                shared_bytes=layout.shared_bytes())
        if kind == "host":
            store = HostStore(layout, pin=device.type == "cuda")
        else:
            if self.host_layers is not None:
                raise MoekitError("experts given as host tensors need store='host' (or 'auto')")
            store = DiskStore(layout, ctx.ckpt, ctx.family, cfg)
        return OffloadRuntime(self.config, cfg, layout, store, device, ctx.dtype, self.plan)

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

            device_table = model.embed.weight
            model.embed = HostEmbedding.from_embedding(model.embed)
            if isinstance(model.embed, HostEmbedding):
                # free the device copy now: the H200 run found it alive through the warm-up (a
                # reference not visible to gc), 206 MB of an OLMoE-shaped model's budget held twice
                device_table.untyped_storage().resize_(0)
            else:  # the device cannot read it in place: it stays
                self.plan = runtime.plan = dataclasses.replace(
                    self.plan, resident_bytes=self.plan.resident_bytes + self.plan.host_embedding_bytes,
                    host_embedding_bytes=0)
        pinned = most_used(self.pin_counts, int(cfg.pin_experts * self.plan.total_experts)) if (
            cfg.pin_experts > 0 and self.pin_counts) else []
        runtime.attach(model, self.trace, pinned)
        if ctx.device.type == "cuda":
            self._fit_measured(model, ctx)
        runtime.reset_stats()
        return runtime

    def _stage_peak(self, device: torch.device) -> int:
        """Returns the allocator peak since the last reset, above the load's baseline, and starts a
        new stage (the warm-up's stages say where a budget goes: `plan.measured_stages`)."""
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - self.baseline_bytes
        torch.cuda.reset_peak_memory_stats(device)
        return peak

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
        from .planner import kv_cache_bytes

        runtime, plan, cfg, device = self.runtime, self.plan, ctx.config, ctx.device
        batch = self.config.batch
        warm = max(1, min(plan.prefill_chunk, cfg.max_position_embeddings - 1))
        context = max(plan.kv_positions // batch, warm + 1)
        warm_kv = 0 if plan.kv_positions else kv_cache_bytes(cfg, ctx.dtype, batch, context)
        slots, grown = runtime.cache.num_slots, False
        tries: list[dict] = []  # each measurement (plan.measured_stages["tries"])
        # a generation allocates a little the warm-up does not (the H200 run measured +7 MB, 0.5% of a
        # 1.38 GB budget, at the command line): the warm-up must fit under the budget less a margin
        margin = max(FIT_MARGIN_BYTES, plan.budget_bytes // 100)
        limit = plan.budget_bytes - margin
        for _ in range(5):
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            stages = {"held": torch.cuda.memory_allocated(device) - self.baseline_bytes}  # weights, cache, tables
            cache = KVCache(cfg, batch, context, device, ctx.dtype)
            ids = torch.zeros(batch, warm, dtype=torch.long, device=device)
            with torch.inference_mode():
                model(ids, cache=cache, start=0, last_only=True)
                stages["prefill_peak"] = self._stage_peak(device)
                # decode as generate runs it: captured whole (misses mapped) or in pieces between
                # the expert calls (the graphs' pool and the capture stream's workspaces count too)
                step = runtime.capture_decode(model, cache, ids[:, :1], warm) or PiecewiseDecode(
                    model, cache, ids[:, :1], warm)
                stages["capture_peak"] = self._stage_peak(device)
                stages["after_capture"] = torch.cuda.memory_allocated(device) - self.baseline_bytes
                step(ids[:, :1], warm)
                if runtime.mapped is not None:
                    runtime.mapped.drain()
            runtime.cache.synchronize()
            torch.cuda.synchronize(device)
            stages["step_peak"] = self._stage_peak(device)
            stages["kv_cache"] = cache.bytes
            del cache, ids, step
            gc.collect()  # anything the step left in a reference cycle goes now, not during generation
            # a KV cache the plan does not hold yet is reserved by each generation (runtime.reserve)
            need = max(stages["prefill_peak"], stages["capture_peak"], stages["step_peak"]) - warm_kv
            tries.append({"slots": runtime.cache.num_slots, "need": need, "limit": limit, **stages})
            if os.environ.get("MOEKIT_DEBUG_FIT"):
                _debug_fit(tries[-1], device)
            room = (limit - need) // plan.expert_bytes
            if need <= limit and (grown or room < 1 or slots >= plan.total_experts):
                break
            if need <= limit:  # the plan over-estimated: give the rest to the cache (once)
                grown = True
                slots = min(plan.total_experts, slots + int(room))
            else:
                slots -= -(-(need - limit) // plan.expert_bytes)  # ceil division
                grown = True  # after a shrink, never grow back (it would only overshoot again)
            if slots < plan.min_slots:
                raise MoekitError(
                    f"--device-memory {plan.budget_bytes / 1e6:.2f}MB is too small on this GPU: measured "
                    f"{need / 1e6:.2f}MB with {runtime.cache.num_slots} experts cached (libraries' workspaces "
                    f"included; held {stages['held'] / 1e6:.0f}MB, peaks: prefill {stages['prefill_peak'] / 1e6:.0f}MB, "
                    f"graph capture {stages['capture_peak'] / 1e6:.0f}MB, decode step {stages['step_peak'] / 1e6:.0f}MB); "
                    f"give at least {(need + margin + (plan.min_slots - runtime.cache.num_slots) * plan.expert_bytes) / 1e6 + 0.01:.2f}MB"
                    + (" (or --quantize-dense int8: int8 attention projections and LM head hold less)"
                       if self.config.dense == "bf16" else ""))
            runtime.new_cache(slots)
        else:
            raise MoekitError(f"could not fit the expert cache under --device-memory {plan.budget_bytes / 1e6:.2f}MB "
                              f"after 5 measurements (slots: needed MB " + ", ".join(
                                  f"{t['slots']}: {t['need'] / 1e6:.1f} (held {t['held'] / 1e6:.1f})" for t in tries)
                              + "); give a larger budget")
        # a fresh cache and counters: the warm-up's experts, routing trace and call numbers go
        runtime.new_cache(runtime.cache.num_slots)
        self.plan = runtime.plan = dataclasses.replace(runtime.plan, cache_slots=runtime.cache.num_slots,
                                                       measured_peak_bytes=need, measured_stages={**stages, "tries": tries})
        runtime.baseline_bytes = self.baseline_bytes
        runtime.forget_calls()


def _debug_fit(row: dict, device: torch.device) -> None:
    """Prints one warm-up measurement and the largest live device tensors (MOEKIT_DEBUG_FIT=1)."""
    import gc
    import sys

    groups: dict[tuple, list[int]] = {}
    owners: list[str] = []
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.is_cuda and obj.untyped_storage().nbytes() > 2**20:
                key = (tuple(obj.shape), str(obj.dtype))
                g = groups.setdefault(key, [0, 0])
                g[0] += 1
                g[1] += obj.untyped_storage().nbytes()
                if obj.untyped_storage().nbytes() > 100 * 2**20:  # who holds the big ones
                    refs = [sorted(r)[:6] if isinstance(r, dict) else type(r).__name__ for r in gc.get_referrers(obj)]
                    owners.append(f"{list(obj.shape)}: {refs[:4]}")
        except (RuntimeError, ReferenceError):
            continue
    top = sorted(groups.items(), key=lambda kv: -kv[1][1])[:15]
    print("fit: " + ", ".join(f"{k}={v / 1e6:.1f}MB" if isinstance(v, int) and k != "slots" else f"{k}={v}"
                              for k, v in row.items()), file=sys.stderr)
    print(f"fit: allocated {torch.cuda.memory_allocated(device) / 1e6:.1f}MB reserved "
          f"{torch.cuda.memory_reserved(device) / 1e6:.1f}MB; live tensors > 1 MiB: "
          + "; ".join(f"{n}x{list(shape)} {dt} {b / 1e6:.1f}MB" for (shape, dt), (n, b) in top), file=sys.stderr)
    print("fit: holders of tensors > 100 MiB: " + " | ".join(owners), file=sys.stderr)


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
    """Returns the model at `path` with offloaded experts (model.offload is the runtime); its dense
    projections in offload.dense's form."""
    loader = OffloadLoader(offload, **loader_kwargs)
    return load_model(path, device=device, dtype=dtype, experts=loader, dense=loader.config.dense)
