"""load_model / read_config: dtypes, devices, generation defaults, config reading without weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import moekit
from moekit.load import default_model_path

from conftest import VOCAB, median_token_error, rel_error, token_ids


@pytest.fixture
def mixtral_copy(tiny, tmp_path) -> Path:
    return Path(shutil.copytree(tiny("mixtral").path, tmp_path / "mixtral"))


@pytest.mark.parametrize("dtype, want, rtol", [
    ("float32", torch.float32, 1e-4), ("fp16", torch.float16, 5e-3),
    ("bf16", torch.bfloat16, 3e-2), (torch.bfloat16, torch.bfloat16, 3e-2),
])
def test_dtype(tiny, dtype, want, rtol):
    ckpt = tiny("qwen2_moe")
    model = moekit.load_model(ckpt.path, dtype=dtype)
    assert model.dtype == want
    assert {p.dtype for p in model.parameters()} == {want}
    assert model.inv_freq.dtype == torch.float32  # rope frequencies stay float32
    ids = token_ids(2, 10)
    with torch.no_grad():
        logits = model(ids)
    assert logits.dtype == want and torch.isfinite(logits).all()
    # per token, the median: with random routers, rounding flips the top-k of a near-tie token
    # now and then (transformers in the same dtype flips them too)
    assert median_token_error(logits, ckpt.hf_logits(ids)) <= rtol


def test_default_dtype_on_cpu_is_float32(mixtral_model):
    assert mixtral_model.dtype == torch.float32
    assert mixtral_model.device.type == "cpu"
    assert not mixtral_model.training


def test_weights_are_really_loaded(tiny, mixtral_model):
    """Every parameter came from the checkpoint (to_empty leaves garbage otherwise)."""
    hf = tiny("mixtral").hf.state_dict()
    torch.testing.assert_close(mixtral_model.embed.weight, hf["model.embed_tokens.weight"])
    torch.testing.assert_close(mixtral_model.lm_head.weight, hf["lm_head.weight"])
    experts = mixtral_model.layers[1].mlp.experts
    torch.testing.assert_close(experts.gate_up, hf["model.layers.1.mlp.experts.gate_up_proj"])
    torch.testing.assert_close(experts.down, hf["model.layers.1.mlp.experts.down_proj"])
    for p in mixtral_model.parameters():
        assert torch.isfinite(p).all()


def test_read_config_reads_no_weights(tiny):
    ckpt, family, cfg = moekit.read_config(tiny("qwen3_moe").path)
    assert family.name == "qwen3_moe"
    assert (cfg.head_dim, cfg.num_heads, cfg.hidden_size) == (16, 4, 32)
    assert cfg.vocab_size == VOCAB and cfg.norm_topk_prob and cfg.qk_norm == "head"


def test_source_path_and_generation_defaults(tiny):
    path = tiny("mixtral").path
    model = moekit.load_model(path)
    assert model.source_path == path
    assert model.generation_defaults["eos_token_ids"] == (2,)  # generation_config.json of transformers


def test_generation_config_overrides(mixtral_copy):
    (mixtral_copy / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [5, 7, 500], "do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.9}))
    defaults = moekit.load_model(mixtral_copy).generation_defaults
    # 500 is outside the vocabulary of 100: it can never be produced
    assert defaults["eos_token_ids"] == (5, 7)
    assert defaults["temperature"] == 0.6 and defaults["top_k"] == 20 and defaults["top_p"] == 0.9


def test_sampling_settings_without_do_sample_mean_greedy(mixtral_copy):
    """As in transformers: temperature etc. count only when do_sample is true."""
    gen = mixtral_copy / "generation_config.json"
    gen.write_text(json.dumps({"eos_token_id": 2, "temperature": 0.7, "top_p": 0.8}))
    assert moekit.load_model(mixtral_copy).generation_defaults["temperature"] == 0.0
    gen.write_text(json.dumps({"do_sample": True, "top_p": 0.8}))
    defaults = moekit.load_model(mixtral_copy).generation_defaults
    assert defaults["temperature"] == 1.0 and defaults["top_p"] == 0.8


def test_eos_from_config_json_without_generation_config(mixtral_copy):
    (mixtral_copy / "generation_config.json").unlink()
    config = json.loads((mixtral_copy / "config.json").read_text())
    config["eos_token_id"] = 50279  # olmoe's real eos, outside this tiny vocabulary
    (mixtral_copy / "config.json").write_text(json.dumps(config))
    assert moekit.load_model(mixtral_copy).generation_defaults["eos_token_ids"] == ()


def test_unknown_dtype_is_an_error(tiny):
    with pytest.raises(moekit.CheckpointError, match="unknown dtype"):
        moekit.load_model(tiny("mixtral").path, dtype="float8")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_without_cuda_is_a_clear_error(tiny):
    with pytest.raises(moekit.MoekitError, match="no CUDA device"):
        moekit.load_model(tiny("mixtral").path, device="cuda")


@pytest.mark.parametrize("device, message", [("tpu", "unknown --device 'tpu'"), ("meta", "runs on cpu and cuda")])
def test_unusable_device_is_a_clear_error(tiny, device, message):
    with pytest.raises(moekit.MoekitError, match=message):
        moekit.load_model(tiny("mixtral").path, device=device)


def test_default_model_path_is_the_bundled_example():
    path = default_model_path()
    assert path.name == "tiny-moe" and path.parent.name == "examples"


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["mixtral", "qwen2_moe"])
def test_cuda_defaults_to_bfloat16(tiny, variant):
    model = moekit.load_model(tiny(variant).path, device="cuda")
    assert model.dtype == torch.bfloat16 and model.device.type == "cuda"
    ids = token_ids(2, 10)
    with torch.no_grad():
        logits = model(ids.cuda()).float().cpu()
    assert median_token_error(logits, tiny(variant).hf_logits(ids)) <= 3e-2


def test_custom_expert_loader_builds_every_moe_layer(tiny):
    """The expert seam at load time: a loader decides where experts live; finish runs once."""
    from moekit.experts import ResidentExperts
    from moekit.load import ExpertLoader

    class Recording(ExpertLoader):
        def __init__(self):
            self.layers, self.finished = [], 0

        def build(self, ctx, layer):
            self.layers.append(layer)
            return super().build(ctx, layer)

        def finish(self, model, ctx):
            self.finished += 1

    ckpt = tiny("qwen2_moe")  # layer 1 is dense: no experts to build there
    loader = Recording()
    model = moekit.load_model(ckpt.path, experts=loader)
    assert loader.layers == [0, 2] and loader.finished == 1
    assert all(isinstance(model.layers[i].mlp.experts, ResidentExperts) for i in (0, 2))
    ids = token_ids(1, 7)
    assert rel_error(model(ids), ckpt.hf_logits(ids)) <= 1e-4
