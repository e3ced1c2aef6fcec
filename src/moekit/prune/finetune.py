"""Top-k reduction (SEER-MoE): fine-tune the router with the language-modelling loss plus a
weight on its entropy, so that probability mass concentrates and a smaller top-k keeps quality."""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from ..errors import MoekitError
from ..model import MoEBlock, MoEModel
from ..train import TrainResult, train
from .usage import RouterTap

TRAINABLE = {
    "router": lambda name: ".mlp.router." in name,
    "router+experts": lambda name: ".mlp.router." in name or ".mlp.experts." in name,
    "all": lambda name: True,
}


class RouterEntropy(RouterTap):
    """Router hooks whose `loss()` is the mean per-token entropy (nats) of every MoE layer's
    routing distribution in the last forward pass, averaged over layers."""

    def loss(self) -> torch.Tensor:
        total = 0.0
        for layer, _ in self.blocks:
            probs = torch.softmax(self.logits[layer].float(), dim=-1)
            total = total + (-(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)).mean()
        return total / len(self.blocks)


def set_top_k(model: MoEModel, top_k: int) -> None:
    """Sets every MoE block's top-k (checked against its expert count)."""
    for i, layer in enumerate(model.layers):
        if isinstance(layer.mlp, MoEBlock):
            experts = layer.mlp.router.out_features
            if not 1 <= top_k <= experts:
                raise MoekitError(f"--top-k {top_k} is not possible: layer {i} has {experts} experts")
            layer.mlp.top_k = top_k


def finetune_router(model: MoEModel, batches: Iterable[torch.Tensor], steps: int, top_k: int,
                    entropy_weight: float = 0.01, lr: float = 1e-3, train_what: str = "router",
                    log_every: int = 10, on_log: Callable[[dict], None] | None = None) -> TrainResult:
    """Returns the TrainResult of fine-tuning `model` in place at `top_k` with loss
    LM + entropy_weight * router entropy, training the parameters `train_what` names."""
    if train_what not in TRAINABLE:
        raise MoekitError(f"--train must be one of {', '.join(TRAINABLE)}, got {train_what!r}")
    if entropy_weight < 0:
        raise MoekitError(f"--entropy-weight must be >= 0, got {entropy_weight}")
    set_top_k(model, top_k)
    with RouterEntropy(model) as entropy:
        return train(model, batches, steps, lr, warmup_steps=max(1, steps // 10), weight_decay=0.0,
                     trainable=TRAINABLE[train_what], log_every=log_every, on_log=on_log,
                     extra_loss=(lambda: entropy_weight * entropy.loss()) if entropy_weight > 0 else None)


@torch.no_grad()
def mean_router_entropy(model: MoEModel, samples: torch.Tensor, batch: int = 8) -> float:
    """Returns the mean router entropy (nats, over tokens and MoE layers) on samples [S, T]."""
    total, count = 0.0, 0
    with RouterEntropy(model) as entropy:
        for start in range(0, samples.shape[0], batch):
            model(samples[start:start + batch].to(model.device))
            total += float(entropy.loss())
            count += 1
    return total / max(count, 1)
