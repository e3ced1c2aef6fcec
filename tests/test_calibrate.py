"""Block-by-block calibration: same hidden states as the whole model, vectorised expert gathers,
and the hook's replacement expert source is what later blocks see."""

from __future__ import annotations

import torch

import moekit
from moekit.calibrate import calibration_tokens, run_calibration
from moekit.experts import ResidentExperts

from conftest import rel_error, token_ids


def test_block_by_block_matches_the_whole_model(tiny):
    ckpt = tiny("qwen2_moe")  # shared expert and a dense layer: every block kind
    model = moekit.load_model(ckpt.path)
    ids = token_ids(3, 10)
    seen = []

    def hook(inputs):
        seen.append(inputs)
        return None

    report = run_calibration(ckpt.path, ids, hook, batch=2)
    logits = model.lm_head(model.norm(report.hidden)).view(3, 10, -1)
    assert rel_error(logits, model(ids)) < 1e-5
    assert [s.layer for s in seen] == [0, 2]
    layer = seen[0]
    assert sum(layer.tokens_per_expert()) == 30 * model.config.top_k
    for e in range(layer.num_experts):  # the vectorised gather is the loop over tokens
        expected = [n for n in range(30) if e in layer.expert_ids[n].tolist()]
        assert layer.token_ids_of(e).tolist() == expected
        assert torch.equal(layer.expert_inputs(e), layer.inputs[expected])
    capped = layer.token_ids_of(0, max_tokens=3)
    assert capped.numel() == min(3, layer.tokens_per_expert()[0])
    assert set(capped.tolist()) <= set(layer.token_ids_of(0).tolist())


def test_hook_replacement_feeds_later_blocks(tiny):
    ckpt = tiny("mixtral")
    ids = token_ids(2, 8)
    zeroed = []

    def hook(inputs):
        old = inputs.block.experts
        new = ResidentExperts(old.num_experts, old.hidden, old.ffn)
        torch.nn.init.zeros_(new.gate_up)
        torch.nn.init.zeros_(new.down)
        zeroed.append(inputs.layer)
        return new

    report = run_calibration(ckpt.path, ids, hook)
    model = moekit.load_model(ckpt.path)
    for layer in model.layers:
        torch.nn.init.zeros_(layer.mlp.experts.down)
    expected = model.norm(report.hidden)
    with torch.no_grad():
        x = model.embed(ids)
        cos, sin = model.rope(torch.arange(8))
        for layer in model.layers:
            x = layer(x, cos, sin)
    assert zeroed == [0, 1]
    assert rel_error(report.hidden.view(2, 8, -1), x) < 1e-5
    assert expected.shape == (16, 32)


def test_calibration_tokens_are_seeded_windows():
    class Tok:
        eos_token_id = 0

        def encode(self, text, add_special_tokens=False):
            return [ord(c) for c in text]

    a = calibration_tokens(["abcdefgh", "ijklmnop"], Tok(), samples=4, seqlen=5, seed=3)
    b = calibration_tokens(["abcdefgh", "ijklmnop"], Tok(), samples=4, seqlen=5, seed=3)
    assert a.shape == (4, 5) and torch.equal(a, b)
