"""Compressing a globally pruned checkpoint (layers keep different expert counts): every layer is
stored with its own count, by round-to-nearest and by GPTQ (whose block-by-block calibration
sizes the router logits per layer), and the result loads and equals its dequantised twin."""

from __future__ import annotations

import pytest
import torch

import moekit
from moekit.experts import ResidentExperts
from moekit.load import read_config
from moekit.quant.compress import compress
from moekit.quant.config import QuantConfig
from moekit.quant.formats import CompressedExperts, form_class
from moekit.quant.loader import experts_prefix

from conftest import rel_error, token_ids
from pruned_models import MATRIX_SHAPE, greedy, prune_globally, reference_model, save_tiny

RECIPES = {  # name -> QuantConfig
    "rtn-4": QuantConfig(bits="4", group_size=16, method="rtn"),
    "gptq-ternary": QuantConfig(bits="ternary", method="gptq", expert_batch=3),
    "gptq-2": QuantConfig(bits="2", group_size=16, method="gptq", expert_batch=3),
}


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """Returns (globally pruned tiny checkpoint, experts per layer, {recipe: (compressed path, report)})."""
    root = tmp_path_factory.mktemp("compress_pruned")
    path, counts = prune_globally(save_tiny(root / "plain", **MATRIX_SHAPE), root / "pruned")
    assert len(set(counts)) > 1, counts  # the point: layers of different sizes
    calib = token_ids(6, 24, seed=7)
    out = {}
    for name, quant in RECIPES.items():
        dest = root / name
        report = compress(path, dest, quant, calib if quant.method == "gptq" else None, progress=False)
        out[name] = (dest, report)
    return path, counts, out


@pytest.mark.parametrize("recipe", RECIPES)
def test_each_layer_is_stored_with_its_own_expert_count(pruned, recipe):
    src, counts, compressed = pruned
    path, report = compressed[recipe]
    ckpt, family, cfg = read_config(path)
    assert [cfg.experts_in(i) for i in range(cfg.num_layers)] == counts
    names = form_class(RECIPES[recipe].form).tensor_names()
    for layer, count in enumerate(counts):
        prefix = experts_prefix(family, layer)
        for name in names:
            if name != "code_table":  # one dictionary per layer, not per expert
                assert ckpt.shape(f"{prefix}.{name}")[0] == count, (layer, name)
    assert report.expert_params == sum(counts) * cfg.params_per_expert == read_config(src)[2].expert_params
    assert [l.layer for l in report.layers] == list(range(len(counts)))


def dequantised_twin(model):
    """Returns `model` with each layer's compressed experts replaced by the dense matrices they stand for."""
    for layer in model.layers:
        src = layer.mlp.experts
        assert isinstance(src, CompressedExperts)
        dense = ResidentExperts(src.num_experts, src.hidden, src.ffn)
        dense.gate_up.data, dense.down.data = src.dequantize()
        layer.mlp.experts = dense
    return model


@pytest.mark.parametrize("recipe", RECIPES)
def test_compressed_pruned_model_equals_its_dequantised_twin(pruned, recipe):
    _, counts, compressed = pruned
    path, _ = compressed[recipe]
    model = moekit.load_model(path)
    assert [l.mlp.experts.num_experts for l in model.layers] == counts
    twin = dequantised_twin(reference_model(path))  # built without the compressed loader
    ids = token_ids(2, 12)
    with torch.no_grad():
        assert rel_error(model(ids), twin(ids)) < 1e-5
    assert torch.equal(greedy(model, ids[:1]), greedy(twin, ids[:1]))
