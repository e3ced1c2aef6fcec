// Integer dot products of int-N weight rows with int8 activations: compressed.cpp's IntRows (bits
// 2, 4, 8, the permuted layout, scale groups of whole 16-word blocks; moekit.native.compressed's
// dot="int8") and dense_q8.cpp's int8 rows (bits 8, one group per row, zero 128, natural layout --
// for 8 bits the quantized layout below is the columns in order).
//
// A row's weight is scale_g * (code - zero_g) per group g. Each activation vector (a token's x, a
// slot's h) is quantized once per matrix call to int8 with one scale per 64-byte weight block (16
// words: 128 columns at 4 bits, 256 at 2, 64 at 8),
//     x_c ~ d_b * xq_c,   d_b = max |x| over block b / 127,   xq_c = round(x_c / d_b),
// so that
//     row . x ~ sum_g scale_g * (sum_{b in g} d_b * sum_{c in b} code_c * xq_c - zero_g * sum_{c in g} d_b(c) * xq_c),
// the inner sum in int32 (unsigned codes times signed int8, four products per 32-bit lane: AVX512-VNNI
// or AVX-VNNI vpdpbusd, else AVX2 vpmaddubsw + vpmaddwd, else a scalar loop), then one float multiply
// per block by scale_g * d_b (a group of half a block: two), the zero term from the per-block sums
// kept when quantizing. Why a scale per block and not per 32 columns: a block's 16 int32 lanes then
// share one float factor, so the float work per block is one convert and one FMA (with 32-column
// scales each lane took its own activation scale: a load and a multiply more, and the int4 g128 layer
// ran at ~46% of a core's read rate, compute-bound); llama.cpp's Q8_K keeps one per 256 columns.
// Using the quantized x in the zero term too keeps the error a sum of (code - zero) * (x - d * xq):
// centred codes, not 0..2^bits-1 ones.
//
// Quantized layout of one vector of `words` words (words % 16 == 0; 16 words = 64 weight bytes = one
// block here): per block, C = 8 / bits sub-vectors of 64 int8, byte 4 * l + b of sub-vector k the
// activation of code b * C + k of word l of the block -- the code that byte b of word l holds at
// bits k * bits, so sub-vector k of the weights is (64 weight bytes >> k * bits) & mask, one shift
// and one and. scale: each block's d_b, sum: per block the sum of d_b * xq, half_sum: the same per 8
// words (for groups of half a block: int2 g128, int4 g64, int8 g32; int_row_dot_halves).
//
// Error: |x_c - d_b * xq_c| <= d_b / 2 = max_b |x| / 254 over the block's 16 * 32 / bits columns;
// the layer test holds the result to the float path within the bound it states
// (tests/native/test_int_dot.py).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"
#if defined(__AVX2__)
#include <immintrin.h>
#endif

// the AVX512 path (VL for the masked loads of a row's last, partial run of 16 groups)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__) && \
    !defined(MOEKIT_NO_AVX512)
#define MOEKIT_INT_DOT_AVX512 1
#endif

namespace {

constexpr int64_t XQ_BLOCK_WORDS = 16;  // weight words per 64-byte block: one activation scale
constexpr int64_t XQ_HALF_WORDS = 8;    // weight words of a half-block group (int_row_dot_halves)

// `rows` vectors of `words` words quantized (layout: the file comment).
struct QuantizedRows {
  std::vector<int8_t> q;     // rows * columns (columns = words * 32 / bits: one int8 per code)
  std::vector<float> scale;  // rows * words / 16: d_b per block
  std::vector<float> sum;    // rows * words / 16
  std::vector<float> half_sum;  // rows * words / 8
  int64_t words = 0, columns = 0;

  void resize(int64_t rows, int64_t w, int bits) {
    words = w;
    columns = w * (32 / bits);
    q.resize(rows * columns);
    scale.resize(rows * w / XQ_BLOCK_WORDS);
    sum.resize(rows * w / XQ_BLOCK_WORDS);
    half_sum.resize(rows * w / XQ_HALF_WORDS);
  }
};

// Whether int_row_dot (groups of whole blocks) or int_row_dot_halves (groups of 8 words) takes rows
// of `words` words in groups of group_words (P == 1: the row).
inline bool int_dot_fits(int bits, int64_t words, int64_t group_words) {
  return (bits == 2 || bits == 4 || bits == 8) && words > 0 && words % XQ_BLOCK_WORDS == 0 &&
         (group_words % XQ_BLOCK_WORDS == 0 || group_words == XQ_HALF_WORDS);
}

// Row `row` of rows: vector x in IntRows' permuted layout (column w * PER_WORD + i at i * words + w),
// or NATURAL: column c at c.
template <int BITS, bool NATURAL = false>
void quantize_row(const float* x, QuantizedRows& rows, int64_t row) {
  constexpr int PER_WORD = 32 / BITS, C = 8 / BITS;
  const int64_t words = rows.words, blocks = words / XQ_BLOCK_WORDS;
  int8_t* q = rows.q.data() + row * rows.columns;
  float* scale = rows.scale.data() + row * blocks;
  float* sum = rows.sum.data() + row * blocks;
  float* half_sum = rows.half_sum.data() + row * 2 * blocks;
  auto at = [&](int64_t w, int i) { return x[NATURAL ? w * PER_WORD + i : i * words + w]; };
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t w0 = b * XQ_BLOCK_WORDS;
    float amax = 0.f;
    for (int i = 0; i < PER_WORD; ++i)
      for (int64_t w = w0; w < w0 + XQ_BLOCK_WORDS; ++w) amax = std::fmax(amax, std::fabs(at(w, i)));
    const float d = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
    int8_t* block = q + b * 64 * C;
    int32_t total[2] = {0, 0};  // of words 0-7, 8-15
    for (int64_t l = 0; l < XQ_BLOCK_WORDS; ++l)
      for (int i = 0; i < PER_WORD; ++i) {
        const int32_t v = static_cast<int32_t>(std::nearbyint(at(w0 + l, i) * inv));
        block[(i % C) * 64 + 4 * l + i / C] = static_cast<int8_t>(v);
        total[l / XQ_HALF_WORDS] += v;
      }
    scale[b] = d;
    sum[b] = d * static_cast<float>(total[0] + total[1]);
    half_sum[2 * b] = d * static_cast<float>(total[0]);
    half_sum[2 * b + 1] = d * static_cast<float>(total[1]);
  }
}

// The 16 int32 lane sums of one 64-byte block of weight words (u) with its quantized activations
// (xq, C * 64 bytes): lane l = sum over word l's codes of code * xq. Scalar: the portable path.
template <int BITS>
inline void block_lanes_scalar(const uint32_t* u, const int8_t* xq, int32_t* lanes) {
  constexpr int C = 8 / BITS;
  constexpr uint32_t MASK = (1u << BITS) - 1;
  const uint8_t* bytes = reinterpret_cast<const uint8_t*>(u);
  for (int l = 0; l < 16; ++l) {
    int32_t acc = 0;
    for (int b = 0; b < 4; ++b)
      for (int k = 0; k < C; ++k) acc += static_cast<int32_t>((bytes[4 * l + b] >> (k * BITS)) & MASK) * xq[k * 64 + 4 * l + b];
    lanes[l] = acc;
  }
}

// A float16 group scale as float (one F16C instruction where there is one; common.h's otherwise).
inline float group_scale(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  return half_to_float(h);
#endif
}

// Which integer dot product int_row_dot uses on this build (compressed.py reports it).
inline const char* int_dot_isa() {
#if defined(MOEKIT_INT_DOT_AVX512)
  return "avx512-vnni";
#elif defined(__AVX2__) && defined(__AVXVNNI__)
  return "avx-vnni";
#elif defined(__AVX2__)
  return "avx2";
#else
  return "scalar";
#endif
}

// Group scales as the int-N forms store them: float16 per group.
struct HalfScales {
  const uint16_t* scale;
  float operator[](int64_t g) const { return group_scale(scale[g]); }
};

#if defined(MOEKIT_INT_DOT_AVX512)
// The group scales g .. g + 15 as floats, those outside mask m zero: one vcvtph2ps for stored
// float16 ones, a loop for any other Scales (dense_q8's one scale a row).
inline __m512 scales16(HalfScales s, int64_t g, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, s.scale + g));
}
template <typename Scales>
inline __m512 scales16(const Scales& s, int64_t g, __mmask16 m) {
  alignas(64) float v[16];
  for (int i = 0; i < 16; ++i) v[i] = (m >> i) & 1 ? s[g + i] : 0.f;
  return _mm512_load_ps(v);
}

// The zero points z .. z + 15 (uint8) as floats, those outside mask m zero.
inline __m512 zeros16(const uint8_t* z, __mmask16 m) {
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, z)));
}

// The 16 int32 lane sums of block b (lane l: word l's codes times their int8 activations), as floats.
template <int BITS>
inline __m512 block_lanes(const uint32_t* u, const int8_t* q, int64_t b) {
  constexpr int C = 8 / BITS;
  const __m512i mask = _mm512_set1_epi8(static_cast<char>((1u << BITS) - 1));
  const __m512i qv = _mm512_loadu_si512(u + b * XQ_BLOCK_WORDS);
  const int8_t* xb = q + b * 64 * C;
  __m512i acc = _mm512_dpbusd_epi32(_mm512_setzero_si512(), BITS == 8 ? qv : _mm512_and_si512(qv, mask),
                                    _mm512_loadu_si512(xb));
  for (int k = 1; k < C; ++k)
    acc = _mm512_dpbusd_epi32(acc, _mm512_and_si512(_mm512_srli_epi32(qv, k * BITS), mask), _mm512_loadu_si512(xb + 64 * k));
  return _mm512_cvtepi32_ps(acc);
}
#elif defined(__AVX2__)
// Block b's int32 lane sums, words 0-7 and 8-15 added lane by lane (the block shares one scale).
template <int BITS>
inline __m256i block_lanes_avx2(const uint32_t* u, const int8_t* q, int64_t b, int half_first = 0, int half_end = 2) {
  constexpr int C = 8 / BITS;
  const __m256i mask = _mm256_set1_epi8(static_cast<char>((1u << BITS) - 1));
  const int8_t* xb = q + b * 64 * C;
  __m256i acc = _mm256_setzero_si256();
#if !defined(__AVXVNNI__)
  // Below 8 bits the vpmaddubsw pairs of all C sub-vectors of both halves add up in int16 first, one
  // vpmaddwd a block: at most 2 * C pairs a lane, each |pair| <= 2 * (2^bits - 1) * 127 (int4: 4 * 3810,
  // int2: 8 * 762, both < 2^15). That drops C * halves - 1 vpmaddwd and vpaddd a block.
  __m256i acc16 = _mm256_setzero_si256();
#endif
  for (int half = half_first; half < half_end; ++half) {
    const __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(u + b * XQ_BLOCK_WORDS + 8 * half));
    for (int k = 0; k < C; ++k) {
      const __m256i codes = _mm256_and_si256(_mm256_srli_epi32(qv, k * BITS), mask);
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + 64 * k + 32 * half));
#if defined(__AVXVNNI__)
      acc = _mm256_dpbusd_avx_epi32(acc, codes, xv);
#else
      if constexpr (BITS < 8) {  // pairs of products fit int16: (2^bits - 1) * 127 * 2 < 2^15
        acc16 = _mm256_add_epi16(acc16, _mm256_maddubs_epi16(codes, xv));
      } else {  // 255 * 127 * 2 would saturate vpmaddubsw: widen to int16 first
        const __m256i lo = _mm256_madd_epi16(_mm256_unpacklo_epi8(codes, _mm256_setzero_si256()),
                                             _mm256_srai_epi16(_mm256_unpacklo_epi8(xv, xv), 8));
        const __m256i hi = _mm256_madd_epi16(_mm256_unpackhi_epi8(codes, _mm256_setzero_si256()),
                                             _mm256_srai_epi16(_mm256_unpackhi_epi8(xv, xv), 8));
        // lanes of adjacent pairs added: per word sums (in some lane order; the block's lanes share
        // one scale, so only their total counts)
        acc = _mm256_add_epi32(acc, _mm256_hadd_epi32(lo, hi));
      }
#endif
    }
  }
#if !defined(__AVXVNNI__)
  if constexpr (BITS < 8) acc = _mm256_madd_epi16(acc16, _mm256_set1_epi16(1));
#endif
  return acc;
}

// The sum of v's 8 lanes: three dependent adds (a store and 8 serial adds took ~30 cycles a row, which
// at int2's 256-byte down rows was about as long as the row's dot products).
inline float sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Group scales g .. g + 7 as floats (one vcvtph2ps for stored float16 ones, a loop for any other
// Scales), and zero points z .. z + 7 (uint8) as floats.
inline __m256 scales8(HalfScales s, int64_t g) {
#if defined(__F16C__)
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s.scale + g)));
#else
  alignas(32) float v[8];
  for (int i = 0; i < 8; ++i) v[i] = s[g + i];
  return _mm256_load_ps(v);
#endif
}
template <typename Scales>
inline __m256 scales8(const Scales& s, int64_t g) {
  alignas(32) float v[8];
  for (int i = 0; i < 8; ++i) v[i] = s[g + i];
  return _mm256_load_ps(v);
}
inline __m256 zeros8(const uint8_t* z) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(z))));
}
#endif

// Row . x for one int-N row (u: words words, scale[g] a float-valued group scale (HalfScales), zero [P]
// uint8, groups of group_words words) and one quantized vector (q, xs, xsum: its row of a QuantizedRows).
template <int BITS, typename Scales>
float int_row_dot(const uint32_t* u, Scales scale, const uint8_t* zero, int64_t group_words, const int8_t* q,
                  const float* xs, const float* xsum, int64_t words) {
  const int64_t blocks = words / XQ_BLOCK_WORDS, group_blocks = group_words / XQ_BLOCK_WORDS;
#if defined(MOEKIT_INT_DOT_AVX512)
  // two independent chains of FMAs (named registers: an array indexed at run time may live in memory)
  __m512 t0 = _mm512_setzero_ps(), t1 = _mm512_setzero_ps();
  if (group_blocks == 1) {  // a group per block (int4 g128): 16 blocks' factors and zero terms at once
    __m512 tz = _mm512_setzero_ps();
    alignas(64) float f[16];  // block b0 + i's scale_g * d_b
    for (int64_t b0 = 0; b0 < blocks; b0 += 16) {
      const int n = blocks - b0 < 16 ? static_cast<int>(blocks - b0) : 16;
      const __mmask16 m = static_cast<__mmask16>((1u << n) - 1);
      const __m512 s = scales16(scale, b0, m);
      _mm512_store_ps(f, _mm512_mul_ps(s, _mm512_maskz_loadu_ps(m, xs + b0)));
      tz = _mm512_fmadd_ps(_mm512_mul_ps(s, zeros16(zero + b0, m)), _mm512_maskz_loadu_ps(m, xsum + b0), tz);
      int i = 0;
      for (; i + 2 <= n; i += 2) {
        t0 = _mm512_fmadd_ps(block_lanes<BITS>(u, q, b0 + i), _mm512_set1_ps(f[i]), t0);
        t1 = _mm512_fmadd_ps(block_lanes<BITS>(u, q, b0 + i + 1), _mm512_set1_ps(f[i + 1]), t1);
      }
      if (i < n) t0 = _mm512_fmadd_ps(block_lanes<BITS>(u, q, b0 + i), _mm512_set1_ps(f[i]), t0);
    }
    return _mm512_reduce_add_ps(_mm512_sub_ps(_mm512_add_ps(t0, t1), tz));  // one reduction a row
  }
  float zero_term = 0.f;  // groups of several blocks (a row's one group: dense_q8): the blocks in pairs
  for (int64_t b0 = 0, g = 0; b0 < blocks; b0 += group_blocks, ++g) {
    const int64_t b1 = b0 + group_blocks < blocks ? b0 + group_blocks : blocks;
    __m512 y0 = _mm512_setzero_ps(), y1 = _mm512_setzero_ps();
    float x_sum = 0.f;
    int64_t b = b0;
    for (; b + 2 <= b1; b += 2) {
      y0 = _mm512_fmadd_ps(block_lanes<BITS>(u, q, b), _mm512_set1_ps(xs[b]), y0);
      y1 = _mm512_fmadd_ps(block_lanes<BITS>(u, q, b + 1), _mm512_set1_ps(xs[b + 1]), y1);
      x_sum += xsum[b] + xsum[b + 1];
    }
    if (b < b1) {
      y0 = _mm512_fmadd_ps(block_lanes<BITS>(u, q, b), _mm512_set1_ps(xs[b]), y0);
      x_sum += xsum[b];
    }
    const float s = scale[g];
    t0 = _mm512_fmadd_ps(y0, _mm512_set1_ps(s), t0);
    t1 = _mm512_fmadd_ps(y1, _mm512_set1_ps(s), t1);
    zero_term += s * static_cast<float>(zero[g]) * x_sum;
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(t0, t1)) - zero_term;
#elif defined(__AVX2__)
  __m256 total = _mm256_setzero_ps();
  float zero_term = 0.f;
  if (group_blocks == 1) {  // int4 g128, int2 g256: 8 blocks' factors and zero terms in one vector each
    // (a row's last n < 8 blocks from zero-padded copies), two chains of FMAs, one reduction a row
    __m256 t1 = _mm256_setzero_ps(), tz = _mm256_setzero_ps();
    alignas(32) float f[8];  // block b0 + i's scale_g * d_b
    for (int64_t b0 = 0; b0 < blocks; b0 += 8) {
      const int n = blocks - b0 < 8 ? static_cast<int>(blocks - b0) : 8;
      __m256 s, z, d, x;
      if (n == 8) {
        s = scales8(scale, b0), z = zeros8(zero + b0), d = _mm256_loadu_ps(xs + b0), x = _mm256_loadu_ps(xsum + b0);
      } else {
        alignas(32) float vs[8] = {}, vz[8] = {}, vd[8] = {}, vx[8] = {};
        for (int i = 0; i < n; ++i) vs[i] = scale[b0 + i], vz[i] = zero[b0 + i], vd[i] = xs[b0 + i], vx[i] = xsum[b0 + i];
        s = _mm256_load_ps(vs), z = _mm256_load_ps(vz), d = _mm256_load_ps(vd), x = _mm256_load_ps(vx);
      }
      _mm256_store_ps(f, _mm256_mul_ps(s, d));
      tz = _mm256_fmadd_ps(_mm256_mul_ps(s, z), x, tz);
      int i = 0;
      for (; i + 2 <= n; i += 2) {
        total = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_lanes_avx2<BITS>(u, q, b0 + i)), _mm256_set1_ps(f[i]), total);
        t1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_lanes_avx2<BITS>(u, q, b0 + i + 1)), _mm256_set1_ps(f[i + 1]), t1);
      }
      if (i < n) total = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_lanes_avx2<BITS>(u, q, b0 + i)), _mm256_set1_ps(f[i]), total);
    }
    return sum8(_mm256_sub_ps(_mm256_add_ps(total, t1), tz));
  }
  for (int64_t b0 = 0, g = 0; b0 < blocks; b0 += group_blocks, ++g) {
    const int64_t b1 = b0 + group_blocks < blocks ? b0 + group_blocks : blocks;
    __m256 y = _mm256_setzero_ps();
    float x_sum = 0.f;
    for (int64_t b = b0; b < b1; ++b) {
      y = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_lanes_avx2<BITS>(u, q, b)), _mm256_set1_ps(xs[b]), y);
      x_sum += xsum[b];
    }
    const float s = scale[g];
    total = _mm256_fmadd_ps(y, _mm256_set1_ps(s), total);
    zero_term += s * static_cast<float>(zero[g]) * x_sum;
  }
  return sum8(total) - zero_term;
#else
  float acc = 0.f, zero_term = 0.f;
  for (int64_t b0 = 0, g = 0; b0 < blocks; b0 += group_blocks, ++g) {
    const int64_t b1 = b0 + group_blocks < blocks ? b0 + group_blocks : blocks;
    float y = 0.f, x_sum = 0.f;
    for (int64_t b = b0; b < b1; ++b) {
      int32_t lanes[16];
      block_lanes_scalar<BITS>(u + b * XQ_BLOCK_WORDS, q + b * 64 * (8 / BITS), lanes);
      int32_t total = 0;
      for (int l = 0; l < 16; ++l) total += lanes[l];
      y += xs[b] * static_cast<float>(total);
      x_sum += xsum[b];
    }
    const float s = scale[g];
    acc += s * y;
    zero_term += s * static_cast<float>(zero[g]) * x_sum;
  }
  return acc - zero_term;
#endif
}

#if defined(MOEKIT_INT_DOT_AVX512)
// int_row_dot of one row (groups of one block) with N vectors at once (their q, xs, xsum rows), into
// out[0..N): each block's codes are loaded, shifted and masked once for the N vectors, where a call a
// vector decoded them N times (a many-token job: a CPU prefill). Each vector's arithmetic is
// int_row_dot's, in the same order, so each result is its bits.
template <int BITS, int N>
inline void int_row_dot_blocks_n(const uint32_t* u, HalfScales scale, const uint8_t* zero, const int8_t* const* q,
                                 const float* const* xs, const float* const* xsum, int64_t words, float* out) {
  constexpr int C = 8 / BITS;
  const int64_t blocks = words / XQ_BLOCK_WORDS;
  const __m512i mask = _mm512_set1_epi8(static_cast<char>((1u << BITS) - 1));
  __m512 t0[N], t1[N], tz[N];
  for (int v = 0; v < N; ++v) t0[v] = t1[v] = tz[v] = _mm512_setzero_ps();
  alignas(64) float f[N][16];
  for (int64_t b0 = 0; b0 < blocks; b0 += 16) {
    const int n = blocks - b0 < 16 ? static_cast<int>(blocks - b0) : 16;
    const __mmask16 m = static_cast<__mmask16>((1u << n) - 1);
    const __m512 s = scales16(scale, b0, m), sz = _mm512_mul_ps(s, zeros16(zero + b0, m));
    for (int v = 0; v < N; ++v) {
      _mm512_store_ps(f[v], _mm512_mul_ps(s, _mm512_maskz_loadu_ps(m, xs[v] + b0)));
      tz[v] = _mm512_fmadd_ps(sz, _mm512_maskz_loadu_ps(m, xsum[v] + b0), tz[v]);
    }
    for (int i = 0; i < n; ++i) {
      const __m512i qv = _mm512_loadu_si512(u + (b0 + i) * XQ_BLOCK_WORDS);
      __m512i codes[C];
      codes[0] = BITS == 8 ? qv : _mm512_and_si512(qv, mask);
      for (int k = 1; k < C; ++k) codes[k] = _mm512_and_si512(_mm512_srli_epi32(qv, k * BITS), mask);
      for (int v = 0; v < N; ++v) {
        const int8_t* xb = q[v] + (b0 + i) * 64 * C;
        __m512i acc = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes[0], _mm512_loadu_si512(xb));
        for (int k = 1; k < C; ++k) acc = _mm512_dpbusd_epi32(acc, codes[k], _mm512_loadu_si512(xb + 64 * k));
        // int_row_dot's chains: even blocks of a run of 16 into t0, odd into t1 (its last odd-count block: t0)
        if (i & 1)
          t1[v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(f[v][i]), t1[v]);
        else
          t0[v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(f[v][i]), t0[v]);
      }
    }
  }
  for (int v = 0; v < N; ++v) out[v] = _mm512_reduce_add_ps(_mm512_sub_ps(_mm512_add_ps(t0[v], t1[v]), tz[v]));
}
#endif

// int_row_dot for groups of half a block (XQ_HALF_WORDS words: int2 g128, int4 g64, int8 g32):
// words 0-7 of block b are group 2b, words 8-15 group 2b + 1, so each block's 16 lane sums take
// two factors scale_g * d_b; xhalf: the vector's half_sum row. (These groups once ran in float:
// int2 g128 at 10 G weights/s on a core of the 2-core EPYC VM against int2 g256's 32 in int8.)
template <int BITS, typename Scales>
float int_row_dot_halves(const uint32_t* u, Scales scale, const uint8_t* zero, const int8_t* q, const float* xs,
                         const float* xhalf, int64_t words) {
  const int64_t blocks = words / XQ_BLOCK_WORDS;
#if defined(MOEKIT_INT_DOT_AVX512)
  // 8 blocks (16 groups) at a time: their factors and zero terms in one vector each
  const __m512i pairs = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);  // d_b for groups 2b, 2b + 1
  __m512 t0 = _mm512_setzero_ps(), t1 = _mm512_setzero_ps(), tz = _mm512_setzero_ps();
  alignas(64) float f[16];  // group 2 * b0 + i's scale_g * d_b
  auto factor = [&](int i) { return _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(f[2 * i]), _mm512_set1_ps(f[2 * i + 1])); };
  for (int64_t b0 = 0; b0 < blocks; b0 += 8) {
    const int n = blocks - b0 < 8 ? static_cast<int>(blocks - b0) : 8;
    const __mmask16 m = static_cast<__mmask16>((1u << (2 * n)) - 1), mb = static_cast<__mmask16>((1u << n) - 1);
    const __m512 s = scales16(scale, 2 * b0, m);
    _mm512_store_ps(f, _mm512_mul_ps(s, _mm512_permutexvar_ps(pairs, _mm512_maskz_loadu_ps(mb, xs + b0))));
    tz = _mm512_fmadd_ps(_mm512_mul_ps(s, zeros16(zero + 2 * b0, m)), _mm512_maskz_loadu_ps(m, xhalf + 2 * b0), tz);
    int i = 0;
    for (; i + 2 <= n; i += 2) {
      t0 = _mm512_fmadd_ps(block_lanes<BITS>(u, q, b0 + i), factor(i), t0);
      t1 = _mm512_fmadd_ps(block_lanes<BITS>(u, q, b0 + i + 1), factor(i + 1), t1);
    }
    if (i < n) t0 = _mm512_fmadd_ps(block_lanes<BITS>(u, q, b0 + i), factor(i), t0);
  }
  return _mm512_reduce_add_ps(_mm512_sub_ps(_mm512_add_ps(t0, t1), tz));  // one reduction a row
#else
#if defined(__AVX2__)
  // 4 blocks (8 groups) at a time: their factors and zero terms in one vector each (a row's last n < 4
  // blocks from zero-padded copies), two chains of FMAs, one reduction a row
  const __m256i pairs = _mm256_set_epi32(3, 3, 2, 2, 1, 1, 0, 0);  // d_b for groups 2b, 2b + 1
  __m256 total = _mm256_setzero_ps(), t1 = _mm256_setzero_ps(), tz = _mm256_setzero_ps();
  alignas(32) float f[8];  // group 2 * b0 + i's scale_g * d_b
  for (int64_t b0 = 0; b0 < blocks; b0 += 4) {
    const int n = blocks - b0 < 4 ? static_cast<int>(blocks - b0) : 4;  // a row's last n < 4 from padded copies
    __m256 s, z, x;
    __m128 d4;
    if (n == 4) {
      s = scales8(scale, 2 * b0), z = zeros8(zero + 2 * b0), x = _mm256_loadu_ps(xhalf + 2 * b0);
      d4 = _mm_loadu_ps(xs + b0);
    } else {
      alignas(32) float vs[8] = {}, vz[8] = {}, vx[8] = {};
      alignas(16) float vd[4] = {};
      for (int i = 0; i < 2 * n; ++i) vs[i] = scale[2 * b0 + i], vz[i] = zero[2 * b0 + i], vx[i] = xhalf[2 * b0 + i];
      for (int i = 0; i < n; ++i) vd[i] = xs[b0 + i];
      s = _mm256_load_ps(vs), z = _mm256_load_ps(vz), x = _mm256_load_ps(vx), d4 = _mm_load_ps(vd);
    }
    _mm256_store_ps(f, _mm256_mul_ps(s, _mm256_permutevar8x32_ps(_mm256_castps128_ps256(d4), pairs)));
    tz = _mm256_fmadd_ps(_mm256_mul_ps(s, z), x, tz);
    for (int i = 0; i < n; ++i) {  // a block's low and high 8 words: one group each
      total = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_lanes_avx2<BITS>(u, q, b0 + i, 0, 1)), _mm256_set1_ps(f[2 * i]), total);
      t1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_lanes_avx2<BITS>(u, q, b0 + i, 1, 2)), _mm256_set1_ps(f[2 * i + 1]), t1);
    }
  }
  return sum8(_mm256_sub_ps(_mm256_add_ps(total, t1), tz));  // one reduction a row
#else
  float zero_term = 0.f;
  for (int64_t g = 0; g < 2 * blocks; ++g) zero_term += scale[g] * static_cast<float>(zero[g]) * xhalf[g];
  float acc = 0.f;
  for (int64_t b = 0; b < blocks; ++b) {
    int32_t lanes[16];
    block_lanes_scalar<BITS>(u + b * XQ_BLOCK_WORDS, q + b * 64 * (8 / BITS), lanes);
    for (int half = 0; half < 2; ++half) {
      int32_t total = 0;
      for (int l = 8 * half; l < 8 * half + 8; ++l) total += lanes[l];
      acc += scale[2 * b + half] * xs[b] * static_cast<float>(total);
    }
  }
  return acc - zero_term;
#endif
#endif
}

}  // namespace
