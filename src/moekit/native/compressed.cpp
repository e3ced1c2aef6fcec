// Routed SwiGLU experts in compressed stored forms on the CPU, decoded inside the matvec
// (moekit.native.compressed).
//
// The same layer computation as experts.cpp: for each job j (one expert and its tokens),
//     out[t] += w * down_j @ (silu(gate_j @ x[t]) * (up_j @ x[t]))      for each of its tokens t
// with the weights stored as int-N (quant.formats.IntForm; bits 2, 3, 4, 8: compressed_int.cpp says
// how) or as the ternary code (quant.formats.TernaryCodeForm, quant.code: compressed_code.cpp).
// Each weight row is decoded once per call, in the thread's cache (int-N: to float weights exactly
// as the form's dequantize computes them; the code: to the columns of its HI and LO symbols), and
// the decoded row is dotted with every token of the job: the packed bytes are read once from
// memory, whatever the number of tokens.
//
// The files: compressed_int.cpp decodes int-N rows (IntRows; with int8 activations through
// int_dot.h) and exports moekit_int_ffn; compressed_code.cpp decodes ternary-code rows (CodeRows)
// and exports moekit_code_ffn; both run the two-stage layer of compressed_layer.h (one OpenMP
// region, the result independent of the thread count). This file holds the decode step's entry:
// one token's layer, moekit_compressed_moe_decode, which calls the two above.

#include <cstdint>
#include <cstring>

#include "common.h"
#include "compressed_layer.h"

namespace {

// One layer's resident compressed experts as the decode step reads them (compressed.py's
// _DecodeExperts mirrors it field for field): each stored tensor's base address and bytes per
// expert (stacked [E, ...], contiguous), so job a's pointers are base + ids[a] * stride; and the
// buffers of one call, sized for top_k experts.
struct DecodeExperts {
  int32_t form;             // 1 int-N, 2 ternary code
  int32_t bits;             // int-N: 2, 3, 4, 8
  int32_t permuted;         // int-N: IntRows' permuted layout
  int32_t word_bytes;       // code: 1 or 2
  int64_t D, I;
  int64_t groups[2];        // int-N: P of gate_up, of down
  int64_t tensors;          // 6 (int-N) or 12 (code)
  int64_t base[12];         // per tensor (moekit_int_ffn's / moekit_code_ffn's ptrs order): address
  int64_t stride[12];       // and bytes per expert
  int64_t sizes[6];         // code: W, sizeof(starts), sizeof(row_chunks) of gate_up, then down
  const int32_t* table;     // code: [2^bits, 2]
  const uint16_t* masks;    // code: compressed.code_masks
  const uint8_t* lengths;
  float* xf;                // x in float: int-N width(D) floats (permuted), code D + CODE_PAD
  float* h;                 // top_k * h_stride floats (+ CODE_PAD)
  int64_t h_floats;         // zeroed before each call (int-N permuted: the last word's padding lanes)
  float* accs;              // threads * acc_stride(1)
  float* outf;              // [D]
  int64_t* ptrs;            // [top_k * tensors]
  int64_t* job_sizes;       // [top_k * 6]
  int32_t* tok_start;       // [top_k + 1]
  int32_t* tok;             // [top_k]
  int32_t int8_dot;         // int-N: moekit_int_ffn's int8_dot
};

}  // namespace

extern "C" {

// plan: a DecodeExperts. out [D] (bf16) = sum over a < A of w[a] * expert_{ids[a]}(x [D] bf16), the experts stored as
// `c` says: the same call, jobs in the same order (a = 0..A-1, one token each) and the same float
// x as int_ffn / code_ffn make for one token routed to ids, so the same bits. Returns 0, 1 for an
// unknown form or bits, 2 for a job of more than 256 tokens (never: one token each). A must not
// exceed the top_k the buffers were sized for (decode.py's unsupported checks the layer's top_k).
int moekit_compressed_moe_decode(const void* plan, const uint16_t* x, const int64_t* ids, const float* w,
                                 int64_t A, uint16_t* out, int threads) {
  const DecodeExperts* c = static_cast<const DecodeExperts*>(plan);  // void: decode.cpp calls it without the type
  const int64_t D = c->D, I = c->I;
  for (int64_t a = 0; a < A; ++a) {
    for (int64_t t = 0; t < c->tensors; ++t) c->ptrs[a * c->tensors + t] = c->base[t] + ids[a] * c->stride[t];
    if (c->form == 2) std::memcpy(c->job_sizes + a * 6, c->sizes, sizeof(c->sizes));
    c->tok_start[a] = static_cast<int32_t>(a);
    c->tok[a] = 0;
  }
  c->tok_start[A] = static_cast<int32_t>(A);
  if (c->h_floats > 0) std::memset(c->h, 0, sizeof(float) * c->h_floats);
  int rc;
  if (c->form == 1) {
    if (c->permuted) {  // column q * k + i at i * words + q (compressed.py's _permuted), zeros past D
      const int64_t k = 32 / c->bits, words = (D + k - 1) / k;
      for (int64_t i = 0; i < k; ++i)
        for (int64_t q = 0; q < words; ++q) {
          const int64_t col = q * k + i;
          c->xf[i * words + q] = col < D ? bf16_to_float(x[col]) : 0.f;
        }
    } else {
      for (int64_t i = 0; i < D; ++i) c->xf[i] = bf16_to_float(x[i]);
    }
    rc = moekit_int_ffn(c->bits, c->xf, c->outf, 1, D, I, A, c->ptrs, c->groups[0], c->groups[1], c->permuted,
                        c->tok_start, c->tok, w, c->h, c->accs, threads, c->int8_dot);
  } else if (c->form == 2) {
    for (int64_t i = 0; i < D; ++i) c->xf[i] = bf16_to_float(x[i]);
    rc = moekit_code_ffn(c->xf, c->outf, 1, D, I, A, c->ptrs, c->table, c->masks, c->lengths, c->word_bytes,
                         c->job_sizes, c->tok_start, c->tok, w, c->h, c->accs, threads);
  } else {
    return 1;
  }
  if (rc != 0) return rc;
  for (int64_t i = 0; i < D; ++i) out[i] = float_to_bf16(c->outf[i]);
  return 0;
}

}  // extern "C"
