"""The model's projections: nn.Linear, with small bf16/fp16 calls on the CPU run by the native
kernels (bf16: moekit.native.matvec; fp16: moekit.native.experts.linear) and, on an sm_90 GPU, the
few-row calls of shapes DECODE_TUNED lists run by the Triton decode matvec (moekit.kernels.decode_linear).

Why (CPU): a decode step on a CPU multiplies a few rows by each weight matrix, so its time is the
weights' bytes over the host's memory bandwidth. In a profile of a bf16 decode step of the OLMoE
shape on the 2-core test machine (taken while other work shared the cores), PyTorch's bf16 matmul
took 71% of the step; the native kernel streams each row once with all cores (the 4-layer shape:
3.97 vs 1.69 tok/s). Float32, calls of more than native.experts.kernel_tokens rows (prefill: compute-bound,
where PyTorch's GEMMs win, unless bf16 has no hardware support) and anything autograd must see take F.linear. Same parameters and state
dict as nn.Linear.

Why (GPU, issues 12 and 15): at batch 1 a projection is a matvec at the HBM bound, and cuBLAS's
GEMM tiles (64 output rows a CTA, split-K and its reduce kernel) were measured at ~2.2 TB/s on an
H200 in a CUDA-graph decode step; the per-slot expert matvecs stream similar matrices at 2.4-3.9.
cuBLAS stays the default: the kernel runs only where benchmarks/probes/probe_decode_linear.py
measured it faster on the H200, for 1..DECODE_MAX_ROWS rows.

Shapes: M = rows (tokens), N = out_features, K = in_features.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn

from .errors import MoekitError
from .native.experts import MAX_JOB_TOKENS, kernel_tokens, linear, usable
from .native.matvec import MAX_ROWS, matvec

try:
    import triton

    from .kernels.decode_linear import decode_linear_kernel, decode_linear_reduce_kernel
    HAVE_TRITON = True
except ImportError:  # CPU machines without triton: F.linear
    HAVE_TRITON = False

_NATIVE_DTYPES = (torch.bfloat16, torch.float16)
DECODE_MAX_ROWS = 4  # rows the decode matvec takes: it reads the weights once for all of them
# with int8 weights (Int8Linear) up to 8 rows (a serve step of 5-8 sequences): the other path dequantizes
# every weight each call (a bf16 copy written and read again); not timed against it on a GPU yet
INT8_DECODE_MAX_ROWS = 8
REDUCE_BLOCK = 1024  # columns a program of the split-K reduce kernel sums

# (BLOCK_N rows, BLOCK_K columns, num_warps, SPLIT_K, STAGES) keyed by the weight's (N, K); measured on an
# H200 by benchmarks/probes/probe_decode_linear.py at 7169c07 (`probe_decode_linear_7169c07.json`,
# its "winners"): only shapes where the kernel beat F.linear by 3% or more at 1 row inside a CUDA
# graph (us per call, cuBLAS -> kernel). Untabled shapes (gpt-oss's qkv: 10.9 vs 10.6) take cuBLAS.
DECODE_TUNED: dict[tuple[int, int], tuple[int, int, int, int, int]] = {
    (6144, 2048): (4, 2048, 8, 1, 1),  # OLMoE qkv 9.38 -> 8.21
    (2048, 2048): (4, 2048, 8, 1, 1),  # OLMoE / DeepSeek-V2-Lite o 6.17 -> 4.19
    (64, 2048): (1, 1024, 4, 1, 1),  # OLMoE / DeepSeek-V2-Lite router 5.21 -> 2.57
    (50304, 2048): (2, 1024, 4, 1, 1),  # OLMoE lm_head 56.2 -> 49.8
    (3072, 2048): (2, 1024, 4, 1, 1),  # DeepSeek-V2-Lite q_proj 6.55 -> 5.17
    (576, 2048): (1, 1024, 4, 1, 1),  # DeepSeek-V2-Lite kv_a 6.04 -> 3.03
    (5632, 2048): (4, 1024, 4, 1, 1),  # DeepSeek-V2-Lite shared gate_up 8.64 -> 7.81
    (2048, 2816): (1, 1024, 4, 1, 1),  # DeepSeek-V2-Lite shared down 8.08 -> 5.98
    (21888, 2048): (4, 1024, 4, 1, 1),  # DeepSeek-V2-Lite layer 0 gate_up 26.3 -> 23.8
    (2048, 10944): (4, 2048, 8, 1, 1),  # DeepSeek-V2-Lite layer 0 down 17.4 -> 15.5
    (2880, 4096): (2, 1024, 4, 1, 1),  # gpt-oss o 12.1 -> 8.40
    (32, 2880): (1, 1024, 4, 4, 1),  # gpt-oss router 6.96 -> 3.69
    (5120, 2048): (4, 1024, 4, 1, 1),  # Qwen3-30B-A3B qkv 8.36 -> 7.18
    (2048, 4096): (4, 2048, 8, 1, 1),  # Qwen3-30B-A3B o 9.48 -> 6.66
    (128, 2048): (1, 1024, 4, 1, 1),  # Qwen3-30B-A3B router 5.31 -> 2.72
}


def check_decode_config(config: tuple[int, int, int, int, int], k: int) -> None:
    """Raises MoekitError unless config is a (BLOCK_N, BLOCK_K, num_warps, SPLIT_K, STAGES) the kernel takes at K = k."""
    powers = lambda v, lo, hi: isinstance(v, int) and lo <= v <= hi and v & (v - 1) == 0
    if not (len(config) == 5 and powers(config[0], 1, 256) and powers(config[1], 16, 2048)
            and powers(config[2], 1, 16) and powers(config[3], 1, 64) and config[4] in (1, 2, 3, 4)):
        raise MoekitError(f"decode linear config {config}: (BLOCK_N, BLOCK_K, num_warps, SPLIT_K, STAGES), the "
                          "first four powers of two, BLOCK_K in 16..2048 (the K tail halves it down to 16), "
                          "STAGES 1..4; fix DECODE_TUNED or config=")
    if config[3] > 1 and k % (16 * config[3]):
        raise MoekitError(f"decode linear config {config}: SPLIT_K {config[3]} needs in_features ({k}) a multiple of "
                          f"{16 * config[3]} (each split a multiple of 16 columns); fix DECODE_TUNED or config=")


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  config: tuple[int, int, int, int, int], scale: torch.Tensor | None = None) -> torch.Tensor:
    """Returns x @ weight^T (+ bias) as [M, N] in x's dtype, float32 sums (M = 1..DECODE_MAX_ROWS).

    x [M, K] (columns contiguous), weight [N, K] row-major, bias [N] or None, all one dtype; or weight
    int8 codes with `scale` [N] float32 (the row's weights are scale[n] * codes[n]: Int8Linear);
    config = (BLOCK_N, BLOCK_K, num_warps, SPLIT_K, STAGES). With SPLIT_K > 1 a second launch sums the
    float32 partials in a fixed order. No host sync: a CUDA graph can capture it."""
    m, k = x.shape
    n = weight.shape[0]
    most = DECODE_MAX_ROWS if scale is None else INT8_DECODE_MAX_ROWS
    if not 1 <= m <= most or weight.shape[1] != k or weight.stride(1) != 1 or x.stride(1) != 1:
        raise MoekitError(f"decode_linear: x {tuple(x.shape)} (1..{most} rows) and weight "
                          f"{tuple(weight.shape)} must share K, with contiguous columns")
    weight_ok = (weight.dtype == x.dtype if scale is None else weight.dtype == torch.int8
                 and scale.dtype == torch.float32 and scale.shape == (n,) and scale.is_contiguous())
    if not weight_ok or (bias is not None and (bias.dtype != x.dtype or bias.shape != (n,))):
        raise MoekitError(f"decode_linear: x {x.dtype}, weight {weight.dtype} and bias must share one dtype, "
                          f"bias [{n}] (or the weight int8 with a float32 scale [{n}])")
    check_decode_config(config, k)
    block_n, block_k, warps, split_k, stages = config
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)  # [M, N]
    has_bias = bias is not None
    bias_arg = bias if has_bias else weight  # unused
    part = torch.empty(split_k, m, n, dtype=torch.float32, device=x.device) if split_k > 1 else y  # [S, M, N]
    decode_linear_kernel[(triton.cdiv(n, block_n), split_k)](
        x, weight, weight if scale is None else scale, bias_arg, y, part, n, x.stride(0), weight.stride(0),
        y.stride(0), M=m, M_PAD=triton.next_power_of_2(m), CHUNK=k // split_k, SPLIT_K=split_k,
        BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages, HAS_BIAS=has_bias, HAS_SCALE=scale is not None,
        num_warps=warps)
    if split_k > 1:
        decode_linear_reduce_kernel[(triton.cdiv(n, REDUCE_BLOCK), m)](
            part, bias_arg, y, n, y.stride(0), M=m, SPLIT_K=split_k, BLOCK=REDUCE_BLOCK, HAS_BIAS=has_bias,
            num_warps=4)
    return y


@functools.cache
def _tuned_gpu(device_index: int) -> bool:
    """Returns whether CUDA device `device_index` is the kind DECODE_TUNED was measured on (sm_90)."""
    return torch.cuda.get_device_capability(device_index) == (9, 0)


def _decode_device_ok(x: torch.Tensor) -> bool:
    """Returns whether x lives where the tuned decode matvec runs: a CUDA device of DECODE_TUNED's kind."""
    return x.is_cuda and _tuned_gpu(x.device.index if x.device.index is not None else torch.cuda.current_device())


def decode_config(x: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None) -> tuple[int, int, int, int, int] | None:
    """Returns the tuned decode matvec config for F.linear(x, weight, bias), or None where cuBLAS
    runs it: untabled shape, more than DECODE_MAX_ROWS rows, another dtype or device, autograd,
    torch.compile tracing, or MOEKIT_FUSED=0."""
    if not DECODE_TUNED or not HAVE_TRITON or x.dtype not in _NATIVE_DTYPES or weight.dtype != x.dtype:
        return None
    config = DECODE_TUNED.get(tuple(weight.shape))
    if config is None or not _decode_device_ok(x) or (bias is not None and bias.dtype != x.dtype):
        return None
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return None
    # a compiled step leaves the matmul to Inductor; MOEKIT_FUSED=0 (the reference path) to cuBLAS
    if torch.compiler.is_compiling() or os.environ.get("MOEKIT_FUSED") == "0":
        return None
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if not 0 < rows <= DECODE_MAX_ROWS or weight.stride(1) != 1:
        return None
    return config


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        config = decode_config(x, self.weight, self.bias)  # None unless DECODE_TUNED lists this shape
        if config is not None:
            flat = x.reshape(-1, x.shape[-1])
            if flat.stride(1) != 1:
                flat = flat.contiguous()
            return decode_linear(flat, self.weight, self.bias, config).view(*x.shape[:-1], -1)
        if not x.is_cuda and x.dtype in _NATIVE_DTYPES and self.weight.dtype == x.dtype and not (
                torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
            rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
            if 0 < rows <= kernel_tokens(self.weight.dtype) and usable(x, self.weight.dtype):
                flat = x.reshape(rows, x.shape[-1])
                if x.dtype == torch.bfloat16 and rows <= MAX_ROWS and self.weight.is_contiguous():  # AVX512-BF16
                    return matvec(flat, self.weight, self.bias).view(*x.shape[:-1], -1)
                return linear(flat, self.weight, self.bias).view(*x.shape[:-1], -1)
            if (rows > MAX_JOB_TOKENS and kernel_tokens(self.weight.dtype) == MAX_JOB_TOKENS
                    and usable(x, self.weight.dtype) and self.weight.is_contiguous()):
                flat = x.reshape(rows, x.shape[-1])  # bf16 without bf16 hardware: the kernel in pieces
                return torch.cat([linear(part, self.weight, self.bias) for part in flat.split(MAX_JOB_TOKENS)]
                                 ).view(*x.shape[:-1], -1)
        return F.linear(x, self.weight, self.bias)


DENSE_FORMS = ("bf16", "int8")  # a model's dense projections on the GPU: as loaded, or int8 rows (Int8Linear)
DEQUANT_ELEMENTS = 1 << 22  # weights a prefill-sized Int8Linear call dequantizes at a time (float32 + dtype copy)
DEQUANT_WORKSPACE_BYTES = DEQUANT_ELEMENTS * 6  # its transient bytes (bf16/fp16 models), planned as reserve


def check_dense_form(form: str) -> str:
    """Returns form, or raises MoekitError unless it is one of DENSE_FORMS."""
    if form not in DENSE_FORMS:
        raise MoekitError(f"--quantize-dense must be one of {', '.join(DENSE_FORMS)}, got {form!r}")
    return form


def quantize_int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (codes [N, K] int8, scale [N] float32) of weight [N, K], per row: codes = round(w / scale)
    in [-127, 127], scale = max |w| over the row / 127 (1 for a row of zeros); each weight within
    scale / 2 of scale * code."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return codes.contiguous(), scale.contiguous()


# Int8 weights where their best tile (H200, one row, probe_decode_linear.py --int8 at 7b3b4cf; each 1.36-1.90x
# bf16 cuBLAS) differs from bf16's DECODE_TUNED entry: us at bf16's tile -> at this one
INT8_DECODE_TUNED: dict[tuple[int, int], tuple[int, int, int, int, int]] = {
    (2048, 2048): (2, 1024, 4, 1, 1),  # OLMoE / DeepSeek-V2-Lite o (bf16's tile 4.19 with bf16 weights) -> 3.96
    (50304, 2048): (8, 512, 4, 1, 1),  # OLMoE lm_head 39.5 -> 34.0
    (5120, 2048): (4, 2048, 8, 1, 1),  # Qwen3-30B-A3B qkv 6.67 -> 6.16
}


def int8_decode_config(n: int, k: int) -> tuple[int, int, int, int, int]:
    """Returns the decode matvec config for an int8 [N, K] weight: INT8_DECODE_TUNED's for the shape, else
    DECODE_TUNED's (measured with bf16 weights), else 4 rows a program over up to 1024 columns a step,
    split-K for N below 256."""
    tuned = INT8_DECODE_TUNED.get((n, k)) or DECODE_TUNED.get((n, k))
    if tuned is not None:
        return tuned
    block_k = min(1024, max(16, 1 << (k.bit_length() - 1)))
    split_k = 1
    while n < 256 and split_k < 8 and k % (16 * split_k * 2) == 0 and k // (split_k * 2) >= block_k:
        split_k *= 2
    return (4, block_k, 4, split_k, 1)


class Int8Linear(nn.Module):
    """A projection whose weight is held as int8 codes with a float32 scale per output row: half of a
    bf16 weight's bytes (issue 12: llama.cpp's Q4_K_M / Q2_K quantize attention and the LM head too,
    so at its footprint a model whose dense weights stay bf16 does not fit).

    Calls of 1..INT8_DECODE_MAX_ROWS rows on a GPU run the decode matvec on the codes (the scale applied
    to each row's float32 sum); others (prefill, the CPU, MOEKIT_FUSED=0) dequantize DEQUANT_ELEMENTS
    weights at a time into x's dtype and run F.linear on each slice. Filled row by row (`fill_rows`)
    from the checkpoint, so the bf16 weight never exists on the device. Parameters: qweight [N, K]
    int8, qscale [N] float32, bias [N] (x's dtype) or None; none of them trains."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        grad = dict(requires_grad=False)
        self.qweight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.int8, device=device), **grad)
        self.qscale = nn.Parameter(torch.empty(out_features, dtype=torch.float32, device=device), **grad)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), **grad) if bias else None
        self.decode_config = int8_decode_config(out_features, in_features)  # the decode matvec's tile, once

    @classmethod
    def like(cls, linear: nn.Linear) -> "Int8Linear":
        """Returns an unfilled Int8Linear of linear's shape, bias, dtype and device."""
        w = linear.weight
        return cls(linear.in_features, linear.out_features, linear.bias is not None, w.dtype, w.device)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        """Returns linear's weights quantized (bias copied as is)."""
        q = cls.like(linear)
        with torch.no_grad():
            q.fill_rows(0, linear.weight)
            if linear.bias is not None:
                q.bias.copy_(linear.bias)
        return q

    @torch.no_grad()
    def fill_rows(self, offset: int, weight: torch.Tensor) -> None:
        """Quantizes weight [R, K] (any device, float dtype) into rows offset..offset+R."""
        rows = weight.shape[0]
        if weight.shape[1] != self.in_features or not 0 <= offset <= self.out_features - rows:
            raise MoekitError(f"Int8Linear.fill_rows: rows {offset}..{offset + rows} of {tuple(weight.shape)} do "
                              f"not fit [{self.out_features}, {self.in_features}]")
        codes, scale = quantize_int8_rows(weight)
        self.qweight[offset:offset + rows].copy_(codes)
        self.qscale[offset:offset + rows].copy_(scale)

    def dequantized(self, dtype: torch.dtype, rows: slice = slice(None)) -> torch.Tensor:
        """Returns the weights [N, K] (or `rows` of them) in dtype: scale * codes rounded once (one float32
        copy scaled in place, then the dtype copy: 6 bytes a weight at the peak, DEQUANT_WORKSPACE_BYTES)."""
        w = self.qweight[rows].float()
        return w.mul_(self.qscale[rows, None].float()).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, n = self.in_features, self.out_features
        flat = x.reshape(-1, k)
        rows = flat.shape[0]
        if (x.is_cuda and HAVE_TRITON and 0 < rows <= INT8_DECODE_MAX_ROWS and x.dtype in _NATIVE_DTYPES
                and not torch.compiler.is_compiling() and os.environ.get("MOEKIT_FUSED") != "0"
                and not (torch.is_grad_enabled() and x.requires_grad)):  # the kernel has no backward
            if flat.stride(1) != 1:
                flat = flat.contiguous()
            scale = self.qscale if self.qscale.dtype == torch.float32 else self.qscale.float()  # after model.half()
            bias = None if self.bias is None else self.bias.to(x.dtype)
            y = decode_linear(flat, self.qweight, bias, self.decode_config, scale=scale)
            return y.view(*x.shape[:-1], n)
        out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
        step = max(1, DEQUANT_ELEMENTS // max(k, 1))
        for r0 in range(0, n, step):
            part = slice(r0, min(n, r0 + step))
            bias = None if self.bias is None else self.bias[part].to(x.dtype)
            out[:, part] = F.linear(flat, self.dequantized(x.dtype, part), bias)
        return out.view(*x.shape[:-1], n)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


def load_rows(linear: nn.Module, offset: int, read) -> None:
    """Fills rows offset.. of a projection's weight with read(dtype), a [R, K] tensor of the checkpoint:
    a Linear copies it in its dtype; an Int8Linear reads float32 and quantizes it where it was read (host
    memory: a float32 LM head on a small GPU would pass its budget), then copies the codes."""
    if isinstance(linear, Int8Linear):
        linear.fill_rows(offset, read(torch.float32))
    else:
        rows = read(linear.weight.dtype)
        linear.weight[offset:offset + rows.shape[0]].copy_(rows)
