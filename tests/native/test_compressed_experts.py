"""The native CPU kernels for compressed experts (native/compressed.cpp) against their PyTorch
references (the forms' own dequantize + matmul): every int bit width and scale grouping (per row,
word-aligned groups, groups that split a word), the ternary code with 8- and 16-bit dictionaries,
odd sizes, several tokens, jobs sharing tokens, tokens no job touches, any thread count giving the
same bits, and refusals of arguments the kernels cannot take. The int kernels run with float
activations here (dot="float", the path that matches the reference to float rounding); the int8
activations' error is test_int_dot's."""

from __future__ import annotations

import pytest
import torch

from moekit import native
from moekit.native import compressed as nc
from moekit.quant.code import build_dictionary, encode, symbol_probabilities
from moekit.quant.grids import HI, LO, ZERO, pack_codes

pytestmark = pytest.mark.skipif(native.library() is None, reason=f"no native library: {native.unavailable_reason()}")

ROUTES = [[0, 2], [2], [1, 3, 0], [4]]  # token 2 in two jobs, token 5 in none


def int_matrix(rows: int, cols: int, bits: int, groups: int, g: torch.Generator):
    codes = torch.randint(0, 1 << bits, (rows, cols), generator=g)
    scale = (torch.rand(rows, groups, generator=g) * 0.02 + 0.001).to(torch.float16)
    zero = torch.randint(0, 1 << bits, (rows, groups), generator=g).to(torch.uint8)
    return pack_codes(codes, bits), scale, zero


def int_jobs(d: int, ffn: int, bits: int, groups: tuple[int, int], routes, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(int_matrix(2 * ffn, d, bits, groups[0], g), int_matrix(d, ffn, bits, groups[1], g), toks,
             torch.rand(len(toks), generator=g).tolist()) for toks in routes]


def ternary_codes(rows: int, cols: int, density: float, g: torch.Generator) -> torch.Tensor:
    u = torch.rand(rows, cols, generator=g)
    return torch.where(u < density / 2, LO, torch.where(u < density, HI, ZERO)).to(torch.uint8)


def code_jobs(d: int, ffn: int, routes, bits: int = 8, chunk: int | None = None, density: float = 0.3, seed: int = 0):
    """Returns (jobs, table): one dictionary for the layer, built from its codes' statistics."""
    g = torch.Generator().manual_seed(seed)
    mats = [(ternary_codes(2 * ffn, d, density, g), ternary_codes(d, ffn, density, g)) for _ in routes]
    dictionary = build_dictionary(symbol_probabilities(torch.cat([m.flatten() for pair in mats for m in pair])), bits)
    jobs = []
    for (gu, dn), toks in zip(mats, routes):
        parts = []
        for codes in (gu, dn):
            code = encode(codes, dictionary, chunk)
            lo = (-torch.rand(codes.shape[0], generator=g) * 0.05).to(torch.float16)
            hi = (torch.rand(codes.shape[0], generator=g) * 0.05).to(torch.float16)
            parts.append((*code, lo, hi))
        jobs.append((parts[0], parts[1], toks, torch.rand(len(toks), generator=g).tolist()))
    return jobs, dictionary.table


def close(out: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    assert (out.float() - expected).abs().max() <= rtol * expected.abs().max() + 1e-7


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("d,ffn,groups", [(64, 32, (1, 1)), (100, 37, (4, 3)), (96, 80, (6, 5)), (160, 48, (10, 3)),
                                         (200, 72, (1, 1)), (256, 96, (2, 1))])
def test_int_matches_reference(bits, d, ffn, groups):
    x = torch.randn(6, d)
    jobs = int_jobs(d, ffn, bits, groups, ROUTES)
    out = nc.int_ffn(x, jobs, bits, threads=2, dot="float")
    expected = nc.int_reference(x, jobs, bits)
    close(out, expected)
    assert torch.equal(out[5], torch.zeros(d))


@pytest.mark.parametrize("bits,chunk", [(8, None), (8, 4), (16, 8)])
@pytest.mark.parametrize("d,ffn", [(64, 32), (100, 37), (200, 72)])
def test_code_matches_reference(bits, chunk, d, ffn):
    x = torch.randn(6, d)
    jobs, table = code_jobs(d, ffn, ROUTES, bits, chunk)
    out = nc.code_ffn(x, jobs, table, threads=2)
    expected = nc.code_reference(x, jobs, table)
    close(out, expected)
    assert torch.equal(out[5], torch.zeros(d))


def test_code_rows_of_uneven_density_and_empty_rows():
    g = torch.Generator().manual_seed(1)
    d, ffn = 48, 40
    gu = ternary_codes(2 * ffn, d, 0.05, g)
    gu[3] = ternary_codes(1, d, 0.95, g)[0]  # one dense row among sparse ones, and an empty one
    gu[7] = ZERO
    dn = ternary_codes(d, ffn, 0.05, g)
    dictionary = build_dictionary(symbol_probabilities(torch.cat([gu.flatten(), dn.flatten()])), 8)
    levels = lambda r: ((-torch.rand(r, generator=g)).half(), torch.rand(r, generator=g).half())
    job = ((*encode(gu, dictionary), *levels(2 * ffn)), (*encode(dn, dictionary), *levels(d)), [0, 1, 2], [0.5, 1.0, 2.0])
    x = torch.randn(3, d)
    close(nc.code_ffn(x, [job], dictionary.table), nc.code_reference(x, [job], dictionary.table))


@pytest.mark.parametrize("form", ["int4", "int3", "code"])
def test_one_token_decode_and_many_tokens(form):
    d, ffn = 128, 64
    for tokens, routes in ((1, [[0]] * 8), (200, [list(range(0, 200, 2)), list(range(200))])):
        x = torch.randn(tokens, d)
        if form == "code":
            jobs, table = code_jobs(d, ffn, routes)
            out, expected = nc.code_ffn(x, jobs, table), nc.code_reference(x, jobs, table)
        else:
            bits = int(form[3:])
            jobs = int_jobs(d, ffn, bits, (4, 2), routes)
            out, expected = nc.int_ffn(x, jobs, bits, dot="float"), nc.int_reference(x, jobs, bits)
        close(out, expected, 1e-4)


def coded_job(gu: torch.Tensor, dn: torch.Tensor, dictionary, chunk: int | None, tokens: list[int], g: torch.Generator):
    """Returns one job of ternary codes gu [2I, D] and dn [D, I] coded with `dictionary`."""
    parts = []
    for codes in (gu, dn):
        lo = (-torch.rand(codes.shape[0], generator=g) * 0.05).half()
        hi = (torch.rand(codes.shape[0], generator=g) * 0.05).half()
        parts.append((*encode(codes, dictionary, chunk), lo, hi))
    return parts[0], parts[1], tokens, torch.rand(len(tokens), generator=g).tolist()


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("chunk", [4, 5, 64])  # 5: a chunk of an odd word count (the pair loop's last word)
@pytest.mark.parametrize("density", [0.115, 0.02])  # 0.02: mostly words of 27 zeros
def test_code_batch_one_paths(bits, chunk, density):
    """The batch-1 path (per-entry masks, two sets of sums) and the row decode of several tokens, on
    rows of many chunks (chunks starting mid-row, rows crossing 16-row blocks), words of length 27,
    a nonzero last column in every other row (a word running past the row's end) and empty rows."""
    g = torch.Generator().manual_seed(bits + chunk)
    d, ffn = 1000, 72
    gu, dn = ternary_codes(2 * ffn, d, density, g), ternary_codes(d, ffn, density, g)
    gu[::2, -1], dn[::2, -1] = HI, LO
    gu[5], dn[9] = ZERO, ZERO
    probs = symbol_probabilities(torch.cat([gu.flatten(), dn.flatten()]))
    dictionary = build_dictionary(probs, bits)
    assert int(nc.code_masks(dictionary.table)[1].max()) == 27  # words of 27 symbols exist
    job = coded_job(gu, dn, dictionary, chunk, [0], g)
    x = torch.randn(3, d, generator=g)
    close(nc.code_ffn(x[:1], [job], dictionary.table), nc.code_reference(x[:1], [job], dictionary.table))
    jobs = [job, coded_job(gu, dn, dictionary, chunk, [0, 1, 2], g)]
    close(nc.code_ffn(x, jobs, dictionary.table, threads=2), nc.code_reference(x, jobs, dictionary.table))


def test_code_masks_follow_their_table():
    """compressed.code_masks: each entry's HI / LO lanes and length, rebuilt when the table changes."""
    table = build_dictionary((0.885, 0.0575, 0.0575), 8).table.clone()
    masks, lengths = nc.code_masks(table)
    nz, hl = table[:, 0].long() & 0xFFFFFFFF, table[:, 1].long() & 0xFFFFFFFF
    m = masks.long() & 0xFFFF
    assert torch.equal(m[:, 0] | (m[:, 1] & 0x7FF) << 16, nz & hl & ((1 << 27) - 1))
    assert torch.equal(m[:, 2] | m[:, 3] << 16, nz & ~hl & ((1 << 27) - 1))
    assert torch.equal(lengths.long(), hl >> 27) and torch.equal(m[:, 1] >> 11, hl >> 27)
    assert nc.code_masks(table)[0] is masks  # kept per table
    table[0, 0] = 1
    table[0, 1] = 1 | 1 << 27
    assert int(nc.code_masks(table)[0][0, 0]) == 1  # rebuilt after the table changed


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_give_their_dtype(dtype):
    d, ffn = 64, 48
    x = torch.randn(5, d).to(dtype)
    jobs = int_jobs(d, ffn, 4, (2, 3), ROUTES[:3])
    out = nc.int_ffn(x, jobs, 4, dot="float")
    assert out.dtype == dtype
    close(out, nc.int_reference(x, jobs, 4), 1e-2)


def test_thread_count_does_not_change_bits():
    d, ffn = 96, 80
    x = torch.randn(5, d)
    jobs = int_jobs(d, ffn, 3, (3, 2), [[0, 1], [1, 2, 3], [4], [0, 4]])
    outs = [nc.int_ffn(x, jobs, 3, threads=t) for t in (1, 2, 3)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    jobs, table = code_jobs(d, ffn, [[0, 1], [1, 2, 3], [4], [0, 4]])
    outs = [nc.code_ffn(x, jobs, table, threads=t) for t in (1, 2, 3)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("form", ["int4", "int2", "code"])
@pytest.mark.parametrize("n", [1, 100, 4100])
def test_stage2_row_blocks_at_every_token_count(form, n):
    """Stage 2 (compressed_layer.h) takes 64 hidden rows an item at one token, 4096 // n rows at n
    tokens, and one row (the accs buffer) past 4096 tokens; d = 200 leaves a partial last block in
    each. int4 in groups that split words (natural layout), int2 one group a row (permuted)."""
    d, ffn = 200, 24
    x = torch.randn(n, d)
    per_job = min(n, 256)
    routes = [[(j * 7 + i) % n for i in range(per_job)] for j in range(max(8, -(-n // per_job)))]
    if form == "code":
        jobs, table = code_jobs(d, ffn, routes)
        outs = [nc.code_ffn(x, jobs, table, threads=t) for t in (1, 3)]
        expected = nc.code_reference(x, jobs, table)
    else:
        bits = int(form[3:])
        jobs = int_jobs(d, ffn, bits, (3, 1) if bits == 4 else (1, 1), routes)
        outs = [nc.int_ffn(x, jobs, bits, threads=t, dot="float") for t in (1, 3)]
        expected = nc.int_reference(x, jobs, bits)
    assert torch.equal(outs[0], outs[1])
    close(outs[0], expected, 1e-4)


def test_no_jobs_gives_zeros_and_out_is_written_in_place():
    x = torch.randn(3, 16)
    out = torch.full_like(x, 7.0)
    assert nc.int_ffn(x, [], 4, out=out) is out and torch.equal(out, torch.zeros_like(x))
    jobs = int_jobs(16, 8, 4, (1, 1), [[1]])
    assert nc.int_ffn(x, jobs, 4, out=out, scratch=nc.Scratch(), dot="float") is out
    close(out, nc.int_reference(x, jobs, 4))


def test_refuses_what_it_cannot_take():
    x = torch.randn(2, 32)
    gu, dn, _, _ = int_jobs(32, 16, 4, (2, 1), [[0]])[0]
    with pytest.raises(ValueError, match="takes"):
        nc.int_ffn(x, [(gu, dn, [0], [1.0])], 5)
    with pytest.raises(ValueError, match="'scale' must be"):
        nc.int_ffn(x, [((gu[0], gu[1].float(), gu[2]), dn, [0], [1.0])], 4)
    with pytest.raises(ValueError, match="shapes"):
        nc.int_ffn(x, [(gu, dn, [0], [1.0])], 2)  # 4-bit words read as 2-bit: the word count differs
    with pytest.raises(ValueError, match="outside x"):
        nc.int_ffn(x, [(gu, dn, [2], [1.0])], 4)
    with pytest.raises(ValueError, match="at most 256 tokens"):
        nc.int_ffn(torch.randn(300, 32), [(gu, dn, list(range(300)), [1.0] * 300)], 4)
    jobs, table = code_jobs(32, 16, [[0]])
    with pytest.raises(ValueError, match="code table"):
        nc.code_ffn(x, jobs, table.long())


def stacked_int(bits: int, d: int, ffn: int, experts: int, groups: tuple[int, int], g: torch.Generator):
    mats = [[int_matrix(rows, cols, bits, p, g) for _ in range(experts)]
            for rows, cols, p in ((2 * ffn, d, groups[0]), (d, ffn, groups[1]))]
    return {f"{kind}.{name}": torch.stack([m[i] for m in per_kind])
            for kind, per_kind in zip(("gate_up", "down"), mats) for i, name in enumerate(("qweight", "scale", "zero"))}


def stacked_code(d: int, ffn: int, experts: int, g: torch.Generator, bits: int = 8):
    codes = {"gate_up": ternary_codes(experts * 2 * ffn, d, 0.2, g).view(experts, 2 * ffn, d),
             "down": ternary_codes(experts * d, ffn, 0.2, g).view(experts, d, ffn)}
    dictionary = build_dictionary(symbol_probabilities(torch.cat([c.flatten() for c in codes.values()])), bits)
    out = {"code_table": dictionary.table}
    for kind, c in codes.items():
        code = encode(c, dictionary)
        rows = c.shape[1]
        out.update({f"{kind}.{name}": t for name, t in code._asdict().items()})
        out[f"{kind}.lo"] = (-torch.rand(experts, rows, generator=g) * 0.05).half()
        out[f"{kind}.hi"] = (torch.rand(experts, rows, generator=g) * 0.05).half()
    return out


def form_and_stack(form_name: str, d: int, ffn: int, experts: int, g: torch.Generator):
    """Returns (a quant.formats stored form, its layer's stacked tensors) of `form_name` (int3, int4,
    int4_g128, ternary) over one layer of random experts: int-4 in whole-word groups (the permuted layout),
    int-3 not, int4_g128 in groups of 128 columns (d and ffn multiples of 128)."""
    from moekit.quant.formats import IntForm, TernaryCodeForm

    if form_name == "ternary":
        stacked = stacked_code(d, ffn, experts, g)
        specs = {n: (tuple(t.shape[1:]), t.dtype) for n, t in stacked.items() if n != "code_table"}
        return TernaryCodeForm(d, ffn, {0: specs}, {0: {"code_table": stacked["code_table"]}}), stacked
    if form_name == "int4_g128":  # compress's default groups: one 16-word block a group
        bits, groups = 4, (d // 128, ffn // 128)
    else:
        bits = int(form_name[3:])
        groups = (3, 1) if bits == 4 else (3, 2)
    stacked = stacked_int(bits, d, ffn, experts, groups, g)
    specs = {n: (tuple(t.shape[1:]), t.dtype) for n, t in stacked.items()}
    return IntForm(d, ffn, {0: specs}, {0: {}}, bits), stacked


def fused_and_planned(form, stacked, x, rows, weights) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (the form's fused CPU call, its PyTorch path) of one layer call; the fused call must run."""
    with torch.no_grad():
        fused = form.fused(x, rows, weights, stacked)
        planned = form.run_planned(x, rows, weights, stacked, grad=False)
    assert fused is not None
    return fused, planned


@pytest.mark.parametrize("form_name", ["int4", "int3", "ternary"])
def test_forms_cpu_path_equals_their_pytorch_path(form_name):
    """quant.formats' CPU fused path (the native kernel) against the form's own PyTorch path
    (decode each matrix, grouped matmuls), on one token and on several sharing experts."""
    g = torch.Generator().manual_seed(4)
    d, ffn, experts = 96, 40, 6
    form, stacked = form_and_stack(form_name, d, ffn, experts, g)
    assert form.cpu_fast and form.why_not_cpu == ""
    for tokens in (1, 5):
        x = torch.randn(tokens, d, generator=g)
        rows = torch.randint(0, experts, (tokens, 2), generator=g)
        rows[:, 1] = (rows[:, 0] + 1) % experts  # two distinct experts per token, shared between tokens
        close(*fused_and_planned(form, stacked, x, rows, torch.rand(tokens, 2, generator=g)), 1e-5)


@pytest.mark.parametrize("form_name", ["int4", "int3", "ternary"])
def test_forms_cpu_path_at_many_tokens(form_name, monkeypatch):
    """The fused CPU path takes every call since prefill went native: 17, 300 and 600 tokens (pieces of
    256) equal the form's PyTorch path to float rounding with float activations; a row twice in every
    token's routes (a job of up to 2 slots a token: pieces of 128) too."""
    monkeypatch.setenv("MOEKIT_CPU_INT_DOT", "float")
    g = torch.Generator().manual_seed(5)
    d, ffn, experts = 96, 40, 6
    form, stacked = form_and_stack(form_name, d, ffn, experts, g)
    for tokens, same_twice in ((17, False), (300, False), (600, False), (200, True)):
        x = torch.randn(tokens, d, generator=g)
        rows = torch.randint(0, experts, (tokens, 2), generator=g)
        if same_twice:  # every token twice on expert 0: one job of 400 slots, past the kernel's 256 a job
            rows.zero_()
        else:
            rows[:, 1] = (rows[:, 0] + 1) % experts
        close(*fused_and_planned(form, stacked, x, rows, torch.rand(tokens, 2, generator=g)), 1e-5)


def test_int4_g128_cpu_path_at_many_tokens_within_the_int8_bound():
    """int4 g128 with the default int8 activations (the four-token pass of the kernel, on AVX-512) at 300
    tokens against the PyTorch path: within test_int_dot's 4% bound, and not equal (the int8 path ran)."""
    g = torch.Generator().manual_seed(6)
    d, ffn, experts = 256, 128, 4
    form, stacked = form_and_stack("int4_g128", d, ffn, experts, g)
    x = torch.randn(300, d, generator=g)
    rows = torch.randint(0, experts, (300, 2), generator=g)
    rows[:, 1] = (rows[:, 0] + 1) % experts
    fused, planned = fused_and_planned(form, stacked, x, rows, torch.rand(300, 2, generator=g))
    error = float((fused - planned).norm() / planned.norm())
    assert 0 < error <= 4e-2, error


@pytest.mark.parametrize("form_name,dot", [("int4", "int8"), ("int4", "float"), ("int3", "float"), ("ternary", None)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_started_form_call_gives_the_bits_of_native_ffn(form_name, dot, dtype, monkeypatch):
    """native_ffn(start=True) (offload.cpu's call on the runner thread) computes exactly what the
    form's synchronous native_ffn computes, for 1 and 5 tokens (bf16 x: the float sum is copied out
    at the wait), and with no jobs gives zeros."""
    if dot is not None:
        monkeypatch.setenv("MOEKIT_CPU_INT_DOT", dot)
    g = torch.Generator().manual_seed(5)
    d, ffn, experts = 96, 40, 6
    form, stacked = form_and_stack(form_name, d, ffn, experts, g)
    scratch = nc.Scratch()
    for tokens in (1, 5):
        x = torch.randn(tokens, d, generator=g).to(dtype)
        jobs = [(form.one(stacked, row), toks, torch.rand(len(toks), generator=g).tolist())
                for row, toks in ((4, [0]), (1, list(range(tokens))), (5, [tokens - 1]))]
        expected = form.native_ffn(x, jobs, threads=2, scratch=scratch)
        out = torch.full_like(x, 3.0)
        started = form.native_ffn(x, jobs, out=out, threads=2, scratch=scratch, start=True)
        assert started.wait() is out and torch.equal(out, expected)
    assert torch.equal(form.native_ffn(x, [], start=True).wait(), torch.zeros_like(x))


def partner_layers(form_name: str, d: int, ffn: int, experts: int, layers: int, g: torch.Generator):
    """Returns [(form, stacked)] of `layers` layers of distinct random experts: int-N as form_and_stack
    makes them ("int4-row": one scale group per row, the permuted layout with padding where d or
    ffn is not a multiple of 8), the ternary code with 8- and 16-bit dictionaries in turn (uint8 and
    int16 codewords: each layer of a compressed checkpoint picks its own)."""
    from moekit.quant.formats import IntForm, TernaryCodeForm

    made = []
    for layer in range(layers):
        if form_name == "ternary":
            stacked = stacked_code(d, ffn, experts, g, bits=(8, 16)[layer % 2])
            specs = {n: (tuple(t.shape[1:]), t.dtype) for n, t in stacked.items() if n != "code_table"}
            made.append((TernaryCodeForm(d, ffn, {0: specs}, {0: {"code_table": stacked["code_table"]}}), stacked))
        elif form_name == "int4-row":
            stacked = stacked_int(4, d, ffn, experts, (1, 1), g)
            specs = {n: (tuple(t.shape[1:]), t.dtype) for n, t in stacked.items()}
            made.append((IntForm(d, ffn, {0: specs}, {0: {}}, 4), stacked))
        else:
            made.append(form_and_stack(form_name, d, ffn, experts, g))
    return made


@pytest.mark.parametrize("form_name,dot,d,ffn", [("int4", "int8", 96, 40), ("int4", "float", 96, 40),
                                                 ("int4-row", "int8", 100, 44), ("int4-row", "float", 100, 44),
                                                 ("int3", "float", 96, 40), ("ternary", None, 96, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_partner_step_gives_the_bits_of_native_ffn(form_name, dot, d, ffn, dtype, monkeypatch):
    """partner.cpp's compressed step (offload.partner's CPU side), run here with the layers posted:
    each layer's sum is what its form's native_ffn computes for its missed experts (routes below E;
    in order of first use, tokens in slot order), for 1 and 3 tokens, every layer its own experts
    (and for the code its own codeword width); a layer with none missed gives zeros; every done
    flag is released. A layer never posted: the step gives up (code 10), zeros the rest, releases all."""
    import ctypes

    if dot is not None:
        monkeypatch.setenv("MOEKIT_CPU_INT_DOT", dot)
    g = torch.Generator().manual_seed(6)
    experts, top_k, layers = 6, 2, 3
    made = partner_layers(form_name, d, ffn, experts, layers, g)
    lib = native.library()
    xcode = {torch.float32: 2, torch.bfloat16: 0}[dtype]
    for tokens in (1, 3):
        slots = tokens * top_k
        plan = nc.PartnerExperts(made[0][0].NATIVE_FORM, made[0][0].bits, d, ffn,
                                 [[form.native_parts(form.one(st, e)) for e in range(experts)] for form, st in made],
                                 [form.host_table(0) for form, _ in made], max_tokens=4, top_k=top_k, threads=2)
        x = torch.randn(layers, tokens, d, generator=g).to(dtype)
        w = torch.rand(layers, slots, generator=g)
        routes = torch.randint(0, experts, (layers, slots), generator=g)
        routes[0, 0] += experts  # cached: the device's
        routes[2] += experts  # none missed
        for posted in (layers, 1):  # every layer, then only the first
            out = torch.full((layers, tokens, d), 7.0, dtype=dtype)
            flags = torch.zeros(2, layers, dtype=torch.int64)
            flags[0, :posted] = seq = 5
            held = [(ctypes.c_int64 * layers)(*[t[i].data_ptr() for i in range(layers)])
                    for t in (x, w, routes, out, flags[0], flags[1])]  # alive until the wait: the runner reads them
            seconds, counts = (ctypes.c_double * layers)(), (ctypes.c_int32 * layers)()
            code = lib.moekit_async_partner_step_compressed(plan.address, xcode, layers, tokens, top_k, experts, d,
                                                            ffn, *held, seq, 0.2, 2, seconds, counts)
            assert code == 0 and lib.moekit_async_wait() == (0 if posted == layers else 10)
            assert flags[1].tolist() == [seq] * layers
            for layer, (form, stacked) in enumerate(made):
                jobs: dict[int, tuple[list[int], list[float]]] = {}
                for s, v in enumerate(routes[layer].tolist()):
                    if v < experts:
                        jobs.setdefault(v, ([], []))[0].append(s // top_k)
                        jobs[v][1].append(w[layer, s].item())
                if jobs and layer < posted:
                    want = form.native_ffn(x[layer], [(form.one(stacked, e), t, ws) for e, (t, ws) in jobs.items()],
                                           threads=2)
                else:
                    want = torch.zeros(tokens, d, dtype=dtype)
                assert torch.equal(out[layer], want), (layer, posted)
                assert counts[layer] == (len(jobs) if layer < posted else 0)


@pytest.mark.parametrize("team", [None, "own", "omp"])
def test_runner_team_gives_the_bits_of_openmp_at_every_thread_count(team, monkeypatch):
    """The runner thread's calls run on its own spinning team (native/team.h; by default the
    compressed forms', MOEKIT_RUNNER_TEAM=own every call's, omp none): calls at 3, 1, 4, 2, 3
    threads in turn (the team grows, shrinks and grows) give exactly the synchronous OpenMP call's
    bits, for int4 with int8 activations (rows of whole 16-word blocks: x and h quantized inside the
    region, behind its barriers) and for bf16 experts; the team's region count says which took it."""
    from moekit.native import library
    from moekit.native.experts import expert_ffn
    from moekit.quant.formats import IntForm

    if team is not None:
        monkeypatch.setenv("MOEKIT_RUNNER_TEAM", team)
    monkeypatch.setenv("MOEKIT_CPU_INT_DOT", "int8")
    lib = library()
    g = torch.Generator().manual_seed(11)
    d, ffn, experts = 256, 128, 6
    stacked = stacked_int(4, d, ffn, experts, (2, 1), g)  # 16-word groups: both matrices on int8 dots
    form = IntForm(d, ffn, {0: {n: (tuple(t.shape[1:]), t.dtype) for n, t in stacked.items()}}, {0: {}}, 4)
    gate_up = torch.randn(experts, 2 * ffn, d, generator=g).to(torch.bfloat16)
    down = torch.randn(experts, d, ffn, generator=g).to(torch.bfloat16)
    scratch = nc.Scratch()
    took = {"int4": 0, "bf16": 0}
    for threads in (3, 1, 4, 2, 3):
        for tokens in (1, 5):
            x = torch.randn(tokens, d, generator=g).to(torch.bfloat16)
            routes = ((4, [0]), (1, list(range(tokens))), (5, [tokens - 1]))
            weights = [torch.rand(len(toks), generator=g).tolist() for _, toks in routes]
            jobs = [(form.one(stacked, row), toks, w) for (row, toks), w in zip(routes, weights)]
            expected = form.native_ffn(x, jobs, threads=threads, scratch=scratch)
            before = lib.moekit_team_regions()
            started = form.native_ffn(x, jobs, out=torch.empty_like(x), threads=threads, scratch=scratch, start=True)
            assert torch.equal(started.wait(), expected), (threads, tokens)
            took["int4"] += lib.moekit_team_regions() - before
            dense = [(gate_up[row], down[row], toks, w) for (row, toks), w in zip(routes, weights)]
            expected = expert_ffn(x, dense, threads=threads)
            before = lib.moekit_team_regions()
            started = expert_ffn(x, dense, out=torch.empty_like(x), threads=threads, start=True)
            assert torch.equal(started.wait(), expected), (threads, tokens)
            took["bf16"] += lib.moekit_team_regions() - before
    multi = 8  # calls of more than one thread, per form
    assert took == {None: {"int4": multi, "bf16": 0}, "own": {"int4": multi, "bf16": multi},
                    "omp": {"int4": 0, "bf16": 0}}[team]
