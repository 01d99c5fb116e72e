// A small persistent thread pool: one parallel region at a time, dynamic work split.
#pragma once
#include <cstddef>
#include <memory>
#include <type_traits>

namespace retnet {

// A reference to a callable taking (begin, end), which it does not own: unlike std::function
// it never allocates (a decode step opens dozens of regions). The callable must outlive the
// reference, as a lambda passed to parallel_for does.
class RangeFn {
 public:
  template <typename F, typename = std::enable_if_t<!std::is_same_v<std::decay_t<F>, RangeFn>>>
  RangeFn(F&& f)  // implicit, as std::function converts from any callable
      : callable_(const_cast<void*>(static_cast<const void*>(std::addressof(f)))),
        call_([](void* callable, size_t begin, size_t end) { (*static_cast<std::remove_reference_t<F>*>(callable))(begin, end); }) {}
  void operator()(size_t begin, size_t end) const { call_(callable_, begin, end); }

 private:
  void* callable_;
  void (*call_)(void*, size_t, size_t);
};

// Runs fn(begin, end) over [0, n) split into pieces of at least `grain` items,
// on all pool threads plus the caller. Concurrent callers are serialised, so
// async workers on several libuv threads can share the pool safely.
void parallel_for(size_t n, size_t grain, RangeFn fn);

// Number of threads the pool uses (RETNET_NUM_THREADS, else the hardware's).
int num_threads();

// Threads a parallel_for started here would use: 1 inside a parallel region, where nested
// regions run inline, else num_threads().
int available_threads();

}  // namespace retnet
