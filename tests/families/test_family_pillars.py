"""Issue 15's families through the pillars: offloaded (token-equal to resident), compressed (ternary
GPTQ beats RTN on held-out tokens), pruned (transformers loads the copy and agrees), usage counting,
pre-gates, router fine-tuning (library and CLI) and strict offload's routing weights."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import moekit
from moekit.calibrate import run_calibration
from moekit.load import read_config
from moekit.offload import OffloadConfig, load_offloaded
from moekit.prune import count_usage, select_experts
from moekit.prune.rewrite import write_pruned
from moekit.quant.compress import compress
from moekit.quant.config import QuantConfig

from conftest import rel_error, token_ids, transformers
from family_cases import LOGITS_RTOL, ONE_PER_FAMILY, budget_for


@pytest.mark.parametrize("variant", ONE_PER_FAMILY)
def test_offloaded_equals_resident(tiny, variant):
    path = tiny(variant).path
    ids = token_ids(1, 10, seed=3)
    resident = moekit.load_model(path).generate(ids, max_new_tokens=8, temperature=0, eos_token_ids=())
    config = OffloadConfig(context_tokens=24, store="host", misses="fetch")
    model = load_offloaded(path, offload=dataclasses.replace(config, device_memory=budget_for(path, config, 3)))
    tokens = model.generate(ids, max_new_tokens=8, temperature=0, eos_token_ids=())
    report = model.offload.report()
    assert report["cache_slots"] == 3 and report["demand_fetches"] > 0, report
    assert torch.equal(tokens, resident)


@pytest.fixture(scope="module")
def compressed(tiny, tmp_path_factory):
    """Returns {(variant, method): path} of ternary copies, GPTQ and RTN, calibrated on random tokens."""
    root = tmp_path_factory.mktemp("family_compressed")
    calib = token_ids(48, 32, seed=7)  # enough that every expert sees more tokens than D (hessian rank)
    out = {}
    for variant in ONE_PER_FAMILY:
        for method in ("gptq", "rtn"):
            path = root / f"{variant}-{method}"
            compress(tiny(variant).path, path, QuantConfig(bits="ternary", method=method), calib, progress=False)
            out[(variant, method)] = path
    return out


@pytest.mark.parametrize("variant", ONE_PER_FAMILY)
def test_compressed_ternary_gptq_beats_rtn(tiny, compressed, variant):
    """On held-out tokens, each MoE layer's ternary experts (same inputs and routing as the dense
    model's, through this family's attention, routers and dense layers) are closer to the dense
    experts with GPTQ than with round-to-nearest; the compressed copies load and generate."""
    seen = []
    run_calibration(tiny(variant).path, token_ids(8, 24, seed=11),
                    lambda inputs: seen.append((inputs.layer, inputs.inputs, inputs.expert_ids, inputs.weights)))
    models = {m: moekit.load_model(compressed[(variant, m)]) for m in ("gptq", "rtn")}
    dense = moekit.load_model(tiny(variant).path)
    errors = {"gptq": 0.0, "rtn": 0.0}
    with torch.no_grad():
        for layer, x, ids, w in seen:
            want = dense.layers[layer].mlp.experts(x, ids, w)
            for method, model in models.items():
                errors[method] += (model.layers[layer].mlp.experts(x, ids, w) - want).norm().item() ** 2
    assert errors["gptq"] < 0.9 * errors["rtn"], errors
    from moekit.inspect_model import inspect_checkpoint

    stored = inspect_checkpoint(compressed[(variant, "gptq")]).specifics["stored as"]
    assert stored.startswith("moekit ") and "ternary bits" in stored, stored
    assert models["gptq"].generate(token_ids(1, 8), max_new_tokens=4).shape == (1, 4)


@pytest.mark.parametrize("variant", ["granitemoe", "phimoe", "deepseek_v2", "deepseek_v3_plain", "glm4_moe_plain",
                                     "gpt_oss_full"])
def test_pruned_copy_loads_in_transformers_and_agrees(tiny, variant, tmp_path):
    src = tiny(variant).path
    model = moekit.load_model(src)
    usage = count_usage(model, token_ids(4, 16, seed=9), batch=2)
    moe = [i for i, is_moe in enumerate(model.config.moe_layers) if is_moe]
    assert usage.layers == moe
    kept = dict(zip(usage.layers, select_experts(usage, 0.75, "hard", "layer")))
    left = model.config.num_experts * 3 // 4
    assert all(len(k) == left for k in kept.values())
    ckpt, family, cfg = read_config(src)
    out = write_pruned(ckpt, family, cfg, kept, tmp_path / "pruned", {"keep": 0.75})
    ours = moekit.load_model(out)
    assert ours.config.num_experts == left
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = token_ids(2, 12)
    with torch.no_grad():
        assert rel_error(ours(ids), theirs(ids).logits) <= LOGITS_RTOL


def test_gpt_oss_compressed_keeps_biases_and_offloads(tiny, compressed):
    """Compressed gpt-oss experts keep their biases beside the codes (clamped SwiGLU around the
    compressed matrices), and run offloaded token-equal to resident."""
    from moekit.experts.clamped import BiasedCompressedForm

    path = compressed[("gpt_oss", "gptq")]
    model = moekit.load_model(path)
    experts = model.layers[0].mlp.experts
    assert isinstance(experts.form, BiasedCompressedForm)
    dense = moekit.load_model(tiny("gpt_oss").path).layers[0].mlp.experts
    assert torch.equal(experts.gate_up_bias, dense.gate_up_bias)
    ids = token_ids(1, 10, seed=3)
    resident = model.generate(ids, max_new_tokens=6, temperature=0, eos_token_ids=())
    config = OffloadConfig(context_tokens=24, store="host", misses="fetch")
    offloaded = load_offloaded(path, offload=dataclasses.replace(config, device_memory=budget_for(path, config, 3)))
    assert torch.equal(offloaded.generate(ids, max_new_tokens=6, temperature=0, eos_token_ids=()), resident)
    assert offloaded.offload.report()["demand_fetches"] > 0


def test_gpt_oss_cpu_misses_say_what_to_use(tiny):
    """CPU misses are refused (no CPU kernel); in-place reads ("mapped") serve gpt-oss: tests/offload/test_mapped_gpt_oss.py."""
    path = tiny("gpt_oss").path
    config = OffloadConfig(context_tokens=24, store="host", misses="cpu")
    with pytest.raises(moekit.MoekitError, match="clamped SwiGLU.*use --misses fetch"):
        load_offloaded(path, offload=config).generate(token_ids(1, 4), max_new_tokens=2)


@pytest.mark.parametrize("variant", ["deepseek_v3", "gpt_oss", "glm4_moe"])
def test_pregates_train_and_prefetch(tiny, variant, tmp_path):
    """Pre-gates train on the family's routing (dense first layers skipped) and drive offload
    prefetching without changing the tokens."""
    from moekit.offload.pregate import save_pregates, train_pregates

    path = tiny(variant).path
    model = moekit.load_model(path)
    weights, report = train_pregates(model, token_ids(8, 64, seed=1), steps=30, seqlen=64)
    moe = [i for i, is_moe in enumerate(model.config.moe_layers) if is_moe]
    assert sorted(weights) == moe[:-1]  # a pre-gate at each MoE layer that has a next one
    out = save_pregates(weights, model.config, tmp_path / "pregates", report)
    offloaded = load_offloaded(path, offload=OffloadConfig(context_tokens=24, predictor="pregate",
                                                           pregate_path=str(out)))
    ids = token_ids(1, 8)
    tokens = offloaded.generate(ids, max_new_tokens=6, temperature=0, eos_token_ids=())
    assert torch.equal(tokens, model.generate(ids, max_new_tokens=6, temperature=0, eos_token_ids=()))
    assert offloaded.offload.report()["prefetch_recall"] > 0


@pytest.mark.parametrize("variant", ["phimoe", "deepseek_v3", "gpt_oss"])
def test_router_finetune_to_top1(tiny, variant):
    """Top-k reduction fine-tuning runs through each family's router (sparsemixer, sigmoid with a
    selection bias, biased linear) and leaves the model routing at top-1."""
    from moekit.prune.finetune import finetune_router

    model = moekit.load_model(tiny(variant).path)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if ".mlp.router." in n}
    data = token_ids(4, 16, seed=3)
    finetune_router(model, iter([data] * 3), steps=3, top_k=1, entropy_weight=0.1, train_top_k=2)
    moved = [n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert moved and all(layer.mlp.top_k == 1 for layer in model.layers if layer.is_moe)
    assert model.generate(token_ids(1, 6), max_new_tokens=3, temperature=0).shape == (1, 3)


@pytest.mark.parametrize("variant", ["deepseek_v3", "gpt_oss", "granitemoe"])
def test_cli_finetune_writes_trained_routers_back(tiny, variant, tmp_path, capsys):
    """`moekit finetune --train router` writes each family's router (and gpt-oss's router bias)
    under its own names; training what cannot be written back yet is refused before any work."""
    import shutil

    from conftest import run_cli, write_char_tokenizer

    from moekit.checkpoint import Checkpoint

    path = shutil.copytree(tiny(variant).path, tmp_path / variant)
    write_char_tokenizer(path)
    text = tmp_path / "text.txt"
    text.write_text("def f(x):\n    return x * 2\n\nimport os\nprint(os.getcwd())\n" * 40)
    common = ["--model", str(path), "--data", str(text), "--samples", "4", "--seqlen", "32", "--device", "cpu",
              "--steps", "2", "--top-k", "1", "--train-top-k", "2"]
    code, _, err = run_cli(capsys, "finetune", *common, "--out", str(tmp_path / "out"))
    assert code == 0, err
    ckpt, family, cfg = read_config(tmp_path / "out")
    source = Checkpoint(path)
    layer = next(i for i in range(cfg.num_layers) if cfg.moe_layers[i])
    assert cfg.top_k == 1
    assert not torch.equal(ckpt.read(family.router_name(layer)), source.read(family.router_name(layer)))
    if cfg.router_bias:
        assert not torch.equal(ckpt.read(family.router_bias_name(layer)), source.read(family.router_bias_name(layer)))
    code, _, err = run_cli(capsys, "finetune", *common, "--train", "all", "--out", str(tmp_path / "all"))
    assert code == 2 and "cannot be written back" in err and "--train router" in err
    assert not (tmp_path / "all").exists()


@pytest.mark.parametrize("variant", ["deepseek_v2_group", "deepseek_v3", "glm4_moe", "gpt_oss", "granitemoe"])
def test_router_weights_of_its_own_choice_equal_routing(tiny, variant):
    """routers.weights_of (what strict offload weighs predicted experts with) gives the experts a
    router chose itself exactly the weights the router gave them."""
    from moekit.routers import weights_of

    model = moekit.load_model(tiny(variant).path)
    block = next(layer.mlp for layer in model.layers if layer.is_moe)
    x = torch.randn(7, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, ids, weights = block.route(x)
        again = weights_of(logits, ids, model.config.router, model.config.norm_topk_prob)
    torch.testing.assert_close(again, weights.float(), rtol=1e-6, atol=1e-7)


def test_strict_offload_uses_each_routers_rule(tiny):
    config = OffloadConfig(context_tokens=24, predictor="speculative", strict=True)
    with pytest.warns(UserWarning, match="strict"):
        model = load_offloaded(tiny("deepseek_v3").path, offload=config)
    assert model.generate(token_ids(1, 6), max_new_tokens=4, temperature=0).shape == (1, 4)
    with pytest.warns(UserWarning, match="strict"):
        model = load_offloaded(tiny("phimoe").path, offload=config)
    with pytest.raises(moekit.MoekitError, match="sparsemixer .* run without strict"):
        model.generate(token_ids(1, 6), max_new_tokens=4, temperature=0)


def test_group_limited_routers_refuse_pruning(tiny, tmp_path, capsys):
    """Dropping experts of a model that routes within groups would move experts between groups:
    refused by the library and by `moekit prune` before any counting."""
    import shutil

    from conftest import run_cli, write_char_tokenizer

    ckpt, family, cfg = read_config(tiny("deepseek_v3").path)
    kept = {1: [0, 1, 2, 3, 4, 5], 2: list(range(8))}
    with pytest.raises(moekit.MoekitError, match="best 2 of 4 groups.*not supported"):
        write_pruned(ckpt, family, cfg, kept, tmp_path / "pruned", {"keep": 0.75})
    assert not (tmp_path / "pruned").exists()
    path = shutil.copytree(tiny("deepseek_v3").path, tmp_path / "v3")
    write_char_tokenizer(path)
    text = tmp_path / "text.txt"
    text.write_text("def f(x):\n    return x * 2\n" * 40)
    code, _, err = run_cli(capsys, "prune", "--model", str(path), "--calib", str(text), "--samples", "2",
                           "--seqlen", "16", "--device", "cpu", "--keep", "0.75", "--out", str(tmp_path / "out"))
    assert code == 2 and "pruning would move experts between groups" in err
    assert not (tmp_path / "out").exists()


MISSES = {"fetch-host": ("fetch", "host"), "fetch-disk": ("fetch", "disk"), "cpu": ("cpu", "host"),
          "auto": ("auto", "auto"), "mapped": ("mapped", "host")}


def misses_cases() -> list:
    """Returns (variant, misses) parameters. Mapped reads run the slot kernels interpreted (~4-5 s a
    family): phimoe (sparsemixer routing) and deepseek_v2 (MLA, shared experts, a dense layer) keep them in
    the default run, the other families' mapped cases are slow; every other mode runs for every family."""
    variants = ["granitemoe", "phimoe", "deepseek_v2", "deepseek_v3", "glm4_moe"]
    return [pytest.param(v, m, marks=pytest.mark.slow if m == "mapped" and v not in ("phimoe", "deepseek_v2") else ())
            for v in variants for m in MISSES]


@pytest.mark.parametrize("variant, misses", misses_cases())
def test_every_misses_mode_equals_resident(tiny, variant, misses):
    """Each misses mode (fetch from host or disk, CPU experts, auto, in-place reads) serves the
    family's misses with the resident tokens, a cache of 3 experts per model."""
    from moekit.experts import triton_ops

    if misses == "mapped" and not triton_ops.triton_usable(torch.empty(0)):
        pytest.skip("mapped misses run the slot kernels: CUDA, or TRITON_INTERPRET=1 on the CPU")
    path = tiny(variant).path
    ids = token_ids(1, 10, seed=3)
    resident = moekit.load_model(path).generate(ids, max_new_tokens=6, temperature=0, eos_token_ids=())
    mode, store = MISSES[misses]
    config = OffloadConfig(context_tokens=24, store=store, misses=mode)
    model = load_offloaded(path, offload=dataclasses.replace(config, device_memory=budget_for(path, config, 3)))
    assert model.offload.misses == mode or mode == "auto"
    assert torch.equal(model.generate(ids, max_new_tokens=6, temperature=0, eos_token_ids=()), resident)
    report = model.offload.report()
    served = {"fetch": report["demand_fetches"], "cpu": report["cpu_experts"],
              "auto": report["demand_fetches"] + report["cpu_experts"], "mapped": report["mapped_reads"]}[mode]
    assert served > 0, report
