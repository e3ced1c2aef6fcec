// The parallel regions of the expert layer kernels (experts.cpp, compressed_layer.h): an OpenMP team,
// or, for calls run on the library's runner thread (async_runner.cpp: the offloaded decode's CPU
// share, a captured step's partner), the runner's own spinning team.
//
// Why not OpenMP there: libgomp counts every thread it manages in the process, and PyTorch's
// intra-op team on the main thread shares the same libgomp (the one `libgomp.so.1` loaded first).
// With that team (16 threads on the H200 host) and the runner's (15) the count passes the cores,
// and libgomp then "throttles": a thread that waits at a barrier or between regions spins ~100
// pauses and sleeps on a futex. A layer call has 3-4 barriers and the partner's calls come every
// ~0.1-0.3 ms, so each call paid several sleeps and wake-ups: Qwen3's int4 partner calls took
// ~120 us more than their bytes (H200, 7b3b4cf: 175 us for one 2.5 MB expert, +55 us an expert),
// and on the 2-core VM the same call took 451 us against 266 us without PyTorch's team, its worker
// with ~5 voluntary context switches a call. Team's threads spin between calls (SPIN_US, then
// they sleep) and at its barriers, whatever else the process runs.
//
// Spinning needs a core per thread: the offloaded decode's CPU worker takes torch's threads - 1 by
// default (offload.config), the main thread keeping one; with more threads than free cores (the
// 2-core VM, 2 team threads beside a waiting main thread) a call took ~1.2 ms against OpenMP's ~0.45.
//
// A region's body takes a Par: its thread t of nt, range() (the items OpenMP's schedule(static)
// would give it) and barrier().
//
// Which calls use it (MOEKIT_RUNNER_TEAM, read by the thread that posts each call): by default the
// compressed forms' layer calls (int-N, the ternary code); bf16 / float experts stay on OpenMP. H200,
// c0a2f4c, the partner rows in one process each (bench_llamacpp +omp): Qwen3 int4 214.5 tok/s on the
// team vs 167.9 on OpenMP (and 280.7 vs 131.2 in another call; one-expert calls 45 vs 165 us), but
// OLMoE bf16 79.0 on the team vs 90.4 on OpenMP (calls of 0.2-1.4 ms that stream, where the sleeps
// cost little; one row each, not separated from the host's drift). "own": every call on the team,
// "omp": none.
#pragma once

#include <omp.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define MOEKIT_TEAM_PAUSE() _mm_pause()
#else
#define MOEKIT_TEAM_PAUSE() std::this_thread::yield()
#endif

namespace moekit_team {

class Team;

// One thread's view of a parallel region.
struct Par {
  int t, nt;
  Team* team;  // nullptr: an OpenMP team

  // [begin, end) of n items for this thread: OpenMP's schedule(static) split (contiguous, the first
  // n % nt threads one more)
  void range(int64_t n, int64_t& begin, int64_t& end) const {
    const int64_t q = n / nt, r = n % nt;
    begin = t * q + (t < r ? t : r);
    end = begin + q + (t < r ? 1 : 0);
  }
  inline void barrier() const;
};

// Worker threads that spin while idle (SPIN_US after their last region, then sleep on a condition
// variable; one not in the last region sleeps at once) and a spinning barrier (its waits, like the
// master's, yield the core after YIELD_AFTER pauses). One master thread runs regions on it (the runner); never
// destroyed while the process runs (the runner is never freed either).
class Team {
 public:
  static constexpr int64_t SPIN_US = 2000;
  static constexpr int YIELD_AFTER = 4096;  // pauses in a wait before each further one yields the core
  static constexpr int MAX_THREADS = 1024;
  Team() = default;
  ~Team() = delete;  // workers are detached and read it until the process ends

  // Regions run on teams so far (all of them; the tests check which calls took a team).
  static std::atomic<int64_t>& regions() {
    static std::atomic<int64_t> count{0};
    return count;
  }

  // Runs body(par) on threads 0..nt-1, the caller as thread 0; returns when all are done.
  template <typename F>
  void run(int nt, F& body) {
    if (nt > 1) {
      try {
        grow(nt - 1, state_.load(std::memory_order_relaxed) >> 16);
      } catch (...) {  // no more threads: the region runs on those there are
      }
      if (nt > static_cast<int>(workers_.size()) + 1) nt = static_cast<int>(workers_.size()) + 1;
    }
    if (nt <= 1) {
      Par p{0, 1, this};
      body(p);
      return;
    }
    regions().fetch_add(1, std::memory_order_relaxed);
    fn_ = [](void* b, const Par& p) { (*static_cast<F*>(b))(p); };
    arg_ = &body;
    pending_.store(nt - 1, std::memory_order_relaxed);
    // generation and thread count in one word: a worker reads both at once, so a late worker never
    // takes the count of another region for its own
    const uint64_t word = ((state_.load(std::memory_order_relaxed) >> 16) + 1) << 16 | static_cast<uint64_t>(nt);
    state_.store(word, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      { std::lock_guard<std::mutex> lk(m_); }  // a worker between its check and its wait sees the word
      cv_.notify_all();
    }
    Par p{0, nt, this};
    body(p);
    for (int i = 0; pending_.load(std::memory_order_acquire) != 0; ++i) relax(i);
  }

  // Every one of the region's nt threads calls it; none returns before all have arrived.
  void barrier(int nt) {
    if (nt <= 1) return;
    const uint32_t sense = sense_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == nt - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      sense_.store(sense + 1, std::memory_order_release);
    } else {
      for (int i = 0; sense_.load(std::memory_order_acquire) == sense; ++i) relax(i);
    }
  }

 private:
  // a wait's i-th turn: a pause, or past YIELD_AFTER the core to whichever thread the wait is for
  // (more threads than free cores: a descheduled one would otherwise wait out a whole time slice)
  static void relax(int i) {
    if (i < YIELD_AFTER)
      MOEKIT_TEAM_PAUSE();
    else
      std::this_thread::yield();
  }

  std::vector<std::thread> workers_;
  // the words spun on, each on a cache line of its own
  alignas(64) std::atomic<uint64_t> state_{0};  // generation << 16 | the region's thread count
  alignas(64) std::atomic<int> pending_{0};     // workers of the current region not yet done
  alignas(64) std::atomic<int> arrived_{0};
  alignas(64) std::atomic<uint32_t> sense_{0};
  alignas(64) std::atomic<int> sleepers_{0};
  void (*fn_)(void*, const Par&) = nullptr;  // the region's body (stable until pending_ reaches 0)
  void* arg_ = nullptr;
  std::mutex m_;
  std::condition_variable cv_;

  // Starts workers up to n; a new one waits for the generation after `seen` (the region about to start).
  void grow(int n, uint64_t seen) {
    while (static_cast<int>(workers_.size()) < n) {
      const int t = static_cast<int>(workers_.size()) + 1;
      workers_.emplace_back([this, t, seen] { work(t, seen); });
      workers_.back().detach();
    }
  }

  // Sleeps until a region after generation `seen` is posted; returns its word.
  uint64_t sleep_past(uint64_t seen) {
    std::unique_lock<std::mutex> lk(m_);
    sleepers_.fetch_add(1, std::memory_order_seq_cst);
    cv_.wait(lk, [&] { return (state_.load(std::memory_order_seq_cst) >> 16) != seen; });
    sleepers_.fetch_sub(1, std::memory_order_relaxed);
    return state_.load(std::memory_order_acquire);
  }

  void work(int t, uint64_t seen) {
    bool idle = false;  // the last region was not this thread's: wait asleep
    for (;;) {
      uint64_t word = state_.load(std::memory_order_acquire);
      if ((word >> 16) == seen && idle) {
        word = sleep_past(seen);
      } else if ((word >> 16) == seen) {
        const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(SPIN_US);
        for (int i = 0; ((word = state_.load(std::memory_order_acquire)) >> 16) == seen; ++i) {
          if ((i & 255) == 255 && std::chrono::steady_clock::now() > until) {
            word = sleep_past(seen);
            break;
          }
          MOEKIT_TEAM_PAUSE();
        }
      }
      seen = word >> 16;
      const int nt = static_cast<int>(word & 0xffff);
      idle = t >= nt;
      if (!idle) {  // the master waits for this thread: fn_ and arg_ stay this region's meanwhile
        fn_(arg_, Par{t, nt, this});
        pending_.fetch_sub(1, std::memory_order_acq_rel);
      }
    }
  }
};

inline void Par::barrier() const {
  if (team != nullptr) {
    team->barrier(nt);
  } else {
#pragma omp barrier
  }
}

// The team the calling thread runs its regions on: the runner sets its own while it runs a call
// (async_runner.cpp), nullptr elsewhere (OpenMP); dense_on_team: bf16 / float experts' calls too.
inline thread_local Team* calling_team = nullptr;
inline thread_local bool dense_on_team = false;

// Runs body(par) on `threads` threads: the calling thread's Team where it has one (for dense
// experts' calls, `dense`, only with dense_on_team), else OpenMP.
template <typename F>
void parallel(int threads, F&& body, bool dense = false) {
  threads = threads < 1 ? 1 : threads > Team::MAX_THREADS ? Team::MAX_THREADS : threads;
  Team* team = dense && !dense_on_team ? nullptr : calling_team;
  if (team != nullptr) {
    team->run(threads, body);
    return;
  }
#pragma omp parallel num_threads(threads)
  {
    Par p{omp_get_thread_num(), omp_get_num_threads(), nullptr};
    body(p);
  }
}

}  // namespace moekit_team
