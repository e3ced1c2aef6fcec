"""gpt-oss (openai/gpt-oss-20b, -120b): attention sinks (moekit.sinks), sliding-window and full
attention alternating by `layer_types`, biases on q/k/v/o and on the router, top-k of the raw
router logits with a softmax over the k, and experts stored stacked, transposed, gate/up
interleaved and biased, with the clamped SwiGLU (moekit.experts.clamped; `swiglu_alpha`,
`swiglu_limit`). The released checkpoints keep the experts in MXFP4 (quant_method "mxfp4"): they
load as that stored form (experts.clamped.Mxfp4ClampedForm), every other tensor as stored. On CUDA
decode steps the sink attention (cache write, window, GQA) is one Triton kernel (moekit.sinks), over
a KVCache and over the serving PagedKVCache alike; the q/k/v biases ride in the qkv projection's GEMM."""

from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from ..errors import UnsupportedModelError
from .base import Family, common_fields, first, require


class GptOss(Family):
    name = "gpt_oss"
    architectures = ("GptOssForCausalLM",)
    router_module = "router"

    def config(self, hf: dict[str, Any]) -> ModelConfig:
        plain = {**hf, "hidden_act": "silu"}  # the experts' own activation is set below
        if (hf.get("quantization_config") or {}).get("quant_method") == "mxfp4":
            if int(hf["hidden_size"]) % 32 or int(require(hf, "intermediate_size", self.name)) % 32:
                raise UnsupportedModelError("gpt_oss MXFP4: hidden_size and intermediate_size must be multiples "
                                            "of 32 (one E8M0 scale per 32 values)")
            del plain["quantization_config"]  # only the experts are MXFP4, read by their stored form
        fields = common_fields(plain, self.name)
        bias = bool(hf.get("attention_bias", True))
        layers = fields["num_layers"]
        layer_types = tuple(hf.get("layer_types") or
                            ("sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)))
        return ModelConfig(
            **fields,
            num_experts=int(require(hf, "num_local_experts", self.name)),
            top_k=int(require(hf, "num_experts_per_tok", self.name)),
            expert_ffn=int(require(hf, "intermediate_size", self.name)),
            moe_layers=(True,) * layers,
            norm_topk_prob=True,  # softmax over the k best logits == top-k of the softmax, renormalised
            qkv_bias=bias,
            o_bias=bias,
            sliding_window=hf.get("sliding_window") or None,
            layer_types=layer_types,
            attention_sinks=True,
            router_bias=True,
            expert_act="clamped_swiglu",
            expert_bias=True,
            swiglu_alpha=float(first(hf, "swiglu_alpha", default=1.702)),
            swiglu_limit=float(first(hf, "swiglu_limit", default=7.0)),
        )

    def router_bias_name(self, layer: int) -> str:
        return f"{self.layer_prefix(layer)}.{self.moe_prefix}.router.bias"

    def stacked_expert_extras(self, layer: int) -> tuple[str, ...]:
        """Returns the expert biases and, in MXFP4 checkpoints, the blocks and scales of each matrix."""
        return tuple(name + suffix for name in self.stacked_expert_names(layer)
                     for suffix in ("_bias", "_blocks", "_scales"))


FAMILY = GptOss()
