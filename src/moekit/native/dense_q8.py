"""int8 or int4 weights for a CPU decode step's dense projections (qkv, o-projection, LM head), run by
dense_q8.cpp with int8 activations and integer dot products; opt-in: $MOEKIT_CPU_DENSE=int8|int4 (or
`moekit generate --device cpu --cpu-quantize-dense int8|int4`), read when the decode step is built.

    matrix = quantized(linear)              # an int8 copy of linear.weight [N, K], kept per module
    matrix = quantized(linear, bits=4)      # an int4 one (groups of 128 columns)
    out = matvec_q8(x, matrix, bias)        # x [K] bf16 -> [N] bf16

int8: a row's weights become round(w / scale) + 128 in uint8 with scale = max |w| over the row / 127
(`quantize`; `dequantize` gives back scale * (code - 128)); error per weight <= scale / 2.
int4: min/max codes 0..15 per group of 128 columns with a float16 scale and a uint8 zero point
(quant.grids.IntGrid(4, 128), the grid `moekit compress --bits 4` rounds to; `quantize_int4`), packed 8
to an int32 word; error per weight <= scale / 2. The form "int4" puts the attention projections in int4
and keeps the LM head in int8: the logits are the most sensitive to it (a one-off float32 simulation, not
kept as a results file: the bundled model's next-token loss on 500 tokens of moekit's own source rose
0.0003 nats with int8 everywhere, 0.009 with int4 attention, 0.026 with an int4 LM head too; llama.cpp's
Q4_K_M also keeps its output matrix at 6 bits). On the bundled
model's decode step int4 attention moves the logits 3.9% (median over 64 positions, 6.3% max; int8 0.8%,
1.1%), the top token the bf16 step's at 63 of 64 for both, and its greedy continuations of three code
prompts part from bf16's after 48, 3 and 38 tokens (int8: 48, 64+, 64+;
benchmarks/probes/cpu_dense_quality.py, results/cpu_dense_int4_quality.json).
x is quantized per call to int8 with a scale per 64-byte weight block (native/int_dot.h). `reference`
computes the product of the dequantized weights with float x; tests/native/test_dense_q8.py holds the
two together and measures the logits of a model against bf16.

Shapes: N output features, K input features (int8: K % 64 == 0, int4: K % 128 == 0; a matrix that does
not divide stays in the next wider form: int4 -> int8 -> bf16).
"""

from __future__ import annotations

import ctypes
import os
import weakref

import torch

from ..errors import MoekitError
from ..linear import quantize_int8_rows
from ..quant.grids import IntGrid, pack_codes
from . import library, register_declarations
from .hugepages import advise_huge_pages

BLOCK = 64  # int8: K must be a multiple (16 words of 4 codes: int_dot.h's block)
INT4_GROUP = 128  # int4: columns a scale group, K must be a multiple (16 words of 8 codes)
DENSE_FORMS = ("bf16", "int8", "int4")  # the CPU decode step's dense weights: as loaded, int8 rows, int4 attention


class _Q8Matrix(ctypes.Structure):
    """dense_q8.cpp's Q8Matrix."""

    _fields_ = [("codes", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("N", ctypes.c_int64), ("K", ctypes.c_int64),
                ("bits", ctypes.c_int64), ("group_scale", ctypes.c_void_p), ("zero", ctypes.c_void_p)]


def _declare(lib: ctypes.CDLL) -> None:
    vp = ctypes.c_void_p
    lib.moekit_matvec_q8.argtypes = [vp, vp, vp, vp, vp, ctypes.c_int]
    lib.moekit_matvec_q8.restype = ctypes.c_int


register_declarations(_declare)


def dense_form(form: str | None = None) -> str:
    """Returns the decode step's dense weights: `form` if given, else $MOEKIT_CPU_DENSE, else "bf16";
    raises MoekitError for anything but DENSE_FORMS."""
    chosen = form or os.environ.get("MOEKIT_CPU_DENSE") or "bf16"
    if chosen not in DENSE_FORMS:
        raise MoekitError(f"the CPU decode step's dense weights must be one of {DENSE_FORMS} ($MOEKIT_CPU_DENSE or "
                         f"--cpu-quantize-dense); got {chosen!r}")
    return chosen


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (codes [N, K] uint8, scale [N] float32) of weight [N, K]: linear.quantize_int8_rows' signed
    codes + 128, the kernel's unsigned layout (scale = max |w| over the row / 127, 1 for a row of zeros).
    The codes sit in 2 MB pages where Linux grants them (hugepages: a decode step streams them)."""
    signed, scale = quantize_int8_rows(weight)
    codes = torch.empty(signed.shape, dtype=torch.uint8)
    advise_huge_pages([codes])  # before the first write
    codes.copy_(signed.to(torch.int16) + 128)
    return codes, scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Returns the float32 weights [N, K] that (codes, scale) stand for."""
    return (codes.float() - 128) * scale[:, None]


def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (words [N, K / 8] int32, scale [N, K / 128] float16, zero [N, K / 128] uint8) of weight
    [N, K] (K % 128 == 0): quant.gptq.rtn_quantize on IntGrid(4, 128), the round-to-nearest codes and
    grid `moekit compress --method rtn --bits 4 --group-size 128` writes, packed as pack_codes does; the words in 2 MB
    pages where Linux grants them."""
    from ..quant.gptq import rtn_quantize

    n, k = weight.shape
    grid = IntGrid(4, INT4_GROUP)
    words = torch.empty(n, k // 8, dtype=torch.int32)
    advise_huge_pages([words])  # before the first write
    scale = torch.empty(n, k // INT4_GROUP, dtype=torch.float16)
    zero = torch.empty(n, k // INT4_GROUP, dtype=torch.uint8)
    for r0 in range(0, n, 4096):  # a float32 copy of 4096 rows at a time, not of the whole matrix
        q = rtn_quantize(weight[None, r0:r0 + 4096].detach(), grid)
        words[r0:r0 + 4096] = pack_codes(q.codes[0], 4)
        scale[r0:r0 + 4096] = q.params[0][0].half()
        zero[r0:r0 + 4096] = q.params[1][0].to(torch.uint8)
    return words, scale, zero


def dequantize_int4(words: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Returns the float32 weights [N, K] that quantize_int4's (words, scale, zero) stand for."""
    from ..quant.grids import dequantize_int, unpack_codes

    return dequantize_int(unpack_codes(words, 4, words.shape[1] * 8), scale, zero)


class Q8Matrix:
    """A linear's weight in int8 per row or int4 in groups (bits), and the plan dense_q8.cpp reads
    (`address`)."""

    def __init__(self, weight: torch.Tensor, bits: int = 8):
        n, k = weight.shape
        with torch.inference_mode(False):
            if bits == 8:
                self.codes, self.scale = quantize(weight)
                self.group_scale = self.zero = None
            else:
                self.codes, self.group_scale, self.zero = quantize_int4(weight)
                self.scale = None
        ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
        self.plan = _Q8Matrix(codes=self.codes.data_ptr(), scale=ptr(self.scale), N=n, K=k, bits=bits,
                              group_scale=ptr(self.group_scale), zero=ptr(self.zero))
        self.address = ctypes.addressof(self.plan)
        self.shape = (n, k)
        self.bits = bits

    def dequantized(self) -> torch.Tensor:
        """Returns the float32 weights [N, K] this matrix stands for."""
        if self.bits == 8:
            return dequantize(self.codes, self.scale)
        return dequantize_int4(self.codes, self.group_scale, self.zero)


# module -> (its weight's data_ptr and version, {bits: its Q8Matrix}): an LM head takes ~1 s to quantize on
# 2 cores, and generate builds a decode step per call
_made: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def quantized(linear: torch.nn.Module, bits: int = 8) -> Q8Matrix | None:
    """Returns linear's weight as a Q8Matrix of `bits` (8 or 4; made once per module, weight and bits),
    int8 where K is not a multiple of INT4_GROUP, or None where the kernel cannot take it at all (K not
    a multiple of BLOCK, no native library)."""
    if bits not in (8, 4):
        raise ValueError(f"quantized: bits must be 8 or 4, got {bits}")
    w = linear.weight
    if library() is None or w.dim() != 2 or w.shape[1] % BLOCK != 0 or w.device.type != "cpu":
        return None
    if bits == 4 and w.shape[1] % INT4_GROUP != 0:
        bits = 8
    key = (w.data_ptr(), w._version)
    made = _made.get(linear)
    if made is None or made[0] != key:  # new weights: the copies of the old ones go, in every form
        made = _made[linear] = (key, {})
    if bits not in made[1]:
        made[1][bits] = Q8Matrix(w, bits)
    return made[1][bits]


def matvec_q8(x: torch.Tensor, matrix: Q8Matrix, bias: torch.Tensor | None = None, threads: int | None = None) -> torch.Tensor:
    """Returns matrix @ x (+ bias) as [N] bf16 for x [K] bf16 (the decode step's call)."""
    n, k = matrix.shape
    x = x.to(torch.bfloat16).contiguous().view(-1)
    if x.numel() != k:
        raise ValueError(f"matvec_q8: x has {x.numel()} features, the matrix {k}")
    out = torch.empty(n, dtype=torch.bfloat16)
    xf = torch.empty(k, dtype=torch.float32)
    b = None if bias is None else bias.detach().float().contiguous()
    code = library().moekit_matvec_q8(matrix.address, x.data_ptr(), None if b is None else b.data_ptr(),
                                      out.data_ptr(), xf.data_ptr(), threads or torch.get_num_threads())
    if code != 0:
        raise ValueError(f"moekit_matvec_q8 refused its arguments (code {code}: see dense_q8.cpp)")
    return out


def reference(x: torch.Tensor, matrix: Q8Matrix, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Returns the dequantized weights times float x (+ bias) as [N] float32: matvec_q8 without the
    activations' int8 rounding."""
    out = matrix.dequantized() @ x.float().view(-1)
    return out if bias is None else out + bias.float()
