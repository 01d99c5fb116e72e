// CUDA backend: every op of csrc/ops.h in fp32 on one device, following the CPU backend
// (csrc/ops_cpu.cc) formula for formula so the two agree to float32 rounding.
//
// Execution model: all work goes to the legacy default stream, and each op holds the
// backend's mutex while it enqueues, so ops issued from several libuv threads run one
// after another in issue order. That makes the device scratch buffers below safe to reuse
// from op to op. Host inputs (tokens, positions, per-row views) are copied in with
// cudaMemcpy; host outputs (logits, losses, norms) are read back with cudaMemcpy, which
// waits for the work before it.
//
// Reductions run in a fixed order (no atomics), so results are deterministic. Decode products
// use rowwise_gemv_kernel, whose rows are summed in an order that does not depend on the batch;
// full-sequence products (forward, prefill, backward) use cuBLAS when it can be loaded.
#include <cuda_runtime.h>
#include <dlfcn.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

#include "counter_rng.h"
#include "ops.h"
#include "ops_cuda.h"

namespace retnet {
namespace {

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("CUDA ") + what + ": " + cudaGetErrorString(err));
}
// Launch configuration errors surface here; faults inside a kernel at the next synchronising call.
void check_launch(const char* kernel) { check(cudaGetLastError(), kernel); }

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Elementwise kernels use grid-stride loops over at most this many blocks.
constexpr size_t kMaxBlocks = 65536;

unsigned blocks_for(size_t n) {
  return static_cast<unsigned>(std::max<size_t>(1, std::min(kMaxBlocks, (n + kThreads - 1) / kThreads)));
}

// ---- Device helpers.

// std::max / std::min semantics (a NaN first argument propagates), so clamps match the CPU.
__device__ inline float max_like_std(float a, float b) { return a < b ? b : a; }
__device__ inline float min_like_std(float a, float b) { return b < a ? b : a; }
// exp rounded once to float: the CPU's expf of the same fl32 argument (spec §11.2, §11.4).
__device__ inline float exp_rounded(float x) { return static_cast<float>(exp(static_cast<double>(x))); }
// s·γ + 1 without a fused multiply-add, as the CPU computes the recurrent scale (spec §11.6).
__device__ inline float scale_recurrence(float s, float gamma) { return __fadd_rn(__fmul_rn(s, gamma), 1.0f); }
__device__ inline float gelu(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752440f)); }
__device__ inline float swish(float x) { return x / (1.0f + expf(-x)); }

template <typename T>
__device__ T warp_sum(T v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over a block of kThreads threads; every thread gets the same total (partials added in warp order).
template <typename T>
__device__ T block_sum(T v) {
  __shared__ T partial[kWarps];
  v = warp_sum(v);
  __syncthreads();  // a previous call may still be reading `partial`
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = v;
  __syncthreads();
  T total = 0;
  for (int w = 0; w < kWarps; w++) total += partial[w];
  return total;
}

__device__ float block_max(float v) {
  __shared__ float partial[kWarps];
  for (int offset = 16; offset > 0; offset >>= 1) v = max_like_std(v, __shfl_xor_sync(0xffffffffu, v, offset));
  __syncthreads();
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = v;
  __syncthreads();
  float best = partial[0];
  for (int w = 1; w < kWarps; w++) best = max_like_std(best, partial[w]);
  return best;
}

#define GRID_STRIDE(i, n) \
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); i += static_cast<size_t>(gridDim.x) * blockDim.x)

// ---- Matrix products.

// Element (r, c) is p[r * rs + c * cs].
struct DeviceMatrix {
  const float* p;
  long long rs, cs;
};

constexpr int kGemmTile = 64;   // output tile edge
constexpr int kGemmDepth = 16;  // K slice per shared-memory stage

// C[M, N] (ldc) (=|+=) A[M, K] B[K, N]: 64x64 tiles, 4x4 outputs per thread, fp32 accumulation.
// Each output sums k = 0..K-1 in order whatever M is, so rows are batch-invariant.
__global__ void gemm_kernel(int M, int N, int K, DeviceMatrix A, DeviceMatrix B, float* C, long long ldc,
                            bool accumulate) {
  __shared__ float As[kGemmDepth][kGemmTile];
  __shared__ float Bs[kGemmDepth][kGemmTile];
  const int m0 = blockIdx.y * kGemmTile, n0 = blockIdx.x * kGemmTile;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  // Consecutive threads load along whichever index is contiguous in memory (coalescing).
  const bool a_k_contiguous = A.cs == 1, b_k_contiguous = B.rs == 1;
  float acc[4][4] = {};
  for (int k0 = 0; k0 < K; k0 += kGemmDepth) {
    for (int l = 0; l < kGemmTile * kGemmDepth / kThreads; l++) {
      const int e = threadIdx.x + l * kThreads;
      int m = a_k_contiguous ? e / kGemmDepth : e % kGemmTile;
      int k = a_k_contiguous ? e % kGemmDepth : e / kGemmTile;
      As[k][m] = (m0 + m < M && k0 + k < K) ? A.p[(m0 + m) * A.rs + (k0 + k) * A.cs] : 0.0f;
      const int n = b_k_contiguous ? e / kGemmDepth : e % kGemmTile;
      k = b_k_contiguous ? e % kGemmDepth : e / kGemmTile;
      Bs[k][n] = (k0 + k < K && n0 + n < N) ? B.p[(k0 + k) * B.rs + (n0 + n) * B.cs] : 0.0f;
    }
    __syncthreads();
    for (int kk = 0; kk < kGemmDepth; kk++) {
      float a[4], b[4];
      for (int i = 0; i < 4; i++) a[i] = As[kk][ty + 16 * i];
      for (int j = 0; j < 4; j++) b[j] = Bs[kk][tx + 16 * j];
      for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++) acc[i][j] += a[i] * b[j];
    }
    __syncthreads();
  }
  for (int i = 0; i < 4; i++) {
    const int m = m0 + ty + 16 * i;
    if (m >= M) continue;
    for (int j = 0; j < 4; j++) {
      const int n = n0 + tx + 16 * j;
      if (n >= N) continue;
      float* c = C + m * ldc + n;
      *c = accumulate ? *c + acc[i][j] : acc[i][j];
    }
  }
}

// The own GEMM: every full-sequence product when cuBLAS is not used.
void tiled_gemm(int M, int N, int K, DeviceMatrix A, DeviceMatrix B, float* C, long long ldc, bool accumulate) {
  if (M == 0 || N == 0) return;
  const unsigned grid_m = (M + kGemmTile - 1) / kGemmTile;
  if (grid_m > 65535) throw std::invalid_argument("CUDA matrix product: too many rows");
  gemm_kernel<<<dim3((N + kGemmTile - 1) / kGemmTile, grid_m), kThreads>>>(M, N, K, A, B, C, ldc, accumulate);
  check_launch("gemm_kernel");
}

// Decode products: Y_o[M, N_o] = X[M, K] W_o[N_o, K]ᵀ for a group of weights that share X
// (q, k, v, g of a step). One warp per output column streams that weight row once from memory
// and applies it to kGemvRows rows of X at a time (later row groups re-read it from cache).
// Each output sums its K terms in an order fixed by K alone (per lane in k order, then a warp
// tree), so a row's result does not depend on M: a request's logits are the same alone or batched.
constexpr int kGemvWarps = 4;
constexpr int kGemvRows = 8;
constexpr int kGemvGroup = 4;  // weights per launch
struct GemvGroup {
  const float* W[kGemvGroup];
  float* Y[kGemvGroup];
  int N[kGemvGroup];
  int count;
};

template <bool kVec4>
__global__ void __launch_bounds__(kGemvWarps * 32) rowwise_gemv_kernel(int M, int K, const float* __restrict__ X,
                                                                      GemvGroup group) {
  const int lane = threadIdx.x & 31;
  // This warp's weight and column; constant indices keep the group in parameter space.
  int col = blockIdx.x * kGemvWarps + (threadIdx.x >> 5), N = 0;
  const float* W = nullptr;
  float* Y = nullptr;
#pragma unroll
  for (int i = 0; i < kGemvGroup; i++) {
    if (Y || i >= group.count) continue;
    if (col < group.N[i]) {
      W = group.W[i];
      Y = group.Y[i];
      N = group.N[i];
    } else {
      col -= group.N[i];
    }
  }
  if (!Y) return;
  const float* __restrict__ w = W + static_cast<size_t>(col) * K;
  for (int m0 = 0; m0 < M; m0 += kGemvRows) {
    const int rows = min(kGemvRows, M - m0);
    const float* x = X + static_cast<size_t>(m0) * K;
    float acc[kGemvRows] = {};
    if (kVec4) {
      constexpr int kUnroll = 4, kStride = 4 * 32;
      int k = 4 * lane;
      // kUnroll independent weight loads in flight before they are used.
      for (; k + (kUnroll - 1) * kStride < K; k += kUnroll * kStride) {
        float4 wv[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; u++) wv[u] = __ldg(reinterpret_cast<const float4*>(w + k + u * kStride));
#pragma unroll
        for (int u = 0; u < kUnroll; u++)
#pragma unroll
          for (int r = 0; r < kGemvRows; r++) {
            if (r >= rows) break;
            const float4 xv = __ldg(reinterpret_cast<const float4*>(x + static_cast<size_t>(r) * K + k + u * kStride));
            acc[r] = fmaf(xv.w, wv[u].w, fmaf(xv.z, wv[u].z, fmaf(xv.y, wv[u].y, fmaf(xv.x, wv[u].x, acc[r]))));
          }
      }
      for (; k < K; k += kStride) {
        const float4 wv = __ldg(reinterpret_cast<const float4*>(w + k));
#pragma unroll
        for (int r = 0; r < kGemvRows; r++) {
          if (r >= rows) break;
          const float4 xv = __ldg(reinterpret_cast<const float4*>(x + static_cast<size_t>(r) * K + k));
          acc[r] = fmaf(xv.w, wv.w, fmaf(xv.z, wv.z, fmaf(xv.y, wv.y, fmaf(xv.x, wv.x, acc[r]))));
        }
      }
    } else {
      for (int k = lane; k < K; k += 32) {
        const float wv = __ldg(w + k);
#pragma unroll
        for (int r = 0; r < kGemvRows; r++) {
          if (r >= rows) break;
          acc[r] = fmaf(__ldg(x + static_cast<size_t>(r) * K + k), wv, acc[r]);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kGemvRows; r++) {
      if (r >= rows) break;
      const float total = warp_sum(acc[r]);
      if (lane == 0) Y[static_cast<size_t>(m0 + r) * N + col] = total;
    }
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// ---- cuBLAS, loaded at run time with dlopen: the addon builds without cuBLAS and runs
// without it (then every product uses tiled_gemm). The few declarations used are written
// out as cublas_api.h declares them (the v2 C API). Products are plain fp32 (cublasSgemm_v2,
// default math mode: no TF32), so the CPU parity tolerances hold, and cuBLAS gives the same
// bits run to run on one GPU model and library version, so training stays deterministic.
// Decode stays on tiled_gemm: cuBLAS picks its algorithm by shape, so a row's sums could
// depend on the batch it is decoded in.

struct cublasContext;
using cublasHandle_t = cublasContext*;
using cublasStatus_t = int;  // CUBLAS_STATUS_SUCCESS = 0
enum cublasOperation_t : int { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 };

struct Cublas {
  std::string library;  // the file loaded; empty when none could be
  std::string failure;  // why none could be
  cublasStatus_t (*create)(cublasHandle_t*) = nullptr;
  cublasStatus_t (*destroy)(cublasHandle_t) = nullptr;
  cublasStatus_t (*sgemm)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int m, int n, int k,
                          const float* alpha, const float* A, int lda, const float* B, int ldb, const float* beta,
                          float* C, int ldc) = nullptr;
};

// Opens `file` and resolves the functions used; returns why not, or "" on success.
std::string open_cublas(const std::string& file, Cublas* api) {
  void* library = dlopen(file.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!library) {
    const char* why = dlerror();
    return why ? why : file + ": dlopen failed";
  }
  Cublas found;
  found.create = reinterpret_cast<decltype(found.create)>(dlsym(library, "cublasCreate_v2"));
  found.destroy = reinterpret_cast<decltype(found.destroy)>(dlsym(library, "cublasDestroy_v2"));
  found.sgemm = reinterpret_cast<decltype(found.sgemm)>(dlsym(library, "cublasSgemm_v2"));
  if (found.create && found.destroy && found.sgemm) {
    found.library = file;  // stays loaded for the life of the process
    *api = found;
    return "";
  }
  dlclose(library);
  return file + " lacks cublasCreate_v2, cublasDestroy_v2 or cublasSgemm_v2";
}

// Tries RETNET_CUBLAS (a path) first, then libcublas.so.13, .so.12 and .so on the loader's path.
Cublas load_cublas() {
  Cublas api;
  std::vector<std::string> failures;
  const char* explicit_path = std::getenv("RETNET_CUBLAS");
  if (explicit_path && *explicit_path) {
    const std::string why = open_cublas(explicit_path, &api);
    if (why.empty()) return api;
    failures.push_back("RETNET_CUBLAS: " + why);
  }
  for (const char* name : {"libcublas.so.13", "libcublas.so.12", "libcublas.so"}) {
    const std::string why = open_cublas(name, &api);
    if (why.empty()) return api;
    // A missing standard name only needs listing; any other reason is worth its full text.
    failures.push_back(why.find("No such file") != std::string::npos ? std::string("no ") + name : why);
  }
  for (const std::string& why : failures) api.failure += (api.failure.empty() ? "" : "; ") + why;
  return api;
}

// Loaded on first use, once per process (RETNET_CUBLAS is read then).
const Cublas& cublas() {
  static const Cublas api = load_cublas();
  return api;
}

// The GEMM of the full-sequence products for a backend created now. RETNET_CUDA_GEMM=own or
// =cublas picks one (cublas: an error when it cannot be loaded); unset, cuBLAS when it loads.
struct GemmChoice {
  const Cublas* cublas;     // null: tiled_gemm
  std::string description;  // "cublas (<library>)" or "own (<why>)"
  std::string error;        // RETNET_CUDA_GEMM asks for what cannot be had
};

GemmChoice choose_gemm() {
  const char* env = std::getenv("RETNET_CUDA_GEMM");
  const std::string wanted = env ? env : "";
  if (wanted == "own") return {nullptr, "own (RETNET_CUDA_GEMM=own)", ""};
  if (!wanted.empty() && wanted != "cublas")
    return {nullptr, "", "RETNET_CUDA_GEMM must be 'own' or 'cublas', got '" + wanted + "'"};
  const Cublas& api = cublas();
  if (!api.library.empty()) return {&api, "cublas (" + api.library + ")", ""};
  if (wanted == "cublas") return {nullptr, "", "RETNET_CUDA_GEMM=cublas, but cuBLAS did not load: " + api.failure};
  return {nullptr, "own (" + api.failure + ")", ""};
}

// How a view X[R, Q] enters cuBLAS as the column-major operand op(X') = Xᵀ (see cublas_gemm).
struct CublasOperand {
  cublasOperation_t op;
  int ld;
};

bool cublas_operand(DeviceMatrix X, int R, int Q, CublasOperand* out) {
  if (X.cs == 1 && X.rs >= std::max(1, Q) && X.rs <= INT_MAX) {
    *out = {CUBLAS_OP_N, static_cast<int>(X.rs)};
    return true;
  }
  if (X.rs == 1 && X.cs >= std::max(1, R) && X.cs <= INT_MAX) {
    *out = {CUBLAS_OP_T, static_cast<int>(X.cs)};
    return true;
  }
  return false;
}

// C[M, N] (ldc) (=|+=) A[M, K] B[K, N] with cuBLAS; false (nothing run) for views it cannot take.
//
// cuBLAS is column-major, and a row-major C[M, N] with leading dimension ldc read column-major
// is the N×M matrix Cᵀ, so we ask for Cᵀ = Bᵀ Aᵀ (m = N, n = M, k = K; B's operand first).
// Each operand must therefore be the transpose of its view X[R, Q] (A: M×K, B: K×N):
//   row-major view   (cs = 1, ld = rs): read column-major it is Xᵀ already -> CUBLAS_OP_N, ld rs
//   transposed view  (rs = 1, ld = cs): read column-major it is X          -> CUBLAS_OP_T, ld cs
// The products of this file, as (op for B, op for A):
//   Y = X Wᵀ     (linear: A = X row-major, B = Wᵀ transposed)           (T, N)
//   dX = dY W    (linear_backward: A = dY, B = W, both row-major)       (N, N)
//   dW += dYᵀ X  (linear_backward: A = dYᵀ transposed, B = X row-major) (N, T)
bool cublas_gemm(const Cublas& api, cublasHandle_t handle, int M, int N, int K, DeviceMatrix A, DeviceMatrix B,
                 float* C, long long ldc, bool accumulate) {
  CublasOperand a, b;
  if (!cublas_operand(A, M, K, &a) || !cublas_operand(B, K, N, &b) || ldc < std::max(1, N) || ldc > INT_MAX) return false;
  const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
  const cublasStatus_t status =
      api.sgemm(handle, b.op, a.op, N, M, K, &alpha, B.p, b.ld, A.p, a.ld, &beta, C, static_cast<int>(ldc));
  if (status != 0) throw std::runtime_error("cublasSgemm_v2 failed with status " + std::to_string(status));
  return true;
}

// ---- Elementwise and row kernels.

__global__ void fill_kernel(float* dst, float value, size_t n) {
  GRID_STRIDE(i, n) dst[i] = value;
}

__global__ void embed_kernel(const int32_t* tokens, size_t n, const float* E, int D, float scale, float* out) {
  GRID_STRIDE(idx, n * D) {
    const size_t i = idx / D, j = idx % D;
    out[idx] = E[static_cast<size_t>(tokens[i]) * D + j] * scale;
  }
}

// One block per row. y may alias x: a thread writes only elements it has read itself.
__global__ void rmsnorm_kernel(const float* x, const float* w, float* y, int D, float eps) {
  const float* xr = x + static_cast<size_t>(blockIdx.x) * D;
  float* yr = y + static_cast<size_t>(blockIdx.x) * D;
  double ss = 0;
  for (int j = threadIdx.x; j < D; j += blockDim.x) ss += static_cast<double>(xr[j]) * xr[j];
  ss = block_sum(ss);
  const float inv = 1.0f / sqrtf(static_cast<float>(ss / D) + eps);
  for (int j = threadIdx.x; j < D; j += blockDim.x) yr[j] = w ? (xr[j] * inv) * w[j] : xr[j] * inv;
}

__global__ void residual_kernel(float* x, const float* y, size_t n, float alpha) {
  GRID_STRIDE(i, n) x[i] = alpha == 1.0f ? x[i] + y[i] : x[i] * alpha + y[i];
}

// k *= k_scale, then rotate the interleaved pairs of q and k by direction·φ, φ = fl32(pos·θ_j),
// with accurate sinf/cosf (spec §11.3). One thread per (row, head, pair).
__global__ void rotate_kernel(float* q, float* k, int T, int H, int dk, const int64_t* start, const float* angle,
                              float k_scale, float direction, size_t pairs) {
  const int P = dk / 2;
  GRID_STRIDE(idx, pairs) {
    const int j = static_cast<int>(idx % P);
    const size_t head_row = idx / P;  // r * H + h
    const size_t r = head_row / H;
    const int b = static_cast<int>(r / T), t = static_cast<int>(r % T);
    const float pos = static_cast<float>(start[b] + t);
    const float phi = pos * angle[2 * j];
    const float c = cosf(phi), s = direction * sinf(phi);
    float* qx = q + head_row * dk + 2 * j;
    float* kx = k + head_row * dk + 2 * j;
    const float q0 = qx[0], q1 = qx[1];
    qx[0] = q0 * c + (-q1) * s;
    qx[1] = q1 * c + q0 * s;
    const float k0 = kx[0] * k_scale, k1 = kx[1] * k_scale;
    kx[0] = k0 * c + (-k1) * s;
    kx[1] = k1 * c + k0 * s;
  }
}

// One warp per (row, head) group of dv values.
__global__ void groupnorm_gate_kernel(const float* o, const float* g, float* z, size_t groups, int dv, float eps) {
  const size_t group = (static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (group >= groups) return;
  const size_t off = group * dv;
  double ss = 0;
  for (int j = lane; j < dv; j += 32) ss += static_cast<double>(o[off + j]) * o[off + j];
  ss = warp_sum(ss);
  const float inv = 1.0f / sqrtf(static_cast<float>(ss / dv) + eps);
  for (int j = lane; j < dv; j += 32) z[off + j] = swish(g[off + j]) * (o[off + j] * inv);
}

__global__ void groupnorm_gate_backward_kernel(const float* o, const float* g, const float* dz, float* d_o, float* dg,
                                               size_t groups, int dv, float eps) {
  const size_t group = (static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (group >= groups) return;
  const size_t off = group * dv;
  double ss = 0;
  for (int j = lane; j < dv; j += 32) ss += static_cast<double>(o[off + j]) * o[off + j];
  ss = warp_sum(ss);
  const float inv = 1.0f / sqrtf(static_cast<float>(ss / dv) + eps);
  // z = swish(g) n with n = o * inv: dg = dz n swish'(g); dn = dz swish(g).
  double dot = 0;
  for (int j = lane; j < dv; j += 32) {
    const float x = g[off + j], sig = 1.0f / (1.0f + expf(-x));
    const float n = o[off + j] * inv;
    dg[off + j] = dz[off + j] * n * (sig * (1.0f + x * (1.0f - sig)));
    dot += static_cast<double>(dz[off + j] * x * sig) * n;
  }
  dot = warp_sum(dot);
  const float mean = static_cast<float>(dot / dv);
  for (int j = lane; j < dv; j += 32) {
    const float x = g[off + j], sig = 1.0f / (1.0f + expf(-x));
    d_o[off + j] = inv * (dz[off + j] * x * sig - (o[off + j] * inv) * mean);
  }
}

__global__ void glu_kernel(const float* a, const float* b, float* z, size_t n, Activation act) {
  GRID_STRIDE(i, n) {
    const float x = a[i];
    const float f = act == Activation::Gelu ? gelu(x) : act == Activation::Swish ? swish(x) : max_like_std(x, 0.0f);
    z[i] = f * b[i];
  }
}

__global__ void glu_backward_kernel(const float* a, const float* b, const float* dz, float* da, float* db, size_t n,
                                    Activation act) {
  GRID_STRIDE(i, n) {
    const float x = a[i];
    float f, df;
    if (act == Activation::Gelu) {
      const float cdf = 0.5f * (1.0f + erff(x * 0.70710678118654752440f));
      f = x * cdf;
      df = cdf + x * 0.39894228040143267794f * expf(-0.5f * x * x);
    } else if (act == Activation::Swish) {
      const float sig = 1.0f / (1.0f + expf(-x));
      f = x * sig;
      df = sig * (1.0f + x * (1.0f - sig));
    } else {
      f = max_like_std(x, 0.0f);
      df = x > 0 ? 1.0f : 0.0f;
    }
    da[i] = dz[i] * b[i] * df;
    db[i] = dz[i] * f;
  }
}

// dE[token, j] += scale * dout[row, j] for the rows of each distinct token, in row order
// (grid: tokens × column blocks). rows_of_token lists rows grouped by token; group g is
// [group_start[g], group_start[g + 1]).
__global__ void embed_backward_kernel(const int32_t* group_token, const int32_t* group_start, const int32_t* rows_of_token,
                                      const float* dout, int D, float scale, float* dE) {
  const int j = blockIdx.y * blockDim.x + threadIdx.x;
  if (j >= D) return;
  const int g = blockIdx.x;
  float* dst = dE + static_cast<size_t>(group_token[g]) * D + j;
  float acc = *dst;
  for (int e = group_start[g]; e < group_start[g + 1]; e++) acc += dout[static_cast<size_t>(rows_of_token[e]) * D + j] * scale;
  *dst = acc;
}

__global__ void rms_inverse_kernel(const float* x, int D, float eps, float* inv) {
  const float* xr = x + static_cast<size_t>(blockIdx.x) * D;
  double ss = 0;
  for (int j = threadIdx.x; j < D; j += blockDim.x) ss += static_cast<double>(xr[j]) * xr[j];
  ss = block_sum(ss);
  if (threadIdx.x == 0) inv[blockIdx.x] = 1.0f / sqrtf(static_cast<float>(ss / D) + eps);
}

// dw[j] += Σ_r dy[r, j] x[r, j] inv[r], rows in order (one thread per column).
__global__ void rmsnorm_weight_grad_kernel(const float* x, const float* dy, const float* inv, float* dw, int rows, int D) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= D) return;
  float acc = dw[j];
  for (int r = 0; r < rows; r++) {
    const size_t at = static_cast<size_t>(r) * D + j;
    acc += dy[at] * (x[at] * inv[r]);
  }
  dw[j] = acc;
}

// dx = inv (dn - n mean(dn n)) with dn = dy w, n = x inv; one block per row. dx may alias dy.
__global__ void rmsnorm_input_grad_kernel(const float* x, const float* w, const float* dy, float* dx, const float* inv,
                                          int D, bool accumulate) {
  const size_t off = static_cast<size_t>(blockIdx.x) * D;
  const float rinv = inv[blockIdx.x];
  double dot = 0;
  for (int j = threadIdx.x; j < D; j += blockDim.x) dot += static_cast<double>(dy[off + j] * w[j]) * (x[off + j] * rinv);
  dot = block_sum(dot);
  const float mean = static_cast<float>(dot / D);
  for (int j = threadIdx.x; j < D; j += blockDim.x) {
    const float g = rinv * (dy[off + j] * w[j] - (x[off + j] * rinv) * mean);
    dx[off + j] = accumulate ? dx[off + j] + g : g;
  }
}

// One block per row: logits become weight * (softmax - onehot(target)); row_loss = lse - logit[target].
__global__ void softmax_cross_entropy_kernel(float* logits, const int32_t* targets, const float* weights, int V,
                                             float* row_loss) {
  const int r = blockIdx.x;
  float* x = logits + static_cast<size_t>(r) * V;
  const float w = weights[r];
  const int target = targets[r];
  if (target < 0 || w == 0.0f) {
    for (int j = threadIdx.x; j < V; j += blockDim.x) x[j] = 0.0f;
    if (threadIdx.x == 0) row_loss[r] = 0.0f;
    return;
  }
  float mx = x[0];
  for (int j = threadIdx.x; j < V; j += blockDim.x) mx = max_like_std(mx, x[j]);
  mx = block_max(mx);
  double sum = 0;
  for (int j = threadIdx.x; j < V; j += blockDim.x) sum += exp(static_cast<double>(x[j] - mx));
  sum = block_sum(sum);
  const double lse = mx + log(sum);
  const float target_logit = x[target];
  __syncthreads();  // every thread has read x[target] before any overwrite
  for (int j = threadIdx.x; j < V; j += blockDim.x) x[j] = w * static_cast<float>(exp(x[j] - lse));
  __syncthreads();
  if (threadIdx.x == 0) {
    row_loss[r] = static_cast<float>(lse - target_logit);
    x[target] -= w;
  }
}

__global__ void dropout_kernel(float* x, size_t n, float p, float keep_scale, uint64_t seed) {
  GRID_STRIDE(i, n) x[i] = uniform01(seed, i) < p ? 0.0f : x[i] * keep_scale;
}

__global__ void drop_path_kernel(float* x, size_t n, size_t per_sample, float p, float keep_scale, uint64_t seed) {
  GRID_STRIDE(i, n) {
    const uint64_t sample = i / per_sample;
    x[i] *= uniform01(seed, sample) < p ? 0.0f : keep_scale;
  }
}

constexpr size_t kSumBlock = 1 << 16;  // elements per partial sum of sum_squares

__global__ void sum_squares_kernel(const float* x, size_t n, double* partial) {
  const size_t begin = static_cast<size_t>(blockIdx.x) * kSumBlock, end = n - begin < kSumBlock ? n : begin + kSumBlock;
  double s = 0;
  for (size_t i = begin + threadIdx.x; i < end; i += blockDim.x) s += static_cast<double>(x[i]) * x[i];
  s = block_sum(s);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

__global__ void adamw_kernel(float* p, const float* g, float* m, float* v, size_t n, AdamWStep s, float decay, float step,
                             float root_bias2) {
  GRID_STRIDE(i, n) {
    const float gi = g[i] * s.grad_scale;
    m[i] = s.beta1 * m[i] + (1.0f - s.beta1) * gi;
    v[i] = s.beta2 * v[i] + (1.0f - s.beta2) * gi * gi;
    p[i] = p[i] * decay - step * m[i] / (sqrtf(v[i]) / root_bias2 + s.eps);
  }
}

// ---- Retention.
//
// Chunk constants (spec §7), one table per head: pow[C+1] | σ[C] | α[C] | β[C] | Γ | S_C.

__host__ __device__ inline size_t constants_stride(int C) { return 4 * static_cast<size_t>(C) + 3; }

struct HeadConstants {
  const float *pow, *sigma, *alpha, *beta;
  float cross_decay, total;
};

__device__ HeadConstants head_constants(const float* table, int h, int C) {
  const float* base = table + h * constants_stride(C);
  return {base, base + C + 1, base + 2 * C + 1, base + 3 * C + 1, base[4 * C + 1], base[4 * C + 2]};
}

// out[h * stride + k] = exp(λ_h k) for k < count (grid: blocks × heads).
__global__ void decay_powers_kernel(const float* decay, int count, size_t stride, float* out) {
  const int h = blockIdx.y;
  for (int k = blockIdx.x * blockDim.x + threadIdx.x; k < count; k += gridDim.x * blockDim.x)
    out[h * stride + k] = exp_rounded(decay[h] * static_cast<float>(k));
}

// Fills σ, α, β, Γ, S_C of each head's table after decay_powers_kernel (one block per head).
__global__ void chunk_constants_kernel(int C, float* table) {
  float* pow = table + blockIdx.x * constants_stride(C);
  float* sigma = pow + C + 1;
  float* alpha = sigma + C;
  float* beta = alpha + C;
  if (threadIdx.x == 0) {
    double rho = 0;  // a row sum of the mask; double as on the CPU
    for (int i = 0; i < C; i++) {
      rho += pow[i];
      sigma[i] = sqrtf(static_cast<float>(rho));
    }
    pow[4 * C + 1] = pow[C];
    pow[4 * C + 2] = static_cast<float>(rho);
  }
  __syncthreads();
  const float total = pow[4 * C + 2];
  for (int i = threadIdx.x; i < C; i += blockDim.x) {
    alpha[i] = pow[i + 1] / (sigma[i] / total);
    beta[i] = pow[C - 1 - i] / total;
  }
}

struct RetentionGeometry {
  int T, H, dk, dv;
  int C;  // chunk length
};

// Rows and key columns per tile of the chunk kernels; a block is kTile x kTile threads.
constexpr int kTile = 16;
static_assert(kTile * kTile == kThreads, "one thread per score of a tile");

// dst[r][e] = src[r * ld + e] for the first `count` rows, 0 for the rest of the tile.
__device__ void load_tile(float* dst, const float* src, long long ld, int count, int width) {
  for (int idx = threadIdx.x; idx < kTile * width; idx += blockDim.x) {
    const int r = idx / width, e = idx - r * width;
    dst[idx] = r < count ? src[r * ld + e] : 0.0f;
  }
}

// acc[r][e] += Σ_m S[r][m] T[m][e] for r < kTile, e < width: S is kTile x kTile, T has
// kTile rows of stride ldt. Each thread updates its own elements of acc.
__device__ void add_tile_product(float* acc, const float* S, const float* T, int width, int ldt) {
  for (int idx = threadIdx.x; idx < kTile * width; idx += blockDim.x) {
    const int row = idx / width, e = idx - row * width;
    float sum = acc[idx];
    for (int m = 0; m < kTile; m++) sum += S[row * kTile + m] * T[m * ldt + e];
    acc[idx] = sum;
  }
}

// S[r][c] = (X_r · Y_c) M̃[i][j] with i = i0 + r, j = j0 + c, for j <= i < rows; 0 elsewhere.
// M̃[i][j] = γ^(i-j) / σ_i, or the plain decay γ^(i-j) when !row_normalised (the recurrent
// form). X and Y are tiles of `width` columns. Each thread writes its own S element.
__device__ void masked_scores(const float* X, const float* Y, int width, int i0, int j0, int rows,
                              const HeadConstants& hc, float* S, bool row_normalised = true) {
  const int r = threadIdx.x / kTile, c = threadIdx.x % kTile;
  const int i = i0 + r, j = j0 + c;
  float s = 0.0f;
  if (j <= i && i < rows) {
    // Each key column starts its sum at element c, so the half-warp's 16 key rows (width
    // apart, usually a multiple of 32) read 16 different shared-memory banks at once.
    float dot = 0.0f;
    for (int n = 0, e = c % width; n < width; n++, e = e + 1 == width ? 0 : e + 1)
      dot += X[r * width + e] * Y[c * width + e];
    s = dot * (row_normalised ? hc.pow[i - j] / hc.sigma[i] : hc.pow[i - j]);
  }
  S[threadIdx.x] = s;
}

// ι_i = min(max(Σ_j |A_ij|, 1), clamp_max) for the rows of the tile at i0, summing j in causal
// order as the CPU does. Qs holds the tile's queries (loaded by the caller); Ks, S are scratch.
__device__ void inner_scale(const float* Qs, float* Ks, float* S, float* iota, const float* k_chunk, long long ldq, int dk,
                            int i0, int rows, const HeadConstants& hc, float clamp_max) {
  float abs_sum = 0.0f;  // row threadIdx.x, for the first kTile threads
  for (int j0 = 0; j0 <= i0; j0 += kTile) {
    __syncthreads();
    load_tile(Ks, k_chunk + j0 * ldq, ldq, min(kTile, rows - j0), dk);
    __syncthreads();
    masked_scores(Qs, Ks, dk, i0, j0, rows, hc, S);
    __syncthreads();
    if (threadIdx.x < kTile)
      for (int c = 0; c < kTile; c++) abs_sum += fabsf(S[threadIdx.x * kTile + c]);
  }
  if (threadIdx.x < kTile) iota[threadIdx.x] = min_like_std(max_like_std(abs_sum, 1.0f), clamp_max);
  __syncthreads();
}

// Where a head's rows of chunk c start, and how many it has.
struct ChunkRows {
  size_t row0;  // global row of the chunk's first row for this sequence
  int rows;
};
__device__ ChunkRows chunk_rows(const RetentionGeometry& g, int b, int c) {
  const int c0 = c * g.C;
  return {static_cast<size_t>(b) * g.T + c0, min(g.C, g.T - c0)};
}

size_t forward_shared_bytes(int dk, int dv) {
  return sizeof(float) * (static_cast<size_t>(kTile) * (2 * dk + 2 * dv) + kTile * kTile + 2 * kTile);
}

// Outputs of every chunk c for each (b, h) (grid: row tiles × chunks × B*H), with kv_in
// [chunks, B*H, dk, dv] the state entering each chunk and κ [chunks, B*H] its scale.
// Chunkwise form (spec §7): o_i = inner_i / (μ_i/ι_i) + cross_i / (μ_i/κ).
// Recurrent form (root_scale given, as the CPU's chunked_retention with `recurrent`): plain decay
// scores, cross_i = γ^(i+1) S_C q_i KV, o_i = (inner_i + cross_i) / root_scale[bh][t] (spec §6, §10).
__global__ void retention_chunk_kernel(const float* q, const float* k, const float* v, float* o, RetentionGeometry g,
                                       const float* table, float clamp_max, const float* kv_in, const float* kappa,
                                       const float* root_scale, bool has_state) {
  extern __shared__ float smem[];
  const int c = blockIdx.y, bh = blockIdx.z, b = bh / g.H, h = bh % g.H, dk = g.dk, dv = g.dv;
  const size_t chunk_state = static_cast<size_t>(c) * gridDim.z + bh;
  const bool use_cross = c > 0 || has_state;
  const ChunkRows cr = chunk_rows(g, b, c);
  const int rows = cr.rows, i0 = blockIdx.x * kTile;
  if (i0 >= rows) return;
  const long long ldq = static_cast<long long>(g.H) * dk, ldv = static_cast<long long>(g.H) * dv;
  const float* qh = q + cr.row0 * ldq + h * dk;
  const float* kh = k + cr.row0 * ldq + h * dk;
  const float* vh = v + cr.row0 * ldv + h * dv;
  float* oh = o + cr.row0 * ldv + h * dv;
  const HeadConstants hc = head_constants(table, h, g.C);
  float* Qs = smem;
  float* Ks = Qs + kTile * dk;
  float* Vs = Ks + kTile * dk;
  float* Os = Vs + kTile * dv;
  float* S = Os + kTile * dv;
  float* iota = S + kTile * kTile;

  const bool recurrent = root_scale != nullptr;
  load_tile(Qs, qh + i0 * ldq, ldq, min(kTile, rows - i0), dk);
  for (int idx = threadIdx.x; idx < kTile * dv; idx += blockDim.x) Os[idx] = 0.0f;
  if (!recurrent) inner_scale(Qs, Ks, S, iota, kh, ldq, dk, i0, rows, hc, clamp_max);
  // inner_i = Σ_j (A_ij / ι_i) v_j; recurrent: Σ_j (q_i · k_j) γ^(i-j) v_j.
  for (int j0 = 0; j0 <= i0; j0 += kTile) {
    const int count = min(kTile, rows - j0);
    __syncthreads();
    load_tile(Ks, kh + j0 * ldq, ldq, count, dk);
    load_tile(Vs, vh + j0 * ldv, ldv, count, dv);
    __syncthreads();
    masked_scores(Qs, Ks, dk, i0, j0, rows, hc, S, !recurrent);
    if (!recurrent) S[threadIdx.x] /= iota[threadIdx.x / kTile];
    __syncthreads();
    add_tile_product(Os, S, Vs, dv, dv);
  }
  if (use_cross) {
    // cross_i = coef_i Σ_f q_if KV_f, a [kTile, dk] x [dk, dv] product staged through shared
    // memory: KV in slices of kTile rows (in Vs), the scaled query columns as a kTile x kTile
    // matrix (in S). Chunkwise, o_i = inner_i / (μ_i/ι_i) + cross_i / (μ_i/κ) with KV read as
    // KV/κ, so coef_i = α_i/μ_i. Recurrent: KV holds the un-normalised state / S_C, and
    // coef_i = γ^(i+1) S_C.
    const float* KVh = kv_in + chunk_state * dk * dv;
    float* coef = iota + kTile;
    const float kap = recurrent ? 1.0f : kappa[chunk_state];
    if (threadIdx.x < kTile) {
      const int i = min(i0 + static_cast<int>(threadIdx.x), rows - 1);
      coef[threadIdx.x] = recurrent ? hc.pow[i + 1] * hc.total : hc.alpha[i] / max_like_std(iota[threadIdx.x], kap);
    }
    if (!recurrent)
      for (int idx = threadIdx.x; idx < kTile * dv; idx += blockDim.x) {
        const float io = iota[idx / dv];
        Os[idx] = Os[idx] / (max_like_std(io, kap) / io);
      }
    for (int f0 = 0; f0 < dk; f0 += kTile) {
      __syncthreads();
      load_tile(Vs, KVh + static_cast<size_t>(f0) * dv, dv, min(kTile, dk - f0), dv);
      const int r = threadIdx.x / kTile, f = f0 + threadIdx.x % kTile;
      S[threadIdx.x] = f < dk ? Qs[r * dk + f] * coef[r] : 0.0f;
      __syncthreads();
      add_tile_product(Os, S, Vs, dv, dv);
    }
  }
  for (int idx = threadIdx.x; idx < kTile * dv; idx += blockDim.x) {
    const int r = idx / dv, e = idx - r * dv, i = i0 + r;
    if (i >= rows) continue;
    float out = Os[idx];
    if (recurrent) out /= root_scale[static_cast<size_t>(bh) * g.T + c * g.C + i];
    oh[i * ldv + e] = out;
  }
}

enum class RowWeight { Beta, Alpha };

// dst[m] = src[m] Γ_h + Σ_r a_r ⊗ (b_r w_r) over the rows of chunk c, for each m = (b, h) with
// [da, db] matrices (grid: blocks × B*H; src may be dst). The forward's state update
// (a = k, b = v, w = β) and the backward's state gradient (a = q, b = dO/μ, w = α).
__global__ void decayed_outer_kernel(const float* a, int da, const float* bmat, int db, RetentionGeometry g, int c,
                                     const float* table, RowWeight weight, const float* src, float* dst) {
  const int bh = blockIdx.y, b = bh / g.H, h = bh % g.H;
  const ChunkRows cr = chunk_rows(g, b, c);
  const long long lda = static_cast<long long>(g.H) * da, ldb = static_cast<long long>(g.H) * db;
  const float* ah = a + cr.row0 * lda + h * da;
  const float* bh_rows = bmat + cr.row0 * ldb + h * db;
  const HeadConstants hc = head_constants(table, h, g.C);
  const float* w = weight == RowWeight::Beta ? hc.beta : hc.alpha;
  const size_t size = static_cast<size_t>(da) * db;
  for (size_t idx = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < size;
       idx += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const int e = static_cast<int>(idx / db), f = static_cast<int>(idx % db);
    float acc = 0.0f;
    for (int r = 0; r < cr.rows; r++) acc += ah[r * lda + e] * (bh_rows[r * ldb + f] * w[r]);
    const size_t m = static_cast<size_t>(bh) * size + idx;
    dst[m] = src[m] * hc.cross_decay + acc;
  }
}

// κ[m] = max(1, max_j Σ_e |KV[m][e][j]|) for each [dk, dv] matrix (one block per matrix).
__global__ void column_abs_max_kernel(const float* KV, int dk, int dv, float* kappa) {
  const float* M = KV + static_cast<size_t>(blockIdx.x) * dk * dv;
  float best = 1.0f;
  for (int j = threadIdx.x; j < dv; j += blockDim.x) {
    float col = 0.0f;
    for (int e = 0; e < dk; e++) col += fabsf(M[static_cast<size_t>(e) * dv + j]);
    best = max_like_std(best, col);
  }
  best = block_max(best);
  if (threadIdx.x == 0) kappa[blockIdx.x] = best;
}

// KV[bh] = S[bh]^T sqrt(s) / S_C: a recurrent state as if the previous tokens ended a chunk
// (0 where s <= 0). Grid: blocks × B*H.
__global__ void state_to_chunk_kernel(StateView state, int H, int dk, int dv, int C, const float* table, float* KV) {
  const int bh = blockIdx.y;
  const float s = state.scale[bh];
  const float mult = sqrtf(s) / head_constants(table, bh % H, C).total;
  const size_t size = static_cast<size_t>(dk) * dv;
  const float* S = state.kv + bh * size;
  for (size_t idx = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < size;
       idx += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const size_t i = idx / dv, j = idx % dv;
    KV[bh * size + idx] = s > 0 ? S[j * dk + i] * mult : 0.0f;
  }
}

size_t row_scale_shared_bytes(int dk) {
  return sizeof(float) * (static_cast<size_t>(kTile) * 2 * dk + kTile * kTile + kTile);
}

// Backward: dOs = dO / μ for every row (grid: row tiles × chunks × B*H); μ = max(ι, κ_c)
// when the chunk reads a cross state (c > 0), else ι. kappa is [chunks, B*H].
__global__ void retention_row_scale_kernel(const float* q, const float* k, const float* d_o, float* dOs,
                                           RetentionGeometry g, const float* table, float clamp_max, const float* kappa) {
  extern __shared__ float smem[];
  const int c = blockIdx.y, bh = blockIdx.z, b = bh / g.H, h = bh % g.H, dk = g.dk, dv = g.dv;
  const ChunkRows cr = chunk_rows(g, b, c);
  const int rows = cr.rows, i0 = blockIdx.x * kTile;
  if (i0 >= rows) return;
  const long long ldq = static_cast<long long>(g.H) * dk, ldv = static_cast<long long>(g.H) * dv;
  const HeadConstants hc = head_constants(table, h, g.C);
  float* Qs = smem;
  float* Ks = Qs + kTile * dk;
  float* S = Ks + kTile * dk;
  float* iota = S + kTile * kTile;
  load_tile(Qs, q + (cr.row0 + i0) * ldq + h * dk, ldq, min(kTile, rows - i0), dk);
  inner_scale(Qs, Ks, S, iota, k + cr.row0 * ldq + h * dk, ldq, dk, i0, rows, hc, clamp_max);
  const float kap = kappa[static_cast<size_t>(c) * gridDim.z + bh];
  for (int idx = threadIdx.x; idx < kTile * dv; idx += blockDim.x) {
    const int r = idx / dv, f = idx - r * dv;
    if (i0 + r >= rows) continue;
    const float mu = c > 0 ? max_like_std(iota[r], kap) : iota[r];
    const size_t at = (cr.row0 + i0 + r) * ldv + h * dv + f;
    dOs[at] = d_o[at] / mu;
  }
}

// acc[r][e] += Σ_m S[r][m] M[e][f0 + m] for r < kTile, e < n: one kTile-column slice of a
// product with Mᵀ (M is [n, ld]), staged through shared memory. T gets the slice transposed,
// rows of stride n + 1 so a half-warp's 16 stores land in 16 banks; S gets s_value, this
// thread's element of the kTile x kTile left operand (0 beyond the slice's width).
__device__ void add_transposed_slice_product(float* acc, int n, const float* M, int ld, int f0, int width,
                                             float s_value, float* S, float* T) {
  __syncthreads();
  // Consecutive threads read along a row of M.
  for (int idx = threadIdx.x; idx < kTile * n; idx += blockDim.x) {
    const int e = idx / kTile, ff = idx % kTile;
    T[ff * (n + 1) + e] = ff < width ? M[static_cast<size_t>(e) * ld + f0 + ff] : 0.0f;
  }
  S[threadIdx.x] = s_value;
  __syncthreads();
  add_tile_product(acc, S, T, n, n + 1);
}

// Ks has kTile spare floats: the cross term stores KVᵀ slices there with row stride dk + 1.
size_t dq_shared_bytes(int dk, int dv) {
  return sizeof(float) * (static_cast<size_t>(kTile) * (2 * dk + 2 * dv + 1) + kTile * kTile);
}

// Backward, query side (grid: row tiles × chunks × B*H): dq_i = Σ_j dS_ij k_j + α_i KV_c dOs_i,
// dS_ij = (dOs_i · v_j) M̃_ij. kv_in is [chunks, B*H, dk, dv], the state entering each chunk.
__global__ void retention_dq_kernel(const float* k, const float* v, const float* dOs, float* dq, RetentionGeometry g,
                                    const float* table, const float* kv_in) {
  extern __shared__ float smem[];
  const int c = blockIdx.y, bh = blockIdx.z, b = bh / g.H, h = bh % g.H, dk = g.dk, dv = g.dv;
  const ChunkRows cr = chunk_rows(g, b, c);
  const int rows = cr.rows, i0 = blockIdx.x * kTile;
  if (i0 >= rows) return;
  const long long ldq = static_cast<long long>(g.H) * dk, ldv = static_cast<long long>(g.H) * dv;
  const float* kh = k + cr.row0 * ldq + h * dk;
  const float* vh = v + cr.row0 * ldv + h * dv;
  const HeadConstants hc = head_constants(table, h, g.C);
  float* Ds = smem;
  float* Vs = Ds + kTile * dv;
  float* Ks = Vs + kTile * dv;
  float* Acc = Ks + kTile * (dk + 1);
  float* S = Acc + kTile * dk;
  load_tile(Ds, dOs + (cr.row0 + i0) * ldv + h * dv, ldv, min(kTile, rows - i0), dv);
  for (int idx = threadIdx.x; idx < kTile * dk; idx += blockDim.x) Acc[idx] = 0.0f;
  for (int j0 = 0; j0 <= i0; j0 += kTile) {
    const int count = min(kTile, rows - j0);
    __syncthreads();
    load_tile(Ks, kh + j0 * ldq, ldq, count, dk);
    load_tile(Vs, vh + j0 * ldv, ldv, count, dv);
    __syncthreads();
    masked_scores(Ds, Vs, dv, i0, j0, rows, hc, S);
    __syncthreads();
    add_tile_product(Acc, S, Ks, dk, dk);
  }
  if (c > 0) {
    // + α_i KV_c dOs_i: a [kTile, dv] x [dv, dk] product staged through shared memory, KVᵀ in
    // slices of kTile rows (in Ks), the scaled dOs columns as a kTile x kTile matrix (in S).
    const float* KV = kv_in + (static_cast<size_t>(c) * gridDim.z + bh) * dk * dv;
    const int r = threadIdx.x / kTile, ff = threadIdx.x % kTile;
    for (int f0 = 0; f0 < dv; f0 += kTile) {
      const int width = min(kTile, dv - f0);
      const float s_value = ff < width && i0 + r < rows ? Ds[r * dv + f0 + ff] * hc.alpha[i0 + r] : 0.0f;
      add_transposed_slice_product(Acc, dk, KV, dv, f0, width, s_value, S, Ks);
    }
  }
  for (int idx = threadIdx.x; idx < kTile * dk; idx += blockDim.x) {
    const int r = idx / dk, e = idx - r * dk, i = i0 + r;
    if (i >= rows) continue;
    dq[(cr.row0 + i) * ldq + h * dk + e] = Acc[idx];
  }
}

// Qs has kTile spare floats: the state-gradient term stores G_cᵀ slices there with row stride dk + 1.
size_t dkv_shared_bytes(int dk, int dv) {
  return sizeof(float) * (static_cast<size_t>(kTile) * (3 * (dk + dv) + 1) + 2 * kTile * kTile);
}

// Backward, key side (grid: key tiles × chunks × B*H): dv_j = Σ_i A_ij dOs_i + β_j (k_j G_c),
// dk_j = Σ_i dS_ij q_i + G_c (β_j v_j), where G_c = dLoss/dKV of the state leaving chunk c
// (g_out [chunks, B*H, dk, dv]; unused for the last chunk).
__global__ void retention_dkv_kernel(const float* q, const float* k, const float* v, const float* dOs, float* dk_out,
                                     float* dv_out, RetentionGeometry g, const float* table, const float* g_out,
                                     int chunks) {
  extern __shared__ float smem[];
  const int c = blockIdx.y, bh = blockIdx.z, b = bh / g.H, h = bh % g.H, dk = g.dk, dv = g.dv;
  const ChunkRows cr = chunk_rows(g, b, c);
  const int rows = cr.rows, j0 = blockIdx.x * kTile;
  if (j0 >= rows) return;
  const long long ldq = static_cast<long long>(g.H) * dk, ldv = static_cast<long long>(g.H) * dv;
  const float* qh = q + cr.row0 * ldq + h * dk;
  const float* dh = dOs + cr.row0 * ldv + h * dv;
  const HeadConstants hc = head_constants(table, h, g.C);
  float* Ks = smem;
  float* Qs = Ks + kTile * dk;
  float* AccK = Qs + kTile * (dk + 1);
  float* Vs = AccK + kTile * dk;
  float* Ds = Vs + kTile * dv;
  float* AccV = Ds + kTile * dv;
  float* A = AccV + kTile * dv;
  float* S = A + kTile * kTile;
  const int count = min(kTile, rows - j0);
  load_tile(Ks, k + (cr.row0 + j0) * ldq + h * dk, ldq, count, dk);
  load_tile(Vs, v + (cr.row0 + j0) * ldv + h * dv, ldv, count, dv);
  for (int idx = threadIdx.x; idx < kTile * dk; idx += blockDim.x) AccK[idx] = 0.0f;
  for (int idx = threadIdx.x; idx < kTile * dv; idx += blockDim.x) AccV[idx] = 0.0f;
  for (int i0 = j0; i0 < rows; i0 += kTile) {
    const int query_count = min(kTile, rows - i0);
    __syncthreads();
    load_tile(Qs, qh + i0 * ldq, ldq, query_count, dk);
    load_tile(Ds, dh + i0 * ldv, ldv, query_count, dv);
    __syncthreads();
    masked_scores(Qs, Ks, dk, i0, j0, rows, hc, A);
    masked_scores(Ds, Vs, dv, i0, j0, rows, hc, S);
    __syncthreads();
    for (int idx = threadIdx.x; idx < kTile * dv; idx += blockDim.x) {
      const int cj = idx / dv, f = idx - cj * dv;
      float acc = AccV[idx];
      for (int r = 0; r < kTile; r++) acc += A[r * kTile + cj] * Ds[r * dv + f];
      AccV[idx] = acc;
    }
    for (int idx = threadIdx.x; idx < kTile * dk; idx += blockDim.x) {
      const int cj = idx / dk, e = idx - cj * dk;
      float acc = AccK[idx];
      for (int r = 0; r < kTile; r++) acc += S[r * kTile + cj] * Qs[r * dk + e];
      AccK[idx] = acc;
    }
  }
  if (c + 1 < chunks) {
    // The state gradient's terms, each a [kTile, ·] x [·, ·] product staged through shared
    // memory with the β-scaled left operand as kTile x kTile matrices in S.
    const float* G = g_out + (static_cast<size_t>(c) * gridDim.z + bh) * dk * dv;
    const int cj = threadIdx.x / kTile, cc = threadIdx.x % kTile;
    const float beta = j0 + cj < rows ? hc.beta[j0 + cj] : 0.0f;
    // dv_j += β_j (k_j G_c): G_c in slices of kTile rows (in Ds).
    for (int e0 = 0; e0 < dk; e0 += kTile) {
      const int width = min(kTile, dk - e0);
      __syncthreads();
      load_tile(Ds, G + static_cast<size_t>(e0) * dv, dv, width, dv);
      S[threadIdx.x] = cc < width ? Ks[cj * dk + e0 + cc] * beta : 0.0f;
      __syncthreads();
      add_tile_product(AccV, S, Ds, dv, dv);
    }
    // dk_j += G_c (β_j v_j): G_cᵀ in slices of kTile rows (in Qs).
    for (int f0 = 0; f0 < dv; f0 += kTile) {
      const int width = min(kTile, dv - f0);
      add_transposed_slice_product(AccK, dk, G, dv, f0, width, cc < width ? Vs[cj * dv + f0 + cc] * beta : 0.0f, S, Qs);
    }
  }
  for (int idx = threadIdx.x; idx < kTile * dv; idx += blockDim.x) {
    const int row = idx / dv, f = idx - row * dv, j = j0 + row;
    if (j < rows) dv_out[(cr.row0 + j) * ldv + h * dv + f] = AccV[idx];
  }
  for (int idx = threadIdx.x; idx < kTile * dk; idx += blockDim.x) {
    const int row = idx / dk, e = idx - row * dk, j = j0 + row;
    if (j < rows) dk_out[(cr.row0 + j) * ldq + h * dk + e] = AccK[idx];
  }
}

// Recurrent form: root[bh][t] = sqrt(s_t) with s_t = s_(t-1)·γ + 1 continuing the state's
// scale s (spec §6), for t < T. One thread per (b, h): the recurrence is sequential.
__global__ void running_root_scale_kernel(const float* decay, int BH, int H, int T, const float* scale, float* root) {
  const int bh = blockIdx.x * blockDim.x + threadIdx.x;
  if (bh >= BH) return;
  const float gamma = exp_rounded(decay[bh % H]);
  float s = scale[bh];
  for (int t = 0; t < T; t++) {
    s = scale_recurrence(s, gamma);
    root[static_cast<size_t>(bh) * T + t] = sqrtf(s);
  }
}

// retention_absorb, per (b, h): carry = γ^T sqrt(s), inv = 1/sqrt(s') with s' after T steps of
// s ← sγ + 1; writes s' (the state kernel reads only `factors`).
__global__ void absorb_scales_kernel(const float* decay, int BH, int H, int T, float* scale, float* factors) {
  const int bh = blockIdx.x * blockDim.x + threadIdx.x;
  if (bh >= BH) return;
  const float lambda = decay[bh % H], gamma = exp_rounded(lambda);
  const float s = scale[bh];
  float s_new = s;
  for (int t = 0; t < T; t++) s_new = scale_recurrence(s_new, gamma);
  factors[2 * bh] = exp_rounded(lambda * static_cast<float>(T)) * sqrtf(s);
  factors[2 * bh + 1] = 1.0f / sqrtf(s_new);
  scale[bh] = s_new;
}

// S[bh][j][i] = (S carry + Σ_t γ^(T-1-t) v_t[j] k_t[i]) inv (spec §10.1), tokens summed in
// blocks of 256 like the CPU's product. powers[h][n] = γ_h^n. Grid: blocks × B*H.
__global__ void absorb_state_kernel(const float* k, const float* v, RetentionGeometry g, const float* powers,
                                    const float* factors, float* kv) {
  constexpr int kBlock = 256;
  const int bh = blockIdx.y, b = bh / g.H, h = bh % g.H, T = g.T, dk = g.dk, dv = g.dv;
  const long long ldk = static_cast<long long>(g.H) * dk, ldv = static_cast<long long>(g.H) * dv;
  const float* kh = k + static_cast<size_t>(b) * T * ldk + h * dk;
  const float* vh = v + static_cast<size_t>(b) * T * ldv + h * dv;
  const float* pw = powers + static_cast<size_t>(h) * (T + 1);
  const float carry = factors[2 * bh], inv = factors[2 * bh + 1];
  const size_t size = static_cast<size_t>(dv) * dk;
  float* S = kv + bh * size;
  for (size_t idx = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < size;
       idx += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const int j = static_cast<int>(idx / dk), i = static_cast<int>(idx % dk);
    float U = S[idx] * carry;
    for (int t0 = 0; t0 < T; t0 += kBlock) {
      float part = 0.0f;
      for (int t = t0; t < min(T, t0 + kBlock); t++) part += (vh[t * ldv + j] * pw[T - 1 - t]) * kh[t * ldk + i];
      U += part;
    }
    S[idx] = U * inv;
  }
}

// One recurrent step (spec §6): S ← S keep + k ⊗ v / sqrt(s'), o = S q, one warp per value row
// j of S (grid: value-row groups × B*H, so even batch 1 fills the GPU). Every block reads the
// old scale s; step_scale_kernel stores s' afterwards.
__global__ void retention_step_kernel(const float* q, const float* k, const float* v, float* o, int H, int dk, int dv,
                                      const float* decay, const StateView* rows) {
  const int bh = blockIdx.y, b = bh / H, h = bh % H;
  const int j = blockIdx.x * kWarps + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (j >= dv) return;
  const float gamma = exp_rounded(decay[h]);
  const float s = rows[b].scale[h];
  const float root_new = sqrtf(scale_recurrence(s, gamma));
  const float keep = sqrtf(s) * gamma / root_new;
  const float* qh = q + static_cast<size_t>(b) * H * dk + h * dk;
  const float* kh = k + static_cast<size_t>(b) * H * dk + h * dk;
  const float vj = v[static_cast<size_t>(b) * H * dv + h * dv + j];
  float* Sj = rows[b].kv + (static_cast<size_t>(h) * dv + j) * dk;
  float dot = 0.0f;
  for (int i = lane; i < dk; i += 32) {
    const float updated = Sj[i] * keep + (kh[i] * vj) / root_new;
    Sj[i] = updated;
    dot += qh[i] * updated;
  }
  dot = warp_sum(dot);
  if (lane == 0) o[static_cast<size_t>(b) * H * dv + h * dv + j] = dot;
}

// s ← s γ + 1 for each (b, h) after retention_step_kernel has read s.
__global__ void step_scale_kernel(int BH, int H, const float* decay, const StateView* rows) {
  GRID_STRIDE(bh, static_cast<size_t>(BH)) {
    float* scale = rows[bh / H].scale + bh % H;
    *scale = scale_recurrence(*scale, exp_rounded(decay[bh % H]));
  }
}

// Raises a kernel's dynamic shared memory limit when it needs more than the default 48 KiB.
template <typename Kernel>
void allow_shared_memory(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return;
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
        "retention head dimensions need more shared memory than this GPU allows");
}

unsigned tiles_for(int rows) { return static_cast<unsigned>((rows + kTile - 1) / kTile); }

class CudaOps final : public Ops {
 public:
  // Runs on the current device; cublas, when given, serves the full-sequence products. The
  // handle uses cuBLAS's default stream, which is the legacy default stream every op here
  // enqueues on, so products and kernels run in issue order.
  CudaOps(int device, const Cublas* cublas) : device_(device), cublas_(cublas) {
    if (!cublas_) return;
    const cublasStatus_t status = cublas_->create(&cublas_handle_);
    if (status != 0)
      throw std::runtime_error("cuBLAS (" + cublas_->library + "): cublasCreate_v2 failed with status " +
                               std::to_string(status) + "; RETNET_CUDA_GEMM=own runs without cuBLAS");
  }
  ~CudaOps() override {
    cudaSetDevice(device_);
    if (cublas_handle_) cublas_->destroy(cublas_handle_);
    for (Scratch& s : scratch_)
      if (s.p) cudaFree(s.p);
  }

  const char* name() const override { return "cuda"; }

  float* alloc(size_t n) override {
    if (n == 0) return nullptr;
    std::lock_guard<std::mutex> lock(mu_);
    bind();
    void* p = nullptr;
    const cudaError_t err = cudaMalloc(&p, n * sizeof(float));
    if (err == cudaErrorMemoryAllocation) {
      cudaGetLastError();
      throw std::bad_alloc();
    }
    check(err, "cudaMalloc");
    check(cudaMemsetAsync(p, 0, n * sizeof(float), 0), "cudaMemsetAsync");
    return static_cast<float*>(p);
  }
  // Called from destructors: never throws.
  void release(float* p) override {
    std::lock_guard<std::mutex> lock(mu_);
    cudaSetDevice(device_);
    cudaFree(p);
  }
  void upload(float* dst, const float* src, size_t n) override {
    std::lock_guard<std::mutex> lock(mu_);
    bind();
    check(cudaMemcpy(dst, src, n * sizeof(float), cudaMemcpyHostToDevice), "upload");
  }
  void download(float* dst, const float* src, size_t n) override {
    std::lock_guard<std::mutex> lock(mu_);
    bind();
    check(cudaMemcpy(dst, src, n * sizeof(float), cudaMemcpyDeviceToHost), "download");
  }
  void copy(float* dst, const float* src, size_t n) override {
    std::lock_guard<std::mutex> lock(mu_);
    bind();
    check(cudaMemcpyAsync(dst, src, n * sizeof(float), cudaMemcpyDeviceToDevice, 0), "copy");
  }
  void fill(float* dst, float value, size_t n) override {
    std::lock_guard<std::mutex> lock(mu_);
    bind();
    if (n == 0) return;
    fill_kernel<<<blocks_for(n), kThreads>>>(dst, value, n);
    check_launch("fill_kernel");
  }
  // Device memory is not counted by the resident set: zeroing is all there is to do.
  void discard(float* p, size_t n) override {
    if (n == 0) return;
    std::lock_guard<std::mutex> lock(mu_);
    bind();
    check(cudaMemsetAsync(p, 0, n * sizeof(float), 0), "cudaMemsetAsync");
  }

  void linear(int M, int N, int K, const float* X, const float* W, float* Y, bool accumulate,
              Precision precision) override {
    require_fp32(precision);
    std::lock_guard<std::mutex> lock(mu_);
    bind();
    matmul(M, N, K, {X, K, 1}, {W, 1, K}, Y, N, accumulate);
  }
  // Batch-invariant GEMV-style kernel (rowwise_gemv_kernel), up to kGemvGroup weights per launch.
  void linear_rowwise(int M, int K, const float* X, const LinearOut* outs, int count) override {
    std::lock_guard<std::mutex> lock(mu_);
    bind();
    if (M == 0) return;
    // The float4 path depends on K and the buffers only, never on M, so batching keeps the order.
    bool vec4 = K % 4 == 0 && aligned16(X);
    for (int i = 0; i < count; i++) vec4 = vec4 && aligned16(outs[i].W);
    for (int first = 0; first < count; first += kGemvGroup) {
      GemvGroup group{};
      size_t columns = 0;
      group.count = std::min(kGemvGroup, count - first);
      for (int i = 0; i < group.count; i++) {
        group.W[i] = outs[first + i].W;
        group.Y[i] = outs[first + i].Y;
        group.N[i] = outs[first + i].N;
        columns += static_cast<size_t>(outs[first + i].N);
      }
      const unsigned blocks = static_cast<unsigned>((columns + kGemvWarps - 1) / kGemvWarps);
      if (blocks == 0) continue;
      if (vec4)
        rowwise_gemv_kernel<true><<<blocks, kGemvWarps * 32>>>(M, K, X, group);
      else
        rowwise_gemv_kernel<false><<<blocks, kGemvWarps * 32>>>(M, K, X, group);
      check_launch("rowwise_gemv_kernel");
    }
  }

  void embed(const int32_t* tokens, int n, const float* E, int D, float scale, float* out) override {
    std::lock_guard<std::mutex> lock(mu_);
    bind();
    if (n == 0) return;
    const int32_t* dev_tokens = to_device(Slot::HostArgs, tokens, n);
    const size_t total = static_cast<size_t>(n) * D;
    embed_kernel<<<blocks_for(total), kThreads>>>(dev_tokens, n, E, D, scale, out);
    check_launch("embed_kernel");
  }

  void rmsnorm(const float* x, const float* w, float* y, int rows, int D, float eps) override {
    std::lock_guard<std::mutex> lock(mu_);
    bind();
    if (rows == 0) return;
    rmsnorm_kernel<<<rows, kThreads>>>(x, w, y, D, eps);
    check_launch("rmsnorm_kernel");
  }

  void residual(float* x, const float* y, size_t n, float alpha) override {
    std::lock_guard<std::mutex> lock(mu_);
    bind();
    if (n == 0) return;
    residual_kernel<<<blocks_for(n), kThreads>>>(x, y, n, alpha);
    check_launch("residual_kernel");
  }

  void rotate_qk(float* q, float* k, const RetentionDims& d, const int64_t* start, const float* angle,
                 float k_scale) override {
    rotate(q, k, d, start, angle, k_scale, 1.0f);
  }
  void rotate_qk_backward(float* dq, float* dk, const RetentionDims& d, const int64_t* start, const float* angle,
                          float k_scale) override {
    rotate(dq, dk, d, start, angle, k_scale, -1.0f);
  }

  void retention_chunked(const float* q, const float* k, const float* v, float* o, const RetentionDims& d,
                         const float* decay, int C, float inner_clamp_max, const StateView* state) override {
    std::lock_guard<std::mutex> lock(mu_);
    bind();
    chunked_retention(q, k, v, o, d, decay, C, inner_clamp_max, state, false);
  }

  bool has_chunked_recurrent() const override { return true; }

  // Reads the state only; the model advances it with retention_absorb afterwards.
  void retention_chunked_recurrent(const float* q, const float* k, const float* v, float* o, const RetentionDims& d,
                                   const float* decay, int C, const StateView& state) override {
    std::lock_guard<std::mutex> lock(mu_);
    bind();
    chunked_retention(q, k, v, o, d, decay, C, 0.0f, &state, true);
  }

  void retention_absorb(const float* k, const float* v, const RetentionDims& d, const float* decay,
                        StateView state) override {
    std::lock_guard<std::mutex> lock(mu_);
    bind();
    const int B = d.B, T = d.T, H = d.H;
    const unsigned BH = check_heads(B, H);
    float* powers = scratch<float>(Slot::Constants, static_cast<size_t>(H) * (T + 1));
    decay_powers_kernel<<<dim3(blocks_for(T + 1), H), kThreads>>>(decay, T + 1, T + 1, powers);
    check_launch("decay_powers_kernel");
    float* factors = scratch<float>(Slot::Scales, 2 * static_cast<size_t>(BH));
    absorb_scales_kernel<<<blocks_for(BH), kThreads>>>(decay, BH, H, T, state.scale, factors);
    check_launch("absorb_scales_kernel");
    const RetentionGeometry g{T, H, d.dk, d.dv, T};
    absorb_state_kernel<<<dim3(blocks_for(static_cast<size_t>(d.dk) * d.dv), BH), kThreads>>>(k, v, g, powers, factors,
                                                                                               state.kv);
    check_launch("absorb_state_kernel");
  }

  void retention_step(const float* q, const float* k, const float* v, float* o, const RetentionDims& d,
                      const float* decay, const StateView* rows) override {
    std::lock_guard<std::mutex> lock(mu_);
    bind();
    if (d.B == 0) return;
    const StateView* dev_rows = to_device(Slot::HostArgs, rows, d.B);
    const unsigned BH = check_heads(d.B, d.H);
    retention_step_kernel<<<dim3(warp_blocks(d.dv), BH), kThreads>>>(q, k, v, o, d.H, d.dk, d.dv, decay, dev_rows);
    check_launch("retention_step_kernel");
    step_scale_kernel<<<blocks_for(BH), kThreads>>>(BH, d.H, decay, dev_rows);
    check_launch("step_scale_kernel");
  }

  void groupnorm_gate(const float* o, const float* g, float* z, int rows, int H, int dv, float eps) override {
    std::lock_guard<std::mutex> lock(mu_);
    bind();
    const size_t groups = static_cast<size_t>(rows) * H;
    if (groups == 0) return;
    groupnorm_gate_kernel<<<warp_blocks(groups), kThreads>>>(o, g, z, groups, dv, eps);
    check_launch("groupnorm_gate_kernel");
  }

  void glu(const float* a, const float* b, float* z, size_t n, Activation act) override {
    std::lock_guard<std::mutex> lock(mu_);
    bind();
    if (n == 0) return;
    glu_kernel<<<blocks_for(n), kThreads>>>(a, b, z, n, act);
    check_launch("glu_kernel");
  }

  // ---- Training ops.

  void linear_backward(int M, int N, int K, const float* X, const float* W, const float* dY, float* dX, float* dW,
                       bool accumulate_dx, Precision precision) override {
    require_fp32(precision);
    std::lock_guard<std::mutex> lock(mu_);
    bind();
    matmul(M, K, N, {dY, N, 1}, {W, K, 1}, dX, K, accumulate_dx);
    matmul(N, K, M, {dY, 1, N}, {X, K, 1}, dW, K, true);  // dW[N, K] += dY^T X
  }

  void embed_backward(const int32_t* tokens, int n, const float* dout, int D, float scale, float* dE) override {
    std::lock_guard<std::mutex> lock(mu_);
    bind();
    if (n == 0) return;
    // Group rows by token (rows in order within a group) so each dE row is summed in row order.
    std::vector<int32_t> order(n);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return tokens[a] < tokens[b]; });
    std::vector<int32_t> group_token, group_start;
    for (int e = 0; e < n; e++) {
      if (e == 0 || tokens[order[e]] != tokens[order[e - 1]]) {
        group_token.push_back(tokens[order[e]]);
        group_start.push_back(e);
      }
    }
    const int groups = static_cast<int>(group_token.size());
    group_start.push_back(n);
    std::vector<int32_t> packed;  // group_token | group_start | order
    packed.reserve(group_token.size() + group_start.size() + order.size());
    packed.insert(packed.end(), group_token.begin(), group_token.end());
    packed.insert(packed.end(), group_start.begin(), group_start.end());
    packed.insert(packed.end(), order.begin(), order.end());
    const int32_t* dev = to_device(Slot::HostArgs, packed.data(), packed.size());
    embed_backward_kernel<<<dim3(groups, (D + kThreads - 1) / kThreads), kThreads>>>(dev, dev + groups, dev + 2 * groups + 1,
                                                                                     dout, D, scale, dE);
    check_launch("embed_backward_kernel");
  }

  void rmsnorm_backward(const float* x, const float* w, const float* dy, float* dx, float* dw, int rows, int D,
                        float eps, bool accumulate_dx) override {
    std::lock_guard<std::mutex> lock(mu_);
    bind();
    if (rows == 0) return;
    float* inv = scratch<float>(Slot::Scales, rows);
    rms_inverse_kernel<<<rows, kThreads>>>(x, D, eps, inv);
    check_launch("rms_inverse_kernel");
    // dw before dx, which may overwrite the dy it aliases.
    rmsnorm_weight_grad_kernel<<<(D + kThreads - 1) / kThreads, kThreads>>>(x, dy, inv, dw, rows, D);
    check_launch("rmsnorm_weight_grad_kernel");
    rmsnorm_input_grad_kernel<<<rows, kThreads>>>(x, w, dy, dx, inv, D, accumulate_dx);
    check_launch("rmsnorm_input_grad_kernel");
  }

  void retention_chunked_backward(const float* q, const float* k, const float* v, const float* d_o, float* dq,
                                  float* dk, float* dv, const RetentionDims& d, const float* decay, int C,
                                  float inner_clamp_max) override {
    std::lock_guard<std::mutex> lock(mu_);
    bind();
    const int B = d.B, T = d.T, H = d.H, dk_ = d.dk, dv_ = d.dv;
    if (B * T == 0) return;
    C = std::max(1, std::min(C, T));
    const unsigned BH = check_heads(B, H);
    const int chunks = (T + C - 1) / C;
    if (chunks > 65535) throw std::invalid_argument("CUDA retention backward: too many chunks (raise the chunk size)");
    const float* table = chunk_constants(decay, H, C);
    const RetentionGeometry g{T, H, dk_, dv_, C};
    const size_t kv_size = static_cast<size_t>(dk_) * dv_, states = BH * kv_size;
    // Forward sweep: the state entering each chunk and its κ, as the forward made them.
    float* kv_in = scratch<float>(Slot::States, chunks * states);
    check(cudaMemsetAsync(kv_in, 0, states * sizeof(float), 0), "cudaMemsetAsync");
    for (int c = 0; c + 1 < chunks; c++) {
      decayed_outer_kernel<<<dim3(blocks_for(kv_size), BH), kThreads>>>(k, dk_, v, dv_, g, c, table, RowWeight::Beta,
                                                                         kv_in + c * states, kv_in + (c + 1) * states);
      check_launch("decayed_outer_kernel");
    }
    float* kappa = scratch<float>(Slot::Scales, static_cast<size_t>(chunks) * BH);
    column_abs_max_kernel<<<chunks * BH, kThreads>>>(kv_in, dk_, dv_, kappa);
    check_launch("column_abs_max_kernel");
    // dO / μ for every row: it carries both the inner and the cross term.
    float* dOs = scratch<float>(Slot::RowGrads, static_cast<size_t>(B) * T * H * dv_);
    const dim3 tiles(tiles_for(C), chunks, BH);
    const size_t row_scale_shared = row_scale_shared_bytes(dk_);
    allow_shared_memory(retention_row_scale_kernel, row_scale_shared);
    retention_row_scale_kernel<<<tiles, kThreads, row_scale_shared>>>(q, k, d_o, dOs, g, table, inner_clamp_max, kappa);
    check_launch("retention_row_scale_kernel");
    // Reverse sweep: G_{c-1} = G_c Γ + Σ_{i in c} q_i ⊗ α_i dOs_i, G_last = 0.
    float* g_out = scratch<float>(Slot::StateGrads, chunks * states);
    check(cudaMemsetAsync(g_out + (chunks - 1) * states, 0, states * sizeof(float), 0), "cudaMemsetAsync");
    for (int c = chunks - 1; c > 0; c--) {
      decayed_outer_kernel<<<dim3(blocks_for(kv_size), BH), kThreads>>>(q, dk_, dOs, dv_, g, c, table, RowWeight::Alpha,
                                                                         g_out + c * states, g_out + (c - 1) * states);
      check_launch("decayed_outer_kernel");
    }
    const size_t dq_shared = dq_shared_bytes(dk_, dv_);
    allow_shared_memory(retention_dq_kernel, dq_shared);
    retention_dq_kernel<<<tiles, kThreads, dq_shared>>>(k, v, dOs, dq, g, table, kv_in);
    check_launch("retention_dq_kernel");
    const size_t dkv_shared = dkv_shared_bytes(dk_, dv_);
    allow_shared_memory(retention_dkv_kernel, dkv_shared);
    retention_dkv_kernel<<<tiles, kThreads, dkv_shared>>>(q, k, v, dOs, dk, dv, g, table, g_out, chunks);
    check_launch("retention_dkv_kernel");
  }

  void groupnorm_gate_backward(const float* o, const float* g, const float* dz, float* d_o, float* dg, int rows, int H,
                               int dv, float eps) override {
    std::lock_guard<std::mutex> lock(mu_);
    bind();
    const size_t groups = static_cast<size_t>(rows) * H;
    if (groups == 0) return;
    groupnorm_gate_backward_kernel<<<warp_blocks(groups), kThreads>>>(o, g, dz, d_o, dg, groups, dv, eps);
    check_launch("groupnorm_gate_backward_kernel");
  }

  void glu_backward(const float* a, const float* b, const float* dz, float* da, float* db, size_t n,
                    Activation act) override {
    std::lock_guard<std::mutex> lock(mu_);
    bind();
    if (n == 0) return;
    glu_backward_kernel<<<blocks_for(n), kThreads>>>(a, b, dz, da, db, n, act);
    check_launch("glu_backward_kernel");
  }

  void softmax_cross_entropy(float* logits, const int32_t* targets, const float* weights, int rows, int V,
                             float* row_loss) override {
    std::lock_guard<std::mutex> lock(mu_);
    bind();
    if (rows == 0) return;
    static_assert(sizeof(int32_t) == sizeof(float), "targets and weights share one upload");
    std::vector<int32_t> packed(2 * static_cast<size_t>(rows));  // targets | weights (bit copies)
    std::memcpy(packed.data(), targets, rows * sizeof(int32_t));
    std::memcpy(packed.data() + rows, weights, rows * sizeof(float));
    const int32_t* dev = to_device(Slot::HostArgs, packed.data(), packed.size());
    float* dev_loss = scratch<float>(Slot::Results, rows);
    softmax_cross_entropy_kernel<<<rows, kThreads>>>(logits, dev, reinterpret_cast<const float*>(dev + rows), V, dev_loss);
    check_launch("softmax_cross_entropy_kernel");
    check(cudaMemcpy(row_loss, dev_loss, rows * sizeof(float), cudaMemcpyDeviceToHost), "download row losses");
  }

  void dropout(float* x, size_t n, float p, uint64_t seed) override {
    std::lock_guard<std::mutex> lock(mu_);
    bind();
    if (n == 0) return;
    dropout_kernel<<<blocks_for(n), kThreads>>>(x, n, p, 1.0f / (1.0f - p), seed);
    check_launch("dropout_kernel");
  }

  void drop_path(float* x, int samples, size_t per_sample, float p, uint64_t seed) override {
    std::lock_guard<std::mutex> lock(mu_);
    bind();
    const size_t n = static_cast<size_t>(samples) * per_sample;
    if (n == 0) return;
    drop_path_kernel<<<blocks_for(n), kThreads>>>(x, n, per_sample, p, 1.0f / (1.0f - p), seed);
    check_launch("drop_path_kernel");
  }

  double sum_squares(const float* x, size_t n) override {
    std::lock_guard<std::mutex> lock(mu_);
    bind();
    const size_t blocks = (n + kSumBlock - 1) / kSumBlock;
    if (blocks == 0) return 0.0;
    double* partial = scratch<double>(Slot::Results, blocks);
    sum_squares_kernel<<<static_cast<unsigned>(blocks), kThreads>>>(x, n, partial);
    check_launch("sum_squares_kernel");
    std::vector<double> host(blocks);
    check(cudaMemcpy(host.data(), partial, blocks * sizeof(double), cudaMemcpyDeviceToHost), "download partial sums");
    double total = 0;
    for (double s : host) total += s;
    return total;
  }

  void adamw(float* p, const float* g, float* m, float* v, size_t n, const AdamWStep& s) override {
    std::lock_guard<std::mutex> lock(mu_);
    bind();
    if (n == 0) return;
    adamw_kernel<<<blocks_for(n), kThreads>>>(p, g, m, v, n, s, 1.0f - s.lr * s.weight_decay, s.lr / s.bias1,
                                              std::sqrt(s.bias2));
    check_launch("adamw_kernel");
  }

 private:
  // Device scratch, grown on demand. Ops that use the same slot never overlap (mu_ and the
  // single stream order them); cudaFree waits for work still using the old buffer.
  enum class Slot { Constants, States, StateGrads, Scales, RowGrads, HostArgs, Results, Count };
  struct Scratch {
    void* p = nullptr;
    size_t bytes = 0;
  };

  template <typename T>
  T* scratch(Slot slot, size_t n) {
    Scratch& s = scratch_[static_cast<int>(slot)];
    const size_t bytes = std::max<size_t>(n * sizeof(T), 256);
    if (bytes > s.bytes) {
      if (s.p) check(cudaFree(s.p), "cudaFree");
      s.p = nullptr;
      s.bytes = 0;
      check(cudaMalloc(&s.p, bytes), "cudaMalloc (scratch)");
      s.bytes = bytes;
    }
    return static_cast<T*>(s.p);
  }

  // Copies n host values into a scratch slot. From pageable memory, cudaMemcpyAsync has read
  // the host values into the driver's staging memory when it returns, without waiting for the
  // device (CUDA "API synchronization behavior"), so a step's many small uploads don't drain the
  // queue; the next use of the slot is ordered after this op's kernels by the stream.
  template <typename T>
  const T* to_device(Slot slot, const T* host, size_t n) {
    T* dev = scratch<T>(slot, n);
    check(cudaMemcpyAsync(dev, host, n * sizeof(T), cudaMemcpyHostToDevice, 0), "upload host arguments");
    return dev;
  }

  // Each op runs on this backend's device, whichever thread calls it.
  void bind() { check(cudaSetDevice(device_), "cudaSetDevice"); }

  // bf16 products are a CPU option (the trainer rejects it for a CUDA model before a pass).
  static void require_fp32(Precision precision) {
    if (precision != Precision::F32) throw std::invalid_argument("bf16 products run on the CPU only");
  }

  // A full-sequence product: cuBLAS when this backend has it and it takes the views, else tiled_gemm.
  void matmul(int M, int N, int K, DeviceMatrix A, DeviceMatrix B, float* C, long long ldc, bool accumulate) {
    if (M == 0 || N == 0) return;
    if (cublas_handle_ && cublas_gemm(*cublas_, cublas_handle_, M, N, K, A, B, C, ldc, accumulate)) return;
    tiled_gemm(M, N, K, A, B, C, ldc, accumulate);
  }

  static unsigned check_heads(int B, int H) {
    const size_t BH = static_cast<size_t>(B) * H;
    if (BH > 65535) throw std::invalid_argument("CUDA retention: batch * heads must be <= 65535");
    return static_cast<unsigned>(BH);
  }

  static unsigned warp_blocks(size_t warps) { return static_cast<unsigned>((warps + kWarps - 1) / kWarps); }

  // The chunk algorithm over chunks of C rows (spec §7), as the CPU's chunked_retention: the
  // cross-chunk state starts from `state` when given and is carried as KV ← KV·Γ + Kᵀ(β⊙V).
  // The states entering the chunks are made first (a short sequential sweep), then one launch
  // computes every chunk's rows in parallel. `recurrent` swaps the chunkwise form's scalars
  // (σ, ι, κ, α) for the recurrent form's: each row divided by the root of its running scale,
  // continued from state->scale (spec §6, §10).
  void chunked_retention(const float* q, const float* k, const float* v, float* o, const RetentionDims& d,
                         const float* decay, int C, float inner_clamp_max, const StateView* state, bool recurrent) {
    const int B = d.B, T = d.T, H = d.H, dk = d.dk, dv = d.dv;
    if (B * T == 0) return;
    C = std::max(1, std::min(C, T));
    const unsigned BH = check_heads(B, H);
    const int chunks = (T + C - 1) / C;
    if (chunks > 65535) throw std::invalid_argument("CUDA retention: too many chunks (raise the chunk size)");
    const float* table = chunk_constants(decay, H, C);
    const RetentionGeometry g{T, H, dk, dv, C};
    const size_t kv_size = static_cast<size_t>(dk) * dv, states = BH * kv_size;
    float* kv_in = scratch<float>(Slot::States, chunks * states);
    if (state) {
      state_to_chunk_kernel<<<dim3(blocks_for(kv_size), BH), kThreads>>>(*state, H, dk, dv, C, table, kv_in);
      check_launch("state_to_chunk_kernel");
    } else {
      check(cudaMemsetAsync(kv_in, 0, states * sizeof(float), 0), "cudaMemsetAsync");
    }
    for (int c = 0; c + 1 < chunks; c++) {
      decayed_outer_kernel<<<dim3(blocks_for(kv_size), BH), kThreads>>>(k, dk, v, dv, g, c, table, RowWeight::Beta,
                                                                         kv_in + c * states, kv_in + (c + 1) * states);
      check_launch("decayed_outer_kernel");
    }
    // Chunkwise: κ per (chunk, b, h). Recurrent: the root of every row's running scale instead.
    float* kappa = nullptr;
    float* root_scale = nullptr;
    if (recurrent) {
      root_scale = scratch<float>(Slot::Scales, static_cast<size_t>(BH) * T);
      running_root_scale_kernel<<<blocks_for(BH), kThreads>>>(decay, BH, H, T, state->scale, root_scale);
      check_launch("running_root_scale_kernel");
    } else {
      kappa = scratch<float>(Slot::Scales, static_cast<size_t>(chunks) * BH);
      column_abs_max_kernel<<<chunks * BH, kThreads>>>(kv_in, dk, dv, kappa);
      check_launch("column_abs_max_kernel");
    }
    const size_t shared = forward_shared_bytes(dk, dv);
    allow_shared_memory(retention_chunk_kernel, shared);
    retention_chunk_kernel<<<dim3(tiles_for(C), chunks, BH), kThreads, shared>>>(
        q, k, v, o, g, table, inner_clamp_max, kv_in, kappa, root_scale, state != nullptr);
    check_launch("retention_chunk_kernel");
  }

  // Chunk constants of every head for chunk length C, in the Constants slot.
  const float* chunk_constants(const float* decay, int H, int C) {
    const size_t stride = constants_stride(C);
    float* table = scratch<float>(Slot::Constants, H * stride);
    decay_powers_kernel<<<dim3(blocks_for(C + 1), H), kThreads>>>(decay, C + 1, stride, table);
    check_launch("decay_powers_kernel");
    chunk_constants_kernel<<<H, kThreads>>>(C, table);
    check_launch("chunk_constants_kernel");
    return table;
  }

  void rotate(float* q, float* k, const RetentionDims& d, const int64_t* start, const float* angle, float k_scale,
              float direction) {
    std::lock_guard<std::mutex> lock(mu_);
    bind();
    const size_t pairs = static_cast<size_t>(d.B) * d.T * d.H * (d.dk / 2);
    if (pairs == 0) return;
    const int64_t* dev_start = to_device(Slot::HostArgs, start, d.B);
    rotate_kernel<<<blocks_for(pairs), kThreads>>>(q, k, d.T, d.H, d.dk, dev_start, angle, k_scale, direction, pairs);
    check_launch("rotate_kernel");
  }

  int device_;
  const Cublas* cublas_;
  cublasHandle_t cublas_handle_ = nullptr;
  std::mutex mu_;
  Scratch scratch_[static_cast<int>(Slot::Count)];
};

}  // namespace

int cuda_device_count(std::string* reason) {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the error so later calls are not affected
    if (reason) *reason = cudaGetErrorString(err);
    return 0;
  }
  if (count == 0 && reason) *reason = "the CUDA runtime reports 0 devices";
  return count;
}

std::unique_ptr<Ops> make_cuda_ops(int device) {
  std::string reason;
  const int count = cuda_device_count(&reason);
  if (count == 0) throw std::runtime_error("no CUDA device: " + reason);
  if (device < 0 || device >= count)
    throw std::runtime_error("no CUDA device: index " + std::to_string(device) + " of " + std::to_string(count));
  const GemmChoice gemm = choose_gemm();
  if (!gemm.error.empty()) throw std::runtime_error(gemm.error);
  check(cudaSetDevice(device), "cudaSetDevice");
  return std::make_unique<CudaOps>(device, gemm.cublas);
}

std::string cuda_gemm() {
  const GemmChoice gemm = choose_gemm();
  return gemm.error.empty() ? gemm.description : "error: " + gemm.error;
}

}  // namespace retnet
