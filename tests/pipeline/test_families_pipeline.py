"""CGOPipe (moekit.pipeline, the schedule's CPU run: float32, attention on the worker thread) for
every family the loader reads, against the sequential engine: the same greedy tokens for prompts
of mixed lengths (1 to 40 tokens, past the sliding windows of phimoe and gpt-oss and past the
yarn variants' original context), with the float32 checkpoint's experts resident, a bf16
checkpoint's experts paged, and int4 (RTN) experts paged (gpt-oss's with their biases and clamped
SwiGLU; its MXFP4 experts below). Sinks (gpt-oss) and MLA (DeepSeek, the absorbed form over a joint latent pool,
moekit.pipeline.latent) run in the native kernel."""

from __future__ import annotations

import copy

import pytest
import torch

import moekit
from moekit import native
from moekit.errors import MoekitError
from moekit.load import load_model
from moekit.pipeline.cgopipe import NativeAttention, PipelinedDecoder, generate_pipelined
from moekit.pipeline.paged import PagedLoader
from moekit.quant.compress import compress
from moekit.quant.config import QuantConfig

# one per family of issue 14's list (qkv bias, shared experts, q/k norm, muP scalars, windows,
# partial rotary, sinks, MLA); the other variants of each family run under -m slow
FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe", "phimoe", "glm4_moe", "gpt_oss",
            "deepseek_v2", "deepseek_v3"]
MORE = ["mixtral_sliding", "qwen2_moe_step", "qwen3_moe_bias", "olmoe_clip", "granitemoe_tied", "phimoe_longrope",
        "glm4_moe_plain", "gpt_oss_full", "deepseek_v2_group", "deepseek_v3_plain"]
PROMPTS = [[5, 17, 30, 42, 9, 11, 7], [99, 3], [77] * 20, [8], list(range(3, 43)), [20, 1, 95, 31]]
NEW_TOKENS = 5
FORMS = {"int4": QuantConfig(bits="4", group_size=8, method="rtn"), "ternary": QuantConfig(bits="ternary", method="rtn")}


def sequential(model) -> list[list[int]]:
    """Returns the sequential engine's greedy tokens of PROMPTS (moekit.generate, no eos stop)."""
    return [t.tolist() for t in model.generate(PROMPTS, max_new_tokens=NEW_TOKENS, temperature=0.0,
                                               eos_token_ids=(), stop_at_eos=False)]


@pytest.fixture(scope="module")
def checkpoint(tiny, tmp_path_factory):
    """Returns a function (variant, form) -> the path of its tiny checkpoint in that form: "float32"
    as saved, "bf16" every tensor stored in bfloat16, "int4" / "ternary" compressed (RTN)."""
    root = tmp_path_factory.mktemp("family_forms")
    made = {}

    def get(variant: str, form: str):
        if form == "float32":
            return tiny(variant).path
        if (variant, form) not in made:
            path = root / f"{variant}_{form}"
            if form == "bf16":
                copy.deepcopy(tiny(variant).hf).to(torch.bfloat16).save_pretrained(path)
            else:
                compress(tiny(variant).path, path, FORMS[form], progress=False)
            made[variant, form] = path
        return made[variant, form]

    return get


def pipeline_model(path, variant: str, form: str, device: str):
    """Returns the float32 model CGOPipe runs: experts resident ("float32"), else paged with one
    resident a layer."""
    if form == "float32":
        return load_model(path, device=device, dtype="float32")
    return load_model(path, device=device, dtype="float32", experts=PagedLoader(resident=1))


def run_case(checkpoint, variant: str, form: str, micro_batch: int, monkeypatch) -> None:
    path = checkpoint(variant, form)
    expected = sequential(moekit.load_model(path, device="cpu", dtype="float32"))
    model = pipeline_model(path, variant, form, "cpu")
    calls = []
    for name in ("__call__", "store_and_attend"):  # the worker's call without and with the KV store in it
        kernel = getattr(NativeAttention, name)
        monkeypatch.setattr(NativeAttention, name, lambda self, *a, _k=kernel: (calls.append(1), _k(self, *a))[1])
    got = [t.tolist() for t in generate_pipelined(model, PROMPTS, max_new_tokens=NEW_TOKENS, micro_batch=micro_batch)]
    assert got == expected
    if native.library() is not None:  # every task's attention in the kernel: sinks and MLA included
        tasks = (NEW_TOKENS - 1) * model.config.num_layers * -(-len(PROMPTS) // micro_batch)
        assert len(calls) == tasks
    if form != "float32":
        assert model.expert_runtime.pages_loaded > 0


@pytest.mark.parametrize("variant", FAMILIES)
@pytest.mark.parametrize("form,micro_batch", [("float32", 4), ("bf16", 4), ("int4", 2)])
def test_pipeline_tokens_equal_the_sequential_engine(checkpoint, variant, form, micro_batch, monkeypatch):
    run_case(checkpoint, variant, form, micro_batch, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("variant", FAMILIES + MORE)
@pytest.mark.parametrize("form,micro_batch", [("float32", 1), ("bf16", 6), ("int4", 4), ("ternary", 3)])
def test_every_variant_and_form(checkpoint, variant, form, micro_batch, monkeypatch):
    run_case(checkpoint, variant, form, micro_batch, monkeypatch)


def test_gpt_oss_pages_carry_its_biases_and_clamp(checkpoint):
    """gpt-oss's paged experts are its stored form with the biases in the same packed rows (in the
    load's dtype, as every family's dense experts), the int4 codes wrapped with them; a layer
    never decodes whole into the grouped SwiGLU kernels' workspace."""
    from moekit.experts.clamped import BiasedCompressedForm, ClampedSwigluForm
    from moekit.pipeline.paged import plain_compressed

    bf16 = load_model(checkpoint("gpt_oss", "bf16"), device="cpu", dtype="float32", experts=PagedLoader(resident=1))
    form = bf16.expert_runtime.layout.form
    assert type(form) is ClampedSwigluForm and form.dtype == torch.float32 and not plain_compressed(form)
    assert set(form.specs_names()) >= {"gate_up_bias", "down_bias"}
    int4 = load_model(checkpoint("gpt_oss", "int4"), device="cpu", dtype="float32", experts=PagedLoader(resident=1))
    form = int4.expert_runtime.layout.form
    assert isinstance(form, BiasedCompressedForm) and form.name == "int4_clamped_swiglu" and not plain_compressed(form)


def test_the_planner_prices_gpt_oss_forms_as_they_run(checkpoint):
    """moekit plan / batch read gpt-oss's forms by their clamped names and price no whole-layer
    decode workspace for them: its layers never decode whole (the runtime allocates none)."""
    from moekit.pipeline.cli import read_model
    from moekit.pipeline.costs import decodes_layers, model_costs

    for form, name in (("bf16", "clamped_swiglu"), ("int4", "int4_clamped_swiglu"),
                       ("ternary", "ternary_code_clamped_swiglu")):
        cfg, expert_bytes, act_bytes, got = read_model(checkpoint("gpt_oss", form))
        assert got == name
        costs = model_costs(cfg, expert_bytes, act_bytes, form=got)
        assert costs.workspace_bytes == 0 and costs.decode_bytes == 0 and not decodes_layers(costs, 4096)
    cfg, expert_bytes, act_bytes, got = read_model(checkpoint("mixtral", "int4"))  # a plain form still does
    assert got == "int4" and decodes_layers(model_costs(cfg, expert_bytes, act_bytes, form=got), 4096)


def test_mla_needs_the_joint_host_cache(tiny):
    """An MLA model's decoder takes the joint latent pool (pipeline.latent.host_cache), not a plain one."""
    from moekit.kv_cache import PagedKVCache
    from moekit.pipeline.latent import LatentHostCache, host_cache

    model = load_model(tiny("deepseek_v2").path, device="cpu", dtype="float32")
    with pytest.raises(MoekitError, match="LatentHostCache"):
        PipelinedDecoder(model, PagedKVCache(model.config, 4, 16, "cpu", torch.float32), 2)
    cache = host_cache(model.config, 64, 16, torch.float32)
    assert isinstance(cache, LatentHostCache)
    r, dr = model.config.mla.kv_lora_rank, model.config.mla.qk_rope_head_dim
    assert cache.joint[0].shape == (5, 16, 1, r + dr) and cache.bytes == 3 * 5 * 16 * (r + dr) * 4
    # keys and values are views of the joint rows: a write lands in them
    cache.write(0, torch.ones(2, 1, r), torch.full((2, 1, dr), 2.0), torch.tensor([3, 17]))
    assert torch.equal(cache.joint[0][0, 3, 0], torch.tensor([1.0] * r + [2.0] * dr))
    assert torch.equal(cache.joint[0][1, 1, 0], cache.joint[0][0, 3, 0])
    plain = load_model(tiny("mixtral").path, device="cpu", dtype="float32")
    assert type(host_cache(plain.config, 64, 16, torch.float32)) is PagedKVCache


def test_latent_attention_equals_the_absorbed_form(tiny):
    """The pipeline's MLA attention -- absorbed query on the device, the kernel over the joint
    pool, W_uv after -- equals LatentAttention's own decode over the same latents."""
    from moekit.pipeline.host_attention import cpu_attention
    from moekit.pipeline.latent import absorbed_query, host_cache, latent_output

    model = load_model(tiny("deepseek_v3").path, device="cpu", dtype="float32")
    cfg, attn = model.config, model.layers[1].attn
    cache = host_cache(cfg, 128, 16, torch.float32)
    g = torch.Generator().manual_seed(0)
    for pool in cache.joint:
        pool.copy_(torch.randn(pool.shape, generator=g))
    batch = cache.prepare([(0, 30, 1), (1, 3, 1), (2, 0, 1)])
    q = torch.randn(1, cfg.num_heads, 3, cfg.mla.qk_head_dim, generator=g)
    with torch.inference_mode():
        want = attn._decode_rows(q[0].transpose(0, 1), cache.keys[1], cache.values[1], batch.block_tables,
                                 batch.context_lens)  # [3, H * dv]
        qa = absorbed_query(attn, q)[0].transpose(0, 1).contiguous()  # [3, H, r + dr]
        out = cpu_attention(qa, cache.joint[1], cache.joint[1], batch, None)
        got = latent_output(attn, out)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(native.library() is None, reason="no native library")
@pytest.mark.parametrize("heads", [16, 128])
def test_kernel_takes_deepseek_widths(heads):
    """DeepSeek's joint rows (512 + 64) under all of its heads (V2-Lite 16, V3 128) in one group."""
    from moekit.native import attention as na

    g = torch.Generator().manual_seed(1)
    pool = torch.randn(4, 16, 1, 576, generator=g).to(torch.bfloat16)
    tables = torch.tensor([[2, 0], [1, 3]], dtype=torch.int32)
    lens = torch.tensor([20, 7], dtype=torch.int32)
    q = torch.randn(2, heads, 576, generator=g).to(torch.bfloat16)
    out = na.decode_attention(q, pool, pool, tables, lens, scale=0.05, threads=2)
    want = na.reference(q, pool, pool, tables, lens, scale=0.05)
    assert (out.float() - want).abs().max() <= 1.6e-2 * want.abs().max()


@pytest.mark.parametrize("variant", ["gpt_oss", "deepseek_v2"])
def test_task_graphs_and_launch_probe_run_sinks_and_mla(tiny, variant):
    """Through TaskGraphs (graphs=True: on the CPU each part eagerly, through the graphs'
    bookkeeping; MLA's absorbed query and W_uv inside the parts) the tokens are unchanged, and the
    launch-cost probe (timeline.launch_task_seconds) issues a task of either kind both ways."""
    from moekit.pipeline.timeline import launch_task_seconds

    model = load_model(tiny(variant).path, device="cpu", dtype="float32")
    want = sequential(model)
    for lookahead in (2, None):
        got = generate_pipelined(model, PROMPTS, max_new_tokens=NEW_TOKENS, micro_batch=4, graphs=True,
                                 lookahead=lookahead)
        assert [t.tolist() for t in got] == want
    for graphs in (True, False):
        assert 0 < launch_task_seconds(model, micro_batch=3, reps=2, trials=1, graphs=graphs) < 5


def first_agreement(got: list[list[int]], want: list[list[int]]) -> float:
    """Returns the share of tokens that agree, each sequence counted up to its first difference."""
    same = 0
    for g, w in zip(got, want):
        same += next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), len(w))
    return same / sum(len(w) for w in want)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", FAMILIES)
@pytest.mark.parametrize("form", ["float32", "bf16"])
def test_cuda_pipeline_agrees_for_every_family(checkpoint, variant, form):
    """On a GPU (float32 compute, q/k/v and outputs over their streams, task graphs where they
    apply; bf16: experts paged): the pipeline's greedy tokens against the sequential engine's on the device; the CPU
    kernel sums in another order, so most tokens, not all, must agree (as tests/pipeline/test_cuda)."""
    path = checkpoint(variant, form)
    want = sequential(moekit.load_model(path, device="cuda", dtype="float32"))
    model = pipeline_model(path, variant, form, "cuda")
    got = [t.tolist() for t in generate_pipelined(model, PROMPTS, max_new_tokens=NEW_TOKENS, micro_batch=4)]
    share = first_agreement(got, want)
    graphs = getattr(model, "_pipeline_graphs", None)
    print(f"CUDA pipeline {variant} {form}: {100 * share:.1f}% of greedy tokens agree; graphs "
          f"{graphs.report() if graphs is not None else 'none'}")
    assert share >= 0.9, f"{got} vs {want}"
    torch.cuda.synchronize()


def test_first_agreement_counts_up_to_the_first_difference():
    assert first_agreement([[1, 2, 3], [4, 5]], [[1, 2, 3], [4, 5]]) == 1.0
    assert first_agreement([[1, 9, 3], [4, 5]], [[1, 2, 3], [4, 5]]) == 3 / 5
