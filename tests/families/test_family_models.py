"""Issue 15's families against transformers, end to end: float32 logits and greedy tokens (batch
1 and 2, with and without the KV cache), offloaded (token-equal to resident), compressed (ternary
GPTQ beats RTN on held-out tokens), pruned (transformers loads the copy and agrees) and counted."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import moekit
from moekit.calibrate import run_calibration
from moekit.kv_cache import KVCache
from moekit.load import read_config
from moekit.offload import OffloadConfig, load_offloaded
from moekit.prune import count_usage, select_experts
from moekit.prune.rewrite import write_pruned
from moekit.quant.compress import compress
from moekit.quant.config import QuantConfig

from conftest import VOCAB, median_token_error, rel_error, token_ids, transformers

LOGITS_RTOL = 1e-4
VARIANTS = ["granitemoe", "granitemoe_tied", "phimoe", "phimoe_plain", "phimoe_longrope", "deepseek_v2",
            "deepseek_v2_group",
            "deepseek_v3", "deepseek_v3_plain", "glm4_moe", "glm4_moe_plain", "gpt_oss", "gpt_oss_full"]
FAMILY_OF = {"granitemoe": "granitemoe", "granitemoe_tied": "granitemoe", "phimoe": "phimoe",
             "phimoe_plain": "phimoe", "phimoe_longrope": "phimoe", "deepseek_v2": "deepseek_v2", "deepseek_v2_group": "deepseek_v2",
             "deepseek_v3": "deepseek_v3", "deepseek_v3_plain": "deepseek_v3", "glm4_moe": "glm4_moe",
             "glm4_moe_plain": "glm4_moe", "gpt_oss": "gpt_oss", "gpt_oss_full": "gpt_oss"}
# one variant per family for the heavier pillars
ONE_PER_FAMILY = ["granitemoe", "phimoe", "deepseek_v2", "deepseek_v3", "glm4_moe", "gpt_oss"]
COMPRESSIBLE = [v for v in ONE_PER_FAMILY if v != "gpt_oss"]  # gpt-oss: biased, clamped experts
# yarn variants: prompts run past original_max_position_embeddings (32)
PROMPT = {"deepseek_v2_group": 40, "deepseek_v3_plain": 40, "phimoe_longrope": 40}


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_transformers(tiny, variant):
    ckpt = tiny(variant)
    model = moekit.load_model(ckpt.path)
    assert model.config.family == FAMILY_OF[variant]
    ids = token_ids(2, PROMPT.get(variant, 12))
    with torch.no_grad():
        logits = model(ids)
    assert logits.shape == (*ids.shape, VOCAB)
    assert rel_error(logits, ckpt.hf_logits(ids)) <= LOGITS_RTOL


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("batch", [1, 2])
def test_greedy_tokens_match_transformers(tiny, variant, batch):
    ckpt = tiny(variant)
    model = moekit.load_model(ckpt.path)
    ids = token_ids(batch, PROMPT.get(variant, 10), seed=2 + batch)
    new = model.generate(ids, max_new_tokens=12, temperature=0, eos_token_ids=())
    expected = ckpt.hf_greedy(ids, 12)
    assert torch.equal(new, expected), f"moekit {new.tolist()} != transformers {expected.tolist()}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_kv_cache_equals_full_forward(tiny, variant):
    model = moekit.load_model(tiny(variant).path)
    n = PROMPT.get(variant, 12) + 4
    ids = token_ids(2, n, seed=5)
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.config, batch=2, capacity=n, device="cpu", dtype=model.dtype)
        prefill = model(ids[:, :6], cache=cache, start=0)
        chunk = model(ids[:, 6:9], cache=cache, start=6)  # prefill continuing from a cache
        steps = [model(ids[:, p:p + 1], cache=cache, start=p) for p in range(9, n)]
    torch.testing.assert_close(prefill, full[:, :6], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunk, full[:, 6:9], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 9:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_ragged_batch_equals_transformers_per_prompt(tiny, variant):
    """Prompts of different lengths in one ragged batch (paged KV cache) each get transformers' tokens."""
    ckpt = tiny(variant)
    model = moekit.load_model(ckpt.path)
    prompts = [token_ids(1, n, seed=20 + n)[0] for n in (3, 11, 7)]
    new = model.generate(prompts, max_new_tokens=6, temperature=0, eos_token_ids=())
    for prompt, tokens in zip(prompts, new):
        assert torch.equal(tokens, ckpt.hf_greedy(prompt[None], 6)[0])


def _budget_for(path, config: OffloadConfig, slots: int) -> int:
    """Returns the device budget that leaves exactly `slots` experts of cache."""
    plan = load_offloaded(path, offload=dataclasses.replace(config, device_memory=None)).offload.plan
    return plan.planned_bytes - plan.cache_bytes + slots * plan.expert_bytes


@pytest.mark.parametrize("variant", ONE_PER_FAMILY)
def test_offloaded_equals_resident(tiny, variant):
    path = tiny(variant).path
    ids = token_ids(1, 10, seed=3)
    resident = moekit.load_model(path).generate(ids, max_new_tokens=8, temperature=0, eos_token_ids=())
    config = OffloadConfig(context_tokens=24, store="host", misses="fetch")
    model = load_offloaded(path, offload=dataclasses.replace(config, device_memory=_budget_for(path, config, 3)))
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
    for variant in COMPRESSIBLE:
        for method in ("gptq", "rtn"):
            path = root / f"{variant}-{method}"
            compress(tiny(variant).path, path, QuantConfig(bits="ternary", method=method), calib, progress=False)
            out[(variant, method)] = path
    return out


@pytest.mark.parametrize("variant", COMPRESSIBLE)
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


@pytest.mark.parametrize("variant, expected", [
    ("granitemoe", {"scalars": "embedding x 3, residual x 0.6, logits / 2.5, attention scale 0.2",
                    "router": "softmax top-k, renormalised"}),
    ("phimoe_longrope", {"rope": "longrope, short factors: context 64 (the long-context factors are not applied)"}),
    ("deepseek_v2_group", {"rope": "yarn x4 over 32"}),
    ("phimoe", {"norm": "LayerNorm with bias", "router": "sparsemixer (gap 0.01)",
                "attention": "4 heads over 2 kv heads of 8, sliding window 6"}),
    ("deepseek_v2", {"attention": "MLA, 4 heads: kv_lora_rank 16, plain q_proj, qk 8 nope + 4 rope, v 12",
                     "KV cache": "20 values per position and layer", "dense layers": "1 (layers 0), ffn 40",
                     "shared expert": "ffn 48", "router": "softmax top-k, x1.5"}),
    ("deepseek_v3", {"router": "sigmoid top-k, best 2 of 4 groups, selection bias, renormalised, x2.5",
                     "attention": "MLA, 4 heads: kv_lora_rank 16, q_lora_rank 24, qk 8 nope + 4 rope, v 12"}),
    ("glm4_moe", {"attention": "4 heads over 2 kv heads of 16, rope on 8 of 16 dims",
                  "router": "sigmoid top-k, best 2 of 4 groups, selection bias, renormalised, x1.5",
                  "dense layers": "1 (layers 0), ffn 40", "shared expert": "ffn 24"}),
    ("gpt_oss", {"attention": "4 heads over 2 kv heads of 8, sliding window 5 on 2 of 3 layers, sinks",
                 "router": "softmax top-k, biased, renormalised",
                 "experts": "clamped_swiglu (alpha 1.702, limit 0.6), biased"}),
])
def test_inspect_shows_family_specifics(tiny, variant, expected, capsys):
    from conftest import run_cli

    code, out, _ = run_cli(capsys, "inspect", "--model", str(tiny(variant).path))
    assert code == 0
    for what, how in expected.items():
        assert any(line.split() == [*what.split(), *how.split()] for line in out.splitlines()), (what, how, out)


@pytest.mark.parametrize("variant", ["deepseek_v2", "deepseek_v3"])
def test_latent_cache_absorbed_equals_expanded(tiny, variant):
    """Decode through the latent cache: the absorbed form (kv_b folded into q and the output)
    equals expanding the cached latents into heads, and the cache holds r + dr values per position."""
    model = moekit.load_model(tiny(variant).path)
    cfg = model.config
    ids = token_ids(2, 10, seed=13)
    cache = KVCache(cfg, batch=2, capacity=10, device="cpu", dtype=model.dtype)
    assert cache.keys[0].shape == (2, 1, 10, cfg.mla.kv_lora_rank)
    assert cache.values[0].shape == (2, 1, 10, cfg.mla.qk_rope_head_dim)
    expanded_bytes = 2 * cfg.num_layers * 2 * 10 * cfg.num_heads * cfg.mla.qk_head_dim * 4
    assert cache.bytes * 4 < expanded_bytes
    with torch.no_grad():
        model(ids[:, :9], cache=cache, start=0)
        x = torch.randn(2, 1, cfg.hidden_size)
        cos, sin = model.rope(torch.tensor([9]))
        for layer in model.layers:
            attn = layer.attn
            q, latent, k_rope = attn.project(x, cos, sin)
            absorbed = attn.attend(q, latent, k_rope, cache, 9, absorbed=True)
            expanded = attn.attend(q, latent, k_rope, cache, 9, absorbed=False)
            assert rel_error(absorbed, expanded) < 1e-5


def test_mtp_layers_after_the_last_layer_are_not_read(tiny, tmp_path):
    """DeepSeek-V3 checkpoints carry multi-token-prediction layers (model.layers.61.* in V3) past
    num_hidden_layers: they load as if absent."""
    import json
    import shutil

    from safetensors.torch import save_file

    src = tiny("deepseek_v3").path
    dst = tmp_path / "with_mtp"
    shutil.copytree(src, dst)
    index_path = dst / "model.safetensors.index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
    else:  # one shard: write an index that names it
        from safetensors import safe_open

        with safe_open(dst / "model.safetensors", "pt") as f:
            index = {"metadata": {}, "weight_map": {k: "model.safetensors" for k in f.keys()}}
    n = read_config(src)[2].num_layers
    extra = {f"model.layers.{n}.eh_proj.weight": torch.randn(8, 64),
             f"model.layers.{n}.self_attn.kv_b_proj.weight": torch.randn(3, 3)}
    save_file(extra, dst / "mtp.safetensors")
    index["weight_map"].update({k: "mtp.safetensors" for k in extra})
    index_path.write_text(json.dumps(index))
    ids = token_ids(1, 8)
    with torch.no_grad():
        assert torch.equal(moekit.load_model(dst)(ids), moekit.load_model(src)(ids))


@pytest.mark.parametrize("variant", ONE_PER_FAMILY)
def test_kv_cache_with_device_position_equals_int_position(tiny, variant):
    """The graph-safe decode path (start a 0-d tensor, attending to the whole buffer under a mask)."""
    model = moekit.load_model(tiny(variant).path)
    ids = token_ids(1, 10, seed=6)
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.config, batch=1, capacity=16, device="cpu", dtype=model.dtype)
        model(ids[:, :6], cache=cache, start=0)
        steps = [model(ids[:, p:p + 1], cache=cache, start=torch.tensor(p)) for p in range(6, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 6:], rtol=1e-5, atol=1e-5)


# ---- GPU ---------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS)
def test_cuda_float32_logits_match_transformers(tiny, variant):
    ckpt = tiny(variant)
    model = moekit.load_model(ckpt.path, device="cuda", dtype="float32")
    ids = token_ids(2, PROMPT.get(variant, 12))
    with torch.no_grad():
        actual = model(ids.cuda()).cpu()
    assert rel_error(actual, ckpt.hf_logits(ids)) <= LOGITS_RTOL


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ONE_PER_FAMILY)
@pytest.mark.parametrize("batch", [1, 3])
def test_cuda_graph_decode_equals_eager_and_transformers(tiny, variant, batch):
    from moekit.generate import GenerationStats

    model = moekit.load_model(tiny(variant).path, device="cuda", dtype="float32")
    ids = token_ids(batch, 7).cuda()
    stats = GenerationStats()
    graphed = model.generate(ids, 16, temperature=0, eos_token_ids=(), cuda_graph=True, stats=stats)
    eager = model.generate(ids, 16, temperature=0, eos_token_ids=(), cuda_graph=False)
    assert stats.cuda_graph
    assert torch.equal(graphed, eager)
    assert torch.equal(graphed.cpu(), tiny(variant).hf_greedy(ids.cpu(), 16))


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["deepseek_v2", "deepseek_v3"])
def test_cuda_bf16_mla_decode_close_to_float32(tiny, variant):
    """bf16 on the GPU: the absorbed decode keeps close to the float32 logits (median over tokens)."""
    from conftest import median_token_error

    path = tiny(variant).path
    ids = token_ids(2, 12).cuda()
    with torch.no_grad():
        ref = moekit.load_model(path, device="cuda", dtype="float32")(ids).float()
        model = moekit.load_model(path, device="cuda", dtype="bfloat16")
        cache = KVCache(model.config, batch=2, capacity=12, device="cuda", dtype=torch.bfloat16)
        model(ids[:, :8], cache=cache, start=0)
        steps = torch.cat([model(ids[:, p:p + 1], cache=cache, start=p) for p in range(8, 12)], dim=1).float()
    assert median_token_error(steps, ref[:, 8:]) < 0.05


def test_gpt_oss_compress_is_refused_and_cpu_misses_say_what_to_use(tiny, tmp_path):
    path = tiny("gpt_oss").path
    with pytest.raises(moekit.MoekitError, match="gpt_oss experts \\(biases, clamped_swiglu\\) cannot be compressed"):
        compress(path, tmp_path / "out", QuantConfig(bits="ternary", method="rtn"), progress=False)
    assert not (tmp_path / "out").exists()
    config = OffloadConfig(context_tokens=24, store="host", misses="cpu")
    with pytest.raises(moekit.MoekitError, match="clamped SwiGLU.*--misses"):
        load_offloaded(path, offload=config).generate(token_ids(1, 4), max_new_tokens=2)


# ---- FP8 block-quantized checkpoints (DeepSeek-V3's released format) ----------------------

def fp8_copy(src, dst, block=(8, 8)):
    """Returns dst after writing an FP8 copy of checkpoint `src` as DeepSeek ships V3: every 2-D
    projection (not embeddings, norms, LM head or router) as e4m3 with one float32 `_scale_inv`
    per block of `block`, and quantization_config naming the blocks."""
    import json

    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True)
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(f))
    out = {}
    for name, w in tensors.items():
        if not (name.endswith("proj.weight") and w.dim() == 2):
            out[name] = w
            continue
        rows, cols = w.shape
        br, bc = -(-rows // block[0]), -(-cols // block[1])
        padded = torch.zeros(br * block[0], bc * block[1])
        padded[:rows, :cols] = w.float()
        blocks = padded.view(br, block[0], bc, block[1])
        scale = blocks.abs().amax(dim=(1, 3)) / 448.0  # e4m3's largest value
        out[name] = (blocks / scale[:, None, :, None]).view_as(padded)[:rows, :cols].to(torch.float8_e4m3fn)
        out[name + "_scale_inv"] = scale
    save_file(out, dst / "model.safetensors")
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": list(block)}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def dequantized_copy(src, dst):
    """Returns dst after writing checkpoint `src` with every FP8 weight replaced by fp8 * its block
    scale (DeepSeek's fp8_cast_bf16 in float32), written here without moekit's reader."""
    import json

    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True)
    tensors = load_file(src / "model.safetensors")
    cfg = json.loads((src / "config.json").read_text())
    br, bc = cfg.pop("quantization_config")["weight_block_size"]
    out = {}
    for name, t in tensors.items():
        if name.endswith("_scale_inv"):
            continue
        if t.dtype == torch.float8_e4m3fn:
            s = tensors[name + "_scale_inv"]
            full = s[:, None, :, None].expand(-1, br, -1, bc).reshape(s.shape[0] * br, s.shape[1] * bc)
            t = t.float() * full[: t.shape[0], : t.shape[1]]
        out[name] = t
    save_file(out, dst / "model.safetensors")
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def fp8_v3(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    fp8 = fp8_copy(tiny("deepseek_v3").path, root / "fp8")
    return fp8, dequantized_copy(fp8, root / "dequantized")


def test_fp8_checkpoint_loads_dequantized(tiny, fp8_v3):
    fp8, reference = fp8_v3
    ids = token_ids(2, 12)
    with torch.no_grad():
        logits = moekit.load_model(fp8)(ids)
        assert torch.equal(logits, moekit.load_model(reference)(ids))
        # e4m3 keeps 3 mantissa bits: near the original model (a median token: some routings flip), not equal
        assert median_token_error(logits, tiny("deepseek_v3").hf_logits(ids)) < 0.15
    new = moekit.load_model(fp8).generate(ids[:1], max_new_tokens=8, temperature=0, eos_token_ids=())
    assert torch.equal(new, moekit.load_model(reference).generate(ids[:1], max_new_tokens=8, temperature=0,
                                                                  eos_token_ids=()))


def test_fp8_checkpoint_offloads_compresses_and_prunes(fp8_v3, tmp_path):
    fp8, reference = fp8_v3
    ids = token_ids(1, 10, seed=3)
    resident = moekit.load_model(reference).generate(ids, max_new_tokens=6, temperature=0, eos_token_ids=())
    for store in ("host", "disk"):  # the disk store reads (and dequantizes) experts on each miss
        config = OffloadConfig(context_tokens=24, store=store, misses="fetch")
        model = load_offloaded(fp8, offload=dataclasses.replace(config, device_memory=_budget_for(fp8, config, 3)))
        assert torch.equal(model.generate(ids, max_new_tokens=6, temperature=0, eos_token_ids=()), resident)
    out = tmp_path / "ternary"
    compress(fp8, out, QuantConfig(bits="ternary", method="rtn"), progress=False)
    names = set(read_config(out)[0].names())
    assert not any(n.endswith("_scale_inv") for n in names)
    assert moekit.load_model(out).generate(ids, max_new_tokens=4).shape == (1, 4)
    ckpt, family, cfg = read_config(fp8)
    kept = {layer: list(range(cfg.num_experts)) for layer in (1, 2)}
    pruned = write_pruned(ckpt, family, cfg, kept, tmp_path / "pruned", {"keep": 1.0})
    assert "quantization_config" not in read_config(pruned)[0].config
    assert torch.equal(moekit.load_model(pruned).generate(ids, max_new_tokens=6, temperature=0, eos_token_ids=()),
                       resident)


def test_fp8_inspect_counts_scales_with_the_experts(fp8_v3):
    from moekit.inspect_model import inspect_checkpoint

    fp8, reference = fp8_v3
    q, dense = inspect_checkpoint(fp8), inspect_checkpoint(reference)
    assert q.specifics["stored as"] == "FP8 e4m3, one scale per 8x8 block (dequantized when read)"
    assert "stored as" not in dense.specifics
    assert q.params_experts == dense.params_experts
    # e4m3 plus a float32 scale per 8x8 block (0.5 bit): the experts' 48x32 and 32x24 are whole blocks
    assert q.bits_per_expert_param == pytest.approx(8.5)


# ---- gpt-oss MXFP4 checkpoints (the released format) --------------------------------------

FP4_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (blocks [..., R, K/32, 16] uint8, scales [..., R, K/32] uint8) of w [..., R, K]: per
    32 values a power of two that brings the largest within e2m1's 6, then the nearest e2m1 code,
    two codes a byte, low nibble first (the OCP MX layout gpt-oss ships)."""
    *lead, rows, cols = w.shape
    groups = w.float().reshape(*lead, rows, cols // 32, 32)
    exponent = torch.ceil(torch.log2(groups.abs().amax(-1).clamp(min=1e-30) / 6.0)).clamp(-127, 127)
    codes = ((groups / torch.exp2(exponent)[..., None])[..., None] - FP4_VALUES).abs().argmin(-1).to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4), (exponent + 127).to(torch.uint8)


def mxfp4_copy(src, dst):
    """Returns dst after writing checkpoint `src` with its experts' two matrices in MXFP4."""
    import json

    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True)
    tensors = load_file(next(src.glob("*.safetensors")))
    out = {}
    for name, t in tensors.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            out[name + "_blocks"], out[name + "_scales"] = quantize_mxfp4(t.transpose(-1, -2))  # Linear layout
        else:
            out[name] = t
    save_file(out, dst / "model.safetensors")
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def mxfp4_oss(tiny, tmp_path_factory):
    """Returns (MXFP4 checkpoint, transformers' model of it dequantized by transformers' own MXFP4 decoder)."""
    import json

    from safetensors.torch import load_file, save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    root = tmp_path_factory.mktemp("mxfp4")
    mx = mxfp4_copy(tiny("gpt_oss_wide").path, root / "mxfp4")
    tensors = load_file(mx / "model.safetensors")
    dense = {}
    for name, t in tensors.items():
        if name.endswith("_blocks"):
            base = name.removesuffix("_blocks")
            dense[base] = convert_moe_packed_tensors(t, tensors[base + "_scales"], dtype=torch.float32)
        elif not name.endswith("_scales"):
            dense[name] = t
    (root / "dequantized").mkdir()
    save_file({k: v.contiguous() for k, v in dense.items()}, root / "dequantized" / "model.safetensors")
    cfg = json.loads((mx / "config.json").read_text())
    del cfg["quantization_config"]
    (root / "dequantized" / "config.json").write_text(json.dumps(cfg))
    reference = transformers.AutoModelForCausalLM.from_pretrained(root / "dequantized", dtype=torch.float32).eval()
    return mx, reference


def test_mxfp4_experts_stay_mxfp4_and_match_transformers(mxfp4_oss):
    from moekit.experts.clamped import Mxfp4ClampedForm

    mx, reference = mxfp4_oss
    model = moekit.load_model(mx)
    experts = model.layers[0].mlp.experts
    assert isinstance(experts.form, Mxfp4ClampedForm) and experts.gate_up_blocks.dtype == torch.uint8
    assert experts.expert_bytes() < 0.3 * (3 * 64 * 32 * 4)  # ~4.25 bits a weight (+ biases), not float32
    ids = token_ids(2, 12)
    with torch.no_grad():
        assert rel_error(model(ids), reference(ids).logits) <= LOGITS_RTOL
    for batch in (1, 2):
        ids = token_ids(batch, 10, seed=4 + batch)
        gen = transformers.GenerationConfig(do_sample=False, max_new_tokens=10, eos_token_id=None, pad_token_id=0)
        with torch.no_grad():
            expected = reference.generate(ids, generation_config=gen, attention_mask=torch.ones_like(ids))[:, 10:]
        assert torch.equal(model.generate(ids, max_new_tokens=10, temperature=0, eos_token_ids=()), expected)


def test_mxfp4_offloaded_moves_mxfp4_bytes(mxfp4_oss):
    mx, _ = mxfp4_oss
    ids = token_ids(1, 10, seed=3)
    resident = moekit.load_model(mx).generate(ids, max_new_tokens=8, temperature=0, eos_token_ids=())
    for store in ("host", "disk"):
        config = OffloadConfig(context_tokens=24, store=store, misses="fetch")
        model = load_offloaded(mx, offload=dataclasses.replace(config, device_memory=_budget_for(mx, config, 3)))
        plan = model.offload.plan
        assert plan.expert_bytes == moekit.load_model(mx).layers[0].mlp.experts.expert_bytes()
        assert torch.equal(model.generate(ids, max_new_tokens=8, temperature=0, eos_token_ids=()), resident)
        assert model.offload.report()["demand_fetches"] > 0


def test_mxfp4_inspect_and_prune(mxfp4_oss, tmp_path):
    from moekit.inspect_model import inspect_checkpoint

    mx, _ = mxfp4_oss
    report = inspect_checkpoint(mx)
    assert 4.25 < report.bits_per_expert_param < 5.5  # e2m1 + a scale per 32, plus float32 biases
    assert report.specifics["stored as"].startswith("MXFP4 experts")
    ckpt, family, cfg = read_config(mx)
    kept = {0: [0, 2, 3], 1: [1, 2, 3]}
    out = write_pruned(ckpt, family, cfg, kept, tmp_path / "pruned", {"keep": 0.75})
    pruned = moekit.load_model(out)
    whole = moekit.load_model(mx)
    with torch.no_grad():  # a kept expert is the same expert: its bytes were sliced, not re-encoded
        assert torch.equal(pruned.layers[1].mlp.experts.down_blocks[0], whole.layers[1].mlp.experts.down_blocks[1])
        assert torch.equal(pruned.layers[0].mlp.router.bias, whole.layers[0].mlp.router.bias[[0, 2, 3]])


@pytest.mark.gpu
def test_cuda_mxfp4_graph_decode_equals_eager(mxfp4_oss):
    from moekit.generate import GenerationStats

    mx, reference = mxfp4_oss
    model = moekit.load_model(mx, device="cuda", dtype="float32")
    ids = token_ids(2, 7).cuda()
    stats = GenerationStats()
    graphed = model.generate(ids, 12, temperature=0, eos_token_ids=(), cuda_graph=True, stats=stats)
    eager = model.generate(ids, 12, temperature=0, eos_token_ids=(), cuda_graph=False)
    assert stats.cuda_graph and torch.equal(graphed, eager)


@pytest.mark.parametrize("variant, offload", [("granitemoe", False), ("phimoe", True), ("deepseek_v2", True),
                                              ("deepseek_v3", False), ("glm4_moe", True), ("gpt_oss", True)])
def test_cli_generate(tiny, variant, offload, capsys, tmp_path):
    """`moekit generate --json` on a copy of the tiny checkpoint with a character tokenizer: the
    tokens equal the library's greedy ones."""
    import json
    import shutil

    from conftest import run_cli, write_char_tokenizer

    path = shutil.copytree(tiny(variant).path, tmp_path / variant)
    write_char_tokenizer(path)
    argv = ["generate", "def f(x):", "--model", str(path), "--device", "cpu", "--max-new-tokens", "6",
            "--temperature", "0", "--json"] + (["--offload"] if offload else [])
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    result = json.loads(out)
    from moekit.tokenizer import load_tokenizer

    ids = torch.tensor([load_tokenizer(path).encode("def f(x):")])
    expected = moekit.load_model(path).generate(ids, max_new_tokens=6, temperature=0)
    assert result["token_ids"] == expected[0].tolist()


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


def test_mxfp4_experts_are_not_trained(mxfp4_oss):
    """Training routers and experts of an MXFP4 model moves the biases and routers; the MXFP4
    bytes are stored values, left as they are."""
    from moekit.prune.finetune import finetune_router

    mx, _ = mxfp4_oss
    model = moekit.load_model(mx)
    blocks = model.layers[0].mlp.experts.gate_up_blocks.clone()
    bias = model.layers[0].mlp.experts.gate_up_bias.detach().clone()
    finetune_router(model, iter([token_ids(4, 16, seed=3)] * 2), steps=2, top_k=2, entropy_weight=0.0,
                    train_what="router+experts", train_top_k=2)
    assert torch.equal(model.layers[0].mlp.experts.gate_up_blocks, blocks)
    assert not torch.equal(model.layers[0].mlp.experts.gate_up_bias, bias)


@pytest.mark.parametrize("variant", ["deepseek_v3", "gpt_oss", "granitemoe"])
def test_cli_finetune_writes_trained_routers_back(tiny, variant, tmp_path, capsys):
    """`moekit finetune --train router` writes each family's router (and gpt-oss's router bias)
    under its own names; training what cannot be written back yet is refused before any work."""
    import shutil

    from moekit.checkpoint import Checkpoint

    from conftest import run_cli, write_char_tokenizer

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
