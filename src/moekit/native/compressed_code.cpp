// Ternary-code routed experts on the CPU (compressed.cpp says what the layer computes): each
// weight row's codewords walked with the layer's decode table, straight into the dot at batch 1,
// and the C entry moekit_code_ffn.
//
// Stored (quant.formats.TernaryCodeForm, quant.code): per matrix codewords [T, W] uint8 or uint16,
//   starts [T] int16/int32, row_chunks [R] uint8/int16/int32, block_offsets [NB] int32, lo, hi [R]
//   float16, and the layer's decode table [2^bits, 2] int32.

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "common.h"
#include "compressed_layer.h"
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

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

#if defined(__AVX2__) && !(defined(__AVX512F__) && !defined(MOEKIT_NO_AVX512))
  // The batch-1 path without AVX-512 (AVX2 hosts): each byte of a word's HI and LO masks picks its
  // 8-lane mask from a 256-entry table (8 KB, in L1), so a word is four x loads, eight table loads,
  // eight ands and eight adds, where the portable loop built each lane mask with a variable shift,
  // an and and a negate (0.22 GB/s of ternary code on two threads of the AVX2-only VM, ~1.1 G weights/s
  // a thread). The sums per 8-lane quarter, hi * sum_hi + lo * sum_lo as on AVX-512.
  static const __m256i* byte_masks() {
    alignas(32) static int32_t table[256][8];
    static const bool built = [] {
      for (int b = 0; b < 256; ++b)
        for (int l = 0; l < 8; ++l) table[b][l] = (b >> l) & 1 ? -1 : 0;
      return true;
    }();
    (void)built;
    return reinterpret_cast<const __m256i*>(table);
  }

  template <typename Word>
  float dot_one_avx2(int kind, int64_t j, int64_t r, int64_t K, const float* x) const {
    const __m256i* bm = byte_masks();
    __m256 h0 = _mm256_setzero_ps(), h1 = h0, h2 = h0, h3 = h0, l0 = h0, l1 = h0, l2 = h0, l3 = h0;
    walk<Word>(kind, j, r, K, [&](int64_t col, uint32_t his, uint32_t los, auto) {
      const float* xc = x + col;
      const __m256 x0 = _mm256_loadu_ps(xc), x1 = _mm256_loadu_ps(xc + 8), x2 = _mm256_loadu_ps(xc + 16),
                   x3 = _mm256_loadu_ps(xc + 24);
      auto pick = [&](uint32_t m, int q) { return _mm256_castsi256_ps(_mm256_load_si256(bm + ((m >> (8 * q)) & 255u))); };
      h0 = _mm256_add_ps(h0, _mm256_and_ps(x0, pick(his, 0)));
      l0 = _mm256_add_ps(l0, _mm256_and_ps(x0, pick(los, 0)));
      h1 = _mm256_add_ps(h1, _mm256_and_ps(x1, pick(his, 1)));
      l1 = _mm256_add_ps(l1, _mm256_and_ps(x1, pick(los, 1)));
      h2 = _mm256_add_ps(h2, _mm256_and_ps(x2, pick(his, 2)));
      l2 = _mm256_add_ps(l2, _mm256_and_ps(x2, pick(los, 2)));
      h3 = _mm256_add_ps(h3, _mm256_and_ps(x3, pick(his, 3)));
      l3 = _mm256_add_ps(l3, _mm256_and_ps(x3, pick(los, 3)));
    });
    auto total = [](__m256 a, __m256 b, __m256 c, __m256 d) {
      const __m256 v = _mm256_add_ps(_mm256_add_ps(a, b), _mm256_add_ps(c, d));
      __m128 t = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
      t = _mm_add_ps(t, _mm_movehl_ps(t, t));
      return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
    };
    float lo, hi;
    levels(kind, j, r, &lo, &hi);
    return hi * total(h0, h1, h2, h3) + lo * total(l0, l1, l2, l3);
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
#elif defined(__AVX2__)
      out[0] = dot_one_avx2<Word>(kind, j, r, K, x);
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
    dots_many(row, vec, stride, which, count, K, out);
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
    dots_many(row, vec, stride, which, count, K, out);
  }
};

// Calls rows.dots<Word> (the decoder of one codeword type).
template <typename Word>
struct CodeCall : RowCall<CodeRows> {  // float activations, natural layout
  template <typename... Args>  // run_layer's row call, as dots takes it
  void operator()(Args&&... args) const { rows.template dots<Word>(std::forward<Args>(args)...); }
};

}  // namespace

extern "C" {

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
    run_layer(CodeCall<uint8_t>{{rows}}, x, D, I, J, tok_start, tok, w, h, accs, N, out, threads);
  else if (word_bytes == 2)
    run_layer(CodeCall<uint16_t>{{rows}}, x, D, I, J, tok_start, tok, w, h, accs, N, out, threads);
  else
    return 1;
  return 0;
}

}  // extern "C"
