// Compact weight matrices: bf16 (2 bytes) or int8 with one scale per output row (1 byte).
// A model loaded with them keeps no fp32 copy of its projections: a batch-1 decode step is
// bound by the bytes it reads, so it runs up to 2x / 4x faster, and the model takes 2x / 4x
// less memory. Products of many rows widen the weights to fp32 block by block as they read them.
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>

namespace retnet {

// fp32 -> bf16, rounded to nearest even; a NaN stays a NaN (the rounding carry would turn
// some into infinities or zeros).
inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float from_bf16(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

enum class WeightFormat { F32, BF16, Int8 };

// The arrays point into `storage`: a buffer of the matrix's own, or a slice of the one a model
// holds for all its compact matrices (compact_storage: one mapping on 2 MiB pages).
struct QuantizedMatrix {
  WeightFormat format = WeightFormat::F32;
  int N = 0, K = 0;
  uint16_t* bf16 = nullptr;  // [N, K], round to nearest even
  int8_t* int8 = nullptr;    // [N, K], w ≈ int8 * scales[row]
  float* scales = nullptr;   // [N]
  std::shared_ptr<void> storage;
};

// The bytes a matrix's arrays take in a storage buffer (a multiple of 64).
size_t compact_bytes(int N, int K, WeightFormat format);
// A buffer of `bytes` for compact matrices: 64-byte aligned, on 2 MiB pages from 4 MiB up,
// where the kernel allows. (Zen 3 VM, batch 1, against the matrices in std::vectors on 4 KiB
// pages: medium int8 faster in 8 of 9 alternating rounds, up to 1.27x; bf16 in 5 of 6.)
std::shared_ptr<void> compact_storage(size_t bytes);
// A matrix with its arrays laid out at `offset` in `storage` (compact_bytes(N, K, format)
// bytes there), or in a buffer of its own when storage is null; their values unset.
QuantizedMatrix compact_matrix(int N, int K, WeightFormat format, std::shared_ptr<void> storage = nullptr,
                               size_t offset = 0);

// An [N, K] weight in `format`, read a row at a time: read_row(j, scratch) gives row j's K
// values, written into scratch (K floats) when they are not contiguous in memory. The arrays go
// where compact_matrix(N, K, format, storage, offset) puts them. Throws std::invalid_argument
// for a finite value bf16 cannot hold.
using RowReader = std::function<const float*(int j, float* scratch)>;
QuantizedMatrix quantize(int N, int K, WeightFormat format, const RowReader& read_row,
                         std::shared_ptr<void> storage = nullptr, size_t offset = 0);
// Converts rows into q's own arrays (its format and shape), row by row: a bf16 range error
// leaves the rows before it converted (callers that must change nothing on error run
// check_bf16_range over the whole weight first; the check here stays as the last guard).
void quantize_into(QuantizedMatrix& q, const RowReader& read_row);
// Throws std::invalid_argument naming the first finite value of x[0, n) bf16 cannot hold
// (past its largest finite value, 3.3895e38, it would round to infinity); `first` is x[0]'s index
// for the message.
void check_bf16_range(const float* x, size_t n, size_t first = 0);

// The fp32 values of rows [n0, n0 + rows) and columns [k0, k0 + kc) of q (int8 times the row
// scale) into out, row r at out + r * ldo. With AVX-512, `ahead` > 0 fetches the same columns
// of the rows that many on (the reader's next block) while it goes.
void widen_rows(const QuantizedMatrix& q, int n0, int rows, int k0, int kc, float* out, ptrdiff_t ldo, int ahead = 0);

// Y[i, j] = Σ_k X[i, k] Wq[j, k] for i < M and output rows j in [n0, n1) of a bf16 weight
// (X is [M, K], Y has leading dim ldy). Each row is summed in an order that does not depend on M.
void bf16_dots(const QuantizedMatrix& q, int M, int n0, int n1, const float* X, float* Y, ptrdiff_t ldy);

// int8 products take their activations on a 16-bit grid: each row as integers (|q| <= 32767)
// times a power-of-two step, 2^-14 to 2^-15 of the row's largest magnitude (at least 2^-126).
// The products' sums are then exact integers (int32 lanes, int64 totals), so an output is a
// function of the exact sum: sum * (weight scale * step) in double (both factors exact there),
// then that double to fp32, whatever the batch, the order or the instruction set,
// and the integer dot products (VPDPWSSD: 32 multiply-adds per instruction) read the weights without
// widening them to fp32. Products of many rows (the packed fp32 path) round their activations
// to the same grid, so every form of an int8 model computes the same function.

// The grid step of a row of K activations: a power of two, at least 2^-126 (so 1 / step is a
// float too), 1 for a row of zeros, NaN for a row holding a non-finite value (its outputs are
// then NaN).
float activation_step(const float* x, int K);

// x's grid level (an integer in [-32767, 32767], as a float) given 1 / step: x * inverse is
// exact (a power of two), and adding and taking away 1.5 * 2^23 rounds it to the nearest
// integer, ties to even, without a libm call. The level times the step is x on the grid
// (NaN for a NaN step).
inline float activation_level(float x, float inverse_step) {
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23
  return std::min(32767.0f, std::max(-32767.0f, (x * inverse_step + kRound) - kRound));
}

// The rows of X [M, K] as grid integers Q [M, K] (0 in a non-finite row) and their steps [M].
void to_activation_grid(const float* X, int M, int K, int16_t* Q, float* steps);

// Y[i, j] = (Σ_k Q[i, k] Wq[j, k]) * scales[j] * steps[i] for i < M, j in [n0, n1), the sum
// exact, the product rounded to double and then to fp32 (int8_output).
void int8_dots(const QuantizedMatrix& q, int M, int n0, int n1, const int16_t* Q, const float* steps, float* Y,
               ptrdiff_t ldy);

}  // namespace retnet
