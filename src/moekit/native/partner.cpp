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

}  // namespace

extern "C" {

// Serves one step's L layers (see above); `seconds` [L] receives each layer's kernel time (0 where
// no expert ran on the CPU), `experts` [L] how many experts the CPU computed. Scratch: h [S * I],
// xf [N * D], accs [threads * acc stride] floats as moekit_expert_ffn takes them.
int moekit_partner_step(int wdtype, int xdtype, int64_t L, int64_t N, int64_t A, int64_t E, int64_t D, int64_t I,
                        const int64_t* x_ptrs, const int64_t* w_ptrs, const int64_t* route_ptrs, const int64_t* out_ptrs,
                        const int64_t* ready_ptrs, const int64_t* done_ptrs, const int64_t* gate_up_ptrs,
                        const int64_t* down_ptrs, int64_t seq, double timeout_s, float* h, float* xf, float* accs,
                        int threads, double* seconds, int32_t* experts) {
  const int64_t S = N * A;
  const int64_t row_bytes = N * D * itemsize(xdtype);
  int code = S > MAX_SLOTS ? TOO_MANY_SLOTS : 0;
  int32_t tok_start[MAX_SLOTS + 1], tok[MAX_SLOTS], first[MAX_SLOTS];
  int64_t gu[MAX_SLOTS], dn[MAX_SLOTS], expert_of[MAX_SLOTS];
  float wts[MAX_SLOTS];
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
    const int64_t* routes = reinterpret_cast<const int64_t*>(route_ptrs[l]);
    const float* w = reinterpret_cast<const float*>(w_ptrs[l]);
    // jobs: the missed experts in order of first use, each with its tokens and weights
    int64_t J = 0;
    for (int64_t s = 0; s < S; ++s) {
      int64_t v = routes[s];
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
        int64_t v = routes[s];
        if (v >= E || v < 0 || first[s] != j) continue;
        tok[T] = static_cast<int32_t>(s / A);
        wts[T++] = w[s];
      }
      gu[j] = gate_up_ptrs[l * E + expert_of[j]];
      dn[j] = down_ptrs[l * E + expert_of[j]];
    }
    tok_start[J] = static_cast<int32_t>(T);
    if (J == 0) {
      std::memset(out, 0, row_bytes);
    } else {
      auto began = std::chrono::steady_clock::now();
      int c = moekit_expert_ffn(wdtype, xdtype, reinterpret_cast<const void*>(x_ptrs[l]), out, N, D, I, I, J, gu, dn,
                                tok_start, tok, wts, h, xf, accs, threads);
      seconds[l] = std::chrono::duration<double>(std::chrono::steady_clock::now() - began).count();
      experts[l] = static_cast<int32_t>(J);
      if (c != 0) {
        code = c;
        std::memset(out, 0, row_bytes);
      }
    }
    store_release(done, seq);
  }
  return code;
}

}  // extern "C"

extern "C" {

// Waits until *flag == seq (acquire); returns 0, or 10 after timeout_s seconds (the Python side of
// a compressed form's partner: offload.partner).
int moekit_wait_flag(const int64_t* flag, int64_t seq, double timeout_s) {
  return wait_for(flag, seq, timeout_s) ? 0 : TIMEOUT;
}

// *flag = value with release order: every write before it (the sum) is seen first.
void moekit_store_flag(int64_t* flag, int64_t value) { store_release(flag, value); }

}  // extern "C"
