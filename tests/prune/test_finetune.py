"""Top-k reduction fine-tuning: where the router gets a gradient, the refusal where it gets none,
training at one top-k and routing at another (library and `moekit finetune`)."""

from __future__ import annotations

import json

import pytest
import torch

import moekit
from moekit.cli import main
from moekit.prune.finetune import finetune_router, mean_router_entropy, router_gets_lm_gradient, set_top_k
from moekit.train import lm_loss

from conftest import token_ids


def _router_grad(model, top_k: int) -> float:
    """Returns the largest |gradient| the LM loss sends to any router weight at top_k."""
    set_top_k(model, top_k)
    model.zero_grad(set_to_none=True)
    lm_loss(model, token_ids(4, 16, seed=7)).backward()
    grads = [p.grad for n, p in model.named_parameters() if ".mlp.router." in n]
    return max(0.0 if g is None else float(g.abs().max()) for g in grads)


@pytest.mark.parametrize("family, renormalised", [("mixtral", True), ("qwen3_moe", True), ("olmoe", False)])
def test_router_gets_no_lm_gradient_at_top1_with_renormalised_weights(tiny, family, renormalised):
    model = moekit.load_model(tiny(family).path)
    assert model.config.norm_topk_prob == renormalised
    at_top2 = _router_grad(model, 2)
    at_top1 = _router_grad(model, 1)
    assert at_top2 > 1e-6
    if renormalised:  # p / p = 1.0: what is left is float rounding, ~1e-7 of the top-2 gradient
        assert at_top1 < 1e-5 * at_top2
    else:
        assert at_top1 > 1e-2 * at_top2
    assert router_gets_lm_gradient(model.config, 1) == (not renormalised)
    assert router_gets_lm_gradient(model.config, 2)


def _batches(data):
    while True:
        yield data


def test_finetune_refuses_a_router_that_cannot_move_and_warns_on_entropy_alone(tiny):
    model = moekit.load_model(tiny("mixtral").path)
    data = token_ids(4, 16, seed=3)
    with pytest.raises(moekit.MoekitError, match="--train-top-k 2"):
        finetune_router(model, _batches(data), steps=1, top_k=1, entropy_weight=0.0, train_top_k=1)
    assert model.layers[0].mlp.top_k == 2  # refused before anything changed
    with pytest.warns(UserWarning, match="only the entropy term moves the router"):
        finetune_router(model, _batches(data), steps=1, top_k=1, entropy_weight=0.1, train_top_k=1)
    # training the experts at top-1 is allowed: the LM loss reaches them
    finetune_router(model, _batches(data), steps=1, top_k=1, entropy_weight=0.0, train_what="router+experts",
                    train_top_k=1)


def test_finetune_at_top2_lowers_entropy_and_leaves_the_model_at_top1(tiny):
    model = moekit.load_model(tiny("mixtral").path)
    data = token_ids(8, 16, seed=3)
    entropy_before = mean_router_entropy(model, data)
    seen_top_k = []
    result = finetune_router(model, _batches(data), steps=30, top_k=1, entropy_weight=0.1, lr=3e-2,
                             log_every=10, on_log=lambda _: seen_top_k.append(model.layers[0].mlp.top_k))
    assert result.steps == 30 and seen_top_k == [2, 2, 2]  # trained at the checkpoint's top-k
    assert all(r["extra_loss"] > 0 for r in result.history)
    assert all(layer.mlp.top_k == 1 for layer in model.layers)
    assert mean_router_entropy(model, data) < 0.9 * entropy_before
    fresh = moekit.load_model(tiny("mixtral").path)
    for (name, p), (_, q) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(p, q) != (".mlp.router." in name), name  # only routers trained


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text("def f(x):\n    return x * 2\n\nimport os\nprint(os.getcwd())\n" * 200)
    return path


def test_finetune_command_trains_at_one_top_k_and_writes_another(text_file, tmp_path, capsys):
    common = ["--data", str(text_file), "--samples", "8", "--seqlen", "64", "--device", "cpu", "--steps", "2"]
    out = tmp_path / "top1"
    assert main(["finetune", *common, "--top-k", "1", "--train-top-k", "2", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["top_k"] == 1 and summary["train_top_k"] == 2
    config = json.loads((out / "config.json").read_text())
    assert config["num_experts_per_tok"] == 1
    assert moekit.load_model(out).layers[0].mlp.top_k == 1

    refused = tmp_path / "refused"
    assert main(["finetune", *common, "--top-k", "1", "--train-top-k", "1", "--entropy-weight", "0",
                 "--out", str(refused)]) == 2
    err = capsys.readouterr().err
    assert "gives the router no gradient" in err and "--train-top-k 2" in err and err.count("\n") == 1
    assert not refused.exists()
    assert main(["finetune", *common, "--top-k", "1", "--train-top-k", "9", "--out", str(refused)]) == 2
    assert "--train-top-k 9 is not possible" in capsys.readouterr().err
