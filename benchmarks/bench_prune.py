"""Pruning quality (SEER-MoE): held-out perplexity and KL to the unpruned model at 25% and 50%
of experts dropped, hard vs soft counts vs random (over seeds), layer vs global scope; top-1 after
each fine-tuning recipe (`recipes`) vs top-1 without it vs the original top-k, with a control that
tunes the same way but stays at top-k; active parameters and FLOPs per token.

    python benchmarks/bench_prune.py --out benchmarks/results            # bundled model, CPU
    python benchmarks/bench_prune.py --only-topk --finetune-steps 100 --out benchmarks/results
    PYTHONPATH=src python3 benchmarks/bench_prune.py --model DIR --device cuda --out $OUT

Text: the .py files of the running interpreter's standard library, split exactly as
examples/train_tiny.py splits them (sha1(path) % 32 == 0 is held out): calibration and
fine-tuning read the training split (fine-tuning its own windows, each once by default), every
score is on held-out files.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import common  # also puts src/ on sys.path when moekit is not importable
import torch

sys.path.insert(0, str(common.REPO / "examples"))
import train_tiny  # noqa: E402  (corpus split shared with the bundled model's training)

import moekit  # noqa: E402
from moekit.calibrate import calibration_tokens  # noqa: E402
from moekit.load import read_config  # noqa: E402
from moekit.prune import select_experts  # noqa: E402
from moekit.prune.finetune import finetune_router, mean_router_entropy, set_top_k  # noqa: E402
from moekit.prune.rewrite import write_pruned  # noqa: E402
from moekit.prune.usage import usage_from_calibration  # noqa: E402


@torch.no_grad()
def score(model, reference, windows: torch.Tensor, batch: int) -> dict:
    """Returns held-out perplexity of `model` and its KL(reference || model) per token (nats)."""
    nll, kl, tokens = 0.0, 0.0, 0
    for lo in range(0, windows.shape[0], batch):
        ids = windows[lo:lo + batch].to(model.device)
        logp = torch.log_softmax(model(ids[:, :-1]).float(), -1)
        nll += float(-logp.gather(-1, ids[:, 1:, None]).sum())
        if reference is not None:
            ref = torch.log_softmax(reference(ids[:, :-1]).float(), -1)
            kl += float((ref.exp() * (ref - logp)).sum())
        tokens += ids[:, 1:].numel()
    return {"perplexity": float(torch.tensor(nll / tokens).exp()), "kl_nats": kl / tokens if reference else 0.0,
            "tokens": tokens}


def active(cfg, experts_per_layer: list[int], top_k: int) -> dict:
    """Returns parameters stored and active per token, and matmul FLOPs per token (2 x active)."""
    per_expert = cfg.params_per_expert
    attn = cfg.hidden_size * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    router = sum(experts_per_layer) * cfg.hidden_size
    lm_head = cfg.vocab_size * cfg.hidden_size
    active_params = cfg.num_layers * attn + router + cfg.num_moe_layers * top_k * per_expert + lm_head
    return {"expert_params": sum(experts_per_layer) * per_expert, "active_params": active_params,
            "flops_per_token": 2 * active_params}


def prune_grid(path: Path, usage, reference, held: torch.Tensor, device, batch: int, tmp: Path,
               keeps: tuple[float, ...] = (0.75, 0.5), random_seeds: tuple[int, ...] = (0, 1, 2),
               deadline: float | None = None) -> list[dict]:
    """Returns one row per (keep, scope, criterion): the pruned model's held-out score and size.
    `random` is scored once per seed of random_seeds: its row holds the mean perplexity and KL,
    the per-seed values and their min and max. Entries not started by `deadline`
    (time.perf_counter()) are returned as skipped (a random row keeps the seeds it finished)."""
    ckpt, family, cfg = read_config(path)
    moe = [i for i in range(cfg.num_layers) if cfg.moe_layers[i]]
    rows = []
    for keep in keeps:
        for scope in ("layer", "global"):
            for criterion in ("hard", "soft", "random"):
                variant = f"drop {1 - keep:.0%} {criterion} {scope}"
                row = {"variant": variant, "keep": keep, "criterion": criterion, "scope": scope}
                scores = []
                for seed in random_seeds if criterion == "random" else (0,):
                    if deadline is not None and time.perf_counter() > deadline:
                        break
                    kept_lists = select_experts(usage, keep, criterion, scope, seed=seed)
                    kept = dict(zip(usage.layers, kept_lists))
                    out = write_pruned(ckpt, family, cfg, kept, tmp / "m", {"keep": keep}, overwrite=True)
                    model = moekit.load_model(out, device=device, dtype=torch.float32)
                    scores.append(score(model, reference, held, batch))
                    del model
                    counts = [len(kept[i]) for i in moe]
                    row.update(experts_per_layer=counts, **active(cfg, counts, min(cfg.top_k, min(counts))))
                if not scores:
                    rows.append({**row, "skipped": "time budget"})
                    continue
                ppl = [x["perplexity"] for x in scores]
                kl = [x["kl_nats"] for x in scores]
                row.update(perplexity=sum(ppl) / len(ppl), kl_nats=sum(kl) / len(kl), tokens=scores[0]["tokens"])
                if criterion == "random":
                    row.update(seeds=list(random_seeds[:len(scores)]), perplexity_by_seed=ppl, kl_by_seed=kl,
                               perplexity_min=min(ppl), perplexity_max=max(ppl))
                rows.append(row)
                print(f"{variant:28s} ppl {ppl_cell(row):>24s}  KL {row['kl_nats']:.4f}", flush=True)
    return rows


def ppl_cell(row: dict) -> str:
    """Returns a row's perplexity as text: `mean (min-max, N seeds)` for a row scored over seeds."""
    if "perplexity_by_seed" in row and len(row["perplexity_by_seed"]) > 1:
        return (f"{row['perplexity']:.3f} ({row['perplexity_min']:.3f}-{row['perplexity_max']:.3f}, "
                f"{len(row['perplexity_by_seed'])} seeds)")
    return f"{row['perplexity']:.3f}"


@dataclass(frozen=True)
class TopkRecipe:
    """One way to reach a smaller top-k: fine-tune `train` at `train_top_k` with LM + entropy_weight *
    router entropy for `steps` steps at `lr`, then route at `top_k` (steps 0: no fine-tuning)."""

    name: str  # short key for --recipes
    steps: int = 0
    entropy_weight: float = 0.0
    train: str = "router"  # router | router+experts | all
    train_top_k: int | None = None  # None: the checkpoint's top-k
    lr: float = 1e-3
    top_k: int = 1  # routed after fine-tuning (the checkpoint's top-k: a control for what tuning alone does)

    def label(self, model_top_k: int) -> str:
        if not self.steps:
            return f"top-{self.top_k}, no fine-tuning"
        k = self.train_top_k or model_top_k
        entropy = f"entropy x {self.entropy_weight:g}" if self.entropy_weight else "no entropy"
        return f"top-{self.top_k}, {self.train} tuned at top-{k}, {entropy}, lr {self.lr:g}, {self.steps} steps"


def recipes(steps: int) -> dict[str, TopkRecipe]:
    """Returns the top-1 recipes by name, fine-tuning for `steps` steps."""
    return {r.name: r for r in (
        TopkRecipe("none"),
        # the experts learn to work alone (the router gets no LM gradient at top-1 and stays as it is)
        TopkRecipe("experts-k1", steps, 0.0, "router+experts", 1, 3e-4),
        # control: the same expert tuning kept at top-2 shows how much of a gain is adaptation to the text
        TopkRecipe("control-experts-k2", steps, 0.0, "router+experts", 2, 3e-4, top_k=2),
        # SEER-MoE: the router (which has a gradient at top-2) concentrates its mass, then routes at top-1
        TopkRecipe("router-k2-e0.05", steps, 0.05, "router", 2),
        TopkRecipe("router-k2-e0.01", steps, 0.01, "router", 2),
        TopkRecipe("router-k2", steps, 0.0, "router", 2),
        TopkRecipe("experts-k2-e0.05", steps, 0.05, "router+experts", 2, 3e-4),
        # the old recipe: at top-1 only the entropy term moves the router (a warning says so)
        TopkRecipe("router-k1-e0.01", steps, 0.01, "router", 1),
    )}


def topk_rows(path: Path, reference, held: torch.Tensor, tune: torch.Tensor, device, batch: int,
              chosen: list[TopkRecipe], deadline: float | None = None) -> list[dict]:
    """Returns one row per recipe: the model's held-out score after the recipe (fine-tuning
    reads the windows tune [S, T] in order, again from the start when they run out). Recipes not
    started by `deadline` are returned as skipped."""
    _, _, cfg = read_config(path)
    moe = [i for i in range(cfg.num_layers) if cfg.moe_layers[i]]
    tune_batches = tune.split(batch)

    def batches():
        while True:
            yield from tune_batches

    rows = []
    for recipe in chosen:
        label = recipe.label(cfg.top_k)
        facts = {"variant": label, "recipe": recipe.name, "keep": 1.0, "top_k": recipe.top_k,
                 "finetune_steps": recipe.steps, "finetune_tokens": recipe.steps * batch * tune.shape[1],
                 "finetune_epochs": recipe.steps * batch / tune.shape[0], "entropy_weight": recipe.entropy_weight,
                 "trained": recipe.train if recipe.steps else None,
                 "train_top_k": (recipe.train_top_k or cfg.top_k) if recipe.steps else None, "lr": recipe.lr}
        if deadline is not None and time.perf_counter() > deadline:
            rows.append({**facts, "skipped": "time budget"})
            continue
        t0 = time.perf_counter()
        model = moekit.load_model(path, device=device, dtype=torch.float32)
        set_top_k(model, recipe.top_k)
        if recipe.steps:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the router-k1 recipe is here to show what it warns about
                finetune_router(model, batches(), recipe.steps, recipe.top_k, recipe.entropy_weight, recipe.lr,
                                train_what=recipe.train, train_top_k=recipe.train_top_k,
                                log_every=max(1, recipe.steps // 5))
        model.eval()
        entropy = mean_router_entropy(model, held[:, :-1], batch)
        s = score(model, reference, held, batch)
        del model
        rows.append({**facts, **s, "router_entropy_nats": entropy, "seconds": time.perf_counter() - t0,
                     **active(cfg, [cfg.experts_in(i) for i in moe], recipe.top_k)})
        print(f"{label:70s} ppl {s['perplexity']:8.3f}  KL {s['kl_nats']:.4f}  entropy {entropy:.3f}  "
              f"{rows[-1]['seconds']:.0f} s", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None, help="default: the bundled tiny MoE")
    p.add_argument("--out", default=str(common.RESULTS_DIR))
    p.add_argument("--device", default="cpu")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--eval-windows", type=int, default=128, help="held-out windows of --seqlen + 1 tokens")
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--finetune-steps", type=int, default=200)
    p.add_argument("--finetune-samples", type=int, default=None,
                   help="training-split windows the top-k recipes read (default: steps x batch, each read once; "
                        "re-reading a small set for many epochs overfits the experts)")
    p.add_argument("--recipes", default=None,
                   help="comma-separated top-1 recipes to run (default: all of " + ", ".join(recipes(0)) + ")")
    p.add_argument("--random-seeds", type=int, default=3, help="seeds of the random-pruning rows (mean, min, max)")
    p.add_argument("--only-topk", action="store_true", help="skip the pruning grid (top-k reduction only)")
    args = p.parse_args()
    known = recipes(args.finetune_steps)
    names = args.recipes.split(",") if args.recipes else list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        p.error(f"--recipes: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    path = Path(args.model) if args.model else moekit.default_model_path()
    tok = moekit.load_tokenizer(path)
    root, files = train_tiny.stdlib_files(None)
    train_docs = [t for r, t in files if not train_tiny.is_held_out(r)]
    held_docs = [t for r, t in files if train_tiny.is_held_out(r)]
    calib = calibration_tokens(train_docs, tok, args.calib_samples, args.seqlen, seed=1)
    tune = calibration_tokens(train_docs, tok, args.finetune_samples or args.finetune_steps * args.batch,
                              args.seqlen, seed=3)
    held = calibration_tokens(held_docs, tok, args.eval_windows, args.seqlen + 1, seed=2)
    ckpt, family, cfg = read_config(path)
    reference = moekit.load_model(path, device=args.device, dtype=torch.float32)
    base = score(reference, None, held, args.batch)
    moe = [i for i in range(cfg.num_layers) if cfg.moe_layers[i]]
    rows = [{"variant": f"unpruned top-{cfg.top_k}", "keep": 1.0, **base,
             **active(cfg, [cfg.experts_in(i) for i in moe], cfg.top_k)}]
    print(f"unpruned: perplexity {base['perplexity']:.3f} on {base['tokens']:,} held-out tokens", flush=True)
    usage = usage_from_calibration(path, calib, args.device, args.batch)
    results = {"meta": {"model": str(path), "python_stdlib": platform.python_version(), "device": args.device,
                        "torch": torch.__version__, "args": vars(args), "calibration_tokens": usage.tokens,
                        "date": time.strftime("%Y-%m-%d"), "run": common.run_meta(args, args.device)}, "rows": rows}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.only_topk:
            rows += prune_grid(path, usage, reference, held, args.device, args.batch, Path(tmp),
                               random_seeds=tuple(range(args.random_seeds)))
        rows += topk_rows(path, reference, held, tune, args.device, args.batch, [known[n] for n in names])
    results["seconds"] = time.perf_counter() - t0
    common.write_json(results, args.out, "bench_prune" if not args.only_topk else "bench_prune_topk")
    print("\n| variant | held-out ppl | KL to unpruned (nats/token) | expert params | active params / token "
          "| MFLOP / token |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {ppl_cell(r)} | {r['kl_nats']:.4f} | {r['expert_params']:,} | "
              f"{r['active_params']:,} | {r['flops_per_token'] / 1e6:.2f} |")
    print("MFLOP / token: 2 x active parameters (the weight matmuls: attention projections, router, "
          "active experts, LM head); attention scores and softmax are not counted.")


if __name__ == "__main__":
    main()
