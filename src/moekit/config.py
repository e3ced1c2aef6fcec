"""ModelConfig: everything the decoder needs to know about a model, as one frozen dataclass.

It is built from a Hugging Face ``config.json`` by the model's family module (``families/``),
and written back with :meth:`ModelConfig.to_dict` so that tools can report it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from .errors import MoekitError


@dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding: base and optional context-extension scaling."""

    theta: float = 10000.0  # base of the inverse frequencies
    scaling: str = "default"  # "default" | "linear" | "yarn"
    factor: float = 1.0  # context-extension factor (linear, yarn)
    original_max_position: int | None = None  # pretraining context (yarn)
    beta_fast: float = 32.0  # yarn: rotations above which a dimension is extrapolated
    beta_slow: float = 1.0  # yarn: rotations below which a dimension is interpolated
    attention_factor: float | None = None  # yarn: cos/sin scale; derived from factor when None
    truncate: bool = True  # yarn: round the correction range to whole dimensions

    def __post_init__(self) -> None:
        if self.scaling not in ("default", "linear", "yarn"):
            raise MoekitError(
                f"rope scaling '{self.scaling}' is not supported (supported: default, linear, yarn); "
                "remove rope_scaling from config.json to run at the model's original context length"
            )
        if self.factor <= 0:
            raise MoekitError(f"rope scaling factor must be > 0, got {self.factor}")


@dataclass(frozen=True)
class ModelConfig:
    """Shape and quirks of a decoder-only MoE model (one per checkpoint)."""

    family: str  # HF model_type this came from: mixtral, qwen2_moe, qwen3_moe, olmoe
    vocab_size: int  # V: rows of the embedding and of the LM head
    hidden_size: int  # D: width of the residual stream
    num_layers: int  # L: decoder layers
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (grouped-query attention when < num_heads)
    head_dim: int  # width of one head
    num_experts: int  # E: routed experts per MoE layer
    top_k: int  # A: experts activated per token
    expert_ffn: int  # I: hidden width of one routed expert
    moe_layers: tuple[bool, ...]  # per layer: True = MoE block, False = dense MLP
    dense_ffn: int = 0  # hidden width of the dense MLP of non-MoE layers
    norm_topk_prob: bool = True  # renormalise the top-k router probabilities to sum to 1
    shared_expert_ffn: int = 0  # hidden width of the always-on shared expert (0 = none)
    shared_expert_gate: bool = False  # shared expert output scaled by sigmoid(x @ w_gate)
    qkv_bias: bool = False  # q/k/v projections carry a bias
    o_bias: bool = False  # output projection carries a bias
    qk_norm: str = "none"  # "none" | "head" (RMSNorm per head) | "full" (over the whole projection)
    clip_qkv: float | None = None  # clamp q, k, v to [-clip, clip] after projection
    rms_norm_eps: float = 1e-6  # epsilon of every RMSNorm
    rope: RopeConfig = field(default_factory=RopeConfig)
    max_position_embeddings: int = 4096  # longest context the model was configured for
    sliding_window: int | None = None  # attend only to the last N positions (None = full)
    tie_word_embeddings: bool = False  # LM head shares the embedding matrix
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()  # generation stops at any of these
    pad_token_id: int | None = None
    dtype: str = "float32"  # dtype the checkpoint was saved in
    experts_per_layer: tuple[int, ...] = ()  # per layer, after global pruning (empty: num_experts everywhere)

    def __post_init__(self) -> None:
        positive = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                    "head_dim", "num_experts", "top_k", "expert_ffn")
        for name in positive:
            if getattr(self, name) <= 0:
                raise MoekitError(f"config field {name} must be > 0, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise MoekitError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})")
        if self.top_k > self.num_experts:
            raise MoekitError(
                f"num_experts_per_tok ({self.top_k}) is larger than the number of experts "
                f"({self.num_experts})")
        if len(self.moe_layers) != self.num_layers:
            raise MoekitError(
                f"moe_layers has {len(self.moe_layers)} entries for {self.num_layers} layers")
        if not all(self.moe_layers) and self.dense_ffn <= 0:
            raise MoekitError("a model with dense (non-MoE) layers needs intermediate_size > 0")
        if self.experts_per_layer:
            if len(self.experts_per_layer) != self.num_layers:
                raise MoekitError(f"experts_per_layer has {len(self.experts_per_layer)} entries for "
                                  f"{self.num_layers} layers")
            for layer, count in enumerate(self.experts_per_layer):
                if self.moe_layers[layer] and not self.top_k <= count <= self.num_experts:
                    raise MoekitError(f"layer {layer} keeps {count} experts; it needs between top-k "
                                      f"({self.top_k}) and num_experts ({self.num_experts})")
        if self.qk_norm not in ("none", "head", "full"):
            raise MoekitError(f"qk_norm must be none, head or full, got {self.qk_norm!r}")

    # Derived sizes, in parameters (not bytes): what `moekit inspect` reports.
    @property
    def num_moe_layers(self) -> int:
        """Number of layers with a routed-expert block."""
        return sum(self.moe_layers)

    @property
    def params_per_expert(self) -> int:
        """Parameters of one routed expert (gate, up and down projections)."""
        return 3 * self.hidden_size * self.expert_ffn

    def experts_in(self, layer: int) -> int:
        """Returns the number of routed experts of `layer` (0 for a dense layer)."""
        if not self.moe_layers[layer]:
            return 0
        return self.experts_per_layer[layer] if self.experts_per_layer else self.num_experts

    @property
    def expert_params(self) -> int:
        """Parameters in all routed experts of the model."""
        return sum(self.experts_in(i) for i in range(self.num_layers)) * self.params_per_expert

    def to_dict(self) -> dict[str, Any]:
        """Returns the config as plain JSON-able values."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """Returns the config as a JSON string."""
        return json.dumps(self.to_dict(), indent=2)
