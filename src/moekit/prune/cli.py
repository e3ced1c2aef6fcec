"""`moekit usage`, `moekit prune`, `moekit finetune`: the pruning pillar's commands."""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from pathlib import Path

import torch

from ..cli_common import (add_model_args, add_overwrite_arg, add_threads_arg, check_min, data_path, model_context,
                          model_dir, refuse_compressed)
from ..errors import MoekitError
from ..outputs import check_output
from ..progress import heartbeat


def _add_common(p: argparse.ArgumentParser, data_flag: str) -> None:
    add_model_args(p)
    p.add_argument(data_flag, required=True, help="text: a .txt/.jsonl file or a folder of them")
    p.add_argument("--samples", type=int, default=64, help="sequences of --seqlen tokens to use")
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0, help="which windows of the text are drawn (and --criterion random)")
    add_threads_arg(p)
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def _device(args) -> str:
    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _check_common(args, command: str, min_samples: int = 1) -> Path:
    """Returns the model folder after checking the flags and paths every command here shares
    (cheap: config.json and file existence only), before any tokenising, loading or calibrating."""
    from ..checkpoint import parse_device

    check_min("--samples", args.samples, min_samples)
    check_min("--seqlen", args.seqlen, 2)
    check_min("--batch", args.batch, 1)
    parse_device(_device(args))
    path = model_dir(args.model)
    refuse_compressed(path, command)
    context = model_context(path)
    if args.seqlen > context:
        raise MoekitError(f"--seqlen {args.seqlen} exceeds the model's context ({context} positions)")
    data_path(_text_path(args), "--calib" if getattr(args, "calib", None) else "--data")
    return path


def _text_path(args) -> str:
    return getattr(args, "calib", None) or args.data


def _samples(args, path):
    """Returns token ids [samples, seqlen] drawn from the --calib / --data text."""
    from ..calibrate import calibration_tokens
    from ..data import load_text
    from ..tokenizer import load_tokenizer

    text = load_text(_text_path(args))
    return calibration_tokens(text, load_tokenizer(path), args.samples, args.seqlen, seed=args.seed)


def _counted(args, path):
    """Returns usage counted block by block over the calibration text."""
    from .usage import usage_from_calibration

    samples = _samples(args, path)
    with heartbeat(f"counting expert use over {samples.numel():,} tokens"):
        return usage_from_calibration(path, samples, _device(args), args.batch, progress=sys.stderr.isatty())


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


# ---- usage -----------------------------------------------------------------------------------

def cmd_usage(args: argparse.Namespace) -> int:
    usage = _counted(args, _check_common(args, "usage"))
    report = usage.to_dict()
    for row, i in zip(report["layers"], range(len(usage.layers))):
        order = torch.argsort(usage.hard[i], descending=True).tolist()
        for keep in (0.75, 0.5):
            n = max(usage.top_k, round(len(order) * keep))
            hard, soft = usage.dropped(i, order[:n])
            row[f"dropped_at_keep_{keep}"] = {"assignments": hard, "mass": soft}
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{usage.tokens:,} tokens, top-{usage.top_k}")
    print(f"{'layer':>5} {'experts':>7} {'entropy':>15} {'imbalance':>9} {'top expert':>10} "
          f"{'drop@0.75':>17} {'drop@0.5':>17}")
    for row in report["layers"]:
        hard = torch.tensor(row["hard"])
        top_share = float(hard.max() / hard.sum()) if hard.sum() > 0 else 0.0
        d75, d50 = row["dropped_at_keep_0.75"], row["dropped_at_keep_0.5"]
        print(f"{row['layer']:>5} {row['experts']:>7} {row['entropy_nats']:6.3f}/{row['entropy_max_nats']:.3f} nats "
              f"{row['imbalance']:>9.2f} {_pct(top_share):>10} "
              f"{_pct(d75['assignments']):>7} / {_pct(d75['mass']):>7} {_pct(d50['assignments']):>7} / {_pct(d50['mass']):>7}")
    print("drop@F: share of top-k assignments / router mass on the experts a keep-F hard-count prune removes")
    return 0


# ---- prune -----------------------------------------------------------------------------------

def cmd_prune(args: argparse.Namespace) -> int:
    from ..load import read_config
    from .rewrite import write_pruned
    from .select import select_experts

    path = _check_common(args, "prune")
    if not 0 < args.keep <= 1:
        raise MoekitError(f"--keep must be in (0, 1] (the fraction of experts kept), got {args.keep}")
    from .rewrite import check_prunable

    check_prunable(read_config(path)[2])  # before counting: group-limited routers cannot be pruned
    check_output(args.out, [path, args.calib], args.overwrite)
    usage = _counted(args, path)
    kept_lists = select_experts(usage, args.keep, args.criterion, args.scope, seed=args.seed)
    kept = dict(zip(usage.layers, kept_lists))
    ckpt, family, cfg = read_config(path)
    facts = {"keep": args.keep, "criterion": args.criterion, "scope": args.scope,
             "calibration_tokens": usage.tokens, "kept_experts": {str(k): v for k, v in kept.items()}}
    out = write_pruned(ckpt, family, cfg, kept, args.out, facts, overwrite=args.overwrite)
    rows = []
    for i, layer in enumerate(usage.layers):
        hard, soft = usage.dropped(i, kept[layer])
        rows.append({"layer": layer, "experts_before": usage.hard[i].numel(), "experts_after": len(kept[layer]),
                     "dropped_assignments": hard, "dropped_mass": soft})
    before = cfg.expert_params
    after = sum(len(v) for v in kept.values()) * cfg.params_per_expert
    result = {"out": str(out), "layers": rows, "expert_params_before": before, "expert_params_after": after,
              "top_k": min(cfg.top_k, min(len(v) for v in kept.values()))}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{'layer':>5} {'experts':>9} {'dropped assignments':>20} {'dropped mass':>13}")
    for r in rows:
        print(f"{r['layer']:>5} {r['experts_before']:>4}->{r['experts_after']:<4} {_pct(r['dropped_assignments']):>20} "
              f"{_pct(r['dropped_mass']):>13}")
    print(f"expert parameters {before:,} -> {after:,} ({_pct(after / before)}); top-k {result['top_k']}; wrote {out}")
    return 0


# ---- finetune --------------------------------------------------------------------------------

def _check_finetune(args: argparse.Namespace) -> Path:
    """Returns the model folder after checking every finetune flag and path, before any work."""
    from ..load import read_config
    from .finetune import check_setting

    path = _check_common(args, "finetune", min_samples=2)  # one sample at least is held out
    if args.steps <= 0:
        raise MoekitError(f"--steps must be > 0, got {args.steps}")
    if args.lr <= 0:
        raise MoekitError(f"--lr must be > 0, got {args.lr}")
    _, _, cfg = read_config(path)
    fewest = min(cfg.experts_in(i) for i in range(cfg.num_layers) if cfg.moe_layers[i])
    for flag, k in (("--top-k", args.top_k), ("--train-top-k", args.train_top_k)):
        if k is not None and not 1 <= k <= fewest:
            raise MoekitError(f"{flag} {k} is not possible: the model's MoE layers have {fewest} experts "
                              f"(fewest in a layer); give 1..{fewest}")
    train_top_k = args.train_top_k if args.train_top_k is not None else cfg.top_k
    check_setting(cfg, train_top_k, args.train, args.entropy_weight)  # refusals only; warnings come later
    ckpt, family, _ = read_config(path)
    why = _why_not_writable(ckpt, family, cfg, args.train)
    if why:
        raise MoekitError(f"--train {args.train} cannot be written back for this {cfg.family} model yet ({why}); "
                          "use --train router")
    check_output(args.out, [path, args.data], args.overwrite)
    return path


def _why_not_writable(ckpt, family, cfg, train_what: str) -> str | None:
    """Returns why the tensors `train_what` trains cannot be written under the checkpoint's own
    names (save.hf_tensors writes the llama-style layout with per-expert SwiGLU tensors), or None."""
    if train_what == "router":
        return None
    first_moe = next(i for i in range(cfg.num_layers) if cfg.moe_layers[i])
    if not cfg.plain_experts:
        return f"experts with biases and {cfg.expert_act}"
    if ckpt.has(family.stacked_expert_names(first_moe)[0]):
        return "experts stored stacked"
    if train_what == "all":
        for flag, what in ((cfg.mla is not None, "latent attention"), (cfg.norm != "rms", "LayerNorm biases"),
                           (cfg.attention_sinks, "attention sinks"), (cfg.lm_head_bias, "an LM-head bias"),
                           (cfg.router_bias, "router biases")):
            if flag:
                return what
    return None


def cmd_finetune(args: argparse.Namespace) -> int:
    from ..load import load_model, read_config
    from ..progress import Progress
    from ..train import evaluate_perplexity
    from .finetune import check_setting, finetune_router, mean_router_entropy, set_top_k
    from .rewrite import write_pruned

    path = _check_finetune(args)
    samples = _samples(args, path)
    with heartbeat("loading the model"):
        model = load_model(path, device=_device(args), dtype=torch.float32,
                           progress=sys.stderr.isatty())  # fp32 master weights
    if samples.shape[0] < 2:
        raise MoekitError("--data gives fewer than 2 samples; give more text (one is held out for evaluation)")
    held = max(1, samples.shape[0] // 10)
    train_rows, eval_rows = samples[:-held], samples[-held:]
    eval_stream = eval_rows.reshape(-1)
    original_k = model.config.top_k
    train_top_k = args.train_top_k if args.train_top_k is not None else original_k
    set_top_k(model, train_top_k, "--train-top-k")  # flag mistakes are reported before any evaluation
    set_top_k(model, args.top_k)
    warning = check_setting(model.config, train_top_k, args.train, args.entropy_weight)
    if warning:
        print(f"moekit finetune: warning: {warning}", file=sys.stderr)
    ppl_before = evaluate_perplexity(model, eval_stream, args.seqlen, args.batch, progress=True)[0]
    entropy_before = mean_router_entropy(model, eval_rows, args.batch)

    def batches():
        g = torch.Generator().manual_seed(args.seed)
        while True:
            for i in torch.randperm(train_rows.shape[0], generator=g).split(args.batch):
                yield train_rows[i]

    bar = Progress(args.steps, "fine-tuning", unit="steps")
    done = 0

    def on_log(record: dict) -> None:
        nonlocal done
        bar.update(int(record["step"]) - done, note=f"loss {record['loss']:.4f}")
        done = int(record["step"])

    with warnings.catch_warnings(), bar:
        warnings.simplefilter("ignore")  # printed above already
        result = finetune_router(model, batches(), args.steps, args.top_k, args.entropy_weight, args.lr, args.train,
                                 train_top_k=train_top_k, log_every=max(1, args.steps // 50), on_log=on_log)
    ppl_after = evaluate_perplexity(model, eval_stream, args.seqlen, args.batch, progress=True)[0]
    entropy_after = mean_router_entropy(model, eval_rows, args.batch)
    ckpt, family, cfg = read_config(path)
    replace = _trained_tensors(model, family, cfg, args.train)
    kept = {i: list(range(cfg.experts_in(i))) for i in range(cfg.num_layers) if cfg.moe_layers[i]}
    facts = {"finetune": {"top_k": args.top_k, "original_top_k": original_k, "train_top_k": train_top_k,
                          "entropy_weight": args.entropy_weight,
                          "steps": result.steps, "lr": args.lr, "train": args.train}}
    out = write_pruned(ckpt, family, cfg, kept, args.out, facts, top_k=args.top_k, replace=replace)
    summary = {"out": str(out), "top_k": args.top_k, "train_top_k": train_top_k, "steps": result.steps,
               "trained": args.train,
               "tensors_rewritten": len(replace), "held_out_tokens": int(eval_stream.numel()),
               "perplexity_before": ppl_before, "perplexity_after": ppl_after,
               "router_entropy_before": entropy_before, "router_entropy_after": entropy_after}
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"top-{args.top_k} (was top-{original_k}), {result.steps} steps training {args.train} at "
          f"top-{train_top_k}, {len(replace)} tensors rewritten")
    print(f"held-out perplexity at top-{args.top_k}: {ppl_before:.3f} -> {ppl_after:.3f} "
          f"({summary['held_out_tokens']:,} tokens)")
    print(f"router entropy: {entropy_before:.3f} -> {entropy_after:.3f} nats; wrote {out}")
    return 0


def _trained_tensors(model, family, cfg, train_what: str) -> dict[str, torch.Tensor]:
    """Returns {HF tensor name: tensor} of what `train_what` trained, to rewrite in the checkpoint."""
    from ..save import hf_tensors
    from .rewrite import expert_tensor_index

    moe = [i for i in range(cfg.num_layers) if cfg.moe_layers[i]]
    if train_what == "router":  # every family: the router linear (and its bias) under their own names
        out = {}
        for i in moe:
            router = model.layers[i].mlp.router
            out[family.router_name(i)] = router.weight.detach()
            if router.bias is not None:
                out[family.router_bias_name(i)] = router.bias.detach()
        return out
    wanted = {family.router_name(i) for i in moe}
    if train_what == "router+experts":
        wanted |= set(expert_tensor_index(family, cfg))
    return {name: t.detach() for name, t in hf_tensors(model) if train_what == "all" or name in wanted}


def register(sub) -> None:
    """Adds the usage, prune and finetune commands to moekit's CLI."""
    u = sub.add_parser("usage", help="expert usage counts over calibration text (heavy hitters)")
    _add_common(u, "--calib")
    u.set_defaults(func=cmd_usage)

    p = sub.add_parser("prune", help="drop the least-used experts (SEER-MoE heavy-hitter pruning)")
    _add_common(p, "--calib")
    p.add_argument("--out", required=True, help="output model directory (must not exist, or be empty)")
    add_overwrite_arg(p)
    p.add_argument("--keep", type=float, required=True, help="fraction of experts to keep, e.g. 0.75")
    p.add_argument("--criterion", default="hard", choices=("hard", "soft", "random"))
    p.add_argument("--scope", default="layer", choices=("layer", "global"))
    p.set_defaults(func=cmd_prune)

    f = sub.add_parser("finetune", help="fine-tune the router so a smaller top-k keeps quality")
    _add_common(f, "--data")
    f.add_argument("--out", required=True, help="output model directory (must not exist, or be empty)")
    add_overwrite_arg(f)
    f.add_argument("--top-k", type=int, required=True, help="top-k to route with after fine-tuning (written)")
    f.add_argument("--train-top-k", type=int, default=None,
                   help="top-k during fine-tuning (default: the checkpoint's). At top-1 with renormalised "
                        "weights (mixtral) the LM loss gives the router no gradient, so the router trains at "
                        "top-2; what helped top-1 most on the bundled model was --train router+experts "
                        "--train-top-k 1 --entropy-weight 0 (benchmarks/results/README.md)")
    f.add_argument("--entropy-weight", type=float, default=0.01, help="weight of the router-entropy penalty")
    f.add_argument("--steps", type=int, default=100)
    f.add_argument("--lr", type=float, default=1e-3)
    f.add_argument("--train", default="router", choices=("router", "router+experts", "all"),
                   help="which parameters train (default: the routers only)")
    f.set_defaults(func=cmd_finetune)
