// bf16 weight rows dotted with one float vector on AVX2 (no AVX512-BF16): the decode step's
// matrix-vector products (matvec.cpp, decode.cpp's experts) on CPUs such as Zen 2/3.
//
// Why: a bf16 row must be widened to float before its multiply-adds. The portable loops (one
// row, `omp simd` reductions) ran two accumulator chains, so each step waited out the FMA latency,
// and they widened with a shuffle a load: ~20 GB/s a core with the weights in L2, ~10 from memory
// on the 2-core test machine (AMD EPYC, AVX2), whose two threads read 25-30 GB/s. Here:
//   - the vector x is stored once per call "even/odd" (xeo: each 16 elements as the 8 even ones,
//     then the 8 odd ones), so a 256-bit load of 16 bf16 weights gives both float vectors with one
//     shift (even) and one mask (odd), no shuffle;
//   - S rows are read at once (S independent streams; the callers take rows far apart in memory,
//     which the hardware prefetchers follow as separate streams), two accumulators a row, each row
//     prefetched PREFETCH_BYTES ahead.
// A probe of 256 MB on two threads (4 streams, 2 accumulators each) read 27 GB/s against the
// portable loop's 18 and a plain 4-stream read's 32.
//
// Sums are float32 in a fixed order for a row (its even, then odd lanes of each 16, two chains,
// then the lanes): a row's result does not depend on which other rows it is read with.
//
// Shapes: n elements a row (n % 32 == 0, `usable_avx2`), xeo [n] floats in even/odd order.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "common.h"

// Off where AVX512-BF16 is built in: matvec.cpp's and decode.cpp's vdpbf16ps paths are faster there
// (and keep their bits), so neither caller may take this one.
#if defined(__AVX2__) && defined(__FMA__) && !(defined(__AVX512BF16__) && defined(__AVX512F__))
#include <immintrin.h>
#define MOEKIT_DOT_AVX2 1
#else
#define MOEKIT_DOT_AVX2 0
#endif

namespace {

constexpr int64_t PREFETCH_BYTES = 512;  // ahead of each stream (the probe: 512 B a little better than none)

// Whether rows of n elements take this path: AVX2 built in, n % 32 == 0, and not switched off with
// MOEKIT_AVX2_DOT=0 (the portable loops then, for A/B runs).
inline bool usable_avx2(int64_t n) {
  static const bool on = [] {
    const char* v = std::getenv("MOEKIT_AVX2_DOT");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return MOEKIT_DOT_AVX2 && on && n % 32 == 0;
}

// xeo [n] = bf16 x [n] in even/odd order (n % 16 == 0).
inline void to_even_odd(const uint16_t* x, int64_t n, float* xeo) {
  for (int64_t b = 0; b < n; b += 16)
    for (int64_t j = 0; j < 8; ++j) {
      xeo[b + j] = bf16_to_float(x[b + 2 * j]);
      xeo[b + 8 + j] = bf16_to_float(x[b + 2 * j + 1]);
    }
}

// The position of x's element i in xeo (for writers that produce x one element at a time).
inline int64_t even_odd_slot(int64_t i) { return (i & ~int64_t{15}) + ((i & 1) ? 8 + ((i & 15) >> 1) : (i & 15) >> 1); }

#if MOEKIT_DOT_AVX2
inline float hsum8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

// out[j] = rows[j] . x for S bf16 rows of n elements (n % 32 == 0), x given as xeo.
template <int S>
inline void dots_avx2(const uint16_t* const* rows, const float* xeo, int64_t n, float* out) {
  const __m256i odd = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  __m256 even_acc[S], odd_acc[S];
  for (int j = 0; j < S; ++j) even_acc[j] = odd_acc[j] = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 32) {
    const __m256 x0 = _mm256_loadu_ps(xeo + i), x1 = _mm256_loadu_ps(xeo + i + 8);
    const __m256 x2 = _mm256_loadu_ps(xeo + i + 16), x3 = _mm256_loadu_ps(xeo + i + 24);
    for (int j = 0; j < S; ++j) {
      const uint16_t* q = rows[j] + i;
      _mm_prefetch(reinterpret_cast<const char*>(q) + PREFETCH_BYTES, _MM_HINT_T0);
      const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
      const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 16));
      even_acc[j] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v0, 16)), x0, even_acc[j]);
      odd_acc[j] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v0, odd)), x1, odd_acc[j]);
      even_acc[j] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v1, 16)), x2, even_acc[j]);
      odd_acc[j] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v1, odd)), x3, odd_acc[j]);
    }
  }
  for (int j = 0; j < S; ++j) out[j] = hsum8(_mm256_add_ps(even_acc[j], odd_acc[j]));
}
#else
template <int S>
inline void dots_avx2(const uint16_t* const* rows, const float* xeo, int64_t n, float* out) {
  for (int j = 0; j < S; ++j) {  // never called (usable_avx2 is false): the same sums, one lane at a time
    float acc = 0.f;
    for (int64_t i = 0; i < n; ++i) acc += bf16_to_float(rows[j][i]) * xeo[even_odd_slot(i)];
    out[j] = acc;
  }
}
#endif

// emit(r, row r of w [rows, n] (stride n) . x) for each r < rows, in no fixed order: four streams
// at once (the rows cut in four ranges), the rest one at a time.
template <typename Emit>
inline void rows_dots_avx2(const uint16_t* w, int64_t rows, int64_t n, const float* xeo, Emit&& emit) {
  const int64_t q = rows / 4;
  for (int64_t r = 0; r < q; ++r) {
    const uint16_t* p[4] = {w + r * n, w + (q + r) * n, w + (2 * q + r) * n, w + (3 * q + r) * n};
    float d[4];
    dots_avx2<4>(p, xeo, n, d);
    emit(r, d[0]), emit(q + r, d[1]), emit(2 * q + r, d[2]), emit(3 * q + r, d[3]);
  }
  for (int64_t r = 4 * q; r < rows; ++r) {
    const uint16_t* p[1] = {w + r * n};
    float d;
    dots_avx2<1>(p, xeo, n, &d);
    emit(r, d);
  }
}

}  // namespace
