"""Routed SwiGLU experts in compressed stored forms on the CPU, decoded inside the matvec
(compressed.cpp), one native call per layer; and their PyTorch references.

    out = int_ffn(x, jobs, bits)        # jobs: [(gate_up parts, down parts, tokens [n], weights [n])]
    out = code_ffn(x, jobs, table)

compute, for every job (an expert and the tokens routed to it),
out[t] += weight * down @ (silu(gate @ x[t]) * (up @ x[t])) with float32 accumulation, where the
matrices stay in their stored form (quant.formats): each packed weight byte is read once per
call and decoded in the thread's cache, for all of the job's tokens.

Parts of one matrix (R rows, K columns; one expert's slices of the stored tensors, each contiguous):
    int-N (bits 2, 3, 4, 8):  (qweight [R, ceil(K / (32 // bits))] int32, scale [R, P] float16,
                               zero [R, P] uint8)
    ternary code:             (codewords [T, W] uint8/int16, starts [T] int16/int32,
                               row_chunks [R] uint8/int16/int32, block_offsets [ceil(R / 16)] int32,
                               lo [R] float16, hi [R] float16), and the layer's table [2^bits, 2] int32
`int_reference` / `code_reference` decode with the forms' own dequantize (quant.grids, quant.code)
and run experts.reference; the tests hold the kernels to them.

Int-N activations (`dot`): "float" dots each decoded weight with the float activations (the
reference's numbers up to float summation order); "int8" quantizes each token's x and each slot's h
once per call to int8 (a scale per 64-byte weight block: 128 columns at int4, 256 at int2, 64 at
int8) and sums code x int8 products in int32, one float multiply per block (int_dot.h:
AVX512-VNNI / AVX-VNNI / AVX2 / scalar, whichever this build has; `int_dot_isa()` says). int8 takes
bits 2, 4, 8 in groups of whole 16-word blocks (int4 g128, as compress writes it) or of 8 words
(int2 g128, int4 g64, int8 g32: two group scales a block, d6a3fe9); other matrices run in float either way. Default: $MOEKIT_CPU_INT_DOT, else "int8" (faster: the 4-layer OLMoE int4
g128 native step on the 2-core Zen 4, 2 threads, 93.9 vs 65.4 tok/s, median of 3 interleaved rounds,
benchmarks/results/bench_cpu_compressed_int8dot_2core_vm.json); not bit-exact: tests/native/test_int_dot.py
states the bound.

Shapes: N tokens, D hidden, I expert ffn width, n tokens of one job.
"""

from __future__ import annotations

import ctypes
import os
import weakref

import torch

from ..errors import MoekitError
from . import library, register_declarations
from .experts import (
    MAX_ROW,
    Routes,
    Scratch,
    Started,
    acc_stride,
    float_ptr,
    no_jobs,
    output_for,
    post,
)

INT_BITS = (2, 3, 4, 8)
INT_DOTS = ("int8", "float")  # int-N activations: int8 with integer dot products, or float
CODE_ROW_BLOCK = 16  # rows per block offset (quant.code.ROW_BLOCK; compressed.cpp assumes it)
CODE_PAD = 32  # floats readable past x and h: the code kernel reads a codeword's 32 columns at once

Parts = tuple[torch.Tensor, ...]
Job = tuple[Parts, Parts, list[int], list[float]]


def _declare(lib: ctypes.CDLL) -> None:
    i64, i32p, i64p, f32p = ctypes.c_int64, ctypes.POINTER(ctypes.c_int32), ctypes.POINTER(ctypes.c_int64), \
        ctypes.POINTER(ctypes.c_float)
    lib.moekit_int_ffn.argtypes = [ctypes.c_int, f32p, f32p, i64, i64, i64, i64, i64p, i64, i64, ctypes.c_int, i32p,
                                   i32p, f32p, f32p, f32p, ctypes.c_int, ctypes.c_int]
    lib.moekit_int_ffn.restype = ctypes.c_int
    lib.moekit_int_dot_isa.argtypes = []
    lib.moekit_int_dot_isa.restype = ctypes.c_char_p
    lib.moekit_code_ffn.argtypes = [f32p, f32p, i64, i64, i64, i64, i64p, i32p, ctypes.c_void_p, ctypes.c_void_p,
                                    ctypes.c_int, i64p, i32p, i32p, f32p, f32p, f32p, ctypes.c_int]
    lib.moekit_code_ffn.restype = ctypes.c_int
    for name in ("int_ffn", "code_ffn"):  # async_runner.cpp: the same arguments, posted to the runner thread
        getattr(lib, f"moekit_async_{name}").argtypes = getattr(lib, f"moekit_{name}").argtypes
        getattr(lib, f"moekit_async_{name}").restype = ctypes.c_int


register_declarations(_declare)


def int_dot(dot: str | None = None) -> str:
    """Returns the int-N activations to use: `dot` if given, else $MOEKIT_CPU_INT_DOT, else "int8"
    (the module docstring); raises MoekitError for anything but INT_DOTS."""
    chosen = dot or os.environ.get("MOEKIT_CPU_INT_DOT") or "int8"
    if chosen not in INT_DOTS:
        raise MoekitError(f"int-N activations must be one of {INT_DOTS} (the dot argument or $MOEKIT_CPU_INT_DOT); "
                         f"got {chosen!r}")
    return chosen


def int_dot_isa() -> str:
    """Returns the instruction set of the int8 dot products on this build ('avx512-vnni', 'avx-vnni',
    'avx2' or 'scalar'), or '' without the native library."""
    lib = library()
    return lib.moekit_int_dot_isa().decode() if lib is not None else ""


def usable(x: torch.Tensor) -> bool:
    """Returns whether the compressed-expert kernels take x [N, D] on this machine (CPU, a float
    dtype, a compiler)."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and x.shape[-1] <= MAX_ROW and library() is not None)


def _check_parts(parts: Parts, kinds: tuple[tuple[str, tuple[torch.dtype, ...]], ...], what: str) -> None:
    for t, (name, dtypes) in zip(parts, kinds):
        if t.device.type != "cpu" or not t.is_contiguous() or t.dtype not in dtypes:
            raise ValueError(f"{what}: '{name}' must be a contiguous CPU tensor of {[str(d) for d in dtypes]}; "
                             f"got {t.dtype} on {t.device}{'' if t.is_contiguous() else ', not contiguous'}")


def _run(x: torch.Tensor, jobs: list[Job], out: torch.Tensor | None, threads: int | None, scratch: Scratch | None,
         call, pad: int = 0, start: bool = False) -> torch.Tensor | Started:
    """Checks the routes, converts x to float32 (followed by `pad` readable floats), calls
    `call(lib, xf, outf, n, starts, tokens, weights, scratch, slots, accs, threads)` (with start:
    `call(..., threads, post)`, which posts the call through `post`) and returns out in x's dtype,
    or with start its Started."""
    lib = library()
    if lib is None:
        from . import unavailable_reason

        raise ValueError(f"the CPU compressed-expert kernels are unavailable: {unavailable_reason()}")
    n, d = x.shape
    out = output_for(x, out)
    if not jobs:
        return no_jobs(out, start)
    routes = Routes(jobs, n)
    threads = threads or torch.get_num_threads()
    scratch = scratch or Scratch()
    if x.dtype == torch.float32 and not pad:
        xf = x.contiguous()
    else:
        xf = scratch.get("x", n * d + pad)[:n * d].view(n, d).copy_(x)
    outf = out if out.dtype == torch.float32 else scratch.get("out", n * d)[:n * d].view(n, d)
    accs = scratch.get("acc", threads * acc_stride(n))
    refusal = "the CPU compressed-expert kernel refused its arguments (code {code}: see compressed.cpp)"
    finish = None if outf is out else (lambda: out.copy_(outf))
    if start:  # the call's closure holds its pointer arrays and tables; the scratch's tensors, its buffers

        def posted(entry, *args):
            return post(entry, *args, keep=(x, xf, outf, out, routes, call, jobs, *scratch.buffers.values()),
                        out=out, refusal=refusal, finish=finish)

        return call(lib, xf, float_ptr(outf), n, routes.starts, routes.tokens, routes.weights, scratch, routes.slots,
                    accs, threads, posted)
    code = call(lib, xf, float_ptr(outf), n, routes.starts, routes.tokens, routes.weights, scratch, routes.slots, accs,
                threads)
    if code != 0:
        raise ValueError(refusal.format(code=code))
    if finish is not None:
        finish()
    return out


def _permuted(xf: torch.Tensor, cols: int, per_word: int, scratch: Scratch) -> torch.Tensor:
    """Returns xf [n, cols] as [n, words * per_word] in the int kernel's permuted layout: column
    w * per_word + i at i * words + w, zeros past cols."""
    n, words = xf.shape[0], -(-cols // per_word)
    out = scratch.get("x_permuted", n * words * per_word)[:n * words * per_word].view(n, per_word, words)
    padded = torch.nn.functional.pad(xf, (0, words * per_word - cols)) if words * per_word != cols else xf
    out.copy_(padded.view(n, words, per_word).transpose(1, 2))
    return out


def int_ffn(x: torch.Tensor, jobs: list[Job], bits: int, out: torch.Tensor | None = None, threads: int | None = None,
            scratch: Scratch | None = None, dot: str | None = None, start: bool = False) -> torch.Tensor | Started:
    """Returns out [N, D] (x's dtype): the weighted sum over jobs of their int-`bits` expert on
    their tokens. A job's parts: (qweight, scale, zero) of gate_up [2I, D] and of down [D, I].
    dot: "int8" or "float" activations (int_dot). start=True: a Started whose wait() returns out
    (native.experts.expert_ffn says what it holds). Raises ValueError for arguments the kernel cannot take."""
    int8 = int(int_dot(dot) == "int8")
    if bits not in INT_BITS:
        raise ValueError(f"the CPU int kernel takes {INT_BITS}-bit codes, got {bits}")
    d = x.shape[1]
    if not jobs:
        return _run(x, jobs, out, threads, scratch, None, start=start)
    per_word = 32 // bits
    ffn = jobs[0][0][1].shape[0] // 2
    groups = (jobs[0][0][1].shape[1], jobs[0][1][1].shape[1])
    dtypes = (("qweight", (torch.int32,)), ("scale", (torch.float16,)), ("zero", (torch.uint8,)))
    ptrs = []
    for gate_up, down, _, _ in jobs:
        for parts, rows, cols, p in ((gate_up, 2 * ffn, d, groups[0]), (down, d, ffn, groups[1])):
            _check_parts(parts, dtypes, "int expert")
            want = ((rows, -(-cols // per_word)), (rows, p), (rows, p))
            if tuple(tuple(t.shape) for t in parts) != want:
                raise ValueError(f"int expert parts must have shapes {want} (hidden {d}, ffn {ffn}); "
                                 f"got {[tuple(t.shape) for t in parts]}")
            ptrs.extend(t.data_ptr() for t in parts)
    if max(d, ffn) > MAX_ROW:
        raise ValueError(f"the CPU int kernel takes rows of at most {MAX_ROW}; got hidden {d}, ffn {ffn}")
    ptr_arr = (ctypes.c_int64 * len(ptrs))(*ptrs)
    # groups of whole words (or one per row): the permuted layout (compressed.cpp, IntRows)
    permuted = all(p == 1 or -(-cols // p) % per_word == 0 for p, cols in zip(groups, (d, ffn)))

    def call(lib, xf, outf, n, starts, tokens, weights, scratch, slots, accs, threads, posted=None):
        h_cols = -(-ffn // per_word) * per_word if permuted else ffn
        h = scratch.get("h", slots * h_cols)
        if permuted:
            h[:slots * h_cols].zero_()  # the last word's padding lanes stay zero
            xf = _permuted(xf, d, per_word, scratch)
        args = (bits, float_ptr(xf), outf, n, d, ffn, len(jobs), ptr_arr, groups[0], groups[1], int(permuted), starts,
                tokens, weights, float_ptr(h), float_ptr(accs), threads, int8)
        return lib.moekit_int_ffn(*args) if posted is None else posted(lib.moekit_async_int_ffn, *args)

    return _run(x, jobs, out, threads, scratch, call, start=start)


def _code_fits(parts: Parts, rows: int) -> bool:
    """Whether one matrix's ternary-code parts (codewords, starts, row_chunks, block_offsets, lo, hi)
    fit together as a `rows`-row matrix."""
    words, starts, row_chunks, offsets, lo, hi = parts
    return (words.dim() == 2 and starts.shape == words.shape[:1] and row_chunks.shape == (rows,)
            and offsets.shape == (-(-rows // CODE_ROW_BLOCK),) and lo.shape == (rows,) and hi.shape == (rows,))


# id(table) -> (a weak reference to it, its version, its code_masks); tensors cannot be the keys of a
# WeakKeyDictionary (their == is elementwise)
_masks_of: dict[int, tuple[weakref.ref, int, tuple[torch.Tensor, torch.Tensor]]] = {}


def _forget(key: int, ref: weakref.ref) -> None:
    if key in _masks_of and _masks_of[key][0] is ref:
        del _masks_of[key]


def code_masks(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (masks [2^bits, 4] int16, lengths [2^bits] uint8) of a decode table [2^bits, 2]
    int32: per entry the HI symbols' lanes 0-15, lanes 16-26 | length << 11, the LO symbols' lanes
    0-15 and 16-26 (bit l of a mask: symbol l of the word, or 16 + l), and its length; what
    compressed.cpp loads into mask registers at batch 1 (one 8-byte entry per word). Kept per table
    tensor (a layer's table is built once), rebuilt when the table changes."""
    held = _masks_of.get(id(table))
    if held is not None and held[0]() is table and held[1] == table._version:
        return held[2]
    entries = table.to(torch.int64) & 0xFFFFFFFF  # [2^bits, 2]
    nonzero, hl = entries[:, 0] & ((1 << 27) - 1), entries[:, 1]
    his = nonzero & hl
    los = nonzero & ~his
    lengths = (hl >> 27) & 31
    masks = torch.stack([his & 0xFFFF, his >> 16 | lengths << 11, los & 0xFFFF, los >> 16], dim=1)  # [2^bits, 4]
    masks = torch.where(masks >= 1 << 15, masks - (1 << 16), masks).to(torch.int16).contiguous()
    lengths = lengths.to(torch.uint8).contiguous()
    key = id(table)
    _masks_of[key] = (weakref.ref(table, lambda ref: _forget(key, ref)), table._version, (masks, lengths))
    return masks, lengths


def code_ffn(x: torch.Tensor, jobs: list[Job], table: torch.Tensor, out: torch.Tensor | None = None,
             threads: int | None = None, scratch: Scratch | None = None, start: bool = False) -> torch.Tensor | Started:
    """Returns out [N, D] (x's dtype): the weighted sum over jobs of their ternary-code expert on
    their tokens. A job's parts: (codewords, starts, row_chunks, block_offsets, lo, hi) of gate_up
    [2I, D] and of down [D, I]; table [2^bits, 2] int32 is the layer's dictionary. start=True: a
    Started, as int_ffn's. Raises ValueError for arguments the kernel cannot take."""
    d = x.shape[1]
    if not jobs:
        return _run(x, jobs, out, threads, scratch, None, start=start)
    ffn = jobs[0][0][2].shape[0] // 2
    table = table.contiguous()
    if table.dtype != torch.int32 or table.device.type != "cpu" or table.dim() != 2 or table.shape[1] != 2:
        raise ValueError(f"the code table must be a CPU int32 [2^bits, 2] tensor; got {table.dtype} "
                         f"{list(table.shape)} on {table.device}")
    word_dtype = jobs[0][0][0].dtype
    if word_dtype not in (torch.uint8, torch.int16):
        raise ValueError(f"codewords must be uint8 or int16; got {word_dtype}")
    index = (torch.int16, torch.int32)
    dtypes = (("codewords", (word_dtype,)), ("starts", index), ("row_chunks", (torch.uint8, *index)),
              ("block_offsets", (torch.int32,)), ("lo", (torch.float16,)), ("hi", (torch.float16,)))
    sizes, ptrs = [], []
    for gate_up, down, _, _ in jobs:
        for parts, rows in ((gate_up, 2 * ffn), (down, d)):
            _check_parts(parts, dtypes, "ternary-code expert")
            words, starts, row_chunks = parts[:3]
            if not _code_fits(parts, rows):
                raise ValueError(f"ternary-code expert parts of a {rows}-row matrix do not fit together: "
                                 f"{[tuple(t.shape) for t in parts]} (hidden {d}, ffn {ffn})")
            sizes.extend((words.shape[1], starts.element_size(), row_chunks.element_size()))
            ptrs.extend(t.data_ptr() for t in parts)
    if max(d, ffn) > MAX_ROW:
        raise ValueError(f"the CPU code kernel takes rows of at most {MAX_ROW}; got hidden {d}, ffn {ffn}")
    ptr_arr = (ctypes.c_int64 * len(ptrs))(*ptrs)
    size_arr = (ctypes.c_int64 * len(sizes))(*sizes)
    masks, lengths = code_masks(table)

    def call(lib, xf, outf, n, starts, tokens, weights, scratch, slots, accs, threads, posted=None):
        h = scratch.get("h", slots * ffn + CODE_PAD)
        table_ptr = ctypes.cast(table.data_ptr(), ctypes.POINTER(ctypes.c_int32))  # the closure holds table
        args = (float_ptr(xf), outf, n, d, ffn, len(jobs), ptr_arr, table_ptr, masks.data_ptr(), lengths.data_ptr(),
                word_dtype.itemsize, size_arr, starts, tokens, weights, float_ptr(h), float_ptr(accs), threads)
        return lib.moekit_code_ffn(*args) if posted is None else posted(lib.moekit_async_code_ffn, *args)

    return _run(x, jobs, out, threads, scratch, call, pad=CODE_PAD, start=start)


def stored_bytes(jobs: list[Job]) -> int:
    """Returns the bytes of the jobs' stored tensors (what one call reads from memory)."""
    return sum(t.numel() * t.element_size() for gate_up, down, _, _ in jobs for t in (*gate_up, *down))


def int_reference(x: torch.Tensor, jobs: list[Job], bits: int) -> torch.Tensor:
    """Returns what int_ffn computes, as [N, D] float32: each matrix decoded by the int form's
    dequantize (quant.grids), then experts.reference."""
    from ..quant.grids import dequantize_int, unpack_codes
    from .experts import reference

    def weight(parts: Parts, cols: int) -> torch.Tensor:
        qweight, scale, zero = parts
        return dequantize_int(unpack_codes(qweight, bits, cols), scale, zero)

    d = x.shape[1]
    ffn = jobs[0][0][0].shape[0] // 2 if jobs else 0
    return reference(x, [(weight(g, d), weight(dn, ffn), t, w) for g, dn, t, w in jobs])


def code_reference(x: torch.Tensor, jobs: list[Job], table: torch.Tensor) -> torch.Tensor:
    """Returns what code_ffn computes, as [N, D] float32: each matrix decoded by quant.code.decode
    and dequantize_ternary, then experts.reference."""
    from ..quant.code import decode
    from ..quant.grids import dequantize_ternary
    from .experts import reference

    def weight(parts: Parts, cols: int) -> torch.Tensor:
        words, starts, row_chunks, offsets, lo, hi = parts
        codes = decode(words, starts, row_chunks, offsets, table, cols)
        return dequantize_ternary(codes, lo[:, None], hi[:, None])

    d = x.shape[1]
    ffn = jobs[0][0][2].shape[0] // 2 if jobs else 0
    return reference(x, [(weight(g, d), weight(dn, ffn), t, w) for g, dn, t, w in jobs])


# ---- one token's layer inside the native decode step (decode.py) ---------------------------------

class _DecodeExpertsPlan(ctypes.Structure):
    """compressed.cpp's DecodeExperts: one layer's stored tensors as (address, bytes per expert),
    and the buffers of one token's call."""

    _fields_ = [("form", ctypes.c_int32), ("bits", ctypes.c_int32), ("permuted", ctypes.c_int32),
                ("word_bytes", ctypes.c_int32), ("D", ctypes.c_int64), ("I", ctypes.c_int64),
                ("groups", ctypes.c_int64 * 2), ("tensors", ctypes.c_int64), ("base", ctypes.c_int64 * 12),
                ("stride", ctypes.c_int64 * 12), ("sizes", ctypes.c_int64 * 6), ("table", ctypes.c_void_p),
                ("masks", ctypes.c_void_p), ("lengths", ctypes.c_void_p), ("xf", ctypes.c_void_p),
                ("h", ctypes.c_void_p), ("h_floats", ctypes.c_int64), ("accs", ctypes.c_void_p),
                ("outf", ctypes.c_void_p), ("ptrs", ctypes.c_void_p), ("job_sizes", ctypes.c_void_p),
                ("tok_start", ctypes.c_void_p), ("tok", ctypes.c_void_p), ("int8_dot", ctypes.c_int32)]


def _declare_decode(lib: ctypes.CDLL) -> None:
    vp = ctypes.c_void_p
    lib.moekit_compressed_moe_decode.argtypes = [vp, vp, vp, vp, ctypes.c_int64, vp, ctypes.c_int]
    lib.moekit_compressed_moe_decode.restype = ctypes.c_int


register_declarations(_declare_decode)

NATIVE_INT, NATIVE_CODE = 1, 2  # a CompressedForm's NATIVE_FORM: the stored layout the decode step reads
_INT_KINDS = (("qweight", (torch.int32,)), ("scale", (torch.float16,)), ("zero", (torch.uint8,)))
_CODE_KINDS = (("codewords", (torch.uint8, torch.int16)), ("starts", (torch.int16, torch.int32)),
               ("row_chunks", (torch.uint8, torch.int16, torch.int32)), ("block_offsets", (torch.int32,)),
               ("lo", (torch.float16,)), ("hi", (torch.float16,)))


def _stored(experts) -> tuple[int, list[torch.Tensor]] | str:
    """Returns (form code 1 int-N / 2 ternary code, the stacked tensors in the kernels' ptrs order)
    of resident CompressedExperts, or why the decode step cannot read them."""
    form = getattr(experts.form, "NATIVE_FORM", 0)  # the form says what it is (no import of quant.formats here)
    if form == NATIVE_INT and experts.bits in INT_BITS:
        code, kinds = 1, _INT_KINDS
    elif form == NATIVE_CODE:
        code, kinds = 2, _CODE_KINDS
    else:
        return f"compressed experts of form {experts.form.name}"
    stored = experts.stored()
    tensors = [stored[f"{kind}.{name}"] for kind in ("gate_up", "down") for name, _ in kinds]
    dtypes = [d for _, d in kinds] * 2
    if any(t.device.type != "cpu" or not t.is_contiguous() or t.dtype not in d for t, d in zip(tensors, dtypes)):
        return "compressed expert tensors that are not contiguous CPU tensors of the kernels' dtypes"
    if code == 2 and (tensors[0].dtype != tensors[6].dtype or stored["code_table"].dtype != torch.int32):
        return "a ternary code whose gate_up and down codewords differ in dtype, or a table that is not int32"
    if max(experts.hidden, experts.ffn) > MAX_ROW:
        return f"compressed experts wider than {MAX_ROW}"
    return code, tensors


def decode_unsupported(experts) -> str | None:
    """Returns why DecodeExperts cannot run this layer's CompressedExperts, or None."""
    got = _stored(experts)
    return got if isinstance(got, str) else None


def _hold(keep: list[torch.Tensor], values: int | list[int], dtype: torch.dtype) -> int:
    """Returns the address of a new tensor that `keep` holds for as long as the plan using it: `values`
    zeros for an int (zeros: the code's pad past x reads as 0), else those values. Made outside
    inference mode (a plan outlives the call that built it)."""
    with torch.inference_mode(False):
        if isinstance(values, int):
            t = torch.zeros(max(values, 1), dtype=dtype)
        else:
            t = torch.tensor(values or [0], dtype=dtype)
    keep.append(t)
    return t.data_ptr()


class DecodeExperts:
    """One layer's resident CompressedExperts for one token of the native decode step: the plan
    compressed.cpp's moekit_compressed_moe_decode reads (`plan`, its address `address`), with its
    buffers for top_k experts. The call is the one int_ffn / code_ffn make for one token (same jobs,
    same order, same float x, the same int-N activations `dot`: int_dot), so the bits agree with
    CompressedExperts.forward on the CPU."""

    def __init__(self, experts, top_k: int, threads: int, dot: str | None = None):
        got = _stored(experts)
        if isinstance(got, str):
            raise ValueError(f"the native decode step cannot read these experts: {got}")  # noqa: TRY004 -- unsupported values, not a wrong type
        form, tensors = got
        d, ffn = experts.hidden, experts.ffn
        plan = self.plan = _DecodeExpertsPlan(form=form, D=d, I=ffn, tensors=len(tensors))
        for i, t in enumerate(tensors):
            plan.base[i], plan.stride[i] = t.data_ptr(), t.stride(0) * t.element_size()
        self.keep: list[torch.Tensor] = list(tensors)
        if form == 1:
            bits = plan.bits = experts.bits
            per_word = 32 // bits
            groups = (tensors[1].shape[2], tensors[4].shape[2])
            plan.groups[0], plan.groups[1] = groups
            permuted = all(p == 1 or -(-cols // p) % per_word == 0 for p, cols in zip(groups, (d, ffn)))
            plan.permuted = int(permuted)
            plan.int8_dot = int(int_dot(dot) == "int8")
            x_floats, h_floats = d, top_k * ffn
            if permuted:  # rows of whole words
                x_floats, h_floats = -(-d // per_word) * per_word, top_k * -(-ffn // per_word) * per_word
            plan.h_floats = h_floats if permuted else 0
        else:
            table = experts.stored()["code_table"].contiguous()
            masks, lengths = code_masks(table)
            self.keep += [table, masks, lengths]
            plan.table, plan.masks, plan.lengths = table.data_ptr(), masks.data_ptr(), lengths.data_ptr()
            plan.word_bytes = tensors[0].element_size()
            for k, (words, starts, row_chunks) in enumerate(((tensors[0], tensors[1], tensors[2]),
                                                              (tensors[6], tensors[7], tensors[8]))):
                plan.sizes[3 * k:3 * k + 3] = (words.shape[2], starts.element_size(), row_chunks.element_size())
            x_floats, h_floats = d + CODE_PAD, top_k * ffn + CODE_PAD
        plan.xf = _hold(self.keep, x_floats, torch.float32)
        plan.h = _hold(self.keep, h_floats, torch.float32)
        plan.accs = _hold(self.keep, threads * acc_stride(1), torch.float32)
        plan.outf = _hold(self.keep, d, torch.float32)
        plan.ptrs = _hold(self.keep, top_k * len(tensors), torch.int64)
        plan.job_sizes = _hold(self.keep, top_k * 6, torch.int64)
        plan.tok_start = _hold(self.keep, top_k + 1, torch.int32)
        plan.tok = _hold(self.keep, top_k, torch.int32)
        self.address = ctypes.addressof(plan)



# ---- every layer's experts for the CPU partner's step (offload.partner, partner.cpp) ---------------

class _PartnerPlan(ctypes.Structure):
    """partner.cpp's CompressedPartner: where each layer's experts lie in the host store, and the
    buffers of one step."""

    _fields_ = [("form", ctypes.c_int32), ("bits", ctypes.c_int32), ("permuted", ctypes.c_int32),
                ("int8_dot", ctypes.c_int32), ("groups", ctypes.c_int64 * 2), ("tensors", ctypes.c_int64),
                ("expert_ptrs", ctypes.c_void_p),
                ("sizes", ctypes.c_void_p), ("tables", ctypes.c_void_p), ("masks", ctypes.c_void_p),
                ("lengths", ctypes.c_void_p), ("xf", ctypes.c_void_p), ("x_width", ctypes.c_int64),
                ("h", ctypes.c_void_p), ("h_width", ctypes.c_int64), ("outf", ctypes.c_void_p),
                ("accs", ctypes.c_void_p), ("ptrs", ctypes.c_void_p), ("job_sizes", ctypes.c_void_p)]


def _declare_partner(lib: ctypes.CDLL) -> None:
    i64, p64, dbl = ctypes.c_int64, ctypes.POINTER(ctypes.c_int64), ctypes.c_double
    lib.moekit_async_partner_step_compressed.argtypes = [
        ctypes.c_void_p, ctypes.c_int, i64, i64, i64, i64, i64, i64, p64, p64, p64, p64, p64, p64, i64, dbl,
        ctypes.c_int, ctypes.POINTER(dbl), ctypes.POINTER(ctypes.c_int32)]
    lib.moekit_async_partner_step_compressed.restype = ctypes.c_int


register_declarations(_declare_partner)


class PartnerExperts:
    """Every MoE layer's experts in a compressed form as partner.cpp's moekit_partner_step_compressed
    reads them: per (layer, expert) the addresses of its stored tensors in int_ffn's / code_ffn's
    order, per layer the code's table (in host memory) and job sizes, and the buffers of a step of
    up to `max_tokens` tokens. The call it makes per layer is the one int_ffn / code_ffn make for
    the same tokens and jobs (the same x, h and int-N activations `dot`): the same bits.

    `layers[l][e]`: (gate_up parts, down parts) of expert e of layer l, as a job of int_ffn /
    code_ffn takes them; `tables[l]`: layer l's code table (a CPU int32 [2^bits, 2]; None for int-N).
    Raises ValueError where the kernels cannot take them."""

    def __init__(self, form_code: int, bits: int | None, hidden: int, ffn: int, layers: list[list[tuple[Parts, Parts]]],
                 tables: list[torch.Tensor | None], max_tokens: int, top_k: int, threads: int, dot: str | None = None):
        if (library() is None or form_code not in (NATIVE_INT, NATIVE_CODE)
                or (form_code == NATIVE_INT and bits not in INT_BITS)):
            raise ValueError(f"the CPU partner's native step takes int-N ({INT_BITS} bits) or ternary-code experts")
        if max(hidden, ffn) > MAX_ROW:
            raise ValueError(f"the CPU partner's native step takes rows of at most {MAX_ROW}; got {hidden}, {ffn}")
        d, slots = hidden, max_tokens * top_k
        kinds = _INT_KINDS if form_code == NATIVE_INT else _CODE_KINDS
        plan = self.plan = _PartnerPlan(form=form_code, tensors=2 * len(kinds))
        self.keep: list[torch.Tensor] = []
        ptrs, sizes = [], []
        groups = (layers[0][0][0][1].shape[1], layers[0][0][1][1].shape[1]) if form_code == NATIVE_INT else (0, 0)
        for l, experts in enumerate(layers):
            layer_sizes = None
            for gate_up, down in experts:
                for parts, rows, cols, p in ((gate_up, 2 * ffn, d, groups[0]), (down, d, ffn, groups[1])):
                    _check_parts(parts, kinds, "a CPU partner's expert")
                    if form_code == NATIVE_INT:
                        want = [(rows, -(-cols // (32 // bits))), (rows, p), (rows, p)]
                        fits = [tuple(t.shape) for t in parts] == want
                    else:
                        fits = _code_fits(parts, rows)
                    if not fits:
                        raise ValueError(f"a CPU partner's expert parts do not fit a {rows} x {cols} matrix: "
                                         f"{[tuple(t.shape) for t in parts]}")
                    ptrs.extend(t.data_ptr() for t in parts)
                if form_code == NATIVE_CODE:  # a layer's job sizes, then its codeword bytes (layers may differ)
                    mine = [v for parts in (gate_up, down)
                            for v in (parts[0].shape[1], parts[1].element_size(), parts[2].element_size())]
                    mine.append(gate_up[0].element_size())
                    if layer_sizes not in (None, mine) or down[0].dtype != gate_up[0].dtype:
                        raise ValueError(f"layer {l}'s ternary-code experts differ in their codeword layout")
                    layer_sizes = mine
            if form_code == NATIVE_CODE:
                sizes.extend(layer_sizes)
        plan.expert_ptrs = _hold(self.keep, ptrs, torch.int64)
        if form_code == NATIVE_INT:
            per_word = 32 // bits
            permuted = all(p == 1 or -(-cols // p) % per_word == 0 for p, cols in zip(groups, (d, ffn)))
            plan.bits, plan.permuted, plan.int8_dot = bits, int(permuted), int(int_dot(dot) == "int8")
            plan.groups[0], plan.groups[1] = groups
            plan.x_width = -(-d // per_word) * per_word if permuted else d
            plan.h_width = -(-ffn // per_word) * per_word if permuted else ffn
        else:
            if any(t is None or t.device.type != "cpu" or t.dtype != torch.int32 or t.dim() != 2 or t.shape[1] != 2
                   for t in tables):
                raise ValueError("the CPU partner's code tables must be CPU int32 [2^bits, 2] tensors, one a layer")
            held = [t.contiguous() for t in tables]
            masks = [code_masks(t) for t in held]
            self.keep += held + [m for pair in masks for m in pair]
            plan.tables = _hold(self.keep, [t.data_ptr() for t in held], torch.int64)
            plan.masks = _hold(self.keep, [m.data_ptr() for m, _ in masks], torch.int64)
            plan.lengths = _hold(self.keep, [n.data_ptr() for _, n in masks], torch.int64)
            plan.sizes = _hold(self.keep, sizes, torch.int64)  # [L * 7]
            plan.x_width, plan.h_width = d, ffn
        plan.xf = _hold(self.keep, max_tokens * plan.x_width + CODE_PAD, torch.float32)
        plan.h = _hold(self.keep, slots * plan.h_width + CODE_PAD, torch.float32)
        plan.outf = _hold(self.keep, max_tokens * d, torch.float32)
        plan.accs = _hold(self.keep, threads * acc_stride(max_tokens), torch.float32)
        plan.ptrs = _hold(self.keep, slots * plan.tensors, torch.int64)
        plan.job_sizes = _hold(self.keep, slots * 6, torch.int64)
        self.address = ctypes.addressof(plan)
