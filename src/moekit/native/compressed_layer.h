// The two-stage layer that both compressed forms run on the CPU (compressed.cpp says what they
// compute; compressed_int.cpp and compressed_code.cpp decode their rows), the vectors their
// decoders share, and the C entry points of the two forms (declared here for compressed.cpp's
// decode step, defined in their files).
//
// One OpenMP region per layer, two stages with one barrier (as experts.cpp):
//   stage 1  work item = (job, block of ffn rows): h[slot, r] = silu(gate_r . x) * (up_r . x)
//   stage 2  work item = block of hidden rows d: out[t, d] = sum over jobs of w * (down_d . h[slot]),
//            job by job over the block's rows
// Stage 2 partitions the output rows and sums over jobs in job order, so the result does not
// depend on the thread count. Accumulation is float32; x and out are float32.
//
// Shapes: N tokens, D hidden, I ffn width, J jobs, T = slots of all jobs (tok_start[J]).
// accs holds threads * acc_stride(N) floats (stage 2's accumulators past STAGE2_ACC tokens; each
// thread's on cache lines of its own).
#pragma once

#include <cmath>
#include <cstdint>
#include <omp.h>

#include "common.h"
#include "team.h"

namespace {

// 16-lane vectors (GCC / clang vector extensions: two AVX2 registers, one AVX-512, four NEON)
constexpr int V = 16;
typedef float vf __attribute__((vector_size(4 * V)));
typedef uint32_t vu __attribute__((vector_size(4 * V)));
typedef int32_t vi __attribute__((vector_size(4 * V)));

// A form's decoder as run_layer calls it (IntCall, CodeCall add the call of their rows' dots): the
// rows, a thread's scratch, and by default float activations in the natural layout (x rows of D
// floats, h rows of I, h[slot, r] at r); IntCall replaces these for its permuted layout and int8.
template <typename Rows>
struct RowCall {
  using Scratch = typename Rows::Scratch;
  const Rows& rows;
  void quantize(const moekit_team::Par&, int, const float*, int64_t, int64_t) const {}  // float activations only
  int64_t h_index(int64_t r, int64_t) const { return r; }
  int64_t h_stride(int64_t I) const { return I; }
  int64_t x_stride(int64_t D) const { return D; }
};

// Runs one layer. `call` (IntCall, CodeCall) is the form's decoder: call(scratch, kind, j, r, K, vec,
// stride, which, count, row0, out) writes row r of matrix kind 0 (gate_up) or 1 (down) of job j
// dotted with `count` vectors of K floats (IntRows::dots, CodeRows::dots say how they are found);
// its quantize, h_index, h_stride and x_stride give the layouts of x and h.
template <typename Call>
void run_layer(const Call& call, const float* xf, int64_t D, int64_t I, int64_t J, const int32_t* tok_start,
               const int32_t* tok, const float* w, float* h, float* accs, int64_t N, float* out, int threads) {
  const int64_t blocks_i = (I + ROWS_PER_ITEM - 1) / ROWS_PER_ITEM;
  const int64_t rows_d = stage2_rows(D, N, threads);  // common.h
  const int64_t blocks_d = (D + rows_d - 1) / rows_d;
  const int64_t xs = call.x_stride(D), hs = call.h_stride(I);  // floats of a row of x, of h
  moekit_team::parallel(threads, [&](const moekit_team::Par& p) {
    typename Call::Scratch scratch(D > I ? D : I);
    float g[MAX_JOB_TOKENS], u[MAX_JOB_TOKENS];
    // [rows_d, N] accumulators of a stage-2 item; past STAGE2_ACC tokens (rows_d = 1) the thread's
    // share of accs
    float acc_stack[STAGE2_ACC];
    float* acc = N <= STAGE2_ACC ? acc_stack : accs + static_cast<int64_t>(p.t) * acc_stride(N);
    int64_t begin, end;
    call.quantize(p, 0, xf, xs, N);  // int8 activations: x once per call (a barrier after, when it runs)
    p.range(J * blocks_i, begin, end);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t j = item / blocks_i, r0 = (item % blocks_i) * ROWS_PER_ITEM;
      const int32_t first = tok_start[j], count = tok_start[j + 1] - first;
      for (int64_t r = r0; r < r0 + ROWS_PER_ITEM && r < I; ++r) {
        call(scratch, 0, j, r, D, xf, xs, tok + first, count, 0, g);
        call(scratch, 0, j, I + r, D, xf, xs, tok + first, count, 0, u);
        const int64_t at = call.h_index(r, I);
        for (int k = 0; k < count; ++k) h[(first + k) * hs + at] = g[k] / (1.f + std::exp(-g[k])) * u[k];
      }
    }
    p.barrier();  // every h is written
    call.quantize(p, 1, h, hs, tok_start[J]);  // and each slot's h once
    p.range(blocks_d, begin, end);
    for (int64_t item = begin; item < end; ++item) {
      // job by job over the item's rows: each job's down rows d0..d1 are one contiguous region,
      // read front to back (one stream), and each element still sums its jobs in job order
      const int64_t d0 = item * rows_d, d1 = d0 + rows_d < D ? d0 + rows_d : D;
      for (int64_t i = 0; i < (d1 - d0) * N; ++i) acc[i] = 0.f;
      for (int64_t j = 0; j < J; ++j) {
        const int32_t first = tok_start[j], count = tok_start[j + 1] - first;
        for (int64_t d = d0; d < d1; ++d) {
          call(scratch, 1, j, d, I, h + first * hs, hs, nullptr, count, first, g);
          float* acc_d = acc + (d - d0) * N;
          for (int k = 0; k < count; ++k) acc_d[tok[first + k]] += w[first + k] * g[k];
        }
      }
      for (int64_t d = d0; d < d1; ++d)
        for (int64_t t = 0; t < N; ++t) out[t * D + d] = acc[(d - d0) * N + t];
    }
  });
}

inline int check_jobs(int64_t J, const int32_t* tok_start) {
  for (int64_t j = 0; j < J; ++j)
    if (tok_start[j + 1] - tok_start[j] > MAX_JOB_TOKENS) return 2;
  return 0;
}

}  // namespace

extern "C" {

// compressed_int.cpp
int moekit_int_ffn(int bits, const float* x, float* out, int64_t N, int64_t D, int64_t I, int64_t J,
                   const int64_t* ptrs, int64_t groups_gate_up, int64_t groups_down, int permuted, const int32_t* tok_start,
                   const int32_t* tok, const float* w, float* h, float* accs, int threads, int int8_dot);
// compressed_code.cpp
int moekit_code_ffn(const float* x, float* out, int64_t N, int64_t D, int64_t I, int64_t J, const int64_t* ptrs,
                    const int32_t* table, const uint16_t* masks, const uint8_t* lengths, int word_bytes,
                    const int64_t* sizes, const int32_t* tok_start, const int32_t* tok, const float* w, float* h,
                    float* accs, int threads);

}  // extern "C"
