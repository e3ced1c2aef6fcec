// One token's pieces of a bf16 CPU decode step (moekit.native.decode): RMSNorm, q/k norm + rope +
// KV-cache write, attention over a dense cache, softmax top-k routing, and the routed SwiGLU
// experts of one token.
//
// Why: at batch 1 each of these is a few microseconds of arithmetic that PyTorch runs as 3-10
// ops, each with its dispatch, allocation and (for the larger ones) a parallel region: 0.1-0.3 ms
// per layer piece on the 2-core test machine. Here each is one call. The expert kernel differs
// from experts.cpp's general one in how it reads `down`: each thread takes one range of hidden
// rows and reads it expert by expert (one contiguous stream of rows per expert) rather than row
// by row across all experts (A streams of one row each), which the prefetchers follow better.
// Without AVX512-BF16 the experts run moe_decode_avx2 (dot_avx2.h: four streams a thread).
//
// Shapes: D hidden, H query heads, Hkv kv heads, Dh head dim, S cache positions, E experts,
// A experts per token, I expert ffn width. All tensors bf16 unless said; sums in float32.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <omp.h>
#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "common.h"
#include "dot_avx2.h"

namespace {

constexpr int64_t MAX_D = 1 << 15;     // widest vector normed / dotted here (floats on a stack)
constexpr int64_t MAX_A = 64;          // experts per token
constexpr int64_t MAX_HEADS = 256;

inline float bf(uint16_t v) { return bf16_to_float(v); }

// w . x for bf16 rows of n elements (x bf16 too); common.h's AVX512-BF16 loop for n % 32 == 0.
inline float dot_bb(const uint16_t* w, const uint16_t* x, int64_t n) {
#if defined(__AVX512BF16__) && defined(__AVX512F__)
  if (n % 32 == 0) return dot_bf16_pairs(w, x, n);
#endif
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += bf(w[i]) * bf(x[i]);
  return acc;
}

// Normalises x [n] in float: x * rsqrt(mean(x^2) + eps), rounded to bf16 (the input dtype, as
// moekit.model.RMSNorm rounds before the weight), times the weight, rounded to bf16 again.
inline void rmsnorm_row(const uint16_t* x, const uint16_t* w, int64_t n, float eps, uint16_t* out) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < n; ++i) ss += bf(x[i]) * bf(x[i]);
  const float r = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = float_to_bf16(bf(w[i]) * bf(float_to_bf16(bf(x[i]) * r)));
}

// Rotates one head x [Dh] (bf16 values in float, already normed) by cos/sin [Dh] (rotate-half),
// each product and sum rounded to bf16 as PyTorch's bf16 ops do.
inline void rope_head(const float* x, const uint16_t* cos, const uint16_t* sin, int64_t dh, int64_t rope_dim,
                      uint16_t* out) {
  const int64_t half = rope_dim / 2;
  for (int64_t i = 0; i < dh; ++i) {
    if (i >= rope_dim) {
      out[i] = float_to_bf16(x[i]);
      continue;
    }
    const float rot = i < half ? -x[i + half] : x[i - half];
    const float a = bf(float_to_bf16(x[i] * bf(cos[i])));
    const float b = bf(float_to_bf16(rot * bf(sin[i])));
    out[i] = float_to_bf16(a + b);
  }
}

// SwiGLU of one ffn row's two dots, rounded to bf16 at each step as between PyTorch's bf16 ops.
inline float swiglu_bf16(float g, float u) {
  const float gb = bf(float_to_bf16(g)), ub = bf(float_to_bf16(u));
  const float s = bf(float_to_bf16(gb / (1.f + std::exp(-gb))));
  return bf(float_to_bf16(s * ub));
}

// moekit_moe_decode_bf16 without bf16 hardware (dot_avx2.h): the same two stages, each thread's rows
// read four streams at once. Stage 1 reads gate and up rows of two items (its range cut in two);
// stage 2 writes h_a [I] in even/odd order (float values of bf16) and each thread reads its hidden
// rows of down_a cut in four ranges. Each output row still sums over a in order, so the result does
// not depend on the thread count. h holds A * I floats here; the accumulators are on the stack.
int moe_decode_avx2(const uint16_t* x, const uint16_t* gate_up, const uint16_t* down, const int64_t* ids,
                    const float* w, int64_t A, int64_t D, int64_t I, float* h, uint16_t* out, int threads) {
  const int64_t items = A * I;
#pragma omp parallel num_threads(threads)
  {
    const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
    float xeo[MAX_D];
    to_even_odd(x, D, xeo);
    const int64_t i0 = items * t / nt, i1 = items * (t + 1) / nt, half = (i1 - i0) / 2;
    auto rows_of = [&](int64_t it, const uint16_t** p) {
      const uint16_t* gu = gate_up + ids[it / I] * 2 * I * D;
      p[0] = gu + (it % I) * D, p[1] = gu + (I + it % I) * D;
    };
    auto store = [&](int64_t it, float g, float u) { h[(it / I) * I + even_odd_slot(it % I)] = swiglu_bf16(g, u); };
    for (int64_t k = 0; k < half; ++k) {
      const uint16_t* p[4];
      rows_of(i0 + k, p), rows_of(i0 + half + k, p + 2);
      float d[4];
      dots_avx2<4>(p, xeo, D, d);
      store(i0 + k, d[0], d[1]), store(i0 + half + k, d[2], d[3]);
    }
    for (int64_t it = i0 + 2 * half; it < i1; ++it) {
      const uint16_t* p[2];
      rows_of(it, p);
      float d[2];
      dots_avx2<2>(p, xeo, D, d);
      store(it, d[0], d[1]);
    }
#pragma omp barrier
    constexpr int64_t CHUNK = 2048;  // hidden rows summed at once (their accumulators on the stack)
    float acc[CHUNK];
    const int64_t d0 = D * t / nt, d1 = D * (t + 1) / nt;
    for (int64_t c0 = d0; c0 < d1; c0 += CHUNK) {
      const int64_t rows = std::min(CHUNK, d1 - c0);
      std::fill(acc, acc + rows, 0.f);
      for (int64_t a = 0; a < A; ++a) {
        const float wa = w[a];
        rows_dots_avx2(down + ids[a] * D * I + c0 * I, rows, I, h + a * I, [&](int64_t r, float dot) { acc[r] += wa * dot; });
      }
      for (int64_t r = 0; r < rows; ++r) out[c0 + r] = float_to_bf16(acc[r]);
    }
  }
  return 0;
}

}  // namespace

extern "C" {

// Returns the index of the largest of x [n] (bf16; the first of equals; a NaN counts as largest,
// as torch.argmax has it), or -1 for n = 0.
int64_t moekit_argmax_bf16(const uint16_t* x, int64_t n) {
  int64_t best = n > 0 ? 0 : -1;
  float top = n > 0 ? bf(x[0]) : 0.f;
  for (int64_t i = 0; i < n; ++i) {
    const float v = bf(x[i]);
    if (std::isnan(v)) return i;
    if (v > top) {
      top = v;
      best = i;
    }
  }
  return best;
}

// out [n] = RMSNorm(x [n]) * w [n], bf16.
void moekit_rmsnorm_bf16(const uint16_t* x, const uint16_t* w, int64_t n, float eps, uint16_t* out) {
  rmsnorm_row(x, w, n, eps, out);
}

// x [n] += delta [n] (rounded to bf16, as a bf16 residual add), then out [n] = RMSNorm(x) * w.
void moekit_add_rmsnorm_bf16(uint16_t* x, const uint16_t* delta, const uint16_t* w, int64_t n, float eps,
                             uint16_t* out) {
  for (int64_t i = 0; i < n; ++i) x[i] = float_to_bf16(bf(x[i]) + bf(delta[i]));
  rmsnorm_row(x, w, n, eps, out);
}

// From one token's fused projection qkv [H*Dh + 2*Hkv*Dh]: q and k normed (qk_norm 0 none,
// 1 over all of q / all of k with qw [H*Dh], kw [Hkv*Dh], 2 per head with qw, kw [Dh]), q scaled
// by q_scale, rope on the first rope_dim dims of each head with cos, sin [Dh]; q goes to q_out
// [H, Dh], k and v to position `pos` of the dense cache rows k_cache, v_cache [Hkv, S, Dh].
// Returns 0, or 1 for a row wider than MAX_D.
int moekit_qkv_rope_bf16(const uint16_t* qkv, int64_t H, int64_t Hkv, int64_t Dh, int qk_norm, const uint16_t* qw,
                         const uint16_t* kw, float eps, float q_scale, const uint16_t* cos, const uint16_t* sin,
                         int64_t rope_dim, uint16_t* q_out, uint16_t* k_cache, uint16_t* v_cache, int64_t S,
                         int64_t pos) {
  const int64_t qd = H * Dh, kd = Hkv * Dh;
  if (qd > MAX_D || kd > MAX_D) return 1;
  uint16_t q[MAX_D], k[MAX_D];
  if (qk_norm == 1) {
    rmsnorm_row(qkv, qw, qd, eps, q);
    rmsnorm_row(qkv + qd, kw, kd, eps, k);
  } else if (qk_norm == 2) {
    for (int64_t h = 0; h < H; ++h) rmsnorm_row(qkv + h * Dh, qw, Dh, eps, q + h * Dh);
    for (int64_t h = 0; h < Hkv; ++h) rmsnorm_row(qkv + qd + h * Dh, kw, Dh, eps, k + h * Dh);
  } else {
    std::memcpy(q, qkv, qd * 2);
    std::memcpy(k, qkv + qd, kd * 2);
  }
  float row[MAX_D];
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t i = 0; i < Dh; ++i)
      row[i] = q_scale == 1.f ? bf(q[h * Dh + i]) : bf(float_to_bf16(bf(q[h * Dh + i]) * q_scale));
    rope_head(row, cos, sin, Dh, rope_dim, q_out + h * Dh);
  }
  for (int64_t h = 0; h < Hkv; ++h) {
    for (int64_t i = 0; i < Dh; ++i) row[i] = bf(k[h * Dh + i]);
    rope_head(row, cos, sin, Dh, rope_dim, k_cache + (h * S + pos) * Dh);
    std::memcpy(v_cache + (h * S + pos) * Dh, qkv + qd + kd + h * Dh, Dh * 2);
  }
  return 0;
}

// out [H, Dh] = softmax(scale * q [H, Dh] . K^T) V over positions 0..n-1 of the dense cache
// k_cache, v_cache [Hkv, S, Dh] (query head h reads kv head h / (H / Hkv)). Heads spread over
// threads; each head is one thread's, so the result does not depend on the thread count.
// Returns 0, or 1 for more than MAX_HEADS heads or Dh > MAX_D.
int moekit_dense_decode_attention_bf16(const uint16_t* q, const uint16_t* k_cache, const uint16_t* v_cache,
                                       int64_t H, int64_t Hkv, int64_t Dh, int64_t S, int64_t n, float scale,
                                       uint16_t* out, float* scores, int threads) {
  if (H > MAX_HEADS || Dh > MAX_D) return 1;
  const int64_t G = H / Hkv;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && n * H > 4096)
  for (int64_t h = 0; h < H; ++h) {
    const uint16_t* qh = q + h * Dh;
    const uint16_t* kh = k_cache + (h / G) * S * Dh;
    const uint16_t* vh = v_cache + (h / G) * S * Dh;
    float* s = scores + h * n;
    float mx = -INFINITY;
    for (int64_t t = 0; t < n; ++t) {
      s[t] = dot_bb(kh + t * Dh, qh, Dh) * scale;
      mx = std::max(mx, s[t]);
    }
    float sum = 0.f;
    for (int64_t t = 0; t < n; ++t) {
      s[t] = std::exp(s[t] - mx);
      sum += s[t];
    }
    float acc[MAX_D];
    std::fill(acc, acc + Dh, 0.f);
    for (int64_t t = 0; t < n; ++t) {
      const float p = s[t];
      const uint16_t* vt = vh + t * Dh;
#pragma omp simd
      for (int64_t i = 0; i < Dh; ++i) acc[i] += p * bf(vt[i]);
    }
    const float inv = 1.f / sum;
    for (int64_t i = 0; i < Dh; ++i) out[h * Dh + i] = float_to_bf16(acc[i] * inv);
  }
  return 0;
}

// Softmax top-k routing of one token's router logits [E] (bf16): ids [A] of the k largest
// probabilities (ties to the lower id) and their weights (float32 holding bf16 values),
// renormalised to sum 1 when `norm`. Returns 0, or 1 for k > MAX_A or k > E.
int moekit_route_softmax_bf16(const uint16_t* logits, int64_t E, int64_t k, int norm, int64_t* ids, float* weights) {
  if (k > MAX_A || k > E) return 1;
  float mx = -INFINITY;
  for (int64_t e = 0; e < E; ++e) mx = std::max(mx, bf(logits[e]));
  float sum = 0.f;
  for (int64_t e = 0; e < E; ++e) sum += std::exp(bf(logits[e]) - mx);
  bool taken[1 << 12] = {};
  float picked = 0.f;
  for (int64_t a = 0; a < k; ++a) {
    int64_t best = -1;
    for (int64_t e = 0; e < E; ++e)
      if (!(e < (1 << 12) && taken[e]) && (best < 0 || bf(logits[e]) > bf(logits[best]))) best = e;
    if (best < (1 << 12)) taken[best] = true;
    ids[a] = best;
    weights[a] = std::exp(bf(logits[best]) - mx) / sum;
    picked += weights[a];
  }
  // then rounded to bf16, as moekit.model.MoEBlock.route hands the experts x's dtype
  for (int64_t a = 0; a < k; ++a) weights[a] = bf(float_to_bf16(norm ? weights[a] / picked : weights[a]));
  return 0;
}

// Returns 1 when one-token bf16 dots of rows a multiple of 32 long take dot_avx2.h's streams (AVX2
// built in, no AVX512-BF16, not switched off with MOEKIT_AVX2_DOT=0), else 0: tests check which ran.
int moekit_dot_avx2_active() { return usable_avx2(32) ? 1 : 0; }

// out [D] = sum over a of w[a] * down_a @ (silu(gate_a @ x) * (up_a @ x)) for one token x [D],
// experts a = ids[a] of the stacked gate_up [E, 2I, D] (gate rows, then up) and down [E, D, I].
// h [A, I] floats and hb [A, I] are scratch. Deterministic: each output row sums over a in order.
// Returns 0, or 1 for A > MAX_A.
int moekit_moe_decode_bf16(const uint16_t* x, const uint16_t* gate_up, const uint16_t* down, const int64_t* ids,
                           const float* w, int64_t A, int64_t D, int64_t I, float* h, uint16_t* hb, uint16_t* out,
                           int threads) {
  if (A > MAX_A) return 1;
  if (D <= MAX_D && usable_avx2(D) && usable_avx2(I)) return moe_decode_avx2(x, gate_up, down, ids, w, A, D, I, h, out, threads);
  const int64_t items = A * I;
#pragma omp parallel num_threads(threads)
  {
    const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
    // stage 1: one contiguous range of (expert, ffn row) per thread
    const int64_t i0 = items * t / nt, i1 = items * (t + 1) / nt;
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t a = it / I, r = it % I;
      const uint16_t* gu = gate_up + ids[a] * 2 * I * D;
      const float g = dot_bb(gu + r * D, x, D), u = dot_bb(gu + (I + r) * D, x, D);
      // rounded to bf16 as the activations between PyTorch's bf16 ops are
      const float gb = bf(float_to_bf16(g)), ub = bf(float_to_bf16(u));
      const float s = bf(float_to_bf16(gb / (1.f + std::exp(-gb))));
      hb[a * I + r] = float_to_bf16(s * ub);
    }
#pragma omp barrier
    // stage 2: one contiguous range of hidden rows per thread, read expert by expert
    const int64_t d0 = D * t / nt, d1 = D * (t + 1) / nt;
    float* acc = h + d0;  // h holds D floats of accumulators here (the caller sizes it max(A*I, D))
    std::fill(acc, acc + (d1 - d0), 0.f);
    for (int64_t a = 0; a < A; ++a) {
      const uint16_t* dn = down + ids[a] * D * I;
      const float wa = w[a];
      for (int64_t d = d0; d < d1; ++d) acc[d - d0] += wa * dot_bb(dn + d * I, hb + a * I, I);
    }
    for (int64_t d = d0; d < d1; ++d) out[d] = float_to_bf16(acc[d - d0]);
  }
  return 0;
}


// ---- the whole step in one call --------------------------------------------------------------

int moekit_matvec_bf16(const uint16_t* x, const uint16_t* w, const float* bias, uint16_t* out, int64_t M,
                                  int64_t N, int64_t K, float* xf, int threads);
int moekit_compressed_moe_decode(const void* plan, const uint16_t* x, const int64_t* ids, const float* w,
                                 int64_t A, uint16_t* out, int threads);
int moekit_matvec_q8(const void* matrix, const uint16_t* x, const float* bias, uint16_t* out, float* xf, int threads);

// A dense projection of one token: int8 or int4 weights (dense_q8.cpp) where the plan has them, else bf16.
static int project(const void* q8, const uint16_t* x, const uint16_t* w, const float* bias, uint16_t* out, int64_t N,
                   int64_t K, float* xf, int threads) {
  return q8 != nullptr ? moekit_matvec_q8(q8, x, bias, out, xf, threads)
                       : moekit_matvec_bf16(x, w, bias, out, 1, N, K, xf, threads);
}

// One layer's weights and buffers (decode.py's _LayerPlan mirrors it field for field).
struct LayerPlan {
  const uint16_t* in_norm;   // [D]
  const uint16_t* post_norm; // [D]
  const uint16_t* wqkv;      // [H*Dh + 2*Hkv*Dh, D]
  const float* bqkv;         // its bias or null
  const uint16_t* q_norm;    // q/k norm weights (per qk_norm) or null
  const uint16_t* k_norm;
  float q_scale;
  uint16_t* k_cache;         // [Hkv, S, Dh]
  uint16_t* v_cache;
  const uint16_t* wo;        // [D, H*Dh]
  const float* bo;
  const uint16_t* wr;        // router [E, D]
  const float* br;
  int64_t experts, top_k, ffn;
  const uint16_t* gate_up;   // [E, 2I, D]
  const uint16_t* down;      // [E, D, I]
  uint16_t* router;          // [E] logits
  int64_t* ids;              // [A]
  float* weights;            // [A]
  float* acc;                // max(A*I, D)
  uint16_t* act;             // [A, I]
  const void* compressed;    // null (bf16 experts: gate_up, down) or compressed.cpp's DecodeExperts
  const void* wqkv_q8;       // null, or wqkv as dense_q8.cpp's Q8Matrix ($MOEKIT_CPU_DENSE=int8 / int4)
  const void* wo_q8;         // null, or wo so
};

// The model's shapes, its non-layer weights and the step's buffers (decode.py's _StepPlan).
struct StepPlan {
  int64_t layers, D, H, Hkv, Dh, S, rope_dim, V;
  int32_t qk_norm, norm_topk, threads;
  float eps, attn_scale;
  const uint16_t* embed;      // [vocab, D]
  const uint16_t* final_norm; // [D]
  const uint16_t* lm_head;    // [V, D]
  const float* lm_bias;
  const uint16_t* cos;        // [S, rope_dim]
  const uint16_t* sin;
  uint16_t *x, *normed, *delta, *qkv, *q, *attn, *logits;
  float* scores;              // [H, S]
  float* xf;                  // matvec scratch
  const LayerPlan* layer;     // [layers]
  const void* lm_head_q8;     // null, or lm_head as dense_q8.cpp's Q8Matrix
};

// The logits (plan->logits [V]) of `token` at `position`, its keys and values written to each
// layer's cache: the same calls, in the same order, as decode.py's CpuDecodeStep.pieces.
// Returns 0, or the first nonzero code of a piece.
int moekit_decode_step_bf16(const StepPlan* p, int64_t token, int64_t position) {
  const int64_t D = p->D;
  std::memcpy(p->x, p->embed + token * D, D * 2);
  const uint16_t* cos = p->cos + position * p->rope_dim;
  const uint16_t* sin = p->sin + position * p->rope_dim;
  const int64_t qkv_rows = (p->H + 2 * p->Hkv) * p->Dh;
  int rc = 0;
  for (int64_t i = 0; i < p->layers && rc == 0; ++i) {
    const LayerPlan& l = p->layer[i];
    if (i == 0) moekit_rmsnorm_bf16(p->x, l.in_norm, D, p->eps, p->normed);
    else moekit_add_rmsnorm_bf16(p->x, p->delta, l.in_norm, D, p->eps, p->normed);
    rc |= project(l.wqkv_q8, p->normed, l.wqkv, l.bqkv, p->qkv, qkv_rows, D, p->xf, p->threads);
    rc |= moekit_qkv_rope_bf16(p->qkv, p->H, p->Hkv, p->Dh, p->qk_norm, l.q_norm, l.k_norm, p->eps, l.q_scale, cos, sin,
                               p->rope_dim, p->q, l.k_cache, l.v_cache, p->S, position);
    rc |= moekit_dense_decode_attention_bf16(p->q, l.k_cache, l.v_cache, p->H, p->Hkv, p->Dh, p->S, position + 1,
                                             p->attn_scale, p->attn, p->scores, p->threads);
    rc |= project(l.wo_q8, p->attn, l.wo, l.bo, p->delta, D, p->H * p->Dh, p->xf, p->threads);
    moekit_add_rmsnorm_bf16(p->x, p->delta, l.post_norm, D, p->eps, p->normed);
    rc |= moekit_matvec_bf16(p->normed, l.wr, l.br, l.router, 1, l.experts, D, p->xf, p->threads);
    rc |= moekit_route_softmax_bf16(l.router, l.experts, l.top_k, p->norm_topk, l.ids, l.weights);
    if (l.compressed != nullptr)  // int-N or ternary code experts (compressed.cpp), decoded in the matvec
      rc |= moekit_compressed_moe_decode(l.compressed, p->normed, l.ids, l.weights, l.top_k, p->delta, p->threads);
    else
      rc |= moekit_moe_decode_bf16(p->normed, l.gate_up, l.down, l.ids, l.weights, l.top_k, D, l.ffn, l.acc, l.act,
                                   p->delta, p->threads);
  }
  if (rc != 0) return rc;
  moekit_add_rmsnorm_bf16(p->x, p->delta, p->final_norm, D, p->eps, p->normed);
  return project(p->lm_head_q8, p->normed, p->lm_head, p->lm_bias, p->logits, p->V, D, p->xf, p->threads);
}

}  // extern "C"
