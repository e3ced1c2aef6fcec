"""Loads a moekit-compressed checkpoint's experts in their stored form (the expert seam)."""

from __future__ import annotations

from torch import nn

from ..experts.forms import experts_prefix
from ..experts.loader import ExpertLoader, LoadContext
from ..native.hugepages import advise_huge_pages
from .config import QuantConfig
from .formats import CompressedExperts, CompressedForm, form_from_checkpoint

__all__ = ["CompressedExpertLoader", "experts_prefix", "loader_for"]


class CompressedExpertLoader(ExpertLoader):
    """Builds each MoE layer's expert source from the stored tensors, kept compressed on the device."""

    def __init__(self, quant: QuantConfig):
        self.quant = quant
        self.form: CompressedForm | None = None  # (wrapped by experts.clamped.BiasedCompressedForm for gpt-oss)

    def build(self, ctx: LoadContext, layer: int) -> nn.Module:
        if self.form is None:  # shapes from the headers (all layers checked), tables onto the device
            self.form = form_from_checkpoint(self.quant, ctx.config, ctx.ckpt, ctx.family, ctx.device)
            if not ctx.config.plain_experts:  # gpt-oss: biases and the clamped SwiGLU around the codes
                from ..experts.clamped import BiasedCompressedForm

                self.form = BiasedCompressedForm.of(self.form, ctx.config, ctx.dtype)
        form = self.form
        count = ctx.config.experts_in(layer)
        tensors = form.empty(count, layer, ctx.device)
        if ctx.device.type == "cpu":  # before the first write, as the bf16 loader: 2 MB pages read faster
            advise_huge_pages(tensors.values())
        form.read_layer(ctx.ckpt, ctx.family, layer, tensors)
        return CompressedExperts(form, layer, count, {**tensors, **form.tables(layer)})


def loader_for(hf_config: dict, where: str) -> CompressedExpertLoader:
    """Returns the loader of a compressed checkpoint's config.json dict."""
    return CompressedExpertLoader(QuantConfig.from_dict(hf_config["quantization_config"], where))
