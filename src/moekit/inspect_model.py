"""Sizes of a checkpoint without reading its weights: parameters and bytes, total, in routed
experts and elsewhere, bits per expert parameter, and parameters active per token; and what sets
its family apart (attention kind, dense layers, shared experts, router, norms, scalars)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from .config import ModelConfig
from .fp8 import SCALE_SUFFIX
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
    specifics: dict[str, str]  # what sets this model's family apart, one line each (model_specifics)

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
        base = name.removesuffix(SCALE_SUFFIX)  # an FP8 weight's block scales count with it
        kind = "experts" if base in expert_names or name.startswith(expert_prefixes) else "other"
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
        specifics={**model_specifics(cfg), **stored_form(ckpt.config)},
    )


def stored_form(hf: dict) -> dict[str, str]:
    """Returns {"stored as": how} for a checkpoint quantized on disk (moekit's own forms, FP8
    blocks, gpt-oss MXFP4 experts), else {}."""
    quant = hf.get("quantization_config") or {}
    method = quant.get("quant_method")
    if method == "moekit":
        return {"stored as": f"moekit {quant.get('form')} experts ({quant.get('bits')} bits)"}
    if method == "fp8":
        rows, cols = quant.get("weight_block_size")
        return {"stored as": f"FP8 e4m3, one scale per {rows}x{cols} block (dequantized when read)"}
    if method == "mxfp4":
        return {"stored as": "MXFP4 experts (e2m1, one E8M0 scale per 32), kept MXFP4 on the device"}
    return {}


def model_specifics(cfg: ModelConfig) -> dict[str, str]:
    """Returns {what: how} for the features of a model beyond the plain MoE decoder."""
    out: dict[str, str] = {}
    if cfg.mla is not None:
        m = cfg.mla
        q = f"q_lora_rank {m.q_lora_rank}" if m.q_lora_rank else "plain q_proj"
        out["attention"] = (f"MLA, {cfg.num_heads} heads: kv_lora_rank {m.kv_lora_rank}, {q}, qk "
                            f"{m.qk_nope_head_dim} nope + {m.qk_rope_head_dim} rope, v {m.v_head_dim}")
    else:
        out["attention"] = f"{cfg.num_heads} heads over {cfg.num_kv_heads} kv heads of {cfg.head_dim}"
        if cfg.rope_dim < cfg.head_dim:
            out["attention"] += f", rope on {cfg.rope_dim} of {cfg.head_dim} dims"
        if cfg.sliding_window:
            sliding = sum(cfg.attention_config(i).sliding_window is not None for i in range(cfg.num_layers))
            out["attention"] += f", sliding window {cfg.sliding_window}"
            if sliding < cfg.num_layers:
                out["attention"] += f" on {sliding} of {cfg.num_layers} layers"
        if cfg.attention_sinks:
            out["attention"] += ", sinks"
    out["KV cache"] = f"{cfg.kv_values_per_position} values per position and layer"
    rope = cfg.rope
    if rope.scaling == "longrope":
        out["rope"] = (f"longrope, short factors: context {cfg.max_position_embeddings} "
                       "(the long-context factors are not applied)")
    elif rope.scaling != "default":
        out["rope"] = f"{rope.scaling} x{rope.factor:g}" + (
            f" over {rope.original_max_position}" if rope.original_max_position else "")
    dense = [i for i, moe in enumerate(cfg.moe_layers) if not moe]
    if dense:
        out["dense layers"] = f"{len(dense)} (layers {', '.join(map(str, dense))}), ffn {cfg.dense_ffn}"
    if cfg.shared_expert_ffn:
        out["shared expert"] = f"ffn {cfg.shared_expert_ffn}" + (", sigmoid-gated" if cfg.shared_expert_gate else "")
    r = cfg.router
    router = {"softmax": "softmax top-k", "sigmoid": "sigmoid top-k",
              "sparsemixer": f"sparsemixer (gap {r.jitter_eps})"}[r.scoring]
    if r.group_limited:
        router += f", best {r.topk_group} of {r.n_group} groups"
    if r.correction_bias:
        router += ", selection bias"
    router += ", biased" if cfg.router_bias else ""
    router += ", renormalised" if cfg.norm_topk_prob else ""
    if r.scaling_factor != 1.0:
        router += f", x{r.scaling_factor:g}"
    out["router"] = router
    if not cfg.plain_experts:
        out["experts"] = (f"{cfg.expert_act} (alpha {cfg.swiglu_alpha:g}, limit {cfg.swiglu_limit:g})"
                          + (", biased" if cfg.expert_bias else ""))
    if cfg.norm != "rms":
        out["norm"] = "LayerNorm with bias"
    scalars = [f"{name} {value:g}" for name, value, default in (
        ("embedding x", cfg.embedding_multiplier, 1.0), ("residual x", cfg.residual_multiplier, 1.0),
        ("logits /", cfg.logits_scaling, 1.0)) if value != default]
    if cfg.attention_scale is not None:
        scalars.append(f"attention scale {cfg.attention_scale:g}")
    if scalars:
        out["scalars"] = ", ".join(scalars)
    return out
