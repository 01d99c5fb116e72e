#include "bench.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <vector>

#include "gemm.h"
#include "ops.h"
#include "simd.h"
#include "threadpool.h"

namespace retnet {
namespace {

template <typename F>
double best_seconds(int reps, F&& f) {
  double best = 1e30;
  for (int r = 0; r < std::max(1, reps); r++) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}

// Four independent accumulators per thread keep several loads in flight.
#ifdef RETNET_X86
__attribute__((target("avx2"))) float sum_avx2(const float* p, size_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    a0 = _mm256_add_ps(a0, _mm256_load_ps(p + i));
    a1 = _mm256_add_ps(a1, _mm256_load_ps(p + i + 8));
    a2 = _mm256_add_ps(a2, _mm256_load_ps(p + i + 16));
    a3 = _mm256_add_ps(a3, _mm256_load_ps(p + i + 24));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  float s = 0;
  for (float l : lanes) s += l;
  for (; i < n; i++) s += p[i];
  return s;
}

__attribute__((target("avx2"))) float sum_pair_avx2(const float* p, const float* q, size_t n) {
  __m256 a[4], b[4];
  for (int v = 0; v < 4; v++) a[v] = b[v] = _mm256_setzero_ps();
  size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    for (int v = 0; v < 4; v++) {
      a[v] = _mm256_add_ps(a[v], _mm256_load_ps(p + i + 8 * v));
      b[v] = _mm256_add_ps(b[v], _mm256_load_ps(q + i + 8 * v));
    }
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])),
                                       _mm256_add_ps(_mm256_add_ps(b[0], b[1]), _mm256_add_ps(b[2], b[3]))));
  float s = 0;
  for (float l : lanes) s += l;
  for (; i < n; i++) s += p[i] + q[i];
  return s;
}

// 12 independent FMA chains of 8 lanes: enough to cover FMA latency on two pipes.
__attribute__((target("avx2,fma"))) float fma_chains_avx2(long iters) {
  __m256 acc[12];
  for (int i = 0; i < 12; i++) acc[i] = _mm256_set1_ps(static_cast<float>(i));
  const __m256 a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-7f);
  for (long it = 0; it < iters; it++)
    for (int i = 0; i < 12; i++) acc[i] = _mm256_fmadd_ps(acc[i], a, b);
  __m256 s = acc[0];
  for (int i = 1; i < 12; i++) s = _mm256_add_ps(s, acc[i]);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, s);
  return lanes[0];
}

__attribute__((target("avx512f"))) float fma_chains_avx512(long iters) {
  __m512 acc[12];
  for (int i = 0; i < 12; i++) acc[i] = _mm512_set1_ps(static_cast<float>(i));
  const __m512 a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-7f);
  for (long it = 0; it < iters; it++)
#pragma GCC unroll 12
    for (int i = 0; i < 12; i++) acc[i] = _mm512_fmadd_ps(acc[i], a, b);
  __m512 s = acc[0];
  for (int i = 1; i < 12; i++) s = _mm512_add_ps(s, acc[i]);
  return _mm512_cvtss_f32(s);
}
#endif

float sum_generic(const float* p, size_t n) {
  float acc[16] = {};
  size_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int l = 0; l < 16; l++) acc[l] += p[i + l];
  float s = 0;
  for (float a : acc) s += a;
  for (; i < n; i++) s += p[i];
  return s;
}

float stream_sum(const float* p, size_t n) {
#ifdef RETNET_X86
  if (cpu_has_avx2_fma()) return sum_avx2(p, n);
#endif
  return sum_generic(p, n);
}

// Σ p + Σ q over n floats each, both read in one loop (two streams).
float stream_sum_pair(const float* p, const float* q, size_t n) {
#ifdef RETNET_X86
  if (cpu_has_avx2_fma()) return sum_pair_avx2(p, q, n);
#endif
  return sum_generic(p, n) + sum_generic(q, n);
}

void fill_random(std::vector<float>& v, uint32_t seed) {
  for (float& x : v) {
    seed = seed * 1664525u + 1013904223u;
    x = static_cast<float>(seed >> 8) / 16777216.0f - 0.5f;
  }
}

}  // namespace

// The better of two patterns: each thread reading its piece as one stream, and as two (its
// halves side by side), which read 1.1-1.2x faster on the development VM; the batch-1 products
// read that way (panel_dots_pair), so the floor they are measured against must too.
double measure_read_bandwidth(size_t bytes, int reps) {
  auto ops = make_cpu_ops();
  const size_t n = bytes / sizeof(float) / 64 * 64;
  Buffer buf(ops.get(), n);
  ops->fill(buf.data(), 1.0f, n);
  const size_t blocks = 256;
  const size_t per = n / blocks;
  std::vector<float> sink(blocks);
  auto seconds = [&](bool two_streams) {
    return best_seconds(reps, [&] {
      parallel_for(blocks, 1, [&](size_t b0, size_t b1) {
        const size_t pairs = two_streams ? (b1 - b0) / 2 : 0;
        for (size_t j = 0; j < pairs; j++)
          sink[b0 + j] = stream_sum_pair(buf.data() + (b0 + j) * per, buf.data() + (b0 + pairs + j) * per, per);
        for (size_t b = b0 + 2 * pairs; b < b1; b++) sink[b] = stream_sum(buf.data() + b * per, per);
      });
    });
  };
  const double s = std::min(seconds(false), seconds(true));
  volatile float keep = sink[0];
  (void)keep;
  return static_cast<double>(per * blocks * sizeof(float)) / s / 1e9;
}

// With the widest vectors the GEMM uses (cpu_isa): the peak its kernels are measured against.
double measure_fma_peak(int reps) {
#ifdef RETNET_X86
  if (cpu_has_avx2_fma()) {
    const bool avx512 = cpu_isa() >= CpuIsa::Avx512;
    const long iters = 20'000'000;
    const int threads = num_threads();
    std::vector<float> sink(threads);
    const double s = best_seconds(reps, [&] {
      parallel_for(threads, 1, [&](size_t t0, size_t t1) {
        for (size_t t = t0; t < t1; t++) sink[t] = avx512 ? fma_chains_avx512(iters) : fma_chains_avx2(iters);
      });
    });
    volatile float keep = sink[0];
    (void)keep;
    return 2.0 * (avx512 ? 16 : 8) * 12 * iters * threads / s / 1e9;
  }
#endif
  return 0;
}

namespace {
// A buffer as the model gets one (CpuOps::alloc: cache-line or 2 MiB aligned, huge pages),
// filled like fill_random: the kernels see the alignment and pages they see in the model.
Buffer model_buffer(Ops* ops, size_t n, uint32_t seed) {
  Buffer b(ops, n);
  std::vector<float> values(n);
  fill_random(values, seed);
  std::copy(values.begin(), values.end(), b.data());
  return b;
}
}  // namespace

double time_linear(int M, int N, int K, int reps) {
  auto ops = make_cpu_ops();
  Buffer X = model_buffer(ops.get(), static_cast<size_t>(M) * K, 1), W = model_buffer(ops.get(), static_cast<size_t>(N) * K, 2);
  Buffer Y(ops.get(), static_cast<size_t>(M) * N);
  // The model's projections are in panels (random values: the layout needs no conversion).
  auto run = [&] { linear_panels(M, N, K, X.data(), W.data(), Y.data(), false, Precision::F32); };
  run();
  return best_seconds(reps, run);
}

double time_decode_product(int M, int N, int K, int reps) {
  auto ops = make_cpu_ops();
  // Enough weight copies (256 MiB, at most 256 of them) to outgrow the caches, as a decode
  // step's weights do: each timed product then reads its weight from memory. Weights under
  // 1 MiB stay within the count cap instead and may be timed from cache.
  const size_t floats = static_cast<size_t>(N) * K;
  const size_t copies = std::clamp<size_t>(((size_t{256} << 20) / sizeof(float) + floats - 1) / floats, 2, 256);
  std::vector<Buffer> weights;
  for (size_t c = 0; c < copies; c++) weights.push_back(model_buffer(ops.get(), floats, 2 + static_cast<uint32_t>(c)));
  Buffer X = model_buffer(ops.get(), static_cast<size_t>(M) * K, 1);
  Buffer Y(ops.get(), static_cast<size_t>(M) * N);
  auto run = [&] {
    for (const Buffer& W : weights) {
      const LinearOut out{W.data(), N, Y.data(), nullptr, true};  // in panels, as the model's
      linear_rowwise(M, K, X.data(), &out, 1);
    }
  };
  run();
  return best_seconds(reps, run) / static_cast<double>(copies);
}

double time_retention(int B, int T, int H, int dk, int dv, int chunk, bool parallel, int reps) {
  auto ops = make_cpu_ops();
  const size_t rows = static_cast<size_t>(B) * T;
  Buffer q = model_buffer(ops.get(), rows * H * dk, 3), k = model_buffer(ops.get(), rows * H * dk, 4),
         v = model_buffer(ops.get(), rows * H * dv, 5), o(ops.get(), rows * H * dv);
  std::vector<float> decay(H);
  for (int h = 0; h < H; h++) decay[h] = std::log(1.0f - std::pow(2.0f, -5.0f - h));
  const RetentionDims d{B, T, H, dk, dv};
  const int C = parallel ? T : chunk;
  const float clamp = parallel ? kParallelClampMax : INFINITY;
  auto run = [&] { ops->retention_chunked(q.data(), k.data(), v.data(), o.data(), d, decay.data(), C, clamp, nullptr); };
  run();
  return best_seconds(reps, run);
}

}  // namespace retnet
