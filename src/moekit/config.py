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
    scaling: str = "default"  # "default" | "linear" | "yarn" | "longrope" (its short factors)
    factor: float = 1.0  # context-extension factor (linear, yarn)
    original_max_position: int | None = None  # pretraining context (yarn)
    beta_fast: float = 32.0  # yarn: rotations above which a dimension is extrapolated
    beta_slow: float = 1.0  # yarn: rotations below which a dimension is interpolated
    attention_factor: float | None = None  # yarn: cos/sin scale; derived from factor when None
    truncate: bool = True  # yarn: round the correction range to whole dimensions
    mscale: float | None = None  # yarn (DeepSeek): with mscale_all_dim, sets attention_factor's numerator
    mscale_all_dim: float | None = None  # yarn (DeepSeek): its denominator; MLA also scales its softmax by it
    short_factor: tuple[float, ...] = ()  # longrope: per-frequency divisors for contexts up to original_max_position

    def __post_init__(self) -> None:
        if self.scaling not in ("default", "linear", "yarn", "longrope"):
            raise MoekitError(
                f"rope scaling '{self.scaling}' is not supported (supported: default, linear, yarn, longrope); "
                "remove rope_scaling from config.json to run at the model's original context length"
            )
        if self.factor <= 0:
            raise MoekitError(f"rope scaling factor must be > 0, got {self.factor}")


ROUTER_SCORINGS = ("softmax", "sigmoid", "sparsemixer")


@dataclass(frozen=True)
class RouterConfig:
    """How a router's logits become expert ids and weights (moekit.routers)."""

    scoring: str = "softmax"  # "softmax" over all experts | "sigmoid" per expert | "sparsemixer" (Phi-3.5-MoE)
    n_group: int = 1  # experts split into this many equal groups (DeepSeek's group-limited routing)
    topk_group: int = 1  # groups a token may pick its experts from (== n_group: no limit)
    correction_bias: bool = False  # a per-expert bias added to the scores for selection only (DeepSeek-V3)
    scaling_factor: float = 1.0  # routed weights are multiplied by this (routed_scaling_factor)
    jitter_eps: float = 0.0  # sparsemixer: relative logit gap past which an expert is masked out

    def __post_init__(self) -> None:
        if self.scoring not in ROUTER_SCORINGS:
            raise MoekitError(f"router scoring must be one of {', '.join(ROUTER_SCORINGS)}, got {self.scoring!r}")
        if self.n_group < 1 or not 1 <= self.topk_group <= self.n_group:
            raise MoekitError(f"router groups: n_group ({self.n_group}) must be >= 1 and topk_group "
                              f"({self.topk_group}) between 1 and n_group; fix n_group/topk_group in config.json")

    @property
    def group_limited(self) -> bool:
        """Whether a token picks its experts from only some of the groups."""
        return self.topk_group < self.n_group


@dataclass(frozen=True)
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2/V3): keys and values come from one compressed
    latent per position, which is what the KV cache stores (moekit.mla)."""

    kv_lora_rank: int  # r: width of the compressed key/value latent
    q_lora_rank: int | None  # q goes through a low-rank bottleneck of this width (None: one q_proj)
    qk_nope_head_dim: int  # per-head q/k dims without rope
    qk_rope_head_dim: int  # per-head q/k dims with rope (the key's rope part is one head, shared)
    v_head_dim: int  # per-head value dims
    rope_interleave: bool = True  # rope rotates interleaved pairs (x0, x1), (x2, x3) ... (DeepSeek)
    softmax_scale: float = 0.0  # 0: 1/sqrt(qk_nope_head_dim + qk_rope_head_dim)

    def __post_init__(self) -> None:
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if getattr(self, name) <= 0:
                raise MoekitError(f"MLA config field {name} must be > 0, got {getattr(self, name)}")
        if self.qk_rope_head_dim % 2:
            raise MoekitError(f"qk_rope_head_dim must be even (rope rotates pairs), got {self.qk_rope_head_dim}")

    @property
    def qk_head_dim(self) -> int:
        """Per-head width of q and k (no-rope part, then rope part)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim


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
    router: RouterConfig = field(default_factory=RouterConfig)
    norm: str = "rms"  # "rms" (RMSNorm) | "layernorm" (LayerNorm with bias, Phi-3.5-MoE)
    lm_head_bias: bool = False  # the LM head carries a bias
    rotary_dim: int = 0  # rope on the first rotary_dim dims of each head (0: all of head_dim)
    attention_scale: float | None = None  # softmax scale of attention (None: 1/sqrt(head_dim))
    embedding_multiplier: float = 1.0  # input embeddings are multiplied by this (Granite's muP)
    residual_multiplier: float = 1.0  # attention and MLP outputs are multiplied by this before the residual add
    logits_scaling: float = 1.0  # logits are divided by this
    mla: MLAConfig | None = None  # multi-head latent attention instead of grouped-query attention
    layer_types: tuple[str, ...] = ()  # per layer "sliding_attention" | "full_attention" (empty: all use sliding_window)
    attention_sinks: bool = False  # a learned per-head logit joins each softmax and is dropped after (gpt-oss)
    router_bias: bool = False  # the router linear carries a bias
    expert_act: str = "silu"  # "silu" (SwiGLU) | "clamped_swiglu" (gpt-oss: clamped, (up + 1) * g * sigmoid(alpha g))
    expert_bias: bool = False  # routed experts' gate_up and down projections carry biases
    swiglu_alpha: float = 1.702  # clamped_swiglu: sigmoid slope
    swiglu_limit: float = 7.0  # clamped_swiglu: gate clamped above, up clamped to +-limit

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
        if self.norm not in ("rms", "layernorm"):
            raise MoekitError(f"norm must be rms or layernorm, got {self.norm!r}")
        if not 0 <= self.rotary_dim <= self.head_dim or self.rotary_dim % 2:
            raise MoekitError(f"rotary_dim ({self.rotary_dim}) must be even and at most head_dim ({self.head_dim})")
        if self.logits_scaling == 0:
            raise MoekitError("logits_scaling must not be 0 (logits are divided by it)")
        if self.layer_types and (len(self.layer_types) != self.num_layers or
                                 set(self.layer_types) - {"sliding_attention", "full_attention"}):
            raise MoekitError(f"layer_types must give sliding_attention or full_attention for each of the "
                              f"{self.num_layers} layers, got {list(self.layer_types)}")
        if self.expert_act not in ("silu", "clamped_swiglu"):
            raise MoekitError(f"expert_act must be silu or clamped_swiglu, got {self.expert_act!r}")
        if self.router.scoring == "sparsemixer" and self.top_k != 2:
            raise MoekitError(f"sparsemixer routing picks exactly 2 experts; num_experts_per_tok is {self.top_k}")
        for layer in range(self.num_layers):
            count = self.experts_in(layer)
            if count and count % self.router.n_group:
                raise MoekitError(
                    f"layer {layer} has {count} experts, not a multiple of n_group ({self.router.n_group}): "
                    "group-limited routing needs equal groups (a pruned copy must keep whole groups)")

    def attention_config(self, layer: int) -> ModelConfig:
        """Returns the config layer `layer`'s attention sees: no sliding window on a full-attention
        layer of a model that alternates them (layer_types)."""
        if self.layer_types and self.layer_types[layer] == "full_attention" and self.sliding_window is not None:
            return dataclasses.replace(self, sliding_window=None)
        return self

    @property
    def plain_experts(self) -> bool:
        """Whether routed experts are plain SwiGLU without biases (what every stored form but
        experts.clamped's computes)."""
        return self.expert_act == "silu" and not self.expert_bias

    @property
    def rope_dim(self) -> int:
        """Returns the per-head width that rope rotates (MLA: the rope part of q and k)."""
        if self.mla is not None:
            return self.mla.qk_rope_head_dim
        return self.rotary_dim or self.head_dim

    def kv_cache_dims(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """Returns ((heads, dims) of the cached keys, (heads, dims) of the cached values) per position.

        MLA caches its compressed latent [1, r] as the keys and the shared rope key [1, dr] as the
        values (moekit.mla), not expanded heads."""
        if self.mla is not None:
            return (1, self.mla.kv_lora_rank), (1, self.mla.qk_rope_head_dim)
        return (self.num_kv_heads, self.head_dim), (self.num_kv_heads, self.head_dim)

    @property
    def kv_values_per_position(self) -> int:
        """Returns the values the KV cache holds per position, per layer and sequence."""
        (hk, dk), (hv, dv) = self.kv_cache_dims()
        return hk * dk + hv * dv

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
