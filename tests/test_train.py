"""Training loop, losses, perplexity and initialisation on a tiny random mixtral (CPU, seconds)."""

from __future__ import annotations

import math

import pytest
import torch

from moekit.config import ModelConfig
from moekit.errors import MoekitError
from moekit.model import MoEModel
from moekit.train import (LoadBalance, balance_loss, evaluate_perplexity, init_weights, lm_loss,
                          print_log, scheduled_lr, train)


def tiny_config(**overrides) -> ModelConfig:
    fields = dict(family="mixtral", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, num_experts=4, top_k=2, expert_ffn=16,
                  moe_layers=(True, True), max_position_embeddings=128, tie_word_embeddings=True)
    fields.update(overrides)
    return ModelConfig(**fields)


def tiny_model(seed: int = 0, **overrides) -> MoEModel:
    torch.manual_seed(seed)
    return init_weights(MoEModel(tiny_config(**overrides)), seed=seed)


def repeated_batches(batch: int = 4, seqlen: int = 32):
    """Yields the same batch of a repeating 8-token pattern forever: easy to learn."""
    pattern = torch.tensor([3, 14, 15, 9, 26, 5, 35, 8])
    row = pattern.repeat(seqlen // len(pattern) + 1)[:seqlen]
    ids = torch.stack([row.roll(-i) for i in range(batch)])  # [B, T]
    while True:
        yield ids


def test_init_weights_is_seeded_and_scales_outputs():
    a, b = tiny_model(seed=1), tiny_model(seed=1)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.embed.weight, tiny_model(seed=2).embed.weight)
    layer = a.layers[0]
    assert torch.all(layer.input_norm.weight == 1) and torch.all(a.norm.weight == 1)
    out_std, in_std = layer.mlp.experts.down.std().item(), layer.mlp.experts.gate_up.std().item()
    assert in_std == pytest.approx(0.02, rel=0.1)
    assert out_std == pytest.approx(0.02 / math.sqrt(4), rel=0.1)  # 1/sqrt(2 * 2 layers)
    assert a.lm_head.weight is a.embed.weight


def test_loss_decreases_on_repeated_text():
    model = tiny_model()
    result = train(model, repeated_batches(), steps=30, lr=1e-2, warmup_steps=3, log_every=5)
    losses = [r["loss"] for r in result.history]
    assert result.steps == 30 and result.tokens == 30 * 4 * 32 and result.stop_reason == "steps"
    assert losses[0] > math.log(64) - 1.0  # starts near uniform over the vocabulary
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(r["tokens_per_s"] > 0 for r in result.history)


def test_trainable_filter_freezes_the_rest_and_restores_flags():
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, repeated_batches(), steps=3, lr=1e-2, warmup_steps=1,
          trainable=lambda name: name.endswith("mlp.router.weight"))
    for name, p in model.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == name.endswith("mlp.router.weight"), name
        assert p.requires_grad, f"{name}: requires_grad not restored"


def test_trainable_filter_matching_nothing_is_a_clear_error():
    with pytest.raises(MoekitError, match="matched no parameter"):
        train(tiny_model(), repeated_batches(), steps=1, trainable=lambda name: False)


def test_balance_loss_is_one_for_uniform_routing_and_e_for_collapse():
    assert balance_loss(torch.zeros(64, 4), top_k=2).item() == pytest.approx(1.0)
    confident_but_balanced = 10.0 * torch.eye(4).repeat(16, 1)  # token n goes to expert n % 4
    assert balance_loss(confident_but_balanced, top_k=1).item() == pytest.approx(1.0, rel=1e-3)
    collapsed = torch.tensor([[20.0, 10.0, 0.0, 0.0]]).repeat(64, 1)
    assert balance_loss(collapsed, top_k=1).item() == pytest.approx(4.0, rel=1e-3)


def test_aux_loss_from_hooks_is_finite_near_one_and_trains():
    model = tiny_model()
    with LoadBalance(model) as balance:
        lm_loss(model, next(repeated_batches()))
        assert len(balance.records) == 2  # one per MoE layer
        aux = balance.loss()
    assert math.isfinite(aux.item()) and 0.9 < aux.item() < 2.0  # near-uniform router at init
    with LoadBalance(model) as balance, torch.no_grad():
        lm_loss(model, next(repeated_batches()))
        assert not balance.records  # evaluation inside a training run is not counted
    assert not any(m.router._forward_hooks for m in (l.mlp for l in model.layers))  # hooks removed
    result = train(model, repeated_batches(), steps=5, lr=1e-2, warmup_steps=1, aux_loss_coef=0.01,
                   log_every=5)
    assert math.isfinite(result.history[-1]["aux_loss"])
    assert model.layers[0].mlp.router.weight.grad is not None


def test_evaluate_perplexity_matches_lm_loss():
    model = tiny_model()
    ids = torch.randint(0, 64, (4 * 16 + 1,), generator=torch.Generator().manual_seed(0))
    ppl, scored = evaluate_perplexity(model, ids, seqlen=16, batch=3)
    windows = ids.unfold(0, 17, 16)  # [4, 17]: windows share their boundary token
    with torch.no_grad():
        expected = math.exp(lm_loss(model, windows).item())
    assert scored == 64
    assert ppl == pytest.approx(expected, rel=1e-5)
    ppl_tail, scored_tail = evaluate_perplexity(model, ids[:40], seqlen=16)  # a short last window
    assert scored_tail == 39 and math.isfinite(ppl_tail)


def test_schedule_warms_up_then_decays_to_floor():
    lrs = [scheduled_lr(1.0, s, warmup_steps=10, progress=s / 100, min_lr_ratio=0.1) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1, rel=0.01) and max(lrs) == pytest.approx(lrs[9], rel=1e-6)
    assert lrs[100] == pytest.approx(0.1) and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_max_seconds_and_exhausted_batches_stop_early():
    model = tiny_model()
    assert train(model, repeated_batches(), steps=1000, max_seconds=0.0).stop_reason == "time"
    short = [next(repeated_batches())] * 2
    result = train(model, short, steps=10)
    assert result.stop_reason == "data" and result.steps == 2 and len(result.history) == 1


def test_log_line_shows_extra_loss_only_when_there_is_one(capsys):
    model = tiny_model()
    plain = train(model, repeated_batches(), steps=2, log_every=2, on_log=print_log)
    assert "extra_loss" not in plain.history[0] and "extra_loss" not in capsys.readouterr().out
    extra = train(model, repeated_batches(), steps=2, log_every=2, on_log=print_log,
                  extra_loss=lambda: torch.tensor(0.25))
    assert extra.history[0]["extra_loss"] == pytest.approx(0.25)
    assert "extra_loss 0.25" in capsys.readouterr().out
