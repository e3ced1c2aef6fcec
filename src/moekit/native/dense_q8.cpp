// int8 or int4 weights for the dense projections of a CPU decode step (qkv, o-projection, LM head;
// moekit.native.dense_q8), opt-in ($MOEKIT_CPU_DENSE=int8 or int4):
//     out [N] = w [N, K] @ x [K] (+ bias [N] float32)        x, out bfloat16
// int8 (K % 64 == 0): w[n, k] ~ scale[n] * (codes[n, k] - 128), one float scale per row (max |w| over
// the row / 127), codes stored as uint8 = round(w / scale) + 128: an int-8 row with zero point 128 to
// int_dot.h.
// int4 (K % 128 == 0): w[n, k] ~ group_scale[n, g] * (code - zero[n, g]) in groups g of 128 columns
// (min/max per group, quant.grids.IntGrid's rounding), codes packed 8 to an int32 word in column order
// (quant.grids.pack_codes: column 8 w + i in bits 4 i of word w); group_scale float16, zero uint8: an
// int-4 row of one 16-word block a group to int_dot.h, in the natural layout.
// Either way the same integer dot products run it: x quantized once per call to int8 (a scale per 64-byte
// weight block: 64 columns at 8 bits, 128 at 4), unsigned codes times signed activations summed in
// int32 (AVX512-VNNI / AVX-VNNI / AVX2 / scalar), the zero points taken out through the activations'
// block sums.
//
// Why: at batch 1 a projection's time is its weight bytes over memory bandwidth; on the 4-layer OLMoE
// shape the bf16 attention and LM head are 341 MB a token against ~50 MB of int4 experts. int8 halves
// them, int4 (4.19 bits a weight with its scales) takes a quarter. Work split as matvec.cpp: each
// thread one contiguous range of rows.
#include <cstdint>
#include <type_traits>
#include <omp.h>

#include "common.h"
#include "int_dot.h"

namespace {

// One quantized matrix (dense_q8.py's _Q8Matrix mirrors it).
struct Q8Matrix {
  const uint8_t* codes;  // bits 8: [N, K] round(w / scale) + 128; bits 4: [N, K / 8] int32 words
  const float* scale;    // bits 8: [N]
  int64_t N, K;
  int64_t bits;                 // 8 or 4
  const uint16_t* group_scale;  // bits 4: [N, K / 128] float16
  const uint8_t* zero;          // bits 4: [N, K / 128]
};

constexpr int64_t INT4_GROUP = 128;  // columns of an int4 scale group: one 16-word block

struct RowScale {  // int_row_dot's scales for a row of one group
  float s;
  float operator[](int64_t) const { return s; }
};

}  // namespace

extern "C" {

// matrix: a Q8Matrix. out [N] (bf16) = w @ x (+ bias, may be null) for x [K] bf16; xf: K floats of
// scratch. Returns 0, 3 when K is not a multiple of 64 (int8: 16 words of 4 codes, int_dot.h's block)
// or of 128 (int4), or 4 for bits other than 8 and 4.
int moekit_matvec_q8(const void* matrix, const uint16_t* x, const float* bias, uint16_t* out, float* xf, int threads) {
  const Q8Matrix* m = static_cast<const Q8Matrix*>(matrix);
  const int64_t N = m->N, K = m->K;
  if (m->bits != 8 && m->bits != 4) return 4;
  if (K % (m->bits == 8 ? 64 : INT4_GROUP) != 0) return 3;
  to_float(0, x, K, xf);
  static thread_local QuantizedRows xq;  // the calling thread's, kept between calls
  const int8_t* q;
  const float *xs, *xsum;
  auto quantized = [&](auto bits) {
    constexpr int BITS = decltype(bits)::value;
    xq.resize(1, K * BITS / 32, BITS);
    quantize_row<BITS, true>(xf, xq, 0);
    q = xq.q.data(), xs = xq.scale.data(), xsum = xq.sum.data();
  };
  if (m->bits == 8) {
    quantized(std::integral_constant<int, 8>{});
    const int64_t words = K / 4;
    static const uint8_t zero = 128;
    split_rows(N, threads, N * K < (1 << 20), [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        const uint32_t* u = reinterpret_cast<const uint32_t*>(m->codes + n * K);
        const float dot = int_row_dot<8>(u, RowScale{m->scale[n]}, &zero, words, q, xs, xsum, words);
        out[n] = float_to_bf16(dot + (bias ? bias[n] : 0.f));
      }
    });
  } else {
    quantized(std::integral_constant<int, 4>{});
    const int64_t words = K / 8, groups = K / INT4_GROUP;
    split_rows(N, threads, N * K < (1 << 21), [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        const uint32_t* u = reinterpret_cast<const uint32_t*>(m->codes) + n * words;
        const float dot = int_row_dot<4>(u, HalfScales{m->group_scale + n * groups}, m->zero + n * groups,
                                         XQ_BLOCK_WORDS, q, xs, xsum, words);
        out[n] = float_to_bf16(dot + (bias ? bias[n] : 0.f));
      }
    });
  }
  // (below ~1 MB of weights a fork and join cost about what a second core saves, as matvec.cpp)
  return 0;
}

}  // extern "C"
