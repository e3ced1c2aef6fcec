"""Pre-gates (Pre-gated MoE, Hwang et al. 2024): one small [E, D] gate per MoE layer i that predicts
the routing of the next MoE layer j from layer i's expert input, so j's experts can be fetched
while i computes. Distilled from the true routing on calibration text: the model runs with
forward hooks that record each MoE block's input x_i [N, D] and router logits [N, E]; each gate
starts from the speculative predictor (j's router, norm-rescaled) and learns to match
softmax(router_j(x_j)) with a KL loss.

Files in the output folder:
    pregate.safetensors   tensors "pregate.{i}.weight" [E, D] (float32); metadata "moekit" = JSON
    pregate.json          the training report (losses, top-k recall vs speculative, tokens)
    expert_counts.json    per-layer expert use counts on the same text (for pinning)
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import ModelConfig
from ..errors import MoekitError
from ..model import MoEBlock
from .speculative import speculative_weights

FORMAT = "moekit-pregate"
FORMAT_VERSION = 1
WEIGHTS_FILE = "pregate.safetensors"


@torch.no_grad()
def collect_routing(model, token_ids: torch.Tensor, seqlen: int = 256, max_tokens: int = 65536):
    """Returns ({layer: x [M, D] float32 (host)}, {layer: router logits [M, E] float32 (host)}) over
    up to max_tokens tokens of the stream token_ids [T], cut into windows of seqlen."""
    blocks = {i: layer.mlp for i, layer in enumerate(model.layers) if isinstance(layer.mlp, MoEBlock)}
    xs: dict[int, list[torch.Tensor]] = {i: [] for i in blocks}
    logits: dict[int, list[torch.Tensor]] = {i: [] for i in blocks}
    handles = []
    for i, block in blocks.items():
        handles.append(block.register_forward_pre_hook(
            lambda _m, args, i=i: xs[i].append(args[0].reshape(-1, args[0].shape[-1]).float().cpu())))
        handles.append(block.router.register_forward_hook(
            lambda _m, _a, out, i=i: logits[i].append(out.float().cpu())))
    token_ids = token_ids.reshape(-1)[:max_tokens]
    try:
        for start in range(0, token_ids.numel(), seqlen):
            window = token_ids[start:start + seqlen]
            if window.numel() >= 2:
                model(window[None].to(model.device))
    finally:
        for h in handles:
            h.remove()
    if not xs[next(iter(blocks))]:
        raise MoekitError("calibration text is too short: it gives fewer than 2 tokens")
    return {i: torch.cat(v) for i, v in xs.items()}, {i: torch.cat(v) for i, v in logits.items()}


def topk_recall(logits: torch.Tensor, target_logits: torch.Tensor, k: int) -> float:
    """Returns the mean share of each token's true top-k experts found in the predicted top-k."""
    pred = torch.topk(logits, k, dim=-1).indices  # [M, k]
    true = torch.topk(target_logits, k, dim=-1).indices
    hits = (pred[:, :, None] == true[:, None, :]).any(-1).float().sum(-1)  # [M]
    return (hits / k).mean().item()


@dataclass
class PregateReport:
    layers: dict = field(default_factory=dict)  # layer i -> {next, loss_start, loss_end, recall_*}
    tokens: int = 0
    seconds: float = 0.0

    def mean(self, key: str) -> float:
        values = [v[key] for v in self.layers.values()]
        return sum(values) / len(values) if values else float("nan")


def train_pregates(model, token_ids: torch.Tensor, steps: int = 300, lr: float = 3e-3, batch: int = 512,
                   seqlen: int = 256, max_tokens: int = 65536, holdout: float = 0.1, seed: int = 0):
    """Returns ({layer i: W [E, D] float32}, PregateReport): pre-gates trained on token_ids [T].

    Each W predicts the next MoE layer's routing from layer i's expert input; it starts from the
    speculative weights and is trained with AdamW on KL(softmax(router_j) || softmax(x_i W^T)).
    Recall is measured on the last `holdout` share of the tokens, never trained on."""
    t0 = time.perf_counter()
    cfg: ModelConfig = model.config
    moe = [i for i, m in enumerate(cfg.moe_layers) if m]
    next_of = dict(zip(moe, moe[1:]))
    if not next_of:
        raise MoekitError("pre-gates need at least two MoE layers (one predicts the next)")
    xs, logits = collect_routing(model, token_ids, seqlen, max_tokens)
    start = {i: w.detach().float().cpu() for i, w in speculative_weights(model, next_of).items()}
    m = xs[moe[0]].shape[0]
    cut = max(1, int(m * (1 - holdout))) if m > 1 else m
    gen = torch.Generator().manual_seed(seed)
    weights, report = {}, PregateReport(tokens=m)
    for i, j in next_of.items():
        x_train, y_train = xs[i][:cut], torch.softmax(logits[j][:cut], dim=-1)
        x_test, y_test = xs[i][cut:] if cut < m else xs[i], logits[j][cut:] if cut < m else logits[j]
        w = start[i].clone().requires_grad_(True)
        opt = torch.optim.AdamW([w], lr=lr, weight_decay=0.0)

        def loss_on(x, target_probs):
            return F.kl_div(F.log_softmax(x @ w.T, dim=-1), target_probs, reduction="batchmean")

        with torch.no_grad():
            loss_start = loss_on(x_train, y_train).item()
        with torch.enable_grad():  # callers may run under no_grad / inference_mode
            for step in range(steps):
                rows = torch.randint(0, x_train.shape[0], (min(batch, x_train.shape[0]),), generator=gen)
                for group in opt.param_groups:
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
                loss = loss_on(x_train[rows], y_train[rows])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        w = w.detach()
        with torch.no_grad():
            loss_end = loss_on(x_train, y_train).item()
            report.layers[i] = {
                "next": j, "loss_start": loss_start, "loss_end": loss_end,
                "recall_pregate": topk_recall(x_test @ w.T, y_test, cfg.top_k),
                "recall_speculative": topk_recall(x_test @ start[i].T, y_test, cfg.top_k),
                "recall_previous_layer": topk_recall(logits[i][cut:] if cut < m else logits[i], y_test, cfg.top_k),
            }
        weights[i] = w
    report.seconds = time.perf_counter() - t0
    counts = {i: torch.bincount(torch.topk(logits[i], cfg.top_k, dim=-1).indices.reshape(-1),
                                minlength=cfg.experts_in(i)).tolist() for i in moe}
    report.counts = counts  # type: ignore[attr-defined]
    return weights, report


def save_pregates(weights: dict[int, torch.Tensor], cfg: ModelConfig, out: str | Path,
                  report: PregateReport | None = None, overwrite: bool = False) -> Path:
    """Returns the folder after writing pregate.safetensors (+ pregate.json, expert_counts.json).

    Written atomically (moekit.outputs.atomic_dir): an existing `out` must be empty, or moekit's
    output with `overwrite`; it is replaced only once every file is written."""
    from ..outputs import atomic_dir

    out = Path(out)
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "hidden_size": cfg.hidden_size,
            "num_experts": cfg.num_experts, "top_k": cfg.top_k, "layers": sorted(weights)}
    tensors = {f"pregate.{i}.weight": w.float().contiguous().cpu() for i, w in weights.items()}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"moekit": json.dumps(meta)})
        if report is not None:
            (tmp / "pregate.json").write_text(json.dumps(
                {"layers": report.layers, "tokens": report.tokens, "seconds": report.seconds}, indent=1))
            counts = getattr(report, "counts", None)
            if counts is not None:
                (tmp / "expert_counts.json").write_text(json.dumps({"counts": counts}))
    return out


def find_pregates(path: str | Path | None, model_path: str | Path | None) -> Path:
    """Returns the pregate.safetensors to use: in `path` (a folder or the file), else the model's folder."""
    candidates = []
    if path is not None:
        p = Path(path)
        candidates.append(p / WEIGHTS_FILE if p.is_dir() else p)
    elif model_path is not None:
        candidates.append(Path(model_path) / WEIGHTS_FILE)
    for c in candidates:
        if c.is_file():
            return c
    where = candidates[0] if candidates else "the model folder"
    raise MoekitError(f"--predictor pregate: no {WEIGHTS_FILE} at {where}; train one with "
                      "`moekit pregate MODEL --data TEXT --out DIR` and pass --pregate DIR")


def load_pregates(path: str | Path, cfg: ModelConfig) -> dict[int, torch.Tensor]:
    """Returns {layer: W [E, D] float32} from a pregate.safetensors, checked against the model."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("moekit", "{}"))
            weights = {int(k.split(".")[1]): f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise MoekitError(f"{path}: not a readable pre-gate file ({e})") from None
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise MoekitError(f"{path}: metadata says format {meta.get('format')!r} version {meta.get('version')!r}, "
                          f"expected {FORMAT!r} version {FORMAT_VERSION}")
    if meta.get("hidden_size") != cfg.hidden_size or meta.get("num_experts") != cfg.num_experts:
        raise MoekitError(f"{path}: pre-gates for hidden {meta.get('hidden_size')} / {meta.get('num_experts')} "
                          f"experts, but the model has {cfg.hidden_size} / {cfg.num_experts}; train them for this model")
    return weights
