// Matrix products with fp32 accumulation and runtime ISA dispatch: fp32 inputs, or inputs
// rounded to bf16 (the bf16 compute option of training).
#pragma once
#include <cstddef>

namespace retnet {

// A strided matrix view: element (r, c) is p[r * rs + c * cs].
struct MatView {
  const float* p;
  ptrdiff_t rs;
  ptrdiff_t cs;
};

inline MatView row_major(const float* p, ptrdiff_t ld) { return {p, ld, 1}; }
// The transpose of a row-major [cols, ld] matrix, e.g. a torch Linear weight [out, in] seen as [in, out].
inline MatView transposed(const float* p, ptrdiff_t ld) { return {p, 1, ld}; }

// What a product's inputs are rounded to before they are multiplied; sums are fp32 either way.
enum class Precision { F32, BF16 };

// Up to this many rows (fp32, A row-major, B K-contiguous) gemm streams B once with dot
// products instead of packing it; a row's sums then come in another order than with more rows.
constexpr int kGemmDotsMaxRows = 4;

// C[M, N] (row-major, leading dim ldc) = A[M, K] * B[K, N], or += when accumulate.
// Uses the thread pool; must not be called from inside a parallel region for speed
// (it still works there, single-threaded). BF16 uses the CPU's bf16 dot product where it has
// one (AVX512-BF16), otherwise fp32 arithmetic on the rounded values.
void gemm(int M, int N, int K, MatView A, MatView B, float* C, ptrdiff_t ldc, bool accumulate,
          Precision precision = Precision::F32);

// Y[M, N] (=|+=) X[M, K] * W[N, K]^T: a torch Linear without bias.
inline void linear(int M, int N, int K, const float* X, const float* W, float* Y, bool accumulate = false,
                   Precision precision = Precision::F32) {
  gemm(M, N, K, row_major(X, K), transposed(W, K), Y, N, accumulate, precision);
}

struct QuantizedMatrix;

// One product of a group sharing the input X: Y[M, N] = X[M, K] * W[N, K]^T, W in rows or,
// with `panels`, in panels (panels.h); or with `compact` set, that bf16/int8 matrix instead of W.
struct LinearOut {
  const float* W;
  int N;
  float* Y;
  const QuantizedMatrix* compact = nullptr;
  bool panels = false;
};

// Every product of the group, in one parallel pass that streams each W once. Each output
// row is summed in an order that does not depend on M: decode steps use it so a sequence
// gets the same numbers alone or batched.
void linear_rowwise(int M, int K, const float* X, const LinearOut* outs, int count);

// Y[M, N] = X[M, K] * Wq[N, K]^T for a compact (bf16 / int8) weight, N and K from Wq: up to
// kCompactDotsMaxRows rows as linear_rowwise's dot products, more as gemm's packed products
// on the weight widened to fp32 a panel at a time while it is packed.
constexpr int kCompactDotsMaxRows = 256;
void linear_compact(int M, const float* X, const QuantizedMatrix& W, float* Y);

// linear and its backward for a weight W [N, K] stored in panels (P, panels.h). Up to
// kCompactDotsMaxRows fp32 rows, the forward runs linear_rowwise's batch-invariant products;
// more, or bf16 inputs, gemm's packed products, the panels' lines packed as they are.
// The backward: dX (=|+=) dY W, and dW += dY^T X written into dP, laid out as P.
void linear_panels(int M, int N, int K, const float* X, const float* P, float* Y, bool accumulate,
                   Precision precision);
void linear_panels_backward(int M, int N, int K, const float* X, const float* P, const float* dY, float* dX, float* dP,
                            bool accumulate_dx, Precision precision);

// Name of the kernel set chosen at run time ("avx512", "avx2-fma" or "generic").
const char* gemm_isa();

// Whether bf16 products run on the CPU's bf16 dot product (else on fp32 arithmetic).
bool gemm_has_bf16_dot();

}  // namespace retnet
