"""bf16 matrix-vector products of a CPU decode step in one native call (matvec.cpp), and its
reference.

    out = matvec(x, weight, bias)      # x [M, K] bf16, weight [N, K] bf16, M <= MAX_ROWS

Each weight row is read once, dotted with every x row by AVX512-BF16 instructions where the CPU
has them (float32 sums of exact bf16 products), else by the portable float loop. moekit.linear
sends a bf16 model's small CPU projections here (qkv, o-proj, router, lm_head); other dtypes go
to moekit.native.experts.linear.

Shapes: M rows of x (a decode step's tokens), K input features, N output features.
"""

from __future__ import annotations

import ctypes
import threading

import torch

from . import library, register_declarations

MAX_ROWS = 16  # x rows per call (matvec.cpp's MAX_M)


def _declare(lib: ctypes.CDLL) -> None:
    i64, vp = ctypes.c_int64, ctypes.c_void_p
    lib.moekit_matvec_bf16.argtypes = [vp, vp, vp, vp, i64, i64, i64, vp, ctypes.c_int]
    lib.moekit_matvec_bf16.restype = ctypes.c_int
    lib.moekit_matvec_native_bf16.argtypes = []
    lib.moekit_matvec_native_bf16.restype = ctypes.c_int


register_declarations(_declare)

_scratch = threading.local()  # per thread: x in float32 for the portable path (the CPU expert worker calls too)


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Returns whether matvec takes x [M, K] and weight [N, K] on this machine."""
    return (x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and x.device.type == "cpu"
            and weight.device.type == "cpu" and library() is not None)


def native_bf16() -> bool:
    """Returns whether this machine's build multiplies bf16 pairs natively (AVX512-BF16)."""
    lib = library()
    return bool(lib is not None and lib.moekit_matvec_native_bf16())


def matvec(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           threads: int | None = None) -> torch.Tensor:
    """Returns x [M, K] @ weight [N, K]^T (+ bias [N]) as [M, N] bf16, float32 sums.

    x and weight: bf16 CPU tensors, weight contiguous, M <= MAX_ROWS; raises ValueError
    otherwise (check `usable` first)."""
    lib = library()
    m, k = x.shape
    if (lib is None or m > MAX_ROWS or weight.shape[1] != k or not usable(x, weight)
            or not weight.is_contiguous()):
        raise ValueError(f"matvec takes bf16 CPU x [M <= {MAX_ROWS}, K] and a contiguous weight [N, K]; got "
                         f"{list(x.shape)} {x.dtype}, {list(weight.shape)} {weight.dtype}")
    x = x.contiguous()
    n = weight.shape[0]
    out = torch.empty(m, n, dtype=torch.bfloat16)
    b = None if bias is None else bias.detach().float().contiguous()
    xf = getattr(_scratch, "x", None)
    if xf is None or xf.numel() < m * k:
        with torch.inference_mode(False):
            xf = _scratch.x = torch.empty(m * k, dtype=torch.float32)
    lib.moekit_matvec_bf16(x.data_ptr(), weight.data_ptr(), None if b is None else b.data_ptr(), out.data_ptr(),
                           m, n, k, xf.data_ptr(), threads or torch.get_num_threads())
    return out


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Returns what matvec computes, in PyTorch with float32 arithmetic, as [M, N] float32."""
    out = x.float() @ weight.float().T
    return out if bias is None else out + bias.float()
