"""Per-slot matvecs of gpt-oss's MXFP4 experts for decode: each weight byte is decoded in the
kernel (two e2m1 values times the E8M0 power of its 32-value group), never stored wider.

Tensors (N = tokens, A = experts per token, S = N*A slots in routing order, E = experts (or cache
slots), D = hidden, I = expert ffn width; K = the matrix's columns, R = its rows, G = K / 32):
    x          [N, K] token activations (gate_up) or [S, K] slot activations (down), contiguous
    expert_ids [S]             int64, the router's [N, A] output flattened
    blocks     [E, R, G, 16]   uint8: byte j of a group holds columns 2j (low nibble) and 2j + 1
    scales     [E, R, G]       uint8: column k's value is e2m1 * 2^(scales[.., k // 32] - 127)
    bias       [E, R]          the projection's bias (gate rows first, then up, for gate_up)
    out        [S, I] (gate_up: the clamped SwiGLU) or [S, D] (down, times the routing weight)

Program (s, nb) computes rows nb*BLOCK_N.. of slot s, walking K in BLOCK_K columns (a multiple of
32): the even and odd columns of x meet the low and high nibbles, so nothing is interleaved.
"""

import triton
import triton.language as tl


@triton.jit
def _e2m1(code):
    """Returns the float32 value of e2m1 codes (0..15): sign bit 3, exponent bits 2-1, mantissa bit 0."""
    exponent = (code >> 1) & 3
    mantissa = (code & 1).to(tl.float32)
    magnitude = tl.where(exponent == 0, mantissa * 0.5, (1.0 + mantissa * 0.5) * tl.exp2((exponent - 1).to(tl.float32)))
    return tl.where((code & 8) != 0, -magnitude, magnitude)


@triton.jit
def _row_dot(x_row, blocks_base, scales_base, rows, row_ok, stride_br, stride_sr,
             K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Returns [BLOCK_N] float32 dot products of MXFP4 rows `rows` with x_row [K]."""
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    half: tl.constexpr = BLOCK_K // 2
    for k0 in range(0, K, BLOCK_K):
        j = tl.arange(0, half)  # byte of this step
        cols = k0 + 2 * j  # its even column
        k_ok = cols < K
        xe = tl.load(x_row + cols, mask=k_ok, other=0.0).to(tl.float32)  # [BK/2]
        xo = tl.load(x_row + cols + 1, mask=k_ok, other=0.0).to(tl.float32)
        mask = row_ok[:, None] & k_ok[None, :]
        byte = tl.load(blocks_base + rows[:, None] * stride_br + (k0 // 2 + j)[None, :], mask=mask, other=0)
        byte = byte.to(tl.int32)
        scale = tl.load(scales_base + rows[:, None] * stride_sr + (cols // 32)[None, :], mask=mask, other=127)
        power = tl.exp2(scale.to(tl.float32) - 127.0)  # [BN, BK/2]
        acc += tl.sum((_e2m1(byte & 15) * xe[None, :] + _e2m1(byte >> 4) * xo[None, :]) * power, axis=1)
    return acc


@triton.jit
def mxfp4_slot_gate_up_kernel(
    x_ptr, expert_ids_ptr, blocks_ptr, scales_ptr, bias_ptr, out_ptr,
    FFN, alpha, limit,
    stride_xn, stride_be, stride_br, stride_se, stride_sr, stride_bias, stride_os,
    TOP_K: tl.constexpr, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[s, n] = (clamp(u, -limit, limit) + 1) * g * sigmoid(alpha * g), g = min(gate_n + b, limit),
    u = up_n + b: gate_n, up_n the MXFP4 rows n and FFN + n of expert e_s dotted with x[s // A]."""
    s = tl.program_id(0)
    nb = tl.program_id(1)
    e = tl.load(expert_ids_ptr + s).to(tl.int64)
    x_row = x_ptr + (s // TOP_K) * stride_xn
    rows = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < FFN
    blocks_base = blocks_ptr + e * stride_be
    scales_base = scales_ptr + e * stride_se
    gate = _row_dot(x_row, blocks_base, scales_base, rows, row_ok, stride_br, stride_sr, K, BLOCK_N, BLOCK_K)
    up = _row_dot(x_row, blocks_base, scales_base, rows + FFN, row_ok, stride_br, stride_sr, K, BLOCK_N, BLOCK_K)
    gate += tl.load(bias_ptr + e * stride_bias + rows, mask=row_ok, other=0.0).to(tl.float32)
    up += tl.load(bias_ptr + e * stride_bias + FFN + rows, mask=row_ok, other=0.0).to(tl.float32)
    gate = tl.minimum(gate, limit)
    up = tl.minimum(tl.maximum(up, -limit), limit)
    h = (up + 1.0) * gate * tl.sigmoid(gate * alpha)
    tl.store(out_ptr + s * stride_os + rows, h.to(out_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def mxfp4_slot_down_kernel(
    h_ptr, expert_ids_ptr, weights_ptr, blocks_ptr, scales_ptr, bias_ptr, out_ptr,
    N,
    stride_hs, stride_be, stride_br, stride_se, stride_sr, stride_bias, stride_os,
    K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[s, n] = weights[s] * (h[s] . down_n + bias_n) of expert e_s (the routing weight applied here)."""
    s = tl.program_id(0)
    nb = tl.program_id(1)
    e = tl.load(expert_ids_ptr + s).to(tl.int64)
    gate_weight = tl.load(weights_ptr + s).to(tl.float32)
    rows = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    acc = _row_dot(h_ptr + s * stride_hs, blocks_ptr + e * stride_be, scales_ptr + e * stride_se, rows, row_ok,
                   stride_br, stride_sr, K, BLOCK_N, BLOCK_K)
    acc += tl.load(bias_ptr + e * stride_bias + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + s * stride_os + rows, (acc * gate_weight).to(out_ptr.dtype.element_ty), mask=row_ok)
