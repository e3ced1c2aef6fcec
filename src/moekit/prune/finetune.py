"""Top-k reduction (SEER-MoE): fine-tune with the language-modelling loss plus a weight on the
router's entropy, so that probability mass concentrates on one expert, then route with a smaller top-k.

The router must get a gradient from the LM loss, and it gets none where every routing weight is
a constant: at top-1 with the top-k weights renormalised (mixtral always; qwen/olmoe with
norm_topk_prob) the only weight is p/p = 1.0. So the router trains at `train_top_k` (default:
the checkpoint's own top-k, e.g. 2) and the model is then set to the smaller `top_k`; training
the experts at top-1 (`train_what="router+experts"`, `train_top_k=1`) lets the LM loss adapt the
experts to top-1 routing instead.

Shape legend: N = routed tokens, E = experts of a layer, A = experts per token (top-k).
"""

from __future__ import annotations

import warnings
from typing import Callable, Iterable

import torch

from ..config import ModelConfig
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
            probs = torch.softmax(self.logits[layer].float(), dim=-1)  # [N, E]
            total = total + (-(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)).mean()
        return total / len(self.blocks)


def set_top_k(model: MoEModel, top_k: int, flag: str = "--top-k") -> None:
    """Sets every MoE block's top-k (checked against its expert count; errors name `flag`)."""
    for i, layer in enumerate(model.layers):
        if isinstance(layer.mlp, MoEBlock):
            experts = layer.mlp.router.out_features
            if not 1 <= top_k <= experts:
                raise MoekitError(f"{flag} {top_k} is not possible: layer {i} has {experts} experts")
            layer.mlp.top_k = top_k


def router_gets_lm_gradient(config: ModelConfig, top_k: int) -> bool:
    """Returns whether the LM loss reaches the routers at `top_k`: False only at top-1 with
    renormalised top-k weights, where the single weight is exactly 1.0 whatever the logits."""
    return not (top_k == 1 and config.norm_topk_prob)


def check_setting(config: ModelConfig, train_top_k: int, train_what: str, entropy_weight: float) -> str | None:
    """Returns a warning (or None) for fine-tuning at train_top_k; raises MoekitError for a setting
    that would change nothing (routers only, no LM gradient to them, no entropy term)."""
    if train_what not in TRAINABLE:
        raise MoekitError(f"--train must be one of {', '.join(TRAINABLE)}, got {train_what!r}")
    if entropy_weight < 0:
        raise MoekitError(f"--entropy-weight must be >= 0, got {entropy_weight}")
    if router_gets_lm_gradient(config, train_top_k):
        return None
    why = (f"at train top-k {train_top_k} with renormalised top-k weights (norm_topk_prob) the only routing "
           "weight is exactly 1.0, so the language-modelling loss gives the router no gradient")
    fix = "train at top-2 and route at top-1 after (--train-top-k 2)"
    if train_what == "router" and entropy_weight == 0:
        raise MoekitError(f"fine-tuning would change nothing: {why}; {fix}, or train the experts too "
                          "(--train router+experts)")
    if entropy_weight > 0:
        also = "" if train_what == "router" else ", or set --entropy-weight 0 (the experts still train)"
        return f"only the entropy term moves the router, with no regard for quality: {why}; {fix}{also}"
    return None


def finetune_router(model: MoEModel, batches: Iterable[torch.Tensor], steps: int, top_k: int,
                    entropy_weight: float = 0.01, lr: float = 1e-3, train_what: str = "router",
                    train_top_k: int | None = None, log_every: int = 10,
                    on_log: Callable[[dict], None] | None = None) -> TrainResult:
    """Returns the TrainResult of fine-tuning `model` in place with loss
    LM + entropy_weight * router entropy at `train_top_k` (default: the checkpoint's top-k,
    model.config.top_k), training the parameters `train_what` names; the model is left at `top_k`.

    Refuses a setting in which nothing would move the routers (router-only training at a top-k
    where the LM loss gives them no gradient, and no entropy term), and warns when only the
    entropy term moves them (it concentrates mass without regard for quality).
    """
    train_top_k = model.config.top_k if train_top_k is None else train_top_k
    warning = check_setting(model.config, train_top_k, train_what, entropy_weight)
    if warning:
        warnings.warn(warning, stacklevel=2)
    set_top_k(model, top_k)  # checks top_k before any training
    set_top_k(model, train_top_k, "--train-top-k")
    try:
        with RouterEntropy(model) as entropy:
            return train(model, batches, steps, lr, warmup_steps=max(1, steps // 10), weight_decay=0.0,
                         trainable=TRAINABLE[train_what], log_every=log_every, on_log=on_log,
                         extra_loss=(lambda: entropy_weight * entropy.loss()) if entropy_weight > 0 else None)
    finally:
        set_top_k(model, top_k)


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
