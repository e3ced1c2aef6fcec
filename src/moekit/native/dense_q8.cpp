// int8 weights for the dense projections of a CPU decode step (qkv, o-projection, LM head;
// moekit.native.dense_q8), opt-in ($MOEKIT_CPU_DENSE=int8):
//     out [N] = w [N, K] @ x [K] (+ bias [N] float32)        x, out bfloat16, K % 64 == 0
// with w[n, k] ~ scale[n] * (codes[n, k] - 128): one float scale per row (max |w| over the row / 127),
// codes stored as uint8 = round(w / scale) + 128. That is an int-8 row with zero point 128 to
// int_dot.h, so the same integer dot products run it: x quantized once per call to int8 (a scale per
// 64 columns, one 64-byte weight block), unsigned codes times signed activations summed in int32 (AVX512-VNNI / AVX-VNNI / AVX2 /
// scalar), the zero point taken out through the activations' block sums.
//
// Why: at batch 1 a projection's time is its weight bytes over memory bandwidth; on the 4-layer OLMoE
// shape the bf16 attention and LM head are 341 MB a token against ~50 MB of int4 experts. int8 halves
// them. Work split as matvec.cpp: each thread one contiguous range of rows.
#include <cstdint>
#include <omp.h>

#include "common.h"
#include "int_dot.h"

namespace {

// One quantized matrix (dense_q8.py's _Q8Matrix mirrors it).
struct Q8Matrix {
  const uint8_t* codes;  // [N, K]: round(w / scale) + 128
  const float* scale;    // [N]
  int64_t N, K;
};

struct RowScale {  // int_row_dot's scales for a row of one group
  float s;
  float operator[](int64_t) const { return s; }
};

}  // namespace

extern "C" {

// matrix: a Q8Matrix. out [N] (bf16) = w @ x (+ bias, may be null) for x [K] bf16; xf: K floats of
// scratch. Returns 0, or 3 when K is not a multiple of 64 (16 words of 4 codes: int_dot.h's block).
int moekit_matvec_q8(const void* matrix, const uint16_t* x, const float* bias, uint16_t* out, float* xf, int threads) {
  const Q8Matrix* m = static_cast<const Q8Matrix*>(matrix);
  const int64_t N = m->N, K = m->K, words = K / 4;
  if (K % 64 != 0) return 3;
  to_float(0, x, K, xf);
  static thread_local QuantizedRows xq;  // the calling thread's, kept between calls
  xq.resize(1, words, 8);
  quantize_row<8, true>(xf, xq, 0);
  static const uint8_t zero = 128;
  const int8_t* q = xq.q.data();
  const float* xs = xq.scale.data();
  const float* xsum = xq.sum.data();
  auto rows = [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint32_t* u = reinterpret_cast<const uint32_t*>(m->codes + n * K);
      const float dot = int_row_dot<8>(u, RowScale{m->scale[n]}, &zero, words, q, xs, xsum, words);
      out[n] = float_to_bf16(dot + (bias ? bias[n] : 0.f));
    }
  };
  // below ~1 MB of weights a fork and join cost about what a second core saves (as matvec.cpp)
  split_rows(N, threads, N * K < (1 << 20), rows);
  return 0;
}

}  // extern "C"
