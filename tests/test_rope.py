"""Rotary embeddings: frequencies against transformers' rope functions, and rotation properties."""

from __future__ import annotations

import math

import pytest
import torch

from moekit.config import RopeConfig
from moekit.errors import MoekitError
from moekit.families.base import rope_from_hf
from moekit.rope import apply_rope, cos_sin, inverse_frequencies

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402


def _hf_rope(head_dim: int, rope_parameters: dict, max_pos: int = 4096):
    cfg = transformers.Qwen3MoeConfig(hidden_size=64, num_attention_heads=4, head_dim=head_dim,
                                      max_position_embeddings=max_pos, rope_parameters=rope_parameters)
    return ROPE_INIT_FUNCTIONS[rope_parameters["rope_type"]](cfg, "cpu")


@pytest.mark.parametrize("head_dim", [16, 128])
@pytest.mark.parametrize("params", [
    {"factor": 4.0, "original_max_position_embeddings": 32},
    {"factor": 4.0, "original_max_position_embeddings": 4096},
    {"factor": 8.0, "original_max_position_embeddings": 2048, "beta_fast": 16, "beta_slow": 2},
    {"factor": 2.0, "original_max_position_embeddings": 1024, "truncate": False},
    {"factor": 4.0, "original_max_position_embeddings": 512, "attention_factor": 1.3},
])
@pytest.mark.parametrize("theta", [10000.0, 1e6])
def test_yarn_matches_transformers(head_dim, params, theta):
    hf_params = {"rope_type": "yarn", "rope_theta": theta, **params}
    expected_freq, expected_scale = _hf_rope(head_dim, hf_params)
    rope = rope_from_hf({"rope_parameters": hf_params})
    assert rope.scaling == "yarn"
    inv_freq, scale = inverse_frequencies(rope, head_dim)
    torch.testing.assert_close(inv_freq, expected_freq, rtol=1e-6, atol=0)
    assert scale == pytest.approx(expected_scale, rel=1e-9)


@pytest.mark.parametrize("factor", [2.0, 8.0])
def test_linear_matches_transformers(factor):
    hf_params = {"rope_type": "linear", "rope_theta": 10000.0, "factor": factor}
    expected_freq, expected_scale = _hf_rope(32, hf_params)
    inv_freq, scale = inverse_frequencies(rope_from_hf({"rope_parameters": hf_params}), 32)
    torch.testing.assert_close(inv_freq, expected_freq, rtol=1e-6, atol=0)
    assert scale == expected_scale == 1.0


def test_default_frequencies():
    inv_freq, scale = inverse_frequencies(RopeConfig(theta=10000.0), 8)
    expected = torch.tensor([10000.0 ** (-i / 8) for i in (0, 2, 4, 6)])
    torch.testing.assert_close(inv_freq, expected)
    assert scale == 1.0


def test_rope_from_hf_spellings():
    """transformers v4 (rope_theta + rope_scaling with "type") and v5 (rope_parameters)."""
    v4 = rope_from_hf({"rope_theta": 5e5, "max_position_embeddings": 8192,
                       "rope_scaling": {"type": "yarn", "factor": 4.0}})
    assert (v4.theta, v4.scaling, v4.factor) == (5e5, "yarn", 4.0)
    assert v4.original_max_position == 8192  # falls back to max_position_embeddings
    v5 = rope_from_hf({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}})
    assert (v5.theta, v5.scaling, v5.factor) == (1e6, "linear", 2.0)
    assert rope_from_hf({}) == RopeConfig(theta=10000.0)
    assert rope_from_hf({"rope_theta": 1e6, "rope_scaling": None}).theta == 1e6
    assert rope_from_hf({"rope_parameters": {"rope_type": "default", "rope_theta": 3.0}}).theta == 3.0


def test_unsupported_scaling_is_a_clear_error():
    with pytest.raises(MoekitError, match="rope scaling 'dynamic' is not supported"):
        rope_from_hf({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}})
    with pytest.raises(MoekitError, match="rope scaling 'linear' in config.json has no 'factor'"):
        rope_from_hf({"rope_scaling": {"type": "linear"}})
    with pytest.raises(MoekitError, match="factor must be > 0"):
        RopeConfig(scaling="linear", factor=0.0)


def test_rotation_preserves_norm_and_is_relative():
    """rope(q, m) . rope(k, n) depends only on m - n, and rotation keeps vector lengths."""
    head_dim = 16
    inv_freq, scale = inverse_frequencies(RopeConfig(), head_dim)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, head_dim, generator=g), torch.randn(1, 1, 1, head_dim, generator=g)

    def rotated(x, pos):
        cos, sin = cos_sin(inv_freq, scale, torch.tensor([pos]), torch.float32)
        return apply_rope(x, cos, sin)

    torch.testing.assert_close(rotated(q, 37).norm(), q.norm())
    dots = [(rotated(q, m) * rotated(k, m - 5)).sum() for m in (5, 17, 60)]
    torch.testing.assert_close(dots[0], dots[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dots[0], dots[2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rotated(q, 0), q)


def test_cos_sin_scale_and_dtype():
    inv_freq = torch.tensor([1.0, 0.1])
    cos, sin = cos_sin(inv_freq, 2.0, torch.arange(3), torch.bfloat16)
    assert cos.shape == (3, 4) and cos.dtype == torch.bfloat16
    assert float(cos[0, 0]) == 2.0 and float(sin[0, 0]) == 0.0
    assert float(sin[1, 0]) == pytest.approx(2 * math.sin(1.0), rel=1e-2)
