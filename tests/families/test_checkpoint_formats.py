"""Quantized checkpoints as the families ship them: DeepSeek-V3's FP8 blocks (dequantized when
read) and gpt-oss's MXFP4 experts (kept MXFP4 as a stored form), each against a reference
dequantized outside moekit (transformers' own MXFP4 decoder for gpt-oss)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import moekit
from moekit.load import read_config
from moekit.offload import OffloadConfig, load_offloaded
from moekit.prune.rewrite import write_pruned
from moekit.quant.compress import compress
from moekit.quant.config import QuantConfig

from conftest import apply_swiglu_config, median_token_error, rel_error, token_ids, transformers
from family_cases import LOGITS_RTOL, budget_for

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
        model = load_offloaded(fp8, offload=dataclasses.replace(config, device_memory=budget_for(fp8, config, 3)))
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
    reference = transformers.AutoModelForCausalLM.from_pretrained(root / "dequantized", dtype=torch.float32)
    reference = apply_swiglu_config(reference).eval()
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
        model = load_offloaded(mx, offload=dataclasses.replace(config, device_memory=budget_for(mx, config, 3)))
        plan = model.offload.plan
        assert plan.expert_bytes == moekit.load_model(mx).layers[0].mlp.experts.expert_bytes()
        assert torch.equal(model.generate(ids, max_new_tokens=8, temperature=0, eos_token_ids=()), resident)
        assert model.offload.report()["demand_fetches"] > 0


def test_mxfp4_pages_move_mxfp4_bytes_through_the_pipeline(mxfp4_oss):
    """The batch pipeline pages gpt-oss's MXFP4 experts as stored (blocks, scales and biases in one
    packed row an expert, the same bytes the resident layer holds) and CGOPipe's greedy tokens equal
    the sequential engine's (float32 compute, the CPU run of the schedule)."""
    from moekit.experts.clamped import Mxfp4ClampedForm
    from moekit.pipeline.cgopipe import generate_pipelined
    from moekit.pipeline.paged import PagedLoader

    mx, _ = mxfp4_oss
    prompts = [[5, 17, 30, 42, 9], [99, 3], [8], list(range(3, 30))]
    resident = moekit.load_model(mx, dtype="float32")
    want = [t.tolist() for t in resident.generate(prompts, max_new_tokens=5, temperature=0.0, eos_token_ids=(),
                                                  stop_at_eos=False)]
    model = moekit.load_model(mx, dtype="float32", experts=PagedLoader(resident=1))
    runtime = model.expert_runtime
    assert isinstance(runtime.layout.form, Mxfp4ClampedForm)
    assert runtime.layout.expert_bytes() == resident.layers[0].mlp.experts.expert_bytes()
    got = [t.tolist() for t in generate_pipelined(model, prompts, max_new_tokens=5, micro_batch=2)]
    assert got == want and runtime.pages_loaded > 0


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


@pytest.mark.gpu
def test_cuda_mxfp4_graph_decode_equals_eager(mxfp4_oss):
    from moekit.generate import GenerationStats

    mx, _ = mxfp4_oss
    model = moekit.load_model(mx, device="cuda", dtype="float32")
    ids = token_ids(2, 7).cuda()
    stats = GenerationStats()
    graphed = model.generate(ids, 12, temperature=0, eos_token_ids=(), cuda_graph=True, stats=stats)
    eager = model.generate(ids, 12, temperature=0, eos_token_ids=(), cuda_graph=False)
    assert stats.cuda_graph and torch.equal(graphed, eager)


def test_mxfp4_compresses_to_ternary(mxfp4_oss, tmp_path):
    """MXFP4 experts as compress's input: decoded, then GPTQ'd to the ternary code (biases kept);
    per layer on held-out tokens GPTQ is closer to the MXFP4 experts than round-to-nearest, and the
    copy holds no MXFP4 tensor."""
    from moekit.calibrate import run_calibration
    from moekit.experts.clamped import BiasedCompressedForm
    from moekit.inspect_model import inspect_checkpoint

    mx, _ = mxfp4_oss
    paths = {}
    for method in ("gptq", "rtn"):
        paths[method] = tmp_path / method
        compress(mx, paths[method], QuantConfig(bits="ternary", method=method), token_ids(48, 32, seed=7),
                 progress=False)
    names = set(read_config(paths["gptq"])[0].names())
    assert not any(n.endswith(("_blocks", "_scales", "_proj", "_proj_bias")) for n in names), sorted(names)
    assert inspect_checkpoint(paths["gptq"]).specifics["stored as"].startswith("moekit ")
    seen = []
    run_calibration(mx, token_ids(8, 24, seed=11),
                    lambda inputs: seen.append((inputs.layer, inputs.inputs, inputs.expert_ids, inputs.weights)))
    source = moekit.load_model(mx)
    models = {m: moekit.load_model(p) for m, p in paths.items()}
    assert isinstance(models["gptq"].layers[0].mlp.experts.form, BiasedCompressedForm)
    errors = {"gptq": 0.0, "rtn": 0.0}
    with torch.no_grad():
        for layer, x, ids, w in seen:
            want = source.layers[layer].mlp.experts(x, ids, w)
            for method, model in models.items():
                errors[method] += (model.layers[layer].mlp.experts(x, ids, w) - want).norm().item() ** 2
    assert errors["gptq"] < 0.9 * errors["rtn"], errors
    assert models["gptq"].generate(token_ids(1, 8), max_new_tokens=4).shape == (1, 4)


def test_mxfp4_decode_equals_transformers_over_every_byte_and_scale():
    """Every byte (two e2m1 codes) under scales over E8M0's range decodes as transformers' MXFP4
    decoder does, and bf16 holds them exactly (the device decodes straight to bf16)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from moekit.experts.clamped import decode_mxfp4

    g = torch.Generator().manual_seed(0)
    blocks = torch.arange(256, dtype=torch.uint8).repeat(2 * 8 * 4 * 16 // 256 + 1)[: 2 * 8 * 4 * 16]
    blocks = blocks[torch.randperm(blocks.numel(), generator=g)].view(2, 8, 4, 16)  # [E, R, K/32, 16]
    scales = torch.randint(1, 255, (2, 8, 4), generator=g, dtype=torch.uint8)
    expected = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32).transpose(1, 2)  # [E, R, K]
    assert torch.equal(decode_mxfp4(blocks, scales, torch.float32), expected)
    assert torch.equal(decode_mxfp4(blocks, scales, torch.bfloat16).float(), expected)


def test_mxfp4_slot_kernels_equal_the_pytorch_path(mxfp4_oss):
    """The per-slot MXFP4 kernels (decode in the kernel, biases, clamped SwiGLU, routing weight)
    against the PyTorch path on the same stored bytes, at a few decode batch sizes."""
    from conftest import kernel_device

    from moekit.experts.clamped import mxfp4_slot_ffn

    device = kernel_device()
    mx, _ = mxfp4_oss
    experts = moekit.load_model(mx).layers[1].mlp.experts
    stacked = {k: v.detach().to(device) for k, v in experts.stacked().items()}
    g = torch.Generator().manual_seed(0)
    for tokens in (1, 3):
        x = torch.randn(tokens, experts.hidden, generator=g).to(device)
        ids = torch.stack([torch.randperm(experts.num_experts, generator=g)[:2] for _ in range(tokens)]).to(device)
        w = torch.rand(tokens, 2, generator=g).to(device)
        expected = experts.form.run_planned(x, ids, w, stacked, grad=False)
        got = mxfp4_slot_ffn(x, ids, w, stacked, experts.form.alpha, experts.form.limit)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mxfp4_gpu_branch_on_the_cpu_equals_the_pytorch_path(mxfp4_oss, monkeypatch, dtype):
    """The GPU's branch of MXFP4 gpt-oss decode (Mxfp4ClampedForm.fused -> the slot kernels) run on
    the CPU under the Triton interpreter, in float32 and bf16: greedy tokens equal the PyTorch path's,
    resident and offloaded (a 3-expert cache: the kernels read slab slots); float32 decode logits too."""
    from conftest import kernel_device

    from moekit.experts import clamped
    from moekit.kv_cache import KVCache

    if kernel_device() != "cpu":
        pytest.skip("on a GPU the branch runs for real (test_cuda_mxfp4_decode_steps_match_transformers)")
    mx, _ = mxfp4_oss
    ids = token_ids(2, 7)
    config = OffloadConfig(context_tokens=24, predictor="none")
    config = dataclasses.replace(config, device_memory=budget_for(mx, config, 3))
    resident = moekit.load_model(mx, dtype=dtype)
    with torch.no_grad():
        logits = resident(ids)
    tokens = resident.generate(ids, 6, temperature=0, eos_token_ids=())
    calls = []

    def everywhere(x):  # the kernels for every few-slot call, as on CUDA tensors
        calls.append(x.shape[0])
        return True

    monkeypatch.setattr(clamped, "slot_kernels_run", everywhere)
    with torch.no_grad():
        cache = KVCache(resident.config, batch=2, capacity=8, device="cpu", dtype=dtype)
        resident(ids[:, :6], cache=cache, start=0)
        step = resident(ids[:, 6:], cache=cache, start=6)
    assert calls, "the decode step did not reach the slot kernels"
    if dtype == torch.float32:
        torch.testing.assert_close(step, logits[:, 6:], rtol=1e-4, atol=1e-4)
    assert torch.equal(resident.generate(ids, 6, temperature=0, eos_token_ids=()), tokens)
    offloaded = load_offloaded(mx, dtype=dtype, offload=config)
    calls.clear()
    assert torch.equal(offloaded.generate(ids, 6, temperature=0, eos_token_ids=()), tokens)
    assert calls and offloaded.offload.report()["demand_fetches"] > 0


@pytest.mark.gpu
def test_cuda_mxfp4_decode_steps_match_transformers(mxfp4_oss):
    """On the GPU, decode steps (few slots) run the MXFP4 slot kernels: greedy tokens equal
    transformers' on the dequantized reference, in float32."""
    mx, reference = mxfp4_oss
    model = moekit.load_model(mx, device="cuda", dtype="float32")
    ids = token_ids(1, 10, seed=5)
    gen = transformers.GenerationConfig(do_sample=False, max_new_tokens=10, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        expected = reference.generate(ids, generation_config=gen, attention_mask=torch.ones_like(ids))[:, 10:]
    tokens = model.generate(ids.cuda(), max_new_tokens=10, temperature=0, eos_token_ids=(), cuda_graph=False)
    assert torch.equal(tokens.cpu(), expected)
