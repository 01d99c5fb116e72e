// Compact copies of weight matrices for decode steps: bf16 (2 bytes) or int8 with one
// scale per output row (1 byte). A batch-1 decode step is bound by the bytes it reads, so
// it runs up to 2x / 4x faster; prefill, forward and training keep the fp32 master weights.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace retnet {

enum class WeightFormat { F32, BF16, Int8 };

struct QuantizedMatrix {
  WeightFormat format = WeightFormat::F32;
  int N = 0, K = 0;
  std::vector<uint16_t> bf16;  // [N, K], round to nearest even
  std::vector<int8_t> int8;    // [N, K], w ≈ int8 * scales[row]
  std::vector<float> scales;   // [N]
};

// W is [N, K] row-major fp32.
QuantizedMatrix quantize(const float* W, int N, int K, WeightFormat format);

// Y[i, j] = Σ_k X[i, k] Wq[j, k] for i < M and output rows j in [n0, n1) (X is [M, K],
// Y has leading dim ldy). Each row is summed in an order that does not depend on M.
void quantized_dots(const QuantizedMatrix& q, int M, int n0, int n1, const float* X, float* Y, ptrdiff_t ldy);

}  // namespace retnet
