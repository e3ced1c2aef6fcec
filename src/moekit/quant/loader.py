"""Loads a moekit-compressed checkpoint's experts in their stored form (the expert seam)."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import CheckpointError, MoekitError
from ..load import ExpertLoader, LoadContext
from .config import QuantConfig
from .formats import build_experts, form_class


def experts_prefix(family, layer: int) -> str:
    """Returns the name prefix of layer `layer`'s experts module (without the trailing dot)."""
    return family.stacked_expert_names(layer)[0].rsplit(".", 1)[0]


class CompressedExpertLoader(ExpertLoader):
    """Builds each MoE layer's expert source from the stored tensors, kept compressed on the device."""

    def __init__(self, quant: QuantConfig):
        self.quant = quant

    def build(self, ctx: LoadContext, layer: int) -> nn.Module:
        cfg = ctx.config
        try:
            self.quant.check_shapes(cfg.hidden_size, cfg.expert_ffn)
        except MoekitError as e:
            raise CheckpointError(f"{ctx.ckpt.path}: quantization_config cannot be read with this model: {e}") from None
        prefix = experts_prefix(ctx.family, layer)
        tensors = {}
        for name in form_class(self.quant.form).tensor_names():
            full = f"{prefix}.{name}"
            if not ctx.ckpt.has(full):
                raise CheckpointError(f"{ctx.ckpt.path}: tensor '{full}' not found; config.json says the "
                                      f"experts are stored as '{self.quant.form}'. The checkpoint is incomplete")
            tensors[name] = ctx.ckpt.read(full).to(ctx.device)
        _check_shapes(tensors, cfg, self.quant, ctx.ckpt.path, prefix)
        return build_experts(self.quant.form, cfg.num_experts, cfg.hidden_size, cfg.expert_ffn, tensors,
                             self.quant.bits)


def _check_shapes(tensors: dict[str, torch.Tensor], cfg, quant: QuantConfig, path, prefix: str) -> None:
    """Raises a CheckpointError naming the tensor when a stored shape contradicts config.json."""
    e, d, i = cfg.num_experts, cfg.hidden_size, cfg.expert_ffn
    cls = form_class(quant.form)
    for kind, rows in (("gate_up", 2 * i), ("down", d)):
        for suffix, size in cls.row_dims(rows).items():
            t = tensors[f"{kind}.{suffix}"]
            if tuple(t.shape[:2]) != (e, size):
                raise CheckpointError(f"{path}: tensor '{prefix}.{kind}.{suffix}' has shape {list(t.shape)}, "
                                      f"config.json implies [{e}, {size}, ...]; the weights do not match the config")
        for suffix in cls.STORED:
            t = tensors[f"{kind}.{suffix}"]
            if t.shape[0] != e:
                raise CheckpointError(f"{path}: tensor '{prefix}.{kind}.{suffix}' has shape {list(t.shape)}, "
                                      f"config.json implies [{e}, ...] ({e} experts); the weights do not match the config")


def loader_for(hf_config: dict, where: str) -> CompressedExpertLoader:
    """Returns the loader of a compressed checkpoint's config.json dict."""
    return CompressedExpertLoader(QuantConfig.from_dict(hf_config["quantization_config"], where))
