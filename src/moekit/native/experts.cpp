// Routed SwiGLU experts on the CPU at host memory bandwidth (moekit.native.experts).
//
// One call computes a layer's CPU share: for each job j (one expert and the tokens routed to it),
//     out[t] += w * down_j @ (silu(gate_j @ x[t]) * (up_j @ x[t]))      for each of its tokens t
// and writes out [N, D] (every row: tokens no job touches get zeros).
//
// Why a kernel: at batch 1 an expert is a matrix-vector product that reads each weight once, so
// the time is bytes / host bandwidth. PyTorch runs it as 3-4 ops per expert, each a parallel
// region with its own fork and barrier, and its bf16 matvec reads well below the bandwidth. Here
// a layer is one parallel region with one barrier between its two stages; every thread streams
// whole weight rows (contiguous), converts them to float once and reuses them for every token
// of the job.
//   stage 1  work item = (job, block of ffn rows): h[slot, r] = silu(gate_r . x) * (up_r . x)
//   stage 2  work item = block of hidden rows d: out[t, d] = sum over jobs of w * (down_d . h[slot]),
//            job by job over the block's rows
// Stage 2 partitions the output rows, so no two threads write the same element and the sum over
// jobs runs in job order (the result does not depend on the thread count).
//
// Shapes: N tokens, D hidden, I ffn width, J jobs, T = slots of all jobs (tok_start[J]);
// accs holds threads * acc_stride(N) floats (stage 2's accumulators past STAGE2_ACC tokens).
// Weights: gate_up [2I, D] (gate rows first, then up), down [D, I], row-major, of dtype `wdtype`.
// dtypes: 0 = bfloat16, 1 = float16, 2 = float32. Accumulation is float32.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <omp.h>

#include "common.h"

namespace {

constexpr int64_t MAX_ROW = 1 << 15;  // widest row a thread converts to float (128 KB of its stack)

// One weight row of dtype W dotted with `count` float vectors (vec + k * stride): the row is read
// from memory once. A single vector reads the row directly (no conversion pass).
template <typename W, typename Conv>
inline void row_dots(const W* row, int64_t n, const float* vec, int64_t stride, const int32_t* which, int count,
                     float* scratch, float* out, Conv conv) {
  if (count == 1) {
    const float* v = vec + (which ? which[0] : 0) * stride;
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < n; ++i) acc += conv(row[i]) * v[i];
    out[0] = acc;
    return;
  }
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) scratch[i] = conv(row[i]);
  for (int k = 0; k < count; ++k) out[k] = dot(scratch, vec + (which ? which[k] : k) * stride, n);
}

// gate . x and up . x of one token, read in one pass (two streams at once).
template <typename W, typename Conv>
inline void gate_up_dots(const W* gate, const W* up, const float* x, int64_t n, float* g, float* u, Conv conv) {
  float ag = 0.f, au = 0.f;
#pragma omp simd reduction(+ : ag, au)
  for (int64_t i = 0; i < n; ++i) {
    ag += conv(gate[i]) * x[i];
    au += conv(up[i]) * x[i];
  }
  *g = ag;
  *u = au;
}

template <typename W, typename Conv>
void run_layer(const float* xf, int64_t D, int64_t I, int64_t J, const int64_t* gate_up, const int64_t* down,
               const int32_t* tok_start, const int32_t* tok, const float* w, float* h, float* accs, int64_t N,
               int odtype, void* out, int threads, Conv conv) {
  const int64_t blocks_i = (I + ROWS_PER_ITEM - 1) / ROWS_PER_ITEM;
  const int64_t rows_d = stage2_rows(D, N, threads);  // common.h
  const int64_t blocks_d = (D + rows_d - 1) / rows_d;
#pragma omp parallel num_threads(threads)
  {
    float scratch[MAX_ROW];
    float g[MAX_JOB_TOKENS], u[MAX_JOB_TOKENS];  // per-token dots of one row
    // [rows_d, N] accumulators of a stage-2 item; past STAGE2_ACC tokens (rows_d = 1) the thread's
    // share of accs, on cache lines of its own
    float acc_stack[STAGE2_ACC];
    float* acc2 = N <= STAGE2_ACC ? acc_stack : accs + static_cast<int64_t>(omp_get_thread_num()) * acc_stride(N);
#pragma omp for schedule(static)
    for (int64_t item = 0; item < J * blocks_i; ++item) {
      const int64_t j = item / blocks_i, r0 = (item % blocks_i) * ROWS_PER_ITEM;
      const W* gu = reinterpret_cast<const W*>(gate_up[j]);
      const int32_t first = tok_start[j], count = tok_start[j + 1] - first;
      for (int64_t r = r0; r < r0 + ROWS_PER_ITEM && r < I; ++r) {
        if (count == 1) {  // decode: both rows in one pass
          gate_up_dots(gu + r * D, gu + (I + r) * D, xf + tok[first] * D, D, g, u, conv);
        } else {
          row_dots(gu + r * D, D, xf, D, tok + first, count, scratch, g, conv);
          row_dots(gu + (I + r) * D, D, xf, D, tok + first, count, scratch, u, conv);
        }
        for (int k = 0; k < count; ++k) h[(first + k) * I + r] = g[k] / (1.f + std::exp(-g[k])) * u[k];
      }
    }  // implicit barrier: every h is written
#pragma omp for schedule(static)
    for (int64_t item = 0; item < blocks_d; ++item) {
      // job by job over the item's rows: each job's down rows d0..d1 are one contiguous region,
      // read front to back (a single stream), and each element still sums its jobs in job order
      const int64_t d0 = item * rows_d, d1 = d0 + rows_d < D ? d0 + rows_d : D;
      for (int64_t i = 0; i < (d1 - d0) * N; ++i) acc2[i] = 0.f;
      for (int64_t j = 0; j < J; ++j) {
        const int32_t first = tok_start[j], count = tok_start[j + 1] - first;
        const W* rows = reinterpret_cast<const W*>(down[j]) + d0 * I;
        for (int64_t d = d0; d < d1; ++d) {
          row_dots(rows + (d - d0) * I, I, h + first * I, I, nullptr, count, scratch, g, conv);
          for (int k = 0; k < count; ++k) acc2[(d - d0) * N + tok[first + k]] += w[first + k] * g[k];
        }
      }
      for (int64_t d = d0; d < d1; ++d)
        for (int64_t t = 0; t < N; ++t) from_float(odtype, acc2[(d - d0) * N + t], out, t * D + d);
    }
  }
}

template <typename W, typename Conv>
void run_linear(const float* xf, const W* w, const float* bias, int64_t M, int64_t N, int64_t K, int odtype,
                void* out, int threads, Conv conv) {
  const int64_t blocks = (N + ROWS_PER_ITEM - 1) / ROWS_PER_ITEM;
#pragma omp parallel num_threads(threads)
  {
    float scratch[MAX_ROW];
    float dots[MAX_JOB_TOKENS];
#pragma omp for schedule(static)
    for (int64_t item = 0; item < blocks; ++item) {
      for (int64_t n = item * ROWS_PER_ITEM; n < (item + 1) * ROWS_PER_ITEM && n < N; ++n) {
        row_dots(w + n * K, K, xf, K, nullptr, static_cast<int>(M), scratch, dots, conv);
        const float b = bias ? bias[n] : 0.f;
        for (int64_t m = 0; m < M; ++m) from_float(odtype, dots[m] + b, out, m * N + n);
      }
    }
  }
}

}  // namespace

extern "C" {

// Returns 0, or a nonzero code for arguments the kernel cannot take (checked by the caller too):
// 1 a row wider than MAX_ROW, 2 a job of more than 256 tokens, 3 float16 without compiler support.
int moekit_expert_ffn(int wdtype, int xdtype, const void* x, void* out, int64_t N, int64_t D, int64_t I,
                      int64_t J, const int64_t* gate_up, const int64_t* down, const int32_t* tok_start,
                      const int32_t* tok, const float* w, float* h, float* xf, float* accs, int threads) {
  if (D > MAX_ROW || I > MAX_ROW) return 1;
#ifndef __FLT16_MAX__
  if (wdtype == 1 || xdtype == 1) return 3;
#endif
  for (int64_t j = 0; j < J; ++j)
    if (tok_start[j + 1] - tok_start[j] > MAX_JOB_TOKENS) return 2;
  for (int64_t t = 0; t < N; ++t) to_float(xdtype, static_cast<const char*>(x) + t * D * itemsize(xdtype), D,
                                           xf + t * D);
  if (wdtype == 0)
    run_layer<uint16_t>(xf, D, I, J, gate_up, down, tok_start, tok, w, h, accs, N, xdtype, out, threads, Bf16());
#ifdef __FLT16_MAX__
  else if (wdtype == 1)
    run_layer<_Float16>(xf, D, I, J, gate_up, down, tok_start, tok, w, h, accs, N, xdtype, out, threads, F16());
#endif
  else
    run_layer<float>(xf, D, I, J, gate_up, down, tok_start, tok, w, h, accs, N, xdtype, out, threads, F32());
  return 0;
}

// out [M, N] = x [M, K] @ w[N, K]^T (+ bias [N], float32) for M <= 256 rows: each weight row read
// once (a decode step's projections, at host memory bandwidth). Returns 0, or 1 for K > MAX_ROW,
// 2 for M > 256, 3 for float16 without compiler support.
int moekit_linear(int wdtype, int xdtype, const void* x, const void* w, const float* bias, void* out, int64_t M,
                  int64_t N, int64_t K, float* xf, int threads) {
  if (K > MAX_ROW) return 1;
  if (M > MAX_JOB_TOKENS) return 2;
#ifndef __FLT16_MAX__
  if (wdtype == 1 || xdtype == 1) return 3;
#endif
  for (int64_t m = 0; m < M; ++m)
    to_float(xdtype, static_cast<const char*>(x) + m * K * itemsize(xdtype), K, xf + m * K);
  if (wdtype == 0)
    run_linear(xf, static_cast<const uint16_t*>(w), bias, M, N, K, xdtype, out, threads, Bf16());
#ifdef __FLT16_MAX__
  else if (wdtype == 1)
    run_linear(xf, static_cast<const _Float16*>(w), bias, M, N, K, xdtype, out, threads, F16());
#endif
  else
    run_linear(xf, static_cast<const float*>(w), bias, M, N, K, xdtype, out, threads, F32());
  return 0;
}

// Streams `bytes` bytes from p with `threads` threads and returns a checksum (the bandwidth probe).
double moekit_stream_read(const void* p, int64_t bytes, int threads) {
  const int64_t n = bytes / 8;
  const uint64_t* s = static_cast<const uint64_t*>(p);
  uint64_t total = 0;
#pragma omp parallel for num_threads(threads) reduction(^ : total) schedule(static)
  for (int64_t i = 0; i < n; ++i) total ^= s[i];
  return static_cast<double>(total & 0xffff);
}

}  // extern "C"
