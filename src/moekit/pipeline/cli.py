"""`moekit plan MODEL`: the batch-decoding policy the HRM picks for a model, a machine and a
workload -- batch, micro-batch, resident experts, where attention runs -- with its predicted
throughput and the resource that bounds it (moekit.pipeline.hrm)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..cli_common import add_model_args, fmt_bytes, model_dir, table
from ..errors import CheckpointError, MoekitError


def register(sub: argparse._SubParsersAction) -> None:
    """Adds the plan command to moekit's CLI."""
    p = sub.add_parser("plan", help="pick a batch-decoding policy (batch, micro-batch, resident experts, "
                                    "attention placement) with the hierarchical roofline model")
    add_model_args(p)
    p.add_argument("--device-memory", default=None, metavar="SIZE",
                   help="GPU memory the plan may hold, e.g. 16GiB (default: the machine's)")
    p.add_argument("--host-memory", default=None, metavar="SIZE",
                   help="host memory the plan may hold, e.g. 120GB (default: the memory available now less "
                        "max(4 GiB, 5%%) on this machine; 80%% of a --machine's)")
    p.add_argument("--prompt-len", type=int, default=77, help="mean prompt tokens (default 77, MTBench)")
    p.add_argument("--gen-len", type=int, default=128, help="tokens generated per prompt (default 128)")
    p.add_argument("--num-prompts", type=int, default=None, help="prompts available (caps the batch)")
    p.add_argument("--machine", default=None, metavar="FILE|PRESET",
                   help="GPU/host levels: a JSON file of Machine fields or a preset (h200); fields it lacks come "
                        "from this machine's cached profile (default: this machine's profile alone)")
    p.add_argument("--reprofile", action="store_true", help="measure this machine again (else the cached profile)")
    p.add_argument("--attention", default="auto", choices=("auto", "cpu", "gpu"),
                   help="where decode attention may run (default: the planner chooses)")
    p.add_argument("--expert-bits", type=float, default=None, metavar="BITS",
                   help="plan for experts stored at BITS bits per parameter (e.g. 4.25 for int4 with scales; "
                        "default: the checkpoint's stored form)")
    p.add_argument("--expert-form", default=None, choices=("dense", "int", "ternary_code"),
                   help="plan for experts in this stored form: its kernels' GPU cost and decode workspace "
                        "(default: the checkpoint's; with --expert-bits give it too)")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    p.add_argument("--plot", default=None, metavar="FILE.svg",
                   help="also write the hierarchical roofline picture of the plan (SVG): the machine's roofs and "
                        "the plan's experts and attention on them")
    p.set_defaults(func=cmd_plan)


def check_plan_flags(args: argparse.Namespace) -> tuple[int | None, int | None]:
    """Returns (device budget, host budget) in bytes after checking every flag, before any reading."""
    from ..offload.config import parse_size
    from .hrm import Workload

    Workload(args.prompt_len, args.gen_len, args.num_prompts)  # raises on bad lengths
    if args.expert_bits is not None and not 0 < args.expert_bits <= 32:
        raise MoekitError(f"--expert-bits must be in (0, 32], got {args.expert_bits}")
    budgets = []
    for flag, value in (("--device-memory", args.device_memory), ("--host-memory", args.host_memory)):
        size = parse_size(value, flag) if value is not None else None
        if size is not None and size <= 0:
            raise MoekitError(f"{flag} must be > 0, got {value}")
        budgets.append(size)
    return budgets[0], budgets[1]


def default_host_budget(args: argparse.Namespace, host_budget: int | None) -> int | None:
    """Returns --host-memory, or on this machine (no --machine) the host memory available now less
    a reserve (machine.free_host_budget); None leaves the HRM's 80% of the machine's host memory."""
    from .machine import free_host_budget

    if host_budget is not None or args.machine:
        return host_budget
    return free_host_budget()


def read_model(path: Path):
    """Returns (ModelConfig, bytes of one routed expert as stored, activation bytes, stored form
    name) of a model folder; a folder with config.json alone is planned with dense experts in its
    torch_dtype."""
    from ..checkpoint import read_json
    from ..families import family_for
    from ..inspect_model import inspect_checkpoint
    from ..quant.config import QuantConfig, is_moekit_quantized

    hf = read_json(path / "config.json")
    form = "dense"
    if is_moekit_quantized(hf):
        quant = QuantConfig.from_dict(hf["quantization_config"], str(path / "config.json"))
        form = quant.form if quant.bits == "ternary" else f"int{quant.bits}"
    cfg = family_for(hf, where=str(path / "config.json")).config(hf)
    if not cfg.plain_experts:  # gpt-oss: the clamped forms the pages carry (experts.clamped), named as they name
        mxfp4 = (hf.get("quantization_config") or {}).get("quant_method") == "mxfp4"
        form = ("mxfp4_clamped_swiglu" if mxfp4 else "clamped_swiglu") if form == "dense" else f"{form}_clamped_swiglu"
    act_bytes = 4 if cfg.dtype == "float32" else 2
    total_experts = sum(cfg.experts_in(i) for i in range(cfg.num_layers))
    if not total_experts:
        raise MoekitError(f"{path}: no layer has routed experts; moekit plan is for MoE models")
    try:
        report = inspect_checkpoint(path)
        expert_bytes = report.bytes_experts / total_experts
    except CheckpointError as e:
        if "no *.safetensors" not in str(e):
            raise
        expert_bytes = cfg.params_per_expert * act_bytes  # config only: dense experts in the config's dtype
    return cfg, expert_bytes, act_bytes, form


def resolve_machine(args: argparse.Namespace):
    """Returns the Machine to plan for: --machine (file or preset) over this machine's cached profile."""
    from .machine import PRESETS, read_machine, this_machine

    given = read_machine(args.machine) if args.machine else None
    if given is not None and args.machine in PRESETS:
        return given
    here = this_machine(refresh=args.reprofile)
    return here.merged(given) if given is not None else here


def cmd_plan(args: argparse.Namespace) -> int:
    from .hrm import ATTENTION_PLACES, Workload, describe_resident, model_costs, search

    device_budget, host_budget = check_plan_flags(args)
    path = model_dir(args.model)
    cfg, expert_bytes, act_bytes, form = read_model(path)
    if args.expert_bits is not None:
        expert_bytes = cfg.params_per_expert * args.expert_bits / 8
    form = args.expert_form or form
    machine = resolve_machine(args)
    for flag, budget, have in (("--device-memory", device_budget, machine.gpu_memory),
                               ("--host-memory", host_budget, machine.host_memory)):
        if budget is not None and have is not None and budget > have:
            raise MoekitError(f"{flag} {budget / 1e9:.2f}GB is more than machine '{machine.name}' has "
                              f"({have / 1e9:.2f}GB); give at most that")
    workload = Workload(args.prompt_len, args.gen_len, args.num_prompts)
    given_host = host_budget
    host_budget = default_host_budget(args, host_budget)
    host_words = ("--host-memory" if given_host is not None else "the memory available now less a reserve"
                  if host_budget is not None else "80% of the machine's")
    costs = model_costs(cfg, expert_bytes, act_bytes, form=form)
    places = ATTENTION_PLACES if args.attention == "auto" else (args.attention,)
    plan = search(costs, machine, workload, device_budget, host_budget, attention=places)
    others = []  # the best policy of each other attention placement, to show what the choice gains
    for place in places:
        if place != plan.policy.attention:
            try:
                others.append(search(costs, machine, workload, device_budget, host_budget, attention=(place,)))
            except MoekitError:
                pass  # nothing fits with attention there
    if args.plot:
        write_plot(Path(args.plot), machine, costs, plan, workload, f"{path.name}: {plan.tok_s:.0f} tok/s predicted")
    result = {"model": str(path), "machine": machine.to_dict(), "workload": vars(workload),
              "expert_bytes": expert_bytes, "expert_form": form, "bits_per_weight": costs.bits_per_weight,
              "plan": plan.to_dict(), "bound": plan.bound, "host_budget": host_budget, "host_budget_from": host_words,
              "alternatives": [o.to_dict() for o in others]}
    if args.json:
        print(json.dumps(result))
        return 0
    p, lt = plan.policy, plan.layer
    print(table([
        ("model", (f"{path} ({cfg.family}, {cfg.num_layers} layers, {costs.experts:g} experts of "
                  f"{fmt_bytes(expert_bytes)}: {form}, {costs.bits_per_weight:.2f} bits per weight)")),
        ("machine", (f"{machine.name}: GPU {machine.gpu_flops / 1e12:.0f} TFLOP/s, HBM {machine.gpu_bandwidth / 1e9:.0f} "
                    f"GB/s, PCIe {machine.h2d_bandwidth / 1e9:.1f} GB/s, host {machine.host_bandwidth / 1e9:.1f} GB/s"
                    + attention_words(machine))),
        ("workload", f"{workload.prompt_len} prompt + {workload.gen_len} generated tokens per sequence"),
        ("policy", (f"N = {p.batch} sequences in {p.batch // p.micro_batch} micro-batches of {p.micro_batch}, "
                   f"attention on the {p.attention.upper()}, {describe_resident(costs, p)}")),
        ("throughput", (f"{plan.tok_s:.1f} tok/s generated ({plan.decode_tok_s:.1f} tok/s decode, "
                       f"prefill {plan.prefill_s:.2f} s, a decode step {plan.decode_step_s * 1e3:.1f} ms)")),
        *((("prefill experts", plan.prefill_experts),) if plan.prefill_experts else ()),
        ("bound by", (f"{plan.bound} (per layer: PCIe {lt.comm * 1e3:.2f} ms, CPU {lt.cpu * 1e3:.2f} ms, "
                     f"GPU {lt.gpu * 1e3:.2f} ms)")),
        ("batch limited by", plan.limited_by),
        ("memory", f"device {fmt_bytes(plan.memory.device)}, host {fmt_bytes(plan.memory.host)} (host budget "
                   + (f"{fmt_bytes(host_budget)}: {host_words})" if host_budget is not None else f"{host_words})")),
        *((f"attention on the {o.policy.attention.upper()}",
           (f"at best {o.tok_s:.1f} tok/s (N = {o.policy.batch}, micro-batch {o.policy.micro_batch}, "
           f"{describe_resident(costs, o.policy)}; bound by {o.bound})")) for o in others),
    ]))
    return 0


def attention_words(machine) -> str:
    """Returns ', CPU attention R GB/s (where measured)' for the plan's machine line, or ''."""
    if machine.pipeline_attention_bandwidth:
        return (f", CPU attention {machine.pipeline_attention_bandwidth / 1e9:.1f} GB/s (inside the pipeline, "
                "a moekit batch run's)")
    if machine.cpu_attention_bandwidth:
        return f", CPU attention {machine.cpu_attention_bandwidth / 1e9:.1f} GB/s (the probe's, alone)"
    return ""


def write_plot(out: Path, machine, costs, plan, workload, title: str) -> None:
    """Writes the plan's roofline picture to `out` whole (a temporary file renamed into place)."""
    import os

    from .roofline import render

    if out.suffix.lower() != ".svg":
        raise MoekitError(f"--plot {out}: the picture is written as SVG; give a path ending in .svg")
    if not out.parent.is_dir():
        raise MoekitError(f"--plot {out}: folder {out.parent} does not exist")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(render(machine, costs, plan, workload, title))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
