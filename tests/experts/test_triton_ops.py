"""The grouped Triton expert kernels against the PyTorch reference (ResidentExperts._grouped).

On CPU machines they run under TRITON_INTERPRET=1 (set in conftest.py); on a GPU, for real.
"""

import pytest
import torch

from moekit.experts.resident import ResidentExperts
from moekit.experts import triton_ops

from conftest import kernel_device

pytestmark = pytest.mark.skipif(not triton_ops.HAVE_TRITON, reason="triton not installed")


def _experts(num_experts: int, hidden: int, ffn: int, device: str, dtype=torch.float32) -> ResidentExperts:
    m = ResidentExperts(num_experts, hidden, ffn)
    torch.nn.init.normal_(m.gate_up, std=hidden ** -0.5)
    torch.nn.init.normal_(m.down, std=ffn ** -0.5)
    return m.to(device=device, dtype=dtype)


def _route(tokens: int, num_experts: int, top_k: int, device: str, generator: torch.Generator):
    scores = torch.rand(tokens, num_experts, generator=generator)
    weights, ids = torch.topk(scores.softmax(-1), top_k, dim=-1)
    return ids.to(device), weights.to(device)


# (experts, hidden, ffn, tokens, top_k): odd sizes to hit every mask; one expert with many
# tokens (> BLOCK_M) to cross row blocks; a single token (the decode case); prefill-like
# routings with ~50 and ~150 slots per expert, which take the taller row blocks.
SHAPES = [(8, 64, 96, 5, 2), (4, 40, 24, 1, 2), (16, 128, 64, 33, 4), (4, 32, 48, 40, 1), (3, 72, 200, 7, 3),
          (4, 40, 24, 100, 2), (2, 48, 40, 150, 1)]


@pytest.mark.parametrize("shape", SHAPES)
def test_grouped_kernel_matches_reference(shape):
    num_experts, hidden, ffn, tokens, top_k = shape
    device = kernel_device()
    g = torch.Generator().manual_seed(sum(shape))
    m = _experts(num_experts, hidden, ffn, device)
    x = torch.randn(tokens, hidden, generator=g).to(device)
    ids, weights = _route(tokens, num_experts, top_k, device, g)
    with torch.no_grad():
        ref = m._grouped(x, ids, weights)
        out = triton_ops.grouped_expert_ffn(x, ids, weights, m.gate_up, m.down)
    rel = ((out - ref).norm() / ref.norm()).item()
    # float32 inputs: the kernels ask tl.dot for IEEE float32, so only summation order differs
    assert rel < 1e-5, rel


def test_prefill_tiles_for_many_slots_per_expert_in_16_bits():
    """A 16-bit prefill of >= PREFILL_TILES_FROM slots per expert takes the measured prefill tiles;
    fewer slots, or float32 (whose big tiles would not fit an SM's shared memory), keep block_sizes'."""
    many = triton_ops.PREFILL_TILES_FROM * 4
    assert triton_ops.grouped_tiles(many, 4, torch.bfloat16) == triton_ops.PREFILL_TILES
    assert triton_ops.grouped_tiles(many, 4, torch.float32)[3:] == (None, None)
    assert triton_ops.grouped_tiles(8, 4, torch.bfloat16) == (*triton_ops.block_sizes(8, 4), None, None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the interpreter's bf16 tl.dot is wrong)")
def test_grouped_kernel_with_prefill_tiles_matches_reference():
    """bf16 with enough slots per expert for the prefill tiles (128-row blocks, several of one
    expert, 8 warps, 3 stages) against the float32 reference of the same rounded inputs."""
    g = torch.Generator().manual_seed(3)
    m = _experts(2, 40, 24, "cuda", torch.bfloat16)
    tokens = 2 * triton_ops.PREFILL_TILES_FROM + 50
    x = torch.randn(tokens, 40, generator=g).to("cuda", torch.bfloat16)
    ids, weights = _route(tokens, 2, 1, "cuda", g)
    assert triton_ops.grouped_tiles(ids.numel(), 2, x.dtype) == triton_ops.PREFILL_TILES
    with torch.no_grad():
        out = triton_ops.grouped_expert_ffn(x, ids, weights.to(torch.bfloat16), m.gate_up, m.down).float()
        ref = m.float()._grouped(x.float(), ids, weights)
    assert ((out - ref).norm() / ref.norm()).item() < 2e-2


@pytest.mark.parametrize("shape", [(8, 64, 96, 1, 2), (64, 72, 40, 2, 8), (3, 200, 33, 3, 3)])
def test_slot_kernel_matches_reference(shape):
    num_experts, hidden, ffn, tokens, top_k = shape
    device = kernel_device()
    g = torch.Generator().manual_seed(sum(shape) + 1)
    m = _experts(num_experts, hidden, ffn, device)
    x = torch.randn(tokens, hidden, generator=g).to(device)
    ids, weights = _route(tokens, num_experts, top_k, device, g)
    with torch.no_grad():
        ref = m._grouped(x, ids, weights)
        out = triton_ops.slot_expert_ffn(x, ids, weights, m.gate_up, m.down)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 1e-5, rel


# (gate_up, down) configs: the defaults (K in one masked step; the 3 slots in one step of 4, the last
# re-read and not added); K = hidden 120 = 3 x 32 + 16 + 8 masked and K = ffn 200 = 6 x 32 + 8 masked,
# a slot a step; 120 = 64 + 32 + 16 + 8 masked and 200 = 128 + 64 + 8 masked, slots 2 + 1 (+ 1 re-read);
# BLOCK_N 16 leaves 8 rows past ffn and past hidden (clamped reads, masked stores)
SLOT_CONFIGS = [None, ((16, 32, 1), (16, 32, 1, 1)), ((4, 64, 2), (16, 128, 1, 2))]


@pytest.mark.parametrize("configs", [*SLOT_CONFIGS[:2], pytest.param(SLOT_CONFIGS[2], marks=pytest.mark.slow)])
def test_slot_kernel_sums_each_tokens_slots_with_their_weights(configs):
    """The down kernel's top-k sum: two tokens sharing expert 1 (token 1 routes to it twice), uneven
    and one negative weight; each token's row against its own float64 sum, so a dropped, doubled or
    mis-weighted slot, or a slot summed into the other token, fails."""
    num_experts, hidden, ffn = 4, 120, 200
    device = kernel_device()
    g = torch.Generator().manual_seed(11)
    m = _experts(num_experts, hidden, ffn, "cpu")
    x = torch.randn(2, hidden, generator=g)
    ids = torch.tensor([[1, 0, 3], [2, 1, 1]])
    weights = torch.tensor([[0.7, 0.2, 0.1], [0.05, 0.9, -0.4]])
    gate_up, down = m.gate_up.detach().double(), m.down.detach().double()
    want = torch.zeros(2, hidden, dtype=torch.float64)
    for n in range(2):
        for e, w in zip(ids[n].tolist(), weights[n].tolist()):
            gate, up = (gate_up[e] @ x[n].double()).chunk(2)
            want[n] += w * (down[e] @ (torch.nn.functional.silu(gate) * up))
    with torch.no_grad():
        got = triton_ops.slot_expert_ffn(x.to(device), ids.to(device), weights.to(device), m.gate_up.to(device),
                                         m.down.to(device), configs=configs).cpu().double()
    assert got.shape == (2, hidden)
    for n in range(2):
        rel = ((got[n] - want[n]).norm() / want[n].norm()).item()
        assert rel < 1e-5, (n, rel)


def test_slot_kernel_rejects_a_block_k_the_tail_cannot_cover():
    from moekit.errors import MoekitError

    m = _experts(2, 32, 16, "cpu")
    ids, weights = torch.tensor([[0, 1]]), torch.tensor([[0.5, 0.5]])
    with pytest.raises(MoekitError, match="BLOCK_K"):
        triton_ops.slot_expert_ffn(torch.randn(1, 32), ids, weights, m.gate_up, m.down,
                                   configs=((4, 48, 4), (4, 1024, 4, 1)))


def _slot_case(num_experts: int, hidden: int, ffn: int, tokens: int, top_k: int, seed: int):
    """Returns (device, experts, x, ids, weights) of a small routed call on the kernels' device."""
    device = kernel_device()
    g = torch.Generator().manual_seed(seed)
    m = _experts(num_experts, hidden, ffn, device)
    x = torch.randn(tokens, hidden, generator=g).to(device)
    ids, weights = _route(tokens, num_experts, top_k, device, g)
    return device, m, x, ids, weights


def test_slot_kernel_with_offsets_reads_experts_from_two_places():
    """An offset table pointing some experts into a second tensor (as offload.mapped points missed
    experts into host memory) gives bit-for-bit the stacked result."""
    num_experts, hidden, ffn, tokens, top_k = 6, 40, 24, 2, 3
    device, m, x, ids, weights = _slot_case(num_experts, hidden, ffn, tokens, top_k, seed=7)
    slab_gu, slab_dn = torch.zeros(3, 2 * ffn, hidden, device=device), torch.zeros(3, hidden, ffn, device=device)
    far_gu, far_dn = m.gate_up.detach().clone(), m.down.detach().clone()  # all experts, elsewhere
    offsets = torch.empty(num_experts, 2, dtype=torch.int64)
    size = slab_gu.element_size()
    for e in range(num_experts):
        if e % 2 == 0:  # even experts in slab slot e // 2
            slab_gu[e // 2], slab_dn[e // 2] = m.gate_up.detach()[e], m.down.detach()[e]
            offsets[e] = torch.tensor([e // 2 * slab_gu.stride(0), e // 2 * slab_dn.stride(0)])
        else:  # odd ones read in place from far_*: an element offset from the slab's base
            offsets[e, 0] = (far_gu[e].data_ptr() - slab_gu.data_ptr()) // size
            offsets[e, 1] = (far_dn[e].data_ptr() - slab_dn.data_ptr()) // size
    with torch.no_grad():
        want = triton_ops.slot_expert_ffn(x, ids, weights, m.gate_up, m.down)
        got = triton_ops.slot_expert_ffn(x, ids, weights, slab_gu, slab_dn, offsets=offsets.to(device))
    assert torch.equal(got, want)


def test_slot_kernel_skips_experts_whose_offset_is_minus_one():
    """skip=True leaves out the slots whose expert's offsets are -1 (offload.partner: the CPU
    computes them), without reading anything for them: the sum of the other slots (their routing
    weights zeroed), although the slab's first slot, where a skipped row would point, holds NaN."""
    num_experts, hidden, ffn, tokens, top_k = 6, 40, 24, 2, 3
    device, m, x, ids, weights = _slot_case(num_experts, hidden, ffn, tokens, top_k, seed=9)
    slab_gu = torch.full((num_experts + 1, 2 * ffn, hidden), float("nan"), device=device)
    slab_dn = torch.full((num_experts + 1, hidden, ffn), float("nan"), device=device)
    slab_gu[1:], slab_dn[1:] = m.gate_up.detach(), m.down.detach()  # expert e in slot e + 1
    here = torch.tensor([e % 3 != 1 for e in range(num_experts)])
    table = torch.stack([(torch.arange(num_experts) + 1) * slab_gu.stride(0),
                         (torch.arange(num_experts) + 1) * slab_dn.stride(0)], 1)
    skipping = torch.where(here[:, None], table, torch.full_like(table, -1))
    kept = weights * here.to(device)[ids]  # the skipped slots' weights zeroed
    with torch.no_grad():
        want = triton_ops.slot_expert_ffn(x, ids, kept, m.gate_up, m.down)
        got = triton_ops.slot_expert_ffn(x, ids, weights, slab_gu, slab_dn, offsets=skipping.to(device), skip=True)
        # bit for bit under the interpreter; compiled, offset variants may differ in the last bits (the
        # row-slice test below); a skipped row read from the NaN slot would fail either way
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        none = triton_ops.slot_expert_ffn(x, ids, weights, slab_gu, slab_dn, skip=True,
                                          offsets=torch.full_like(table, -1).to(device))
        assert torch.equal(none, torch.zeros_like(none))
    with pytest.raises(ValueError, match="needs offsets"):
        triton_ops.slot_expert_ffn(x, ids, weights, m.gate_up, m.down, skip=True)


@pytest.mark.slow
def test_skip_leaves_out_only_minus_one_not_rows_below_the_slab():
    """With skip, an offset of -1 leaves its expert out; any other offset is read, negative ones
    too: an expert in a tensor allocated below the slab (the partner's row split reads missed
    experts in place at such offsets; the first SKIP tested `>= 0` and dropped them)."""
    num_experts, hidden, ffn, tokens, top_k = 4, 40, 48, 2, 2
    device, m, x, ids, weights = _slot_case(num_experts, hidden, ffn, tokens, top_k, seed=9)
    gu, dn = m.gate_up.detach(), m.down.detach()
    for far_first in (True, False):  # the experts' tensor below the slab (negative offsets), then above it
        pair, far = [], []
        for w in (gu, dn):  # one buffer each, carved in that order
            buf = torch.zeros(w.numel() + 2 * w[0].numel(), dtype=w.dtype, device=device)
            cut = w.numel() if far_first else 2 * w[0].numel()
            lo, hi = buf[:cut], buf[cut:]
            far.append((lo if far_first else hi).view_as(w).copy_(w))
            pair.append((hi if far_first else lo).view(2, *w.shape[1:]))
        slab_gu, slab_dn = pair
        delta = [(f.data_ptr() - p.data_ptr()) // p.element_size() for f, p in zip(far, pair)]
        assert (delta[0] < 0 and delta[1] < 0) == far_first
        table = torch.stack([delta[0] + torch.arange(num_experts) * gu.stride(0),
                             delta[1] + torch.arange(num_experts) * dn.stride(0)], 1)
        left_out = torch.arange(num_experts) == 1
        table[left_out] = -1
        kept = weights * (~left_out).to(device)[ids]
        with torch.no_grad():
            want = triton_ops.slot_expert_ffn(x, ids, kept, gu, dn)
            for rows in (None, (16, 48)):
                got = triton_ops.slot_expert_ffn(x, ids, weights, slab_gu, slab_dn, offsets=table.to(device),
                                                 skip=True, rows=rows)
                if rows is None:
                    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
                else:
                    part = triton_ops.slot_expert_ffn(x, ids, kept, torch.cat([gu[:, 16:48], gu[:, 64:96]], 1),
                                                      dn[:, :, 16:48].contiguous())
                    torch.testing.assert_close(got, part, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_slot_kernel_row_slices_equal_cut_experts_and_add_up():
    """rows=(r0, r1) computes ffn rows r0..r1-1 of each expert (the device's share of an expert split
    by rows with the CPU): equal to the whole kernel on experts cut to those rows, with and without
    offsets, and slices covering the rows add up to the whole output."""
    num_experts, hidden, ffn, tokens, top_k = 4, 40, 48, 2, 2
    device, m, x, ids, weights = _slot_case(num_experts, hidden, ffn, tokens, top_k, seed=8)
    gu, dn = m.gate_up.detach(), m.down.detach()
    table = torch.stack([torch.arange(num_experts) * gu.stride(0), torch.arange(num_experts) * dn.stride(0)], 1)
    with torch.no_grad():
        for r0, r1 in ((0, 16), (16, 48), (5, 37)):
            cut_gu = torch.cat([gu[:, r0:r1], gu[:, ffn + r0:ffn + r1]], dim=1).contiguous()
            cut_dn = dn[:, :, r0:r1].contiguous()
            want = triton_ops.slot_expert_ffn(x, ids, weights, cut_gu, cut_dn)
            # bit for bit under the interpreter; compiled (H200: 7f24100 with offsets, 418157d without), the
            # (5, 37) slice differed from the cut experts in the last bits (a row start the compiler cannot
            # assume aligned): compared with a tolerance far below a wrong row's error
            got = triton_ops.slot_expert_ffn(x, ids, weights, gu, dn, rows=(r0, r1))
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
            got = triton_ops.slot_expert_ffn(x, ids, weights, gu, dn, offsets=table.to(device), rows=(r0, r1))
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        whole = triton_ops.slot_expert_ffn(x, ids, weights, gu, dn)
        parts = sum(triton_ops.slot_expert_ffn(x, ids, weights, gu, dn, rows=r) for r in ((0, 16), (16, 48)))
    torch.testing.assert_close(parts, whole, rtol=1e-4, atol=1e-5)


def test_block_map_covers_every_slot_once():
    g = torch.Generator().manual_seed(0)
    ids, _ = _route(37, 6, 3, "cpu", g)
    order, block_expert, block_start, block_end = triton_ops.block_map(ids, 6, block_m=4)
    sorted_experts = ids.reshape(-1)[order]
    covered = torch.zeros(ids.numel(), dtype=torch.int64)
    for p in range(block_expert.numel()):
        e = int(block_expert[p])
        if e == 6:
            continue
        rows = torch.arange(int(block_start[p]), min(int(block_start[p]) + 4, int(block_end[p])))
        assert (sorted_experts[rows] == e).all()
        covered[rows] += 1
    assert (covered == 1).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grouped_kernel_bf16_and_cuda_graph():
    m = _experts(64, 256, 128, "cuda", torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 256, generator=g).to("cuda", torch.bfloat16)
    ids, weights = _route(4, 64, 8, "cuda", g)
    weights = weights.to(torch.bfloat16)
    with torch.no_grad():
        ref = _experts_float_reference(m, x, ids, weights)
        graph = torch.cuda.CUDAGraph()
        out = triton_ops.grouped_expert_ffn(x, ids, weights, m.gate_up, m.down)  # warm-up/compile
        with torch.cuda.graph(graph):
            out = triton_ops.grouped_expert_ffn(x, ids, weights, m.gate_up, m.down)
        graph.replay()
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert rel < 2e-2, rel


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", [(64, 256, 128, 1, 8), (16, 256, 176, 3, 6)])
def test_slot_kernel_bf16_and_cuda_graph(shape):
    """bf16 per-slot kernels replayed in a CUDA graph against the float32 reference: ffn 176 takes
    the split K tail at BLOCK_K 128, and 6 slots a step of 8 (two re-read, not added)."""
    num_experts, hidden, ffn, tokens, top_k = shape
    m = _experts(num_experts, hidden, ffn, "cuda", torch.bfloat16)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(tokens, hidden, generator=g).to("cuda", torch.bfloat16)
    ids, weights = _route(tokens, num_experts, top_k, "cuda", g)
    weights = weights.to(torch.bfloat16)
    configs = ((4, 128, 4), (1, 128, 4, 8))
    with torch.no_grad():
        ref = _experts_float_reference(m, x, ids, weights)
        graph = torch.cuda.CUDAGraph()
        out = triton_ops.slot_expert_ffn(x, ids, weights, m.gate_up, m.down, configs=configs)  # warm-up/compile
        with torch.cuda.graph(graph):
            out = triton_ops.slot_expert_ffn(x, ids, weights, m.gate_up, m.down, configs=configs)
        graph.replay()
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert rel < 2e-2, rel


def _experts_float_reference(m, x, ids, weights):
    ref = ResidentExperts(m.num_experts, m.hidden, m.ffn).to("cuda")
    with torch.no_grad():
        ref.gate_up.copy_(m.gate_up.float())
        ref.down.copy_(m.down.float())
        return ref._grouped(x.float(), ids, weights.float())


class _Recorder:
    """Stands in for a Triton kernel: records the specialization key of each launch, runs nothing."""

    def __init__(self, kernel):
        self.kernel, self.keys, self.launches = kernel, set(), 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1
            self.keys.add(triton_ops.specialization_key(self.kernel, args, kwargs))
        return launch


def test_ragged_token_counts_compile_a_fixed_set_of_expert_kernels(monkeypatch):
    """Every token count a ragged step may bring (1..600, olmoe's 64 experts top-8) launches the
    grouped kernels under one key per row-block size (3) and the per-slot kernels under one: a
    new step size never compiles a new kernel mid-run."""
    from moekit.experts.forms import SLOT_KERNEL_MAX_SLOTS

    recorders = {}
    for name in ("gate_up_swiglu_kernel", "down_kernel", "slot_gate_up_swiglu_kernel", "slot_down_kernel"):
        recorders[name] = _Recorder(getattr(triton_ops, name))
        monkeypatch.setattr(triton_ops, name, recorders[name])
    num_experts, top_k, hidden, ffn = 64, 8, 32, 16
    gate_up = torch.empty(num_experts, 2 * ffn, hidden, dtype=torch.bfloat16)
    down = torch.empty(num_experts, hidden, ffn, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    for tokens in range(1, 601):
        ids = torch.randint(0, num_experts, (tokens, top_k), generator=g)
        weights = torch.rand(tokens, top_k, generator=g).to(torch.bfloat16)
        x = torch.empty(tokens, hidden, dtype=torch.bfloat16)
        if ids.numel() <= SLOT_KERNEL_MAX_SLOTS:
            triton_ops.slot_expert_ffn(x, ids, weights, gate_up, down)
        else:
            triton_ops.grouped_expert_ffn(x, ids, weights, gate_up, down)
    assert recorders["gate_up_swiglu_kernel"].launches == 600 - SLOT_KERNEL_MAX_SLOTS // top_k
    assert len(recorders["gate_up_swiglu_kernel"].keys) == len(recorders["down_kernel"].keys) == 3
    assert len(recorders["slot_gate_up_swiglu_kernel"].keys) == len(recorders["slot_down_kernel"].keys) == 1


def test_specialization_key_classes():
    kernel = triton_ops.down_kernel
    x = torch.empty(4, 8)
    base = (x, x, x, x, x, x, 8, 64, 32, 16, 16, 16)
    key = lambda *ints: triton_ops.specialization_key(kernel, base[:6] + ints + base[6 + len(ints):], {"K": 8})
    assert key(8) != key(1) != key(3) and key(32) == key(48) and key(3) == key(5)
    unaligned = x.view(-1)[1:]  # 4 bytes in
    assert triton_ops.specialization_key(kernel, (unaligned,), {}) != triton_ops.specialization_key(kernel, (x,), {})
