#include "threadpool.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define RETNET_PAUSE() _mm_pause()
#else
#define RETNET_PAUSE() std::this_thread::yield()
#endif

namespace retnet {
namespace {

int configured_threads() {
  if (const char* env = std::getenv("RETNET_NUM_THREADS")) {
    int n = std::atoi(env);
    if (n >= 1) return std::min(n, 256);
  }
  unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(hw);
}

// Workers spin for the next region before sleeping: a decode step runs dozens of short
// regions back to back, and a futex wake costs more than many of them. Long enough to span
// the gap between two decode steps (the promise's round trip through JS, 0.1-0.6 ms here),
// so a token stream never sleeps the worker.
constexpr auto kSpin = std::chrono::microseconds(2000);

class Pool {
 public:
  explicit Pool(int threads) : threads_(threads) {
    for (int i = 1; i < threads_; i++) workers_.emplace_back([this] { worker_loop(); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      shutdown_ = true;
      generation_.fetch_add(1);
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
  }

  int threads() const { return threads_; }

  void run(size_t n, size_t grain, const RangeFn& fn) {
    if (n == 0) return;
    grain = std::max<size_t>(grain, 1);
    // A region started from inside a region runs inline instead of deadlocking.
    if (threads_ == 1 || n <= grain || in_region_) {
      fn(0, n);
      return;
    }
    std::lock_guard<std::mutex> region(region_mu_);
    fn_ = &fn;
    n_ = n;
    grain_ = grain;
    next_.store(0, std::memory_order_relaxed);
    error_ = nullptr;
    open_.store(true);
    {
      std::lock_guard<std::mutex> lock(mu_);
      generation_.fetch_add(1, std::memory_order_release);
    }
    if (sleeping_.load(std::memory_order_acquire) > 0) wake_.notify_all();
    work();
    // Every piece is claimed: close the region, so a worker that has not joined yet (one the
    // OS has not scheduled, say) stays out, and wait only for those inside. Pause-spin, then
    // yield: on an oversubscribed machine the worker we wait for may need this core.
    open_.store(false);
    for (int i = 0; inside_.load() != 0; i++) {
      if (i < 2000) {
        RETNET_PAUSE();
      } else {
        std::this_thread::yield();
      }
    }
    fn_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

  // Whether this thread is running a piece of a region (nested regions then run inline).
  static bool inside_region() { return in_region_; }

 private:
  void work() {
    in_region_ = true;
    // Guided pieces: each takes a share of what is left, so the first are large (few claims)
    // and the last small (the threads finish together: a decode step has dozens of short
    // regions, and the imbalance at each one's end was idle time of a whole core).
    const size_t share = 2 * static_cast<size_t>(threads_);
    size_t begin = next_.load(std::memory_order_relaxed);
    for (;;) {
      if (begin >= n_) break;
      const size_t end = std::min(n_, begin + std::max(grain_, (n_ - begin) / share));
      if (!next_.compare_exchange_weak(begin, end, std::memory_order_relaxed)) continue;
      try {
        (*fn_)(begin, end);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mu_);
        if (!error_) error_ = std::current_exception();
      }
      begin = next_.load(std::memory_order_relaxed);
    }
    in_region_ = false;
  }

  void worker_loop() {
    uint64_t seen = 0;
    for (;;) {
      // Read the clock only every few hundred pauses: it costs more than a pause.
      const auto spin_until = std::chrono::steady_clock::now() + kSpin;
      for (int i = 1; generation_.load(std::memory_order_acquire) == seen; i++) {
        RETNET_PAUSE();
        if (i % 256 == 0 && std::chrono::steady_clock::now() >= spin_until) break;
      }
      if (generation_.load(std::memory_order_acquire) == seen) {
        std::unique_lock<std::mutex> lock(mu_);
        sleeping_.fetch_add(1);
        wake_.wait(lock, [&] { return generation_.load() != seen; });
        sleeping_.fetch_sub(1);
      }
      seen = generation_.load(std::memory_order_acquire);
      if (shutdown_) return;
      // Join only an open region. seq_cst with run()'s close: either run() sees this
      // thread inside, or this thread sees the region closed and leaves its fields alone.
      // A worker that joins late may find a later region open; helping that one is fine.
      inside_.fetch_add(1);
      if (open_.load()) work();
      inside_.fetch_sub(1, std::memory_order_release);
    }
  }

  static thread_local bool in_region_;
  const int threads_;
  std::vector<std::thread> workers_;
  std::mutex region_mu_;
  std::mutex mu_;
  std::condition_variable wake_;
  const RangeFn* fn_ = nullptr;
  size_t n_ = 0, grain_ = 1;
  std::atomic<size_t> next_{0};
  std::atomic<bool> open_{false};
  std::atomic<int> inside_{0};
  std::atomic<int> sleeping_{0};
  std::atomic<uint64_t> generation_{0};
  bool shutdown_ = false;
  std::exception_ptr error_;
};

thread_local bool Pool::in_region_ = false;

Pool& pool() {
  // Process-wide and never destroyed: worker_threads instances of the addon share it,
  // and tearing threads down at exit would race with a still-running worker.
  static Pool* instance = new Pool(configured_threads());
  return *instance;
}

}  // namespace

void parallel_for(size_t n, size_t grain, RangeFn fn) {
  pool().run(n, grain, fn);
}

int num_threads() { return pool().threads(); }

int available_threads() { return Pool::inside_region() ? 1 : pool().threads(); }

}  // namespace retnet
