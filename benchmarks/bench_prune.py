"""Pruning quality (SEER-MoE): held-out perplexity and KL to the unpruned model at 25% and 50%
of experts dropped, hard vs soft vs random counts, layer vs global scope; top-1 after router
fine-tuning vs top-1 without it vs the original top-k; active parameters and FLOPs per token.

    python benchmarks/bench_prune.py --out benchmarks/results            # bundled model, CPU
    PYTHONPATH=src python3 benchmarks/bench_prune.py --model DIR --device cuda --out $OUT

Text: the .py files of the running interpreter's standard library, split exactly as
examples/train_tiny.py splits them (sha1(path) % 32 == 0 is held out): calibration and
fine-tuning read the training split, every score is on held-out files.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import train_tiny  # noqa: E402  (corpus split shared with the bundled model's training)

import moekit  # noqa: E402
from moekit.calibrate import calibration_tokens  # noqa: E402
from moekit.load import read_config  # noqa: E402
from moekit.prune import select_experts  # noqa: E402
from moekit.prune.finetune import finetune_router, set_top_k  # noqa: E402
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
               keeps: tuple[float, ...] = (0.75, 0.5), deadline: float | None = None) -> list[dict]:
    """Returns one row per (keep, scope, criterion): the pruned model's held-out score and size.
    Entries not started by `deadline` (time.perf_counter()) are returned as skipped."""
    ckpt, family, cfg = read_config(path)
    moe = [i for i in range(cfg.num_layers) if cfg.moe_layers[i]]
    rows = []
    for keep in keeps:
        for scope in ("layer", "global"):
            for criterion in ("hard", "soft", "random"):
                variant = f"drop {1 - keep:.0%} {criterion} {scope}"
                if deadline is not None and time.perf_counter() > deadline:
                    rows.append({"variant": variant, "keep": keep, "criterion": criterion, "scope": scope,
                                 "skipped": "time budget"})
                    continue
                kept_lists = select_experts(usage, keep, criterion, scope, seed=0)
                kept = dict(zip(usage.layers, kept_lists))
                out = write_pruned(ckpt, family, cfg, kept, tmp / "m", {"keep": keep}, overwrite=True)
                model = moekit.load_model(out, device=device, dtype=torch.float32)
                s = score(model, reference, held, batch)
                del model
                counts = [len(kept[i]) for i in moe]
                rows.append({"variant": variant, "keep": keep, "criterion": criterion, "scope": scope,
                             "experts_per_layer": counts, **s, **active(cfg, counts, min(cfg.top_k, min(counts)))})
                print(f"{variant:28s} ppl {s['perplexity']:8.3f}  KL {s['kl_nats']:.4f}", flush=True)
    return rows


def topk_rows(path: Path, reference, held: torch.Tensor, calib: torch.Tensor, device, batch: int,
              finetune_steps: int, entropy_weight: float, lr: float, train_what: str = "router",
              deadline: float | None = None) -> list[dict]:
    """Returns rows for top-1 without fine-tuning, with LM-only fine-tuning, and with the entropy
    term (fine-tuning reads the windows calib [S, T]). Entries not started by `deadline` are skipped."""
    _, _, cfg = read_config(path)
    moe = [i for i in range(cfg.num_layers) if cfg.moe_layers[i]]
    calib_batches = calib.split(batch)

    def batches():
        while True:
            yield from calib_batches

    rows = []
    for label, steps, weight in (("top-1, no fine-tuning", 0, 0.0),
                                 ("top-1, router fine-tuned, no entropy term", finetune_steps, 0.0),
                                 (f"top-1, router fine-tuned, entropy x {entropy_weight}", finetune_steps,
                                  entropy_weight)):
        if deadline is not None and time.perf_counter() > deadline:
            rows.append({"variant": label, "top_k": 1, "finetune_steps": steps, "skipped": "time budget"})
            continue
        model = moekit.load_model(path, device=device, dtype=torch.float32)
        set_top_k(model, 1)
        if steps:
            finetune_router(model, batches(), steps, 1, weight, lr, train_what=train_what,
                            log_every=max(1, steps // 5))
        model.eval()
        s = score(model, reference, held, batch)
        del model
        if steps:
            label += f" [{train_what}, lr {lr:g}]"
        rows.append({"variant": label, "keep": 1.0, "top_k": 1, "finetune_steps": steps, "entropy_weight": weight,
                     "trained": train_what if steps else None,
                     **s, **active(cfg, [cfg.experts_in(i) for i in moe], 1)})
        print(f"{label:44s} ppl {s['perplexity']:8.3f}  KL {s['kl_nats']:.4f}", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None, help="default: the bundled tiny MoE")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--device", default="cpu")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--eval-windows", type=int, default=128, help="held-out windows of --seqlen + 1 tokens")
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--finetune-steps", type=int, default=200)
    p.add_argument("--entropy-weight", type=float, default=0.01)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--train", default="router", choices=("router", "router+experts", "all"),
                   help="what the top-1 fine-tuning trains")
    p.add_argument("--only-topk", action="store_true", help="skip the pruning grid (top-k reduction only)")
    args = p.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    path = Path(args.model) if args.model else moekit.default_model_path()
    tok = moekit.load_tokenizer(path)
    root, files = train_tiny.stdlib_files(None)
    train_docs = [t for r, t in files if not train_tiny.is_held_out(r)]
    held_docs = [t for r, t in files if train_tiny.is_held_out(r)]
    calib = calibration_tokens(train_docs, tok, args.calib_samples, args.seqlen, seed=1)
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
                        "date": time.strftime("%Y-%m-%d")}, "rows": rows}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.only_topk:
            rows += prune_grid(path, usage, reference, held, args.device, args.batch, Path(tmp))
        rows += topk_rows(path, reference, held, calib, args.device, args.batch, args.finetune_steps,
                          args.entropy_weight, args.lr, args.train)
    results["seconds"] = time.perf_counter() - t0
    Path(args.out).mkdir(parents=True, exist_ok=True)
    name = "bench_prune.json" if not args.only_topk else f"bench_prune_topk_{args.train.replace('+', '_')}.json"
    (Path(args.out) / name).write_text(json.dumps(results, indent=1))
    print("\n| variant | held-out ppl | KL to unpruned (nats/token) | expert params | active params / token | GFLOP / token |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['perplexity']:.3f} | {r['kl_nats']:.4f} | {r['expert_params']:,} | "
              f"{r['active_params']:,} | {r['flops_per_token'] / 1e9:.4f} |")


if __name__ == "__main__":
    main()
