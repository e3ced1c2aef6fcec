// Grouped-query decode attention over a host-resident paged KV cache (moekit.native.attention).
//
// One call attends one query token per sequence over that sequence's cached positions:
//     out[b, h] = softmax(scale * q[b, h] . K[b, h / G]^T) @ V[b, h / G]     over positions lo_b..ctx_b-1
// with lo_b = max(0, ctx_b - window) for a sliding window (window 0: none), G = H / Hkv query heads
// per key/value head, and K, V read through the sequence's block table from pools [NB, BS, Hkv, Dh].
// With sinks (gpt-oss; moekit.sinks), head h's softmax has one more logit sinks[h] in its
// denominator only: p_t = exp(z_t) / (sum_u exp(z_u) + exp(sinks[h])), a weight on "nowhere".
// The online softmax needs nothing else: the sink joins the running sum once, at the end.
//
// Why a kernel: decode attention reads every cached byte once for a few FLOPs per byte (GQA:
// 2 G FLOPs per K or V element), so its time is KV bytes / host memory bandwidth. The work item
// is one (sequence, kv head): its G query heads share each K and V row, which is read from memory
// once, converted to float once and dotted with all G queries (the artifact's GEMM of 4 query
// heads against a block, written as row loops). Positions go in chunks of CHUNK with an online
// softmax (running max and sum), so the scratch is bounded whatever the length. Items are
// dynamically scheduled (sequences differ in length); each item is computed by one thread in
// position order, so the result does not depend on the thread count.
//
// Shapes: B sequences, H query heads, Hkv kv heads, G = H / Hkv, Dh head dim, NB pool blocks,
// BS positions per block, MB blocks per block table.
//   q [B, H, Dh] (dtype qdtype), out [B, H, Dh] (qdtype), keys/values [NB, BS, Hkv, Dh] (kvdtype),
//   block_tables [B, MB] int32, context_lens [B] int32, sinks [H] float32 or null (none).
// dtypes: 0 = bfloat16, 1 = float16, 2 = float32. Accumulation is float32.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "common.h"

namespace {

constexpr int64_t CHUNK = 128;       // positions scored at once (scores [G, CHUNK] per thread)
constexpr int64_t MAX_GROUP = 128;   // query heads per kv head (MLA: all heads over one latent; DeepSeek-V3 128)
constexpr int64_t MAX_HEAD_DIM = 1024;  // MLA reads latent + rope key rows: DeepSeek 512 + 64

// Stores n floats as dtype `dtype` at p.
inline void from_float(int dtype, const float* in, int64_t n, void* p) {
  if (dtype == 2) {
    std::memcpy(p, in, n * sizeof(float));
  } else if (dtype == 0) {  // a loop of its own vectorises (the element function branches on dtype)
    uint16_t* o = static_cast<uint16_t*>(p);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) o[i] = float_to_bf16(in[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) from_float(dtype, in[i], p, i);
  }
}

// Returns 1 / the softmax denominator of query head g: its running sum l of exp(score - m), plus
// exp(sink[g] - m) with sinks (sink: the item's G sink logits, or null). No positions: 0 (zeros
// out, as the sink takes all the weight and there is nothing to weigh).
inline float inverse_denominator(float l, float m, const float* sink, int64_t g) {
  if (!(l > 0.f)) return 0.f;
  return 1.f / (sink ? l + std::exp(sink[g] - m) : l);
}

// Attends one (sequence, kv head): G queries qf [G, Dh] (already scaled) over positions lo..hi-1.
// acc [G, Dh] receives the normalised output. scores [G, CHUNK], row [Dh] are scratch; sink: the
// G query heads' sink logits (null: none).
template <typename T, typename Conv>
void attend_item(const float* qf, int64_t G, int64_t Dh, const T* keys, const T* values, const int32_t* table,
                 int64_t BS, int64_t Hkv, int64_t kvh, int64_t lo, int64_t hi, float* acc, float* scores,
                 float* row, const float* sink, Conv conv) {
  float m[MAX_GROUP], l[MAX_GROUP];
  for (int64_t g = 0; g < G; ++g) { m[g] = -INFINITY; l[g] = 0.f; }
  std::fill(acc, acc + G * Dh, 0.f);
  const int64_t block_stride = BS * Hkv * Dh, pos_stride = Hkv * Dh;
  for (int64_t c0 = lo; c0 < hi; c0 += CHUNK) {
    const int64_t n = std::min(CHUNK, hi - c0);
    // scores: each key row read once, dotted with the G queries
    for (int64_t t = 0; t < n; ++t) {
      const int64_t p = c0 + t;
      const T* k = keys + table[p / BS] * block_stride + (p % BS) * pos_stride + kvh * Dh;
#pragma omp simd
      for (int64_t i = 0; i < Dh; ++i) row[i] = conv(k[i]);
      for (int64_t g = 0; g < G; ++g) {
        const float* qg = qf + g * Dh;
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < Dh; ++i) s += qg[i] * row[i];
        scores[g * CHUNK + t] = s;
      }
    }
    // online softmax: rescale what was accumulated when the running max grows
    for (int64_t g = 0; g < G; ++g) {
      float* sg = scores + g * CHUNK;
      float mx = m[g];
      for (int64_t t = 0; t < n; ++t) mx = std::max(mx, sg[t]);
      const float correction = std::exp(m[g] - mx);  // exp(-inf) = 0 on the first chunk
      float sum = 0.f;
      for (int64_t t = 0; t < n; ++t) {
        sg[t] = std::exp(sg[t] - mx);
        sum += sg[t];
      }
      l[g] = l[g] * correction + sum;
      m[g] = mx;
      if (correction != 1.f) {
        float* ag = acc + g * Dh;
#pragma omp simd
        for (int64_t i = 0; i < Dh; ++i) ag[i] *= correction;
      }
    }
    // values: each row read once, added to the G accumulators
    for (int64_t t = 0; t < n; ++t) {
      const int64_t p = c0 + t;
      const T* v = values + table[p / BS] * block_stride + (p % BS) * pos_stride + kvh * Dh;
#pragma omp simd
      for (int64_t i = 0; i < Dh; ++i) row[i] = conv(v[i]);
      for (int64_t g = 0; g < G; ++g) {
        const float w = scores[g * CHUNK + t];
        float* ag = acc + g * Dh;
#pragma omp simd
        for (int64_t i = 0; i < Dh; ++i) ag[i] += w * row[i];
      }
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    const float inv = inverse_denominator(l[g], m[g], sink, g);
    float* ag = acc + g * Dh;
    for (int64_t i = 0; i < Dh; ++i) ag[i] *= inv;
  }
}


// ---- the vectorised path (head dim a multiple of W) ------------------------------------------
// GCC/clang vector extensions: AVX-512 where -march=native has it, else 8 floats (AVX2 / NEON
// pairs). Query heads go in sub-groups of up to SUB (4; 8 with AVX-512's 32 registers) so their
// accumulators stay in registers; each K or V row is converted once per sub-group while its chunk
// is hot in cache. A core's rate is then its FMAs' (2 FLOPs per element and head), so the rest
// is kept off the FMA ports and the FMA chains are enough to hide the FMA latency:
// - bf16 rows are read 2W elements at a time and split into the even elements (a shift) and the
//   odd ones (a mask), with no shuffles (a widening load took 2-4 a vector with AVX2). The item's
//   queries and accumulators are held in that pair order (each whole 2W block of Dh: its even
//   elements, then its odd ones) and put back in memory order at the end.
// - K: P = W / S positions a step, S = NG rounded up to a power of 2, so the step's P NG dot
//   products (a vector each) reduce together to one vector of scores: a tree of blends, shuffles
//   and W - 1 adds, where a horizontal sum per score (log2(W) adds, as many shuffles and a scalar
//   store) had cost about what the FMAs did. Scores are kept position-major, [t][S].
// - V: DV accumulator vectors for each of the NG heads (NG DV <= W; W for NG a power of 2) stay in
//   registers over all the chunk's positions: each broadcast score feeds DV FMAs, each V load NG.
// The summation order depends on NG, Dh and the chunks alone, never on threads or work items.
#if defined(__AVX512F__)
constexpr int W = 16;
#else
constexpr int W = 8;
#endif
constexpr int ACCS = W;     // accumulator vectors a loop keeps: half the registers (AVX2 16, AVX-512 32)
constexpr int SUB = W / 2;  // query heads a sub-group at most
typedef float vf __attribute__((vector_size(W * 4)));
typedef uint16_t vh __attribute__((vector_size(W * 2)));
typedef uint32_t vu __attribute__((vector_size(W * 4)));
typedef int32_t vi __attribute__((vector_size(W * 4)));

inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline vf load(const uint16_t* p) {  // bfloat16: the high half of a float
  vh h;
  std::memcpy(&h, p, sizeof h);
  vu u = __builtin_convertvector(h, vu) << 16;
  vf f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
#ifdef __FLT16_MAX__
typedef _Float16 vhf __attribute__((vector_size(W * 2)));
inline vf load(const _Float16* p) { vhf h; std::memcpy(&h, p, sizeof h); return __builtin_convertvector(h, vf); }
#endif
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf splat(float x) { return x - vf{}; }  // x - 0 folds away (x + 0 does not: -0 + 0 is +0)

// Loads 2W elements at p as two float vectors: bf16 in pair order (even elements, odd ones; the
// widening load above costs the shuffle ports 2-4 shuffles a vector), other dtypes in memory order.
template <typename T>
inline void load2(const T* p, vf& a, vf& b) { a = load(p); b = load(p + W); }
inline void load2(const uint16_t* p, vf& a, vf& b) {
  vu u;
  std::memcpy(&u, p, sizeof u);
  const vu even = u << 16, odd = u & 0xffff0000u;
  std::memcpy(&a, &even, sizeof a);
  std::memcpy(&b, &odd, sizeof b);
}

// Moves x [Dh] between memory order and pair order (whole 2W blocks; a last W stays as it is),
// for the dtypes load2 reads in pair order.
template <int... I>
inline void deinterleave(vf& a, vf& b, std::integer_sequence<int, I...>) {
  const vf even = __builtin_shufflevector(a, b, (2 * I)...), odd = __builtin_shufflevector(a, b, (2 * I + 1)...);
  a = even;
  b = odd;
}
template <int... I>
inline void interleave(vf& a, vf& b, std::integer_sequence<int, I...>) {
  const vf lo = __builtin_shufflevector(a, b, (I % 2 ? W + I / 2 : I / 2)...);
  const vf hi = __builtin_shufflevector(a, b, (I % 2 ? W + W / 2 + I / 2 : W / 2 + I / 2)...);
  a = lo;
  b = hi;
}
template <typename T>
inline void pair_order(float* x, int64_t Dh, bool to) {
  if (!std::is_same<T, uint16_t>::value) return;
  for (int64_t i = 0; i + 2 * W <= Dh; i += 2 * W) {
    vf a = load(x + i), b = load(x + i + W);
    if (to) deinterleave(a, b, std::make_integer_sequence<int, W>{});
    else interleave(a, b, std::make_integer_sequence<int, W>{});
    store(x + i, a);
    store(x + i + W, b);
  }
}

// One level of the score tree: a and b hold their inputs' partial sums in the lanes of each
// residue mod C (C lanes apart); the result holds a's and b's in those mod 2C, a's where lane & C
// is 0. Within 128-bit lanes (C 1, 2) as unpack / shufps pairs; across them as a blend plus one
// shuffle (each lane plus lane ^ C of the same vector).
template <int C, int... I>
inline vf fold_pair(vf a, vf b, std::integer_sequence<int, I...>) {
  if constexpr (C < 4)
    return __builtin_shufflevector(a, b, (((I & C) ? W : 0) + (I & ~3) + (C == 1 ? (I & 3) >> 1 : I & 1))...) +
           __builtin_shufflevector(a, b, (((I & C) ? W : 0) + (I & ~3) + (C == 1 ? (I & 3) >> 1 : I & 1) + 2)...);
  else
    return __builtin_shufflevector(a, b, ((I & C) ? W + I : I)...) +
           __builtin_shufflevector(a, b, ((I & C) ? W + (I ^ C) : (I ^ C))...);
}
template <int C, int N>
inline void fold_tree(vf* x) {
  for (int i = 0; i < N / 2; ++i) x[i] = fold_pair<C>(x[2 * i], x[2 * i + 1], std::make_integer_sequence<int, W>{});
  if constexpr (N > 2) fold_tree<2 * C, N / 2>(x);
}

// Returns the W sums of a [P][NG] (each vector's lanes summed) as one vector, lane j S + g holding
// a[j][g] (zero for g >= NG). The tree leaves input i in lane i; the shuffles that cross 128-bit
// lanes (slow) come last, where there is one vector or two left.
template <int NG, int S, int P>
inline vf reduce_scores(const vf (&a)[P][NG]) {
  static_assert(P * S == W, "one vector of scores a step");
  vf x[W];
  for (int i = 0; i < W; ++i) {
    x[i] = vf{};
    if (i % S < NG) x[i] = a[i / S][i % S];
  }
  fold_tree<1, W>(x);
  return x[0];
}

// exp(x) for x <= 0 (scores minus their max), relative error ~2e-7: x = n ln2 + r, |r| <= ln2/2,
// exp(r) by its Taylor series to r^6, 2^n built in the exponent bits.
inline vf exp_nonpositive(vf x) {
  const vf lo = vf{} - 87.0f;
  x = x < lo ? lo : x;
  const vf magic = vf{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  vf k = x * 1.44269504f + magic;
  vi n;
  std::memcpy(&n, &k, sizeof n);
  n -= 0x4B400000;  // the bits of `magic`
  k -= magic;
  vf r = x - k * 0.693145752f - k * 1.42860677e-6f;
  vf p = 1.f + r * (1.f + r * (0.5f + r * (1.f / 6 + r * (1.f / 24 + r * (1.f / 120 + r * (1.f / 720))))));
  vi e = (n + 127) << 23;
  vf scale;
  std::memcpy(&scale, &e, sizeof scale);
  return p * scale;
}

// acc [NG, Dh] vectors d..d+DV-1 += sum_u p[u, g] V[u] over the chunk's n positions (scores
// [t][S] hold p). DV is even (pairs, in load2's order) or 1 (a last vector of an odd Dh / W).
template <int NG, int S, int DV, typename T>
inline void accumulate_values(const T* const* vp, int64_t n, const float* scores, float* acc, int64_t Dh, int64_t d) {
  vf c[NG][DV];
  for (int g = 0; g < NG; ++g)
    for (int j = 0; j < DV; ++j) c[g][j] = load(acc + g * Dh + d + j * W);
  for (int64_t u = 0; u < n; ++u) {
    vf s[NG];
    for (int g = 0; g < NG; ++g) s[g] = splat(scores[u * S + g]);
    if constexpr (DV == 1) {
      const vf v = load(vp[u] + d);
      for (int g = 0; g < NG; ++g) c[g][0] += s[g] * v;
    } else {
      for (int j = 0; j < DV; j += 2) {  // one pair live at a time: NG DV + NG + 2 registers
        vf v0, v1;
        load2(vp[u] + d + j * W, v0, v1);
        for (int g = 0; g < NG; ++g) {
          c[g][j] += s[g] * v0;
          c[g][j + 1] += s[g] * v1;
        }
      }
    }
  }
  for (int g = 0; g < NG; ++g)
    for (int j = 0; j < DV; ++j) store(acc + g * Dh + d + j * W, c[g][j]);
}

// One sub-group of NG query heads (qf [NG, Dh], scaled, in pair order) over one chunk of n
// positions whose K and V rows are kp[t], vp[t]: scores, the online-softmax update of m, l, and
// acc [NG, Dh] (pair order). scores: scratch of CHUNK S floats.
template <int NG, typename T>
void chunk_fast(const float* qf, int64_t Dh, const T* const* kp, const T* const* vp, int64_t n, float* m, float* l,
                float* acc, float* scores) {
  constexpr int S = NG <= 2 ? NG : NG <= 4 ? 4 : 8, P = W / S;  // CHUNK % P == 0: the steps fit in scores
  const int64_t pairs = Dh / (2 * W) * (2 * W);  // the elements read as pairs; a last W (odd Dh / W) alone
  for (int64_t t = 0; t < n; t += P) {
    const T* rows[P];  // past n (the last step): row n - 1 again, its scores masked below
    for (int j = 0; j < P; ++j) rows[j] = kp[std::min<int64_t>(t + j, n - 1)];
    vf a[P][NG] = {};
    for (int64_t d = 0; d < pairs; d += 2 * W) {
      // The same FMAs in either order; the order keeps the live vectors in the register file:
      // few heads: the queries stay and each row's pair is used at once; else the P rows' pairs
      // stay and each head's query pair is loaded once.
      if constexpr (NG <= 2) {
        vf q0[NG], q1[NG];
        for (int g = 0; g < NG; ++g) { q0[g] = load(qf + g * Dh + d); q1[g] = load(qf + g * Dh + d + W); }
        for (int j = 0; j < P; ++j) {
          vf k0, k1;
          load2(rows[j] + d, k0, k1);
          for (int g = 0; g < NG; ++g) { a[j][g] += q0[g] * k0; a[j][g] += q1[g] * k1; }
        }
      } else {
        vf k0[P], k1[P];
        for (int j = 0; j < P; ++j) load2(rows[j] + d, k0[j], k1[j]);
        for (int g = 0; g < NG; ++g) {
          const vf q0 = load(qf + g * Dh + d), q1 = load(qf + g * Dh + d + W);
          for (int j = 0; j < P; ++j) { a[j][g] += q0 * k0[j]; a[j][g] += q1 * k1[j]; }
        }
      }
    }
    if (pairs < Dh)
      for (int j = 0; j < P; ++j) {
        const vf k = load(rows[j] + pairs);
        for (int g = 0; g < NG; ++g) a[j][g] += load(qf + g * Dh + pairs) * k;
      }
    store(scores + t * S, reduce_scores<NG, S, P>(a));
  }
  // online softmax over the [t][S] scores: lane e of every vector is head e % S
  const int64_t nvec = (n + P - 1) / P;
  float* last = scores + (nvec - 1) * W;
  const int valid = static_cast<int>(n - (nvec - 1) * P) * S;  // the last vector's lanes below n
  for (int e = valid; e < W; ++e) last[e] = -INFINITY;
  vf vmax = vf{} - INFINITY;
  for (int64_t i = 0; i < nvec; ++i) {
    const vf v = load(scores + i * W);
    vmax = vmax > v ? vmax : v;
  }
  float mx[S];
  vf mv;
  for (int g = 0; g < S; ++g) {
    mx[g] = g < NG ? m[g] : 0.f;  // padding heads (NG 3, 5-7): zero scores, any finite max
    for (int j = 0; j < P; ++j) mx[g] = std::max(mx[g], vmax[j * S + g]);
  }
  for (int e = 0; e < W; ++e) mv[e] = mx[e % S];
  vf vsum = vf{};
  for (int64_t i = 0; i < nvec; ++i) {
    vf e = exp_nonpositive(load(scores + i * W) - mv);
    if (i == nvec - 1)  // the positions past n weigh nothing
      for (int k = valid; k < W; ++k) e[k] = 0.f;
    store(scores + i * W, e);
    vsum += e;
  }
  for (int g = 0; g < NG; ++g) {
    float sum = 0.f;
    for (int j = 0; j < P; ++j) sum += vsum[j * S + g];
    const float correction = m[g] == -INFINITY ? 0.f : std::exp(m[g] - mx[g]);
    l[g] = l[g] * correction + sum;
    m[g] = mx[g];
    if (correction != 1.f)
      for (int64_t i = 0; i < Dh; ++i) acc[g * Dh + i] *= correction;
  }
  constexpr int DV = std::max(2, ACCS / NG / 2 * 2);  // NG DV accumulators: ACCS at most (NG 3: 6, 5-7: 10-14)
  const int64_t nv = Dh / W;
  int64_t j = 0;
  for (; j + DV <= nv; j += DV) accumulate_values<NG, S, DV>(vp, n, scores, acc, Dh, j * W);
  for (; j + 2 <= nv; j += 2) accumulate_values<NG, S, 2>(vp, n, scores, acc, Dh, j * W);
  if (j < nv) accumulate_values<NG, S, 1>(vp, n, scores, acc, Dh, j * W);
}

// chunk_fast for a sub-group of ng <= NG heads.
template <int NG, typename T>
void chunk_sub(int64_t ng, const float* qf, int64_t Dh, const T* const* kp, const T* const* vp, int64_t n, float* m,
               float* l, float* acc, float* scores) {
  if (ng == NG) chunk_fast<NG>(qf, Dh, kp, vp, n, m, l, acc, scores);
  else if constexpr (NG > 1) chunk_sub<NG - 1>(ng, qf, Dh, kp, vp, n, m, l, acc, scores);
}

// The G query heads of one kv head (qf [G, Dh], m, l [G], acc [G, Dh], in pair order) over one
// chunk, in sub-groups of up to SUB (chunk_fast keeps a sub-group's accumulators in registers).
// scores: scratch of SUB CHUNK floats.
template <typename T>
void chunk_heads(const float* qf, int64_t G, int64_t Dh, const T* const* kp, const T* const* vp, int64_t n, float* m,
                 float* l, float* acc, float* scores) {
  for (int64_t g0 = 0; g0 < G; g0 += SUB)
    chunk_sub<SUB>(std::min<int64_t>(SUB, G - g0), qf + g0 * Dh, Dh, kp, vp, n, m + g0, l + g0, acc + g0 * Dh, scores);
}

// Asks for the K and V rows (row_bytes each from keys / values plus the position's offset) of
// positions lo..hi-1 of a sequence whose block table is `table`, a cache line at a time; a block
// at a time (one division a block, not two a position: on a core where the kernel is bound by its
// arithmetic, per-position divisions made the asking cost as much as a short item's compute).
template <typename T>
inline void prefetch_rows(const T* keys, const T* values, const int32_t* table, int64_t BS, int64_t block_stride,
                          int64_t pos_stride, int64_t row_bytes, int64_t lo, int64_t hi) {
  for (int64_t p = lo; p < hi;) {
    const int64_t blk = p / BS, end = std::min(hi, (blk + 1) * BS);
    const char* kb = reinterpret_cast<const char*>(keys + table[blk] * block_stride);
    const char* vb = reinterpret_cast<const char*>(values + table[blk] * block_stride);
    for (int64_t off = (p - blk * BS) * pos_stride * static_cast<int64_t>(sizeof(T)); p < end;
         ++p, off += pos_stride * static_cast<int64_t>(sizeof(T)))
      for (int64_t b = 0; b < row_bytes; b += 64) {
        __builtin_prefetch(kb + off + b);
        __builtin_prefetch(vb + off + b);
      }
  }
}

// The rows an item asks for ahead after its own last chunk: the first chunk of the item its thread
// takes next (run takes each thread's next item one early). Most decode contexts are one chunk
// (MTBench-like: mean ~143 positions), so without it every item began as demand misses.
struct Ahead {
  const int32_t* table = nullptr;  // the next item's block table (null: none)
  int64_t lo = 0, hi = 0;          // its first chunk's positions
  int64_t kvh = 0;                 // its kv head (by-head items; a by-sequence item reads every head)
};

// The by-(sequence, kv head) item: qf [G, Dh] (scaled; put in pair order here) over positions
// lo..hi-1; acc [G, Dh] receives the normalised output in memory order. Its last chunk asks for
// the first rows of the thread's next item (`next`); the others for their own next chunk.
template <typename T>
void attend_item_fast(float* qf, int64_t G, int64_t Dh, const T* keys, const T* values, const int32_t* table,
                      int64_t BS, int64_t Hkv, int64_t kvh, int64_t lo, int64_t hi, float* acc, float* scores,
                      const float* sink, Ahead next = {}) {
  float m[MAX_GROUP], l[MAX_GROUP];
  const T* kp[CHUNK];
  const T* vp[CHUNK];
  for (int64_t g = 0; g < G; ++g) { m[g] = -INFINITY; l[g] = 0.f; }
  for (int64_t g = 0; g < G; ++g) pair_order<T>(qf + g * Dh, Dh, true);
  std::fill(acc, acc + G * Dh, 0.f);
  const int64_t block_stride = BS * Hkv * Dh, pos_stride = Hkv * Dh;
  for (int64_t c0 = lo; c0 < hi; c0 += CHUNK) {
    const int64_t n = std::min(CHUNK, hi - c0);
    for (int64_t t = 0; t < n; ++t) {
      const int64_t p = c0 + t, off = table[p / BS] * block_stride + (p % BS) * pos_stride + kvh * Dh;
      kp[t] = keys + off;
      vp[t] = values + off;
    }
    // the rows are 4-8 cache lines a position apart (the other kv heads lie between): too sparse
    // for the hardware prefetchers, so ask for the next chunk's rows while this one computes
    const int64_t row_bytes = Dh * static_cast<int64_t>(sizeof(T));
    if (c0 + CHUNK < hi)
      prefetch_rows(keys + kvh * Dh, values + kvh * Dh, table, BS, block_stride, pos_stride, row_bytes, c0 + CHUNK,
                    std::min(hi, c0 + 2 * CHUNK));
    else if (next.table != nullptr && next.hi > next.lo)
      prefetch_rows(keys + next.kvh * Dh, values + next.kvh * Dh, next.table, BS, block_stride, pos_stride,
                    row_bytes, next.lo, next.hi);
    chunk_heads(qf, G, Dh, kp, vp, n, m, l, acc, scores);
  }
  for (int64_t g = 0; g < G; ++g) {
    const float inv = inverse_denominator(l[g], m[g], sink, g);
    for (int64_t i = 0; i < Dh; ++i) acc[g * Dh + i] *= inv;
    pair_order<T>(acc + g * Dh, Dh, false);
  }
}

// One sequence, every kv head (the by-sequence work item): qf [H, Dh] (scaled; put in pair order
// here) over positions lo..hi-1; acc [H, Dh] receives the normalised output in memory order, m
// and l [H] are scratch. A chunk's positions are read as whole rows (all kv heads, Hkv Dh elements, contiguous in the pool), so a
// block's 16 positions are one contiguous stretch of memory for the hardware prefetchers and the
// DRAM pages, where the by-head item reads Dh of every Hkv Dh. Each head goes through the same
// chunk_fast calls in the same order as attend_item_fast's: the results are bit-identical.
// The rows a by-sequence item asks for ahead while a chunk computes: the sequence's next chunk, or
// after its last one the first chunk of the sequence the thread takes next (Ahead). Spread over
// the chunk's Hkv passes (a slice a pass), not asked for all at once.

template <typename T>
void attend_sequence_fast(float* qf, int64_t H, int64_t Hkv, int64_t Dh, const T* keys, const T* values,
                          const int32_t* table, int64_t BS, int64_t lo, int64_t hi, float* acc, float* scores,
                          float* m, float* l, const float* sinks, Ahead next = {}) {
  const int64_t G = H / Hkv;
  int64_t base[CHUNK];
  const T* kp[CHUNK];
  const T* vp[CHUNK];
  for (int64_t h = 0; h < H; ++h) { m[h] = -INFINITY; l[h] = 0.f; }
  for (int64_t h = 0; h < H; ++h) pair_order<T>(qf + h * Dh, Dh, true);
  std::fill(acc, acc + H * Dh, 0.f);
  const int64_t block_stride = BS * Hkv * Dh, pos_stride = Hkv * Dh, row_bytes = Hkv * Dh * static_cast<int64_t>(sizeof(T));
  for (int64_t c0 = lo; c0 < hi; c0 += CHUNK) {
    const int64_t n = std::min(CHUNK, hi - c0);
    for (int64_t t = 0; t < n; ++t) base[t] = table[(c0 + t) / BS] * block_stride + ((c0 + t) % BS) * pos_stride;
    // the rows asked for ahead: this sequence's next chunk, else the next sequence's first
    const bool more = c0 + CHUNK < hi;
    const int32_t* ahead_table = more ? table : next.table;
    const int64_t a_lo = more ? c0 + CHUNK : next.lo, a_hi = more ? std::min(hi, c0 + 2 * CHUNK) : next.hi;
    for (int64_t kvh = 0; kvh < Hkv; ++kvh) {
      if (ahead_table != nullptr && a_hi > a_lo)  // pass kvh asks for its slice of them
        prefetch_rows(keys, values, ahead_table, BS, block_stride, pos_stride, row_bytes,
                      a_lo + (a_hi - a_lo) * kvh / Hkv, a_lo + (a_hi - a_lo) * (kvh + 1) / Hkv);
      for (int64_t t = 0; t < n; ++t) {
        kp[t] = keys + base[t] + kvh * Dh;
        vp[t] = values + base[t] + kvh * Dh;
      }
      const int64_t h0 = kvh * G;
      chunk_heads(qf + h0 * Dh, G, Dh, kp, vp, n, m + h0, l + h0, acc + h0 * Dh, scores);
    }
  }
  for (int64_t kvh = 0; kvh < Hkv; ++kvh)
    for (int64_t g = 0; g < G; ++g) {
      const int64_t h = kvh * G + g;
      const float inv = inverse_denominator(l[h], m[h], sinks ? sinks + kvh * G : nullptr, g);
      for (int64_t i = 0; i < Dh; ++i) acc[h * Dh + i] *= inv;
      pair_order<T>(acc + h * Dh, Dh, false);
    }
}

// items: 0 auto (by sequence where the kernel vectorises, there are several kv heads and at least
// 4 sequences a thread, else by (sequence, kv head)), 1 by (sequence, kv head), 2 by sequence
// (where the kernel vectorises). Either way every head is computed by one thread in the same
// order: the choice changes only the memory access order, never a result.
inline bool by_sequence_of(int64_t B, int64_t Hkv, int64_t Dh, int threads, int items) {
  return Dh % W == 0 && (items == 2 || (items == 0 && Hkv > 1 && B >= 4 * int64_t(threads)));
}

template <typename T, typename Conv>
void run(int qdtype, const void* q, void* out, const T* keys, const T* values, const int32_t* tables,
         const int32_t* ctx, int64_t B, int64_t H, int64_t Hkv, int64_t Dh, int64_t BS, int64_t MB, int64_t window,
         float scale, const float* sinks, int threads, int items, Conv conv) {
  const int64_t G = H / Hkv, qsize = itemsize(qdtype);
  static const bool prefetch_next = [] {  // A/B switch while measuring (MOEKIT_ATTENTION_PREFETCH=0: off)
    const char* e = std::getenv("MOEKIT_ATTENTION_PREFETCH");
    return e == nullptr || e[0] != '0';
  }();
  std::atomic<int64_t> next_item{0};
  if (by_sequence_of(B, Hkv, Dh, threads, items)) {
#pragma omp parallel num_threads(threads)
    {
      std::vector<float> qf(H * Dh), acc(H * Dh), scores(SUB * CHUNK), m(H), l(H);
      // dynamic scheduling by hand, one sequence ahead: a thread takes its next sequence when it
      // starts one, so that the next one's first rows are on their way while this one computes
      int64_t b = next_item.fetch_add(1, std::memory_order_relaxed);
      while (b < B) {
        const int64_t b2 = next_item.fetch_add(1, std::memory_order_relaxed);
        Ahead ahead;
        if (prefetch_next && b2 < B) {
          const int64_t hi2 = ctx[b2], lo2 = window > 0 ? std::max<int64_t>(0, hi2 - window) : 0;
          ahead = Ahead{tables + b2 * MB, lo2, std::min(hi2, lo2 + CHUNK)};
        }
        const int64_t hi = ctx[b], lo = window > 0 ? std::max<int64_t>(0, hi - window) : 0;
        to_float(qdtype, static_cast<const char*>(q) + b * H * Dh * qsize, H * Dh, qf.data());
        for (int64_t i = 0; i < H * Dh; ++i) qf[i] *= scale;
        attend_sequence_fast(qf.data(), H, Hkv, Dh, keys, values, tables + b * MB, BS, lo, hi, acc.data(),
                             scores.data(), m.data(), l.data(), sinks, ahead);
        from_float(qdtype, acc.data(), H * Dh, static_cast<char*>(out) + b * H * Dh * qsize);
        b = b2;
      }
    }
    return;
  }
  // by (sequence, kv head): with several items a thread, each takes its next one early (dynamic
  // scheduling by hand) and asks for its first rows during this item's last chunk; with few, a
  // claim ahead would leave threads idle (two items to the first threads), so OpenMP hands them out
  const int64_t total = B * Hkv;
  const bool claim_ahead = prefetch_next && total >= 4 * int64_t(threads);
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> qf(G * Dh), acc(G * Dh), scores(std::max<int64_t>(G, SUB) * CHUNK), row(Dh);
    auto attend = [&](int64_t item, Ahead ahead) {
      const int64_t b = item / Hkv, kvh = item % Hkv;
      const int64_t hi = ctx[b], lo = window > 0 ? std::max<int64_t>(0, hi - window) : 0;
      const char* qb = static_cast<const char*>(q) + ((b * H + kvh * G) * Dh) * qsize;
      to_float(qdtype, qb, G * Dh, qf.data());
      for (int64_t i = 0; i < G * Dh; ++i) qf[i] *= scale;
      const float* sink = sinks ? sinks + kvh * G : nullptr;
      if (Dh % W == 0)
        attend_item_fast(qf.data(), G, Dh, keys, values, tables + b * MB, BS, Hkv, kvh, lo, hi, acc.data(),
                         scores.data(), sink, ahead);
      else
        attend_item(qf.data(), G, Dh, keys, values, tables + b * MB, BS, Hkv, kvh, lo, hi, acc.data(), scores.data(),
                    row.data(), sink, conv);
      from_float(qdtype, acc.data(), G * Dh, static_cast<char*>(out) + ((b * H + kvh * G) * Dh) * qsize);
    };
    if (claim_ahead) {
      int64_t item = next_item.fetch_add(1, std::memory_order_relaxed);
      while (item < total) {
        const int64_t item2 = next_item.fetch_add(1, std::memory_order_relaxed);
        Ahead ahead;
        if (item2 < total) {
          const int64_t b2 = item2 / Hkv, hi2 = ctx[b2], lo2 = window > 0 ? std::max<int64_t>(0, hi2 - window) : 0;
          ahead = Ahead{tables + b2 * MB, lo2, std::min(hi2, lo2 + CHUNK), item2 % Hkv};
        }
        attend(item, ahead);
        item = item2;
      }
    } else {
#pragma omp for schedule(dynamic, 1)
      for (int64_t item = 0; item < total; ++item) attend(item, Ahead{});
    }
  }
}

}  // namespace

extern "C" {

// Returns the work items a call with these arguments takes: 1 by (sequence, kv head), 2 by sequence.
int moekit_decode_attention_items(int64_t B, int64_t Hkv, int64_t Dh, int threads, int items) {
  return by_sequence_of(B, Hkv, Dh, threads, items) ? 2 : 1;
}

// Returns 0, or a nonzero code for arguments the kernel cannot take (the caller checks them too):
// 1 H not a multiple of Hkv or a group above MAX_GROUP, 2 a head dim above MAX_HEAD_DIM,
// 3 float16 without compiler support, 4 a context longer than its block table, 5 items not 0, 1 or 2.
// items: how work is spread over threads (run's comment), a choice of memory order only.
int moekit_decode_attention(int qdtype, int kvdtype, const void* q, void* out, const void* keys, const void* values,
                            const int32_t* block_tables, const int32_t* context_lens, int64_t B, int64_t H,
                            int64_t Hkv, int64_t Dh, int64_t BS, int64_t MB, int64_t window, float scale,
                            const float* sinks, int threads, int items) {
  if (Hkv <= 0 || H % Hkv || H / Hkv > MAX_GROUP) return 1;
  if (Dh > MAX_HEAD_DIM) return 2;
  if (items < 0 || items > 2) return 5;
#ifndef __FLT16_MAX__
  if (qdtype == 1 || kvdtype == 1) return 3;
#endif
  for (int64_t b = 0; b < B; ++b)
    if (context_lens[b] < 0 || context_lens[b] > MB * BS) return 4;
  if (kvdtype == 0)
    run(qdtype, q, out, static_cast<const uint16_t*>(keys), static_cast<const uint16_t*>(values), block_tables,
        context_lens, B, H, Hkv, Dh, BS, MB, window, scale, sinks, threads, items, Bf16());
#ifdef __FLT16_MAX__
  else if (kvdtype == 1)
    run(qdtype, q, out, static_cast<const _Float16*>(keys), static_cast<const _Float16*>(values), block_tables,
        context_lens, B, H, Hkv, Dh, BS, MB, window, scale, sinks, threads, items, F16());
#endif
  else
    run(qdtype, q, out, static_cast<const float*>(keys), static_cast<const float*>(values), block_tables,
        context_lens, B, H, Hkv, Dh, BS, MB, window, scale, sinks, threads, items, F32());
  return 0;
}

void moekit_store_rows(void* dst, const void* src, const int64_t* slots, int64_t n, int64_t row_bytes);  // kv_store.cpp

// The pipeline worker's call (moekit.pipeline.host_attention.NativeAttention): stores the B new key
// and value rows (k_new, v_new: B rows of row_bytes, contiguous) at `slots` of the pools (none when
// slots is null), then attends as moekit_decode_attention does. One call where there were three:
// each foreign call hands the GIL over and back, and the worker, back from one, waits for the
// launch thread to let go of it. `seconds` (null: not wanted) receives the time spent inside.
int moekit_store_and_attend(int qdtype, int kvdtype, const void* q, void* out, void* keys, void* values,
                            const int32_t* block_tables, const int32_t* context_lens, int64_t B, int64_t H,
                            int64_t Hkv, int64_t Dh, int64_t BS, int64_t MB, int64_t window, float scale,
                            const float* sinks, int threads, int items, const void* k_new, const void* v_new,
                            const int64_t* slots, int64_t row_bytes, double* seconds) {
  const auto t0 = std::chrono::steady_clock::now();
  if (slots != nullptr) {
    moekit_store_rows(keys, k_new, slots, B, row_bytes);
    moekit_store_rows(values, v_new, slots, B, row_bytes);
  }
  const int code = moekit_decode_attention(qdtype, kvdtype, q, out, keys, values, block_tables, context_lens, B, H,
                                           Hkv, Dh, BS, MB, window, scale, sinks, threads, items);
  if (seconds != nullptr) *seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return code;
}

}  // extern "C"
