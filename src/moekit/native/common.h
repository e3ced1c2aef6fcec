// What the native kernels share (included by each *.cpp of this folder; internal linkage in each):
// dtype codes and conversions, float dot products, and the layout constants of the two-stage
// expert layers (experts.cpp, compressed.cpp).
// dtypes: 0 = bfloat16, 1 = float16, 2 = float32.
#pragma once

#include <cstdint>
#include <cstring>

#include <omp.h>
#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t ROWS_PER_ITEM = 8;  // ffn rows (stage 1) or hidden rows (stage 2) per work item
constexpr int MAX_JOB_TOKENS = 256;   // tokens one job (an expert's share of a call) may hold

inline float bf16_to_float(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, as torch does
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

#if defined(__AVX512BF16__) && defined(__AVX512F__)
// w . x for one bf16 row of n elements (x bf16 too, n % 32 == 0) with AVX512-BF16 pair products: 64
// elements an iteration into two sums, then a 32-element tail. Why two and not four: on the 2-core
// test machine (Zen 4) a 206 MB matvec read 25 GB/s on one core with two sums of 64 elements an
// iteration and 18 GB/s with four of 128 (interleaved runs of the same rows; llama.cpp's
// ggml_vec_dot_bf16 takes 64 too); 28 vs 24 on two. matvec.cpp's rows and decode.cpp's experts.
inline float dot_bf16_pairs(const uint16_t* w, const uint16_t* x, int64_t n) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w + i), (__m512bh)_mm512_loadu_si512(x + i));
    a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(w + i + 32), (__m512bh)_mm512_loadu_si512(x + i + 32));
  }
  if (i < n) a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w + i), (__m512bh)_mm512_loadu_si512(x + i));
  return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}
#endif

inline float half_to_float(uint16_t h) {  // IEEE float16 -> float32, exactly
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    float f = static_cast<float>(mant) * 5.9604644775390625e-8f;  // subnormal: mant * 2^-24
    std::memcpy(&u, &f, 4);
    u |= sign;
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (mant << 13);
  } else {
    u = sign | ((exp + 112) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}


inline int64_t itemsize(int dtype) { return dtype == 2 ? 4 : 2; }

// Converts n elements of dtype `dtype` at p to float.
inline void to_float(int dtype, const void* p, int64_t n, float* out) {
  if (dtype == 0) {
    const uint16_t* s = static_cast<const uint16_t*>(p);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_float(s[i]);
#ifdef __FLT16_MAX__
  } else if (dtype == 1) {
    const _Float16* s = static_cast<const _Float16*>(p);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(s[i]);
#endif
  } else {
    std::memcpy(out, p, n * sizeof(float));
  }
}

// Stores v as element i of the dtype `dtype` array at p.
inline void from_float(int dtype, float v, void* p, int64_t i) {
  if (dtype == 0) static_cast<uint16_t*>(p)[i] = float_to_bf16(v);
#ifdef __FLT16_MAX__
  else if (dtype == 1) static_cast<_Float16*>(p)[i] = static_cast<_Float16>(v);
#endif
  else static_cast<float*>(p)[i] = v;
}

inline float dot(const float* a, const float* b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

// out[k] = a . (vec + which[k] * stride) (which == nullptr: k * stride) for k < count: eight vectors
// at a time share each load of a, in eight independent sums, then four, then one. (One dot a vector
// read a again for each and ran one dependent chain: a 64-token prefill's bf16 experts ran at ~15
// GFLOP/s a core on the 2-core AVX2 machine.)
inline void dots_many(const float* a, const float* vec, int64_t stride, const int32_t* which, int count, int64_t n,
                 float* out) {
  auto at = [&](int k) { return vec + (which ? which[k] : k) * stride; };
  int k = 0;
  for (; k + 8 <= count; k += 8) {
    const float *b0 = at(k), *b1 = at(k + 1), *b2 = at(k + 2), *b3 = at(k + 3), *b4 = at(k + 4), *b5 = at(k + 5),
                *b6 = at(k + 6), *b7 = at(k + 7);
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f, s4 = 0.f, s5 = 0.f, s6 = 0.f, s7 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3, s4, s5, s6, s7)
    for (int64_t i = 0; i < n; ++i) {
      const float v = a[i];
      s0 += v * b0[i], s1 += v * b1[i], s2 += v * b2[i], s3 += v * b3[i];
      s4 += v * b4[i], s5 += v * b5[i], s6 += v * b6[i], s7 += v * b7[i];
    }
    out[k] = s0, out[k + 1] = s1, out[k + 2] = s2, out[k + 3] = s3;
    out[k + 4] = s4, out[k + 5] = s5, out[k + 6] = s6, out[k + 7] = s7;
  }
  for (; k + 4 <= count; k += 4) {
    const float *b0 = at(k), *b1 = at(k + 1), *b2 = at(k + 2), *b3 = at(k + 3);
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t i = 0; i < n; ++i) {
      const float v = a[i];
      s0 += v * b0[i], s1 += v * b1[i], s2 += v * b2[i], s3 += v * b3[i];
    }
    out[k] = s0, out[k + 1] = s1, out[k + 2] = s2, out[k + 3] = s3;
  }
  for (; k < count; ++k) out[k] = dot(a, at(k), n);
}

// dots_many for two rows a0, a1 at once (out0[k] = a0 . vec_k, out1[k] = a1 . vec_k): four vectors at
// a time, each load of a vector serving both rows (six loads for eight multiply-adds, where one row
// took nine for eight), then one at a time.
inline void dots_many2(const float* a0, const float* a1, const float* vec, int64_t stride, const int32_t* which,
                       int count, int64_t n, float* out0, float* out1) {
  auto at = [&](int k) { return vec + (which ? which[k] : k) * stride; };
  int k = 0;
  for (; k + 4 <= count; k += 4) {
    const float *b0 = at(k), *b1 = at(k + 1), *b2 = at(k + 2), *b3 = at(k + 3);
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f, t0 = 0.f, t1 = 0.f, t2 = 0.f, t3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3, t0, t1, t2, t3)
    for (int64_t i = 0; i < n; ++i) {
      const float u = a0[i], v = a1[i], c0 = b0[i], c1 = b1[i], c2 = b2[i], c3 = b3[i];
      s0 += u * c0, s1 += u * c1, s2 += u * c2, s3 += u * c3;
      t0 += v * c0, t1 += v * c1, t2 += v * c2, t3 += v * c3;
    }
    out0[k] = s0, out0[k + 1] = s1, out0[k + 2] = s2, out0[k + 3] = s3;
    out1[k] = t0, out1[k + 1] = t1, out1[k + 2] = t2, out1[k + 3] = t3;
  }
  for (; k < count; ++k) {
    const float* b = at(k);
    float s = 0.f, t = 0.f;
#pragma omp simd reduction(+ : s, t)
    for (int64_t i = 0; i < n; ++i) s += a0[i] * b[i], t += a1[i] * b[i];
    out0[k] = s, out1[k] = t;
  }
}

// Floats between two threads' output accumulators: n rounded up to a cache line, plus one line
// (neighbouring threads writing one line would pass it between cores on every row).
inline int64_t acc_stride(int64_t n) { return (n + 15) / 16 * 16 + 16; }

// Stage 2 of a two-stage layer (experts.cpp, compressed_layer.h) reads each job's rows of a work
// item as one stream: with 8 rows an item and the jobs inner, a thread read 8 experts' down rows at
// once in 2 KB steps, and a layer's top-8 ran at 65% of one core's read rate.
constexpr int64_t STAGE2_ROWS = 64;   // hidden rows per stage-2 item (at most)
constexpr int64_t STAGE2_ACC = 4096;  // floats of a thread's stage-2 accumulators (rows x tokens)

// Returns stage 2's hidden rows per work item for N tokens on `threads` threads: as many as
// STAGE2_ACC accumulators hold, at most STAGE2_ROWS, and at most D / (4 x threads) (at least 8) so
// the items spread over the threads (64-row items give a D = 2048 layer 32 items: 2.1 a thread on
// 15 threads, one thread doing 3 of them).
inline int64_t stage2_rows(int64_t D, int64_t N, int threads) {
  const int64_t fit = N > 0 ? STAGE2_ACC / N : STAGE2_ROWS;
  const int64_t balanced = threads > 0 ? (D + 4 * threads - 1) / (4 * threads) : STAGE2_ROWS;
  const int64_t cap = balanced < 8 ? 8 : balanced < STAGE2_ROWS ? balanced : STAGE2_ROWS;
  return fit < 1 ? 1 : fit > cap ? cap : fit;
}

// Runs rows(n0, n1) over rows 0..N-1: on this thread when `serial` (too little work for a fork and
// join to pay), else split in equal contiguous ranges over `threads` OpenMP threads.
template <typename F>
inline void split_rows(int64_t N, int threads, bool serial, F&& rows) {
  if (serial || threads <= 1) {
    rows(int64_t{0}, N);
    return;
  }
#pragma omp parallel num_threads(threads)
  {
    const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
    rows(N * t / nt, N * (t + 1) / nt);
  }
}

// Element converters for templated row loops.
struct Bf16 { float operator()(uint16_t v) const { return bf16_to_float(v); } };
struct F32 { float operator()(float v) const { return v; } };
#ifdef __FLT16_MAX__  // the compiler has _Float16 (GCC 12+, clang 15+ on x86-64)
struct F16 { float operator()(_Float16 v) const { return static_cast<float>(v); } };
#endif

}  // namespace
