"""int8 weights for a CPU decode step's dense projections (qkv, o-projection, LM head), run by
dense_q8.cpp with int8 activations and integer dot products; opt-in: $MOEKIT_CPU_DENSE=int8 (or
`moekit generate --device cpu --cpu-quantize-dense int8`), read when the decode step is built.

    matrix = quantized(linear)              # a Q8 copy of linear.weight [N, K], kept per module
    out = matvec_q8(x, matrix, bias)        # x [K] bf16 -> [N] bf16

A row's weights become round(w / scale) + 128 in uint8 with scale = max |w| over the row / 127
(`quantize`; `dequantize` gives back scale * (code - 128)); error per weight <= scale / 2. x is
quantized per call to int8 with a scale per 64 columns (one 64-byte weight block; native/int_dot.h). `reference` computes the
product of the dequantized weights with float x; tests/native/test_dense_q8.py holds the two together
and measures the logits of a model against bf16.

Shapes: N output features, K input features (K % 64 == 0, else the step keeps bf16).
"""

from __future__ import annotations

import ctypes
import os
import weakref

import torch

from ..errors import MoekitError
from ..linear import DENSE_FORMS, quantize_int8_rows  # the decode step's dense weights: as loaded, or int8 rows
from . import library, register_declarations
from .hugepages import advise_huge_pages

BLOCK = 64  # K must be a multiple (16 words of 4 codes: int_dot.h's block)


class _Q8Matrix(ctypes.Structure):
    """dense_q8.cpp's Q8Matrix."""

    _fields_ = [("codes", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("N", ctypes.c_int64), ("K", ctypes.c_int64)]


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


class Q8Matrix:
    """A linear's weight in int8 per row, and the plan dense_q8.cpp reads (`address`)."""

    def __init__(self, weight: torch.Tensor):
        with torch.inference_mode(False):
            self.codes, self.scale = quantize(weight)
        n, k = self.codes.shape
        self.plan = _Q8Matrix(codes=self.codes.data_ptr(), scale=self.scale.data_ptr(), N=n, K=k)
        self.address = ctypes.addressof(self.plan)
        self.shape = (n, k)


# module -> (its weight's data_ptr and version, its Q8Matrix): an LM head takes ~1 s to quantize on
# 2 cores, and generate builds a decode step per call
_made: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def quantized(linear: torch.nn.Module) -> Q8Matrix | None:
    """Returns linear's weight as a Q8Matrix (made once per module and weight), or None where the
    kernel cannot take it (K not a multiple of BLOCK, no native library)."""
    w = linear.weight
    if library() is None or w.dim() != 2 or w.shape[1] % BLOCK != 0 or w.device.type != "cpu":
        return None
    key = (w.data_ptr(), w._version)
    held = _made.get(linear)
    if held is not None and held[0] == key:
        return held[1]
    matrix = Q8Matrix(w)
    _made[linear] = (key, matrix)
    return matrix


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
    out = dequantize(matrix.codes, matrix.scale) @ x.float().view(-1)
    return out if bias is None else out + bias.float()
