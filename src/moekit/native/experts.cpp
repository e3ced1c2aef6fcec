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
// Weights: gate_up [2I, D] (gate rows first, then up), down [D, I], row-major, of dtype `wdtype`;
// with LD > I a slice of ffn rows of experts LD wide (the pointers at its first row / column): up
// rows LD * D elements after gate rows, down rows LD elements apart (an expert split by rows between
// the CPU and the device sums the two partial outputs).
// dtypes: 0 = bfloat16, 1 = float16, 2 = float32. Accumulation is float32.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#include <omp.h>

#include "common.h"
#include "team.h"

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#define MOEKIT_DPBF16 1
#else
#define MOEKIT_DPBF16 0
#endif

namespace {

// Tunables of the bf16 decode path (moekit_expert_tuning; the H200 probe sweeps them):
int g_dpbf16 = MOEKIT_DPBF16;  // bf16 pair dot products (AVX512-BF16) where the CPU has them
int64_t g_prefetch = 4096;     // software prefetch this many bytes ahead in each weight stream (0 = off)

#if MOEKIT_DPBF16
// A float vector as the sum of two bf16 vectors (hi + lo: ~16 mantissa bits, a relative error near
// 2^-17 against float32's 2^-24: measured up to 1.4e-5 of the output's largest element with float32
// activations), so the pair dot products keep bf16 weights' products near float32; lo is null where
// the vector is bf16 already (a bf16 model's activations: exact with hi alone).
struct Split {
  const uint16_t* hi;
  const uint16_t* lo;
};

inline void split_bf16(const float* v, int64_t n, uint16_t* hi, uint16_t* lo) {
  for (int64_t i = 0; i < n; ++i) {
    hi[i] = float_to_bf16(v[i]);
    lo[i] = float_to_bf16(v[i] - bf16_to_float(hi[i]));
  }
}

inline __m512bh as_bh(__m512i v) { return (__m512bh)v; }  // a vector bit cast (same size)

// out[r] = row_r . v for R bf16 rows of n elements and one split vector: 64 elements a step in two
// accumulator chains per row (the pair products are exact in float32; the sums round), a masked
// step for the tail; each row is read once, prefetched g_prefetch bytes ahead.
template <int R>
inline void dots_bf16(const uint16_t* const* rows, Split v, int64_t n, float* out) {
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  const int64_t pf = g_prefetch / 2;  // in elements
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    if (pf)
      for (int r = 0; r < R; ++r) {
        __builtin_prefetch(rows[r] + i + pf, 0, 3);
        __builtin_prefetch(rows[r] + i + pf + 32, 0, 3);
      }
    const __m512bh h0 = as_bh(_mm512_loadu_si512(v.hi + i)), h1 = as_bh(_mm512_loadu_si512(v.hi + i + 32));
    for (int r = 0; r < R; ++r) {
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], as_bh(_mm512_loadu_si512(rows[r] + i)), h0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], as_bh(_mm512_loadu_si512(rows[r] + i + 32)), h1);
    }
    if (v.lo) {
      const __m512bh l0 = as_bh(_mm512_loadu_si512(v.lo + i)), l1 = as_bh(_mm512_loadu_si512(v.lo + i + 32));
      for (int r = 0; r < R; ++r) {
        acc[r][0] = _mm512_dpbf16_ps(acc[r][0], as_bh(_mm512_loadu_si512(rows[r] + i)), l0);
        acc[r][1] = _mm512_dpbf16_ps(acc[r][1], as_bh(_mm512_loadu_si512(rows[r] + i + 32)), l1);
      }
    }
  }
  for (; i < n; i += 32) {
    const __mmask32 m = n - i >= 32 ? 0xffffffffu : (1u << (n - i)) - 1u;
    const __m512bh h = as_bh(_mm512_maskz_loadu_epi16(m, v.hi + i));
    const __m512bh l = as_bh(_mm512_maskz_loadu_epi16(m, v.lo ? v.lo + i : v.hi + i));
    for (int r = 0; r < R; ++r) {
      const __m512bh w = as_bh(_mm512_maskz_loadu_epi16(m, rows[r] + i));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], w, h);
      if (v.lo) acc[r][1] = _mm512_dpbf16_ps(acc[r][1], w, l);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
}
#endif

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
  dots_many(scratch, vec, stride, which, count, n, out);
}

// Two weight rows dotted with the same `count` (> 1) vectors: both converted into scratch (2n floats),
// then each vector load serves both (dots_many2).
template <typename W, typename Conv>
inline void row_pair_dots(const W* row0, const W* row1, int64_t n, const float* vec, int64_t stride,
                          const int32_t* which, int count, float* scratch, float* out0, float* out1, Conv conv) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) scratch[i] = conv(row0[i]);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) scratch[n + i] = conv(row1[i]);
  dots_many2(scratch, scratch + n, vec, stride, which, count, n, out0, out1);
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
void run_layer(const float* xf, int64_t D, int64_t I, int64_t LD, int64_t J, const int64_t* gate_up, const int64_t* down,
               const int32_t* tok_start, const int32_t* tok, const float* w, float* h, float* accs, int64_t N,
               int odtype, void* out, int threads, Conv conv) {
  const int64_t blocks_i = (I + ROWS_PER_ITEM - 1) / ROWS_PER_ITEM;
  // common.h's, made even (it is 1 only past 2048 tokens, for every thread count): items start at even
  // rows, so which down rows stage 2 pairs (d, d + 1 for even d) does not depend on the thread count
  const int64_t rows_d = [&] { const int64_t r = stage2_rows(D, N, threads); return r >= 2 ? r & ~int64_t{1} : r; }();
  const int64_t blocks_d = (D + rows_d - 1) / rows_d;
#if MOEKIT_DPBF16
  // bf16 weights: pair dot products on split vectors (x split once here, h as stage 1 writes it);
  // the buffers belong to the calling thread (the runner and the main thread may each call)
  bool pairs = std::is_same<W, uint16_t>::value && g_dpbf16;
  const int64_t T = tok_start[J];
  thread_local std::vector<uint16_t> split_buf;
  uint16_t *x_hi = nullptr, *x_lo = nullptr, *h_hi = nullptr, *h_lo = nullptr;
  if (pairs) {
    if (static_cast<int64_t>(split_buf.size()) < 2 * (N * D + T * I)) {
      try {
        split_buf.resize(2 * (N * D + T * I));
      } catch (...) {  // no exception crosses the C boundary: the portable loops need no buffer
        pairs = false;
      }
    }
  }
  if (pairs) {
    x_hi = split_buf.data(), x_lo = x_hi + N * D, h_hi = x_lo + N * D, h_lo = h_hi + T * I;
    if (odtype == 0) {
      for (int64_t i = 0; i < N * D; ++i) x_hi[i] = float_to_bf16(xf[i]);  // exact: x was bf16
      x_lo = nullptr;
    } else {
      split_bf16(xf, N * D, x_hi, x_lo);
    }
  }
#endif
  moekit_team::parallel(threads, [&](const moekit_team::Par& p) {
    float scratch[MAX_ROW];
    float g[MAX_JOB_TOKENS], u[MAX_JOB_TOKENS];  // per-token dots of one row
    // [rows_d, N] accumulators of a stage-2 item; past STAGE2_ACC tokens (rows_d = 1) the thread's
    // share of accs, on cache lines of its own
    float acc_stack[STAGE2_ACC];
    float* acc2 = N <= STAGE2_ACC ? acc_stack : accs + static_cast<int64_t>(p.t) * acc_stride(N);
    int64_t begin, end;
    p.range(J * blocks_i, begin, end);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t j = item / blocks_i, r0 = (item % blocks_i) * ROWS_PER_ITEM;
      const W* gu = reinterpret_cast<const W*>(gate_up[j]);
      const int32_t first = tok_start[j], count = tok_start[j + 1] - first;
      for (int64_t r = r0; r < r0 + ROWS_PER_ITEM && r < I; ++r) {
#if MOEKIT_DPBF16
        if (pairs) {
          const uint16_t* both[2] = {reinterpret_cast<const uint16_t*>(gu + r * D),
                                     reinterpret_cast<const uint16_t*>(gu + (LD + r) * D)};
          for (int k = 0; k < count; ++k) {
            const int64_t t = tok[first + k];
            float gu_dots[2];
            dots_bf16<2>(both, Split{x_hi + t * D, x_lo ? x_lo + t * D : nullptr}, D, gu_dots);
            const float hv = gu_dots[0] / (1.f + std::exp(-gu_dots[0])) * gu_dots[1];
            const int64_t at = (first + k) * I + r;  // stage 2 reads h as hi + lo only
            h_hi[at] = float_to_bf16(hv);
            h_lo[at] = float_to_bf16(hv - bf16_to_float(h_hi[at]));
          }
          continue;
        }
#endif
        if (count == 1) {  // decode: both rows in one pass
          gate_up_dots(gu + r * D, gu + (LD + r) * D, xf + tok[first] * D, D, g, u, conv);
        } else if (2 * D <= MAX_ROW) {  // several tokens: the gate and up rows share each x load
          row_pair_dots(gu + r * D, gu + (LD + r) * D, D, xf, D, tok + first, count, scratch, g, u, conv);
        } else {
          row_dots(gu + r * D, D, xf, D, tok + first, count, scratch, g, conv);
          row_dots(gu + (LD + r) * D, D, xf, D, tok + first, count, scratch, u, conv);
        }
        for (int k = 0; k < count; ++k) h[(first + k) * I + r] = g[k] / (1.f + std::exp(-g[k])) * u[k];
      }
    }
    p.barrier();  // every h is written
    p.range(blocks_d, begin, end);
    for (int64_t item = begin; item < end; ++item) {
      // job by job over the item's rows: each job's down rows d0..d1 are one contiguous region,
      // read front to back (a single stream), and each element still sums its jobs in job order
      const int64_t d0 = item * rows_d, d1 = d0 + rows_d < D ? d0 + rows_d : D;
      for (int64_t i = 0; i < (d1 - d0) * N; ++i) acc2[i] = 0.f;
      for (int64_t j = 0; j < J; ++j) {
        const int32_t first = tok_start[j], count = tok_start[j + 1] - first;
        const W* rows = reinterpret_cast<const W*>(down[j]) + d0 * LD;
        for (int64_t d = d0; d < d1; ++d) {
#if MOEKIT_DPBF16
          if (pairs) {  // h as hi + lo only (stage 1 wrote no float h)
            const uint16_t* row[1] = {reinterpret_cast<const uint16_t*>(rows + (d - d0) * LD)};
            for (int k = 0; k < count; ++k)
              dots_bf16<1>(row, Split{h_hi + (first + k) * I, h_lo + (first + k) * I}, I, g + k);
            for (int k = 0; k < count; ++k) acc2[(d - d0) * N + tok[first + k]] += w[first + k] * g[k];
            continue;
          }
#endif
          if (count > 1 && (d - d0) % 2 == 0 && d + 1 < d1 && 2 * I <= MAX_ROW) {  // two rows share each h load
            row_pair_dots(rows + (d - d0) * LD, rows + (d + 1 - d0) * LD, I, h + first * I, I, nullptr, count,
                          scratch, g, u, conv);
            for (int k = 0; k < count; ++k) {
              acc2[(d - d0) * N + tok[first + k]] += w[first + k] * g[k];
              acc2[(d + 1 - d0) * N + tok[first + k]] += w[first + k] * u[k];
            }
            ++d;
            continue;
          }
          row_dots(rows + (d - d0) * LD, I, h + first * I, I, nullptr, count, scratch, g, conv);
          for (int k = 0; k < count; ++k) acc2[(d - d0) * N + tok[first + k]] += w[first + k] * g[k];
        }
      }
      for (int64_t d = d0; d < d1; ++d)
        for (int64_t t = 0; t < N; ++t) from_float(odtype, acc2[(d - d0) * N + t], out, t * D + d);
    }
  }, /*dense=*/true);
}

template <typename W, typename Conv>
void run_linear(const float* xf, const W* w, const float* bias, int64_t M, int64_t N, int64_t K, int odtype,
                void* out, int threads, Conv conv) {
  const int64_t blocks = (N + ROWS_PER_ITEM - 1) / ROWS_PER_ITEM;
#pragma omp parallel num_threads(threads)
  {
    float scratch[MAX_ROW];
    float dots[MAX_JOB_TOKENS], dots2[MAX_JOB_TOKENS];
#pragma omp for schedule(static)
    for (int64_t item = 0; item < blocks; ++item) {
      const int64_t end = (item + 1) * ROWS_PER_ITEM < N ? (item + 1) * ROWS_PER_ITEM : N;
      for (int64_t n = item * ROWS_PER_ITEM; n < end; ++n) {
        if (M > 1 && n + 1 < end && 2 * K <= MAX_ROW) {  // two rows share each x load
          row_pair_dots(w + n * K, w + (n + 1) * K, K, xf, K, nullptr, static_cast<int>(M), scratch, dots, dots2, conv);
          const float b0 = bias ? bias[n] : 0.f, b1 = bias ? bias[n + 1] : 0.f;
          for (int64_t m = 0; m < M; ++m) {
            from_float(odtype, dots[m] + b0, out, m * N + n);
            from_float(odtype, dots2[m] + b1, out, m * N + n + 1);
          }
          ++n;
          continue;
        }
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
// 1 a row wider than MAX_ROW, 2 a job of more than 256 tokens, 3 float16 without compiler support,
// 4 LD < I.
int moekit_expert_ffn(int wdtype, int xdtype, const void* x, void* out, int64_t N, int64_t D, int64_t I,
                      int64_t LD, int64_t J, const int64_t* gate_up, const int64_t* down, const int32_t* tok_start,
                      const int32_t* tok, const float* w, float* h, float* xf, float* accs, int threads) {
  if (D > MAX_ROW || I > MAX_ROW) return 1;
  if (LD < I) return 4;
#ifndef __FLT16_MAX__
  if (wdtype == 1 || xdtype == 1) return 3;
#endif
  for (int64_t j = 0; j < J; ++j)
    if (tok_start[j + 1] - tok_start[j] > MAX_JOB_TOKENS) return 2;
  for (int64_t t = 0; t < N; ++t) to_float(xdtype, static_cast<const char*>(x) + t * D * itemsize(xdtype), D,
                                           xf + t * D);
  if (wdtype == 0)
    run_layer<uint16_t>(xf, D, I, LD, J, gate_up, down, tok_start, tok, w, h, accs, N, xdtype, out, threads, Bf16());
#ifdef __FLT16_MAX__
  else if (wdtype == 1)
    run_layer<_Float16>(xf, D, I, LD, J, gate_up, down, tok_start, tok, w, h, accs, N, xdtype, out, threads, F16());
#endif
  else
    run_layer<float>(xf, D, I, LD, J, gate_up, down, tok_start, tok, w, h, accs, N, xdtype, out, threads, F32());
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

// Sets the bf16 decode path's tunables (dpbf16: 1 pair dot products where compiled in, 0 the
// portable loops; prefetch_bytes: software prefetch distance, 0 off; a negative value leaves one as
// it is) and returns 1 when the pair dot products are compiled in (AVX512-BF16), else 0.
int moekit_expert_tuning(int dpbf16, int64_t prefetch_bytes) {
  if (dpbf16 >= 0) g_dpbf16 = dpbf16 && MOEKIT_DPBF16;
  if (prefetch_bytes >= 0) g_prefetch = prefetch_bytes;
  return MOEKIT_DPBF16;
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
