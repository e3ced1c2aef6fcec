"""What every family shares: HF config parsing helpers and the llama-style weight names.

A family module subclasses :class:`Family`, says how its ``config.json`` maps onto
:class:`~moekit.config.ModelConfig`, and where its MoE weights live in the checkpoint.
"""

from __future__ import annotations

from typing import Any

from .. import fp8
from ..config import ModelConfig, RopeConfig
from ..errors import UnsupportedModelError


class Family:
    """A Hugging Face architecture moekit can run; subclasses override the class attributes."""

    name: str = ""  # HF model_type
    architectures: tuple[str, ...] = ()  # HF `architectures` entries that mean this family
    moe_prefix: str = "mlp"  # module holding router + experts: model.layers.{l}.<moe_prefix>
    router_module: str = "gate"  # router linear inside moe_prefix
    expert_proj: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # gate, up, down

    # ---- config -------------------------------------------------------------------------
    def config(self, hf: dict[str, Any]) -> ModelConfig:
        """Returns the ModelConfig for this family's HF config dict."""
        raise NotImplementedError

    # ---- weight names (HF checkpoint layout) --------------------------------------------
    def layer_prefix(self, layer: int) -> str:
        return f"model.layers.{layer}"

    def attn_name(self, layer: int, part: str) -> str:
        """Returns the tensor name of q_proj/k_proj/v_proj/o_proj/q_norm/k_norm (+ .weight/.bias)."""
        return f"{self.layer_prefix(layer)}.self_attn.{part}"

    def norm_names(self, layer: int) -> tuple[str, str]:
        """Returns (input norm, post-attention norm) weight names."""
        p = self.layer_prefix(layer)
        return f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight"

    def router_name(self, layer: int) -> str:
        return f"{self.layer_prefix(layer)}.{self.moe_prefix}.{self.router_module}.weight"

    def router_bias_name(self, layer: int) -> str:
        """Returns the name of the router's selection bias [E] (DeepSeek-V3's e_score_correction_bias)."""
        return f"{self.layer_prefix(layer)}.{self.moe_prefix}.{self.router_module}.e_score_correction_bias"

    def expert_names(self, layer: int, expert: int) -> tuple[str, str, str]:
        """Returns the (gate, up, down) weight names of one routed expert."""
        p = f"{self.layer_prefix(layer)}.{self.moe_prefix}.experts.{expert}"
        return tuple(f"{p}.{proj}.weight" for proj in self.expert_proj)  # type: ignore[return-value]

    def stacked_expert_names(self, layer: int) -> tuple[str, str]:
        """Returns the (gate_up [E, 2I, D], down [E, D, I]) names of the fused layout some tools save."""
        p = f"{self.layer_prefix(layer)}.{self.moe_prefix}.experts"
        return f"{p}.gate_up_proj", f"{p}.down_proj"

    def stacked_expert_extras(self, layer: int) -> tuple[str, ...]:
        """Returns the names of other stacked per-expert tensors [E, ...] (gpt-oss's expert biases)."""
        return ()

    def shared_expert_names(self, layer: int) -> tuple[str, str, str, str]:
        """Returns (gate, up, down, sigmoid-gate) names of the shared expert."""
        p = f"{self.layer_prefix(layer)}.{self.moe_prefix}.shared_expert"
        return (f"{p}.gate_proj.weight", f"{p}.up_proj.weight", f"{p}.down_proj.weight",
                f"{self.layer_prefix(layer)}.{self.moe_prefix}.shared_expert_gate.weight")

    def dense_mlp_names(self, layer: int) -> tuple[str, str, str]:
        """Returns (gate, up, down) names of a dense (non-MoE) layer's MLP."""
        p = f"{self.layer_prefix(layer)}.mlp"
        return f"{p}.gate_proj.weight", f"{p}.up_proj.weight", f"{p}.down_proj.weight"


# ---- helpers shared by the family modules ---------------------------------------------

def require(hf: dict[str, Any], key: str, family: str) -> Any:
    """Returns hf[key], or raises a clear error naming the missing config field."""
    if key not in hf or hf[key] is None:
        raise UnsupportedModelError(f"config.json of this {family} model has no '{key}'")
    return hf[key]


def first(hf: dict[str, Any], *keys: str, default: Any = None) -> Any:
    """Returns the value of the first key present (and not None) in hf."""
    for key in keys:
        if hf.get(key) is not None:
            return hf[key]
    return default


def check_activation(hf: dict[str, Any], family: str) -> None:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(
            f"{family}: hidden_act '{act}' is not supported (moekit implements silu/SwiGLU experts)")


def check_not_foreign_quantized(hf: dict[str, Any], family: str) -> None:
    """Refuses a checkpoint quantized by another tool: its tensors would read as garbage."""
    quant = hf.get("quantization_config") or {}
    method = quant.get("quant_method")
    if method is None or method == "moekit":
        return
    if method == "fp8":  # block-scaled e4m3 weights are dequantized as they are read (moekit.fp8)
        fp8.block_size(hf, f"config.json of this {family} model")
        return
    raise UnsupportedModelError(
        f"{family}: quantization_config.quant_method '{method}' is not read by moekit; use the unquantized "
        "checkpoint (moekit compress writes its own compressed copy)")


def rope_from_hf(hf: dict[str, Any]) -> RopeConfig:
    """Returns the RopeConfig of an HF config, in either the v4 (rope_theta + rope_scaling)
    or the v5 (rope_parameters) spelling."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    merged = {**scaling, **params}
    theta = float(first(merged, "rope_theta", default=first(hf, "rope_theta", default=10000.0)))
    kind = first(merged, "rope_type", "type", default="default")
    if kind in ("default", None):
        return RopeConfig(theta=theta)
    if kind in ("linear", "yarn") and merged.get("factor") is None:
        raise UnsupportedModelError(f"rope scaling '{kind}' in config.json has no 'factor'; "
                                    "add it (the context-extension factor) or remove the scaling")
    if kind == "linear":
        return RopeConfig(theta=theta, scaling="linear", factor=float(merged["factor"]))
    if kind == "longrope":
        original = first(merged, "original_max_position_embeddings", default=hf.get("original_max_position_embeddings"))
        if not merged.get("short_factor") or original is None:
            raise UnsupportedModelError("longrope scaling in config.json needs short_factor and "
                                        "original_max_position_embeddings")
        max_pos = int(first(hf, "max_position_embeddings", default=original))
        return RopeConfig(
            theta=theta, scaling="longrope", factor=float(merged.get("factor") or max_pos / int(original)),
            original_max_position=int(original), short_factor=tuple(float(f) for f in merged["short_factor"]),
            # Phi-3.5 scales cos and sin by short_mscale up to the original context
            attention_factor=first(merged, "short_mscale", "attention_factor"))
    if kind == "yarn":
        return RopeConfig(
            theta=theta, scaling="yarn", factor=float(merged["factor"]),
            original_max_position=int(first(merged, "original_max_position_embeddings",
                                             default=hf.get("max_position_embeddings", 4096))),
            beta_fast=float(merged.get("beta_fast") or 32.0),
            beta_slow=float(merged.get("beta_slow") or 1.0),
            attention_factor=merged.get("attention_factor"),
            truncate=bool(merged.get("truncate", True)),
            mscale=merged.get("mscale"),
            mscale_all_dim=merged.get("mscale_all_dim"),
        )
    return RopeConfig(theta=theta, scaling=str(kind))  # raises the "not supported" error


def context_length(hf: dict[str, Any]) -> int:
    """Returns the longest context moekit runs the model at: max_position_embeddings, or for
    longrope (whose long-context factors moekit does not apply) its original context."""
    max_pos = int(first(hf, "max_position_embeddings", default=4096))
    rope = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    if first(rope, "rope_type", "type") == "longrope":
        original = first(rope, "original_max_position_embeddings", default=hf.get("original_max_position_embeddings"))
        return min(max_pos, int(original)) if original else max_pos
    return max_pos


def eos_ids(value: Any) -> tuple[int, ...]:
    """Returns eos_token_id (an int, a list, or None) as a tuple."""
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def common_fields(hf: dict[str, Any], family: str) -> dict[str, Any]:
    """Returns the ModelConfig fields that every supported family spells the same way."""
    check_activation(hf, family)
    check_not_foreign_quantized(hf, family)
    hidden = int(require(hf, "hidden_size", family))
    heads = int(require(hf, "num_attention_heads", family))
    return dict(
        family=family,
        vocab_size=int(require(hf, "vocab_size", family)),
        hidden_size=hidden,
        num_layers=int(require(hf, "num_hidden_layers", family)),
        num_heads=heads,
        num_kv_heads=int(first(hf, "num_key_value_heads", default=heads)),
        head_dim=int(first(hf, "head_dim", default=hidden // heads)),
        rms_norm_eps=float(first(hf, "rms_norm_eps", default=1e-6)),
        rope=rope_from_hf(hf),
        max_position_embeddings=context_length(hf),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids(hf.get("eos_token_id")),
        pad_token_id=hf.get("pad_token_id"),
        dtype=str(first(hf, "torch_dtype", "dtype", default="float32")),
        # written by `moekit prune --scope global` when layers keep different numbers of experts
        experts_per_layer=tuple(int(n) for n in (hf.get("moekit_pruning") or {}).get("experts_per_layer") or ()),
    )
