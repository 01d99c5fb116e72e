// The CPU's layout of fp32 projection weights: panels of 64 output rows. A weight [N, K]
// (a torch Linear's [out, in]) holds output rows [64p, 64p + w) in panel p, w = min(64, N - 64p),
// as [K][w] starting at 64pK: w[n, k] lies at 64pK + k w + (n - 64p). The panels take the
// same N * K floats as the rows, so the parameter arena keeps its offsets and sizes.
//
// Why: a decode product then broadcasts one activation against 64 outputs' weights per step,
// with no horizontal sums (a medium batch-16 step ran 1.27-1.38x faster than on rows,
// MEASUREMENTS.md), and the packed GEMM's B blocks are the panels' own lines. Each decode
// output is one FMA chain from 0 over k in order, whatever the batch and the instruction set:
// the same bits on AVX-512, AVX2 and the generic kernels.
#pragma once
#include <algorithm>
#include <cstddef>

namespace retnet {

constexpr int kPanelWidth = 64;

// Panel p's width (rows of W it holds) and where it starts.
inline int panel_width(int N, int p) { return std::min(kPanelWidth, N - p * kPanelWidth); }
inline size_t panel_offset(int K, int p) { return static_cast<size_t>(p) * kPanelWidth * K; }

// W [N, K] row-major into panels P (N * K floats).
void to_panels(const float* W, int N, int K, float* P);

// Rows [n0, n0 + rows), columns [k0, k0 + kc) of the panel matrix P [N, K], row r at out + r * ldo.
void from_panels(const float* P, int N, int K, int n0, int rows, int k0, int kc, float* out, ptrdiff_t ldo);

// Y[i, j] = Σ_k X[i, k] W[j, k] for i < M and output rows j in [n0, n1) of the panel matrix P
// [N, K], [n0, n1) within one panel (X is [M, K], Y has leading dim ldy); each output an FMA
// chain from 0 over k = 0 .. K-1 in order.
void panel_dots(const float* P, int N, int K, int M, int n0, int n1, const float* X, float* Y, ptrdiff_t ldy);

// Output rows [n0, n1) of the panel matrix P [N, K] within one panel, written from Y[n0].
struct PanelSlice {
  const float* P;
  int N, n0, n1;
  float* Y;
};

// panel_dots for one activation row x [K] against two slices at once: with AVX-512 or AVX2 and
// two whole panels, one loop reads both, as two streams, which the VMs' memory serves faster
// than one: batch-1 decode steps ran 1.1-1.2x faster on a Zen 5 (AVX-512) at its slower moments
// and even at its faster ones; on a Zen 3-class AVX2 VM a harness read 1.1-1.3x faster
// (MEASUREMENTS.md). The same bits as two calls.
void panel_dots_pair(const PanelSlice& a, const PanelSlice& b, int K, const float* x);

}  // namespace retnet
