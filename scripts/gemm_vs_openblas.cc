// Our GEMM against OpenBLAS's cblas_sgemm on the model's product shapes, side by side in one
// process, each rep timing ours then OpenBLAS, best of `reps`. Forward products are
// Y[M, N] = X[M, K] W[N, K]^T; the training head's backward products (rows of 64 MiB of
// logits, as the trainer blocks them) are dX = dY W and dW += dY^T X.
// Built and run by scripts/gemm-vs-openblas.sh (needs libopenblas-dev; nothing else uses it).
#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>

#include "gemm.h"
#include "ops.h"
#include "threadpool.h"

using namespace retnet;

namespace {
template <typename F>
double seconds(F&& f) {
  const auto t0 = std::chrono::steady_clock::now();
  f();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// C[M, N] (+)= op(A) op(B) with A stored [M, K] (or [K, M] when a_transposed) and B stored
// [N, K] (b_transposed: the forward's weight) or [K, N], all row-major.
struct Shape {
  const char* what;
  int M, N, K;
  bool a_transposed, b_transposed, accumulate;
};

// A matrix in a buffer of the CPU backend's own (CpuOps::alloc: aligned, on huge pages where
// the kernel allows), so both libraries see what the model hands them; random values.
Buffer random_matrix(Ops* ops, size_t n) {
  Buffer b(ops, n);
  for (size_t i = 0; i < n; i++) b.data()[i] = std::rand() / static_cast<float>(RAND_MAX) - 0.5f;
  return b;
}
}  // namespace

int main(int argc, char** argv) {
  const int reps = argc > 1 ? std::atoi(argv[1]) : 7;
  const auto ops = make_cpu_ops();
  // Base and medium projections, FFN and logits at 512 and 2048 tokens; then the head's three
  // products for one block of 512 rows (the training head's block at vocabulary 32000).
  const Shape shapes[] = {
      {"linear", 2048, 512, 512, false, true, false},   {"linear", 2048, 864, 512, false, true, false},
      {"linear", 2048, 512, 864, false, true, false},   {"linear", 2048, 32000, 512, false, true, false},
      {"linear", 512, 1024, 1024, false, true, false},  {"linear", 2048, 1024, 1024, false, true, false},
      {"linear", 2048, 1728, 1024, false, true, false}, {"linear", 2048, 1024, 1728, false, true, false},
      {"linear", 512, 32000, 1024, false, true, false}, {"linear", 4096, 1024, 1024, false, true, false},
      {"head Y", 512, 32000, 512, false, true, false},  {"head dX", 512, 512, 32000, false, false, false},
      {"head dW", 32000, 512, 512, true, false, true},  {"head Y", 512, 32000, 1024, false, true, false},
      {"head dX", 512, 1024, 32000, false, false, false}, {"head dW", 32000, 1024, 512, true, false, true},
  };
  std::printf("threads %d\n%-8s %6s %6s %6s %12s %12s %7s\n", num_threads(), "product", "M", "N", "K", "ours GF/s",
              "openblas", "ratio");
  for (const Shape& s : shapes) {
    const int M = s.M, N = s.N, K = s.K;
    const Buffer A = random_matrix(ops.get(), static_cast<size_t>(M) * K), B = random_matrix(ops.get(), static_cast<size_t>(N) * K);
    Buffer C(ops.get(), static_cast<size_t>(M) * N);
    const MatView a = s.a_transposed ? transposed(A.data(), M) : row_major(A.data(), K);
    const MatView b = s.b_transposed ? transposed(B.data(), K) : row_major(B.data(), N);
    auto ours = [&] { gemm(M, N, K, a, b, C.data(), N, s.accumulate); };
    auto blas = [&] {
      cblas_sgemm(CblasRowMajor, s.a_transposed ? CblasTrans : CblasNoTrans, s.b_transposed ? CblasTrans : CblasNoTrans,
                  M, N, K, 1.0f, A.data(), s.a_transposed ? M : K, B.data(), s.b_transposed ? K : N,
                  s.accumulate ? 1.0f : 0.0f, C.data(), N);
    };
    ours();
    blas();
    double best_ours = 1e30, best_blas = 1e30;
    for (int r = 0; r < reps; r++) {
      best_ours = std::min(best_ours, seconds(ours));
      best_blas = std::min(best_blas, seconds(blas));
    }
    const double gflop = 2.0 * M * N * K / 1e9;
    std::printf("%-8s %6d %6d %6d %12.1f %12.1f %7.2f\n", s.what, M, N, K, gflop / best_ours, gflop / best_blas,
                best_blas / best_ours);
  }
}
