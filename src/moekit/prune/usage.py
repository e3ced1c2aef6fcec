"""Heavy-hitter counting: how often, and with how much router mass, each expert is used.

Shapes: L = MoE layers, E = experts of a layer (may differ per layer after pruning),
N = tokens of a batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from ..model import MoEBlock, MoEModel


@dataclass
class ExpertUsage:
    """Per MoE layer: hard counts (times in the top-k), soft counts (router probability mass),
    summed router entropy, over `tokens` tokens. Lists are indexed by MoE layer."""

    layers: list[int]  # model layer index of each MoE layer
    top_k: int
    tokens: int = 0
    hard: list[torch.Tensor] = field(default_factory=list)  # [E] float64 each
    soft: list[torch.Tensor] = field(default_factory=list)  # [E] float64 each
    entropy_sum: list[float] = field(default_factory=list)  # nats, summed over tokens

    def entropy(self, i: int) -> float:
        """Returns layer i's mean router entropy in nats."""
        return self.entropy_sum[i] / max(self.tokens, 1)

    def imbalance(self, i: int) -> float:
        """Returns max / mean of layer i's hard counts (1.0 = perfectly balanced)."""
        h = self.hard[i]
        return float(h.max() / h.mean()) if h.sum() > 0 else float("nan")

    def dropped(self, i: int, kept: list[int]) -> tuple[float, float]:
        """Returns (fraction of top-k assignments, fraction of router mass) of layer i that fall on
        experts outside `kept`."""
        mask = torch.ones_like(self.hard[i], dtype=torch.bool)
        mask[kept] = False
        hard_total, soft_total = float(self.hard[i].sum()), float(self.soft[i].sum())
        return (float(self.hard[i][mask].sum()) / hard_total if hard_total else 0.0,
                float(self.soft[i][mask].sum()) / soft_total if soft_total else 0.0)

    def to_dict(self) -> dict:
        """Returns the counts and per-layer statistics as JSON-able values."""
        rows = []
        for i, layer in enumerate(self.layers):
            e = self.hard[i].numel()
            rows.append({"layer": layer, "experts": e, "hard": self.hard[i].tolist(), "soft": self.soft[i].tolist(),
                         "entropy_nats": self.entropy(i), "entropy_max_nats": math.log(e),
                         "imbalance": self.imbalance(i)})
        return {"tokens": self.tokens, "top_k": self.top_k, "layers": rows}


class RouterTap:
    """Forward hooks on every MoE router: keeps the latest router logits [N, E] of each layer."""

    def __init__(self, model: MoEModel):
        self.blocks = [(i, layer.mlp) for i, layer in enumerate(model.layers) if isinstance(layer.mlp, MoEBlock)]
        self.logits: dict[int, torch.Tensor] = {}
        self._handles = []

    def __enter__(self) -> "RouterTap":
        for i, block in self.blocks:
            self._handles.append(block.router.register_forward_hook(self._hook(i)))
        return self

    def _hook(self, layer: int):
        def hook(module, inputs, output):
            self.logits[layer] = output
        return hook

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


@torch.no_grad()
def count_usage(model: MoEModel, samples: torch.Tensor, batch: int = 8, progress: bool = False) -> ExpertUsage:
    """Returns expert usage of `model` over token ids samples [S, T], counted with each block's
    own top-k (what the model actually routes)."""
    tap = RouterTap(model)
    usage = ExpertUsage(layers=[i for i, _ in tap.blocks], top_k=model.config.top_k)
    blocks = dict(tap.blocks)
    for i, block in tap.blocks:
        e = block.router.out_features
        usage.hard.append(torch.zeros(e, dtype=torch.float64))
        usage.soft.append(torch.zeros(e, dtype=torch.float64))
        usage.entropy_sum.append(0.0)
    with tap:
        for start in tqdm(range(0, samples.shape[0], batch), desc="counting", unit="batch", disable=not progress):
            ids = samples[start:start + batch].to(model.device)
            model(ids)
            usage.tokens += ids.numel()
            for j, layer in enumerate(usage.layers):
                logits = tap.logits[layer].float()  # [N, E]
                probs = torch.softmax(logits, dim=-1)
                chosen = torch.topk(probs, blocks[layer].top_k, dim=-1).indices
                usage.hard[j] += torch.bincount(chosen.reshape(-1), minlength=probs.shape[-1]).double().cpu()
                usage.soft[j] += probs.sum(0).double().cpu()
                usage.entropy_sum[j] += float(-(probs * torch.log(probs.clamp_min(1e-30))).sum())
    return usage


def usage_from_calibration(path, token_ids: torch.Tensor, device: str | torch.device = "cpu", batch: int = 8,
                           progress: bool | None = None) -> ExpertUsage:
    """Returns expert usage over token_ids [S, T] counted block by block (moekit.calibrate): only
    one block's weights are ever on the device, so this works for models larger than it."""
    from ..calibrate import run_calibration
    from ..load import read_config

    _, _, cfg = read_config(path)
    usage = ExpertUsage(layers=[i for i in range(cfg.num_layers) if cfg.moe_layers[i]], top_k=cfg.top_k,
                        tokens=token_ids.numel())

    def on_moe_layer(seen) -> None:
        probs = torch.softmax(seen.logits.float(), dim=-1)  # [N, E]
        usage.hard.append(torch.bincount(seen.expert_ids.reshape(-1), minlength=probs.shape[-1]).double().cpu())
        usage.soft.append(probs.sum(0).double().cpu())
        usage.entropy_sum.append(float(-(probs * torch.log(probs.clamp_min(1e-30))).sum()))
        return None

    run_calibration(path, token_ids, on_moe_layer, device=device, batch=batch, progress=progress)
    return usage
