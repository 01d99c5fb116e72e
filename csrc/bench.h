// Kernel timings for `retnet bench`: measured here, in the same process as the figures
// they are compared with, because the machine's limits move with its neighbours' load.
#pragma once
#include <cstddef>

namespace retnet {

// Best-of-`reps` DRAM read bandwidth in GB/s of a streaming sum over `bytes`, all threads, each
// reading one stream or two (the better).
double measure_read_bandwidth(size_t bytes, int reps);

// Peak fp32 multiply-add rate in GFLOP/s of register-only FMA chains on all threads:
// the ceiling the GEMM figures are compared with.
double measure_fma_peak(int reps);

// Best-of-`reps` seconds of Y[M,N] = X[M,K] W[N,K]^T (the model's linear layers, W in panels
// as the CPU model keeps them).
double time_linear(int M, int N, int K, int reps);

// Best-of-`reps` seconds of one decode product (linear_rowwise, M rows: the batch) with its
// weight read from memory, not cache, as in a decode step.
double time_decode_product(int M, int N, int K, int reps);

// Best-of-`reps` seconds of the retention core on random q, k, v: chunk = T for the
// parallel form (clamp 5e4), else the chunkwise form with that chunk size.
double time_retention(int B, int T, int H, int dk, int dv, int chunk, bool parallel, int reps);

}  // namespace retnet
