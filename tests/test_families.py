"""Families: config.json -> ModelConfig for each architecture, weight names, clear refusals."""

from __future__ import annotations

import json

import pytest

import moekit
from moekit.config import ModelConfig
from moekit.families import FAMILIES, family_for, supported
from moekit.families.qwen2_moe import moe_layer_flags

from conftest import FAMILY_VARIANTS, VOCAB


def _hf_dict(tiny, variant: str) -> dict:
    return json.loads((tiny(variant).path / "config.json").read_text())


def test_supported_families():
    assert set(FAMILIES) == {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe", "phimoe",
                             "deepseek_v2", "deepseek_v3", "glm4_moe", "gpt_oss"}
    assert supported() == ("deepseek_v2, deepseek_v3, glm4_moe, gpt_oss, granitemoe, mixtral, olmoe, phimoe, "
                           "qwen2_moe, qwen3_moe")


@pytest.mark.parametrize("variant", FAMILY_VARIANTS + ["mixtral_tied", "mixtral_sliding", "granitemoe", "phimoe"])
def test_config_matches_transformers(tiny, variant):
    hf = tiny(variant).hf.config
    _, family, cfg = moekit.read_config(tiny(variant).path)
    assert family.name == cfg.family == hf.model_type
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers) == (VOCAB, hf.hidden_size, hf.num_hidden_layers)
    assert (cfg.num_heads, cfg.num_kv_heads) == (hf.num_attention_heads, hf.num_key_value_heads)
    assert cfg.head_dim == (getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads)
    assert cfg.top_k == hf.num_experts_per_tok
    assert cfg.tie_word_embeddings == hf.tie_word_embeddings
    assert cfg.rms_norm_eps == pytest.approx(hf.rms_norm_eps)
    assert cfg.max_position_embeddings == hf.max_position_embeddings


def test_mixtral_fields(tiny):
    _, family, cfg = moekit.read_config(tiny("mixtral_sliding").path)
    assert cfg.num_experts == 4 and cfg.expert_ffn == 48 and cfg.norm_topk_prob
    assert cfg.moe_layers == (True, True) and cfg.sliding_window == 5
    assert family.expert_names(1, 3) == tuple(
        f"model.layers.1.block_sparse_moe.experts.3.{p}.weight" for p in ("w1", "w3", "w2"))
    assert family.router_name(0) == "model.layers.0.block_sparse_moe.gate.weight"
    assert moekit.read_config(tiny("mixtral").path)[2].sliding_window is None


def test_qwen2_moe_fields(tiny):
    _, family, cfg = moekit.read_config(tiny("qwen2_moe").path)
    assert cfg.moe_layers == (True, False, True)  # mlp_only_layers=[1]
    assert cfg.dense_ffn == 48 and cfg.expert_ffn == 24
    assert cfg.shared_expert_ffn == 40 and cfg.shared_expert_gate
    assert cfg.qkv_bias and not cfg.o_bias and not cfg.norm_topk_prob
    assert cfg.sliding_window is None  # qwen2_moe writes sliding_window but never uses it
    assert family.shared_expert_names(0)[3] == "model.layers.0.mlp.shared_expert_gate.weight"
    step = moekit.read_config(tiny("qwen2_moe_step").path)[2]
    assert step.moe_layers == (False, True, False) and step.norm_topk_prob


def test_qwen3_moe_fields(tiny):
    cfg = moekit.read_config(tiny("qwen3_moe").path)[2]
    assert cfg.head_dim == 16 != cfg.hidden_size // cfg.num_heads
    assert cfg.qk_norm == "head" and cfg.norm_topk_prob and not cfg.qkv_bias
    assert cfg.num_experts == 4 and cfg.expert_ffn == 24 and cfg.shared_expert_ffn == 0


def test_olmoe_fields(tiny):
    plain = moekit.read_config(tiny("olmoe").path)[2]
    clip = moekit.read_config(tiny("olmoe_clip").path)[2]
    assert plain.qk_norm == clip.qk_norm == "full"
    assert plain.clip_qkv is None and clip.clip_qkv == pytest.approx(0.3)
    assert not plain.norm_topk_prob and plain.num_experts == 4
    assert clip.qkv_bias and clip.o_bias and not plain.o_bias


def test_granitemoe_fields(tiny):
    _, family, cfg = moekit.read_config(tiny("granitemoe").path)
    assert (cfg.embedding_multiplier, cfg.residual_multiplier, cfg.logits_scaling) == (3.0, 0.6, 2.5)
    assert cfg.attention_scale == pytest.approx(0.2) and cfg.norm_topk_prob
    assert cfg.qkv_bias and cfg.o_bias and cfg.expert_ffn == 48 and cfg.num_experts == 4
    assert family.router_name(1) == "model.layers.1.block_sparse_moe.router.layer.weight"
    assert family.stacked_expert_names(0) == ("model.layers.0.block_sparse_moe.input_linear.weight",
                                              "model.layers.0.block_sparse_moe.output_linear.weight")


def test_phimoe_fields(tiny):
    _, family, cfg = moekit.read_config(tiny("phimoe").path)
    assert cfg.norm == "layernorm" and cfg.lm_head_bias and cfg.qkv_bias and cfg.o_bias
    assert cfg.router.scoring == "sparsemixer" and cfg.router.jitter_eps == pytest.approx(0.01)
    assert not cfg.norm_topk_prob and cfg.sliding_window == 6
    assert family.expert_names(0, 2) == tuple(
        f"model.layers.0.block_sparse_moe.experts.2.{p}.weight" for p in ("w1", "w3", "w2"))


def test_phimoe_longrope_runs_its_original_context(tiny):
    """Phi-3.5-MoE's longrope: the short factors and short_mscale, and the context capped at
    original_max_position_embeddings (the long factors past it are not applied)."""
    cfg = moekit.read_config(tiny("phimoe_longrope").path)[2]
    assert cfg.rope.scaling == "longrope" and cfg.rope.short_factor == (1.0, 1.3, 2.1, 3.7)
    assert cfg.rope.attention_factor == pytest.approx(1.19) and cfg.max_position_embeddings == 64


def test_family_specific_refusals(tiny):
    phi = _hf_dict(tiny, "phimoe")
    with pytest.raises(moekit.MoekitError, match="sparsemixer routing picks exactly 2"):
        FAMILIES["phimoe"].config({**phi, "num_experts_per_tok": 3})
    # longrope needs its short factors (one per rotated pair)
    longrope = {**phi, "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "long_factor": [1.0],
                                           "original_max_position_embeddings": 64}}
    with pytest.raises(moekit.UnsupportedModelError, match="longrope scaling in config.json needs short_factor"):
        FAMILIES["phimoe"].config(longrope)
    for unsupported in ("granitemoeshared", "granitemoehybrid", "dbrx", "llama4_text"):
        with pytest.raises(moekit.UnsupportedModelError, match=f"'{unsupported}' .* is not supported"):
            family_for({"model_type": unsupported})


def test_deepseek_fields(tiny):
    _, family, v2 = moekit.read_config(tiny("deepseek_v2").path)
    assert v2.moe_layers == (False, True, True) and v2.dense_ffn == 40 and v2.expert_ffn == 24
    assert v2.shared_expert_ffn == 2 * 24 and not v2.shared_expert_gate
    assert v2.mla.q_lora_rank is None and v2.mla.kv_lora_rank == 16 and v2.mla.rope_interleave
    assert (v2.mla.qk_nope_head_dim, v2.mla.qk_rope_head_dim, v2.mla.v_head_dim) == (8, 4, 12)
    assert v2.rope_dim == 4 and v2.kv_values_per_position == 16 + 4
    assert v2.router.scoring == "softmax" and not v2.router.group_limited and v2.router.scaling_factor == 1.5
    assert family.shared_expert_names(1)[0] == "model.layers.1.mlp.shared_experts.gate_proj.weight"
    group = moekit.read_config(tiny("deepseek_v2_group").path)[2]
    assert (group.router.n_group, group.router.topk_group) == (4, 2) and group.mla.q_lora_rank == 24
    assert group.rope.scaling == "yarn" and group.rope.mscale_all_dim == pytest.approx(0.7)
    _, family, v3 = moekit.read_config(tiny("deepseek_v3").path)
    r = v3.router
    assert r.scoring == "sigmoid" and r.correction_bias and (r.n_group, r.topk_group) == (4, 2)
    assert r.scaling_factor == 2.5 and v3.norm_topk_prob and v3.top_k == 3
    assert family.router_bias_name(2) == "model.layers.2.mlp.gate.e_score_correction_bias"
    plain = moekit.read_config(tiny("deepseek_v3_plain").path)[2]
    assert not plain.mla.rope_interleave and not plain.norm_topk_prob and not plain.router.group_limited


def test_glm4_moe_fields(tiny):
    _, family, cfg = moekit.read_config(tiny("glm4_moe").path)
    assert cfg.rotary_dim == cfg.rope_dim == 8 and cfg.head_dim == 16 and cfg.qk_norm == "head"
    assert cfg.qkv_bias and not cfg.o_bias and cfg.moe_layers == (False, True, True)
    assert cfg.router.scoring == "sigmoid" and cfg.router.correction_bias and cfg.router.scaling_factor == 1.5
    assert cfg.shared_expert_ffn == 24 and not cfg.shared_expert_gate and cfg.mla is None
    assert family.shared_expert_names(1)[2] == "model.layers.1.mlp.shared_experts.down_proj.weight"
    plain = moekit.read_config(tiny("glm4_moe_plain").path)[2]
    assert plain.rotary_dim == 2 and plain.qk_norm == "none" and not plain.norm_topk_prob
    # GLM-4.5's own config.json spells the factor at the top level
    hf = _hf_dict(tiny, "glm4_moe_plain")
    hf["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    assert FAMILIES["glm4_moe"].config({**hf, "partial_rotary_factor": 0.5}).rotary_dim == 4
    assert FAMILIES["glm4_moe"].config(hf).rotary_dim == 4  # transformers' default: half


def test_gpt_oss_fields(tiny):
    _, family, cfg = moekit.read_config(tiny("gpt_oss").path)
    assert cfg.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
    assert [cfg.attention_config(i).sliding_window for i in range(3)] == [5, None, 5]
    assert cfg.attention_sinks and cfg.router_bias and cfg.qkv_bias and cfg.o_bias
    assert cfg.expert_act == "clamped_swiglu" and cfg.expert_bias and not cfg.plain_experts
    assert (cfg.swiglu_alpha, cfg.swiglu_limit) == (pytest.approx(1.702), pytest.approx(0.6))
    assert cfg.rope.scaling == "yarn" and cfg.rope.factor == 32 and not cfg.rope.truncate
    assert family.router_name(0) == "model.layers.0.mlp.router.weight"
    assert family.router_bias_name(0) == "model.layers.0.mlp.router.bias"
    assert family.stacked_expert_extras(1)[:2] == ("model.layers.1.mlp.experts.gate_up_proj_bias",
                                                   "model.layers.1.mlp.experts.gate_up_proj_blocks")
    hf = _hf_dict(tiny, "gpt_oss")
    del hf["layer_types"]  # transformers' default: even layers sliding, odd full
    assert FAMILIES["gpt_oss"].config(hf).layer_types == cfg.layer_types
    mxfp4 = {**hf, "quantization_config": {"quant_method": "mxfp4"}}
    with pytest.raises(moekit.UnsupportedModelError, match="MXFP4: hidden_size and intermediate_size must be multiples of 32"):
        FAMILIES["gpt_oss"].config(mxfp4)  # the tiny model's experts are 24 wide
    assert FAMILIES["gpt_oss"].config({**mxfp4, "hidden_size": 64, "intermediate_size": 32}).expert_bias
    with pytest.raises(moekit.MoekitError, match="layer_types must give"):
        FAMILIES["gpt_oss"].config({**hf, "layer_types": ["full_attention"]})


def test_deepseek_refusals(tiny):
    v2 = _hf_dict(tiny, "deepseek_v2")
    with pytest.raises(moekit.UnsupportedModelError, match="topk_method 'noaux_tc' is not supported"):
        FAMILIES["deepseek_v2"].config({**v2, "topk_method": "noaux_tc"})
    with pytest.raises(moekit.UnsupportedModelError, match="moe_layer_freq 2 is not supported"):
        FAMILIES["deepseek_v2"].config({**v2, "moe_layer_freq": 2})
    with pytest.raises(moekit.UnsupportedModelError, match="scoring_func 'sigmoid' is not supported"):
        FAMILIES["deepseek_v2"].config({**v2, "scoring_func": "sigmoid"})
    # DeepSeek-V2-Lite's own spelling: rope_scaling with "type", moe_layer_freq 1, softmax scoring
    lite = {**v2, "moe_layer_freq": 1, "scoring_func": "softmax", "rope_parameters": None,
            "rope_scaling": {"type": "yarn", "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                             "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1}}
    rope = FAMILIES["deepseek_v2"].config(lite).rope
    assert rope.scaling == "yarn" and rope.factor == 40 and rope.mscale_all_dim == pytest.approx(0.707)
    v3 = _hf_dict(tiny, "deepseek_v3")
    fp8 = {**v3, "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}
    assert FAMILIES["deepseek_v3"].config(fp8).mla is not None  # block-scaled FP8: dequantized as read
    per_tensor = {**v3, "quantization_config": {"quant_method": "fp8", "activation_scheme": "static"}}
    with pytest.raises(moekit.UnsupportedModelError, match="block-scaled e4m3 weights only.*convert"):
        FAMILIES["deepseek_v3"].config(per_tensor)
    with pytest.raises(moekit.UnsupportedModelError, match="quant_method 'gptq' is not read by moekit"):
        FAMILIES["mixtral"].config(_mixtral_dict(tiny, quantization_config={"quant_method": "gptq"}))
    # a pruned copy that keeps 6 of 8 experts cannot keep 4 equal groups
    with pytest.raises(moekit.MoekitError, match="not a multiple of n_group \\(4\\)"):
        FAMILIES["deepseek_v3"].config({**v3, "n_routed_experts": 6})


@pytest.mark.parametrize("layers, mlp_only, step, expected", [
    (4, [], 1, (True, True, True, True)),
    (4, [0, 3], 1, (False, True, True, False)),
    (4, [], 2, (False, True, False, True)),
    (6, [1], 3, (False, False, True, False, False, True)),
])
def test_moe_layer_flags(layers, mlp_only, step, expected):
    hf = {"mlp_only_layers": mlp_only, "decoder_sparse_step": step}
    assert moe_layer_flags(hf, layers, 8) == expected
    assert moe_layer_flags(hf, layers, 0) == (False,) * layers


def test_family_from_architectures_only():
    hf = {"architectures": ["Qwen3MoeForCausalLM"]}
    assert family_for(hf).name == "qwen3_moe"


def test_unknown_family_names_where_and_the_options():
    with pytest.raises(moekit.UnsupportedModelError) as info:
        family_for({"model_type": "dbrx", "architectures": ["DbrxForCausalLM"]},
                   where="/models/x/config.json")
    message = str(info.value)
    assert "/models/x/config.json" in message and "'dbrx'" in message
    assert supported() in message


def _mixtral_dict(tiny, **changes):
    hf = _hf_dict(tiny, "mixtral")
    hf.update(changes)
    return hf


def test_refusals(tiny):
    mixtral = FAMILIES["mixtral"]
    with pytest.raises(moekit.UnsupportedModelError, match="hidden_act 'gelu'"):
        mixtral.config(_mixtral_dict(tiny, hidden_act="gelu"))
    hf = _mixtral_dict(tiny)
    del hf["num_local_experts"]
    with pytest.raises(moekit.UnsupportedModelError, match="no 'num_local_experts'"):
        mixtral.config(hf)
    qwen = _hf_dict(tiny, "qwen2_moe")
    qwen["use_sliding_window"] = True
    with pytest.raises(moekit.UnsupportedModelError, match="use_sliding_window"):
        FAMILIES["qwen2_moe"].config(qwen)
    with pytest.raises(moekit.MoekitError, match="multiple of"):
        mixtral.config(_mixtral_dict(tiny, num_key_value_heads=3))
    with pytest.raises(moekit.MoekitError, match="num_experts_per_tok \\(5\\)"):
        mixtral.config(_mixtral_dict(tiny, num_experts_per_tok=5))


def _config(**changes) -> ModelConfig:
    fields = dict(family="mixtral", vocab_size=10, hidden_size=8, num_layers=2, num_heads=2,
                  num_kv_heads=1, head_dim=4, num_experts=4, top_k=2, expert_ffn=6,
                  moe_layers=(True, True))
    fields.update(changes)
    return ModelConfig(**fields)


def test_model_config_validation():
    with pytest.raises(moekit.MoekitError, match="hidden_size must be > 0"):
        _config(hidden_size=0)
    with pytest.raises(moekit.MoekitError, match="moe_layers has 1 entries for 2 layers"):
        _config(moe_layers=(True,))
    with pytest.raises(moekit.MoekitError, match="intermediate_size > 0"):
        _config(moe_layers=(True, False))
    with pytest.raises(moekit.MoekitError, match="qk_norm"):
        _config(qk_norm="sometimes")
    _config(moe_layers=(True, False), dense_ffn=12)  # fine


def test_model_config_sizes_and_json():
    cfg = _config()
    assert cfg.num_moe_layers == 2
    assert cfg.params_per_expert == 3 * 8 * 6
    assert cfg.expert_params == 2 * 4 * 3 * 8 * 6
    data = json.loads(cfg.to_json())
    assert data["family"] == "mixtral" and data["rope"]["theta"] == 10000.0
    assert data == json.loads(json.dumps(cfg.to_dict()))
