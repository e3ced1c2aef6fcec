"""The gpt-oss expert kernels (experts.clamped_ops: per-slot and grouped, MXFP4 and dense) against
the forms' PyTorch path (ClampedSwigluForm.run_planned), on the CPU under TRITON_INTERPRET=1
(set in conftest.py) or on a GPU for real.

Shapes: E = experts, D = hidden, I = expert ffn width (multiples of 32, as MXFP4 needs).
"""

from functools import partial

import pytest
import torch
from conftest import kernel_device

from moekit.errors import MoekitError
from moekit.experts import clamped, triton_ops
from moekit.experts.clamped import ClampedSwigluForm, Mxfp4ClampedForm
from moekit.offload.layout import ExpertBytes

pytestmark = pytest.mark.skipif(not triton_ops.HAVE_TRITON, reason="triton not installed")

if triton_ops.HAVE_TRITON:
    import triton
    import triton.language as tl

    from moekit.kernels.clamped_experts import (
        X_LOG2,
        _e2m1,
        _e2m1_word_nibble,
        _word_power,
    )

    @triton.jit
    def _every_code(out_ptr):
        """out[c] = the e2m1 value of code c, for c in 0..15."""
        codes = tl.arange(0, 16)
        tl.store(out_ptr + codes, _e2m1(codes))

    @triton.jit
    def _every_word_nibble(words_ptr, out_ptr):
        """out[p, i] = nibble p of words[i] as the "words" kernels decode it (e2m1 * 2^-126)."""
        i = tl.arange(0, 16)
        words = tl.load(words_ptr + i)
        for p in tl.static_range(8):
            tl.store(out_ptr + p * 16 + i, _e2m1_word_nibble(words, p))

    @triton.jit
    def _every_power(scales_ptr, out_ptr):
        """out[s] = the "words" kernels' power of uint8 scale s, for s in 0..255."""
        s = tl.arange(0, 256)
        tl.store(out_ptr + s, _word_power(tl.load(scales_ptr + s)))

E, D, I = 8, 64, 32
ALPHA, LIMIT = 1.702, 7.0  # gpt-oss's


def _form(fmt: str, dtype: torch.dtype) -> ClampedSwigluForm:
    return (Mxfp4ClampedForm if fmt == "mxfp4" else ClampedSwigluForm)(D, I, dtype, ALPHA, LIMIT)


def _stack(form: ClampedSwigluForm, count: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Returns random experts {name: [count, ...]} in the form's layout: MXFP4 bytes over every code,
    scales around 2^-2..2^1 so that some gate and up values pass the clamp and some do not."""
    out = {}
    for name, (shape, dtype) in form.specs().items():
        if name.endswith("_blocks"):
            out[name] = torch.randint(0, 256, (count, *shape), generator=g, dtype=torch.uint8)
        elif name.endswith("_scales"):
            out[name] = torch.randint(124, 128, (count, *shape), generator=g, dtype=torch.uint8)
        else:
            std = 0.5 if name.endswith("_bias") else shape[-1] ** -0.5 * 6
            out[name] = (torch.randn((count, *shape), generator=g) * std).to(dtype)
    return out


def _route(tokens: int, top_k: int, experts: list[int], g: torch.Generator):
    """Returns ids, weights [tokens, top_k]: uneven (the first expert in every token, so it spans
    several row blocks when tokens > 16), a few zero weights."""
    ids = torch.stack([torch.tensor([experts[0]] + [experts[1 + i] for i in torch.randperm(len(experts) - 1,
                                                                                          generator=g)[:top_k - 1]])
                       for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=g)
    # skipped slots (dynamic skip; the PyTorch path leaves them out), never a token's only slot
    weights[(0 if top_k > 1 else 1)::3, -1] = 0.0
    return ids, weights


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def _check(got, want, want32, dtype, what):
    """float32: the kernels equal the PyTorch path but for summation order; bf16: their error
    against the float32 result is about the bf16 PyTorch path's (they accumulate in fp32 and round
    h and the outputs once). The Triton 3.9 interpreter casts fp32 to bf16 by truncation (twice
    the error of rounding to nearest, which GPUs do), so the CPU allows twice as much."""
    if dtype == torch.float32:
        assert _rel(got, want) < 1e-5, (what, _rel(got, want))
    else:
        factor = 1.5 if got.is_cuda else 3.0
        assert _rel(got, want32) <= factor * _rel(want, want32) + 2e-3, (what, _rel(got, want32), _rel(want, want32))


def test_e2m1_codes_equal_the_spec():
    """The kernels' e2m1 decode (float32 bits from integer ops) gives every code's value as
    FP4_VALUES lists it, the sign of -0 included."""
    got = torch.empty(16, device=kernel_device())
    _every_code[(1,)](got)
    want = torch.tensor(clamped.FP4_VALUES)
    assert torch.equal(got.cpu(), want) and torch.equal(got.cpu().signbit(), want.signbit())


def test_word_nibbles_and_powers_are_exact():
    """The "words" kernels' decode: nibble p of a word (codes placed so every code sits at every
    position, both signs of 0 included) is the code's e2m1 value times 2^-126 exactly (code 1 on a
    float32 subnormal), and the power of scale s times 2^-126 * 2^X_LOG2 (the nibble's and x's
    factors) is 2^(s - 127) exactly for every s the kernels' comment allows (0..228)."""
    device = kernel_device()
    codes = (torch.arange(16)[:, None] + torch.arange(8)[None, :]) % 16  # [word, nibble]
    words = (codes << (4 * torch.arange(8))[None, :]).sum(1)
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)  # the same bits as int32
    got = torch.empty(8, 16, device=device)
    _every_word_nibble[(1,)](words.to(device), got)
    want = torch.tensor(clamped.FP4_VALUES)[codes.T] * 2.0 ** -126  # [nibble, word]
    assert torch.equal(got.cpu(), want) and torch.equal(got.cpu().signbit(), want.signbit())
    assert got.cpu()[codes.T == 1].min() > 0  # the subnormal survived
    powers = torch.empty(256, device=device)
    _every_power[(1,)](torch.arange(256, dtype=torch.uint8, device=device), powers)
    s = torch.arange(229)
    assert torch.equal(powers.cpu()[:229].double() * 2.0 ** (X_LOG2.value - 126), torch.exp2(s.double() - 127))


@pytest.mark.parametrize("kernels", ["words", pytest.param("bytes", marks=pytest.mark.slow)])  # the default: words
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.slow)])
def test_slot_kernel_variants_equal_the_pytorch_path(kernels, dtype):
    """Both per-slot MXFP4 variants (clamped_ops.SLOT_MXFP4_KERNELS picks one) equal run_planned at
    1, 4 and 9 tokens, top-k 1, 3 (not a power of two: the fused down kernel pads its slots) and 4,
    with zero routing weights among them."""
    device = kernel_device()
    g = torch.Generator().manual_seed(17)
    form, form32 = _form("mxfp4", dtype), _form("mxfp4", torch.float32)
    stacked = _stack(form, E, g)
    stacked32 = {k: (v.float() if v.is_floating_point() else v) for k, v in stacked.items()}
    mats = clamped.clamped_ops.matrices({k: v.to(device) for k, v in stacked.items()})
    for tokens, top_k in ((1, 1), (1, 4), (9, 3)):
        ids, w = _route(tokens, top_k, [3, 0, 1, 2, 4, 5, 6, 7], g)
        x = torch.randn(tokens, D, generator=g)
        want32 = form32.run_planned(x, ids, w, stacked32, grad=False)
        want = form.run_planned(x.to(dtype), ids, w.to(dtype), stacked, grad=False)
        got = clamped.clamped_ops.slot_ffn(x.to(device, dtype), ids.to(device), w.to(device, dtype), mats, ALPHA,
                                           LIMIT, kernels=kernels)
        assert got.dtype == dtype and got.shape == (tokens, D)
        _check(got, want.to(device), want32.to(device), dtype, (kernels, tokens, top_k))
    with pytest.raises(MoekitError, match="kernels="):
        clamped.clamped_ops.slot_ffn(x.to(device, dtype), ids.to(device), w.to(device, dtype), mats, ALPHA, LIMIT,
                                     kernels="nibbles")


@pytest.mark.parametrize("fmt", ["mxfp4", "dense"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_equal_the_pytorch_path(fmt, dtype):
    """Slot counts 1 and 4 (per-slot kernels), 17 and 100 (grouped; the first expert in 25 tokens
    crosses row blocks): the kernels' [N, D] equals run_planned's, in float32 and bf16."""
    device = kernel_device()
    g = torch.Generator().manual_seed(7)
    form, form32 = _form(fmt, dtype), _form(fmt, torch.float32)
    stacked = _stack(form, E, g)
    stacked32 = {k: (v.float() if v.is_floating_point() else v) for k, v in stacked.items()}
    clamp_seen = set()
    for tokens, top_k in ((1, 1), (1, 4), (17, 1), (25, 4)):
        if fmt == "dense" and dtype == torch.bfloat16 and device == "cpu" and tokens * top_k > 16:
            continue  # the Triton 3.9 interpreter's tl.dot returns garbage on bf16 tiles (GPUs run it)
        ids, w = _route(tokens, top_k, [3, 0, 1, 2, 4, 5, 6, 7], g)
        x = torch.randn(tokens, D, generator=g)
        want32 = form32.run_planned(x, ids, w, stacked32, grad=False)
        want = form.run_planned(x.to(dtype), ids, w.to(dtype), stacked, grad=False)
        on = {k: v.to(device) for k, v in stacked.items()}
        got = clamped.clamped_ops.clamped_expert_ffn(x.to(device, dtype), ids.to(device), w.to(device, dtype), on,
                                                     ALPHA, LIMIT)
        assert got.dtype == dtype and got.shape == (tokens, D)
        _check(got, want.to(device), want32.to(device), dtype, (fmt, tokens * top_k))
        gate = torch.einsum("nd,nrd->nr", x, form32.dequantize(stacked32)[0][ids[:, 0]])[:, :I]
        clamp_seen.update((gate > LIMIT).flatten().tolist())
    assert clamp_seen == {True, False}, "the shapes should exercise the clamp both ways"


@pytest.mark.parametrize("fmt", ["mxfp4", "dense"])
def test_kernels_read_a_cache_slab(fmt, monkeypatch):
    """Through form.run as offload calls it: the stack is a cache slab of packed byte rows (slot ids,
    not expert ids; an expert's tensors a row apart; more rows than routed slots, so the grouped
    launch is cut to the blocks that can be used), 4, 20 and 100 slots; outputs equal the resident
    layer's PyTorch path on expert ids."""
    device = kernel_device()
    g = torch.Generator().manual_seed(11)
    form = _form(fmt, torch.float32)
    resident = _stack(form, E, g)
    packing = ExpertBytes(form.specs())
    cached = [6, 2, 0, 7, 3]  # expert in each slab slot
    slab = torch.zeros(len(cached) + 30, packing.nbytes + 64, dtype=torch.uint8)  # spare slots, padded rows
    stacked = packing.stacked(slab)
    for slot, e in enumerate(cached):
        for name, t in stacked.items():
            t[slot].copy_(resident[name][e])
    slot_of = {e: slot for slot, e in enumerate(cached)}
    monkeypatch.setattr(clamped, "slot_kernels_run", lambda x: True)  # the GPU's branch, as on CUDA tensors
    for tokens, top_k in ((1, 4), (5, 4), (25, 4)):
        ids, w = _route(tokens, top_k, cached, g)
        x = torch.randn(tokens, D, generator=g)
        slot_ids = ids.clone().apply_(slot_of.__getitem__)
        want = form.run_planned(x, ids, w, resident, grad=False)
        on = {k: v.to(device) for k, v in stacked.items()}
        with torch.no_grad():
            got = form.run(x.to(device), slot_ids.to(device), w.to(device), on, ids=ids.to(device), row_of=slot_of,
                           count=E)
        _check(got, want.to(device), want.to(device), torch.float32, (fmt, tokens * top_k))


def _placed(form: ClampedSwigluForm, resident: dict[str, torch.Tensor], cached: list[int]):
    """Returns (slab stack, host buffer, offsets [E, C + 1]) with the experts placed as offload's
    mapped misses place them: experts `cached` in packed slab slots (in that order), every expert
    in a host buffer of packed rows of another width, each offsets row pointing at the expert's
    slot when cached, else at its host row (elements of each tensor, columns in_place_tensors
    order; a last column as the mapped table's flag, never read by the kernels)."""
    packing = ExpertBytes(form.specs())
    slab = torch.zeros(len(cached) + 3, packing.nbytes + 64, dtype=torch.uint8)  # spare slots, padded rows
    host = torch.zeros(E, packing.nbytes + 32, dtype=torch.uint8)
    stacked, host_rows = packing.stacked(slab), packing.stacked(host)
    for name, t in host_rows.items():
        t.copy_(resident[name])
    for slot, e in enumerate(cached):
        for name, t in stacked.items():
            t[slot].copy_(resident[name][e])
    names = form.in_place_tensors
    offsets = torch.full((E, len(names) + 1), -1, dtype=torch.int64)
    for c, name in enumerate(names):
        base, rows = stacked[name], host_rows[name]
        delta = (rows.data_ptr() - base.data_ptr()) // base.element_size()
        for e in range(E):
            offsets[e, c] = cached.index(e) * base.stride(0) if e in cached else delta + e * rows.stride(0)
    return stacked, host, offsets


@pytest.mark.slow  # ~15 s a format interpreted; offsets of both forms run by default in test_mapped_gpt_oss (dense)
@pytest.mark.parametrize("fmt", ["mxfp4", "dense"])
def test_offsets_equal_the_stacked_path(fmt):
    """The per-slot kernels with an offsets table (each expert's weights, scales and biases where
    its row points: some in slab slots, the rest in another buffer) give bit for bit what they give
    on the resident stack by expert id, for 1, 4 and 20 slots; a table with the cached experts'
    rows pointing at each other's slots gives another (wrong) result, so the table is what is read."""
    if torch.cuda.is_available():
        pytest.skip("the host buffer here is pageable CPU memory; offload's GPU tests read pinned rows")
    g = torch.Generator().manual_seed(13)
    form = _form(fmt, torch.float32)
    resident = _stack(form, E, g)
    cached = [6, 2, 0, 3]
    stacked, host, offsets = _placed(form, resident, cached)
    for tokens, top_k in ((1, 1), (1, 4), (5, 4)):
        ids, w = _route(tokens, top_k, [2, 0, 1, 3, 4, 5, 6, 7], g)
        x = torch.randn(tokens, D, generator=g)
        want = clamped.clamped_ops.slot_ffn(x, ids, w, clamped.clamped_ops.matrices(resident), ALPHA, LIMIT)
        got = form.fused(x, ids, w, stacked, offsets=offsets)
        assert torch.equal(got, want), (fmt, tokens * top_k, _rel(got, want))
        _check(got, form.run_planned(x, ids, w, resident, grad=False), None, torch.float32, (fmt, tokens * top_k))
    swapped = offsets.clone()
    swapped[[2, 6]] = offsets[[6, 2]]  # experts 2 and 6 read each other's slots
    ids, w = torch.tensor([[2]]), torch.ones(1, 1)
    x = torch.randn(1, D, generator=g)
    assert not torch.allclose(form.fused(x, ids, w, stacked, offsets=swapped), form.fused(x, ids, w, stacked, offsets=offsets))


@pytest.mark.slow
def test_kernel_configs_agree():
    """The kernels give one result whatever their tiles (the probe sweeps them on a GPU): per-slot
    narrow and wide tiles with BLOCK_K (or BLOCK_W) below and above K; grouped row blocks of 16 and
    32 slots, with each GROUPED_TILES_CHOICES way of building MXFP4 tiles."""
    device = kernel_device()
    g = torch.Generator().manual_seed(3)
    form = _form("mxfp4", torch.float32)
    stacked = _stack(form, E, g)
    mats = clamped.clamped_ops.matrices({k: v.to(device) for k, v in stacked.items()})
    for tokens, configs in ((1, ((16, 64, 4), (16, 32, 1), (8, 128, 2))), (2, ((16, 4, 4), (4, 2, 1), (2, 8, 2))),
                            (10, ((16, 32, 32, 2), (32, 64, 64, 4)))):
        ids, w = _route(tokens, 4, list(range(E)), g)
        x = torch.randn(tokens, D, generator=g)
        want = form.run_planned(x, ids, w, stacked, grad=False)
        on = (x.to(device), ids.to(device), w.to(device), mats, ALPHA, LIMIT)
        for config in configs:
            if len(config) == 3:  # "bytes" (BLOCK_K columns) at one token, "words" (BLOCK_W words: K = 8) at two
                got = clamped.clamped_ops.slot_ffn(*on, (config, config), kernels="bytes" if tokens == 1 else "words")
                assert _rel(got.cpu(), want) < 1e-5, config
            else:  # every way of building MXFP4 tiles (the interpreter's are float32: the bf16 ones are GPU-only)
                for tiles in clamped.clamped_ops.GROUPED_TILES_CHOICES:
                    got = clamped.clamped_ops.grouped_ffn(*on, config, tiles=tiles)
                    assert _rel(got.cpu(), want) < 1e-5, (config, tiles)
    with pytest.raises(MoekitError, match="tiles="):
        clamped.clamped_ops.grouped_ffn(*on, tiles="nibbles")


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["mxfp4", "dense"])
def test_cuda_graph_replays_new_routings(fmt):
    """No host sync: a call captured in a CUDA graph (per-slot at 4 slots, grouped at 128) replays
    other routings copied into its inputs and equals the PyTorch path on each (bf16)."""
    g = torch.Generator().manual_seed(5)
    form = _form(fmt, torch.bfloat16)
    stacked = {k: v.cuda() for k, v in _stack(form, E, g).items()}
    for tokens in (1, 32):
        ids, w = _route(tokens, 4, list(range(E)), g)
        x = torch.randn(tokens, D, generator=g)
        static = [ids.cuda(), w.cuda().bfloat16(), x.cuda().bfloat16()]
        call = partial(clamped.clamped_ops.clamped_expert_ffn, static[2], static[0], static[1], stacked, ALPHA, LIMIT)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            call()  # compile outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = call()
        for _ in range(2):
            ids, w = _route(tokens, 4, list(range(E))[::-1], g)
            x = torch.randn(tokens, D, generator=g)
            for t, new in zip(static, (ids, w.bfloat16(), x.bfloat16())):
                t.copy_(new)
            graph.replay()
            want = form.run_planned(static[2], static[0], static[1], stacked, grad=False)
            want32 = _form(fmt, torch.float32).run_planned(
                x.cuda(), ids.cuda(), w.cuda(), {k: (v.float() if v.is_floating_point() else v)
                                                 for k, v in stacked.items()}, grad=False)
            _check(out, want, want32, torch.bfloat16, (fmt, tokens * 4))


# Compiles the kernels for sm_90 in a process of its own (the tests' TRITON_INTERPRET=1 turns every
# kernel into an interpreted function, which does not compile) and prints each one's stack bytes.
_SM90_COMPILE = """
import json, re, subprocess, sys, tempfile
from pathlib import Path
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from moekit.experts import clamped_ops
from moekit.kernels import clamped_experts as kernels

mxfp4 = sys.argv[1] == "mxfp4"
cuobjdump = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
types = {"rows_ptr": "*i64", "order_ptr": "*i64", "w_off_ptr": "*i64", "s_off_ptr": "*i64", "b_off_ptr": "*i64", "scales_ptr": "*u8", "w_ptr": "*u8" if mxfp4 else "*bf16",
         "block_expert_ptr": "*i32", "block_start_ptr": "*i32", "block_end_ptr": "*i32", "alpha": "fp32", "limit": "fp32"}
bn, bk, warps = clamped_ops.SLOT_CONFIG[mxfp4]
launches = [(name, {**top_k, "BLOCK_N": bn, "BLOCK_K": bk, "OFFSETS": offsets}, warps)
            for offsets in (False, True) for name, top_k in (("slot_gate_up_kernel", {"TOP_K": 4}),
                                                             ("slot_down_kernel", {}))]
if mxfp4:  # the "words" per-slot kernels
    (gn, gw, g_warps), (dn, dw, d_warps) = clamped_ops.SLOT_WORDS_CONFIG
    launches += [(name, {"TOP_K": 4, **p2, "BLOCK_N": bn, "BLOCK_W": bw, "OFFSETS": offsets}, warps)
                 for offsets in (False, True) for name, p2, bn, bw, warps in (
                     ("slot_gate_up_mxfp4_kernel", {}, gn, gw, g_warps),
                     ("slot_down_sum_mxfp4_kernel", {"TOP_K_P2": 4}, dn, dw, d_warps))]
for slots in (128, 1024):
    for on in (True, False) if mxfp4 else (False,):  # "words" (bf16 tiles), "bytes"
        bm, bn, bk, warps = clamped_ops.grouped_config(slots, 32, mxfp4, bf16_tiles=on)
        tiles = {"WORD_TILES": on, "BF16_TILES": on}
        blocks = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "DOT_PRECISION": "tf32", **tiles}
        launches += [("grouped_gate_up_kernel", {"TOP_K": 4, **blocks}, warps), ("grouped_down_kernel", blocks, warps)]
stacks = []
for name, constexprs, warps in launches:
    kernel = getattr(kernels, name)
    constexprs = {"K": 2880, **({} if "BLOCK_W" in constexprs else {"MXFP4": mxfp4}), **constexprs}
    signature = {a: types.get(a, "*bf16" if a.endswith("_ptr") else "i32") for a in kernel.arg_names if a not in constexprs}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", cubin.name], capture_output=True,
                               text=True, check=True).stdout
    stacks.append([name, constexprs, int(re.search(r"STACK:(\\d+)", usage).group(1))])
print(json.dumps(stacks))
"""


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["mxfp4", "dense"])
def test_kernels_compile_for_sm90(fmt):
    """Every kernel compiles for an H100/H200 (sm_90; no GPU needed: Triton's own ptxas) at its
    default tiles and gpt-oss-20b's widths, per-slot ("bytes" and, for MXFP4, "words") and grouped
    (decode and prefill blocks; MXFP4 with "words" bf16 tiles and "bytes" float32 ones), and MXFP4's
    grouped gate_up and "words" kernels spill no registers
    (clamped_ops.grouped_config says why it matters)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    if not (Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump").exists():
        pytest.skip("this triton has no CUDA backend tools")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_DEFAULT_FP_FUSION="1", PYTHONPATH=str(Path(clamped.__file__).parents[2]))
    run = subprocess.run([sys.executable, "-c", _SM90_COMPILE, fmt], capture_output=True, text=True, env=env,
                         check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    stacks = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(stacks) == (16 if fmt == "mxfp4" else 8)
    for name, constexprs, stack in stacks:
        if fmt == "mxfp4" and (name == "grouped_gate_up_kernel" or "BLOCK_W" in constexprs):
            assert stack == 0, (constexprs, stack)
