// Integer dot products of int-N weight rows with int8 activations: compressed.cpp's IntRows (bits
// 2, 4, 8, the permuted layout, scale groups of whole 16-word blocks; moekit.native.compressed's
// dot="int8") and dense_q8.cpp's int8 rows (bits 8, one group per row, zero 128, natural layout --
// for 8 bits the quantized layout below is the columns in order).
//
// A row's weight is scale_g * (code - zero_g) per group g. Each activation vector (a token's x, a
// slot's h) is quantized once per matrix call to int8 with one scale per 32 columns,
//     x_c ~ d_b * xq_c,   d_b = max |x| over block b / 127,   xq_c = round(x_c / d_b),
// so that
//     row . x ~ sum_g scale_g * (sum_{c in g} code_c * d_b(c) * xq_c - zero_g * sum_{c in g} d_b(c) * xq_c),
// the first sum in int32 (unsigned codes times signed int8, four products per 32-bit lane: AVX512-VNNI
// or AVX-VNNI vpdpbusd, else AVX2 vpmaddubsw + vpmaddwd, else a scalar loop), the second from the
// per-block sums kept when quantizing. Using the quantized x in the zero term too keeps the error a
// sum of (code - zero) * (x - d * xq): centred codes, not 0..2^bits-1 ones.
//
// Quantized layout of one vector of `words` words (words % 16 == 0; 16 words = 64 weight bytes = one
// block here): per block, C = 8 / bits sub-vectors of 64 int8, byte 4 * l + b of sub-vector k the
// activation of code b * C + k of word l of the block -- the code that byte b of word l holds at
// bits k * bits, so sub-vector k of the weights is (64 weight bytes >> k * bits) & mask, one shift
// and one and. scale: the activation scale of each word (its 32-column block's), sum: per 16-word
// block the sum of d * xq, half_sum: the same per 8 words (for groups of half a block: int2 g128,
// int4 g64, int8 g32; int_row_dot_halves).
//
// Error: |x_c - d_b * xq_c| <= d_b / 2 = max_b |x| / 254; the layer test holds the result to the
// float path within the bound it states (tests/native/test_int_dot.py).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"
#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int XQ_COLUMNS = 32;      // columns per activation scale
constexpr int64_t XQ_BLOCK_WORDS = 16;  // weight words per 64-byte block
constexpr int64_t XQ_HALF_WORDS = 8;    // weight words of a half-block group (int_row_dot_halves)

// `rows` vectors of `words` words quantized (layout: the file comment).
struct QuantizedRows {
  std::vector<int8_t> q;     // rows * columns (columns = words * 32 / bits: one int8 per code)
  std::vector<float> scale;  // rows * words
  std::vector<float> sum;    // rows * words / 16
  std::vector<float> half_sum;  // rows * words / 8
  int64_t words = 0, columns = 0;

  void resize(int64_t rows, int64_t w, int bits) {
    words = w;
    columns = w * (32 / bits);
    q.resize(rows * columns);
    scale.resize(rows * w);
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
  constexpr int PER_WORD = 32 / BITS, C = 8 / BITS, BLOCK_WORDS = XQ_COLUMNS / PER_WORD;
  const int64_t words = rows.words;
  int8_t* q = rows.q.data() + row * rows.columns;
  float* scale = rows.scale.data() + row * words;
  float* sum = rows.sum.data() + row * (words / XQ_BLOCK_WORDS);
  float* half_sum = rows.half_sum.data() + row * (words / XQ_HALF_WORDS);
  for (int64_t b = 0; b < words / XQ_BLOCK_WORDS; ++b) sum[b] = 0.f;
  for (int64_t b = 0; b < words / XQ_HALF_WORDS; ++b) half_sum[b] = 0.f;
  for (int64_t w0 = 0; w0 < words; w0 += BLOCK_WORDS) {
    float amax = 0.f;
    for (int i = 0; i < PER_WORD; ++i)
      for (int64_t w = w0; w < w0 + BLOCK_WORDS; ++w)
        amax = std::fmax(amax, std::fabs(x[NATURAL ? w * PER_WORD + i : i * words + w]));
    const float d = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
    int32_t total = 0;
    for (int64_t w = w0; w < w0 + BLOCK_WORDS; ++w) {
      scale[w] = d;
      int8_t* block = q + (w / XQ_BLOCK_WORDS) * 64 * C;
      const int64_t l = w % XQ_BLOCK_WORDS;
      for (int i = 0; i < PER_WORD; ++i) {
        const int32_t v = static_cast<int32_t>(std::nearbyint(x[NATURAL ? w * PER_WORD + i : i * words + w] * inv));
        block[(i % C) * 64 + 4 * l + i / C] = static_cast<int8_t>(v);
        total += v;
      }
    }
    sum[w0 / XQ_BLOCK_WORDS] += d * static_cast<float>(total);
    half_sum[w0 / XQ_HALF_WORDS] += d * static_cast<float>(total);  // BLOCK_WORDS <= 8 divides 8
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
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && !defined(MOEKIT_NO_AVX512)
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

// Row . x for one int-N row (u: words words, scale[g] a float-valued group scale (HalfScales), zero [P]
// uint8, groups of group_words words) and one quantized vector (q, xs, xsum: its row of a QuantizedRows).
template <int BITS, typename Scales>
float int_row_dot(const uint32_t* u, Scales scale, const uint8_t* zero, int64_t group_words, const int8_t* q,
                  const float* xs, const float* xsum, int64_t words) {
  constexpr int C = 8 / BITS;
  const int64_t blocks = words / XQ_BLOCK_WORDS, group_blocks = group_words / XQ_BLOCK_WORDS;
  float zero_term = 0.f;
  // groups outside, blocks inside: the group's scale and zero once per group, no division per block
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && !defined(MOEKIT_NO_AVX512)
  const __m512i mask = _mm512_set1_epi8(static_cast<char>((1u << BITS) - 1));
  auto block = [&](int64_t b) {  // block b's 16 lane sums, times the activations' scales
    const __m512i qv = _mm512_loadu_si512(u + b * XQ_BLOCK_WORDS);
    const int8_t* xb = q + b * 64 * C;
    __m512i acc = _mm512_dpbusd_epi32(_mm512_setzero_si512(), BITS == 8 ? qv : _mm512_and_si512(qv, mask),
                                      _mm512_loadu_si512(xb));
    for (int k = 1; k < C; ++k)
      acc = _mm512_dpbusd_epi32(acc, _mm512_and_si512(_mm512_srli_epi32(qv, k * BITS), mask), _mm512_loadu_si512(xb + 64 * k));
    return _mm512_mul_ps(_mm512_cvtepi32_ps(acc), _mm512_loadu_ps(xs + b * XQ_BLOCK_WORDS));
  };
  // two independent chains of FMAs (named registers: an array indexed at run time may live in memory)
  __m512 t0 = _mm512_setzero_ps(), t1 = _mm512_setzero_ps();
  if (group_blocks == 1) {  // a group per block (int4 g128): groups in pairs
    int64_t b = 0;
    for (; b + 2 <= blocks; b += 2) {
      const float s0 = scale[b], s1 = scale[b + 1];
      t0 = _mm512_fmadd_ps(block(b), _mm512_set1_ps(s0), t0);
      t1 = _mm512_fmadd_ps(block(b + 1), _mm512_set1_ps(s1), t1);
      zero_term += s0 * static_cast<float>(zero[b]) * xsum[b] + s1 * static_cast<float>(zero[b + 1]) * xsum[b + 1];
    }
    if (b < blocks) {
      const float s0 = scale[b];
      t0 = _mm512_fmadd_ps(block(b), _mm512_set1_ps(s0), t0);
      zero_term += s0 * static_cast<float>(zero[b]) * xsum[b];
    }
  } else {  // groups of several blocks (a row's one group: dense_q8): the blocks in pairs
    for (int64_t b0 = 0, g = 0; b0 < blocks; b0 += group_blocks, ++g) {
      const int64_t b1 = b0 + group_blocks < blocks ? b0 + group_blocks : blocks;
      __m512 y0 = _mm512_setzero_ps(), y1 = _mm512_setzero_ps();
      float x_sum = 0.f;
      int64_t b = b0;
      for (; b + 2 <= b1; b += 2) {
        y0 = _mm512_add_ps(y0, block(b));
        y1 = _mm512_add_ps(y1, block(b + 1));
        x_sum += xsum[b] + xsum[b + 1];
      }
      if (b < b1) {
        y0 = _mm512_add_ps(y0, block(b));
        x_sum += xsum[b];
      }
      const float s = scale[g];
      t0 = _mm512_fmadd_ps(y0, _mm512_set1_ps(s), t0);
      t1 = _mm512_fmadd_ps(y1, _mm512_set1_ps(s), t1);
      zero_term += s * static_cast<float>(zero[g]) * x_sum;
    }
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(t0, t1)) - zero_term;
#elif defined(__AVX2__)
  const __m256i mask = _mm256_set1_epi8(static_cast<char>((1u << BITS) - 1));
  __m256 total = _mm256_setzero_ps();
  for (int64_t b0 = 0, g = 0; b0 < blocks; b0 += group_blocks, ++g) {
    const int64_t b1 = b0 + group_blocks < blocks ? b0 + group_blocks : blocks;
    __m256 y[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};  // a block's low and high 8 words
    float x_sum = 0.f;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t w = b * XQ_BLOCK_WORDS;
      const int8_t* xb = q + b * 64 * C;
      for (int half = 0; half < 2; ++half) {
        const __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(u + w + 8 * half));
        __m256i acc = _mm256_setzero_si256();
        for (int k = 0; k < C; ++k) {
          const __m256i codes = _mm256_and_si256(_mm256_srli_epi32(qv, k * BITS), mask);
          const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + 64 * k + 32 * half));
#if defined(__AVXVNNI__)
          acc = _mm256_dpbusd_avx_epi32(acc, codes, xv);
#else
          if constexpr (BITS < 8) {  // pairs of products fit int16: (2^bits - 1) * 127 * 2 < 2^15
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(codes, xv), _mm256_set1_epi16(1)));
          } else {  // 255 * 127 * 2 would saturate vpmaddubsw: widen to int16 first
            const __m256i lo = _mm256_madd_epi16(_mm256_unpacklo_epi8(codes, _mm256_setzero_si256()),
                                                 _mm256_srai_epi16(_mm256_unpacklo_epi8(xv, xv), 8));
            const __m256i hi = _mm256_madd_epi16(_mm256_unpackhi_epi8(codes, _mm256_setzero_si256()),
                                                 _mm256_srai_epi16(_mm256_unpackhi_epi8(xv, xv), 8));
            // per 128-bit half: lo's lanes are bytes 0-1, 2-3 (word 0), 4-5, 6-7 (word 1), hi's the next
            // two words: adjacent lanes added give words 0..3 in order
            acc = _mm256_add_epi32(acc, _mm256_hadd_epi32(lo, hi));
          }
#endif
        }
        y[half] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), _mm256_loadu_ps(xs + w + 8 * half), y[half]);
      }
      x_sum += xsum[b];
    }
    const float s = scale[g];
    total = _mm256_fmadd_ps(_mm256_add_ps(y[0], y[1]), _mm256_set1_ps(s), total);
    zero_term += s * static_cast<float>(zero[g]) * x_sum;
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, total);
  float acc = 0.f;
  for (float v : lanes) acc += v;
  return acc - zero_term;
#else
  float acc = 0.f;
  for (int64_t b0 = 0, g = 0; b0 < blocks; b0 += group_blocks, ++g) {
    const int64_t b1 = b0 + group_blocks < blocks ? b0 + group_blocks : blocks;
    float y = 0.f, x_sum = 0.f;
    for (int64_t b = b0; b < b1; ++b) {
      int32_t lanes[16];
      block_lanes_scalar<BITS>(u + b * XQ_BLOCK_WORDS, q + b * 64 * C, lanes);
      for (int l = 0; l < 16; ++l) y += static_cast<float>(lanes[l]) * xs[b * XQ_BLOCK_WORDS + l];
      x_sum += xsum[b];
    }
    const float s = scale[g];
    acc += s * y;
    zero_term += s * static_cast<float>(zero[g]) * x_sum;
  }
  return acc - zero_term;
#endif
}

// int_row_dot for groups of half a block (XQ_HALF_WORDS words: int2 g128, int4 g64, int8 g32):
// words 0-7 of block b are group 2b, words 8-15 group 2b + 1, so each block's 16 lane sums take
// two group scales; xhalf: the vector's half_sum row. (These groups once ran in float: int2 g128
// at 10 G weights/s on a core of the 2-core EPYC VM against int2 g256's 32 in int8.)
template <int BITS, typename Scales>
float int_row_dot_halves(const uint32_t* u, Scales scale, const uint8_t* zero, const int8_t* q, const float* xs,
                         const float* xhalf, int64_t words) {
  constexpr int C = 8 / BITS;
  const int64_t blocks = words / XQ_BLOCK_WORDS;
  float zero_term = 0.f;
  for (int64_t g = 0; g < 2 * blocks; ++g) zero_term += scale[g] * static_cast<float>(zero[g]) * xhalf[g];
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && !defined(MOEKIT_NO_AVX512)
  const __m512i mask = _mm512_set1_epi8(static_cast<char>((1u << BITS) - 1));
  auto block = [&](int64_t b) {  // block b's 16 lane sums times the activations' and the two groups' scales
    const __m512i qv = _mm512_loadu_si512(u + b * XQ_BLOCK_WORDS);
    const int8_t* xb = q + b * 64 * C;
    __m512i acc = _mm512_dpbusd_epi32(_mm512_setzero_si512(), BITS == 8 ? qv : _mm512_and_si512(qv, mask),
                                      _mm512_loadu_si512(xb));
    for (int k = 1; k < C; ++k)
      acc = _mm512_dpbusd_epi32(acc, _mm512_and_si512(_mm512_srli_epi32(qv, k * BITS), mask), _mm512_loadu_si512(xb + 64 * k));
    const __m512 groups = _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(scale[2 * b]), _mm512_set1_ps(scale[2 * b + 1]));
    return _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc), _mm512_loadu_ps(xs + b * XQ_BLOCK_WORDS)), groups);
  };
  __m512 t0 = _mm512_setzero_ps(), t1 = _mm512_setzero_ps();  // two independent chains of adds
  int64_t b = 0;
  for (; b + 2 <= blocks; b += 2) {
    t0 = _mm512_add_ps(t0, block(b));
    t1 = _mm512_add_ps(t1, block(b + 1));
  }
  if (b < blocks) t0 = _mm512_add_ps(t0, block(b));
  return _mm512_reduce_add_ps(_mm512_add_ps(t0, t1)) - zero_term;
#elif defined(__AVX2__)
  const __m256i mask = _mm256_set1_epi8(static_cast<char>((1u << BITS) - 1));
  __m256 total = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const int8_t* xb = q + b * 64 * C;
    for (int half = 0; half < 2; ++half) {  // a block's low and high 8 words: one group each
      const int64_t w = b * XQ_BLOCK_WORDS + 8 * half;
      const __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(u + w));
      __m256i acc = _mm256_setzero_si256();
      for (int k = 0; k < C; ++k) {
        const __m256i codes = _mm256_and_si256(_mm256_srli_epi32(qv, k * BITS), mask);
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + 64 * k + 32 * half));
#if defined(__AVXVNNI__)
        acc = _mm256_dpbusd_avx_epi32(acc, codes, xv);
#else
        if constexpr (BITS < 8) {  // pairs of products fit int16 (int_row_dot)
          acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(codes, xv), _mm256_set1_epi16(1)));
        } else {  // widen to int16 first, as int_row_dot
          const __m256i lo = _mm256_madd_epi16(_mm256_unpacklo_epi8(codes, _mm256_setzero_si256()),
                                               _mm256_srai_epi16(_mm256_unpacklo_epi8(xv, xv), 8));
          const __m256i hi = _mm256_madd_epi16(_mm256_unpackhi_epi8(codes, _mm256_setzero_si256()),
                                               _mm256_srai_epi16(_mm256_unpackhi_epi8(xv, xv), 8));
          acc = _mm256_add_epi32(acc, _mm256_hadd_epi32(lo, hi));
        }
#endif
      }
      const __m256 y = _mm256_mul_ps(_mm256_cvtepi32_ps(acc), _mm256_loadu_ps(xs + w));
      total = _mm256_fmadd_ps(y, _mm256_set1_ps(scale[2 * b + half]), total);
    }
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, total);
  float acc = 0.f;
  for (float v : lanes) acc += v;
  return acc - zero_term;
#else
  float acc = 0.f;
  for (int64_t b = 0; b < blocks; ++b) {
    int32_t lanes[16];
    block_lanes_scalar<BITS>(u + b * XQ_BLOCK_WORDS, q + b * 64 * C, lanes);
    for (int l = 0; l < 16; ++l)
      acc += scale[2 * b + l / 8] * static_cast<float>(lanes[l]) * xs[b * XQ_BLOCK_WORDS + l];
  }
  return acc - zero_term;
#endif
}

}  // namespace
