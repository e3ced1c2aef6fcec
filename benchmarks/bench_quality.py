"""Quality studies on a MoE larger than the bundled one, trained in the same run by the project's code:
compression (GPTQ vs RTN at ternary/2/3/4 bits), pruning (25%/50% dropped, hard/soft counts and random
over 3 seeds, per layer/global; top-1 without fine-tuning, after router fine-tuning at top-2 with an
entropy term, after expert fine-tuning at top-1, vs top-2 and vs the same expert tuning kept at top-2;
FLOPs per token) and next-layer prefetch accuracy (speculative vs a trained pre-gate vs none).

    PYTHONPATH=src python3 benchmarks/bench_quality.py --out $OUT            # H200, ~9 minutes
    PYTHONPATH=src python3 benchmarks/bench_quality.py --small --out /tmp/q  # CPU smoke test, 1-3 minutes

The GPU machine keeps nothing between calls, so one run does everything: (1) corpus = the running
interpreter's stdlib .py files (keyed by their path relative to the stdlib, so its split is exactly
examples/train_tiny.py's) plus site-packages .py files (keyed "site-packages/<relative path>"), files
over 200 KB and non-UTF-8 files left out, exact duplicates dropped, site-packages sampled in a seeded
hash order up to --max-corpus-mb; a file is held out when sha1(key) % 32 == 0, and neither the
tokenizer nor training nor calibration sees held-out files; (2) a byte-level BPE and a mixtral-family
MoE trained with moekit.train (bf16 autocast) until the time budget says stop, saved in bf16 to a
temporary folder; (3) the studies, every score on the same held-out windows; (4) bench_quality.json
in --out after every phase, markdown tables printed last. Phases stop by time: an entry not started
before its phase's deadline is recorded as skipped, and a watchdog writes what there is and exits
before --budget-s + 15 s (counted from the interpreter's start).
"""

from __future__ import annotations

import time

T_PROCESS = time.perf_counter()  # the budget counts from here: imports (torch, ~5 s) included

import argparse
import hashlib
import os
import platform
import shutil
import site
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))
sys.path.insert(0, str(HERE))
import bench_prune  # noqa: E402  (score, active, prune_grid, recipes, topk_rows)
import common  # noqa: E402  (also puts src/ on sys.path when moekit is not importable)
from common import git_commit, log  # noqa: E402
import train_tiny  # noqa: E402  (file reading, held-out rule, tokenizer, batches)

import moekit  # noqa: E402
from moekit.calibrate import sample_windows  # noqa: E402
from moekit.config import ModelConfig, RopeConfig  # noqa: E402
from moekit.model import MoEModel  # noqa: E402
from moekit.save import save_model  # noqa: E402
from moekit.train import init_weights, print_log, train  # noqa: E402

SITE_PREFIX = "site-packages/"
GRIDS = ("ternary", "2", "3", "4")
# top-1 recipes (bench_prune.recipes), most wanted first: the phase deadline cuts from the end
TOPK_RECIPES = ("none", "experts-k1", "control-experts-k2", "router-k2-e0.05", "router-k2-e0.01", "router-k2",
                "experts-k2-e0.05")
RANDOM_SEEDS = (0, 1, 2)  # random pruning is scored once per seed: mean, min, max


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for bench_quality.json (the model goes to a temp folder)")
    p.add_argument("--small", action="store_true", help="tiny corpus, tiny model, few steps, CPU: a smoke test")
    p.add_argument("--device", default=None, help="default: cuda when available (cpu with --small)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-clock budget of the run (default 540; 150 with --small)")
    p.add_argument("--study-reserve-s", type=float, default=None,
                   help="seconds kept for the studies after training (default 235; 90 with --small)")
    p.add_argument("--max-corpus-mb", type=float, default=None, help="text read at most (default 300; 3 with --small)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def settings(args: argparse.Namespace) -> dict:
    """Returns every size, count and step setting of the run (one place for full and --small)."""
    if args.small:
        return dict(device=args.device or "cpu", budget_s=args.budget_s or 150.0,
                    study_reserve_s=args.study_reserve_s or 90.0,
                    max_corpus_bytes=int((args.max_corpus_mb or 3) * 1e6), max_stdlib_files=150,
                    tokenizer_sample_bytes=2_000_000, tokenize_budget_s=20.0, vocab=512,
                    hidden=128, layers=3, heads=4, kv_heads=2, head_dim=32, experts=8, top_k=2, expert_ffn=128,
                    seqlen=128, batch=8, lr=3e-3, weight_decay=0.1, warmup=10, max_steps=40, train_max_s=40.0,
                    eval_windows=16, calib_samples=16, prune_calib_samples=16, finetune_steps=10,
                    pregate_tokens=4096, pregate_steps=60, score_batch=8)
    return dict(device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
                budget_s=args.budget_s or 540.0, study_reserve_s=args.study_reserve_s or 235.0,
                max_corpus_bytes=int((args.max_corpus_mb or 300) * 1e6), max_stdlib_files=None,
                tokenizer_sample_bytes=48_000_000, tokenize_budget_s=45.0, vocab=8192,
                # ~61M parameters (50M in experts, ~15M active per token): 8x the bundled model;
                # 7 next-layer pairs of 16 experts for the pre-gates; rows of 512 / 256 for GPTQ
                hidden=512, layers=8, heads=8, kv_heads=4, head_dim=64, experts=16, top_k=2, expert_ffn=256,
                seqlen=512, batch=64, lr=2e-3, weight_decay=0.1, warmup=100, max_steps=100_000, train_max_s=260.0,
                eval_windows=128, calib_samples=128, prune_calib_samples=256, finetune_steps=200,
                pregate_tokens=65536, pregate_steps=300, score_batch=16)


# ---------------------------------------------------------------- corpus


def site_roots(stdlib: Path) -> list[Path]:
    """Returns the interpreter's existing site-packages folders, outermost first, without repeats."""
    paths = sysconfig.get_paths()
    found = [paths.get("purelib"), paths.get("platlib"), *site.getsitepackages()]
    if site.ENABLE_USER_SITE:
        found.append(site.getusersitepackages())
    roots: list[Path] = []
    for f in found:
        if f and Path(f).is_dir() and Path(f).resolve() not in roots and Path(f).resolve() != stdlib.resolve():
            roots.append(Path(f).resolve())
    return roots


def order_key(key: str, seed: int) -> str:
    # a seeded order unrelated to the held-out rule (that one hashes the key alone)
    return hashlib.sha1(f"order{seed}:{key}".encode()).hexdigest()


def read_corpus(max_bytes: int, max_stdlib_files: int | None, seed: int) -> tuple[list[tuple[str, str]], dict]:
    """Returns ([(key, text)] sorted by key, facts): all of the stdlib, then site-packages files in
    a seeded hash order until max_bytes of text, exact duplicates (same text) kept once."""
    stdlib_root, stdlib = train_tiny.stdlib_files(max_stdlib_files)
    files, seen, total = [], set(), 0
    duplicates = 0

    def add(key: str, text: str) -> None:
        nonlocal total, duplicates
        digest = hashlib.sha1(text.encode()).digest()
        if digest in seen:
            duplicates += 1
            return
        seen.add(digest)
        files.append((key, text))
        total += len(text.encode())

    for key, text in stdlib:
        add(key, text)
    stdlib_bytes = total
    roots = site_roots(stdlib_root)
    candidates = []
    for root in roots:
        skip = ("__pycache__",) + tuple(r.name for r in roots if r != root and r.is_relative_to(root))
        candidates += [(SITE_PREFIX + q.relative_to(root).as_posix(), q) for q in train_tiny.python_paths(root, skip)]
    candidates = sorted(dict(candidates).items(), key=lambda kv: order_key(kv[0], seed))
    for key, path in candidates:
        if total >= max_bytes:
            break
        text = train_tiny.read_source(path)
        if text is not None:
            add(key, text)
    files.sort(key=lambda kv: kv[0])
    facts = {"stdlib": str(stdlib_root), "site_packages": [str(r) for r in roots], "files": len(files),
             "bytes": total, "stdlib_bytes": stdlib_bytes, "site_candidates": len(candidates),
             "duplicates_dropped": duplicates, "max_bytes": max_bytes}
    return files, facts


def encode(tok, texts: list[str], eos_id: int, deadline: float | None = None,
           chunk: int = 512) -> tuple[torch.Tensor, int]:
    """Returns (token ids [M] of texts each followed by EOS, texts encoded): chunk by chunk, stopping
    at `deadline` (pass texts in an unbiased order so that a partial stream is a fair sample)."""
    parts, done = [], 0
    for lo in range(0, len(texts), chunk):
        if deadline is not None and time.perf_counter() > deadline and parts:
            break
        for e in tok.encode_batch(texts[lo:lo + chunk], add_special_tokens=False):
            parts.append(np.array(e.ids + [eos_id], dtype=np.int64))
        done = min(len(texts), lo + chunk)
    return torch.from_numpy(np.concatenate(parts)), done


# ---------------------------------------------------------------- model


def model_config(s: dict, vocab_size: int, eos_id: int) -> ModelConfig:
    """Returns the mixtral-family config of the studied model."""
    return ModelConfig(
        family="mixtral", vocab_size=vocab_size, hidden_size=s["hidden"], num_layers=s["layers"],
        num_heads=s["heads"], num_kv_heads=s["kv_heads"], head_dim=s["head_dim"], num_experts=s["experts"],
        top_k=s["top_k"], expert_ffn=s["expert_ffn"], moe_layers=(True,) * s["layers"], rms_norm_eps=1e-5,
        rope=RopeConfig(theta=10000.0), max_position_embeddings=1024, tie_word_embeddings=True,
        eos_token_ids=(eos_id,), dtype="bfloat16")


# ---------------------------------------------------------------- studies


def recall_at(pred_logits: torch.Tensor, target_logits: torch.Tensor, k_true: int, k_pred: int) -> float:
    """Returns the mean share of each token's true top-k_true experts among the predicted top-k_pred."""
    pred = torch.topk(pred_logits, k_pred, dim=-1).indices  # [M, k_pred]
    true = torch.topk(target_logits, k_true, dim=-1).indices  # [M, k_true]
    return (true[:, :, None] == pred[:, None, :]).any(-1).float().mean().item()


def prefetch_study(model, train_ids: torch.Tensor, held: torch.Tensor, s: dict) -> dict:
    """Returns next-layer routing recall on held-out windows held [W, T] of: none, the static most-used
    experts, layer i's own routing, speculative (next router on x_i), a pre-gate trained on train_ids
    (train_pregates), and the oracle; at k (= top-k, what a prefetch of k experts covers) and 2k."""
    from moekit.offload.pregate import collect_routing, train_pregates
    from moekit.offload.predictors import speculative_weights

    t0 = time.perf_counter()
    weights, report = train_pregates(model, train_ids[: s["pregate_tokens"]], steps=s["pregate_steps"],
                                     seqlen=256, max_tokens=s["pregate_tokens"])
    train_s = time.perf_counter() - t0
    cfg = model.config
    moe = [i for i, m in enumerate(cfg.moe_layers) if m]
    next_of = dict(zip(moe, moe[1:]))
    spec = {i: w.float().cpu() for i, w in speculative_weights(model, next_of).items()}
    xs, logits = collect_routing(model, held.reshape(-1), seqlen=held.shape[1], max_tokens=held.numel())
    k = cfg.top_k
    layers = {}
    for i, j in next_of.items():
        counts = torch.tensor(report.counts[j], dtype=torch.float32)  # training-text use of layer j's experts
        static = counts[None].expand(xs[i].shape[0], -1)
        row = {"next": j}
        for kp, tag in ((k, "k"), (2 * k, "2k")):
            row[f"static_{tag}"] = recall_at(static, logits[j], k, kp)
            row[f"previous_layer_{tag}"] = recall_at(logits[i], logits[j], k, kp)
            row[f"speculative_{tag}"] = recall_at(xs[i] @ spec[i].T, logits[j], k, kp)
            row[f"pregate_{tag}"] = recall_at(xs[i] @ weights[i].T, logits[j], k, kp)
        layers[i] = row
    keys = [key for key in next(iter(layers.values())) if key != "next"]
    mean = {key: sum(r[key] for r in layers.values()) / len(layers) for key in keys}
    mean.update({"none_k": 0.0, "none_2k": 0.0, "oracle_k": 1.0, "oracle_2k": 1.0})
    return {"held_tokens": int(xs[moe[0]].shape[0]), "pregate_train_tokens": report.tokens,
            "pregate_steps": s["pregate_steps"], "pregate_train_s": train_s,
            "pregate_report": {str(i): v for i, v in report.layers.items()},
            "layers": {str(i): v for i, v in layers.items()}, "mean_recall": mean}


def compression_study(path: Path, reference, held: torch.Tensor, calib: torch.Tensor, device: str, batch: int,
                      tmp: Path, deadline: float, rows: list, on_row) -> list[dict]:
    """Returns `rows` after appending one row per (grid, method): held-out perplexity and KL to the
    bf16 model, bits per expert parameter, compression time (on_row() after each). GPTQ reads
    calib [S, T]; RTN needs none."""
    from moekit.quant.compress import compress
    from moekit.quant.config import QuantConfig

    for bits in GRIDS:
        for method in ("gptq", "rtn"):
            row = {"bits": bits, "method": method}
            if time.perf_counter() > deadline:
                rows.append({**row, "skipped": "time budget"})
                continue
            dst = tmp / f"q-{method}-{bits}"
            try:
                r = compress(path, dst, QuantConfig(bits=bits, method=method), calib if method == "gptq" else None,
                             device=device, progress=False, overwrite=True)
                model = moekit.load_model(dst, device=device, dtype=torch.float32)
                row.update(bench_prune.score(model, reference, held, batch))
                del model
                row.update(bits_per_expert_param=r.bits_per_expert_param, entropy_bits=r.entropy_bits,
                           failed_factorisations=r.failed_factorisations, compress_s=r.seconds)
                log(f"  {method} {bits}: ppl {row['perplexity']:.3f}, KL {row['kl_nats']:.4f}, "
                    f"{r.bits_per_expert_param:.3f} bits/param, {r.seconds:.1f} s")
            except Exception as e:  # one grid failing must not lose the others
                row["error"] = f"{type(e).__name__}: {e}"
                log(f"  {method} {bits}: FAILED {row['error']}")
            shutil.rmtree(dst, ignore_errors=True)
            rows.append(row)
            on_row()
    return rows


# ---------------------------------------------------------------- report


def markdown(res: dict) -> str:
    """Returns the result tables as markdown."""
    out = []
    m, t = res.get("model", {}), res.get("training", {})
    if m:
        out.append(f"Model: mixtral-family, {m['params']:,} params ({m['expert_params']:,} in experts, "
                   f"{m['active_params']:,} active/token), hidden {m['hidden']}, {m['layers']} layers, "
                   f"{m['experts']} experts top-{m['top_k']}, expert ffn {m['expert_ffn']}, vocab {m['vocab']}.")
    if t:
        out.append(f"Training: {t['steps']} steps x {t['batch']} x {t['seqlen']} = {t['tokens_seen']:,} tokens "
                   f"({t['epochs']:.2f} epochs of {t['train_tokens']:,}) in {t['seconds']:.0f} s ({t['stop_reason']}), "
                   f"final train loss {t['final_loss']:.3f}.")
    d = res.get("dense")
    if d:
        out.append(f"Held-out: {d['tokens']:,} tokens; bf16 perplexity {d['perplexity']:.3f}.")

    def ppl_cells(r: dict) -> str:
        if "perplexity" in r:
            return f"{bench_prune.ppl_cell(r)} | {r['kl_nats']:.4f}"
        return f"{r.get('skipped') or r.get('error', '-')} | -"

    comp = res.get("compression")
    if comp:
        out += ["", "| experts | held-out ppl | KL to bf16 (nats/token) | bits / expert param | compress s |",
                "|---|---|---|---|---|"]
        if d:
            out.append(f"| bf16 | {d['perplexity']:.3f} | 0 | 16 | - |")
        for r in comp:
            bits = f"{r['bits_per_expert_param']:.3f}" if "bits_per_expert_param" in r else "-"
            secs = f"{r['compress_s']:.1f}" if "compress_s" in r else "-"
            out.append(f"| {r['method'].upper()} {r['bits']} | {ppl_cells(r)} | {bits} | {secs} |")
    prune = res.get("pruning", []) + res.get("topk", [])
    if prune:
        out += ["", "| variant | held-out ppl | KL to unpruned (nats/token) | expert params | active params / token "
                "| MFLOP / token | router entropy (nats) |", "|---|---|---|---|---|---|---|"]
        for r in prune:
            ep = f"{r['expert_params']:,}" if "expert_params" in r else "-"
            ap = f"{r['active_params']:,}" if "active_params" in r else "-"
            fl = f"{r['flops_per_token'] / 1e6:.1f}" if "flops_per_token" in r else "-"
            en = f"{r['router_entropy_nats']:.3f}" if "router_entropy_nats" in r else "-"
            out.append(f"| {r['variant']} | {ppl_cells(r)} | {ep} | {ap} | {fl} | {en} |")
        out.append("Random rows: mean over seeds (min-max). MFLOP / token: 2 x active parameters, the weight "
                   "matmuls (attention projections, router, active experts, LM head); attention scores are not "
                   "counted. Router entropy: mean over held-out tokens and layers after the recipe.")
    pf = res.get("prefetch")
    if pf and "mean_recall" in pf:
        mr = pf["mean_recall"]
        out += ["", f"Next-layer prefetch recall on {pf['held_tokens']:,} held-out tokens (mean over layer pairs; "
                f"pre-gate trained {pf['pregate_steps']} steps on {pf['pregate_train_tokens']:,} training tokens):", "",
                "| predictor | recall, k experts prefetched | recall, 2k prefetched |", "|---|---|---|"]
        for name in ("none", "static", "previous_layer", "speculative", "pregate", "oracle"):
            out.append(f"| {name.replace('_', ' ')} | {mr[name + '_k']:.3f} | {mr[name + '_2k']:.3f} |")
    out.append("\nphase seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in res.get("phase_seconds", {}).items()))
    return "\n".join(out)


# ---------------------------------------------------------------- main


def main() -> None:
    args = parse_args()
    s = settings(args)
    t_start = T_PROCESS
    end = t_start + s["budget_s"]
    device = torch.device(s["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda asked for, but this PyTorch sees no CUDA device; use --device cpu")
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {"meta": {"command": " ".join(["python3", *sys.argv]), "settings": s, "date": time.strftime("%Y-%m-%d"),
                          "python": platform.python_version(), "torch": torch.__version__,
                          "commit": git_commit(), "dirty": common.git_dirty(),
                          "device_name": common.device_name(device), "device_info": common.device_info(device)},
                 "phase_seconds": {}}
    lock = threading.Lock()

    def save() -> None:
        with lock:
            common.write_json(res, out, "bench_quality")

    def watchdog() -> None:  # the hard stop: whatever is measured gets written and printed
        res["meta"]["stopped_by_watchdog"] = True
        try:
            save()
            print("\nWATCHDOG: budget exceeded, stopping\n" + markdown(res), flush=True)
        finally:
            os._exit(0)

    timer = threading.Timer(end + 15.0 - time.perf_counter(), watchdog)
    timer.daemon = True
    timer.start()
    phase_t = [time.perf_counter()]

    def phase_done(name: str) -> None:
        now = time.perf_counter()
        res["phase_seconds"][name] = now - phase_t[0]
        phase_t[0] = now
        save()

    def study(name: str, fn) -> None:  # one study failing must not lose the others
        try:
            res[name] = fn()
        except Exception as e:
            res[name + "_error"] = f"{type(e).__name__}: {e}"
            log(f"{name}: FAILED {res[name + '_error']}")
        phase_done(name)

    # (1) corpus and tokenizer
    files, facts = read_corpus(s["max_corpus_bytes"], s["max_stdlib_files"], args.seed)
    train_files = [(k, t) for k, t in files if not train_tiny.is_held_out(k)]
    held_texts = [t for k, t in files if train_tiny.is_held_out(k)]
    if not held_texts:
        sys.exit(f"none of the {len(files)} files is held out; raise --max-corpus-mb")
    log(f"corpus: {facts['files']} files, {facts['bytes'] / 1e6:.1f} MB ({facts['stdlib_bytes'] / 1e6:.1f} MB stdlib), "
        f"{len(held_texts)} held out")
    shuffled = [t for _, t in sorted(train_files, key=lambda kv: order_key(kv[0], args.seed + 1))]
    sample, n = [], 0
    for text in shuffled:  # the tokenizer learns from a seeded sample of the training files
        if n >= s["tokenizer_sample_bytes"]:
            break
        sample.append(text)
        n += len(text)
    tok = train_tiny.train_tokenizer(sample, s["vocab"])
    eos_id = tok.token_to_id(train_tiny.EOS)
    log(f"tokenizer: vocab {tok.get_vocab_size()} from {n / 1e6:.1f} MB")
    held_ids, _ = encode(tok, held_texts, eos_id)
    train_ids, encoded = encode(tok, shuffled, eos_id, deadline=time.perf_counter() + s["tokenize_budget_s"])
    res["corpus"] = {**facts, "train_files": len(train_files), "held_files": len(held_texts),
                     "train_files_encoded": encoded, "train_tokens": int(train_ids.numel()),
                     "held_tokens": int(held_ids.numel()), "tokenizer_sample_bytes": n,
                     "bytes_per_token": sum(len(t) for t in shuffled[:encoded]) / max(1, train_ids.numel())}
    log(f"tokens: {train_ids.numel():,} train ({encoded}/{len(train_files)} files), {held_ids.numel():,} held out")
    phase_done("corpus_tokenizer")

    # (2) train and save
    cfg = model_config(s, tok.get_vocab_size(), eos_id)
    model = init_weights(MoEModel(cfg), seed=args.seed).to(device)
    params = sum(p.numel() for p in model.parameters())
    res["model"] = {"params": params, "expert_params": cfg.params_per_expert * s["experts"] * s["layers"],
                    "active_params": bench_prune.active(cfg, [s["experts"]] * s["layers"], s["top_k"])["active_params"],
                    "hidden": s["hidden"], "layers": s["layers"], "experts": s["experts"], "top_k": s["top_k"],
                    "expert_ffn": s["expert_ffn"], "vocab": cfg.vocab_size, "heads": [s["heads"], s["kv_heads"]],
                    "head_dim": s["head_dim"]}
    train_s = min(s["train_max_s"], end - s["study_reserve_s"] - time.perf_counter())
    log(f"model: {params:,} parameters; training for at most {train_s:.0f} s")
    if train_s < 10:
        sys.exit(f"only {train_s:.0f} s left to train; raise --budget-s or lower --study-reserve-s")
    result = train(model, train_tiny.batches(train_ids, s["seqlen"], s["batch"], args.seed, device), s["max_steps"],
                   s["lr"], warmup_steps=s["warmup"], weight_decay=s["weight_decay"],
                   aux_loss_coef=train_tiny.AUX_LOSS_COEF,
                   log_every=max(1, min(100, s["max_steps"] // 4)), on_log=print_log, max_seconds=train_s)
    res["training"] = {"steps": result.steps, "batch": s["batch"], "seqlen": s["seqlen"], "tokens_seen": result.tokens,
                       "train_tokens": int(train_ids.numel()), "epochs": result.tokens / train_ids.numel(),
                       "seconds": result.seconds, "stop_reason": result.stop_reason, "final_loss": result.final_loss,
                       "lr": s["lr"], "weight_decay": s["weight_decay"], "history": result.history}
    tmp = Path(tempfile.mkdtemp(prefix="bench_quality_"))
    path = tmp / "model"
    save_model(model, path, dtype=torch.bfloat16, generation_config={"eos_token_id": eos_id, "pad_token_id": eos_id},
               extra_files=train_tiny.tokenizer_files(tok, cfg.max_position_embeddings))
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    phase_done("train_save")

    # (3) studies, all on the same held-out windows
    try:
        held = sample_windows(held_ids, s["eval_windows"], s["seqlen"] + 1, seed=2)  # [W, T + 1]
        calib = sample_windows(train_ids, s["calib_samples"], s["seqlen"], seed=0)  # [S, T] GPTQ
        prune_calib = sample_windows(train_ids, s["prune_calib_samples"], s["seqlen"], seed=1)  # usage counts
        # top-k recipes read each window once: 12 epochs over prune_calib overfitted the experts on the CPU
        tune = sample_windows(train_ids, s["finetune_steps"] * s["score_batch"], s["seqlen"], seed=3)
        reference = moekit.load_model(path, device=device, dtype=torch.float32)
        res["dense"] = bench_prune.score(reference, None, held, s["score_batch"])
        log(f"bf16 model: held-out perplexity {res['dense']['perplexity']:.3f} on {res['dense']['tokens']:,} tokens")
        phase_done("dense_eval")

        remaining = lambda: end - time.perf_counter()  # noqa: E731
        study("prefetch", lambda: prefetch_study(reference, train_ids, held, s))
        if "prefetch" in res:
            log(f"prefetch recall: { {k: round(v, 3) for k, v in res['prefetch']['mean_recall'].items()} }")

        def pruning() -> list[dict]:
            from moekit.prune.usage import usage_from_calibration

            deadline = time.perf_counter() + 0.3 * remaining()
            usage = usage_from_calibration(path, prune_calib, device, s["score_batch"])
            return bench_prune.prune_grid(path, usage, reference, held, device, s["score_batch"], tmp,
                                          random_seeds=RANDOM_SEEDS, deadline=deadline)

        study("pruning", pruning)

        def topk() -> list[dict]:
            from moekit.prune.finetune import mean_router_entropy

            # half of what is left: 7 recipes took ~100 s on the H200 (200 steps ~13 s each), compression ~40 s
            deadline = time.perf_counter() + 0.5 * remaining()
            top = [{"variant": f"unpruned top-{cfg.top_k}", "top_k": cfg.top_k, **res["dense"],
                    "router_entropy_nats": mean_router_entropy(reference, held[:, :-1], s["score_batch"]),
                    **bench_prune.active(cfg, [s["experts"]] * s["layers"], cfg.top_k)}]
            known = bench_prune.recipes(s["finetune_steps"])
            return top + bench_prune.topk_rows(path, reference, held, tune, device, s["score_batch"],
                                               [known[n] for n in TOPK_RECIPES], deadline=deadline)

        study("topk", topk)
        res["compression"] = []
        study("compression", lambda: compression_study(path, reference, held, calib, device, s["score_batch"], tmp,
                                                       end - 15.0, rows=res["compression"], on_row=save))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res["meta"]["wall_s"] = time.perf_counter() - t_start
    save()
    timer.cancel()
    print("\n" + markdown(res), flush=True)


if __name__ == "__main__":
    main()
