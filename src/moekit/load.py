"""Load an HF checkpoint directory into an MoEModel, one tensor (or one expert) at a time.

The model is built on the meta device, given empty storage on the target device, and filled
tensor by tensor from the memory-mapped shards: host memory peaks near one tensor, device
memory at the model's own size.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from .checkpoint import Checkpoint, parse_device, parse_dtype, read_json
from .config import ModelConfig
from .errors import CheckpointError
from .families import family_for
from .families.base import Family, eos_ids
from .experts.forms import DenseForm
from .experts.loader import ExpertLoader, LoadContext
from .linear import check_dense_form, load_rows
from .model import Attention, DecoderLayer, DenseMLP, MoEBlock, MoEModel, use_int8_dense
from .native.hugepages import advise_huge_pages
from .rope import inverse_frequencies

EXAMPLES_DIR = Path(__file__).resolve().parent.parent.parent / "examples"
BUNDLED_MODEL = EXAMPLES_DIR / "tiny-moe"


def default_model_path() -> Path:
    """Returns the bundled tiny MoE's directory (the default model of every command)."""
    if not (BUNDLED_MODEL / "config.json").exists():
        raise CheckpointError(f"the bundled model is not at {BUNDLED_MODEL}: it ships in the source tree, so "
                              "install with `pip install -e .` from a clone, or give --model DIR")
    return BUNDLED_MODEL


def read_config(path: str | Path | Checkpoint) -> tuple[Checkpoint, Family, ModelConfig]:
    """Returns (checkpoint, family, ModelConfig) for a model directory (or an open Checkpoint,
    e.g. a benchmark's random one), reading no weights."""
    ckpt = path if isinstance(path, Checkpoint) else Checkpoint(path)
    family = family_for(ckpt.config, where=str(ckpt.path / "config.json"))
    return ckpt, family, family.config(ckpt.config)


def load_model(path: str | Path | None = None, device: str | torch.device = "cpu",
               dtype: str | torch.dtype | None = None, experts: ExpertLoader | None = None,
               progress: bool | None = None, dynamic_skip: float = 0.0, dense: str = "bf16") -> MoEModel:
    """Returns the model at `path` (default: the bundled tiny MoE) on `device` in `dtype`.

    dtype defaults to float32 on the CPU and bfloat16 on a GPU. `experts` decides where and in
    which form each MoE layer's experts live (default: all resident on `device`). `progress`
    shows a bar per layer (default: when stderr is a terminal). `dynamic_skip` f > 0 drops, per
    token, every chosen expert whose routing weight is below f times the top one. `dense` "int8"
    holds the attention projections, dense / shared MLPs and an untied LM head as int8 rows
    (linear.Int8Linear, quantized as read: the full-precision copy never exists on the device);
    "bf16" (default) keeps them in `dtype`."""
    if not 0.0 <= dynamic_skip < 1.0:
        raise CheckpointError(f"dynamic_skip must be in [0, 1), got {dynamic_skip}")
    check_dense_form(dense)
    device = parse_device(device)
    dtype = parse_dtype(dtype, torch.float32 if device.type == "cpu" else torch.bfloat16)
    ckpt, family, cfg = read_config(path if path is not None else default_model_path())
    experts = experts or _default_expert_loader(ckpt)
    with torch.device("meta"):
        model = MoEModel(cfg).to(dtype)  # no storage yet: the dtype change is free
        if dense == "int8":
            use_int8_dense(model)
    for layer in model.layers:  # expert storage is the loader's business, never to_empty's
        if isinstance(layer.mlp, MoEBlock):
            layer.mlp.experts = nn.Identity()
    model = model.to_empty(device=device)
    if device.type == "cpu":  # untouched yet: a CPU decode step streams every weight, 2 MB pages read faster
        advise_huge_pages(model.parameters())
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    # to_empty leaves buffers uninitialised: recompute the rope frequencies (float32)
    model.inv_freq = inverse_frequencies(cfg.rope, cfg.rope_dim)[0].to(device)
    ctx = LoadContext(ckpt, family, cfg, device, dtype)
    with torch.no_grad():
        _fill(model, ctx, experts, progress)
    model.expert_runtime = experts.finish(model, ctx)
    for layer in model.layers:
        if isinstance(layer.mlp, MoEBlock):
            layer.mlp.skip_below = dynamic_skip
    model.eval()
    model.generation_defaults = _generation_defaults(ckpt, cfg)
    model.source_path = ckpt.path
    return model


def _default_expert_loader(ckpt: Checkpoint) -> ExpertLoader:
    """Returns the loader a checkpoint's config.json asks for: its stored form when moekit
    compressed it (quantization_config), else all experts resident and dense."""
    from .quant.config import is_moekit_quantized

    if is_moekit_quantized(ckpt.config):
        from .quant.loader import loader_for

        return loader_for(ckpt.config, str(ckpt.path / "config.json"))
    return ExpertLoader()


def _copy(param: torch.Tensor, ckpt: Checkpoint, name: str, shape: tuple[int, ...]) -> None:
    param.copy_(ckpt.read(name, shape=shape, dtype=param.dtype))


def _copy_rows(linear: nn.Module, offset: int, ckpt: Checkpoint, name: str, shape: tuple[int, ...]) -> None:
    """Copies checkpoint tensor `name` [R, K] into rows offset..offset+R of a projection (linear.load_rows)."""
    load_rows(linear, offset, lambda dtype: ckpt.read(name, shape=shape, dtype=dtype))


def _copy_norm(norm: nn.Module, ckpt: Checkpoint, weight_name: str, dim: int) -> None:
    """Fills an RMSNorm (weight) or a LayerNorm (weight and bias, the bias named beside the weight)."""
    _copy(norm.weight, ckpt, weight_name, (dim,))
    if getattr(norm, "bias", None) is not None:
        _copy(norm.bias, ckpt, weight_name.removesuffix(".weight") + ".bias", (dim,))


def _fill(model: MoEModel, ctx: LoadContext, experts: ExpertLoader, progress: bool | None) -> None:
    ckpt, cfg = ctx.ckpt, ctx.config
    d, v = cfg.hidden_size, cfg.vocab_size
    _copy(model.embed.weight, ckpt, "model.embed_tokens.weight", (v, d))
    _copy_norm(model.norm, ckpt, "model.norm.weight", d)
    if not cfg.tie_word_embeddings:
        _copy_rows(model.lm_head, 0, ckpt, "lm_head.weight", (v, d))
    if cfg.lm_head_bias:
        _copy(model.lm_head.bias, ckpt, "lm_head.bias", (v,))
    disable = not sys.stderr.isatty() if progress is None else not progress
    for i, layer in enumerate(tqdm(model.layers, desc="loading", unit="layer", disable=disable)):
        fill_layer(layer, ctx, i, experts)


def fill_layer(layer: DecoderLayer, ctx: LoadContext, i: int, experts: ExpertLoader) -> None:
    """Fills decoder layer i (storage already on ctx.device) from the checkpoint; its routed
    experts come from `experts.build`. Used by load_model and by the block-by-block calibrator."""
    ckpt, family, cfg = ctx.ckpt, ctx.family, ctx.config
    d = cfg.hidden_size
    in_norm, post_norm = family.norm_names(i)
    _copy_norm(layer.input_norm, ckpt, in_norm, d)
    _copy_norm(layer.post_norm, ckpt, post_norm, d)
    if cfg.mla is not None:
        from .mla import fill_latent_attention

        fill_latent_attention(layer.attn, ckpt, family, cfg, i)
    else:
        _fill_attention(layer.attn, ckpt, family, cfg, i)
    if isinstance(layer.mlp, MoEBlock):
        _fill_moe(layer.mlp, ckpt, family, cfg, i)
        layer.mlp.experts = experts.build(ctx, i)
    else:
        _fill_dense(layer.mlp, ckpt, family.dense_mlp_names(i), d, cfg.dense_ffn)


def _fill_attention(attn: Attention, ckpt: Checkpoint, family: Family, cfg: ModelConfig, i: int) -> None:
    d, qd, kvd = cfg.hidden_size, attn.q_dim, attn.kv_dim
    parts = (("q_proj", 0, qd), ("k_proj", qd, kvd), ("v_proj", qd + kvd, kvd))
    for part, offset, rows in parts:
        _copy_rows(attn.qkv, offset, ckpt, family.attn_name(i, part) + ".weight", (rows, d))
        if cfg.qkv_bias:
            _copy(attn.qkv.bias[offset:offset + rows], ckpt, family.attn_name(i, part) + ".bias", (rows,))
    _copy_rows(attn.o_proj, 0, ckpt, family.attn_name(i, "o_proj") + ".weight", (d, qd))
    if cfg.o_bias:
        _copy(attn.o_proj.bias, ckpt, family.attn_name(i, "o_proj") + ".bias", (d,))
    if getattr(attn, "sinks", None) is not None:
        _copy(attn.sinks, ckpt, family.attn_name(i, "sinks"), (cfg.num_heads,))
    if attn.q_norm is not None:
        _copy(attn.q_norm.weight, ckpt, family.attn_name(i, "q_norm") + ".weight", tuple(attn.q_norm.weight.shape))
        _copy(attn.k_norm.weight, ckpt, family.attn_name(i, "k_norm") + ".weight", tuple(attn.k_norm.weight.shape))


def _fill_dense(mlp: DenseMLP, ckpt: Checkpoint, names: tuple[str, ...], d: int, ffn: int) -> None:
    gate, up, down = names[:3]
    _copy_rows(mlp.gate_up, 0, ckpt, gate, (ffn, d))
    _copy_rows(mlp.gate_up, ffn, ckpt, up, (ffn, d))
    _copy_rows(mlp.down, 0, ckpt, down, (d, ffn))


def fill_stacked_experts(gate_up: torch.Tensor, down: torch.Tensor, ckpt: Checkpoint, family: Family,
                         cfg: ModelConfig, layer: int) -> None:
    """Copies layer `layer`'s experts from the checkpoint into gate_up [E, 2I, D] and down [E, D, I]
    (any device or dtype), one expert at a time so host memory stays near one expert."""
    form = DenseForm(cfg.hidden_size, cfg.expert_ffn, gate_up.dtype)
    form.read_layer(ckpt, family, layer, {"gate_up": gate_up, "down": down})


def _fill_moe(block: MoEBlock, ckpt: Checkpoint, family: Family, cfg: ModelConfig, i: int) -> None:
    """Fills the router and the shared expert (the routed experts are the expert loader's)."""
    d, e_count = cfg.hidden_size, cfg.experts_in(i)
    _copy(block.router.weight, ckpt, family.router_name(i), (e_count, d))
    if block.router.bias is not None:
        _copy(block.router.bias, ckpt, family.router_bias_name(i), (e_count,))
    if block.score_bias is not None:  # kept in float32 whatever the model's dtype: it decides ties
        block.score_bias = ckpt.read(family.router_bias_name(i), shape=(e_count,),
                                     dtype=torch.float32).to(block.router.weight.device)
    if block.shared is not None:
        gate, up, down, sgate = family.shared_expert_names(i)
        _fill_dense(block.shared, ckpt, (gate, up, down), d, cfg.shared_expert_ffn)
        if block.shared_gate is not None:
            _copy(block.shared_gate.weight, ckpt, sgate, (1, d))


def _generation_defaults(ckpt: Checkpoint, cfg: ModelConfig) -> dict:
    """Returns generation settings: eos ids from generation_config.json (else config.json)."""
    defaults: dict = {"eos_token_ids": cfg.eos_token_ids}
    path = ckpt.path / "generation_config.json"
    if path.exists():
        gen = read_json(path)
        if gen.get("eos_token_id") is not None:
            defaults["eos_token_ids"] = eos_ids(gen["eos_token_id"])
        # transformers' meaning: sampling settings count only with do_sample true (absent = greedy)
        if gen.get("do_sample"):
            defaults["temperature"] = 1.0
            for key in ("temperature", "top_p", "top_k"):
                if gen.get(key) is not None:
                    defaults[key] = gen[key]
        else:
            defaults["temperature"] = 0.0
    # ids outside the vocabulary (seen in tiny test configs) can never be produced
    defaults["eos_token_ids"] = tuple(t for t in defaults["eos_token_ids"] if 0 <= t < cfg.vocab_size)
    return defaults
