"""The hierarchical roofline model (HRM) of MoE-Lightning and its policy search: what a
pipelined batch decode (CGOPipe) of a model costs per layer on a machine, and the policy --
batch N, micro-batch mu, resident experts R (a total over the MoE layers), where attention runs --
that gives the most generated tokens per second within the device and host memory budgets.

Resident experts: R whole experts over the L_moe MoE layers, spread as evenly as whole experts go
(resident_layers: the first R mod L_moe layers hold j + 1, the rest j = R // L_moe), so a budget
with room for some experts but not one more in every layer still holds them (the paper's r_w is
R / (L_moe E), each layer's share; a policy without R holds round(r_w E) in every layer). Layers
that hold different counts stream different bytes: a decode step is the sum of its layers' times,
each layer its own roofline max.

Per decode layer (an average layer), for N sequences in N / mu micro-batches (paper eq. 12-14):

    T_layer = max(comm, T_cpu, T_gpu)           (CPU attention in one micro-batch: max(comm, T_cpu + T_gpu))
    comm    = max(H2D bytes / h2d, D2H bytes / d2h)
              H2D: the layer's non-resident expert bytes (E - R_l experts) + attention outputs (CPU attention)
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
(all on the GPU, the weights streamed once per layer, the first layer's not hidden, the host KV
pool written once; the experts' FLOPs at the grouped kernels' measured prefill rate,
Machine.prefill_expert_flops, else at the GEMM peak -- 1.7-3.9x too fast on the H200) and gen_len - 1 decode steps; throughput is
N * gen_len / (prefill + decode), the paper's metric.

Memory, per policy (bytes): device = non-expert weights + the R resident experts + a double buffer
of the slowest layer's streamed experts (E - min_l R_l slots each) + the hidden states of N tokens
+ one micro-batch's prefill activations + (GPU attention: the KV cache of N sequences; CPU attention: the prefill's KV staging
-- one layer of N prompts and its copy on the way to the host -- and the q, k, v packets of N tokens: CGOPipe launches CPU attention a layer ahead, so
every micro-batch's packet may wait on the device for its D2H copy). The double buffer is what
lets layer i + 1's pages stream while layer i computes. Host = every expert (the store) + (CPU attention: the KV cache) + the prefill hidden
states of N prompts. R is whole experts, as a runtime can hold them (pipeline.paged). Device
slots are the form's slot bytes (packed slots fit the widest layer), plus the form's tables (a
code's dictionaries) and its decode workspace.

What a model costs per layer as stored (ModelCosts, model_costs, form_costs, the compressed forms'
kernel terms) is in costs.py, re-exported here; this file is the layer time, memory and the search.

Shapes: L layers, D hidden, E experts per MoE layer, A = top-k, I expert ffn, H query heads,
s prompt length, n generated tokens, c = s + n / 2 the mean context of a decode step.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from ..errors import MoekitError
from .costs import (  # noqa: F401 (the model's terms, re-exported: hrm is where callers plan from)
    DECODE_TRAFFIC_BYTES_PER_WEIGHT,
    DECODE_WORKSPACE_BYTES_PER_WEIGHT,
    FORM_KERNELS,
    ModelCosts,
    decodes_layers,
    expert_calls_time,
    form_costs,
    form_kernel,
    layer_decode_time,
    model_costs,
    prefill_expert_rate,
    routed_tokens,
)
from .machine import Machine
from .policy import ATTENTION_PLACES, Policy
from .residency import (  # noqa: F401 (re-exported: callers plan from hrm)
    describe_resident,
    layer_groups,
    resident_layers,
    spread_resident,
    with_resident,
)

CUDA_RESERVE_BYTES = 64 * 2**20  # workspaces and allocator rounding (offload.planner's reserve)

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


def streamed_bytes(m: ModelCosts, policy: Policy, resident: float | None = None) -> float:
    """Returns the expert bytes an average layer streams host-to-device, holding `resident` of its
    experts (None: the policy's mean, r_w E)."""
    if resident is None:
        counts = resident_layers(m, policy) if policy.resident_experts is not None else None
        kept = sum(counts) / len(counts) if counts else policy.resident_share * m.experts
    else:
        kept = resident
    return max(0.0, m.experts - kept) * m.expert_bytes * m.moe_fraction


def decode_layer_time(m: ModelCosts, machine: Machine, policy: Policy, context: float,
                      resident: float | None = None) -> LayerTime:
    """Returns the seconds of one decode layer under `policy` with every sequence at `context`
    positions, the layer holding `resident` experts on the device (None: the policy's mean)."""
    n, n_ub = policy.batch, policy.micro_batches
    streamed = streamed_bytes(m, policy, resident)
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
        kernel = kv_read / machine.attention_rate if machine.attention_rate else 0.0
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


def prefill_layer_time(m: ModelCosts, machine: Machine, policy: Policy, prompt_len: int,
                       resident: float | None = None) -> float:
    """Returns the seconds of one prefill layer holding `resident` experts (None: the policy's
    mean): all on the GPU, the layer's streamed experts sent once, KV sent to the host (CPU
    attention), each term its own roof. The routed experts' FLOPs run at the grouped kernels'
    measured prefill rate (prefill_expert_rate: the dense GEMM's where not measured), the rest --
    projections, router, causal attention over the prompt -- at the GEMM's."""
    tokens = policy.batch * prompt_len
    streamed = streamed_bytes(m, policy, resident)
    per_mb = policy.micro_batch * prompt_len
    flops = tokens * (m.other_flops + m.attention_flops_per_position * m.attended(prompt_len) / 2)
    # the experts' FLOPs, priced here only (`flops` is the rest): the grouped kernels' prefill rate
    experts = (expert_calls_time(m, machine, per_mb, policy.micro_batches * m.moe_fraction,
                                 prefill_expert_rate(machine))
               + layer_decode_time(m, machine, per_mb, m.moe_fraction))
    hbm = policy.micro_batches * (m.touched(per_mb) * read_bytes(m, per_mb) * m.moe_fraction + m.other_bytes)
    d2h = tokens * m.kv_bytes_per_token if policy.attention == "cpu" else 0.0
    return max(streamed / machine.h2d_bandwidth, flops / machine.gpu_flops + experts, hbm / machine.gpu_bandwidth,
               d2h / machine.d2h_bandwidth)


def prefill_time(m: ModelCosts, machine: Machine, policy: Policy, w: Workload) -> float:
    """Returns the seconds of a prefill: L layers (prefill_layer_time) after what no layer hides
    -- the first MoE layer's streamed experts, sent before it can compute (layer i + 1's stream
    behind layer i's compute only from then on), and with CPU attention the host KV pool written
    once where it is allocated (N sequences' prompt + generated positions, at the host's rate)."""
    groups = layer_groups(m, policy)
    pool = 0.0
    if policy.attention == "cpu":
        pool = policy.batch * (w.prompt_len + w.gen_len) * m.kv_bytes_per_token * m.num_layers
    return (sum(layers * prefill_layer_time(m, machine, policy, w.prompt_len, j) for layers, j in groups)
            + streamed_bytes(m, policy, groups[0][1]) / machine.h2d_bandwidth + pool / machine.host_bandwidth)


@dataclass(frozen=True)
class Memory:
    """Bytes a policy holds on the device and in host memory."""

    device: float
    host: float


def memory(m: ModelCosts, policy: Policy, w: Workload) -> Memory:
    """Returns the device and host bytes `policy` holds for workload `w` (see the module docstring)."""
    n, mu = policy.batch, policy.micro_batch
    positions = w.prompt_len + w.gen_len
    kv_all = n * positions * m.kv_bytes_per_token * m.num_layers
    counts = resident_layers(m, policy)
    # the resident experts, and two buffers of the layer that streams the most (pipeline.paged's slab)
    slots = sum(counts) + 2 * max((m.experts - j for j in counts), default=0.0)
    device = (m.resident_bytes + slots * m.device_slot_bytes + m.table_bytes + m.workspace_bytes
              + n * m.hidden * m.act_bytes * 2  # the residual stream of every micro-batch, and its attention output
              + mu * w.prompt_len * m.prefill_act_bytes_per_token + CUDA_RESERVE_BYTES)
    host = m.total_expert_bytes + n * w.prompt_len * m.hidden * m.act_bytes  # store + prefill hidden states
    if policy.attention == "gpu":
        device += kv_all
    else:
        # prefill KV staging: one layer of all N prompts (prefill.OneLayerCache) and its copy on the way to the host
        device += 2 * n * w.prompt_len * m.kv_bytes_per_token
        device += n * m.qkv_values * m.act_bytes  # q, k, v packets a layer ahead (CGOPipe's lookahead)
        host += kv_all + n * (m.qkv_values + m.out_values) * m.act_bytes  # KV pool + pinned q/kv/out buffers
    return Memory(device=device, host=host)


@dataclass(frozen=True)
class Plan:
    """A policy with its predicted times, throughput and memory."""

    policy: Policy
    layer: LayerTime  # the slowest decode layer (the most streamed bytes) at the mean context
    decode_step_s: float  # L layers, each at its resident experts' time
    prefill_s: float
    generation_s: float  # prefill + (gen_len - 1) decode steps
    decode_tok_s: float  # N / decode step
    tok_s: float  # N * gen_len / generation_s (the paper's generation throughput)
    memory: Memory
    limited_by: str  # what stops a larger N: "device memory", "host memory", "prompts"
    prefill_experts: str = ""  # the rate the prefill's routed experts are priced at, and its source (prefill_rate_note)

    @property
    def bound(self) -> str:
        return self.layer.bound

    def to_dict(self) -> dict:
        out = asdict(self)
        out["layer"].update(comm=self.layer.comm, cpu=self.layer.cpu, time=self.layer.time, bound=self.layer.bound)
        return out


def evaluate(m: ModelCosts, machine: Machine, policy: Policy, w: Workload, limited_by: str = "") -> Plan:
    """Returns the Plan of one policy (its memory is not checked: see `fits`)."""
    layers = [(count, decode_layer_time(m, machine, policy, w.mean_context, j)) for count, j in layer_groups(m, policy)]
    step = sum(count * t.time for count, t in layers)
    layer = max((t for _, t in layers), key=lambda t: t.time)
    prefill = prefill_time(m, machine, policy, w)
    total = prefill + (w.gen_len - 1) * step
    return Plan(policy, layer, step, prefill, total, policy.batch / step if step > 0 else math.inf,
                policy.batch * w.gen_len / total, memory(m, policy, w), limited_by, prefill_rate_note(machine))


def prefill_rate_note(machine: Machine) -> str:
    """Returns what the prefill's routed experts are priced at: the measured grouped-kernel rate,
    or the GEMM peak where it is not measured (an optimistic prefill)."""
    rate = prefill_expert_rate(machine) / 1e12
    if machine.prefill_expert_flops:
        return f"{rate:.0f} TFLOP/s (the grouped expert kernels' measured prefill rate)"
    return (f"{rate:.0f} TFLOP/s (the GEMM peak: prefill_expert_flops not measured, so the prefill is optimistic; "
            "the H200's grouped kernels ran 1.7-3.9x slower)")


def check_machine(machine: Machine) -> None:
    """Raises MoekitError naming what the HRM needs and the machine lacks."""
    missing = machine.missing()
    if missing:
        raise MoekitError(f"machine '{machine.name}' lacks {', '.join(missing)}: plan on a machine with CUDA, or "
                          "give its GPU levels with --machine FILE (a JSON object of these fields) or --machine h200")


def max_batch(m: ModelCosts, machine: Machine, mu: int, r_w: float, attention: str, w: Workload,
              device_budget: float, host_budget: float, resident_experts: int | None = None) -> tuple[int, str]:
    """Returns (the largest N, a multiple of mu, whose memory fits both budgets (0: none), what
    limits it) with r_w of every layer's experts resident, or R = `resident_experts` in all."""
    # memory is affine in N for a fixed mu: two evaluations give its slope
    one, two = (memory(m, Policy(k * mu, mu, r_w, attention, resident_experts), w) for k in (1, 2))
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

    For a fixed (attention, R, mu) every term of a layer's time is affine in N with a
    non-negative intercept, so N / T grows with N: the largest N that fits is that line's best.
    The search scans attention places, R at whole experts in every layer (j L_moe, at most ~33
    levels of j), and mu (`micro_batch_grid`); at each level's largest N, and at one micro-batch
    fewer, it then adds the extra experts the device budget still holds (`fill_resident`: up to
    the next level, spread over the layers). Of policies with equal throughput it keeps the one
    with the fewest micro-batches, then the fewest resident experts."""
    check_machine(machine)
    device_budget = machine.gpu_memory if device_budget is None else device_budget
    host_budget = 0.8 * machine.host_memory if host_budget is None else host_budget
    experts, layers = max(1, round(m.experts)), m.moe_layers
    step = max(1, experts // 32)
    levels = sorted(set(range(0, experts + 1, step)) | {experts})
    best: Plan | None = None
    cap = min(max_micro_batch, w.num_prompts or max_micro_batch)

    def better(plan: Plan) -> bool:
        # a tie (a PCIe-bound decode is the same for every mu) goes to fewer micro-batches: each
        # costs kernel launches and a CPU task the model does not count; then to fewer experts held
        if best is None or plan.tok_s > best.tok_s * (1 + 1e-9):
            return True
        tie = plan.tok_s >= best.tok_s * (1 - 1e-9)
        return tie and (plan.policy.micro_batches, plan.policy.resident_experts) < (
            best.policy.micro_batches, best.policy.resident_experts)

    for place in attention:
        for at, j in enumerate(levels):
            top = levels[at + 1] * layers - 1 if at + 1 < len(levels) else j * layers  # the next level's own
            for mu in micro_batch_grid(cap):
                n, limit = max_batch(m, machine, mu, j / experts, place, w, device_budget, host_budget, j * layers)
                if n == 0:
                    if limit == "device memory" and mu > 1:
                        break  # a larger micro-batch needs more device memory still
                    continue
                base = with_resident(m, Policy(n, mu, attention=place), j * layers)
                candidates = [base]
                for fewer in (n, n - mu):  # its N, and one micro-batch fewer for more experts
                    if fewer >= mu and top > j * layers:
                        more = fill_resident(m, replace(base, batch=fewer), w, device_budget, top)
                        if more.resident_experts > j * layers:
                            candidates.append(more)
                for policy in candidates:
                    plan = evaluate(m, machine, policy, w, limit if policy.batch == n else "device memory")
                    if better(plan):
                        best = plan
    if best is None:
        floor = memory(m, Policy(1, 1, 0.0, "cpu", 0), w)
        raise MoekitError(
            f"no policy fits: one sequence needs {floor.device / 1e9:.2f} GB of device memory (budget "
            f"{device_budget / 1e9:.2f} GB) and {floor.host / 1e9:.2f} GB of host memory (budget "
            f"{host_budget / 1e9:.2f} GB); give --device-memory / --host-memory larger, or a smaller stored form")
    return best


def fill_resident(m: ModelCosts, policy: Policy, w: Workload, device_budget: float, top: int) -> Policy:
    """Returns `policy` with the most resident experts, at most `top` in all and no fewer than its
    own, whose device memory fits `device_budget` (the host's does not change: the store holds
    every expert)."""
    low = policy.resident_experts or 0
    spare = device_budget - memory(m, policy, w).device
    if spare < m.device_slot_bytes:
        return policy
    # an extra expert is one more slot (the double buffer only shrinks as the layers fill): the
    # estimate fits, or a step down finds one that does
    total = min(top, low + int(spare // m.device_slot_bytes))
    while total > low and memory(m, with_resident(m, policy, total), w).device > device_budget:
        total -= 1
    return with_resident(m, policy, total)
