"""Write a pruned or fine-tuned copy of an HF checkpoint: same layout and tensor names, fewer
experts (renumbered 0..k-1 per layer), router rows cut to match, optional replaced tensors.

Works for every family: tensors are streamed from the source one at a time (never the whole
model in memory) and written atomically with a sha256 per shard (moekit.save.write_checkpoint).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import torch

from ..checkpoint import Checkpoint
from ..config import ModelConfig
from ..errors import MoekitError
from ..families.base import Family
from ..save import write_checkpoint

# files of a model directory that are not weights and travel unchanged
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
              "chat_template.jinja", "generation_config.json", "vocab.json", "merges.txt")


def expert_tensor_index(family: Family, cfg: ModelConfig) -> dict[str, tuple[int, int, int]]:
    """Returns {tensor name: (layer, expert, projection 0/1/2)} for every per-expert tensor."""
    index = {}
    for layer in range(cfg.num_layers):
        for e in range(cfg.experts_in(layer)):
            for proj, name in enumerate(family.expert_names(layer, e)):
                index[name] = (layer, e, proj)
    return index


def _expert_count_keys(hf: dict[str, Any]) -> list[str]:
    keys = [k for k in ("num_local_experts", "num_experts", "n_routed_experts") if k in hf]
    return keys or ["num_experts"]


def pruned_tensors(ckpt: Checkpoint, family: Family, cfg: ModelConfig, kept: dict[int, list[int]],
                   replace: dict[str, torch.Tensor] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (name, tensor) of the pruned checkpoint: `kept[layer]` lists the original expert ids
    kept in each MoE layer (in their new order); `replace` overrides tensors by (new) name."""
    replace = replace or {}

    def pick(name: str, stored: torch.Tensor) -> torch.Tensor:
        return replace[name].to(stored.dtype) if name in replace else stored

    experts = expert_tensor_index(family, cfg)
    routers = {family.router_name(layer): layer for layer in kept}
    routers.update({family.router_bias_name(layer): layer for layer in kept})  # DeepSeek-V3's selection bias
    fused = {name: layer for layer in kept
             for name in (*family.stacked_expert_names(layer), *family.stacked_expert_extras(layer))}
    for name in ckpt.names():
        if ckpt.is_fp8_scale(name):  # FP8 sources are written dequantized (Checkpoint.read), without scales
            continue
        if name in experts:
            layer, e, proj = experts[name]
            if e not in kept[layer]:
                continue
            new_name = family.expert_names(layer, kept[layer].index(e))[proj]
            yield new_name, pick(new_name, ckpt.read(name))
        elif name in routers:
            yield name, pick(name, ckpt.read(name)[kept[routers[name]]])
        elif name in fused:
            yield name, pick(name, ckpt.read(name)[kept[fused[name]]])
        else:
            yield name, pick(name, ckpt.read(name))


def check_prunable(cfg: ModelConfig, kept: dict[int, list[int]] | None = None) -> None:
    """Refuses pruning a model whose router limits each token to groups of experts (DeepSeek-V2's
    group_limited_greedy, V3's n_group > topk_group): dropping experts and renumbering the rest
    would silently move experts between groups. Keeping every expert is fine."""
    r = cfg.router
    if not r.group_limited:
        return
    if kept is not None and all(len(kept[layer]) == cfg.experts_in(layer) for layer in kept):
        return
    raise MoekitError(f"{cfg.family} routes within groups of experts (best {r.topk_group} of {r.n_group} "
                      "groups); pruning would move experts between groups, so it is not supported for this model")


def write_pruned(ckpt: Checkpoint, family: Family, cfg: ModelConfig, kept: dict[int, list[int]], out: str | Path,
                 facts: dict[str, Any], top_k: int | None = None, replace: dict[str, torch.Tensor] | None = None,
                 overwrite: bool = False) -> Path:
    """Returns `out` after writing the pruned checkpoint and its config.json there.

    config.json keeps the architecture; its expert count becomes the per-layer count (or the
    largest one, with `moekit_pruning.experts_per_layer`, when layers differ: transformers cannot
    load those), num_experts_per_tok becomes min(top_k, fewest experts left in a layer).
    """
    check_prunable(cfg, kept)
    hf = json.loads(json.dumps(ckpt.config))  # a deep copy
    if ckpt.fp8_block is not None:  # the copy's weights are read dequantized: no longer FP8
        del hf["quantization_config"]
    counts = [len(kept[layer]) if layer in kept else 0 for layer in range(cfg.num_layers)]
    moe_counts = [c for layer, c in enumerate(counts) if cfg.moe_layers[layer]]
    for key in _expert_count_keys(hf):
        hf[key] = max(moe_counts)
    new_top_k = min(top_k or cfg.top_k, min(moe_counts))
    hf["num_experts_per_tok"] = new_top_k
    pruning = dict(hf.get("moekit_pruning") or {})
    pruning.update(version=1, **facts)
    pruning.pop("experts_per_layer", None)
    if len(set(moe_counts)) > 1:
        pruning["experts_per_layer"] = counts
    hf["moekit_pruning"] = pruning
    side = {}
    for fname in SIDE_FILES:
        path = ckpt.path / fname
        if path.exists():
            side[fname] = path.read_bytes()
    readme = ckpt.path / "README.md"
    if readme.exists():  # the source's model card no longer describes this model: keep it aside
        side["SOURCE_README.md"] = readme.read_bytes()
    with torch.no_grad():
        return write_checkpoint(pruned_tensors(ckpt, family, cfg, kept, replace), out, hf, side, overwrite=overwrite)
