// Routed SwiGLU experts in compressed stored forms on the CPU, decoded inside the matvec
// (moekit.native.compressed).
//
// The same layer computation as experts.cpp: for each job j (one expert and its tokens),
//     out[t] += w * down_j @ (silu(gate_j @ x[t]) * (up_j @ x[t]))      for each of its tokens t
// with the weights stored as
//   int-N  (quant.formats.IntForm; bits 2, 3, 4, 8): per matrix qweight [R, ceil(K / k)] int32
//          (k = 32 / bits codes per word, code i of a word in bits i*bits..), scale [R, P] float16,
//          zero [R, P] uint8, weight = scale * (code - zero) in groups of ceil(K / P) columns;
//   ternary code (quant.formats.TernaryCodeForm, quant.code): per matrix codewords [T, W] uint8 or
//          uint16, starts [T] int16/int32, row_chunks [R] uint8/int16/int32, block_offsets [NB] int32,
//          lo, hi [R] float16, and the layer's decode table [2^bits, 2] int32.
// Each weight row is decoded once per call, in the thread's cache (int-N: to float weights exactly
// as the form's dequantize computes them; the code: to the columns of its HI and LO symbols), and
// the decoded row is dotted with every token of the job: the packed bytes are read once from
// memory, whatever the number of tokens.
// Int-N with int8 activations (moekit_int_ffn's int8_dot; int_dot.h): the matrices that fit (bits
// 2, 4, 8, permuted, groups of whole 16-word blocks) are not decoded to floats at all: each token's
// x and each slot's h are quantized once per call and the codes multiply them in int32.
//
// One OpenMP region per layer, two stages with one barrier (as experts.cpp):
//   stage 1  work item = (job, block of ffn rows): h[slot, r] = silu(gate_r . x) * (up_r . x)
//   stage 2  work item = block of hidden rows d: out[t, d] = sum over jobs of w * (down_d . h[slot])
// Stage 2 partitions the output rows and sums over jobs in job order, so the result does not
// depend on the thread count. Accumulation is float32; x and out are float32.
//
// Shapes: N tokens, D hidden, I ffn width, J jobs, T = slots of all jobs (tok_start[J]).
// accs holds threads * acc_stride(N) floats (each thread's on cache lines of its own).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#include <omp.h>

#include "common.h"
#include "int_dot.h"
#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {


// 16-lane vectors (GCC / clang vector extensions: two AVX2 registers, one AVX-512, four NEON)
constexpr int V = 16;
typedef float vf __attribute__((vector_size(4 * V)));
typedef uint32_t vu __attribute__((vector_size(4 * V)));
typedef int32_t vi __attribute__((vector_size(4 * V)));

// ---- int-N ---------------------------------------------------------------------------------------

// ptrs per job: gate_up qweight, scale, zero, down qweight, scale, zero
//
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
  // qrows[kind] when that kind takes int8 activations; called by every thread of the region.
  template <int BITS>
  void quantize(int kind, const float* vec, int64_t stride, int64_t rows) const {
    if constexpr (BITS == 2 || BITS == 4 || BITS == 8) {
      QuantizedRows* qr = qrows[kind];
      if (qr == nullptr) return;
#pragma omp for schedule(static)
      for (int64_t t = 0; t < rows; ++t) quantize_row<BITS>(vec + t * stride, *qr, t);
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
        for (int k = 0; k < count; ++k) {
          const int64_t t = row0 + (which ? which[k] : k);
          out[k] = int_row_dot<BITS>(reinterpret_cast<const uint32_t*>(q), HalfScales{scale}, zero, group_words(BITS, K, P),
                                     qr->q.data() + t * qr->columns, qr->scale.data() + t * words,
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
    for (int k = 0; k < count; ++k) out[k] = dot(s.row.data(), vec + (which ? which[k] : k) * stride, n);
  }

  // Where stage 1 writes h[slot, r] (of I columns) in a slot's row, and that row's floats.
  template <int BITS>
  int64_t h_index(int64_t r, int64_t I) const {
    if (!permuted) return r;
    constexpr int PER_WORD = 32 / BITS;
    return (r % PER_WORD) * ((I + PER_WORD - 1) / PER_WORD) + r / PER_WORD;
  }
};

// ---- ternary code --------------------------------------------------------------------------------

// ptrs per job: for gate_up then down: codewords, starts, row_chunks, block_offsets, lo, hi
//
// A codeword stands for up to 27 consecutive symbols (its table entry: a nonzero mask, a HI mask,
// its length), so it is decoded as two 16-lane vectors at once, without a branch per symbol:
// lane l of the word selects x[col + l] (or the level, when decoding a row) where bit l of its
// HI or LO mask is set. The vectors read up to 32 floats from a word's column: the caller pads
// x and h by CODE_PAD floats.
//
// Batch 1 (the decode step) with AVX-512: row . x = hi * (sum of x under HI symbols) + lo * (sum
// under LO symbols), each word adding its two x vectors into the sums under its masks. The masks
// come precomputed per dictionary entry (masks [2^bits, 4] uint16: HI lanes 0-15, HI lanes 16-26 |
// length << 11, LO lanes 0-15, LO lanes 16-26; compressed.code_masks builds them once per table),
// one 8-byte entry per word, and go from memory straight into mask registers (one kmovq and three
// shifts; a compiler would route _load_mask16 through a general register). The second x vector is loaded
// with lanes 11-15 zeroed, so the length bits in its mask add nothing. A word costs its index load,
// four mask loads, two x loads and four masked adds. The HI sums use the adders and the LO sums
// fused multiply-adds by 1 (exact: x * 1 + s rounds once, as x + s), so Zen 4's two add and two FMA
// pipes share the work; words alternate between two sets of sums (in registers), so no chain of
// dependent adds waits an add's latency for every word. Measured on the shared 2-core Zen 4 (OLMoE
// layer, bench_ternary_cpu.py): 8-bit 2.75 -> 6.0 G weights/s per thread, 16-bit 4.2 -> 7.6-7.9.
struct CodeRows {
  const int64_t* ptrs;
  const uint32_t* table;  // [2^bits, 2]: nonzero bits; HI bits | length << 27
  const uint16_t* masks;  // [2^bits, 4] per entry: HI lanes 0-15, 16-26 | length << 11, LO lanes 0-15, 16-26
  const uint8_t* lengths;  // [2^bits] symbols per entry (the batch-1 path reads them from masks)
  const int64_t* sizes;  // per job and kind: W, sizeof(starts), sizeof(row_chunks)

  // A thread's decoded row (count > 1): K floats plus a word's reach.
  struct Scratch {
    std::vector<float> row;
    explicit Scratch(int64_t k) : row(k + 2 * V) {}
  };

  static int64_t load(const void* p, int64_t i, int64_t bytes) {
    if (bytes == 1) return static_cast<const uint8_t*>(p)[i];
    if (bytes == 2) return static_cast<const int16_t*>(p)[i];
    return static_cast<const int32_t*>(p)[i];
  }

  static vi bits_of(uint32_t mask, const vu& lanes) {  // lane l: all ones where bit l of mask is set
    vu m = mask - vu{};
    return -reinterpret_cast<vi>((m >> lanes) & 1u);
  }

  void levels(int kind, int64_t j, int64_t r, float* lo, float* hi) const {
    const int64_t* p = ptrs + j * 12 + kind * 6;
    *lo = half_to_float(reinterpret_cast<const uint16_t*>(p[4])[r]);
    *hi = half_to_float(reinterpret_cast<const uint16_t*>(p[5])[r]);
  }

  // Row r of matrix `kind` of job j: its codewords, chunk starts and first chunk.
  template <typename Word>
  struct Row {
    const Word* words;  // [T, W]
    const void* starts;  // [T]
    int64_t W, start_bytes, first, chunks;
  };

  template <typename Word>
  Row<Word> row_of(int kind, int64_t j, int64_t r) const {
    const int64_t* p = ptrs + j * 12 + kind * 6;
    const void* row_chunks = reinterpret_cast<const void*>(p[2]);
    const int32_t* block_offsets = reinterpret_cast<const int32_t*>(p[3]);
    const int64_t* size = sizes + j * 6 + kind * 3;
    const int64_t cb = size[2];
    // the row's first chunk: its block's first, plus the chunks of the rows before it in the block
    const int64_t block = r / 16;
    int64_t first = block_offsets[block];
    for (int64_t q = block * 16; q < r; ++q) first += load(row_chunks, q, cb);
    return {reinterpret_cast<const Word*>(p[0]), reinterpret_cast<const void*>(p[1]), size[0], size[1], first,
            load(row_chunks, r, cb)};
  }

  // Walks the codewords of row r of matrix `kind` of job j; calls at(col, hi_mask, lo_mask, set)
  // for each word that starts inside the row, set (a std::integral_constant) alternating 0 and 1,
  // so the caller can keep two sets of sums in registers.
  template <typename Word, typename At>
  void walk(int kind, int64_t j, int64_t r, int64_t K, At at) const {
    const Row<Word> row = row_of<Word>(kind, j, r);
    for (int64_t c = row.first; c < row.first + row.chunks; ++c) {
      int64_t col = load(row.starts, c, row.start_bytes);
      const Word* cw = row.words + c * row.W;
      auto one = [&](Word w, auto set) {  // also for all-zero words: a branch on them would be mispredicted
        const uint32_t* e = table + 2 * static_cast<uint32_t>(w);
        const uint32_t nz = e[0], hl = e[1];
        const uint32_t his = nz & hl & 0x7ffffffu;
        at(col, his, nz & ~his, set);
        col += hl >> 27;
      };
      int64_t i = 0;
      for (; i + 2 <= row.W; i += 2) {  // past K: the chunk's padding words
        if (col >= K) break;
        one(cw[i], std::integral_constant<int, 0>{});
        if (col >= K) break;
        one(cw[i + 1], std::integral_constant<int, 1>{});
      }
      if (i + 1 == row.W && col < K) one(cw[i], std::integral_constant<int, 0>{});
    }
  }

#if defined(__AVX512F__) && !defined(MOEKIT_NO_AVX512)
  // A mask register loaded straight from memory (compilers route _load_mask16 through a general
  // register: a load and a move into the mask register per mask)
  static inline __mmask16 mask_at(const uint16_t* p) {
#if defined(__GNUC__) && !defined(__clang__)
    __mmask16 k;
    asm("kmovw %1, %0" : "=Yk"(k) : "m"(*p));
    return k;
#else
    return _load_mask16(const_cast<__mmask16*>(reinterpret_cast<const __mmask16*>(p)));
#endif
  }

  // A word's x vectors x0, x1 into the sums under its masks m[0..3] (HI lanes 0-15, 16-31, LO lanes
  // 0-15, 16-31). With GCC one 8-byte mask load and three mask shifts (its intrinsics would move
  // each mask through a general register: 12% slower on the OLMoE layer).
  static inline void add_word(const uint16_t* m, __m512 x0, __m512 x1, __m512 one, __m512& h0, __m512& h1,
                              __m512& l0, __m512& l1) {
#if defined(__GNUC__) && !defined(__clang__)
    asm("kmovq %[mk], %%k1\n\t"
        "kshiftrq $16, %%k1, %%k2\n\t"
        "kshiftrq $32, %%k1, %%k3\n\t"
        "kshiftrq $48, %%k1, %%k4\n\t"
        "vaddps %[a0], %[h0], %[h0]%{%%k1%}\n\t"
        "vaddps %[a1], %[h1], %[h1]%{%%k2%}\n\t"
        "vfmadd231ps %[on], %[a0], %[l0]%{%%k3%}\n\t"
        "vfmadd231ps %[on], %[a1], %[l1]%{%%k4%}"
        : [h0] "+v"(h0), [h1] "+v"(h1), [l0] "+v"(l0), [l1] "+v"(l1)
        : [mk] "m"(*reinterpret_cast<const uint64_t*>(m)), [a0] "v"(x0), [a1] "v"(x1), [on] "v"(one)
        : "k1", "k2", "k3", "k4");
#else
    h0 = _mm512_mask_add_ps(h0, mask_at(m), h0, x0);
    h1 = _mm512_mask_add_ps(h1, mask_at(m + 1), h1, x1);
    l0 = _mm512_mask3_fmadd_ps(x0, one, l0, mask_at(m + 2));
    l1 = _mm512_mask3_fmadd_ps(x1, one, l1, mask_at(m + 3));
#endif
  }

  // Row r . x for one vector x (the module comment's batch-1 path): hi * sum_hi + lo * sum_lo.
  template <typename Word>
  float dot_one(int kind, int64_t j, int64_t r, int64_t K, const float* x) const {
    const Row<Word> row = row_of<Word>(kind, j, r);
    const __m512 one = _mm512_set1_ps(1.f);
    const __mmask16 lanes_0_10 = 0x7ff;  // symbols 16-26: the high mask's bits 11-15 hold the length
    __m512 hi_a0 = _mm512_setzero_ps(), hi_a1 = hi_a0, lo_a0 = hi_a0, lo_a1 = hi_a0;
    __m512 hi_b0 = hi_a0, hi_b1 = hi_a0, lo_b0 = hi_a0, lo_b1 = hi_a0;
    // one word at column COL into a set of four sums
#define MOEKIT_CODE_WORD(W_, COL, H0, H1, L0, L1)                                     \
  {                                                                                   \
    const uint16_t* m = masks + 4 * static_cast<uint32_t>(W_);                        \
    const __m512 x0 = _mm512_loadu_ps(x + COL), x1 = _mm512_maskz_loadu_ps(lanes_0_10, x + COL + V); \
    add_word(m, x0, x1, one, H0, H1, L0, L1);                                         \
    COL += m[1] >> 11;                                                                \
  }
    // (Walking two chunks side by side, unchecked -- every word of a row's chunks but its last starts
    // inside the row -- measured 5-10% slower.)
    for (int64_t c = row.first; c < row.first + row.chunks; ++c) {
      int64_t col = load(row.starts, c, row.start_bytes);
      const Word* cw = row.words + c * row.W;
      int64_t i = 0;
      for (; i + 2 <= row.W; i += 2) {  // past K: the chunk's padding words (all zeros)
        if (col >= K) break;
        MOEKIT_CODE_WORD(cw[i], col, hi_a0, hi_a1, lo_a0, lo_a1)
        if (col >= K) break;
        MOEKIT_CODE_WORD(cw[i + 1], col, hi_b0, hi_b1, lo_b0, lo_b1)
      }
      if (i + 1 == row.W && col < K) MOEKIT_CODE_WORD(cw[i], col, hi_a0, hi_a1, lo_a0, lo_a1)
    }
#undef MOEKIT_CODE_WORD
    const float sh = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(hi_a0, hi_a1), _mm512_add_ps(hi_b0, hi_b1)));
    const float sl = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(lo_a0, lo_a1), _mm512_add_ps(lo_b0, lo_b1)));
    float lo, hi;
    levels(kind, j, r, &lo, &hi);
    return hi * sh + lo * sl;
  }

  // Row r's float weights into row (K + 2 * V floats, zero past the row's last word): each word
  // writes its 32 lanes whole (its levels under its masks, zeros elsewhere), in column order, so
  // the next word overwrites the lanes past this one's end and no lane needs reading back.
  template <typename Word>
  void decode_row(int kind, int64_t j, int64_t r, int64_t K, float lo, float hi, float* out) const {
    const Row<Word> row = row_of<Word>(kind, j, r);
    const __m512 hv = _mm512_set1_ps(hi), lv = _mm512_set1_ps(lo);
    for (int64_t c = row.first; c < row.first + row.chunks; ++c) {
      int64_t col = load(row.starts, c, row.start_bytes);
      const Word* cw = row.words + c * row.W;
      for (int64_t i = 0; i < row.W && col < K; ++i) {  // past K: the chunk's padding words
        const uint16_t* m = masks + 4 * static_cast<uint32_t>(cw[i]);
        const __mmask16 h1 = static_cast<__mmask16>(m[1] & 0x7ffu);  // bits 11-15: the length
        _mm512_storeu_ps(out + col, _mm512_mask_mov_ps(_mm512_maskz_mov_ps(mask_at(m + 2), lv), mask_at(m), hv));
        _mm512_storeu_ps(out + col + V, _mm512_mask_mov_ps(_mm512_maskz_mov_ps(mask_at(m + 3), lv), h1, hv));
        col += m[1] >> 11;
      }
    }
  }
#endif

  template <typename Word>
  void dots(Scratch& s, int kind, int64_t j, int64_t r, int64_t K, const float* vec, int64_t stride,
            const int32_t* which, int count, int64_t, float* out) const {
    const vu lanes = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    float lo, hi;
    if (count == 1) {  // decode: sum x under the HI and under the LO symbols, straight from the words
      const float* x = vec + (which ? which[0] : 0) * stride;
#if defined(__AVX512F__) && !defined(MOEKIT_NO_AVX512)
      out[0] = dot_one<Word>(kind, j, r, K, x);
      return;
#else
      // two sets of sums (walk's alternating words) x low / high half: one chain of dependent
      // adds would wait an add's latency for every word
      vf sum_hi[4] = {}, sum_lo[4] = {};
      walk<Word>(kind, j, r, K, [&](int64_t col, uint32_t his, uint32_t los, auto set) {
        constexpr int base = 2 * decltype(set)::value;  // a constant index: the sums stay in registers
        for (int half = 0; half < 2; ++half) {
          vi xv;
          std::memcpy(&xv, x + col + half * V, sizeof(xv));
          sum_hi[base + half] += reinterpret_cast<vf>(xv & bits_of(his >> (half * V), lanes));
          sum_lo[base + half] += reinterpret_cast<vf>(xv & bits_of(los >> (half * V), lanes));
        }
      });
      const vf all_hi = (sum_hi[0] + sum_hi[1]) + (sum_hi[2] + sum_hi[3]);
      const vf all_lo = (sum_lo[0] + sum_lo[1]) + (sum_lo[2] + sum_lo[3]);
      float sh = 0.f, sl = 0.f;
      for (int l = 0; l < V; ++l) {
        sh += all_hi[l];
        sl += all_lo[l];
      }
      levels(kind, j, r, &lo, &hi);
      out[0] = hi * sh + lo * sl;
      return;
#endif
    }
    // several tokens: the row decoded once into its float weights, then dotted with each
    float* row = s.row.data();
    std::memset(row, 0, sizeof(float) * (K + 2 * V));
    levels(kind, j, r, &lo, &hi);
#if defined(__AVX512F__) && !defined(MOEKIT_NO_AVX512)
    decode_row<Word>(kind, j, r, K, lo, hi, row);
    for (int k = 0; k < count; ++k) out[k] = dot(row, vec + (which ? which[k] : k) * stride, K);
    return;
#endif
    const vi hv = reinterpret_cast<vi>(vf{} + hi), lv = reinterpret_cast<vi>(vf{} + lo);
    walk<Word>(kind, j, r, K, [&](int64_t col, uint32_t his, uint32_t los, auto) {
      for (int half = 0; half < 2; ++half) {  // words cover disjoint columns: lanes past one add zeros
        vf w;
        std::memcpy(&w, row + col + half * V, sizeof(w));
        w += reinterpret_cast<vf>((bits_of(his >> (half * V), lanes) & hv) | (bits_of(los >> (half * V), lanes) & lv));
        std::memcpy(row + col + half * V, &w, sizeof(w));
      }
    });
    for (int k = 0; k < count; ++k) out[k] = dot(row, vec + (which ? which[k] : k) * stride, K);
  }
};

// Calls rows.dots<Arg> (the decoder of one bit width / codeword type).
template <int BITS>
struct IntCall {
  using Scratch = IntRows::Scratch;
  const IntRows& rows;
  void operator()(Scratch& s, int kind, int64_t j, int64_t r, int64_t K, const float* vec, int64_t stride,
                  const int32_t* which, int count, int64_t row0, float* out) const {
    rows.dots<BITS>(s, kind, j, r, K, vec, stride, which, count, row0, out);
  }
  void quantize(int kind, const float* vec, int64_t stride, int64_t rows_) const {
    rows.quantize<BITS>(kind, vec, stride, rows_);
  }
  int64_t h_index(int64_t r, int64_t I) const { return rows.h_index<BITS>(r, I); }
  int64_t h_stride(int64_t I) const { return rows.permuted ? IntRows::width(BITS, I) : I; }
  int64_t x_stride(int64_t D) const { return rows.permuted ? IntRows::width(BITS, D) : D; }
};

template <typename Word>
struct CodeCall {
  using Scratch = CodeRows::Scratch;
  const CodeRows& rows;
  void operator()(Scratch& s, int kind, int64_t j, int64_t r, int64_t K, const float* vec, int64_t stride,
                  const int32_t* which, int count, int64_t row0, float* out) const {
    rows.template dots<Word>(s, kind, j, r, K, vec, stride, which, count, row0, out);
  }
  void quantize(int, const float*, int64_t, int64_t) const {}  // float activations only
  int64_t h_index(int64_t r, int64_t) const { return r; }
  int64_t h_stride(int64_t I) const { return I; }
  int64_t x_stride(int64_t D) const { return D; }
};

template <typename Call>
void run_layer(const Call& call, const float* xf, int64_t D, int64_t I, int64_t J, const int32_t* tok_start,
               const int32_t* tok, const float* w, float* h, float* accs, int64_t N, float* out, int threads) {
  const int64_t blocks_i = (I + ROWS_PER_ITEM - 1) / ROWS_PER_ITEM;
  const int64_t blocks_d = (D + ROWS_PER_ITEM - 1) / ROWS_PER_ITEM;
  const int64_t xs = call.x_stride(D), hs = call.h_stride(I);  // floats of a row of x, of h
#pragma omp parallel num_threads(threads)
  {
    typename Call::Scratch scratch(D > I ? D : I);
    float g[MAX_JOB_TOKENS], u[MAX_JOB_TOKENS];
    float* acc = accs + static_cast<int64_t>(omp_get_thread_num()) * acc_stride(N);
    call.quantize(0, xf, xs, N);  // int8 activations: x once per call (an omp for, when it runs)
#pragma omp for schedule(static)
    for (int64_t item = 0; item < J * blocks_i; ++item) {
      const int64_t j = item / blocks_i, r0 = (item % blocks_i) * ROWS_PER_ITEM;
      const int32_t first = tok_start[j], count = tok_start[j + 1] - first;
      for (int64_t r = r0; r < r0 + ROWS_PER_ITEM && r < I; ++r) {
        call(scratch, 0, j, r, D, xf, xs, tok + first, count, 0, g);
        call(scratch, 0, j, I + r, D, xf, xs, tok + first, count, 0, u);
        const int64_t at = call.h_index(r, I);
        for (int k = 0; k < count; ++k) h[(first + k) * hs + at] = g[k] / (1.f + std::exp(-g[k])) * u[k];
      }
    }  // implicit barrier: every h is written
    call.quantize(1, h, hs, tok_start[J]);  // and each slot's h once
#pragma omp for schedule(static)
    for (int64_t item = 0; item < blocks_d; ++item) {
      for (int64_t d = item * ROWS_PER_ITEM; d < (item + 1) * ROWS_PER_ITEM && d < D; ++d) {
        for (int64_t t = 0; t < N; ++t) acc[t] = 0.f;
        for (int64_t j = 0; j < J; ++j) {
          const int32_t first = tok_start[j], count = tok_start[j + 1] - first;
          call(scratch, 1, j, d, I, h + first * hs, hs, nullptr, count, first, g);
          for (int k = 0; k < count; ++k) acc[tok[first + k]] += w[first + k] * g[k];
        }
        for (int64_t t = 0; t < N; ++t) out[t * D + d] = acc[t];
      }
    }
  }
}

int check_jobs(int64_t J, const int32_t* tok_start) {
  for (int64_t j = 0; j < J; ++j)
    if (tok_start[j + 1] - tok_start[j] > MAX_JOB_TOKENS) return 2;
  return 0;
}

}  // namespace

extern "C" {

// Int-N experts. ptrs: J * 6 addresses (module comment). permuted (IntRows): x is [N, words(D) * k]
// in the permuted layout, h holds slots * words(I) * k floats, zero at the padding; else x is
// [N, D] and h slots * I floats. int8_dot != 0: the matrices int_dot_fits takes (permuted, bits 2, 4,
// 8, groups of whole 16-word blocks) run with int8 activations (int_dot.h), the others in float.
// Returns 0, or 1 for bits other than 2/3/4/8, 2 for a job of more than 256 tokens.
int moekit_int_ffn(int bits, const float* x, float* out, int64_t N, int64_t D, int64_t I, int64_t J,
                   const int64_t* ptrs, int64_t groups_gate_up, int64_t groups_down, int permuted, const int32_t* tok_start,
                   const int32_t* tok, const float* w, float* h, float* accs, int threads, int int8_dot) {
  if (int code = check_jobs(J, tok_start)) return code;
  IntRows rows{ptrs, {groups_gate_up, groups_down}, permuted != 0, {nullptr, nullptr}};
  // the calling thread's buffers, kept between calls (the decode step makes one call per layer and token)
  static thread_local QuantizedRows quantized[2];
  const int64_t cols[2] = {D, I}, vectors[2] = {N, tok_start[J]};
  for (int kind = 0; kind < 2 && int8_dot && permuted && bits != 3; ++kind) {
    const int64_t words = (cols[kind] + 32 / bits - 1) / (32 / bits);
    if (!int_dot_fits(bits, words, IntRows::group_words(bits, cols[kind], rows.groups[kind]))) continue;
    quantized[kind].resize(vectors[kind], words, bits);
    rows.qrows[kind] = &quantized[kind];
  }
  switch (bits) {
    case 2: run_layer(IntCall<2>{rows}, x, D, I, J, tok_start, tok, w, h, accs, N, out, threads); return 0;
    case 3: run_layer(IntCall<3>{rows}, x, D, I, J, tok_start, tok, w, h, accs, N, out, threads); return 0;
    case 4: run_layer(IntCall<4>{rows}, x, D, I, J, tok_start, tok, w, h, accs, N, out, threads); return 0;
    case 8: run_layer(IntCall<8>{rows}, x, D, I, J, tok_start, tok, w, h, accs, N, out, threads); return 0;
    default: return 1;
  }
}

// The instruction set of moekit_int_ffn's int8 dot products on this build (int_dot.h).
const char* moekit_int_dot_isa() { return int_dot_isa(); }

// Ternary-code experts. ptrs: J * 12 addresses; sizes: J * 6, per job and kind (gate_up, down)
// W, sizeof(starts), sizeof(row_chunks); word_bytes: 1 (uint8 codewords) or 2 (uint16); masks
// [2^bits, 4] uint16 and lengths [2^bits] uint8: the table's entries as CodeRows reads them at batch 1
// (compressed.code_masks). Returns 0, or 1 for other codeword sizes, 2 for a job of more than 256 tokens.
int moekit_code_ffn(const float* x, float* out, int64_t N, int64_t D, int64_t I, int64_t J, const int64_t* ptrs,
                    const int32_t* table, const uint16_t* masks, const uint8_t* lengths, int word_bytes,
                    const int64_t* sizes, const int32_t* tok_start, const int32_t* tok, const float* w, float* h,
                    float* accs, int threads) {
  if (int code = check_jobs(J, tok_start)) return code;
  CodeRows rows{ptrs, reinterpret_cast<const uint32_t*>(table), masks, lengths, sizes};
  if (word_bytes == 1)
    run_layer(CodeCall<uint8_t>{rows}, x, D, I, J, tok_start, tok, w, h, accs, N, out, threads);
  else if (word_bytes == 2)
    run_layer(CodeCall<uint16_t>{rows}, x, D, I, J, tok_start, tok, w, h, accs, N, out, threads);
  else
    return 1;
  return 0;
}

}  // extern "C"

// ---- one token's layer inside the native decode step ---------------------------------------------

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
