"""The budget planner: splits `--device-memory` into resident weights, KV cache, activations and
expert-cache slots, or refuses a budget that cannot hold a token's experts, naming the size needed.

Everything is counted in bytes on the budgeted tier (the GPU, or host memory on a CPU-only run):
    budget = resident non-expert weights (int8 projections: OffloadConfig.dense) + KV cache + activations + reserve
             + per-layer tables of a compressed form (code dictionaries) + S * expert_bytes

The plan holds what will actually be held. Prefill runs in chunks of `prefill_chunk` tokens
(moekit.generate), so activations are bounded by one chunk, not the prompt; only the sampled
position's logits are computed. The KV cache is planned for `context_tokens` when the caller
gives it (the CLI gives prompt + new tokens), else for none: a generation reserves its own KV
cache when it starts (OffloadRuntime.reserve takes the bytes from the expert cache, or refuses
with the size it needs). The input embedding table of an untied model may stay in host memory
(a lookup reads one row per token; offload.embedding): then it is not counted.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from ..config import ModelConfig
from ..errors import MoekitError
from ..linear import DEQUANT_WORKSPACE_BYTES
from .config import OffloadConfig

CUDA_RESERVE_BYTES = 64 * 2**20  # cuBLAS workspaces, kernel scratch, allocator block rounding
MIN_PREFILL_CHUNK = 32  # tight budgets halve the prefill chunk down to this many tokens


@dataclass(frozen=True)
class BudgetPlan:
    """How a device budget is spent (bytes), and how many experts the cache holds."""

    budget_bytes: int
    resident_bytes: int  # embeddings, attention, norms, routers, dense and shared MLPs
    kv_cache_bytes: int  # batch x context positions of every layer's keys and values
    activation_bytes: int  # one prefill chunk's live tensors, plus the sampled position's logits
    reserve_bytes: int  # workspaces and staging
    expert_bytes: int  # one expert as stored
    cache_slots: int  # experts the device cache holds
    min_slots: int  # a token's experts (top-k): the fewest the runtime accepts
    total_experts: int
    measured_peak_bytes: int | None = None  # CUDA: allocator peak of the warm-up (a prefill chunk + a decode step)
    measured_stages: dict | None = None  # CUDA: the warm-up's bytes by stage (held, prefill / capture / step peaks)
    shared_bytes: int = 0  # per-layer tensors of the expert form resident on the device (code tables)
    kv_positions: int = 0  # batch x positions the KV cache is planned for (0: reserved at generate time)
    prefill_chunk: int = 0  # tokens of one prefill forward (activations bounded by it)
    host_embedding_bytes: int = 0  # the input embedding table, kept in host memory (not in the budget)

    @property
    def cache_bytes(self) -> int:
        return self.cache_slots * self.expert_bytes

    @property
    def planned_bytes(self) -> int:
        return (self.resident_bytes + self.kv_cache_bytes + self.activation_bytes + self.reserve_bytes
                + self.shared_bytes + self.cache_bytes)

    def to_dict(self) -> dict:
        return {**asdict(self), "cache_bytes": self.cache_bytes, "planned_bytes": self.planned_bytes}


def resident_bytes(cfg: ModelConfig, dtype: torch.dtype, host_embedding: bool = False, dense: str = "bf16") -> int:
    """Returns the bytes of every weight except the routed experts, in `dtype` (from the config);
    without the input embedding table when it stays in host memory; with `dense` "int8" the
    projections model.int8_dense_modules lists count their int8 codes and float32 row scales."""
    from ..model import MoEBlock, MoEModel, use_int8_dense

    with torch.device("meta"):
        model = MoEModel(cfg).to(dtype)
    for layer in model.layers:
        if isinstance(layer.mlp, MoEBlock):
            layer.mlp.experts = torch.nn.Identity()
    if dense == "int8":
        use_int8_dense(model)
    seen, total = set(), 0
    if host_embedding:
        seen.add(id(model.embed.weight))
    for p in model.parameters():  # tied weights counted once
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def embedding_bytes(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Returns the bytes of the input embedding table in `dtype`."""
    return cfg.vocab_size * cfg.hidden_size * torch.empty((), dtype=dtype).element_size()


def kv_cache_bytes(cfg: ModelConfig, dtype: torch.dtype, batch: int, positions: int) -> int:
    """Returns the bytes of a KVCache for `batch` sequences of `positions` positions."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return cfg.num_layers * batch * positions * cfg.kv_values_per_position * itemsize  # MLA: latent + rope key


def activation_bytes(cfg: ModelConfig, dtype: torch.dtype, tokens: int, batch: int, context: int | None = None,
                     scores: bool = True) -> int:
    """Returns a bound on live activations of one forward pass over `tokens` new tokens (all
    batches) attending to `context` positions each (default: the new tokens), logits for one
    position per sequence; `scores` counts the math attention path's [T, S] score matrices (the
    CPU's; GPU attention kernels keep them on chip)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    d, a, ffn = cfg.hidden_size, cfg.top_k, max(cfg.expert_ffn, cfg.shared_expert_ffn, cfg.dense_ffn)
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    per_token = (6 * d + 2 * qkv + a * (3 * ffn + 2 * d)) * itemsize + a * 8 * 4 + cfg.num_experts * 4 * 2
    per_seq = max(1, tokens // batch)
    attended = per_seq if context is None else max(context, per_seq)
    score_bytes = batch * cfg.num_heads * per_seq * attended * 4 * 2 if scores else 0  # scores + softmax
    logits = batch * cfg.vocab_size * 4 * 3  # float logits, softmax, sampling
    return tokens * per_token + score_bytes + logits


def prefill_activation_bytes(cfg: ModelConfig, dtype: torch.dtype, batch: int, chunk: int, context: int,
                             device: torch.device) -> int:
    """Returns the activations of one prefill chunk of `chunk` tokens per sequence attending to
    `context` positions (the math attention path's scores counted on the CPU only)."""
    return activation_bytes(cfg, dtype, batch * chunk, batch, context, scores=device.type != "cuda")


def plan_budget(cfg: ModelConfig, dtype: torch.dtype, expert_bytes: int, offload: OffloadConfig,
                device: torch.device, disk_store: bool = False, shared_bytes: int = 0) -> BudgetPlan:
    """Returns the BudgetPlan of `offload.device_memory` on `device`, or raises MoekitError (one
    line, with the size needed) when it cannot hold the non-expert weights and a token's experts.

    `expert_bytes` is one cache slot as stored (compressed forms: their compressed bytes);
    `shared_bytes` the form's per-layer tensors kept resident (a ternary code's tables)."""
    context = offload.context_tokens or 0  # 0: the KV cache is reserved when a generation starts
    batch = offload.batch
    host_embedding = offload.host_embedding and device.type == "cuda" and not cfg.tie_word_embeddings
    resident = resident_bytes(cfg, dtype, host_embedding, offload.dense)
    kv = kv_cache_bytes(cfg, dtype, batch, context)
    reserve = CUDA_RESERVE_BYTES if device.type == "cuda" else (expert_bytes if disk_store else 0)
    if offload.dense == "int8" and device.type == "cuda":  # a prefill's Int8Linear call dequantizes a slice at a time
        reserve += DEQUANT_WORKSPACE_BYTES
    chunk = min(offload.prefill_chunk, context or cfg.max_position_embeddings)
    act = prefill_activation_bytes(cfg, dtype, batch, chunk, context or chunk, device)
    room = (offload.device_memory or 0) - (resident + kv + reserve + shared_bytes)
    while offload.device_memory and chunk > MIN_PREFILL_CHUNK and room - act < cfg.top_k * expert_bytes:
        # a budget too tight for one chunk and a token's experts: shorter chunks rather than a refusal
        chunk //= 2
        act = prefill_activation_bytes(cfg, dtype, batch, chunk, context or chunk, device)
    total_experts = sum(cfg.experts_in(i) for i, moe in enumerate(cfg.moe_layers) if moe)
    min_slots = min(cfg.top_k, total_experts)
    fixed = resident + kv + act + reserve + shared_bytes
    budget = offload.device_memory
    if budget is None:  # no budget given: every expert, or what free memory allows
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget = int(0.9 * free) + torch.cuda.memory_allocated(device)
        else:
            budget = fixed + total_experts * expert_bytes
    slots = min(total_experts, max(0, (budget - fixed) // expert_bytes))
    if slots < min_slots:
        needed = fixed + min_slots * expert_bytes
        hint = ""
        if offload.dense == "bf16" and device.type == "cuda":  # what int8 projections would need instead
            saved = resident - resident_bytes(cfg, dtype, host_embedding, "int8") - DEQUANT_WORKSPACE_BYTES
            if saved > 0:
                hint = (f", or --quantize-dense int8 (int8 attention projections and LM head: "
                        f"{decimal_size(needed - saved, up=True)})")
        raise MoekitError(
            f"--device-memory {decimal_size(budget)} is too small: this model needs at least {decimal_size(needed)} "
            f"({decimal_size(resident)} non-expert weights + {decimal_size(kv)} KV cache for {batch}x{context} "
            f"positions + {decimal_size(act + reserve)} activations and workspace"
            + (f" + {decimal_size(shared_bytes)} code tables" if shared_bytes else "") + f" + {min_slots} experts of "
            f"{decimal_size(expert_bytes)}); give --device-memory {decimal_size(needed, up=True)} or more" + hint)
    return BudgetPlan(budget, resident, kv, act, reserve, expert_bytes, int(slots), min_slots, total_experts,
                      shared_bytes=shared_bytes, kv_positions=batch * context, prefill_chunk=chunk,
                      host_embedding_bytes=embedding_bytes(cfg, dtype) if host_embedding else 0)


def decimal_size(n: float, up: bool = False) -> str:
    """Returns bytes in decimal units as --device-memory reads them ('7.35MB'), rounded up if asked."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            value = n / size
            value = math.ceil(value * 100) / 100 if up else value
            return f"{value:.2f}{unit}"
    return f"{int(n)}B"
