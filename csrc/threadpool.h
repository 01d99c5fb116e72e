// A small persistent thread pool: one parallel region at a time, dynamic work split.
#pragma once
#include <cstddef>
#include <functional>

namespace retnet {

// Runs fn(begin, end) over [0, n) split into pieces of at least `grain` items,
// on all pool threads plus the caller. Concurrent callers are serialised, so
// async workers on several libuv threads can share the pool safely.
void parallel_for(size_t n, size_t grain, const std::function<void(size_t, size_t)>& fn);

// Number of threads the pool uses (RETNET_NUM_THREADS, else the hardware's).
int num_threads();

// Threads a parallel_for started here would use: 1 inside a parallel region, where nested
// regions run inline, else num_threads().
int available_threads();

}  // namespace retnet
