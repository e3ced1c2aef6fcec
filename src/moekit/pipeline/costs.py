"""What a model costs per decode layer as stored, for the HRM (moekit.pipeline.hrm): bytes and
FLOPs of an average layer (ModelCosts, from a config or a paged layout's stored form), and the GPU
terms of a compressed form's expert kernels -- the per-expert floor and per-token rate of the
decode-in-matmul kernels, and past the per-slot kernels the paged runtime's whole-layer decode
into a dense workspace. The HRM's policy search (hrm.py) combines them with a machine's measured
levels (machine.py).

Shapes: L layers, D hidden, E experts per MoE layer, A = top-k, I expert ffn.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..config import ModelConfig
from ..errors import MoekitError
from .machine import Machine

# The GPU cost of a compressed form's expert kernels (grouped path: one gate_up and one down call
# per routed expert of a micro-batch): (weights decoded per second, the floor of an expert call;
# FLOP/s per extra token). Fitted on Mixtral's matrices (14336 x 4096 and 4096 x 14336) at 8 and 64
# tokens, H200, benchmarks/results/tune_quant_kernels.json: an expert (gate, up, down) took 195 /
# 386 us in the ternary code and 552 / 1155 us in int4 (group 128), against ~125 us in bf16 at
# either count. int2/int3 take int4's figures. Dense experts: no floor, the machine's GEMM rate.
FORM_KERNELS = {"ternary_code": (1.2e12, 104e12), "int": (3.8e11, 33e12)}
# Past the per-slot kernels (more than experts.forms.SLOT_KERNEL_MAX_SLOTS routed slots: every
# prefill micro-batch, decode micro-batches of more than 8 tokens at top-2) the paged runtime decodes
# a layer's experts whole, once a layer, into a dense bf16 workspace (quant.kernels code_decode /
# int_decode, no host sync) and runs every micro-batch through the grouped dense kernels; elsewhere,
# above quant.ops.KERNEL_MAX_TOKENS tokens of an expert a form decodes each matrix whole. Either way
# 2 bytes per weight of workspace (a whole layer's experts for the paged runtime);
# traffic ~6 bytes per weight (the code form zeroes the matrix, writes its nonzeros, the GEMM reads
# it; int4 writes once and reads once, ~4). Estimates from the kernels' design, not yet measured on
# a GPU (benchmarks/probes/bench_decode_path.py measures them). The PyTorch references these
# replace took ~17 bytes per weight of workspace and ~40 of traffic.
DECODE_WORKSPACE_BYTES_PER_WEIGHT = 2
DECODE_TRAFFIC_BYTES_PER_WEIGHT = 6


@dataclass(frozen=True)
class ModelCosts:
    """Per-layer bytes and FLOPs of a model as stored (an average layer; sizes in bytes)."""

    num_layers: int
    hidden: int
    experts: float  # routed experts of an average MoE layer
    top_k: int
    moe_fraction: float  # share of layers with routed experts
    expert_bytes: float  # one routed expert as stored (its form's bytes)
    expert_flops: float  # FLOPs of one routed expert on one token
    other_bytes: float  # non-expert weights of one layer (attention, router, dense/shared MLP)
    other_flops: float  # FLOPs of those on one token
    resident_bytes: float  # every non-expert weight (embeddings and head too): held on the GPU
    kv_bytes_per_token: float  # one layer's cached K and V of one position
    attention_flops_per_position: float  # one query token against one cached position, all heads
    qkv_values: int  # q, k, v values one token sends to the CPU
    out_values: int  # attention output values one token gets back
    act_bytes: int  # bytes of an activation value
    prefill_act_bytes_per_token: float  # live activations of one prefill token (one layer)
    sliding_window: int | None = None
    form: str = "dense"  # the experts' stored form (experts.forms / quant.formats names: dense, int4, ternary_code)
    slot_bytes: float | None = None  # one device slot (packed forms: the widest layer's expert); None: expert_bytes
    table_bytes: float = 0.0  # the form's per-layer tables, every layer (a code's dictionaries): on the device
    kernel_floor_s: float = 0.0  # GPU seconds of one routed expert's call before its tokens (decoding its weights)
    kernel_flops: float | None = None  # FLOP/s of the form's expert kernels per token (None: the GPU's GEMM peak)
    workspace_bytes: float = 0.0  # device workspace of the form's decode (one matrix decoded at a time)
    kernel_max_tokens: int | None = None  # above this many tokens of an expert: decoded whole, then a GEMM
    decode_bytes: float = 0.0  # HBM traffic of decoding one expert whole (the reference path)

    @property
    def bits_per_weight(self) -> float:
        """Returns the stored bits of one expert weight (its bytes over its expert_flops / 2 weights)."""
        return 16 * self.expert_bytes / self.expert_flops if self.expert_flops else 0.0

    @property
    def device_slot_bytes(self) -> float:
        """Returns the device bytes one expert's slot takes."""
        return self.expert_bytes if self.slot_bytes is None else self.slot_bytes

    @property
    def layer_expert_bytes(self) -> float:
        """Returns the routed expert bytes of an average layer."""
        return self.experts * self.expert_bytes * self.moe_fraction

    @property
    def moe_layers(self) -> int:
        """Returns the layers with routed experts (L_moe)."""
        return round(self.num_layers * self.moe_fraction)

    @property
    def total_expert_bytes(self) -> float:
        return self.layer_expert_bytes * self.num_layers

    def touched(self, tokens: float) -> float:
        """Returns the experts of a layer that `tokens` tokens route to, expected under uniform routing."""
        if self.experts <= 0:
            return 0.0
        return self.experts * (1 - (1 - self.top_k / self.experts) ** tokens) if tokens > 0 else 0.0

    def attended(self, context: float) -> float:
        """Returns the positions a query attends to at `context` (the sliding window caps it)."""
        return min(context, self.sliding_window) if self.sliding_window else context

    def to_dict(self) -> dict:
        return asdict(self)


def form_kernel(form: str, weights: float) -> tuple[float, float | None]:
    """Returns (floor seconds of one routed expert of `weights` weights, FLOP/s per token) of a
    stored form's GPU kernels (FORM_KERNELS; dense: (0, None), the GEMM peak)."""
    rates = FORM_KERNELS.get("int" if form.startswith("int") else form)
    if rates is None:
        return 0.0, None
    return weights / rates[0], rates[1]


def model_costs(cfg: ModelConfig, expert_bytes: float, act_dtype_bytes: int = 2,
                kv_dtype_bytes: int | None = None, form: str = "dense", slot_bytes: float | None = None,
                table_bytes: float = 0.0) -> ModelCosts:
    """Returns the ModelCosts of `cfg` with routed experts of `expert_bytes` each (the stored form's
    bytes), activations, non-expert weights and KV in `act_dtype_bytes`-byte values; `form` (a
    stored form's name), `slot_bytes` and `table_bytes` as in ModelCosts (`form_costs` takes them
    from a layout)."""
    import torch

    from ..offload.planner import activation_bytes, resident_bytes

    dtype = {2: torch.bfloat16, 4: torch.float32}.get(act_dtype_bytes)
    if dtype is None:
        raise MoekitError(f"activations of {act_dtype_bytes} bytes: use 2 (bf16) or 4 (fp32)")
    kv_dtype_bytes = kv_dtype_bytes or act_dtype_bytes
    layers = cfg.num_layers
    moe = [i for i in range(layers) if cfg.moe_layers[i]]
    experts = sum(cfg.experts_in(i) for i in moe) / max(1, len(moe))
    d = cfg.hidden_size
    resident = resident_bytes(cfg, dtype)
    head_bytes = cfg.vocab_size * d * act_dtype_bytes * (1 if cfg.tie_word_embeddings else 2)
    other_bytes = max(0.0, (resident - head_bytes) / layers)
    (hk, dk), (hv, dv) = cfg.kv_cache_dims()
    return ModelCosts(
        num_layers=layers, hidden=d, experts=experts, top_k=cfg.top_k, moe_fraction=len(moe) / layers,
        expert_bytes=float(expert_bytes), expert_flops=2.0 * cfg.params_per_expert,
        other_bytes=other_bytes, other_flops=2.0 * other_bytes / act_dtype_bytes,
        resident_bytes=float(resident), kv_bytes_per_token=float(cfg.kv_values_per_position * kv_dtype_bytes),
        attention_flops_per_position=2.0 * cfg.num_heads * (dk + dv),
        qkv_values=cfg.num_heads * dk + hk * dk + hv * dv, out_values=cfg.num_heads * dv,
        act_bytes=act_dtype_bytes,
        prefill_act_bytes_per_token=activation_bytes(cfg, dtype, 1, 1, scores=False) - cfg.vocab_size * 12,
        sliding_window=cfg.sliding_window, form=form, slot_bytes=slot_bytes, table_bytes=float(table_bytes),
        **_form_terms(cfg, form),
    )


# compressed forms around a plain SwiGLU: the paged runtime decodes their layers whole past the
# per-slot kernels (pipeline.paged.plain_compressed); gpt-oss's clamped forms never are, their
# experts run through their own calls
WHOLE_LAYER_FORMS = ("int2", "int3", "int4", "ternary_code")


def _form_terms(cfg: ModelConfig, form: str) -> dict:
    if form in ("dense", "clamped_swiglu"):  # plain tensors: the GEMM peak, no decode
        return {}
    from ..quant.ops import KERNEL_MAX_TOKENS

    floor, flops = form_kernel(form, cfg.params_per_expert)
    if form not in WHOLE_LAYER_FORMS:  # no workspace, no whole-layer decode
        return {"kernel_floor_s": floor, "kernel_flops": flops}
    experts = max((cfg.experts_in(i) for i in range(cfg.num_layers) if cfg.moe_layers[i]), default=0)
    # the paged runtime decodes a whole layer (every expert) into the workspace past the per-slot kernels
    return {"kernel_floor_s": floor, "kernel_flops": flops,
            "workspace_bytes": float(experts * cfg.params_per_expert * DECODE_WORKSPACE_BYTES_PER_WEIGHT),
            "kernel_max_tokens": KERNEL_MAX_TOKENS,
            "decode_bytes": float(cfg.params_per_expert * DECODE_TRAFFIC_BYTES_PER_WEIGHT)}


def decodes_layers(m: ModelCosts, tokens: float) -> bool:
    """Returns whether the paged runtime decodes a compressed layer whole for calls of `tokens`
    tokens (more routed slots than the per-slot kernels take; pipeline.paged `_decodes_whole`)."""
    from ..experts.forms import SLOT_KERNEL_MAX_SLOTS

    return m.kernel_max_tokens is not None and tokens * m.top_k > SLOT_KERNEL_MAX_SLOTS


def routed_tokens(tokens: int, share: float, limit: int) -> tuple[float, float, float, float]:
    """Returns, for one expert's tokens X of a call of `tokens` tokens each routed to it with
    probability `share` (uniform routing: X ~ Binomial(tokens, share)): (P(0 < X <= limit),
    E[X; X <= limit], P(X > limit), E[X; X > limit])."""
    if share >= 1:
        return (1.0, float(tokens), 0.0, 0.0) if 0 < tokens <= limit else (0.0, 0.0, float(tokens > limit), float(tokens))
    if share <= 0 or tokens <= 0:
        return 0.0, 0.0, 0.0, 0.0
    log_p, log_q = math.log(share), math.log1p(-share)
    base = math.lgamma(tokens + 1)
    pmf = [math.exp(base - math.lgamma(j + 1) - math.lgamma(tokens - j + 1) + j * log_p + (tokens - j) * log_q)
           for j in range(min(limit, tokens) + 1)]
    below, mean_below = sum(pmf), sum(j * q for j, q in enumerate(pmf))
    return below - pmf[0], mean_below, max(0.0, 1 - below), max(0.0, tokens * share - mean_below)


def layer_decode_time(m: ModelCosts, machine: Machine, tokens: float, layers: float) -> float:
    """Returns the GPU seconds of decoding `layers` compressed MoE layers whole for calls of
    `tokens` tokens (decodes_layers; else 0): its own kernels, before the layer's GEMMs."""
    return layers * m.experts * m.decode_bytes / machine.gpu_bandwidth if decodes_layers(m, tokens) else 0.0


def expert_calls_time(m: ModelCosts, machine: Machine, tokens: int, calls: float,
                      grouped_flops: float | None = None) -> float:
    """Returns the GPU seconds of the routed experts of `calls` calls of a layer's experts (micro-
    batches) of `tokens` tokens each: the grouped dense kernels' FLOPs at `grouped_flops` (None:
    machine.gpu_flops, the dense GEMM's rate; the prefill passes prefill_expert_rate) -- a
    compressed form past the per-slot kernels too: the paged runtime decodes its layer whole
    first (layer_decode_time); else a compressed form's kernels (a floor per expert called, a
    slower rate per token) for an expert's tokens up to kernel_max_tokens, past it the expert
    decoded whole and a dense GEMM (F.linear: machine.gpu_flops), weighted by how often uniform
    routing gives an expert that many."""
    flops_per_token = m.top_k * m.expert_flops  # every token runs top_k experts
    grouped = grouped_flops or machine.gpu_flops
    if decodes_layers(m, tokens):
        return calls * tokens * flops_per_token / grouped
    if m.kernel_max_tokens is None:
        return calls * tokens * flops_per_token / (m.kernel_flops or grouped) + (
            calls * m.touched(tokens) * m.kernel_floor_s)
    called, mean_kernel, past, mean_past = routed_tokens(tokens, m.top_k / m.experts, m.kernel_max_tokens)
    per_expert = (called * m.kernel_floor_s + mean_kernel * m.expert_flops / (m.kernel_flops or grouped)
                  + past * m.decode_bytes / machine.gpu_bandwidth + mean_past * m.expert_flops / machine.gpu_flops)
    return calls * m.experts * per_expert


def prefill_expert_rate(machine: Machine) -> float:
    """Returns the FLOP/s the prefill's routed experts run at: the grouped dense kernels' measured
    prefill rate (Machine.prefill_expert_flops, at most the GEMM peak) where known, else the dense
    GEMM's (machine.gpu_flops), which on the H200 was 1.7-3.9x faster than those kernels."""
    if machine.prefill_expert_flops:
        return min(machine.prefill_expert_flops, machine.gpu_flops)
    return machine.gpu_flops


def form_costs(cfg: ModelConfig, layout, act_dtype_bytes: int = 2, kv_dtype_bytes: int | None = None) -> ModelCosts:
    """Returns the ModelCosts of `cfg` with experts in a layout's stored form (offload.layout, as
    the paged runtime holds them): an expert's bytes are what one moves over PCIe (its layer's,
    averaged over the MoE layers), a device slot the layout's slot, plus the form's tables."""
    layers = layout.moe_layers
    expert_bytes = sum(layout.layer_bytes(m) for m in layers) / max(1, len(layers))
    return model_costs(cfg, expert_bytes, act_dtype_bytes, kv_dtype_bytes, form=layout.form.name,
                       slot_bytes=float(layout.expert_bytes()), table_bytes=float(layout.shared_bytes()))
