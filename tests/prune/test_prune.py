"""Pruning: heavy-hitter counts, expert selection, pruned checkpoints (moekit and transformers),
router fine-tuning for a smaller top-k, dynamic skip, and the usage/prune/finetune commands."""

from __future__ import annotations

import json
import math

import pytest
import torch

import moekit
from moekit.cli import main
from moekit.load import read_config
from moekit.prune import count_usage, select_experts
from moekit.prune.finetune import finetune_router, mean_router_entropy, set_top_k
from moekit.prune.rewrite import write_pruned
from moekit.prune.usage import RouterTap
from moekit.train import lm_loss

from conftest import rel_error, token_ids

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]


def _usage(path, samples=6, length=24):
    model = moekit.load_model(path)
    return model, count_usage(model, token_ids(samples, length, seed=5), batch=4)


def test_counts_sum_to_what_they_should(tiny):
    model, usage = _usage(tiny("qwen2_moe").path)  # layer 1 is dense: not counted
    assert usage.layers == [0, 2] and usage.tokens == 6 * 24
    for i in range(len(usage.layers)):
        assert usage.hard[i].sum() == usage.tokens * model.config.top_k
        assert math.isclose(float(usage.soft[i].sum()), usage.tokens, rel_tol=1e-6)  # float32 softmax
        assert 0 < usage.entropy(i) <= math.log(usage.hard[i].numel()) + 1e-9
        assert usage.imbalance(i) >= 1.0
    hard, soft = usage.dropped(0, kept=list(range(usage.hard[0].numel())))
    assert hard == 0 and soft == 0


def _fake_usage(hard_rows, top_k=2):
    from moekit.prune.usage import ExpertUsage

    u = ExpertUsage(layers=list(range(len(hard_rows))), top_k=top_k, tokens=100)
    u.hard = [torch.tensor(r, dtype=torch.float64) for r in hard_rows]
    u.soft = [h / h.sum() * 100 for h in u.hard]
    u.entropy_sum = [0.0] * len(hard_rows)
    return u


def test_layer_selection_keeps_the_heavy_hitters():
    u = _fake_usage([[5, 50, 1, 30, 14, 0, 70, 30], [9, 8, 7, 6, 5, 4, 3, 158]])
    assert select_experts(u, 0.5, "hard", "layer") == [[1, 3, 6, 7], [0, 1, 2, 7]]
    assert select_experts(u, 0.1, "hard", "layer") == [[1, 6], [0, 7]]  # never below top-k
    r1, r2 = select_experts(u, 0.5, "random", "layer", seed=1), select_experts(u, 0.5, "random", "layer", seed=1)
    assert r1 == r2 and all(len(k) == 4 for k in r1)


def test_global_selection_never_starves_a_layer():
    # layer 1's experts are all light: a purely global ranking would empty it
    u = _fake_usage([[90, 80, 70, 60, 50, 40, 30, 20], [1, 1, 1, 1, 1, 1, 1, 1]])
    kept = select_experts(u, 0.5, "hard", "global")
    assert sum(len(k) for k in kept) == 8
    assert all(len(k) >= 2 for k in kept)
    u = _fake_usage([[90, 80, 70, 60, 50, 40, 30, 20], [100, 0, 0, 0, 0, 0, 0, 300]])
    assert select_experts(u, 0.25, "soft", "global") == [[0, 1], [0, 7]]


@pytest.mark.parametrize("bad", [dict(keep=0.0), dict(keep=1.5), dict(criterion="loud"), dict(scope="model")])
def test_selection_rejects_bad_flags(bad):
    u = _fake_usage([[1, 2, 3, 4]])
    args = dict(keep=0.5, criterion="hard", scope="layer") | bad
    with pytest.raises(moekit.MoekitError):
        select_experts(u, **args)


def _masked_reference_logits(model, kept: dict[int, list[int]], ids):
    """The unpruned model with dropped experts' router logits at -inf: what pruning must equal."""
    tap = RouterTap(model)
    handles = []
    for layer, block in tap.blocks:
        mask = torch.full((block.router.out_features,), float("-inf"))
        mask[kept[layer]] = 0.0
        handles.append(block.router.register_forward_hook(lambda m, i, out, mask=mask: out + mask))
    try:
        with torch.no_grad():
            return model(ids)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_checkpoint_equals_masked_router_in_moekit_and_transformers(tiny, family, tmp_path):
    import transformers

    ckpt_t = tiny(family)
    model, usage = _usage(ckpt_t.path)
    kept = dict(zip(usage.layers, select_experts(usage, 0.5, "hard", "layer")))
    ckpt, fam, cfg = read_config(ckpt_t.path)
    out = write_pruned(ckpt, fam, cfg, kept, tmp_path / "pruned", {"keep": 0.5})
    pruned = moekit.load_model(out)
    assert all(pruned.layers[l].mlp.router.out_features == len(k) for l, k in kept.items())
    ids = token_ids(2, 10, seed=9)
    with torch.no_grad():
        logits = pruned(ids)
    assert rel_error(logits, _masked_reference_logits(model, kept, ids)) <= 1e-5
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert rel_error(logits, hf(ids).logits) <= 1e-4
    meta = json.loads((out / "config.json").read_text())["moekit_pruning"]
    assert meta["version"] == 1 and "experts_per_layer" not in meta  # uniform: transformers-loadable


def test_global_pruning_keeps_every_layer_usable(tiny, tmp_path):
    ckpt_t = tiny("mixtral")
    model, usage = _usage(ckpt_t.path)
    # layer 0 concentrated on two experts, layer 1 uniform (each layer's mass sums to the tokens):
    # a global ranking takes experts from the concentrated layer, down to top-k and no further
    usage.soft[0] = usage.tokens * torch.tensor([0.5, 0.3, 0.1, 0.1], dtype=torch.float64)
    usage.soft[1] = usage.tokens * torch.full((4,), 0.25, dtype=torch.float64)
    kept = dict(zip(usage.layers, select_experts(usage, 0.75, "soft", "global")))  # 6 of 8 experts
    assert kept == {0: [0, 1], 1: [0, 1, 2, 3]} and len(kept[0]) == model.config.top_k
    ckpt, fam, cfg = read_config(ckpt_t.path)
    out = write_pruned(ckpt, fam, cfg, kept, tmp_path / "global", {"scope": "global"})
    pruned = moekit.load_model(out)
    assert pruned.config.experts_per_layer == (len(kept[0]), len(kept[1]))
    ids = token_ids(1, 12)
    with torch.no_grad():
        assert rel_error(pruned(ids), _masked_reference_logits(model, kept, ids)) <= 1e-5
    new = pruned.generate(ids, max_new_tokens=4, temperature=0)
    assert new.shape == (1, 4)


def test_finetune_lowers_entropy_and_top1_loss(tiny):
    model = moekit.load_model(tiny("mixtral").path)
    data = token_ids(8, 16, seed=3)
    set_top_k(model, 1)
    with torch.no_grad():
        loss_before = float(lm_loss(model, data))
    entropy_before = mean_router_entropy(model, data)

    def batches():
        while True:
            yield data

    result = finetune_router(model, batches(), steps=40, top_k=1, entropy_weight=0.1, lr=3e-2)
    with torch.no_grad():
        loss_after = float(lm_loss(model, data))
    assert result.steps == 40
    assert mean_router_entropy(model, data) < entropy_before
    assert loss_after < loss_before
    # only routers trained
    fresh = moekit.load_model(tiny("mixtral").path)
    for (name, p), (_, q) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(p, q) != (".mlp.router." in name), name


def test_dynamic_skip(tiny):
    path = tiny("mixtral").path
    ids = token_ids(2, 9)
    base, none = moekit.load_model(path), moekit.load_model(path, dynamic_skip=0.0)
    top1 = moekit.load_model(path)
    set_top_k(top1, 1)
    almost_all = moekit.load_model(path, dynamic_skip=0.999999)
    with torch.no_grad():
        assert torch.equal(base(ids), none(ids))
        # skipping every expert below the top one, renormalised (mixtral), is top-1 routing
        assert rel_error(almost_all(ids), top1(ids)) <= 1e-5
    with pytest.raises(moekit.MoekitError):
        moekit.load_model(path, dynamic_skip=1.0)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("def f(x):\n    return x * 2\n\nimport os\nprint(os.getcwd())\n" * 200)
    return path


def test_usage_prune_finetune_commands(text_file, tmp_path, capsys):
    common = ["--samples", "8", "--seqlen", "64", "--device", "cpu"]
    assert main(["usage", "--calib", str(text_file), *common, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tokens"] == 8 * 64
    assert all(sum(row["hard"]) == 8 * 64 * report["top_k"] for row in report["layers"])

    out = tmp_path / "pruned"
    assert main(["prune", "--calib", str(text_file), *common, "--keep", "0.5", "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["expert_params_after"] == result["expert_params_before"] // 2
    assert moekit.load_model(out).layers[0].mlp.router.out_features == 4

    tuned = tmp_path / "top1"
    assert main(["finetune", str(out), "--data", str(text_file), *common, "--top-k", "1", "--steps", "3",
                 "--out", str(tuned), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["tensors_rewritten"] == 4  # one router per layer of the bundled model
    assert json.loads((tuned / "config.json").read_text())["num_experts_per_tok"] == 1
    assert moekit.load_model(tuned).layers[0].mlp.top_k == 1


def test_commands_refuse_bad_flags(text_file, tmp_path, capsys):
    assert main(["prune", "--calib", str(text_file), "--keep", "0", "--out", str(tmp_path / "x"),
                 "--samples", "2", "--seqlen", "32"]) == 2
    assert "--keep must be in (0, 1]" in capsys.readouterr().err
    assert main(["finetune", "--data", str(text_file), "--top-k", "9", "--out", str(tmp_path / "y"),
                 "--samples", "2", "--seqlen", "32", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "--top-k 9 is not possible" in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_blockwise_counts_equal_full_model_counts(tiny):
    from moekit.prune.usage import usage_from_calibration

    path = tiny("qwen2_moe").path
    ids = token_ids(6, 24, seed=5)
    full = count_usage(moekit.load_model(path), ids, batch=4)
    blockwise = usage_from_calibration(path, ids, batch=4)
    assert blockwise.layers == full.layers and blockwise.tokens == full.tokens
    for i in range(len(full.layers)):
        assert torch.equal(blockwise.hard[i], full.hard[i])
        assert torch.allclose(blockwise.soft[i], full.soft[i], rtol=1e-5)
