// Our GEMM against OpenBLAS's cblas_sgemm on the model's linear shapes, side by side in one
// process: Y[M, N] = X[M, K] W[N, K]^T, each rep timing ours then OpenBLAS, best of `reps`.
// Built and run by scripts/gemm-vs-openblas.sh (needs libopenblas-dev; nothing else uses it).
#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "gemm.h"
#include "threadpool.h"

using namespace retnet;

namespace {
template <typename F>
double seconds(F&& f) {
  const auto t0 = std::chrono::steady_clock::now();
  f();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}
}  // namespace

int main(int argc, char** argv) {
  const int reps = argc > 1 ? std::atoi(argv[1]) : 7;
  // (M, N, K): base and medium projections, FFN and logits at 512 and 2048 tokens.
  const int shapes[][3] = {{2048, 512, 512},   {2048, 864, 512},   {2048, 512, 864},  {2048, 32000, 512},
                           {512, 1024, 1024},  {2048, 1024, 1024}, {2048, 1728, 1024}, {2048, 1024, 1728},
                           {512, 32000, 1024}, {4096, 1024, 1024}};
  std::printf("threads %d\n%6s %6s %6s %12s %12s %7s\n", num_threads(), "M", "N", "K", "ours GF/s", "openblas", "ratio");
  for (const auto& s : shapes) {
    const int M = s[0], N = s[1], K = s[2];
    std::vector<float> W(static_cast<size_t>(N) * K), X(static_cast<size_t>(M) * K), Y(static_cast<size_t>(M) * N);
    for (float& w : W) w = std::rand() / static_cast<float>(RAND_MAX) - 0.5f;
    for (float& x : X) x = std::rand() / static_cast<float>(RAND_MAX) - 0.5f;
    auto ours = [&] { linear(M, N, K, X.data(), W.data(), Y.data()); };
    auto blas = [&] {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, N, K, 1.0f, X.data(), K, W.data(), K, 0.0f, Y.data(), N);
    };
    ours();
    blas();
    double best_ours = 1e30, best_blas = 1e30;
    for (int r = 0; r < reps; r++) {
      best_ours = std::min(best_ours, seconds(ours));
      best_blas = std::min(best_blas, seconds(blas));
    }
    const double gflop = 2.0 * M * N * K / 1e9;
    std::printf("%6d %6d %6d %12.1f %12.1f %7.2f\n", M, N, K, gflop / best_ours, gflop / best_blas, best_blas / best_ours);
  }
}
