"""Tiny checkpoints pruned with `scope="global"`, so their MoE layers keep different expert counts
(ModelConfig.num_experts is then the largest layer's, cfg.experts_in(layer) each layer's own).

Used by the placement matrix (test_placement_matrix.py) and the compress test of pruned models.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import moekit
from moekit.load import ExpertLoader, LoadContext, read_config
from moekit.prune import count_usage, select_experts
from moekit.prune.rewrite import write_pruned
from moekit.quant.config import QuantConfig, is_moekit_quantized
from moekit.quant.formats import build_experts, form_class

from conftest import build_hf_model, token_ids

# 3 MoE layers of 8 experts, top-2, hidden 64, expert ffn 32: every int group size of 16 divides
# the rows, and a cache of a few experts cannot hold a layer's, let alone the model's.
MATRIX_SHAPE = dict(hidden_size=64, num_local_experts=8, num_hidden_layers=3, intermediate_size=32)


def save_tiny(out: Path, **overrides) -> Path:
    """Returns `out` after saving a float32 tiny mixtral (transformers) with `overrides` there."""
    model = build_hf_model("mixtral", **overrides)
    model.generation_config.eos_token_id = None
    model.save_pretrained(out)
    return out


def prune_globally(src: Path, out: Path, keep: float = 0.5, criterion: str = "hard") -> tuple[Path, list[int]]:
    """Returns (pruned checkpoint, experts per MoE layer) of `src` with the heavy hitters over random
    tokens kept across all layers at once (moekit.prune, scope "global")."""
    model = moekit.load_model(src)
    usage = count_usage(model, token_ids(8, 24, seed=5), batch=4)
    kept = dict(zip(usage.layers, select_experts(usage, keep, criterion, "global")))
    ckpt, family, cfg = read_config(src)
    write_pruned(ckpt, family, cfg, kept, out, {"keep": keep, "criterion": criterion, "scope": "global"})
    return out, [len(kept[layer]) for layer in usage.layers]


class StoredFormLoader(ExpertLoader):
    """Every layer's experts resident in their stored form, built here from the checkpoint's tensors
    with the layer's own expert count: a reference that does not go through the loaders under test."""

    def build(self, ctx: LoadContext, layer: int) -> nn.Module:
        cfg = ctx.config
        if not is_moekit_quantized(ctx.ckpt.config):
            return super().build(ctx, layer)
        quant = QuantConfig.from_dict(ctx.ckpt.config["quantization_config"])
        prefix = ctx.family.stacked_expert_names(layer)[0].rsplit(".", 1)[0]
        tensors = {name: ctx.ckpt.read(f"{prefix}.{name}").to(ctx.device)
                   for name in form_class(quant.form).tensor_names()}
        return build_experts(quant.form, cfg.experts_in(layer), cfg.hidden_size, cfg.expert_ffn, tensors, quant.bits)


def reference_model(path: Path):
    """Returns the model at `path` with every expert resident in its stored form (see StoredFormLoader)."""
    return moekit.load_model(path, experts=StoredFormLoader())


def greedy(model, ids: torch.Tensor, n: int = 8) -> torch.Tensor:
    """Returns `n` greedy new tokens [B, n] for ids [B, T], never stopping at eos."""
    return model.generate(ids, max_new_tokens=n, temperature=0, eos_token_ids=())
