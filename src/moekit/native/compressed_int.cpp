// Int-N routed experts on the CPU (compressed.cpp says what the layer computes): each weight row
// decoded in the thread's cache, or dotted in registers at batch 1, and the C entry moekit_int_ffn.
//
// Stored (quant.formats.IntForm; bits 2, 3, 4, 8): per matrix qweight [R, ceil(K / k)] int32
//   (k = 32 / bits codes per word, code i of a word in bits i*bits..), scale [R, P] float16,
//   zero [R, P] uint8, weight = scale * (code - zero) in groups of ceil(K / P) columns.
// ptrs per job: gate_up qweight, scale, zero, down qweight, scale, zero.
//
// Int-N with int8 activations (moekit_int_ffn's int8_dot; int_dot.h): the matrices that fit (bits
// 2, 4, 8, permuted, groups of whole 16-word blocks or of 8 words) are not decoded to floats at all: each token's
// x and each slot's h are quantized once per call and the codes multiply them in int32.

#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "common.h"
#include "compressed_layer.h"
#include "int_dot.h"

namespace {

// Two layouts of a decoded row (and of the vectors it is dotted with):
//   natural   column c at c: any scale groups (also groups that start inside a word);
//   permuted  (groups hold whole words, or one group per row) column c = w * k + i (word w, lane
//             i) at i * words + w: lane i of every word is (q[w] >> i * bits) & mask, so each
//             lane decodes as a vector over the row's words with one shift and mask (contiguous
//             loads and stores, no shuffles). The vectors are permuted alike (x by the caller, h
//             by stage 1 as it writes it) and zero at the padding of the last word.
struct IntRows {
  const int64_t* ptrs;
  int64_t groups[2];  // P of gate_up, of down
  bool permuted;
  // per kind: the vectors quantized to int8 (int_dot.h; x rows by token, h rows by slot), or
  // nullptr for the float path
  QuantizedRows* qrows[2];
  int64_t qgroup_words[2];  // where qrows[kind]: group_words of that kind (no division a row)

  // A thread's decoded row (K floats plus one word's codes past the end), and per-word scale and zero.
  struct Scratch {
    std::vector<float> row, word_scale, word_zero;
    explicit Scratch(int64_t k) : row(k + 32), word_scale(k + 32), word_zero(k + 32) {}
  };

  template <int BITS>
  static void decode_natural(const int32_t* q, const uint16_t* scale, const uint8_t* zero, int64_t K, int64_t P,
                             float* out) {
    constexpr int PER_WORD = 32 / BITS;
    constexpr uint32_t MASK = (1u << BITS) - 1;
    const int64_t words = (K + PER_WORD - 1) / PER_WORD;
    const uint32_t* u = reinterpret_cast<const uint32_t*>(q);
    for (int64_t wi = 0; wi < words; ++wi) {
      const uint32_t word = u[wi];
      float* o = out + wi * PER_WORD;
#pragma omp simd
      for (int i = 0; i < PER_WORD; ++i) o[i] = static_cast<float>((word >> (i * BITS)) & MASK);
    }
    const int64_t size = (K + P - 1) / P;  // columns per group (quant.grids.dequantize_int)
    for (int64_t g = 0; g < P; ++g) {
      const float s = half_to_float(scale[g]), z = static_cast<float>(zero[g]);
      const int64_t end = (g + 1) * size < K ? (g + 1) * size : K;
#pragma omp simd
      for (int64_t c = g * size; c < end; ++c) out[c] = s * (out[c] - z);  // as the form's dequantize
    }
  }

  // Each word's scale and zero (groups of whole words) into s.word_scale, s.word_zero.
  template <int BITS>
  static void word_params(const uint16_t* scale, const uint8_t* zero, int64_t K, int64_t P, Scratch& s) {
    constexpr int PER_WORD = 32 / BITS;
    const int64_t words = (K + PER_WORD - 1) / PER_WORD;
    const int64_t group_words = P == 1 ? words : ((K + P - 1) / P) / PER_WORD;  // whole words per group
    float* ws = s.word_scale.data();
    float* wz = s.word_zero.data();
    for (int64_t g = 0, w0 = 0; g < P; ++g, w0 += group_words) {
      const float sc = half_to_float(scale[g]), z = static_cast<float>(zero[g]);
      for (int64_t w = w0; w < w0 + group_words && w < words; ++w) {
        ws[w] = sc;
        wz[w] = z;
      }
    }
  }

  template <int BITS>
  static void decode_permuted(const int32_t* q, int64_t K, Scratch& s) {
    constexpr int PER_WORD = 32 / BITS;
    constexpr uint32_t MASK = (1u << BITS) - 1;
    const int64_t words = (K + PER_WORD - 1) / PER_WORD;
    const float* ws = s.word_scale.data();
    const float* wz = s.word_zero.data();
    const uint32_t* u = reinterpret_cast<const uint32_t*>(q);
    float* out = s.row.data();
    for (int i = 0; i < PER_WORD; ++i) {
      float* o = out + i * words;
#pragma omp simd
      for (int64_t w = 0; w < words; ++w) o[w] = ws[w] * (static_cast<float>((u[w] >> (i * BITS)) & MASK) - wz[w]);
    }
  }

  // Row . x for one vector x in the permuted layout, decoding in registers (the decode step's
  // case): for 16 words at a time, y = sum over lanes i of (code_i - zero) * x_i, then scale * y;
  // each lane's codes are one shift and mask of the 16 words.
  // One block of V words at word w: sum over lanes i of (code_i - z) * x_i (unscaled).
  template <int BITS>
  static inline vf block_sum(const uint32_t* u, vf z, const float* x, int64_t w, int64_t words) {
    constexpr int PER_WORD = 32 / BITS;
    constexpr uint32_t MASK = (1u << BITS) - 1;
    vu q;
    std::memcpy(&q, u + w, sizeof(q));
    vf y = {};
    for (int i = 0; i < PER_WORD; ++i) {
      vf xv;
      std::memcpy(&xv, x + i * words + w, sizeof(xv));
      const vi c = reinterpret_cast<vi>((q >> (i * BITS)) & MASK);
      y += (__builtin_convertvector(c, vf) - z) * xv;
    }
    return y;
  }

  template <int BITS>
  static float dot_one(const uint32_t* u, const float* ws, const float* wz, const float* x, int64_t words) {
    constexpr int PER_WORD = 32 / BITS;
    constexpr uint32_t MASK = (1u << BITS) - 1;
    vf total = {};
    int64_t w = 0;
    for (; w + V <= words; w += V) {
      vf z, sc;
      std::memcpy(&z, wz + w, sizeof(z));
      std::memcpy(&sc, ws + w, sizeof(sc));
      total += sc * block_sum<BITS>(u, z, x, w, words);
    }
    float acc = 0.f;
    for (int l = 0; l < V; ++l) acc += total[l];
    for (; w < words; ++w) {
      float y = 0.f;
      for (int i = 0; i < PER_WORD; ++i) y += (static_cast<float>((u[w] >> (i * BITS)) & MASK) - wz[w]) * x[i * words + w];
      acc += ws[w] * y;
    }
    return acc;
  }

  // dot_one for groups of whole 16-word blocks (int4 with group 128 and up; int2 with 256 and up;
  // one group per row of a multiple of 16 words): each block's scale and zero broadcast from the
  // group's, instead of word_params writing them per word first (measured: that loop was ~a third
  // of the batch-1 int4 kernel). The same arithmetic per lane and block as dot_one: the same bits.
  template <int BITS>
  static float dot_one_blocks(const uint32_t* u, const uint16_t* scale, const uint8_t* zero, int64_t group_words,
                              const float* x, int64_t words) {
    constexpr int PER_WORD = 32 / BITS;
    constexpr uint32_t MASK = (1u << BITS) - 1;
    vf total = {};
    int64_t w = 0;
    for (; w + 2 * V <= words; w += 2 * V) {  // two blocks side by side: two independent chains of FMAs
      const int64_t g0 = w / group_words, g1 = (w + V) / group_words;
      vu q0, q1;
      std::memcpy(&q0, u + w, sizeof(q0));
      std::memcpy(&q1, u + w + V, sizeof(q1));
      const vf z0 = vf{} + static_cast<float>(zero[g0]), sc0 = vf{} + half_to_float(scale[g0]);
      const vf z1 = vf{} + static_cast<float>(zero[g1]), sc1 = vf{} + half_to_float(scale[g1]);
      vf y0 = {}, y1 = {};
      for (int i = 0; i < PER_WORD; ++i) {
        vf x0, x1;
        std::memcpy(&x0, x + i * words + w, sizeof(x0));
        std::memcpy(&x1, x + i * words + w + V, sizeof(x1));
        const vi c0 = reinterpret_cast<vi>((q0 >> (i * BITS)) & MASK);
        const vi c1 = reinterpret_cast<vi>((q1 >> (i * BITS)) & MASK);
        y0 += (__builtin_convertvector(c0, vf) - z0) * x0;
        y1 += (__builtin_convertvector(c1, vf) - z1) * x1;
      }
      total += sc0 * y0;  // in block order, as one block at a time adds them
      total += sc1 * y1;
    }
    for (; w < words; w += V) {
      const int64_t g = w / group_words;
      const vf z = vf{} + static_cast<float>(zero[g]), sc = vf{} + half_to_float(scale[g]);
      total += sc * block_sum<BITS>(u, z, x, w, words);
    }
    float acc = 0.f;
    for (int l = 0; l < V; ++l) acc += total[l];
    return acc;
  }

  static int64_t width(int bits, int64_t K) {  // floats of a row (and its vectors) in this layout
    return (K + 32 / bits - 1) / (32 / bits) * (32 / bits);
  }

  static int64_t group_words(int bits, int64_t K, int64_t P) {  // permuted: whole words per group
    const int64_t words = (K + 32 / bits - 1) / (32 / bits);
    return P == 1 ? words : ((K + P - 1) / P) / (32 / bits);
  }

  // Quantizes the `rows` vectors of matrix kind `kind` (vec, row stride `stride`, K columns) into
  // qrows[kind] when that kind takes int8 activations; called by every thread of the region, each
  // returning once all rows are done.
  template <int BITS>
  void quantize(const moekit_team::Par& p, int kind, const float* vec, int64_t stride, int64_t rows) const {
    if constexpr (BITS == 2 || BITS == 4 || BITS == 8) {
      QuantizedRows* qr = qrows[kind];
      if (qr == nullptr) return;
      int64_t begin, end;
      p.range(rows, begin, end);
      for (int64_t t = begin; t < end; ++t) quantize_row<BITS>(vec + t * stride, *qr, t);
      p.barrier();
    }
  }

  // Dots of row r of matrix `kind` of job j (K columns) with `count` float vectors
  // vec + which[k] * stride (which == nullptr: k * stride), in this call's layout; their rows of
  // qrows[kind] (int8 activations) are row0 + which[k] (or row0 + k).
  template <int BITS>
  void dots(Scratch& s, int kind, int64_t j, int64_t r, int64_t K, const float* vec, int64_t stride,
            const int32_t* which, int count, int64_t row0, float* out) const {
    const int64_t* p = ptrs + j * 6 + kind * 3;
    const int64_t P = groups[kind], words = (K + 32 / BITS - 1) / (32 / BITS);
    const int32_t* q = reinterpret_cast<const int32_t*>(p[0]) + r * words;
    const uint16_t* scale = reinterpret_cast<const uint16_t*>(p[1]) + r * P;
    const uint8_t* zero = reinterpret_cast<const uint8_t*>(p[2]) + r * P;
    int64_t n = K;
    if constexpr (BITS == 2 || BITS == 4 || BITS == 8) {
      if (const QuantizedRows* qr = qrows[kind]) {  // int8 activations (int_dot.h)
        const uint32_t* u = reinterpret_cast<const uint32_t*>(q);
        const int64_t gw = qgroup_words[kind];
        int k = 0;
#if defined(MOEKIT_INT_DOT_AVX512)
        if (gw == XQ_BLOCK_WORDS) {  // a group a block: four vectors at a time share each block's decode
          constexpr int TILE = 4;
          for (; k + TILE <= count; k += TILE) {
            const int8_t* xq[TILE];
            const float *xs[TILE], *xsum[TILE];
            for (int v = 0; v < TILE; ++v) {
              const int64_t t = row0 + (which ? which[k + v] : k + v);
              xq[v] = qr->q.data() + t * qr->columns;
              xs[v] = qr->scale.data() + t * (words / XQ_BLOCK_WORDS);
              xsum[v] = qr->sum.data() + t * (words / XQ_BLOCK_WORDS);
            }
            int_row_dot_blocks_n<BITS, TILE>(u, HalfScales{scale}, zero, xq, xs, xsum, words, out + k);
          }
        }
#endif
        for (; k < count; ++k) {
          const int64_t t = row0 + (which ? which[k] : k);
          const int8_t* xq = qr->q.data() + t * qr->columns;
          const float* xs = qr->scale.data() + t * (words / XQ_BLOCK_WORDS);
          out[k] = gw == XQ_HALF_WORDS
                       ? int_row_dot_halves<BITS>(u, HalfScales{scale}, zero, xq, xs,
                                                  qr->half_sum.data() + t * (words / XQ_HALF_WORDS), words)
                       : int_row_dot<BITS>(u, HalfScales{scale}, zero, gw, xq, xs,
                                           qr->sum.data() + t * (words / XQ_BLOCK_WORDS), words);
        }
        return;
      }
    }
    if (permuted) {
      const int64_t group_words = IntRows::group_words(BITS, K, P);
      if (count == 1 && group_words % V == 0) {  // whole blocks per group: no per-word parameters
        out[0] = dot_one_blocks<BITS>(reinterpret_cast<const uint32_t*>(q), scale, zero, group_words,
                                      vec + (which ? which[0] : 0) * stride, words);
        return;
      }
      word_params<BITS>(scale, zero, K, P, s);
      if (count == 1) {  // decode: in registers, no decoded row
        out[0] = dot_one<BITS>(reinterpret_cast<const uint32_t*>(q), s.word_scale.data(), s.word_zero.data(),
                               vec + (which ? which[0] : 0) * stride, words);
        return;
      }
      decode_permuted<BITS>(q, K, s);
      n = width(BITS, K);
    } else {
      decode_natural<BITS>(q, scale, zero, K, P, s.row.data());
    }
    dots_many(s.row.data(), vec, stride, which, count, n, out);
  }

  // Where stage 1 writes h[slot, r] (of I columns) in a slot's row, and that row's floats.
  template <int BITS>
  int64_t h_index(int64_t r, int64_t I) const {
    if (!permuted) return r;
    constexpr int PER_WORD = 32 / BITS;
    return (r % PER_WORD) * ((I + PER_WORD - 1) / PER_WORD) + r / PER_WORD;
  }
};

// Calls rows.dots<BITS> (the decoder of one bit width).
template <int BITS>
struct IntCall : RowCall<IntRows> {  // its own layouts and activations below
  template <typename... Args>  // run_layer's row call, as dots takes it
  void operator()(Args&&... args) const { rows.template dots<BITS>(std::forward<Args>(args)...); }
  void quantize(const moekit_team::Par& p, int kind, const float* vec, int64_t stride, int64_t rows_) const {
    rows.quantize<BITS>(p, kind, vec, stride, rows_);
  }
  int64_t h_index(int64_t r, int64_t I) const { return rows.h_index<BITS>(r, I); }
  int64_t h_stride(int64_t I) const { return rows.permuted ? IntRows::width(BITS, I) : I; }
  int64_t x_stride(int64_t D) const { return rows.permuted ? IntRows::width(BITS, D) : D; }
};

}  // namespace

extern "C" {

// Int-N experts. ptrs: J * 6 addresses (module comment). permuted (IntRows): x is [N, words(D) * k]
// in the permuted layout, h holds slots * words(I) * k floats, zero at the padding; else x is
// [N, D] and h slots * I floats. int8_dot != 0: the matrices int_dot_fits takes (permuted, bits 2, 4,
// 8, groups of whole 16-word blocks or of 8 words) run with int8 activations (int_dot.h), the others in float.
// Returns 0, or 1 for bits other than 2/3/4/8, 2 for a job of more than 256 tokens.
int moekit_int_ffn(int bits, const float* x, float* out, int64_t N, int64_t D, int64_t I, int64_t J,
                   const int64_t* ptrs, int64_t groups_gate_up, int64_t groups_down, int permuted, const int32_t* tok_start,
                   const int32_t* tok, const float* w, float* h, float* accs, int threads, int int8_dot) {
  if (int code = check_jobs(J, tok_start)) return code;
  IntRows rows{ptrs, {groups_gate_up, groups_down}, permuted != 0, {nullptr, nullptr}, {0, 0}};
  // the calling thread's buffers, kept between calls (the decode step makes one call per layer and token)
  static thread_local QuantizedRows quantized[2];
  const int64_t cols[2] = {D, I}, vectors[2] = {N, tok_start[J]};
  for (int kind = 0; kind < 2 && int8_dot && permuted && bits != 3; ++kind) {
    const int64_t words = (cols[kind] + 32 / bits - 1) / (32 / bits);
    const int64_t group_words = IntRows::group_words(bits, cols[kind], rows.groups[kind]);
    if (!int_dot_fits(bits, words, group_words)) continue;
    quantized[kind].resize(vectors[kind], words, bits);
    rows.qrows[kind] = &quantized[kind];
    rows.qgroup_words[kind] = group_words;
  }
  switch (bits) {
    case 2: run_layer(IntCall<2>{{rows}}, x, D, I, J, tok_start, tok, w, h, accs, N, out, threads); return 0;
    case 3: run_layer(IntCall<3>{{rows}}, x, D, I, J, tok_start, tok, w, h, accs, N, out, threads); return 0;
    case 4: run_layer(IntCall<4>{{rows}}, x, D, I, J, tok_start, tok, w, h, accs, N, out, threads); return 0;
    case 8: run_layer(IntCall<8>{{rows}}, x, D, I, J, tok_start, tok, w, h, accs, N, out, threads); return 0;
    default: return 1;
  }
}

// The instruction set of moekit_int_ffn's int8 dot products on this build (int_dot.h).
const char* moekit_int_dot_isa() { return int_dot_isa(); }

}  // extern "C"
