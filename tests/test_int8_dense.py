"""--quantize-dense int8 (moekit.linear.Int8Linear): each projection's int8 rows and their rounding
bound, the module's forward against its dequantized weights (prefill slices, the decode matvec on a
GPU), a model loaded with them (which modules, logits near the float model, greedy tokens, offloaded
too), the budget planner's bytes, and the refusals (the CPU, --parallel, save). The decode matvec's
int8 path itself is checked under the interpreter in test_linear.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import run_cli


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_quantize_int8_rows_rounds_within_half_a_step():
    from moekit.linear import quantize_int8_rows

    w = torch.randn(7, 33, generator=torch.Generator().manual_seed(0))
    w[3] = 0  # a row of zeros keeps scale 1, codes 0
    codes, scale = quantize_int8_rows(w)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float32 and codes.shape == (7, 33)
    assert codes.abs().max() <= 127 and scale[3] == 1 and (codes[3] == 0).all()
    err = (w - codes.float() * scale[:, None]).abs()
    assert (err <= scale[:, None] / 2 + 1e-7).all()
    assert (codes.abs().amax(dim=1)[[0, 1, 2, 4, 5, 6]] == 127).all()  # each row's largest weight maps to 127


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_equals_its_dequantized_weights_in_slices(monkeypatch, dtype, bias):
    """Prefill-sized calls (and every CPU call) dequantize a slice of rows at a time: the result equals
    F.linear over the whole dequantized weight (up to the GEMM's summation order)."""
    from moekit import linear
    from moekit.linear import Int8Linear

    g = torch.Generator().manual_seed(1)
    base = torch.nn.Linear(48, 37, bias=bias).to(dtype)
    with torch.no_grad():
        base.weight.copy_(torch.randn(37, 48, generator=g))
    q = Int8Linear.from_linear(base)
    x = torch.randn(2, 5, 48, generator=g).to(dtype)
    whole = F.linear(x, q.dequantized(dtype), q.bias)
    monkeypatch.setattr(linear, "DEQUANT_ELEMENTS", 48 * 5)  # 5 rows a slice: 8 slices, the last of 2
    y = q(x)
    assert y.shape == (2, 5, 37) and y.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1.6e-2  # GEMMs of other widths may sum in another order
    torch.testing.assert_close(y, whole, rtol=tol, atol=tol)
    assert _relative(y, base(x)) < 0.02  # int8 rows against the weights they stand for


def test_int8_linear_fill_rows_checks_its_shape():
    from moekit.errors import MoekitError
    from moekit.linear import Int8Linear

    q = Int8Linear(16, 8, bias=False, dtype=torch.float32)
    q.fill_rows(4, torch.randn(4, 16))
    for offset, rows in ((5, torch.randn(4, 16)), (0, torch.randn(2, 15))):
        with pytest.raises(MoekitError, match="do not fit"):
            q.fill_rows(offset, rows)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shape", [(37, 1000), (5120, 2048), (64, 2048)])
def test_int8_linear_decode_matvec_on_cuda(shape):
    """1..4 rows on a GPU run the decode matvec on the int8 codes: equal to the dequantized weights'
    product within bf16 rounding, also inside a CUDA graph."""
    from moekit.linear import Int8Linear

    n, k = shape
    base = torch.nn.Linear(k, n, bias=True).to("cuda", torch.bfloat16)
    q = Int8Linear.from_linear(base)
    for rows in (1, 3, 4, 8):
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        exact = F.linear(x.float(), q.dequantized(torch.float32), q.bias.float())
        assert _relative(q(x), exact) < 4e-3
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    q(x)  # built before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = q(x)
    x.copy_(torch.randn(1, k, device="cuda", dtype=torch.bfloat16))
    graph.replay()
    exact = F.linear(x.float(), q.dequantized(torch.float32), q.bias.float())
    assert _relative(y, exact) < 4e-3


def _int8_names(model) -> set[str]:
    from moekit.linear import Int8Linear

    return {name for name, m in model.named_modules() if isinstance(m, Int8Linear)}


@pytest.mark.parametrize("variant,expected,kept", [
    # shared expert MLPs and layer 1's dense MLP, qkv bias
    ("qwen2_moe", {"layers.0.attn.qkv", "layers.0.attn.o_proj", "layers.0.mlp.shared.gate_up", "layers.1.mlp.gate_up",
                   "layers.1.mlp.down", "lm_head"}, {"layers.0.mlp.router", "layers.0.mlp.shared_gate"}),
    ("olmoe_clip", {"layers.1.attn.qkv", "layers.1.attn.o_proj", "lm_head"}, {"layers.1.mlp.router"}),
    ("phimoe", {"layers.0.attn.qkv", "lm_head"}, {"layers.0.mlp.router"}),  # LayerNorm, LM-head bias
    ("gpt_oss", {"layers.0.attn.qkv", "layers.1.attn.o_proj", "lm_head"}, {"layers.0.mlp.router"}),  # sinks, biases
    ("mixtral_tied", {"layers.0.attn.qkv"}, {"lm_head"}),  # a tied head stays (it is the embedding table)
    # MLA: q, kv_a and o in int8; kv_b (read as a weight by the absorbed decode) and the routers kept
    ("deepseek_v2", {"layers.0.mlp.gate_up", "layers.1.mlp.shared.down", "layers.0.attn.q_proj",
                     "layers.1.attn.kv_a_proj", "layers.2.attn.o_proj"}, {"layers.0.attn.kv_b_proj", "layers.1.mlp.router"}),
    ("deepseek_v2_group", {"layers.0.attn.q_a_proj", "layers.0.attn.q_b_proj"}, {"layers.0.attn.kv_b_proj"}),
])
def test_load_int8_dense_quantizes_the_projections(tiny, variant, expected, kept):
    """The listed projections become Int8Linear, routers and what int8_dense_modules leaves stay; the
    float32 logits equal those of the float model given the int8 rows' values (so every row was quantized
    from its own checkpoint tensor: a q/k/v or gate/up offset mixed up would not), and the non-expert
    bytes are what the planner counts."""
    from moekit.load import load_model
    from moekit.model import MoEBlock
    from moekit.offload.planner import resident_bytes

    ckpt = tiny(variant)
    ref = load_model(ckpt.path)
    model = load_model(ckpt.path, dense="int8")
    names = _int8_names(model)
    assert expected <= names and not (kept & names), (sorted(names), kept & names)
    modules = dict(ref.named_modules())
    with torch.no_grad():
        for name in names:
            q = model.get_submodule(name)
            assert _relative(q.dequantized(torch.float32), modules[name].weight) < 0.01
            modules[name].weight.copy_(q.dequantized(torch.float32))
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids), rtol=1e-4, atol=1e-4)
    experts = {id(p) for layer in model.layers if isinstance(layer.mlp, MoEBlock)
               for p in layer.mlp.experts.parameters()}
    held = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in experts)
    held += sum(b.numel() * b.element_size() for layer in model.layers if isinstance(layer.mlp, MoEBlock)
                for b in layer.mlp.experts.buffers())  # resident experts keep their stacks as buffers
    assert resident_bytes(model.config, torch.float32, dense="int8") < resident_bytes(model.config, torch.float32)
    non_expert = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." not in n)
    assert non_expert == resident_bytes(model.config, torch.float32, dense="int8")
    assert held >= non_expert


def test_int8_dense_greedy_tokens_resident_and_offloaded(tiny):
    """Offloaded experts (CPU misses) and resident ones give the same greedy tokens with int8 projections."""
    from moekit.load import load_model
    from moekit.offload import OffloadConfig, load_offloaded

    ckpt = tiny("qwen3_moe")
    resident = load_model(ckpt.path, dense="int8")
    offloaded = load_offloaded(ckpt.path, offload=OffloadConfig(dense="int8", device_memory=10**7))
    assert _int8_names(offloaded) == _int8_names(resident)
    ids = torch.tensor([[5, 17, 3, 9, 44, 2]])
    a = resident.generate(ids, max_new_tokens=8, temperature=0, eos_token_ids=())
    b = offloaded.generate(ids, max_new_tokens=8, temperature=0, eos_token_ids=())
    assert torch.equal(a, b)


def test_planner_holds_more_experts_with_int8_dense(tiny):
    from moekit.load import read_config
    from moekit.offload import OffloadConfig
    from moekit.offload.planner import plan_budget

    _, _, cfg = read_config(tiny("olmoe").path)
    expert = 3 * cfg.hidden_size * cfg.expert_ffn * 2
    roomy = plan_budget(cfg, torch.bfloat16, expert, OffloadConfig(device_memory=10**8), torch.device("cpu"))
    budget = roomy.planned_bytes - roomy.cache_bytes + 3 * expert  # bf16 projections: room for 3 experts
    plans = {dense: plan_budget(cfg, torch.bfloat16, expert, OffloadConfig(device_memory=budget, dense=dense),
                                torch.device("cpu")) for dense in ("bf16", "int8")}
    saved = plans["bf16"].resident_bytes - plans["int8"].resident_bytes
    assert plans["bf16"].cache_slots == 3 and saved > 0
    assert plans["int8"].cache_slots == 3 + saved // expert


def test_int8_dense_refusals(tiny, tmp_path, capsys):
    from moekit.errors import MoekitError
    from moekit.load import load_model
    from moekit.offload import OffloadConfig
    from moekit.save import save_model

    with pytest.raises(MoekitError, match="--quantize-dense"):
        OffloadConfig(dense="int4")
    with pytest.raises(MoekitError, match="--quantize-dense"):
        load_model(tiny("olmoe").path, dense="fp8")
    model = load_model(tiny("olmoe").path, dense="int8")
    with pytest.raises(MoekitError, match="quantized to int8 at load"):
        save_model(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    code, _, err = run_cli(capsys, "generate", "hi", "--device", "cpu", "--quantize-dense", "int8",
                           "--cpu-quantize-dense", "bf16")
    assert code == 2 and "disagree" in err
    code, _, err = run_cli(capsys, "serve", str(tiny("olmoe").path), "--device", "cpu", "--quantize-dense", "int8")
    assert code == 2 and "--quantize-dense int8 is for a GPU" in err


@pytest.mark.parametrize("form", ["int8", "int4"])
def test_cpu_dense_forms_refused_where_the_native_step_does_not_run(tiny, capsys, form):
    """--cpu-quantize-dense int8 / int4 run only in the native CPU decode step: a model it does not take
    (qwen2_moe's shared expert) and --parallel ranks are refused before loading, not silently run in bf16."""
    code, _, err = run_cli(capsys, "generate", "hi", "--model", str(tiny("qwen2_moe").path), "--device", "cpu",
                           "--cpu-quantize-dense", form, "--max-new-tokens", "2")
    assert code == 2 and "does not take this model" in err and form in err
    code, _, err = run_cli(capsys, "generate", "hi", "--device", "cpu", "--cpu-quantize-dense", form,
                           "--parallel", "ep=2")
    assert code == 2 and "--parallel" in err


def test_quantize_dense_on_the_cpu_is_the_cpu_steps_int8():
    """generate --device cpu --quantize-dense int8 runs as --cpu-quantize-dense int8 on a bf16 model (the only
    one the native decode step takes); where that step would not run (--offload, --dtype float32) both flags
    are refused instead of doing nothing; on a GPU --compile and --parallel are refused."""
    import argparse

    from moekit.cli_common import check_cpu_quantize_dense, check_quantize_dense
    from moekit.errors import MoekitError

    def args(**kw):
        return argparse.Namespace(**{**dict(quantize_dense="int8", cpu_quantize_dense=None, parallel=None,
                                            dtype=None, offload=False, compile=False), **kw})

    a = args()
    check_quantize_dense(a, "cpu", cpu_step=True)
    assert (a.cpu_quantize_dense, a.quantize_dense, a.dtype) == ("int8", None, "bfloat16")
    for bad, match in ((dict(offload=True), "offloaded"), (dict(dtype="float32"), "bfloat16 model")):
        with pytest.raises(MoekitError, match=match):
            check_quantize_dense(args(**bad), "cpu", cpu_step=True)
        for form in ("int8", "int4"):  # the older flag alone, the same rule
            with pytest.raises(MoekitError, match=match):
                check_cpu_quantize_dense(args(quantize_dense=None, cpu_quantize_dense=form, **bad), "cpu")
    check_cpu_quantize_dense(a := args(quantize_dense=None, cpu_quantize_dense="int4"), "cpu")
    assert a.dtype == "bfloat16"
    with pytest.raises(MoekitError, match="disagree"):  # --quantize-dense int8 would have overridden int4
        check_quantize_dense(args(cpu_quantize_dense="int4"), "cpu", cpu_step=True)
    for bad, match in ((dict(parallel="ep=2"), "--parallel"), (dict(compile=True), "--compile")):
        with pytest.raises(MoekitError, match=match):
            check_quantize_dense(args(**bad), "cuda", cpu_step=True)
    check_quantize_dense(a := args(), "cuda", cpu_step=True)
    assert a.quantize_dense == "int8" and a.dtype is None


def test_parallel_loaders_refuse_int8_projections(tiny):
    from moekit.errors import MoekitError
    from moekit.offload import OffloadConfig
    from moekit.parallel.offload import load_offloaded_parallel
    from moekit.parallel.tensor import load_parallel

    with pytest.raises(MoekitError, match="not available with --parallel"):
        load_parallel(tiny("olmoe").path, groups=None, dense="int8")
    with pytest.raises(MoekitError, match="expert parallelism"):
        load_offloaded_parallel(tiny("olmoe").path, comm=None, offload=OffloadConfig(dense="int8"))


def test_int8_linear_keeps_float32_scales_and_autograd(monkeypatch):
    """After model.half() the float32 scales may have been cast: the module still computes with float32 ones;
    a call that autograd must see takes the differentiable path (dequantized slices)."""
    from moekit.linear import Int8Linear

    q = Int8Linear.from_linear(torch.nn.Linear(32, 12))
    x = torch.randn(2, 32, requires_grad=True)
    q(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    q.half()
    assert q.qscale.dtype == torch.float16 and q.qweight.dtype == torch.int8
    y = q(torch.randn(2, 32).half())
    assert y.dtype == torch.float16 and torch.isfinite(y).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("variant", ["qwen3_moe", "qwen2_moe", "phimoe", "deepseek_v2", "gpt_oss"])
def test_int8_dense_generates_on_cuda_like_its_dequantized_model(tiny, variant):
    """bf16 on a GPU, CUDA-graph decode steps (the int8 decode matvec captured) against a bf16 model
    given the int8 rows' values (cuBLAS and the dequantized slices): the same greedy tokens."""
    from moekit.load import load_model

    ckpt = tiny(variant)
    model = load_model(ckpt.path, device="cuda", dtype=torch.bfloat16, dense="int8")
    ref = load_model(ckpt.path, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        for name in _int8_names(model):
            ref.get_submodule(name).weight.copy_(model.get_submodule(name).dequantized(torch.bfloat16))
    ids = torch.tensor([[5, 17, 3, 9, 44, 2]], device="cuda")
    a = model.generate(ids, max_new_tokens=12, temperature=0, eos_token_ids=())
    b = ref.generate(ids, max_new_tokens=12, temperature=0, eos_token_ids=())
    assert torch.equal(a, b)


def test_a_refused_budget_names_int8_dense_where_it_would_fit(tiny):
    """On a GPU, a budget too small with bf16 projections but enough with int8 ones says so (and what it needs)."""
    import dataclasses

    from moekit.errors import MoekitError
    from moekit.load import read_config
    from moekit.offload import OffloadConfig
    from moekit.offload.planner import plan_budget

    _, _, cfg = read_config(tiny("olmoe").path)
    cfg = dataclasses.replace(cfg, vocab_size=2_000_000)  # a 128 MB bf16 LM head: int8 saves ~56 MB
    expert = 3 * cfg.hidden_size * cfg.expert_ffn * 2
    needs = {}
    for dense in ("bf16", "int8"):
        with pytest.raises(MoekitError) as refusal:
            plan_budget(cfg, torch.bfloat16, expert, OffloadConfig(device_memory=10**6, dense=dense), torch.device("cuda"))
        needs[dense] = str(refusal.value)
    assert "--quantize-dense int8" in needs["bf16"] and "--quantize-dense" not in needs["int8"]
    int8_need = needs["int8"].split("give --device-memory ")[1].split(" ")[0]
    assert f"--quantize-dense int8 (int8 attention projections and LM head: {int8_need})" in needs["bf16"]
