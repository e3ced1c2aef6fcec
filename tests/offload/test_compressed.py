"""Compressed experts offloaded in their stored form (int-4 and the sub-1-bit ternary code): the
same greedy tokens as the compressed model with every expert resident, down to a 2-expert cache,
for both stores and the none/speculative predictors; the planner counts compressed bytes."""

from __future__ import annotations

import json

import pytest
import torch

import moekit
from moekit import native
from moekit.cli import main
from moekit.experts.triton_ops import triton_usable
from moekit.load import read_config
from moekit.offload import OffloadConfig, load_offloaded
from moekit.experts.forms import DenseForm
from moekit.offload.layout import PackedLayout, layout_for
from moekit.offload.planner import activation_bytes, kv_cache_bytes, resident_bytes
from moekit.quant.compress import compress
from moekit.quant.config import QuantConfig
from moekit.quant.formats import CompressedForm, form_from_checkpoint

from conftest import token_ids

CONTEXT = 40
FORMS = {"ternary": QuantConfig(bits="ternary", method="rtn"), "4": QuantConfig(bits="4", group_size=16, method="rtn")}
# the kernel tests run CPU models with MOEKIT_QUANT_KERNELS=1: only the Triton interpreter runs them
needs_cpu_kernels = pytest.mark.skipif(
    not triton_usable(torch.empty(0)),
    reason="runs the quant kernels on CPU tensors: needs TRITON_INTERPRET=1 (CUDA: test_quant_kernels)")


@pytest.fixture(scope="module")
def compressed(tiny, tmp_path_factory):
    """Returns {bits: (path, resident compressed model)} of the tiny mixtral, round to nearest."""
    root = tmp_path_factory.mktemp("offload_compressed")
    out = {}
    for bits, quant in FORMS.items():
        path = root / f"mixtral-{bits}"
        compress(tiny("mixtral").path, path, quant, progress=False)
        out[bits] = (path, moekit.load_model(path))
    return out


def form_of(path) -> PackedLayout:
    """Returns the offload layout of a compressed checkpoint's experts."""
    ckpt, family, cfg = read_config(path)
    form = form_from_checkpoint(QuantConfig.from_dict(ckpt.config["quantization_config"]), cfg, ckpt, family, "cpu")
    return layout_for(form, [i for i, moe in enumerate(cfg.moe_layers) if moe])


def budget_for(path, slots: int, store: str = "disk") -> int:
    """Returns the CPU budget that leaves exactly `slots` compressed experts of cache."""
    cfg = read_config(path)[2]
    form = form_of(path)
    dtype = torch.float32
    fixed = (resident_bytes(cfg, dtype) + kv_cache_bytes(cfg, dtype, 1, CONTEXT)
             + activation_bytes(cfg, dtype, CONTEXT, 1) + form.shared_bytes()
             + (form.expert_bytes() if store == "disk" else 0))
    return fixed + slots * form.expert_bytes()


def greedy(model, ids, n=10):
    return model.generate(ids, max_new_tokens=n, temperature=0, eos_token_ids=())


@pytest.mark.parametrize("bits", ["ternary", "4"])
@pytest.mark.parametrize("predictor", ["none", "speculative"])
@pytest.mark.parametrize("store", ["host", "disk"])
def test_greedy_equals_resident_compressed_with_two_expert_cache(compressed, bits, predictor, store):
    path, resident = compressed[bits]
    config = OffloadConfig(device_memory=budget_for(path, 2, store), context_tokens=CONTEXT, predictor=predictor,
                           store=store)
    model = load_offloaded(path, offload=config)
    runtime = model.offload
    assert runtime.cache.num_slots == 2 and runtime.store.kind == store
    assert isinstance(runtime.layout, PackedLayout) and isinstance(runtime.form, CompressedForm)
    assert runtime.cache.slab["packed"].dtype == torch.uint8
    for prompt_len in (3, 12):  # 6 and 24 routed slots: every layer runs in waves at prefill
        ids = token_ids(1, prompt_len, seed=prompt_len)
        assert torch.equal(greedy(model, ids), greedy(resident, ids)), (bits, predictor, store, prompt_len)
    report = runtime.report()
    assert report["demand_fetches"] > 0 and report["form"] == runtime.form.name
    # every fetch moved one compressed expert of its layer, nothing decoded
    fetches = report["demand_fetches"] + report["prefetches"]
    layer_bytes = set(runtime.layout.describe()["layer_bytes"].values())
    assert min(layer_bytes) * fetches <= report["bytes_moved"] <= max(layer_bytes) * fetches


@pytest.mark.parametrize("bits", ["ternary", "4"])
def test_planner_counts_compressed_bytes(compressed, bits):
    path, resident = compressed[bits]
    cfg = read_config(path)[2]
    form = form_of(path)
    dense = DenseForm(cfg.hidden_size, cfg.expert_ffn, torch.float32).expert_bytes(0)
    stored = sum(t.numel() * t.element_size() for layer in resident.layers
                 for name, t in layer.mlp.experts.stored().items() if name != "code_table") // (2 * cfg.num_experts)
    info = form.describe()
    assert form.expert_bytes() == info["slot_bytes"] == max(info["layer_bytes"].values())
    tensors = len(next(iter(form.bytes_of.values())).tensors)
    assert stored <= form.expert_bytes() < stored + 16 * tensors  # the stored bytes, aligned per tensor
    assert form.expert_bytes() * 4 < dense  # the same budget holds many more experts
    if bits == "ternary":
        assert form.shared_bytes() == 2 * resident.layers[0].mlp.experts.code_table.numel() * 4
    else:
        assert form.shared_bytes() == 0
    budget = budget_for(path, 5)
    model = load_offloaded(path, offload=OffloadConfig(device_memory=budget, context_tokens=CONTEXT, store="disk"))
    plan = model.offload.plan
    assert plan.cache_slots == 5 and plan.expert_bytes == form.expert_bytes()
    assert plan.shared_bytes == form.shared_bytes() and plan.planned_bytes <= budget


@needs_cpu_kernels
# slow (ternary ~70 s interpreted, int4 ~16 s); the fast run reads the ternary slab through the fused path below
@pytest.mark.parametrize("bits", [pytest.param("ternary", marks=pytest.mark.slow), pytest.param("4", marks=pytest.mark.slow)])
def test_kernel_path_matches_resident_kernel_path(compressed, bits, monkeypatch):
    """The Triton kernels (interpreted here) read the experts from the cache slab's packed bytes;
    decode steps run every routed expert of a layer in one launch per matrix (the form's fused path)."""
    runs = []
    fused = CompressedForm.fused
    monkeypatch.setattr(CompressedForm, "fused", lambda *a, **k: runs.append(out := fused(*a, **k)) or out)
    path, resident = compressed[bits]
    ids = token_ids(1, 2, seed=5)
    reference = greedy(resident, ids, n=2)  # grouped PyTorch path
    monkeypatch.setenv("MOEKIT_QUANT_KERNELS", "1")
    model = load_offloaded(path, offload=OffloadConfig(device_memory=budget_for(path, 2), context_tokens=CONTEXT))
    runs.clear()
    kernels = greedy(resident, ids, n=2)  # prefill and decode: 4 and 2 slots, per-slot kernels
    assert torch.equal(kernels, reference), bits
    assert torch.equal(greedy(model, ids, n=2), kernels), bits
    assert any(r is not None for r in runs), "no layer ran the per-slot kernels"


@needs_cpu_kernels
@pytest.mark.parametrize("bits", ["ternary", pytest.param("4", marks=pytest.mark.slow)])  # ternary: its layouts differ per layer
# the second layer's routing (2 tokens, top-3 under the interpreter: ~20 s) runs in CI's slow set
@pytest.mark.parametrize("routed", [(0,), pytest.param((0, 1), marks=pytest.mark.slow)], ids=["layer0", "both"])
def test_fused_path_reads_any_slot_in_its_layer_layout(compressed, bits, routed, monkeypatch):
    """The form's fused path on a slab whose slots hold experts of both layers in shuffled order (rows wider
    than a layer's expert, as when another layer's experts are larger) equals the resident
    source's per-slot path, for several A and repeated experts; past SLOT_KERNEL_MAX_SLOTS it
    declines, and without the Triton kernels the native CPU kernels give the same sums (or it
    declines where they cannot be built)."""
    path, resident = compressed[bits]
    form = form_of(path)
    cfg = read_config(path)[2]
    layers = [i for i, moe in enumerate(cfg.moe_layers) if moe]
    keys = [(layer, e) for layer in layers for e in range(cfg.num_experts)]
    order = torch.randperm(len(keys), generator=torch.Generator().manual_seed(0)).tolist()
    slab = {"packed": torch.zeros(len(keys), form.slot_bytes + 48, dtype=torch.uint8)}
    slot_of = {}
    for slot, i in enumerate(order):
        layer, e = keys[i]
        rows = form.pack(layer, resident.layers[layer].mlp.experts.stored())["packed"]  # [E, layer_bytes]
        form.copy({"packed": slab["packed"][slot]}, {"packed": rows[e]}, layer=layer)
        slot_of[keys[i]] = slot
    g = torch.Generator().manual_seed(1)
    monkeypatch.setenv("MOEKIT_QUANT_KERNELS", "1")
    # one routing a layer (each call and its reference run the interpreted kernels: ~10 s a pair for ternary)
    assert len(layers) == 2
    for which, (layer, (n, a)) in enumerate(zip(layers, ((1, 2), (2, 3)))):
        if which not in routed:
            continue
        experts = resident.layers[layer].mlp.experts
        x = torch.randn(n, cfg.hidden_size, generator=g)
        ids = torch.randint(0, cfg.num_experts, (n, a), generator=g)
        w = torch.rand(n, a, generator=g)
        slot_ids = torch.tensor([[slot_of[(layer, e)] for e in row] for row in ids.tolist()])
        out = form.form.fused(x, slot_ids, w, form.view(slab, layer))
        torch.testing.assert_close(out, experts(x, ids, w), rtol=1e-5, atol=1e-5)
    # past the per-slot kernels (18 slots) the Triton path declines (grouped PyTorch runs it);
    # without the Triton kernels, CPU tensors go to the native CPU kernels (moekit.native.compressed)
    # where they build: the same sums, read from the same slots
    layer = layers[0]
    experts = resident.layers[layer].mlp.experts
    x = torch.randn(9, cfg.hidden_size, generator=g)
    ids = torch.randint(0, cfg.num_experts, (9, 2), generator=g)
    slot_ids = torch.tensor([[slot_of[(layer, e)] for e in row] for row in ids.tolist()])
    w = torch.rand(9, 2, generator=g)
    assert form.form.fused(x, slot_ids, w, form.view(slab, layer)) is None
    monkeypatch.delenv("MOEKIT_QUANT_KERNELS")
    out = form.form.fused(x, slot_ids, w, form.view(slab, layer))
    if native.library() is None:
        assert out is None
    else:
        torch.testing.assert_close(out, experts(x, ids, w), rtol=1e-4, atol=1e-4)


def test_generate_cli_offloads_a_compressed_checkpoint(tmp_path, capsys, monkeypatch):
    path = tmp_path / "tiny-moe-ternary"
    assert main(["compress", "--method", "rtn", "--bits", "ternary", "--out", str(path)]) == 0
    capsys.readouterr()

    def generate(*extra):
        assert main(["generate", "def f(x):", "--device", "cpu", "--model", str(path), "--max-new-tokens", "24", "--json", *extra]) == 0
        return json.loads(capsys.readouterr()[0])

    # like with like: both eager bf16 (the checkpoint's dtype, both ways); the resident run's native
    # step sums in another order and may part from them after a few tokens
    assert generate()["dtype"] == "bfloat16"  # the default, through the native step
    monkeypatch.setenv("MOEKIT_CPU_DECODE", "0")
    resident = generate("--dtype", "bfloat16")
    offloaded = generate("--offload", "--device-memory", "7.5MB", "--predictor", "speculative")
    assert resident["dtype"] == offloaded["dtype"] == "bfloat16"
    assert len(resident["token_ids"]) > 16 and offloaded["token_ids"] == resident["token_ids"]
    stats = offloaded["offload"]
    assert stats["form"] == "ternary_code" and stats["peak_device_bytes"] <= 7.5e6
    assert 0 < stats["cache_slots"] < stats["plan"]["total_experts"] and stats["plan"]["shared_bytes"] > 0
