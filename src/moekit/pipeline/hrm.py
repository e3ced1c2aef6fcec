"""The hierarchical roofline model (HRM) of MoE-Lightning and its policy search: what a
pipelined batch decode (CGOPipe) of a model costs per layer on a machine, and the policy --
batch N, micro-batch mu, resident share of experts r_w, where attention runs -- that gives the
most generated tokens per second within the device and host memory budgets.

Per decode layer (an average layer), for N sequences in N / mu micro-batches (paper eq. 12-14):

    T_layer = max(comm, T_cpu, T_gpu)           (CPU attention in one micro-batch: max(comm, T_cpu + T_gpu))
    comm    = max(H2D bytes / h2d, D2H bytes / d2h)
              H2D: the layer's non-resident expert bytes (1 - r_w) + attention outputs (CPU attention)
              D2H: q, k, v of the new tokens (CPU attention)
    T_cpu   = max(attention FLOPs / host FLOP/s, KV bytes / kernel rate,
                  (KV bytes + streamed expert bytes) / host bandwidth)      (CPU attention)
    T_gpu   = FFN: max(expert calls' time, N/mu * experts touched by a micro-batch * stored bytes / HBM)
                   calls' time: dense, N FLOPs / GEMM FLOP/s; compressed (expert_call_time), per call
                   a floor + its tokens at the kernels' rate, or past their token limit a whole
                   decode + a dense GEMM
              + attention and projections likewise (the weights re-read per micro-batch)

Stored forms (ModelCosts.form): every byte term counts the experts as stored -- dense bf16, int-N
codes with their scales, the sub-1-bit ternary code -- so a compressed form streams fewer bytes
per layer over PCIe, holds a smaller store in host memory and smaller slots on the device, and the
search finds a larger N. Their GPU cost is not their bytes: the decode-in-matmul kernels spend a
floor per routed expert (decoding its weights) and a slower rate per token than a dense GEMM
(FORM_KERNELS, measured on the H200), and above quant.ops.KERNEL_MAX_TOKENS tokens of an expert
the form decodes one matrix at a time into a workspace the device memory counts.

The last T_cpu term is the host-DRAM contention the paper leaves out (MoE-Lightning brief §5.2-4):
pinned DMA of the weights reads host memory too, so a layer is no shorter than its streamed bytes
plus its KV bytes over the rate the host serves the DMA and the CPU together (Machine.host_shared_bandwidth,
measured with both running; else the CPU's own read rate). The FFN's HBM term reads the experts
at the grouped kernels' measured rate where known (Machine.expert_bandwidth), not the copy rate.
And the one launch thread issues every (layer, micro-batch) task: a layer is no shorter than
N / mu times its host seconds per task (Machine.launch_task_s, where measured). A step is L layers; a generation is a prefill
(all on the GPU, the weights streamed once per layer) and gen_len - 1 decode steps; throughput is
N * gen_len / (prefill + decode), the paper's metric.

Memory, per policy (bytes): device = non-expert weights + r_w of the experts + a double buffer of
one layer's streamed experts + the hidden states of N tokens + one micro-batch's prefill
activations + (GPU attention: the KV cache of N sequences; CPU attention: two micro-batches' KV
staging, and the q, k, v packets of N tokens: CGOPipe launches CPU attention a layer ahead, so
every micro-batch's packet may wait on the device for its D2H copy). The double buffer is what
lets layer i + 1's pages stream while layer i computes. Host = every expert (the store) + (CPU attention: the KV cache) + the prefill hidden
states of N prompts. r_w is whole experts per layer (j / E), as a runtime can hold them. Device
slots are the form's slot bytes (packed slots fit the widest layer), plus the form's tables (a
code's dictionaries) and its decode workspace.

Shapes: L layers, D hidden, E experts per MoE layer, A = top-k, I expert ffn, H query heads,
s prompt length, n generated tokens, c = s + n / 2 the mean context of a decode step.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..config import ModelConfig
from ..errors import MoekitError
from .machine import Machine

ATTENTION_PLACES = ("cpu", "gpu")
CUDA_RESERVE_BYTES = 64 * 2**20  # workspaces and allocator rounding (offload.planner's reserve)

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
class Workload:
    """What is generated: prompts of `prompt_len` tokens (the mean), `gen_len` new tokens each."""

    prompt_len: int
    gen_len: int
    num_prompts: int | None = None  # N is at most this (None: as many as memory allows)

    def __post_init__(self) -> None:
        if self.prompt_len < 1:
            raise MoekitError(f"--prompt-len must be >= 1, got {self.prompt_len}")
        if self.gen_len < 1:
            raise MoekitError(f"--gen-len must be >= 1, got {self.gen_len}")
        if self.num_prompts is not None and self.num_prompts < 1:
            raise MoekitError(f"--num-prompts must be >= 1, got {self.num_prompts}")

    @property
    def mean_context(self) -> float:
        """Positions a decode step attends to, averaged over the generation: s + n / 2."""
        return self.prompt_len + self.gen_len / 2


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


def _form_terms(cfg: ModelConfig, form: str) -> dict:
    if form == "dense":
        return {}
    from ..quant.ops import KERNEL_MAX_TOKENS

    floor, flops = form_kernel(form, cfg.params_per_expert)
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


def expert_calls_time(m: ModelCosts, machine: Machine, tokens: int, calls: float) -> float:
    """Returns the GPU seconds of the routed experts of `calls` calls of a layer's experts (micro-
    batches) of `tokens` tokens each: a dense GEMM's FLOPs (a compressed form past the per-slot
    kernels too: the paged runtime decodes its layer whole first, layer_decode_time); else a
    compressed form's kernels (a floor per expert called, a slower rate per token) for an
    expert's tokens up to kernel_max_tokens, past it the expert decoded whole and a dense GEMM,
    weighted by how often uniform routing gives an expert that many."""
    flops_per_token = m.top_k * m.expert_flops  # every token runs top_k experts
    if decodes_layers(m, tokens):
        return calls * tokens * flops_per_token / machine.gpu_flops
    if m.kernel_max_tokens is None:
        return calls * tokens * flops_per_token / (m.kernel_flops or machine.gpu_flops) + (
            calls * m.touched(tokens) * m.kernel_floor_s)
    called, mean_kernel, past, mean_past = routed_tokens(tokens, m.top_k / m.experts, m.kernel_max_tokens)
    per_expert = (called * m.kernel_floor_s + mean_kernel * m.expert_flops / (m.kernel_flops or machine.gpu_flops)
                  + past * m.decode_bytes / machine.gpu_bandwidth + mean_past * m.expert_flops / machine.gpu_flops)
    return calls * m.experts * per_expert


def form_costs(cfg: ModelConfig, layout, act_dtype_bytes: int = 2, kv_dtype_bytes: int | None = None) -> ModelCosts:
    """Returns the ModelCosts of `cfg` with experts in a layout's stored form (offload.layout, as
    the paged runtime holds them): an expert's bytes are what one moves over PCIe (its layer's,
    averaged over the MoE layers), a device slot the layout's slot, plus the form's tables."""
    layers = layout.moe_layers
    expert_bytes = sum(layout.layer_bytes(m) for m in layers) / max(1, len(layers))
    return model_costs(cfg, expert_bytes, act_dtype_bytes, kv_dtype_bytes, form=layout.form.name,
                       slot_bytes=float(layout.expert_bytes()), table_bytes=float(layout.shared_bytes()))


@dataclass(frozen=True)
class Policy:
    """One way to run the batch: N sequences in micro-batches of mu, r_w of the experts resident."""

    batch: int  # N: sequences decoded together
    micro_batch: int  # mu: sequences per micro-batch (N / mu of them per layer)
    resident_share: float  # r_w: share of every layer's experts held on the GPU (whole experts)
    attention: str = "cpu"  # where decode attention runs: "cpu" (KV in host memory) | "gpu" (KV on the GPU)

    def __post_init__(self) -> None:
        if self.batch < 1 or not 1 <= self.micro_batch <= self.batch:
            raise MoekitError(f"a policy needs 1 <= micro_batch ({self.micro_batch}) <= batch ({self.batch})")
        if not 0 <= self.resident_share <= 1:
            raise MoekitError(f"resident_share must be in [0, 1], got {self.resident_share}")
        if self.attention not in ATTENTION_PLACES:
            raise MoekitError(f"attention must be one of {', '.join(ATTENTION_PLACES)}, got {self.attention!r}")

    @property
    def micro_batches(self) -> float:
        return self.batch / self.micro_batch


@dataclass(frozen=True)
class LayerTime:
    """Seconds of one decode layer by resource; `time` is their roofline max (eq. 12)."""

    h2d: float
    d2h: float
    host_compute: float
    cpu_attention_kernel: float
    host_bandwidth: float
    gpu_compute: float
    hbm: float
    gpu: float  # T_gpu: its FFN and attention/projection terms, each max(compute, bytes)
    serial: bool = False  # CPU attention over one micro-batch: nothing to overlap it with, CPU and GPU take turns
    launch: float = 0.0  # the launch thread issuing the layer's (layer, micro-batch) tasks (Machine.launch_task_s)

    @property
    def comm(self) -> float:
        return max(self.h2d, self.d2h)

    @property
    def cpu(self) -> float:
        return max(self.host_compute, self.cpu_attention_kernel, self.host_bandwidth)

    @property
    def time(self) -> float:
        return max(self.comm, self.launch, self.cpu + self.gpu if self.serial else max(self.cpu, self.gpu))

    @property
    def bound(self) -> str:
        """Returns the resource whose time is the layer's time."""
        if self.launch > max(self.comm, self.cpu + self.gpu if self.serial else max(self.cpu, self.gpu)):
            return "launch thread"
        if self.serial and self.cpu + self.gpu >= self.comm:
            return "CPU and GPU in turn (one micro-batch)"
        terms = {"PCIe host-to-device": self.h2d, "PCIe device-to-host": self.d2h,
                 "host compute": self.host_compute, "CPU attention kernel": self.cpu_attention_kernel,
                 "host memory bandwidth": self.host_bandwidth}
        if self.gpu >= max(terms.values()):
            return "GPU compute" if self.gpu_compute >= self.hbm else "GPU memory bandwidth"
        return max(terms, key=terms.get)


def _roof(flops: float, nbytes: float, peak_flops: float, bandwidth: float) -> tuple[float, float]:
    return flops / peak_flops, nbytes / bandwidth


def decode_layer_time(m: ModelCosts, machine: Machine, policy: Policy, context: float) -> LayerTime:
    """Returns the seconds of one decode layer under `policy` with every sequence at `context` positions."""
    n, n_ub = policy.batch, policy.micro_batches
    streamed = m.layer_expert_bytes * (1 - policy.resident_share)
    positions = m.attended(context)
    kv_read = n * positions * m.kv_bytes_per_token
    attn_flops = n * positions * m.attention_flops_per_position
    ffn_c = expert_calls_time(m, machine, policy.micro_batch, n_ub * m.moe_fraction)
    ffn_b = n_ub * m.touched(policy.micro_batch) * read_bytes(m, policy.micro_batch) * m.moe_fraction / (
        expert_read_rate(m, machine, policy.micro_batch))
    decode = layer_decode_time(m, machine, policy.micro_batch, m.moe_fraction)  # once a layer, bytes-bound
    other_c, other_b = _roof(n * m.other_flops, n_ub * m.other_bytes, machine.gpu_flops, machine.gpu_bandwidth)
    gpu_c, gpu_b = ffn_c + other_c, ffn_b + decode + other_b
    gpu = decode + max(ffn_c, ffn_b) + max(other_c, other_b)
    h2d_bytes, d2h_bytes = streamed, 0.0
    host_c = kernel = host_bw = 0.0
    if policy.attention == "cpu":
        h2d_bytes += n * m.out_values * m.act_bytes
        d2h_bytes += n * m.qkv_values * m.act_bytes
        host_c = attn_flops / machine.host_flops
        kernel = kv_read / machine.cpu_attention_bandwidth if machine.cpu_attention_bandwidth else 0.0
        # the weight pages' DMA and the attention kernel read host memory at once: together no
        # faster than the machine's shared rate (measured with both running, where known)
        host_bw = (kv_read + streamed) / (machine.host_shared_bandwidth or machine.host_bandwidth)
    else:
        a_c, a_b = _roof(attn_flops, kv_read, machine.gpu_flops, machine.gpu_bandwidth)
        gpu += max(a_c, a_b)
        gpu_c, gpu_b = gpu_c + a_c, gpu_b + a_b
        host_bw = streamed / machine.host_bandwidth  # the DMA still reads the host store
    # CGOPipe hides one micro-batch's CPU attention behind another's GPU work: with one there is
    # none, and the layer takes both in turn (the roofline max would credit an overlap it lacks)
    return LayerTime(h2d=h2d_bytes / machine.h2d_bandwidth, d2h=d2h_bytes / machine.d2h_bandwidth,
                     host_compute=host_c, cpu_attention_kernel=kernel, host_bandwidth=host_bw,
                     gpu_compute=gpu_c, hbm=gpu_b, gpu=gpu, serial=policy.attention == "cpu" and n_ub < 2,
                     launch=n_ub * (machine.launch_task_s or 0.0) if policy.attention == "cpu" else 0.0)


def read_bytes(m: ModelCosts, tokens: float) -> float:
    """Returns the bytes a call of `tokens` tokens reads per expert it touches: as stored, or a
    layer decoded whole (decodes_layers) in the dense workspace (its decode counted in
    expert_calls_time)."""
    return m.expert_flops / 2 * DECODE_WORKSPACE_BYTES_PER_WEIGHT if decodes_layers(m, tokens) else m.expert_bytes


def expert_read_rate(m: ModelCosts, machine: Machine, tokens: float = 0) -> float:
    """Returns the bytes/s a decode micro-batch's expert calls read weights at: the grouped dense
    kernels' measured rate (Machine.expert_bandwidth) for dense experts and decoded compressed
    layers where known, else the HBM copy rate (the compressed kernels' cost is expert_calls_time's)."""
    if (m.form == "dense" or decodes_layers(m, tokens)) and machine.expert_bandwidth:
        return min(machine.expert_bandwidth, machine.gpu_bandwidth)
    return machine.gpu_bandwidth


def prefill_layer_time(m: ModelCosts, machine: Machine, policy: Policy, prompt_len: int) -> float:
    """Returns the seconds of one prefill layer: all on the GPU, the layer's streamed experts
    sent once, KV sent to the host (CPU attention), each term its own roof."""
    tokens = policy.batch * prompt_len
    streamed = m.layer_expert_bytes * (1 - policy.resident_share)
    per_mb = policy.micro_batch * prompt_len
    flops = tokens * (m.other_flops + m.attention_flops_per_position * m.attended(prompt_len) / 2)
    experts = (expert_calls_time(m, machine, per_mb, policy.micro_batches * m.moe_fraction)
               + layer_decode_time(m, machine, per_mb, m.moe_fraction))
    hbm = policy.micro_batches * (m.touched(per_mb) * read_bytes(m, per_mb) * m.moe_fraction + m.other_bytes)
    d2h = tokens * m.kv_bytes_per_token if policy.attention == "cpu" else 0.0
    return max(streamed / machine.h2d_bandwidth, flops / machine.gpu_flops + experts, hbm / machine.gpu_bandwidth,
               d2h / machine.d2h_bandwidth)


@dataclass(frozen=True)
class Memory:
    """Bytes a policy holds on the device and in host memory."""

    device: float
    host: float


def memory(m: ModelCosts, policy: Policy, w: Workload) -> Memory:
    """Returns the device and host bytes `policy` holds for workload `w` (see the module docstring)."""
    n, mu, r_w = policy.batch, policy.micro_batch, policy.resident_share
    positions = w.prompt_len + w.gen_len
    kv_all = n * positions * m.kv_bytes_per_token * m.num_layers
    slots_per_layer = m.experts * m.moe_fraction  # an average layer's routed experts
    slots = r_w * slots_per_layer * m.num_layers + (2 * (1 - r_w) * slots_per_layer if r_w < 1 else 0)
    device = (m.resident_bytes + slots * m.device_slot_bytes + m.table_bytes + m.workspace_bytes
              + n * m.hidden * m.act_bytes * 2  # the residual stream of every micro-batch, and its attention output
              + mu * w.prompt_len * m.prefill_act_bytes_per_token + CUDA_RESERVE_BYTES)
    host = m.total_expert_bytes + n * w.prompt_len * m.hidden * m.act_bytes  # store + prefill hidden states
    if policy.attention == "gpu":
        device += kv_all
    else:
        device += 2 * mu * positions * m.kv_bytes_per_token  # prefill KV staging, two micro-batches
        device += n * m.qkv_values * m.act_bytes  # q, k, v packets a layer ahead (CGOPipe's lookahead)
        host += kv_all + n * (m.qkv_values + m.out_values) * m.act_bytes  # KV pool + pinned q/kv/out buffers
    return Memory(device=device, host=host)


@dataclass(frozen=True)
class Plan:
    """A policy with its predicted times, throughput and memory."""

    policy: Policy
    layer: LayerTime  # a decode layer at the mean context
    decode_step_s: float  # L layers
    prefill_s: float
    generation_s: float  # prefill + (gen_len - 1) decode steps
    decode_tok_s: float  # N / decode step
    tok_s: float  # N * gen_len / generation_s (the paper's generation throughput)
    memory: Memory
    limited_by: str  # what stops a larger N: "device memory", "host memory", "prompts"

    @property
    def bound(self) -> str:
        return self.layer.bound

    def to_dict(self) -> dict:
        out = asdict(self)
        out["layer"].update(comm=self.layer.comm, cpu=self.layer.cpu, time=self.layer.time, bound=self.layer.bound)
        return out


def evaluate(m: ModelCosts, machine: Machine, policy: Policy, w: Workload, limited_by: str = "") -> Plan:
    """Returns the Plan of one policy (its memory is not checked: see `fits`)."""
    layer = decode_layer_time(m, machine, policy, w.mean_context)
    step = m.num_layers * layer.time
    prefill = m.num_layers * prefill_layer_time(m, machine, policy, w.prompt_len)
    total = prefill + (w.gen_len - 1) * step
    return Plan(policy, layer, step, prefill, total, policy.batch / step if step > 0 else math.inf,
                policy.batch * w.gen_len / total, memory(m, policy, w), limited_by)


def check_machine(machine: Machine) -> None:
    """Raises MoekitError naming what the HRM needs and the machine lacks."""
    missing = machine.missing()
    if missing:
        raise MoekitError(f"machine '{machine.name}' lacks {', '.join(missing)}: plan on a machine with CUDA, or "
                          "give its GPU levels with --machine FILE (a JSON object of these fields) or --machine h200")


def max_batch(m: ModelCosts, machine: Machine, mu: int, r_w: float, attention: str, w: Workload,
              device_budget: float, host_budget: float) -> tuple[int, str]:
    """Returns (the largest N, a multiple of mu, whose memory fits both budgets (0: none), what limits it)."""
    # memory is affine in N for a fixed mu: two evaluations give its slope
    one, two = (memory(m, Policy(k * mu, mu, r_w, attention), w) for k in (1, 2))
    limits = []
    for name, budget, a, b in (("device memory", device_budget, one.device, two.device),
                               ("host memory", host_budget, one.host, two.host)):
        slope = (b - a) / mu
        base = a - slope * mu
        limits.append(((budget - base) / slope if slope > 0 else (math.inf if base <= budget else -1), name))
    if w.num_prompts is not None:
        limits.append((w.num_prompts, "prompts"))
    cap, name = min(limits)
    if cap < mu:
        return 0, name
    return int(cap // mu) * mu, name


def micro_batch_grid(cap: int) -> list[int]:
    """Returns the micro-batch sizes searched: every size to 64, then steps of ~5% up to `cap`."""
    sizes, mu = list(range(1, min(cap, 64) + 1)), 64
    while mu < cap:
        mu = min(cap, max(mu + 1, int(mu * 1.05)))
        sizes.append(mu)
    return sizes


def search(m: ModelCosts, machine: Machine, w: Workload, device_budget: float | None = None,
           host_budget: float | None = None, attention: tuple[str, ...] = ATTENTION_PLACES,
           max_micro_batch: int = 4096) -> Plan:
    """Returns the Plan of the policy with the highest generation throughput that fits the
    budgets (default: the machine's device memory and 80% of its host memory); raises
    MoekitError saying what is short when none fits.

    For a fixed (attention, r_w, mu) every term of a layer's time is affine in N with a
    non-negative intercept, so N / T grows with N: the largest N that fits is that line's best.
    The search scans attention places, r_w in whole experts per layer, and mu (`micro_batch_grid`);
    of policies with equal throughput it keeps the one with the fewest micro-batches."""
    check_machine(machine)
    device_budget = machine.gpu_memory if device_budget is None else device_budget
    host_budget = 0.8 * machine.host_memory if host_budget is None else host_budget
    levels = max(1, round(m.experts))
    shares = sorted({j / levels for j in range(0, levels + 1, max(1, levels // 32))} | {1.0})
    best: Plan | None = None
    cap = min(max_micro_batch, w.num_prompts or max_micro_batch)
    for place in attention:
        for r_w in shares:
            for mu in micro_batch_grid(cap):
                n, limit = max_batch(m, machine, mu, r_w, place, w, device_budget, host_budget)
                if n == 0:
                    if limit == "device memory" and mu > 1:
                        break  # a larger micro-batch needs more device memory still
                    continue
                plan = evaluate(m, machine, Policy(n, mu, r_w, place), w, limit)
                # a tie (a PCIe-bound decode is the same for every mu) goes to fewer micro-batches:
                # each costs kernel launches and a CPU task the model does not count
                if best is None or plan.tok_s > best.tok_s * (1 + 1e-9) or (
                        plan.tok_s >= best.tok_s * (1 - 1e-9) and plan.policy.micro_batches < best.policy.micro_batches):
                    best = plan
    if best is None:
        floor = memory(m, Policy(1, 1, 0.0, "cpu"), w)
        raise MoekitError(
            f"no policy fits: one sequence needs {floor.device / 1e9:.2f} GB of device memory (budget "
            f"{device_budget / 1e9:.2f} GB) and {floor.host / 1e9:.2f} GB of host memory (budget "
            f"{host_budget / 1e9:.2f} GB); give --device-memory / --host-memory larger, or a smaller stored form")
    return best
