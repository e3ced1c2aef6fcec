"""Write an MoEModel as a Hugging Face checkpoint directory (safetensors shards + index).

The write is atomic: everything goes to a temporary sibling directory that is renamed into
place only when complete, so an interrupted save leaves nothing half-written (moekit.outputs). Each shard's
sha256 goes into the index's metadata, and the loader refuses a shard that does not match.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import save_file

from .config import ModelConfig
from .errors import MoekitError
from .families import FAMILIES
from .hashing import sha256_file
from .model import MoEBlock, MoEModel
from .outputs import atomic_dir

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """Returns the HF config.json dict of a mixtral-family ModelConfig (the family moekit trains)."""
    if cfg.family != "mixtral":
        raise MoekitError(f"writing a fresh config.json is implemented for mixtral only, not {cfg.family}; "
                          "tools that rewrite other families copy and edit the original config.json")
    rope: dict[str, Any] = {"rope_type": cfg.rope.scaling, "rope_theta": cfg.rope.theta}
    if cfg.rope.scaling != "default":  # without these a scaled model reloads unscaled, or not at all
        rope["factor"] = cfg.rope.factor
    if cfg.rope.scaling == "yarn":
        rope.update(original_max_position_embeddings=cfg.rope.original_max_position,
                    beta_fast=cfg.rope.beta_fast, beta_slow=cfg.rope.beta_slow,
                    truncate=cfg.rope.truncate)
        if cfg.rope.attention_factor is not None:
            rope["attention_factor"] = cfg.rope.attention_factor
    return {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.expert_ffn, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "num_local_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.top_k, "hidden_act": "silu", "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope.theta, "rope_parameters": rope,
        "max_position_embeddings": cfg.max_position_embeddings, "sliding_window": cfg.sliding_window,
        "tie_word_embeddings": cfg.tie_word_embeddings, "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_ids[0] if len(cfg.eos_token_ids) == 1 else list(cfg.eos_token_ids) or None,
        "pad_token_id": cfg.pad_token_id, "torch_dtype": cfg.dtype, "attention_dropout": 0.0,
        "router_aux_loss_coef": 0.0, "output_router_logits": False, "use_cache": True,
        **({"moekit_pruning": {"experts_per_layer": list(cfg.experts_per_layer)}} if cfg.experts_per_layer else {}),
    }


def hf_tensors(model: MoEModel) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (HF tensor name, CPU tensor) for every weight of the model, one at a time."""
    cfg = model.config
    family = FAMILIES[cfg.family]
    yield "model.embed_tokens.weight", model.embed.weight
    yield "model.norm.weight", model.norm.weight
    if not cfg.tie_word_embeddings:
        yield "lm_head.weight", model.lm_head.weight
    for i, layer in enumerate(model.layers):
        attn = layer.attn
        in_norm, post_norm = family.norm_names(i)
        yield in_norm, layer.input_norm.weight
        yield post_norm, layer.post_norm.weight
        q, k, v = attn.qkv.weight.split([attn.q_dim, attn.kv_dim, attn.kv_dim])
        for part, w in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
            yield family.attn_name(i, part) + ".weight", w
        if cfg.qkv_bias:
            for part, b in zip(("q_proj", "k_proj", "v_proj"),
                               attn.qkv.bias.split([attn.q_dim, attn.kv_dim, attn.kv_dim])):
                yield family.attn_name(i, part) + ".bias", b
        yield family.attn_name(i, "o_proj") + ".weight", attn.o_proj.weight
        if cfg.o_bias:
            yield family.attn_name(i, "o_proj") + ".bias", attn.o_proj.bias
        if attn.q_norm is not None:
            yield family.attn_name(i, "q_norm") + ".weight", attn.q_norm.weight
            yield family.attn_name(i, "k_norm") + ".weight", attn.k_norm.weight
        mlp = layer.mlp
        if isinstance(mlp, MoEBlock):
            yield family.router_name(i), mlp.router.weight
            ffn = cfg.expert_ffn
            for e in range(cfg.experts_in(i)):
                gate, up, down = family.expert_names(i, e)
                yield gate, mlp.experts.gate_up[e, :ffn]
                yield up, mlp.experts.gate_up[e, ffn:]
                yield down, mlp.experts.down[e]
            if mlp.shared is not None:
                gate, up, down, sgate = family.shared_expert_names(i)
                sffn = cfg.shared_expert_ffn
                yield gate, mlp.shared.gate_up.weight[:sffn]
                yield up, mlp.shared.gate_up.weight[sffn:]
                yield down, mlp.shared.down.weight
                if mlp.shared_gate is not None:
                    yield sgate, mlp.shared_gate.weight
        else:
            gate, up, down = family.dense_mlp_names(i)
            ffn = cfg.dense_ffn
            yield gate, mlp.gate_up.weight[:ffn]
            yield up, mlp.gate_up.weight[ffn:]
            yield down, mlp.down.weight


def write_checkpoint(tensors: Iterator[tuple[str, torch.Tensor]], out: str | Path,
                     config: dict[str, Any], extra_files: dict[str, str | bytes] | None = None,
                     max_shard_bytes: int = 2 << 30, dtype: torch.dtype | None = None,
                     overwrite: bool = False) -> Path:
    """Returns `out` after writing tensors + config.json (+ extra files) there atomically.

    Tensors are written in shards of at most max_shard_bytes with model.safetensors.index.json,
    whose metadata carries each shard's sha256.
    Nothing is written until the whole folder is complete (outputs.atomic_dir: a temporary
    sibling renamed at the end, deleted on errors and signals). An existing `out` is refused
    unless it is empty, or `overwrite` is set and moekit wrote it (outputs.is_moekit_output).
    """
    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        weight_map: dict[str, str] = {}
        shards: list[dict[str, torch.Tensor]] = [{}]
        shard_bytes = 0
        total = 0
        files: list[str] = []

        def flush() -> None:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shards[-1], str(tmp / name), metadata={"format": "pt"})
            _test_pause()
            files.append(name)
            for key in shards[-1]:
                weight_map[key] = name
            shards[-1] = {}

        for name, tensor in tensors:
            t = tensor.detach().to("cpu", dtype or tensor.dtype).contiguous().clone()
            size = t.numel() * t.element_size()
            if shards[-1] and shard_bytes + size > max_shard_bytes:
                flush()
                shard_bytes = 0
            shards[-1][name] = t
            shard_bytes += size
            total += size
        if shards[-1]:
            flush()
        # name shards model-0000i-of-0000n as HF does, now that n is known
        renamed = {f: f.replace(".safetensors", f"-of-{len(files):05d}.safetensors") for f in files}
        for old, new in renamed.items():
            os.replace(tmp / old, tmp / new)
        weight_map = {k: renamed[v] for k, v in weight_map.items()}
        checksums = {f: sha256_file(tmp / f) for f in renamed.values()}
        index = {"metadata": {"total_size": total, "moekit_sha256": checksums}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for fname, content in (extra_files or {}).items():
            mode = "wb" if isinstance(content, bytes) else "w"
            with open(tmp / fname, mode) as f:
                f.write(content)
    return out


def _test_pause() -> None:
    """Sleeps MOEKIT_TEST_WRITE_PAUSE_S seconds after each shard (tests use it to signal a write
    midway at a known point); unset, it does nothing."""
    pause = os.environ.get("MOEKIT_TEST_WRITE_PAUSE_S")
    if pause:
        # short sleeps: a signal the kernel hands to another thread (the progress ticker, OpenMP
        # workers) does not interrupt the main thread's sleep; its handler runs at the next wake-up
        # (a CI run waited out a whole 60 s sleep after SIGINT)
        end = time.monotonic() + float(pause)
        while time.monotonic() < end:
            time.sleep(0.05)


def save_model(model: MoEModel, out: str | Path, dtype: torch.dtype | None = None,
               generation_config: dict[str, Any] | None = None, extra_files: dict[str, str | bytes] | None = None,
               overwrite: bool = False, max_shard_bytes: int = 2 << 30) -> Path:
    """Returns `out` after saving a mixtral-family model there in HF layout (see write_checkpoint)."""
    from .linear import Int8Linear

    if any(isinstance(m, Int8Linear) for m in model.modules()):
        raise MoekitError("this model's dense projections were quantized to int8 at load (--quantize-dense int8): "
                          "saving would write their rounded values; load it with bf16 dense weights to save")
    config = hf_config(model.config)
    if dtype is not None:
        config["torch_dtype"] = DTYPE_NAMES[dtype]
    files = dict(extra_files or {})
    if generation_config is not None:
        files["generation_config.json"] = json.dumps(generation_config, indent=2)
    with torch.no_grad():
        return write_checkpoint(hf_tensors(model), out, config, files, max_shard_bytes=max_shard_bytes,
                                dtype=dtype, overwrite=overwrite)
