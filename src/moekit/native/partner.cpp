// The CPU side of a decode step captured whole with its misses computed on the CPU
// (offload.partner): for each MoE layer in turn, wait until the device has posted the layer's
// input and routing to page-locked host memory (ready[l] == seq), compute the routed experts the
// device cache does not hold (moekit_expert_ffn, one parallel region), write their sum to the
// layer's output row and release it (done[l] = seq), which the device waits for before it adds it.
//
// Layout (per layer l, all page-locked, written by the device through unified addressing):
//   x      [N, D] activations (xdtype)           routes [S] e + E * cached (int64), S = N * A
//   w      [S] routing weights (float32)          out    [N, D] the CPU's sum (xdtype), written here
//   ready  int64, the step's seq once x, w, routes landed (the device writes it last)
//   done   int64, seq once out holds the sum (written here last, release order)
// Expert e of layer l: gate_up at gate_up_ptrs[l * E + e], down at down_ptrs[l * E + e].
//
// Experts in a compressed form (int-N, the ternary code): moekit_partner_step_compressed, the same
// loop with the jobs run through moekit_int_ffn / moekit_code_ffn from each expert's stored tensors
// in the host store (a CompressedPartner plan says where they are).
//
// A timeout (the device never posted) or a refused call fails the step: every layer not yet
// served gets a zero sum and its done flag, so that the device never waits forever, and the code
// is returned (the caller raises). Codes: 0, 1-4 moekit_expert_ffn's, 10 timeout, 11 S > MAX_SLOTS.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <thread>

#include "common.h"
#include "compressed_layer.h"  // moekit_int_ffn, moekit_code_ffn

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define MOEKIT_PARTNER_PAUSE() _mm_pause()
#else
#define MOEKIT_PARTNER_PAUSE() std::this_thread::yield()
#endif

extern "C" int moekit_expert_ffn(int wdtype, int xdtype, const void* x, void* out, int64_t N, int64_t D, int64_t I,
                                 int64_t LD, int64_t J, const int64_t* gate_up, const int64_t* down,
                                 const int32_t* tok_start, const int32_t* tok, const float* w, float* h, float* xf,
                                 float* accs, int threads);

namespace {

constexpr int64_t MAX_SLOTS = 1024;  // routed slots of one layer call (N * A)
constexpr int TIMEOUT = 10;
constexpr int TOO_MANY_SLOTS = 11;

int64_t load_acquire(const int64_t* p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
void store_release(int64_t* p, int64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }

// Waits until *flag == seq; false after timeout_s seconds.
bool wait_for(const int64_t* flag, int64_t seq, double timeout_s) {
  auto until = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  for (int i = 0; load_acquire(flag) != seq; ++i) {
    if ((i & 1023) == 1023 && std::chrono::steady_clock::now() > until) return false;
    MOEKIT_PARTNER_PAUSE();
  }
  return true;
}

// The missed experts of one layer call, in order of first use, each with its tokens and weights.
struct Jobs {
  int64_t J = 0;
  int32_t tok_start[MAX_SLOTS + 1], tok[MAX_SLOTS];
  int64_t expert_of[MAX_SLOTS];
  float wts[MAX_SLOTS];

  // routes [S]: e + E * cached (e < E: missed, the CPU's), w [S] the routing weights, A per token.
  void build(const int64_t* routes, const float* w, int64_t S, int64_t A, int64_t E) {
    int32_t first[MAX_SLOTS];
    J = 0;
    for (int64_t s = 0; s < S; ++s) {
      const int64_t v = routes[s];
      if (v >= E || v < 0) continue;  // cached: the device computes it
      int64_t j = 0;
      while (j < J && expert_of[j] != v) ++j;
      if (j == J) expert_of[J++] = v;
      first[s] = static_cast<int32_t>(j);
    }
    int64_t T = 0;
    for (int64_t j = 0; j < J; ++j) {
      tok_start[j] = static_cast<int32_t>(T);
      for (int64_t s = 0; s < S; ++s) {
        const int64_t v = routes[s];
        if (v >= E || v < 0 || first[s] != j) continue;
        tok[T] = static_cast<int32_t>(s / A);
        wts[T++] = w[s];
      }
    }
    tok_start[J] = static_cast<int32_t>(T);
  }
};

// The per-layer loop both entries share: wait for layer l's post, build its jobs, run
// compute(l, jobs, x, out) (returns a code; writes out whole) when there are any, release the layer.
template <class Compute>
int serve(int64_t L, int64_t N, int64_t A, int64_t E, int64_t row_bytes, const int64_t* x_ptrs,
          const int64_t* w_ptrs, const int64_t* route_ptrs, const int64_t* out_ptrs, const int64_t* ready_ptrs,
          const int64_t* done_ptrs, int64_t seq, double timeout_s, double* seconds, int32_t* experts,
          Compute compute) {
  const int64_t S = N * A;
  int code = S > MAX_SLOTS ? TOO_MANY_SLOTS : 0;
  static thread_local Jobs jobs;  // ~20 KB: off the stack of whichever thread serves
  for (int64_t l = 0; l < L; ++l) {
    seconds[l] = 0.0;
    experts[l] = 0;
    void* out = reinterpret_cast<void*>(out_ptrs[l]);
    int64_t* done = reinterpret_cast<int64_t*>(done_ptrs[l]);
    if (code == 0 && !wait_for(reinterpret_cast<const int64_t*>(ready_ptrs[l]), seq, timeout_s)) code = TIMEOUT;
    if (code != 0) {  // release the device: a zero sum
      std::memset(out, 0, row_bytes);
      store_release(done, seq);
      continue;
    }
    jobs.build(reinterpret_cast<const int64_t*>(route_ptrs[l]), reinterpret_cast<const float*>(w_ptrs[l]), S, A, E);
    if (jobs.J == 0) {
      std::memset(out, 0, row_bytes);
    } else {
      auto began = std::chrono::steady_clock::now();
      const int c = compute(l, jobs, reinterpret_cast<const void*>(x_ptrs[l]), out);
      seconds[l] = std::chrono::duration<double>(std::chrono::steady_clock::now() - began).count();
      experts[l] = static_cast<int32_t>(jobs.J);
      if (c != 0) {
        code = c;
        std::memset(out, 0, row_bytes);
      }
    }
    store_release(done, seq);
  }
  return code;
}

// A compressed form's stored experts and the buffers of one step (native.compressed's _PartnerPlan
// mirrors it field for field; its PartnerExperts builds it).
struct CompressedPartner {
  int32_t form;        // 1 int-N (moekit_int_ffn), 2 ternary code (moekit_code_ffn)
  int32_t bits;        // int-N: 2, 3, 4, 8
  int32_t permuted;    // int-N: IntRows' permuted layout (x permuted here, h zeroed each call)
  int32_t int8_dot;    // int-N: moekit_int_ffn's int8_dot
  int64_t groups[2];   // int-N: P of gate_up, of down
  int64_t tensors;     // stored tensors an expert: 6 (int-N) or 12 (code), the kernels' ptrs order
  const int64_t* expert_ptrs;  // [L * E * tensors]: expert e of layer l at (l * E + e) * tensors
  const int64_t* sizes;        // code: [L * 7] each layer's job sizes (moekit_code_ffn's sizes of one job),
                               // then its codeword bytes (1 or 2: each layer picks its dictionary)
  const int64_t* tables;       // code: [L] addresses of each layer's int32 [2^bits, 2] table (host memory)
  const int64_t* masks;        // code: [L] its code_masks
  const int64_t* lengths;      // code: [L]
  float* xf;                   // N * x_width floats (+ CODE_PAD for the code)
  int64_t x_width;             // int-N permuted: words(D) * (32 / bits); else D
  float* h;                    // S * h_width floats (+ CODE_PAD for the code)
  int64_t h_width;             // int-N permuted: words(I) * (32 / bits); else I
  float* outf;                 // N * D
  float* accs;                 // threads * acc_stride(N)
  int64_t* ptrs;               // S * tensors
  int64_t* job_sizes;          // S * 6
};

}  // namespace

extern "C" {

// Serves one step's L layers (see above); `seconds` [L] receives each layer's kernel time (0 where
// no expert ran on the CPU), `experts` [L] how many experts the CPU computed. The CPU computes ffn
// rows [0, R) of each missed expert (R = I: whole experts; R < I: the device reads rows [R, I) in
// place, offload.partner's row split; its partial output and this one add). Scratch: h [S * R],
// xf [N * D], accs [threads * acc stride] floats as moekit_expert_ffn takes them.
int moekit_partner_step(int wdtype, int xdtype, int64_t L, int64_t N, int64_t A, int64_t E, int64_t D, int64_t I,
                        int64_t R, const int64_t* x_ptrs, const int64_t* w_ptrs, const int64_t* route_ptrs, const int64_t* out_ptrs,
                        const int64_t* ready_ptrs, const int64_t* done_ptrs, const int64_t* gate_up_ptrs,
                        const int64_t* down_ptrs, int64_t seq, double timeout_s, float* h, float* xf, float* accs,
                        int threads, double* seconds, int32_t* experts) {
  int64_t gu[MAX_SLOTS], dn[MAX_SLOTS];
  return serve(L, N, A, E, N * D * itemsize(xdtype), x_ptrs, w_ptrs, route_ptrs, out_ptrs, ready_ptrs, done_ptrs, seq,
               timeout_s, seconds, experts, [&](int64_t l, const Jobs& jobs, const void* x, void* out) {
                 if (R <= 0 || R > I) return 4;  // moekit_expert_ffn's code for rows it cannot take (released)
                 for (int64_t j = 0; j < jobs.J; ++j) {
                   gu[j] = gate_up_ptrs[l * E + jobs.expert_of[j]];
                   dn[j] = down_ptrs[l * E + jobs.expert_of[j]];
                 }
                 return moekit_expert_ffn(wdtype, xdtype, x, out, N, D, R, I, jobs.J, gu, dn, jobs.tok_start, jobs.tok,
                                          jobs.wts, h, xf, accs, threads);
               });
}

// moekit_partner_step for experts in a compressed form (plan: a CompressedPartner): each layer's
// missed experts run through moekit_int_ffn / moekit_code_ffn with the x, h and jobs that
// native.compressed's int_ffn / code_ffn make for the same tokens and routes (the same bits), x
// read from the mailbox in its dtype and the float sum written back in it. Codes as above, and 1
// for an unknown form.
int moekit_partner_step_compressed(const void* plan, int xdtype, int64_t L, int64_t N, int64_t A, int64_t E, int64_t D,
                                   int64_t I, const int64_t* x_ptrs, const int64_t* w_ptrs, const int64_t* route_ptrs,
                                   const int64_t* out_ptrs, const int64_t* ready_ptrs, const int64_t* done_ptrs,
                                   int64_t seq, double timeout_s, int threads, double* seconds, int32_t* experts) {
  const CompressedPartner* c = static_cast<const CompressedPartner*>(plan);
  const int64_t T = c->tensors, xsize = itemsize(xdtype);
  return serve(L, N, A, E, N * D * xsize, x_ptrs, w_ptrs, route_ptrs, out_ptrs, ready_ptrs, done_ptrs, seq,
               timeout_s, seconds, experts, [&](int64_t l, const Jobs& jobs, const void* x, void* out) {
                 for (int64_t j = 0; j < jobs.J; ++j) {
                   const int64_t* from = c->expert_ptrs + (l * E + jobs.expert_of[j]) * T;
                   std::memcpy(c->ptrs + j * T, from, sizeof(int64_t) * T);
                   if (c->form == 2) std::memcpy(c->job_sizes + j * 6, c->sizes + l * 7, sizeof(int64_t) * 6);
                 }
                 const char* xb = static_cast<const char*>(x);
                 const int64_t slots = jobs.tok_start[jobs.J];
                 int rc;
                 if (c->form == 1) {
                   if (c->permuted) {  // column q * k + i at i * words + q, zeros past D (int_ffn's _permuted)
                     const int64_t k = 32 / c->bits, words = c->x_width / k;
                     for (int64_t n = 0; n < N; ++n) {
                       float* row = c->outf + n * D;  // the row in float first (outf is written whole below)
                       to_float(xdtype, xb + n * D * xsize, D, row);
                       float* dst = c->xf + n * c->x_width;
                       for (int64_t i = 0; i < k; ++i)
                         for (int64_t q = 0; q < words; ++q) {
                           const int64_t col = q * k + i;
                           dst[i * words + q] = col < D ? row[col] : 0.f;
                         }
                     }
                     std::memset(c->h, 0, sizeof(float) * slots * c->h_width);  // the last word's padding lanes
                   } else {
                     for (int64_t n = 0; n < N; ++n) to_float(xdtype, xb + n * D * xsize, D, c->xf + n * D);
                   }
                   rc = moekit_int_ffn(c->bits, c->xf, c->outf, N, D, I, jobs.J, c->ptrs, c->groups[0], c->groups[1],
                                       c->permuted, jobs.tok_start, jobs.tok, jobs.wts, c->h, c->accs, threads,
                                       c->int8_dot);
                 } else if (c->form == 2) {
                   for (int64_t n = 0; n < N; ++n) to_float(xdtype, xb + n * D * xsize, D, c->xf + n * D);
                   rc = moekit_code_ffn(c->xf, c->outf, N, D, I, jobs.J, c->ptrs,
                                        reinterpret_cast<const int32_t*>(c->tables[l]),
                                        reinterpret_cast<const uint16_t*>(c->masks[l]),
                                        reinterpret_cast<const uint8_t*>(c->lengths[l]),
                                        static_cast<int>(c->sizes[l * 7 + 6]), c->job_sizes,
                                        jobs.tok_start, jobs.tok, jobs.wts, c->h, c->accs, threads);
                 } else {
                   return 1;
                 }
                 if (rc != 0) return rc;
                 for (int64_t i = 0; i < N * D; ++i) from_float(xdtype, c->outf[i], out, i);
                 return 0;
               });
}

}  // extern "C"
