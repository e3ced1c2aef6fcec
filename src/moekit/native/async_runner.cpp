// One background thread per process that runs one layer's CPU expert call while the caller goes
// on (moekit.native.experts: start=True; offload.cpu overlaps it with the device part's launches).
//
// moekit_async_expert_ffn / moekit_async_int_ffn / moekit_async_code_ffn (and moekit_async_partner_step /
// _compressed, a whole captured step's CPU side: partner.cpp) take the arguments of
// their synchronous forms, post the call to the runner and return 0 at once (ASYNC_BUSY where a
// posted call has not been waited for); moekit_async_wait blocks until that call is done and
// returns its code (ASYNC_IDLE where nothing was posted). The caller keeps every buffer the call
// reads alive until the wait returns. Both calls come through ctypes, which releases the GIL, so
// the Python thread runs on between them.
//
// Why spin: calls come every 1-2 ms during decode, and a condition variable's wake-up costs tens
// of microseconds (a futex and a scheduler round trip). So the runner spins (_mm_pause on a relaxed
// load) for up to RUNNER_SPIN_US after its last call before it sleeps, and the waiter spins up to
// WAITER_SPIN_US before it sleeps. The compressed forms' parallel regions run on the runner's own
// spinning team, the dense experts' on an OpenMP team (team.h says why, and MOEKIT_RUNNER_TEAM=own /
// omp, read when a call is posted, puts every call on one or the other), of the `threads` passed.

#include <unistd.h>

#include <cstdlib>
#include <cstring>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>

#include "team.h"
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define MOEKIT_PAUSE() _mm_pause()
#else
#define MOEKIT_PAUSE() std::this_thread::yield()
#endif

extern "C" {

// Regions run on the runner's team so far (team.h; the tests check which calls took it).
int64_t moekit_team_regions() { return moekit_team::Team::regions().load(); }
int moekit_expert_ffn(int wdtype, int xdtype, const void* x, void* out, int64_t N, int64_t D, int64_t I,
                      int64_t LD, int64_t J, const int64_t* gate_up, const int64_t* down, const int32_t* tok_start,
                      const int32_t* tok, const float* w, float* h, float* xf, float* accs, int threads);
int moekit_int_ffn(int bits, const float* x, float* out, int64_t N, int64_t D, int64_t I, int64_t J,
                   const int64_t* ptrs, int64_t groups_gate_up, int64_t groups_down, int permuted,
                   const int32_t* tok_start, const int32_t* tok, const float* w, float* h, float* accs, int threads,
                   int int8_dot);
int moekit_code_ffn(const float* x, float* out, int64_t N, int64_t D, int64_t I, int64_t J, const int64_t* ptrs,
                    const int32_t* table, const uint16_t* masks, const uint8_t* lengths, int word_bytes,
                    const int64_t* sizes, const int32_t* tok_start, const int32_t* tok, const float* w, float* h,
                    float* accs, int threads);
int moekit_partner_step(int wdtype, int xdtype, int64_t L, int64_t N, int64_t A, int64_t E, int64_t D, int64_t I,
                        int64_t R, const int64_t* x_ptrs, const int64_t* w_ptrs, const int64_t* route_ptrs, const int64_t* out_ptrs,
                        const int64_t* ready_ptrs, const int64_t* done_ptrs, const int64_t* gate_up_ptrs,
                        const int64_t* down_ptrs, int64_t seq, double timeout_s, float* h, float* xf, float* accs,
                        int threads, double* seconds, int32_t* experts);
int moekit_partner_step_compressed(const void* plan, int xdtype, int64_t L, int64_t N, int64_t A, int64_t E, int64_t D,
                                   int64_t I, const int64_t* x_ptrs, const int64_t* w_ptrs, const int64_t* route_ptrs,
                                   const int64_t* out_ptrs, const int64_t* ready_ptrs, const int64_t* done_ptrs,
                                   int64_t seq, double timeout_s, int threads, double* seconds, int32_t* experts);
}

namespace {

constexpr int ASYNC_BUSY = -100;  // a posted call has not been waited for
constexpr int ASYNC_IDLE = -101;  // a wait with no call posted
constexpr int64_t RUNNER_SPIN_US = 2000;
constexpr int64_t WAITER_SPIN_US = 1000;

enum State : int { IDLE = 0, QUEUED = 1, DONE = 2 };

struct Runner {
  std::atomic<int> state{IDLE};
  std::function<int()> job;  // written by the poster before QUEUED, read by the runner after
  int team_mode = 0;         // likewise: 0 compressed forms on `team`, 1 every call, 2 none (OpenMP)
  moekit_team::Team& team = *new moekit_team::Team();  // never freed, like the runner (team.h)
  int result = 0;            // written by the runner before DONE
  double seconds = 0.0;      // the call's own wall time (steady clock), written before DONE
  std::mutex m;
  std::condition_variable queued, done;

  void loop() {
    for (;;) {
      auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(RUNNER_SPIN_US);
      for (int i = 0; state.load(std::memory_order_acquire) != QUEUED; ++i) {
        if ((i & 255) == 255 && std::chrono::steady_clock::now() > until) {
          std::unique_lock<std::mutex> lk(m);
          queued.wait(lk, [&] { return state.load(std::memory_order_acquire) == QUEUED; });
          break;
        }
        MOEKIT_PAUSE();
      }
      auto began = std::chrono::steady_clock::now();
      moekit_team::calling_team = team_mode == 2 ? nullptr : &team;
      moekit_team::dense_on_team = team_mode == 1;
      result = job();
      moekit_team::calling_team = nullptr;
      moekit_team::dense_on_team = false;
      seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - began).count();
      job = nullptr;
      {
        std::lock_guard<std::mutex> lk(m);  // a waiter between its check and its sleep sees DONE
        state.store(DONE, std::memory_order_release);
      }
      done.notify_one();
    }
  }
};

std::mutex start_mutex;  // serialises posts (and the runner's start)
Runner* runner = nullptr;
pid_t runner_pid = 0;

// Posts `job`; returns 0, or ASYNC_BUSY.
int post(std::function<int()> job) {
  std::lock_guard<std::mutex> guard(start_mutex);
  if (runner == nullptr || runner_pid != getpid()) {  // first use, or a forked child (its thread is gone)
    runner = new Runner();                            // never freed: the detached thread reads it to exit
    runner_pid = getpid();
    std::thread([r = runner] { r->loop(); }).detach();
  }
  if (runner->state.load(std::memory_order_acquire) != IDLE) return ASYNC_BUSY;
  runner->job = std::move(job);
  const char* setting = std::getenv("MOEKIT_RUNNER_TEAM");
  runner->team_mode = setting == nullptr ? 0 : std::strcmp(setting, "own") == 0 ? 1 : std::strcmp(setting, "omp") == 0 ? 2 : 0;
  {
    std::lock_guard<std::mutex> lk(runner->m);  // a runner between its check and its sleep sees QUEUED
    runner->state.store(QUEUED, std::memory_order_release);
  }
  runner->queued.notify_one();
  return 0;
}

}  // namespace

extern "C" {

// The synchronous calls' arguments; each returns 0 once posted, or ASYNC_BUSY (-100).
int moekit_async_expert_ffn(int wdtype, int xdtype, const void* x, void* out, int64_t N, int64_t D, int64_t I,
                            int64_t LD, int64_t J, const int64_t* gate_up, const int64_t* down, const int32_t* tok_start,
                            const int32_t* tok, const float* w, float* h, float* xf, float* accs, int threads) {
  return post([=] {
    return moekit_expert_ffn(wdtype, xdtype, x, out, N, D, I, LD, J, gate_up, down, tok_start, tok, w, h, xf, accs,
                             threads);
  });
}

int moekit_async_int_ffn(int bits, const float* x, float* out, int64_t N, int64_t D, int64_t I, int64_t J,
                         const int64_t* ptrs, int64_t groups_gate_up, int64_t groups_down, int permuted,
                         const int32_t* tok_start, const int32_t* tok, const float* w, float* h, float* accs,
                         int threads, int int8_dot) {
  return post([=] {
    return moekit_int_ffn(bits, x, out, N, D, I, J, ptrs, groups_gate_up, groups_down, permuted, tok_start, tok, w,
                          h, accs, threads, int8_dot);
  });
}

int moekit_async_code_ffn(const float* x, float* out, int64_t N, int64_t D, int64_t I, int64_t J,
                          const int64_t* ptrs, const int32_t* table, const uint16_t* masks, const uint8_t* lengths,
                          int word_bytes, const int64_t* sizes, const int32_t* tok_start, const int32_t* tok,
                          const float* w, float* h, float* accs, int threads) {
  return post([=] {
    return moekit_code_ffn(x, out, N, D, I, J, ptrs, table, masks, lengths, word_bytes, sizes, tok_start, tok, w, h,
                           accs, threads);
  });
}

int moekit_async_partner_step(int wdtype, int xdtype, int64_t L, int64_t N, int64_t A, int64_t E, int64_t D,
                              int64_t I, int64_t R, const int64_t* x_ptrs, const int64_t* w_ptrs, const int64_t* route_ptrs,
                              const int64_t* out_ptrs, const int64_t* ready_ptrs, const int64_t* done_ptrs,
                              const int64_t* gate_up_ptrs, const int64_t* down_ptrs, int64_t seq, double timeout_s,
                              float* h, float* xf, float* accs, int threads, double* seconds, int32_t* experts) {
  return post([=] {
    return moekit_partner_step(wdtype, xdtype, L, N, A, E, D, I, R, x_ptrs, w_ptrs, route_ptrs, out_ptrs, ready_ptrs,
                               done_ptrs, gate_up_ptrs, down_ptrs, seq, timeout_s, h, xf, accs, threads, seconds,
                               experts);
  });
}

int moekit_async_partner_step_compressed(const void* plan, int xdtype, int64_t L, int64_t N, int64_t A, int64_t E,
                                         int64_t D, int64_t I, const int64_t* x_ptrs, const int64_t* w_ptrs,
                                         const int64_t* route_ptrs, const int64_t* out_ptrs, const int64_t* ready_ptrs,
                                         const int64_t* done_ptrs, int64_t seq, double timeout_s, int threads,
                                         double* seconds, int32_t* experts) {
  return post([=] {
    return moekit_partner_step_compressed(plan, xdtype, L, N, A, E, D, I, x_ptrs, w_ptrs, route_ptrs, out_ptrs,
                                          ready_ptrs, done_ptrs, seq, timeout_s, threads, seconds, experts);
  });
}

// Returns the wall seconds of the last call the runner finished (its own time, not the wait's:
// offload.cpu's cost model learns the CPU's rate from it while the caller did other work).
double moekit_async_last_seconds(void) {
  std::lock_guard<std::mutex> guard(start_mutex);
  return runner != nullptr && runner_pid == getpid() ? runner->seconds : 0.0;
}
// Returns the posted call's code once it is done, or ASYNC_IDLE (-101) when none was posted.
int moekit_async_wait(void) {
  Runner* r;
  {
    std::lock_guard<std::mutex> guard(start_mutex);
    r = runner_pid == getpid() ? runner : nullptr;
  }
  if (r == nullptr || r->state.load(std::memory_order_acquire) == IDLE) return ASYNC_IDLE;
  auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(WAITER_SPIN_US);
  for (int i = 0; r->state.load(std::memory_order_acquire) != DONE; ++i) {
    if ((i & 255) == 255 && std::chrono::steady_clock::now() > until) {
      std::unique_lock<std::mutex> lk(r->m);
      r->done.wait(lk, [&] { return r->state.load(std::memory_order_acquire) == DONE; });
      break;
    }
    MOEKIT_PAUSE();
  }
  int code = r->result;
  r->state.store(IDLE, std::memory_order_release);
  return code;
}

}  // extern "C"
