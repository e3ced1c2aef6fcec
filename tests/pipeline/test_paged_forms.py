"""Paged experts in compressed stored forms (moekit.pipeline.paged): int4 and ternary-code
checkpoints (RTN on the tiny mixtral) page their stored bytes -- packed codes, scales, code
tables -- never a decoded copy, and CGOPipe's tokens equal the sequential engine's on the same
compressed checkpoint, with mixed prompt lengths, no expert resident and some; the HRM counts
each form's bytes; forms the pages cannot carry are refused in one line."""

from __future__ import annotations

import pytest
import torch

import moekit
from moekit.errors import MoekitError
from moekit.generate import generate_ragged
from moekit.load import load_model
from moekit.pipeline.cgopipe import generate_pipelined
from moekit.pipeline.paged import PagedLoader, PagedRuntime, copy_range
from moekit.quant.compress import compress
from moekit.quant.config import QuantConfig

# mixed lengths (1 to 20 tokens), ids below the tiny models' vocabulary of 100
PROMPTS = [[5, 17, 30, 42, 9, 11, 7], [99, 3], [77] * 20, [8], [20, 1, 95, 31], [4, 4, 6, 60, 61, 62, 63, 64, 65]]
FORMS = {"int4": QuantConfig(bits="4", group_size=16, method="rtn"), "ternary": QuantConfig(bits="ternary", method="rtn")}


@pytest.fixture(scope="module")
def compressed(tiny, tmp_path_factory):
    """Returns {form: compressed checkpoint of the tiny mixtral (RTN, no calibration)}."""
    root = tmp_path_factory.mktemp("paged_forms")
    out = {}
    for name, quant in FORMS.items():
        out[name] = root / name
        compress(tiny("mixtral").path, out[name], quant, progress=False)
    return out


@pytest.fixture(scope="module")
def expected(compressed):
    """Returns {form: the sequential engine's greedy tokens on its compressed checkpoint}."""
    out = {}
    for name, path in compressed.items():
        model = moekit.load_model(path, device="cpu", dtype="float32")  # its CompressedExperts, resident
        out[name] = [t.tolist() for t in model.generate(PROMPTS, max_new_tokens=6, temperature=0.0,
                                                        eos_token_ids=(), stop_at_eos=False)]
    return out


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("keep", [0, 2])
def test_pipelined_compressed_equals_the_sequential_engine(compressed, expected, form, keep):
    model = load_model(compressed[form], device="cpu", dtype="float32", experts=PagedLoader(resident=keep))
    runtime = model.expert_runtime
    assert isinstance(runtime, PagedRuntime)
    # the pages carry the stored form: packed bytes, none of the dense matrices
    assert set(runtime.slab) == {"packed"} and runtime.slab["packed"].dtype == torch.uint8
    assert all(set(store) == {"packed"} for store in runtime.stores.values())
    dense_expert = 3 * model.config.hidden_size * model.config.expert_ffn * 4
    assert all(runtime.layout.layer_bytes(m) < dense_expert / 4 for m in runtime.layers)
    got = generate_pipelined(model, PROMPTS, max_new_tokens=6, micro_batch=2)
    assert [t.tolist() for t in got] == expected[form]
    if keep < 4:
        assert runtime.pages_loaded > 0
    report = runtime.report()
    assert report["form"] == ("int4" if form == "int4" else "ternary_code")
    assert report["bits_per_weight"] < (8 if form == "int4" else 4)


@pytest.mark.parametrize("form", list(FORMS))
def test_paged_compressed_under_generate_and_its_pages(compressed, expected, form):
    """Under the sequential engine (layers loaded whole at their call), and with the pages cut as
    CGOPipe cuts them: every (layer, pages) split gives the resident form's outputs."""
    model = load_model(compressed[form], device="cpu", dtype="float32", experts=PagedLoader(resident=1))
    got = generate_ragged(model, PROMPTS, max_new_tokens=6, temperature=0.0, stop_at_eos=False)
    assert [t.tolist() for t in got] == expected[form]
    runtime = model.expert_runtime
    resident = moekit.load_model(compressed[form], device="cpu", dtype="float32")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, model.config.hidden_size, generator=g)
    ids = torch.tensor([[0, 3], [2, 1], [3, 2], [1, 0], [2, 3]])
    w = torch.rand(5, 2, generator=g)
    for pages in (1, 2, 3, 7):
        for layer in runtime.layers:
            for j in range(pages):
                runtime.load_page(runtime.next_layer(layer), j, pages)
            with torch.no_grad():
                want = resident.layers[runtime.next_layer(layer)].mlp.experts(x, ids, w)
                torch.testing.assert_close(runtime.run(runtime.next_layer(layer), x, ids, w), want)


def test_copy_range_into_wider_slots():
    """A byte range of a narrow layer's experts lands in the first bytes of wider slots."""
    src = torch.arange(4 * 10, dtype=torch.uint8).view(4, 10)
    dst = torch.zeros(4, 16, dtype=torch.uint8)
    for a, b in ((0, 7), (7, 23), (23, 40)):
        copy_range(dst, src, a, b, non_blocking=False)
    assert torch.equal(dst[:, :10], src) and not dst[:, 10:].any()
    flat = torch.zeros(4, 10, dtype=torch.uint8)
    copy_range(flat, src, 3, 37, non_blocking=False)
    assert torch.equal(flat.view(-1)[3:37], src.view(-1)[3:37]) and not flat.view(-1)[:3].any()


def test_ternary_layers_of_different_widths_page_equal_byte_ranges(compressed, monkeypatch):
    """A code whose layers differ in chunk capacity (slots fit the widest): each page of a layer
    carries an equal share of its streamed bytes (DMA-page aligned, the last takes the rest), cut
    at expert boundaries into the slots' first bytes, and the layer computes as its resident self."""
    from moekit.offload.layout import PackedLayout
    from moekit.pipeline import paged
    from moekit.quant.formats import form_from_tensors

    resident = moekit.load_model(compressed["ternary"], device="cpu", dtype="float32")
    layers = {i: dict(layer.mlp.experts.stored()) for i, layer in enumerate(resident.layers)}
    extra = 300  # unused chunks appended to layer 1's capacity: its experts get wider than layer 0's
    for kind in ("gate_up", "down"):
        for name in ("codewords", "starts"):
            t = layers[1][f"{kind}.{name}"]
            pad = torch.zeros((t.shape[0], extra, *t.shape[2:]), dtype=t.dtype)
            layers[1][f"{kind}.{name}"] = torch.cat([t, pad], dim=1)
    form = form_from_tensors(QuantConfig(bits="ternary", method="rtn"), resident.config, layers, "cpu")
    layout = PackedLayout(form, [0, 1])
    assert layout.layer_bytes(0) < layout.layer_bytes(1) == layout.expert_bytes()
    stores = {m: layout.pack(m, layers[m]) for m in (0, 1)}
    runtime = PagedRuntime(layout, stores, resident=1, device="cpu")
    assert all(runtime.flat_pages(m) for m in (0, 1))
    copied: list[int] = []
    real = paged.range_views

    def counting(dst, src, a, b):  # the ranges each page's copies cover (planned once per page)
        copied.append(b - a)
        return real(dst, src, a, b)

    monkeypatch.setattr(paged, "range_views", counting)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, resident.config.hidden_size, generator=g)
    ids = torch.tensor([[0, 3], [2, 1], [3, 2], [1, 0], [2, 3]])
    w = torch.rand(5, 2, generator=g)
    for layer in (1, 0):
        sizes = []  # bytes of each page
        for page in range(3):
            copied.clear()
            runtime.load_page(layer, page, 3)
            sizes.append(sum(copied))
        total = sum(sizes)
        assert total == runtime.streamed_bytes(layer) == 3 * layout.layer_bytes(layer)
        # boundaries on DMA pages (4 KiB), so equal within one of them (these layers: 6 and 24 KB)
        assert sizes[0] % paged.PAGE_ALIGN_BYTES == 0 and (sizes[0] + sizes[1]) % paged.PAGE_ALIGN_BYTES == 0
        assert all(abs(size - total / 3) < paged.PAGE_ALIGN_BYTES for size in sizes)
        with torch.no_grad():
            torch.testing.assert_close(runtime.run(layer, x, ids, w), resident.layers[layer].mlp.experts(x, ids, w))


def test_hrm_counts_each_forms_bytes(compressed, tiny):
    from moekit.pipeline.hrm import form_costs

    dense_model = moekit.load_model(tiny("mixtral").path, device="cpu", dtype="float32",
                                    experts=PagedLoader(resident=0))
    cfg = dense_model.config
    params = 3 * cfg.hidden_size * cfg.expert_ffn
    dense = form_costs(cfg, dense_model.expert_runtime.layout, act_dtype_bytes=4)
    assert dense.expert_bytes == params * 4 and dense.bits_per_weight == 32 and dense.table_bytes == 0
    bits_of = {}
    # int4: 4-bit codes + an fp16 scale and a uint8 zero per 16 weights; the tiny ternary code
    # pays ~1 bit a weight for its rows' fp16 levels (48- and 32-weight rows; 0.6 on Mixtral's)
    for form, bits in (("int4", (5.0, 6.0)), ("ternary", (0.3, 4.0))):
        model = load_model(compressed[form], device="cpu", dtype="float32", experts=PagedLoader(resident=0))
        layout = model.expert_runtime.layout
        costs = form_costs(cfg, layout, act_dtype_bytes=4)
        moe = layout.moe_layers
        assert costs.expert_bytes == pytest.approx(sum(layout.layer_bytes(m) for m in moe) / len(moe))
        assert bits[0] < costs.bits_per_weight < bits[1]
        bits_of[form] = costs.bits_per_weight
        assert costs.slot_bytes == layout.expert_bytes() and costs.table_bytes == layout.shared_bytes()
        assert costs.form == layout.form.name
        if form == "ternary":
            assert costs.table_bytes > 0
        # the bytes that cross PCIe per layer are the form's, not the dense ones
        assert costs.layer_expert_bytes < dense.layer_expert_bytes / 4
    assert bits_of["ternary"] < bits_of["int4"]


def test_refuses_forms_it_cannot_page(compressed, monkeypatch):
    """A stored form the pages do not carry is refused in one line that names the alternative
    (every form moekit compresses to pages today: the list is narrowed to check the refusal)."""
    from moekit.pipeline import paged

    monkeypatch.setattr(paged, "PAGED_FORMS", ("dense",))
    with pytest.raises(MoekitError, match="cannot page stored form 'int4'.*load_offloaded") as e:
        load_model(compressed["int4"], device="cpu", dtype="float32", experts=PagedLoader(resident=0))
    assert "\n" not in str(e.value)


@pytest.mark.gpu
@pytest.mark.parametrize("form", list(FORMS))
def test_cuda_pipelined_compressed_agrees_with_the_sequential_engine(compressed, form):
    """On a GPU: the pages cross on the weight stream into pinned-store-fed slots, the form's CUDA
    kernels read the slab; greedy tokens against the sequential engine on the same checkpoint
    (high agreement, not equality: CPU attention and the device sum in other orders)."""
    from test_cuda import agreement

    want = [t.tolist() for t in generate_ragged(moekit.load_model(compressed[form], device="cuda", dtype="bfloat16"),
                                                PROMPTS, max_new_tokens=6, temperature=0.0, stop_at_eos=False)]
    model = load_model(compressed[form], device="cuda", dtype="bfloat16", experts=PagedLoader(resident=1))
    got = [t.tolist() for t in generate_pipelined(model, PROMPTS, max_new_tokens=6, micro_batch=2)]
    share = agreement(got, want)
    print(f"CUDA pipeline, {form} experts paged: {100 * share:.1f}% of greedy tokens agree")
    assert share >= 0.9, f"{got} vs {want}"
    runtime = model.expert_runtime
    assert runtime.pages_loaded > 0 and all(t.is_pinned() for s in runtime.stores.values() for t in s.values())
    torch.cuda.synchronize()


@pytest.mark.parametrize("form", ["int4", pytest.param("ternary", marks=pytest.mark.slow)])
def test_decoded_layer_path_equals_the_per_expert_path(compressed, form, monkeypatch):
    """Past the per-slot kernels (> 16 routed slots) where the kernels run, a compressed layer is
    decoded once into a dense workspace and every micro-batch of it runs the grouped dense kernels
    (no host sync): the same outputs as the per-expert path, one decode per layer however many
    micro-batches call it, decoded again once its pages reload. (Triton interpreter on the CPU.)"""
    from conftest import kernel_device

    if kernel_device() != "cpu":
        pytest.skip("the CPU run of the kernels (CUDA: test_cuda_pipelined_compressed_agrees_...)")
    model = load_model(compressed[form], device="cpu", dtype="float32", experts=PagedLoader(resident=1))
    runtime = model.expert_runtime
    cfg = model.config
    g = torch.Generator().manual_seed(4)
    layer = runtime.layers[-1]
    runtime.prefetch(layer)
    calls = []
    for _ in range(2):  # two micro-batches of the layer, 12 tokens x top-2 = 24 slots each
        x = torch.randn(12, cfg.hidden_size, generator=g)
        ids = torch.stack([torch.randperm(cfg.num_experts, generator=g)[:2] for _ in range(12)])
        w = torch.rand(12, 2, generator=g)
        calls.append((x, ids, w))
    with torch.no_grad():
        want = [runtime.run(layer, *c) for c in calls]  # the per-expert PyTorch path (no kernels)
        assert runtime.layer_decodes == 0
        monkeypatch.setenv("MOEKIT_QUANT_KERNELS", "1")
        got = [runtime.run(layer, *c) for c in calls]
    assert runtime.layer_decodes == 1  # decoded once for both micro-batches
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    report = runtime.report()
    width = max(runtime.experts.values())
    assert report["workspace_bytes"] == width * 3 * cfg.hidden_size * cfg.expert_ffn * 4
    runtime.half_of.pop(layer)  # the layer's pages reload (a new step): decoded again
    runtime.pages_done.pop(layer)
    with torch.no_grad():
        again = runtime.run(layer, *calls[0])
    assert runtime.layer_decodes == 2
    torch.testing.assert_close(again, want[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("form", list(FORMS))
def test_external_call_decodes_the_layer_before_its_calls(compressed, form, monkeypatch):
    """An engine that keeps a call's bookkeeping outside a CUDA graph (pipeline.graphs): entering
    external_call decodes the compressed layer into the workspace, so the calls inside (what a
    graph captures) decode nothing and give the outputs of a plain call. (Triton interpreter.)"""
    from conftest import kernel_device

    if kernel_device() != "cpu":
        pytest.skip("the CPU run of the kernels (CUDA: test_graphs' GPU test)")
    model = load_model(compressed[form], device="cpu", dtype="float32", experts=PagedLoader(resident=1))
    runtime, cfg = model.expert_runtime, model.config
    g = torch.Generator().manual_seed(5)
    layer = runtime.layers[0]
    x = torch.randn(12, cfg.hidden_size, generator=g)  # 12 tokens x top-2: past the per-slot kernels
    ids = torch.stack([torch.randperm(cfg.num_experts, generator=g)[:2] for _ in range(12)])
    w = torch.rand(12, 2, generator=g)
    with torch.no_grad():
        reference = runtime.run(layer, x, ids, w)  # the per-expert PyTorch path
        monkeypatch.setenv("MOEKIT_QUANT_KERNELS", "1")
        half = runtime.begin_call(layer)
        before = runtime.layer_decodes
        with runtime.external_call(layer, half, x, ids.numel()):
            assert runtime.layer_decodes == before + 1  # on entry, outside what a graph captures
            inside = runtime.run(layer, x, ids, w)
            assert runtime.layer_decodes == before + 1
        runtime.end_call(layer)
        plain = runtime.run(layer, x, ids, w)
    assert torch.equal(inside, plain)
    torch.testing.assert_close(inside, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("form", list(FORMS))
def test_pipelined_with_decoded_layers_agrees_with_the_sequential_engine(compressed, form, monkeypatch):
    """CGOPipe over compressed pages with the kernels on (Triton interpreter): prefill micro-batches
    and 10-sequence decode micro-batches (20 routed slots) decode each layer into the workspace
    once a step and run the grouped dense kernels; greedy tokens against the sequential engine's
    PyTorch path (high agreement: the kernels sum in another order)."""
    from conftest import kernel_device
    from test_cuda import agreement

    if kernel_device() != "cpu":
        pytest.skip("the CPU run of the kernels (CUDA: test_cuda_pipelined_compressed_agrees_...)")
    prompts = PROMPTS + [[7, 8, 9], [50, 51], [3] * 5, [90, 2, 2, 2]]
    want = [t.tolist() for t in moekit.load_model(compressed[form], device="cpu", dtype="float32").generate(
        prompts, max_new_tokens=3, temperature=0.0, eos_token_ids=(), stop_at_eos=False)]
    monkeypatch.setenv("MOEKIT_QUANT_KERNELS", "1")
    model = load_model(compressed[form], device="cpu", dtype="float32", experts=PagedLoader(resident=1))
    got = [t.tolist() for t in generate_pipelined(model, prompts, max_new_tokens=3, micro_batch=10)]
    runtime = model.expert_runtime
    assert runtime.layer_decodes >= 3 * len(runtime.layers)  # the prefill and two decode steps, every layer
    assert agreement(got, want) >= 0.9, f"{got} vs {want}"
