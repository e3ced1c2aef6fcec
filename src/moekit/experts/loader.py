"""Expert loaders: what builds each MoE layer's expert source while a model loads.

`load_model(..., experts=LOADER)` calls `build` once per MoE layer and `finish` once at the end.
The default keeps every expert resident and dense on the model's device; a compressed checkpoint
gets quant.loader's, an offloaded model offload.loader's. A loader whose sources share a runtime
returns it from `finish`; the model keeps it as `model.expert_runtime` (experts.runtime).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..checkpoint import Checkpoint
from ..config import ModelConfig
from ..families.base import Family
from ..native.hugepages import advise_huge_pages
from .resident import ResidentExperts


@dataclass
class LoadContext:
    """What an expert loader needs to build one layer's expert source."""

    ckpt: Checkpoint
    family: Family
    config: ModelConfig
    device: torch.device
    dtype: torch.dtype


class ExpertLoader:
    """Builds the expert source of each MoE layer while a model loads (the expert seam).

    The default keeps every expert resident on the model's device. Other pillars (offload,
    compressed forms) pass their own loader to `load_model(..., experts=...)`; the model never
    allocates device memory for experts the loader does not put there.
    """

    def build(self, ctx: LoadContext, layer: int) -> nn.Module:
        """Returns the expert source (an nn.Module with the seam's forward) of one MoE layer."""
        if not ctx.config.plain_experts:  # gpt-oss: biases and the clamped SwiGLU
            from .clamped import build_resident

            return build_resident(ctx, layer)
        with torch.device("meta"):  # no float32 copy to convert: the stacks are made in their dtype
            experts = ResidentExperts(ctx.config.experts_in(layer), ctx.config.hidden_size, ctx.config.expert_ffn)
        experts = experts.to(dtype=ctx.dtype).to_empty(device=ctx.device)
        if ctx.device.type == "cpu":  # before the first write, so the pages come as 2 MB ones
            advise_huge_pages(experts.parameters())
        with torch.no_grad():
            experts.form.read_layer(ctx.ckpt, ctx.family, layer, experts.stacked())
        return experts

    def finish(self, model: nn.Module, ctx: LoadContext):
        """Called once every layer is built; returns the runtime the layers' sources share, or None."""
        return None
