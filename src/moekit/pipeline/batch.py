"""Run a planned batch: load a model with the plan's resident experts (paged experts), generate
for N prompts in its micro-batches with CGOPipe, and report the measurement next to the HRM's
prediction and the PCIe ceiling -- what BENCH.md's batch-throughput benchmark prints.

    plan = hrm.search(costs, machine, workload, ...)          # or `moekit plan --json`
    result = run_plan(model_dir, plan, prompts, gen_len, device="cuda", dtype="bfloat16")
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..errors import MoekitError
from .hrm import Plan


@dataclass
class BatchResult:
    """A planned batch's measurement, beside what the HRM predicted for it."""

    sequences: int
    micro_batch: int
    resident_per_layer: int | tuple[int, ...]  # one count for every MoE layer, or one a layer (resident_experts)
    prompt_tokens: int
    new_tokens: int  # per sequence
    prefill_s: float
    decode_s: float
    tok_s: float  # generated tokens / (prefill + decode)
    decode_tok_s: float  # N * (new_tokens - 1) / decode
    predicted_tok_s: float
    predicted_decode_tok_s: float
    pcie_ceiling_decode_tok_s: float | None  # N * h2d / streamed expert bytes per step (None: nothing streamed)
    pages_loaded: int
    whole_loads: int  # layers loaded whole at their call (the prefill's, and any page cut short)
    streamed_bytes_per_step: int  # expert bytes one decode step sends host-to-device
    tokens: list[list[int]]
    step_profile: dict | None = None  # where a decode step goes (timeline.StepProfile.summary; run_plan(profile=True))

    def to_dict(self) -> dict:
        return asdict(self)


def resident_experts(path, plan: Plan) -> int | tuple[int, ...]:
    """Returns the experts the plan keeps on the device: one count for every MoE layer, or where
    the layers differ one count a MoE layer in layer order (its R spread, hrm.spread_resident; a
    policy without R: its r_w of each layer in whole experts). load_paged takes either."""
    from ..load import read_config
    from .residency import spread_resident

    cfg = read_config(path)[2]
    experts = [cfg.experts_in(i) for i in range(cfg.num_layers) if cfg.moe_layers[i]]
    if plan.policy.resident_experts is None:
        return min(min(experts), round(plan.policy.resident_share * min(experts)))
    counts = spread_resident(plan.policy.resident_experts, experts)
    return counts[0] if len(set(counts)) == 1 else tuple(counts)


def load_paged(path, resident, device: str = "cpu", dtype: str | None = None, host_layers=None):
    """Returns the model of `path` with paged experts, `resident` of each MoE layer on the device
    (one count, or one a MoE layer: resident_experts; `host_layers`: the host store given
    directly, see PagedLoader)."""
    from ..load import load_model
    from .paged import PagedLoader

    return load_model(path, device=device, dtype=dtype, experts=PagedLoader(resident=resident, host_layers=host_layers))


def run_plan(path, plan: Plan, prompts: list, gen_len: int, device: str = "cpu", dtype: str | None = None,
             h2d_bandwidth: float | None = None, host_layers=None, model=None, on_step=None,
             profile: bool = False, attention_threads: int | None = None, graphs: bool | None = None) -> BatchResult:
    """Returns the BatchResult of generating `gen_len` greedy tokens for `prompts` (the plan's N of
    them; token id lists) with the plan's micro-batch and resident experts per layer (CPU attention
    only: a plan with attention on the GPU is for the sequential engines). `model` (from
    load_paged with the plan's resident count) is used instead of loading one (several plans, one
    load); `host_layers` as in load_paged; `on_step` as in generate_pipelined; `profile` records
    where the decode steps go (BatchResult.step_profile: launch thread blocked, worker, and on CUDA
    per-layer compute, weight-page spans and attention-output loads); `attention_threads` and
    `graphs` as in cgopipe.PipelinedDecoder."""
    from ..generate import GenerationStats
    from .cgopipe import generate_pipelined
    from .timeline import StepProfile

    policy = plan.policy
    if policy.attention != "cpu":
        raise MoekitError("this plan runs attention on the GPU: run it with moekit.generate (the KV cache on the "
                          "device), not the CGOPipe engine")
    if len(prompts) != policy.batch:
        raise MoekitError(f"the plan is for {policy.batch} sequences, {len(prompts)} prompts given")
    resident = resident_experts(path, plan)
    if model is None:
        model = load_paged(path, resident, device, dtype, host_layers)
    elif getattr(model.expert_runtime, "resident", None) != resident:
        raise MoekitError(f"the plan keeps {resident} experts resident (per MoE layer), the model given "
                          f"{getattr(model.expert_runtime, 'resident', None)}: load it with "
                          f"load_paged(path, {resident})")
    stats = GenerationStats()
    runtime = model.expert_runtime
    pages_before, whole_before = runtime.pages_loaded, runtime.whole_loads  # a model given may have run before
    steps = StepProfile(cuda=model.device.type == "cuda") if profile else None
    tokens = generate_pipelined(model, prompts, gen_len, policy.micro_batch, stats=stats, on_step=on_step,
                                profile=steps, attention_threads=attention_threads, graphs=graphs)
    streamed_bytes = sum(runtime.streamed_bytes(layer) for layer in runtime.layers)  # one decode step's PCIe bytes
    n = policy.batch
    total = stats.prefill_s + stats.decode_s
    return BatchResult(
        sequences=n, micro_batch=policy.micro_batch, resident_per_layer=resident,
        prompt_tokens=stats.prompt_tokens, new_tokens=gen_len, prefill_s=stats.prefill_s, decode_s=stats.decode_s,
        tok_s=n * gen_len / total if total > 0 else 0.0,
        decode_tok_s=n * (gen_len - 1) / stats.decode_s if stats.decode_s > 0 else 0.0,
        predicted_tok_s=plan.tok_s, predicted_decode_tok_s=plan.decode_tok_s,
        pcie_ceiling_decode_tok_s=n * h2d_bandwidth / streamed_bytes if h2d_bandwidth and streamed_bytes else None,
        pages_loaded=runtime.pages_loaded - pages_before, whole_loads=runtime.whole_loads - whole_before,
        streamed_bytes_per_step=streamed_bytes, tokens=[t.tolist() for t in tokens],
        step_profile=steps.summary() if steps is not None else None)


def synthetic_prompts(count: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Returns `count` prompts of `length` random token ids below `vocab` (random weights route
    near-uniformly, so ids do not matter for speed)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (count, length), generator=g).tolist()
