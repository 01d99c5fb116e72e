// Host-only check of how cuda/ops_cuda.cu maps its row-major products onto cuBLAS's
// column-major SGEMM (cublas_gemm), for the three products the backend issues. A reference
// column-major SGEMM with BLAS's argument rules stands in for cuBLAS, so no GPU is needed:
//   nvcc -std=c++17 -Icsrc -Icuda -arch=sm_80 test/cuda/cublas_mapping_check.cu -o /tmp/cublas_mapping_check \
//     && /tmp/cublas_mapping_check
#include <cstdio>
#include <random>

#include "ops_cuda.cu"

namespace retnet {
namespace {

// C = alpha op(A) op(B) + beta C, column-major; status 7 (CUBLAS_STATUS_INVALID_VALUE) for a bad leading dimension.
cublasStatus_t reference_sgemm(cublasHandle_t, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                               const float* alpha, const float* A, int lda, const float* B, int ldb, const float* beta,
                               float* C, int ldc) {
  if (lda < std::max(1, ta == CUBLAS_OP_N ? m : k) || ldb < std::max(1, tb == CUBLAS_OP_N ? k : n) || ldc < std::max(1, m))
    return 7;
  for (int j = 0; j < n; j++)
    for (int i = 0; i < m; i++) {
      double acc = 0;
      for (int l = 0; l < k; l++) {
        const float a = ta == CUBLAS_OP_N ? A[i + static_cast<size_t>(l) * lda] : A[l + static_cast<size_t>(i) * lda];
        const float b = tb == CUBLAS_OP_N ? B[l + static_cast<size_t>(j) * ldb] : B[j + static_cast<size_t>(l) * ldb];
        acc += static_cast<double>(a) * b;
      }
      float& c = C[i + static_cast<size_t>(j) * ldc];
      c = static_cast<float>(*alpha * acc + (*beta == 0.0f ? 0.0 : *beta * c));
    }
  return 0;
}

}  // namespace
}  // namespace retnet

int main() {
  using namespace retnet;
  Cublas api;
  api.sgemm = reference_sgemm;
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  double worst = 0;
  int cases = 0;
  for (int M : {1, 3, 17})
    for (int N : {1, 5, 8})
      for (int K : {1, 4, 9})
        for (bool accumulate : {false, true}) {
          std::vector<float> X(M * K), W(N * K), Y(M * N), dY(M * N), dX(M * K), dW(N * K);
          for (std::vector<float>* v : {&X, &W, &Y, &dY, &dX, &dW})
            for (float& f : *v) f = uniform(rng);
          const std::vector<float> Y0 = Y, dX0 = dX, dW0 = dW;
          // The views CudaOps::linear and CudaOps::linear_backward pass to matmul.
          bool mapped = cublas_gemm(api, nullptr, M, N, K, {X.data(), K, 1}, {W.data(), 1, K}, Y.data(), N, accumulate);
          mapped &= cublas_gemm(api, nullptr, M, K, N, {dY.data(), N, 1}, {W.data(), K, 1}, dX.data(), K, accumulate);
          mapped &= cublas_gemm(api, nullptr, N, K, M, {dY.data(), 1, N}, {X.data(), K, 1}, dW.data(), K, true);
          if (!mapped) {
            std::printf("FAIL: M=%d N=%d K=%d not mapped onto cuBLAS\n", M, N, K);
            return 1;
          }
          auto track = [&](float got, float before, double want) {
            worst = std::max(worst, std::fabs(got - ((accumulate ? before : 0.0f) + want)));
          };
          for (int m = 0; m < M; m++)
            for (int n = 0; n < N; n++) {  // Y = X Wᵀ
              double s = 0;
              for (int k = 0; k < K; k++) s += static_cast<double>(X[m * K + k]) * W[n * K + k];
              track(Y[m * N + n], Y0[m * N + n], s);
            }
          for (int m = 0; m < M; m++)
            for (int k = 0; k < K; k++) {  // dX = dY W
              double s = 0;
              for (int n = 0; n < N; n++) s += static_cast<double>(dY[m * N + n]) * W[n * K + k];
              track(dX[m * K + k], dX0[m * K + k], s);
            }
          for (int n = 0; n < N; n++)
            for (int k = 0; k < K; k++) {  // dW += dYᵀ X
              double s = 0;
              for (int m = 0; m < M; m++) s += static_cast<double>(dY[m * N + n]) * X[m * K + k];
              worst = std::max(worst, std::fabs(dW[n * K + k] - (dW0[n * K + k] + s)));
            }
          cases++;
        }
  // A view with neither stride 1 is left to the own kernel.
  float scratch[16] = {};
  const bool refused = !cublas_gemm(api, nullptr, 2, 2, 2, {scratch, 4, 2}, {scratch, 2, 1}, scratch, 2, false);
  const bool ok = worst < 1e-5 && refused;
  std::printf("%s: %d shapes x 3 products, max abs error %.2e, non-unit-stride view refused: %s\n", ok ? "ok" : "FAIL",
              cases, worst, refused ? "yes" : "no");
  return ok ? 0 : 1;
}
