// bf16 matrix-vector products of a CPU decode step (moekit.native.matvec):
//     out [M, N] = x [M, K] @ w [N, K]^T (+ bias [N], float32)        x, w, out bfloat16, M <= 16
//
// Why a kernel of its own: at batch 1 a projection reads each weight once, so its time is the
// weight bytes over host memory bandwidth, and a core must keep pace with its share of that
// stream. With AVX512-BF16 (Zen 4, Sapphire Rapids) one vdpbf16ps multiplies 32 bf16 pairs and
// adds them into float32 lanes: no bf16 -> float conversion pass, a quarter of the instructions of
// the portable loop (experts.cpp's moekit_linear), which on the 2-core test machine left each core
// short of the bytes it could read. Products of two bf16 values are exact in float32; the sums are
// float32, as in the portable path (the order differs, so results agree to float32 rounding).
// Without AVX512-BF16, one token (M = 1) with K % 32 == 0 goes to dot_avx2.h (four row streams at
// once, a thread's rows cut in four ranges); otherwise the same loop runs on converted floats.
//
// Work split: each thread takes one contiguous range of rows (whole ROWS-row groups), so each
// streams one region front to back (what the hardware prefetchers follow best); the result does
// not depend on the thread count.
#include <cstdint>
#include <cstring>
#include <omp.h>
#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "common.h"
#include "dot_avx2.h"

namespace {

// Weight rows per step of a thread's range. Each row is read on its own, front to back, with two
// independent sums along it: on the test machine (Zen 4) reading four rows at once (four streams
// 4 KB apart) ran at 20 instead of 28 GB/s on one core, and software prefetch did not help.
constexpr int64_t ROWS = 4;
constexpr int64_t MAX_M = 16;  // x rows per call (a decode step's tokens)

// dots [r] = w_r . x for `rows` <= ROWS consecutive rows of w (stride K), portable float path.
inline void dots_portable(const uint16_t* w, int64_t rows, const float* xf, int64_t K, float* dots) {
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* row = w + r * K;
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < K; ++i) acc += bf16_to_float(row[i]) * xf[i];
    dots[r] = acc;
  }
}

#if defined(__AVX512BF16__) && defined(__AVX512F__)
// w . x for one row (common.h's two-sum loop).
inline float dot_bf16(const uint16_t* w, const uint16_t* x, int64_t K) { return dot_bf16_pairs(w, x, K); }

// dots [r, m] = w_r . x_m for ROWS consecutive rows of w (stride K) and M rows of x, K % 32 == 0.
// One row at a time (a single sequential stream).
inline void dots_bf16(const uint16_t* w, const uint16_t* x, int64_t M, int64_t K, float* dots) {
  for (int64_t r = 0; r < ROWS; ++r)
    for (int64_t m = 0; m < M; ++m) dots[r * MAX_M + m] = dot_bf16(w + r * K, x + m * K, K);
}
constexpr bool HAVE_BF16_DOT = true;
#else
inline void dots_bf16(const uint16_t*, const uint16_t*, int64_t, int64_t, float*) {}
inline float dot_bf16(const uint16_t*, const uint16_t*, int64_t) { return 0.f; }
constexpr bool HAVE_BF16_DOT = false;
#endif

// Rows [n0, n1) of out. xf [M, K] floats are read only by the portable path.
void rows_range(const uint16_t* x, const float* xf, const uint16_t* w, const float* bias, uint16_t* out, int64_t M,
                int64_t N, int64_t K, int64_t n0, int64_t n1, bool fast) {
  float dots[ROWS * MAX_M];
  for (int64_t n = n0; n < n1; n += ROWS) {
    const int64_t rows = n + ROWS <= n1 ? ROWS : n1 - n;
    const uint16_t* wn = w + n * K;
    if (fast && rows == ROWS) {
      dots_bf16(wn, x, M, K, dots);
    } else {
      for (int64_t m = 0; m < M; ++m) {
        float d[ROWS];
        if (fast) {
          for (int64_t r = 0; r < rows; ++r) d[r] = dot_bf16(wn + r * K, x + m * K, K);
        } else {
          dots_portable(wn, rows, xf + m * K, K, d);
        }
        for (int64_t r = 0; r < rows; ++r) dots[r * MAX_M + m] = d[r];
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      const float b = bias ? bias[n + r] : 0.f;
      for (int64_t m = 0; m < M; ++m) out[m * N + n + r] = float_to_bf16(dots[r * MAX_M + m] + b);
    }
  }
}

}  // namespace

extern "C" {

// Returns 1 where this build multiplies bf16 pairs natively (AVX512-BF16), else 0.
int moekit_matvec_native_bf16() { return HAVE_BF16_DOT ? 1 : 0; }

// out [M, N] = x [M, K] @ w [N, K]^T (+ bias [N] float32, may be null), bf16 x, w, out, each
// weight row read once. xf holds M * K floats of scratch (the portable path's x). Returns 0, or
// 2 for M > 16.
int moekit_matvec_bf16(const uint16_t* x, const uint16_t* w, const float* bias, uint16_t* out, int64_t M, int64_t N,
                       int64_t K, float* xf, int threads) {
  if (M > MAX_M) return 2;
  const bool fast = HAVE_BF16_DOT && K % 32 == 0;
  if (!fast && M == 1 && usable_avx2(K)) {  // one token without bf16 hardware: dot_avx2.h's streams
    to_even_odd(x, K, xf);
    auto rows = [&](int64_t n0, int64_t n1) {
      rows_dots_avx2(w + n0 * K, n1 - n0, K, xf, [&](int64_t r, float d) {
        out[n0 + r] = float_to_bf16(d + (bias ? bias[n0 + r] : 0.f));
      });
    };
    split_rows(N, threads, N < 8 * threads || N * K * 2 < (1 << 20), rows);
    return 0;
  }
  if (!fast)
    for (int64_t m = 0; m < M; ++m) to_float(0, x + m * K, K, xf + m * K);
  const int64_t groups = (N + ROWS - 1) / ROWS;
  // below ~1 MB of weights (a router) a fork and join cost about what a second core saves
  if (threads <= 1 || groups < 2 * threads || N * K * 2 < (1 << 20)) {
    rows_range(x, xf, w, bias, out, M, N, K, 0, N, fast);
    return 0;
  }
#pragma omp parallel num_threads(threads)
  {
    const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t g0 = groups * t / nt, g1 = groups * (t + 1) / nt;
    const int64_t n0 = g0 * ROWS, n1 = g1 * ROWS < N ? g1 * ROWS : N;
    rows_range(x, xf, w, bias, out, M, N, K, n0, n1, fast);
  }
  return 0;
}

}  // extern "C"
