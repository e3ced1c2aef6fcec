"""Sizes of a checkpoint without reading its weights: parameters and bytes, total, in routed
experts and elsewhere, bits per expert parameter, and parameters active per token."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from .load import read_config


@dataclass
class ModelReport:
    path: str
    family: str
    layers: int
    moe_layers: int
    experts: int
    top_k: int
    hidden: int
    expert_ffn: int
    vocab: int
    params_total: int
    params_experts: int
    params_other: int
    bytes_total: int
    bytes_experts: int
    bytes_other: int
    bits_per_expert_param: float
    params_active_per_token: int

    def to_dict(self) -> dict:
        return asdict(self)


def inspect_checkpoint(path: str | Path) -> ModelReport:
    """Returns the size report of the model directory at `path` (headers only, no weights read)."""
    ckpt, family, cfg = read_config(path)
    expert_names = set()
    for layer, is_moe in enumerate(cfg.moe_layers):
        if is_moe:
            expert_names.update(family.stacked_expert_names(layer))
            for e in range(cfg.experts_in(layer)):
                expert_names.update(family.expert_names(layer, e))
    # compressed stored forms keep their tensors under the experts module (quant.formats)
    expert_prefixes = tuple(family.stacked_expert_names(layer)[0].rsplit(".", 1)[0] + "."
                            for layer, is_moe in enumerate(cfg.moe_layers) if is_moe)
    params = {"experts": 0, "other": 0}
    nbytes = {"experts": 0, "other": 0}
    for name in ckpt.names():
        kind = "experts" if name in expert_names or name.startswith(expert_prefixes) else "other"
        shape, itemsize = ckpt.shape(name), ckpt.itemsize(name)
        numel = 1
        for dim in shape:
            numel *= dim
        params[kind] += numel
        nbytes[kind] += numel * itemsize
    # compressed formats store fewer elements than parameters: count parameters from the config
    params["experts"] = cfg.expert_params if nbytes["experts"] else 0
    active_experts = cfg.num_moe_layers * cfg.top_k * cfg.params_per_expert
    return ModelReport(
        path=str(ckpt.path), family=cfg.family, layers=cfg.num_layers, moe_layers=cfg.num_moe_layers,
        experts=cfg.num_experts, top_k=cfg.top_k, hidden=cfg.hidden_size, expert_ffn=cfg.expert_ffn,
        vocab=cfg.vocab_size,
        params_total=params["experts"] + params["other"], params_experts=params["experts"],
        params_other=params["other"],
        bytes_total=nbytes["experts"] + nbytes["other"], bytes_experts=nbytes["experts"],
        bytes_other=nbytes["other"],
        bits_per_expert_param=8 * nbytes["experts"] / params["experts"] if params["experts"] else 0.0,
        params_active_per_token=params["other"] + active_experts,
    )
