#include "threadpool.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

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

class Pool {
 public:
  explicit Pool(int threads) : threads_(threads) {
    for (int i = 1; i < threads_; i++) workers_.emplace_back([this] { worker_loop(); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      shutdown_ = true;
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
  }

  int threads() const { return threads_; }

  void run(size_t n, size_t grain, const std::function<void(size_t, size_t)>& fn) {
    if (n == 0) return;
    grain = std::max<size_t>(grain, 1);
    // Pieces: a few per thread so uneven work still balances.
    size_t pieces = std::min((n + grain - 1) / grain, static_cast<size_t>(threads_) * 4);
    // A region started from inside a region runs inline instead of deadlocking.
    if (threads_ == 1 || pieces <= 1 || in_region_) {
      fn(0, n);
      return;
    }
    std::lock_guard<std::mutex> region(region_mu_);
    {
      std::lock_guard<std::mutex> lock(mu_);
      fn_ = &fn;
      n_ = n;
      piece_ = (n + pieces - 1) / pieces;
      next_.store(0);
      active_ = static_cast<int>(workers_.size());
      error_ = nullptr;
      generation_++;
    }
    wake_.notify_all();
    work();
    std::unique_lock<std::mutex> lock(mu_);
    done_.wait(lock, [this] { return active_ == 0; });
    fn_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void work() {
    in_region_ = true;
    struct Reset {
      ~Reset() { in_region_ = false; }
    } reset;
    for (;;) {
      size_t begin = next_.fetch_add(piece_);
      if (begin >= n_) return;
      size_t end = std::min(n_, begin + piece_);
      try {
        (*fn_)(begin, end);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mu_);
        if (!error_) error_ = std::current_exception();
      }
    }
  }

  void worker_loop() {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mu_);
        wake_.wait(lock, [&] { return shutdown_ || generation_ != seen; });
        if (shutdown_) return;
        seen = generation_;
      }
      work();
      std::lock_guard<std::mutex> lock(mu_);
      if (--active_ == 0) done_.notify_one();
    }
  }

  static thread_local bool in_region_;
  const int threads_;
  std::vector<std::thread> workers_;
  std::mutex region_mu_;
  std::mutex mu_;
  std::condition_variable wake_, done_;
  const std::function<void(size_t, size_t)>* fn_ = nullptr;
  size_t n_ = 0, piece_ = 1;
  std::atomic<size_t> next_{0};
  int active_ = 0;
  uint64_t generation_ = 0;
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

void parallel_for(size_t n, size_t grain, const std::function<void(size_t, size_t)>& fn) {
  pool().run(n, grain, fn);
}

int num_threads() { return pool().threads(); }

}  // namespace retnet
