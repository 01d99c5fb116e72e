// CPU backend: fused passes parallelised over rows with the thread pool; matrix
// products go through gemm.cc. Floating-point order follows torchscale where the
// spec calls it out (mask values, normaliser order, the recurrent update).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <new>
#include <unordered_map>
#include <utility>
#include <vector>

#include <sys/mman.h>
#include <unistd.h>

#include "counter_rng.h"
#include "gemm.h"
#include "huge_pages.h"
#include "ops.h"
#include "simd.h"
#include "threadpool.h"

namespace retnet {
namespace {

// Per-head constants of a chunk of length C (spec §7), in float32 as torchscale makes them.
struct ChunkConstants {
  std::vector<float> pow;    // pow[k] = exp(λ k), k = 0..C
  std::vector<float> pow_rev;  // pow_rev[t] = pow[C - t]: row i's decays γ^(i-j) start at pow_rev + C - i
  std::vector<float> sigma;  // σ_i = sqrt(ρ_i)
  std::vector<float> alpha;  // query_inner_decay α_i
  std::vector<float> beta;   // value_inner_decay β_j
  float cross_decay = 0;     // Γ = exp(λ C)
  float total = 0;           // S_C = ρ_{C-1}

  // γ^(i-j) for j = 0..i, contiguous in j.
  const float* decays_of_row(int i) const { return pow_rev.data() + (pow_rev.size() - 1 - i); }

  ChunkConstants(float lambda, int C) : pow(C + 1), pow_rev(C + 1), sigma(C), alpha(C), beta(C) {
    for (int k = 0; k <= C; k++) pow[k] = std::exp(lambda * static_cast<float>(k));
    for (int t = 0; t <= C; t++) pow_rev[t] = pow[C - t];
    double rho = 0;  // a row sum of the mask; double keeps it within an ulp of torch's sum
    std::vector<float> rho_row(C);
    for (int i = 0; i < C; i++) {
      rho += pow[i];
      rho_row[i] = static_cast<float>(rho);
      sigma[i] = std::sqrt(rho_row[i]);
    }
    const float sC = rho_row[C - 1];
    total = sC;
    for (int i = 0; i < C; i++) {
      alpha[i] = pow[i + 1] / (sigma[i] / sC);
      beta[i] = pow[C - 1 - i] / sC;
    }
    cross_decay = pow[C];
  }
};

// The decay mask on row i of a score matrix: row[j] *= γ^(i-j) / div for j < n (the mask
// value is one division, as torchscale makes it), returning Σ_j |row[j]| (in 8 interleaved
// partial sums, so the loop vectorizes; forward and backward share it, so they agree).
__attribute__((target_clones("arch=x86-64-v3", "default"))) float mask_row(float* row, const float* decays, float div,
                                                                          int n) {
  float part[8] = {};
  int j = 0;
  for (; j + 8 <= n; j += 8) {
    for (int l = 0; l < 8; l++) {
      row[j + l] *= decays[j + l] / div;
      part[l] += std::fabs(row[j + l]);
    }
  }
  float sum = ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
  for (; j < n; j++) {
    row[j] *= decays[j] / div;
    sum += std::fabs(row[j]);
  }
  return sum;
}

// 1 / sqrt(mean(x²) + eps), the scale of an RMSNorm row (sum of squares in double).
float inverse_rms(const float* x, int n, float eps) {
  double ss = 0;
  for (int j = 0; j < n; j++) ss += static_cast<double>(x[j]) * x[j];
  return 1.0f / std::sqrt(static_cast<float>(ss / n) + eps);
}

inline __attribute__((always_inline)) float dot(const float* a, const float* b, int n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; l++) acc[l] += a[i + l] * b[i + l];
  float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  for (; i < n; i++) s += a[i] * b[i];
  return s;
}

// One head's recurrent update and read-out (spec §6): S = S·keep + (v ⊗ k)/sqrt(s'),
// o = S q. Cloned for AVX2 (x86-64-v3) with a run-time pick: the state is the biggest
// memory stream of a batched decode step.
__attribute__((target_clones("arch=x86-64-v3", "default"))) void recurrent_head_update(
    float* S, const float* q, const float* k, const float* v, float* o, int dk, int dv, float keep, float root_new) {
  // One division per state row, not per element (a vdivps in the inner loop). Its measured
  // gain at batch 16 (1–6 %) is within what this VM's A/B runs resolve.
  const float inv_root = 1.0f / root_new;
  for (int j = 0; j < dv; j++) {
    float* Sj = S + static_cast<size_t>(j) * dk;
    const float vj = v[j] * inv_root;
    for (int i = 0; i < dk; i++) Sj[i] = Sj[i] * keep + k[i] * vj;
    o[j] = dot(q, Sj, dk);
  }
}

// Overwrites x[0..n) with e^(x - max x) and returns max x and the sum of those (in double).
struct ShiftedExp {
  float max;
  double sum;
};
ShiftedExp shifted_exp_generic(float* x, int n) {
  float mx = x[0];
  for (int j = 1; j < n; j++) mx = std::max(mx, x[j]);
  double sum = 0;
  for (int j = 0; j < n; j++) {
    x[j] = std::exp(x[j] - mx);
    sum += x[j];
  }
  return {mx, sum};
}
#ifdef RETNET_X86
__attribute__((target("avx2,fma"))) ShiftedExp shifted_exp_avx2(float* x, int n) {
  int j = 0;
  __m256 vmax = _mm256_set1_ps(x[0]);
  for (; j + 8 <= n; j += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(x + j));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  float mx = *std::max_element(lanes, lanes + 8);
  for (; j < n; j++) mx = std::max(mx, x[j]);
  const __m256 shift = _mm256_set1_ps(mx);
  __m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();
  for (j = 0; j + 8 <= n; j += 8) {
    const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(x + j), shift));
    _mm256_storeu_ps(x + j, e);
    lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
    hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
  }
  alignas(32) double sums[4];
  _mm256_store_pd(sums, _mm256_add_pd(lo, hi));
  double sum = (sums[0] + sums[1]) + (sums[2] + sums[3]);
  for (; j < n; j++) {
    x[j] = std::exp(x[j] - mx);
    sum += x[j];
  }
  return {mx, sum};
}
#endif
ShiftedExp shifted_exp(float* x, int n) {
#ifdef RETNET_X86
  if (cpu_has_avx2_fma()) return shifted_exp_avx2(x, n);
#endif
  return shifted_exp_generic(x, n);
}

// AdamW over n parameters (decoupled decay, bias-corrected moments). The step's scalars are
// copied to locals so the loop vectorizes (they could otherwise alias the arrays).
__attribute__((target_clones("arch=x86-64-v3", "default"))) void adamw_range(float* p, const float* g, float* m,
                                                                             float* v, size_t n, const AdamWStep& s) {
  const float decay = 1.0f - s.lr * s.weight_decay;
  const float step = s.lr / s.bias1, root_bias2 = std::sqrt(s.bias2);
  const float beta1 = s.beta1, beta2 = s.beta2, eps = s.eps, grad_scale = s.grad_scale;
  for (size_t i = 0; i < n; i++) {
    const float gi = g[i] * grad_scale;
    const float mi = beta1 * m[i] + (1.0f - beta1) * gi;
    const float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    p[i] = p[i] * decay - step * mi / (std::sqrt(vi) / root_bias2 + eps);
  }
}

float gelu(float x) { return 0.5f * x * (1.0f + std::erf(x * 0.70710678118654752440f)); }
// out[i] = 1 / (1 + e^-x[i]) for i < n (out may be x): the gate of swish and its derivative.
void sigmoid_generic(const float* x, float* out, size_t n) {
  for (size_t i = 0; i < n; i++) out[i] = 1.0f / (1.0f + std::exp(-x[i]));
}
#ifdef RETNET_X86
__attribute__((target("avx2,fma"))) void sigmoid_avx2(const float* x, float* out, size_t n) {
  const __m256 one = _mm256_set1_ps(1.0f);
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_loadu_ps(x + i)));
    _mm256_storeu_ps(out + i, _mm256_div_ps(one, _mm256_add_ps(one, e)));
  }
  // The tail through the same lanes: where an element falls in a piece of work (which depends
  // on how many rows a call has) must not change its value, or a row's numbers would depend
  // on its batch.
  if (i < n) {
    float in[8] = {}, tail[8];
    std::memcpy(in, x + i, (n - i) * sizeof(float));
    sigmoid_avx2(in, tail, 8);
    std::memcpy(out + i, tail, (n - i) * sizeof(float));
  }
}
#endif
void sigmoid(const float* x, float* out, size_t n) {
#ifdef RETNET_X86
  if (cpu_has_avx2_fma()) return sigmoid_avx2(x, out, n);
#endif
  sigmoid_generic(x, out, n);
}

constexpr size_t kSigmoidBlock = 256;  // gates computed at a time, on the stack

// out[i] = swish(x[i]) · (m[i] · scale) with swish(x) = x σ(x); out may alias x or m.
void swish_mul(const float* x, const float* m, float scale, float* out, size_t n) {
  float sig[kSigmoidBlock];
  for (size_t i0 = 0; i0 < n; i0 += kSigmoidBlock) {
    const size_t len = std::min(kSigmoidBlock, n - i0);
    sigmoid(x + i0, sig, len);
    for (size_t j = 0; j < len; j++) out[i0 + j] = x[i0 + j] * sig[j] * (m[i0 + j] * scale);
  }
}

// κ = max over value columns of the key-summed |KV|, at least 1 (spec §7).
float column_abs_max(const float* KV, int dk, int dv) {
  std::vector<float> col(dv, 0.f);
  for (int e = 0; e < dk; e++)
    for (int j = 0; j < dv; j++) col[j] += std::fabs(KV[static_cast<size_t>(e) * dv + j]);
  float m = 1.0f;
  for (int j = 0; j < dv; j++) m = std::max(m, col[j]);
  return m;
}

// One head's cross-chunk state update over a chunk of `rows` rows (kh, vh point at its
// first row): KV [dk, dv] = KV * Γ + K^T (β ⊙ V).
void absorb_chunk(const float* kh, const float* vh, ptrdiff_t ldq, ptrdiff_t ldv, int rows, int dk, int dv,
                   const ChunkConstants& cc, float* KV, std::vector<float>& scratch) {
  const size_t kv_size = static_cast<size_t>(dk) * dv;
  scratch.resize(static_cast<size_t>(rows) * dv + kv_size);
  float* bv = scratch.data();
  float* kvc = bv + static_cast<size_t>(rows) * dv;
  for (int j = 0; j < rows; j++)
    for (int e = 0; e < dv; e++) bv[static_cast<size_t>(j) * dv + e] = vh[j * ldv + e] * cc.beta[j];
  gemm(dk, dv, rows, MatView{kh, 1, ldq}, row_major(bv, dv), kvc, dv, false);
  for (size_t e = 0; e < kv_size; e++) KV[e] = KV[e] * cc.cross_decay + kvc[e];
}

// The chunk algorithm (spec §7). `recurrent` swaps the chunkwise form's scalars for the
// recurrent form's (spec §6, §10): o_n = u_n / sqrt(s_n), with s_n continuing the state's
// running scale s ← s·γ + 1 in fp32, and no ι or κ.
// Every head's constants for chunks of length C.
std::vector<ChunkConstants> chunk_constants(const float* decay, int H, int C) {
  std::vector<ChunkConstants> consts;
  consts.reserve(H);
  for (int h = 0; h < H; h++) consts.emplace_back(decay[h], C);
  return consts;
}

void chunked_retention(const float* q, const float* k, const float* v, float* o, const RetentionDims& d,
                       const float* decay, int C, float inner_clamp_max, const StateView* state, bool recurrent) {
  const int B = d.B, T = d.T, H = d.H, dk = d.dk, dv = d.dv;
  const ptrdiff_t ldq = static_cast<ptrdiff_t>(H) * dk, ldv = static_cast<ptrdiff_t>(H) * dv;
  C = std::max(1, std::min(C, T));
  const std::vector<ChunkConstants> consts = chunk_constants(decay, H, C);

  constexpr int TILE = 64;
  const int nchunks = (T + C - 1) / C;
  // Cross-chunk state per (b, h): KV [dk, dv] un-normalised, kappa its abs-sum scale (the
  // chunkwise form's; the recurrent form has none). The recurrent form over one chunk (a short
  // prompt) reads a given state where it is instead: its cross term is then γ^(i+1) sqrt(s)
  // q · S^T, with no transposed copy of the whole state per layer.
  const bool direct = recurrent && state && nchunks == 1;
  const size_t BH = static_cast<size_t>(B) * H;
  std::vector<float> kv(direct ? 0 : BH * dk * dv, 0.f), kappa(BH, 1.f);
  bool have_state = false;
  for (size_t bh = 0; state && bh < BH; bh++) {
    const int h = static_cast<int>(bh % H);
    const float s = state->scale[bh];
    if (s <= 0) continue;
    have_state = true;
    if (direct) continue;
    // KV = U^T / S_C with U = S * sqrt(s): the state as if the previous tokens ended a chunk.
    const float mult = std::sqrt(s) / consts[h].total;
    const float* S = state->kv + bh * dv * dk;
    float* KV = kv.data() + bh * dk * dv;
    for (int j = 0; j < dv; j++)
      for (int i = 0; i < dk; i++) KV[i * dv + j] = S[j * dk + i] * mult;
    if (!recurrent) kappa[bh] = column_abs_max(KV, dk, dv);
  }

  // Recurrent form: sqrt of each row's running scale, per (b, h).
  std::vector<float> root_scale(recurrent ? BH * T : 0);
  for (size_t bh = 0; recurrent && bh < BH; bh++) {
    const float gamma = std::exp(decay[bh % H]);
    float s = state->scale[bh];
    for (int t = 0; t < T; t++) {
      s = s * gamma + 1.0f;
      root_scale[bh * T + t] = std::sqrt(s);
    }
  }

  for (int c = 0; c < nchunks; c++) {
    const int c0 = c * C, rows = std::min(C, T - c0);
    const bool use_cross = c > 0 || have_state;
    const int tiles = (rows + TILE - 1) / TILE;
    // Scratch for one tile of at most `tile_rows` rows: a prompt of a few tokens allocates little,
    // and a worker's heap then stays below glibc's trim threshold (trimming it costs page
    // faults and a TLB flush on every call).
    const size_t tile_rows = std::min(TILE, rows);
    parallel_for(BH * tiles, 1, [&](size_t w0, size_t w1) {
      std::vector<float> scores(tile_rows * rows), inner(tile_rows * dv),
          kvn(use_cross && !recurrent ? static_cast<size_t>(dk) * dv : 0), qa(use_cross ? tile_rows * dk : 0),
          cross(use_cross ? tile_rows * dv : 0);
      size_t kvn_for = static_cast<size_t>(-1);
      for (size_t w = w0; w < w1; w++) {
        const size_t bh = w / tiles;
        const int b = static_cast<int>(bh / H), h = static_cast<int>(bh % H);
        const int i0 = static_cast<int>(w % tiles) * TILE, i1 = std::min(rows, i0 + TILE);
        const ChunkConstants& cc = consts[h];
        const size_t row0 = static_cast<size_t>(b) * T + c0;
        const float* qh = q + row0 * ldq + h * dk;
        const float* kh = k + row0 * ldq + h * dk;
        const float* vh = v + row0 * ldv + h * dv;
        // scores[i, j] = q_i . k_j for the tile's rows against columns 0..i1-1.
        const int ncol = i1;
        gemm(i1 - i0, ncol, dk, row_major(qh + i0 * ldq, ldq), transposed(kh, ldq), scores.data(), ncol, false);
        std::vector<float> iota(i1 - i0);
        for (int i = i0; i < i1; i++) {
          float* srow = scores.data() + static_cast<size_t>(i - i0) * ncol;
          for (int j = i + 1; j < ncol; j++) srow[j] = 0.f;
          if (recurrent) {  // plain decay weights; the row is scaled at the end
            mask_row(srow, cc.decays_of_row(i), 1.0f, i + 1);
            continue;
          }
          const float abs_sum = mask_row(srow, cc.decays_of_row(i), cc.sigma[i], i + 1);
          const float io = std::min(std::max(abs_sum, 1.0f), inner_clamp_max);
          for (int j = 0; j <= i; j++) srow[j] /= io;
          iota[i - i0] = io;
        }
        gemm(i1 - i0, dv, ncol, row_major(scores.data(), ncol), row_major(vh, ldv), inner.data(), dv, false);
        if (use_cross && !recurrent && kvn_for != bh) {
          const float* KV = kv.data() + bh * dk * dv;
          for (size_t e = 0; e < static_cast<size_t>(dk) * dv; e++) kvn[e] = KV[e] / kappa[bh];
          kvn_for = bh;
        }
        if (use_cross) {
          // cross = (α ⊙ q) KV/κ for the whole tile in one product; recurrent: γ^(i+1) S_C q · KV,
          // the un-normalised state decayed to row i (direct: γ^(i+1) sqrt(s) q · S^T).
          const float direct_root = direct ? std::sqrt(std::max(state->scale[bh], 0.0f)) : 0.0f;
          for (int i = i0; i < i1; i++) {
            const float* qi = qh + i * ldq;
            float* qai = qa.data() + static_cast<size_t>(i - i0) * dk;
            const float factor = !recurrent ? cc.alpha[i] : cc.pow[i + 1] * (direct ? direct_root : cc.total);
            for (int e = 0; e < dk; e++) qai[e] = qi[e] * factor;
          }
          const MatView cross_state = direct    ? transposed(state->kv + bh * dv * dk, dk)
                                      : recurrent ? row_major(kv.data() + bh * dk * dv, dv)
                                                  : row_major(kvn.data(), dv);
          gemm(i1 - i0, dv, dk, row_major(qa.data(), dk), cross_state, cross.data(), dv, false);
        }
        for (int i = i0; i < i1; i++) {
          float* orow = o + (row0 + i) * ldv + h * dv;
          const float* in = inner.data() + static_cast<size_t>(i - i0) * dv;
          if (recurrent) {
            const float root = root_scale[bh * T + c0 + i];
            const float* cr = cross.data() + static_cast<size_t>(i - i0) * dv;
            for (int j = 0; j < dv; j++) orow[j] = (use_cross ? in[j] + cr[j] : in[j]) / root;
            continue;
          }
          if (!use_cross) {
            std::memcpy(orow, in, dv * sizeof(float));
            continue;
          }
          const float* cr = cross.data() + static_cast<size_t>(i - i0) * dv;
          const float io = iota[i - i0], kap = kappa[bh];
          const float mu = std::max(io, kap);
          const float align_inner = mu / io, align_cross = mu / kap;
          for (int j = 0; j < dv; j++) orow[j] = in[j] / align_inner + cr[j] / align_cross;
        }
      }
    });
    if (c + 1 == nchunks) break;
    // KV = KV * Γ + K_c^T (β ⊙ V_c); κ from the new KV.
    parallel_for(BH, 1, [&](size_t w0, size_t w1) {
      std::vector<float> scratch;
      for (size_t bh = w0; bh < w1; bh++) {
        const int b = static_cast<int>(bh / H), h = static_cast<int>(bh % H);
        const size_t row0 = static_cast<size_t>(b) * T + c0;
        float* KV = kv.data() + bh * dk * dv;
        absorb_chunk(k + row0 * ldq + h * dk, v + row0 * ldv + h * dv, ldq, ldv, rows, dk, dv, consts[h], KV, scratch);
        if (!recurrent) kappa[bh] = column_abs_max(KV, dk, dv);
      }
    });
  }
}

// The small pages wholly inside [p, p + n): [begin, end), empty when there are none.
std::pair<char*, char*> whole_pages(float* p, size_t n) {
  static const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + page - 1) / page * page;
  const uintptr_t end = reinterpret_cast<uintptr_t>(p + n) / page * page;
  return {reinterpret_cast<char*>(begin), reinterpret_cast<char*>(std::max(begin, end))};
}

class CpuOps final : public Ops {
 public:
  const char* name() const override { return "cpu"; }

  float* alloc(size_t n) override {
    const size_t bytes = n * sizeof(float);
    if (bytes < 2 * kHugePage) {
      void* p = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
      if (!p) throw std::bad_alloc();
      std::memset(p, 0, bytes);
      return static_cast<float*>(p);
    }
    // Big buffers (weights, states, activations) are mapped from the kernel on 2 MiB
    // boundaries: they come zero-filled without a memset, so pages nobody writes (the fp32
    // projections of a model loaded with compact weights) never take memory; and they go on
    // 2 MiB pages where the kernel allows, so streaming them costs far fewer TLB misses.
    void* const p = map_huge(bytes);
    if (!p) throw std::bad_alloc();
    std::lock_guard<std::mutex> lock(mapped_mutex_);
    mapped_[p] = huge_mapping_size(bytes);
    return static_cast<float*>(p);
  }
  void release(float* p) override {
    {
      std::lock_guard<std::mutex> lock(mapped_mutex_);
      const auto it = mapped_.find(p);
      if (it != mapped_.end()) {
        munmap(p, it->second);
        mapped_.erase(it);
        return;
      }
    }
    std::free(p);
  }
  void upload(float* dst, const float* src, size_t n) override { std::memcpy(dst, src, n * sizeof(float)); }
  void download(float* dst, const float* src, size_t n) override { std::memcpy(dst, src, n * sizeof(float)); }
  void copy(float* dst, const float* src, size_t n) override { std::memcpy(dst, src, n * sizeof(float)); }
  void fill(float* dst, float value, size_t n) override { std::fill(dst, dst + n, value); }
  void discard(float* p, size_t n) override { discard_host_memory(p, n * sizeof(float)); }
  void drop(float* p, size_t n) override {
#ifdef __linux__
    const auto [begin, end] = whole_pages(p, n);
    if (begin < end && madvise(begin, end - begin, MADV_DONTNEED) == 0) return;
#endif
    discard(p, n);
  }
  void populate(float* p, size_t n) override {
#ifdef MADV_POPULATE_WRITE
    const auto [begin, end] = whole_pages(p, n);
    // A hint: kernels before 5.14 refuse it and the pages fault in as they are written.
    if (begin < end) madvise(begin, end - begin, MADV_POPULATE_WRITE);
#endif
  }

  void linear(int M, int N, int K, const float* X, const float* W, float* Y, bool accumulate,
              Precision precision) override {
    retnet::linear(M, N, K, X, W, Y, accumulate, precision);
  }
  void linear_rowwise(int M, int K, const float* X, const LinearOut* outs, int count) override {
    retnet::linear_rowwise(M, K, X, outs, count);
  }
  bool weights_in_panels() const override { return true; }
  void linear_panels(int M, int N, int K, const float* X, const float* P, float* Y, bool accumulate,
                     Precision precision) override {
    retnet::linear_panels(M, N, K, X, P, Y, accumulate, precision);
  }
  void linear_panels_backward(int M, int N, int K, const float* X, const float* P, const float* dY, float* dX,
                              float* dP, bool accumulate_dx, Precision precision) override {
    retnet::linear_panels_backward(M, N, K, X, P, dY, dX, dP, accumulate_dx, precision);
  }
  void linear_compact(int M, const float* X, const QuantizedMatrix& W, float* Y) override {
    retnet::linear_compact(M, X, W, Y);
  }

  void embed(const int32_t* tokens, int n, const float* E, int D, float scale, float* out) override {
    parallel_for(n, 16, [&](size_t i0, size_t i1) {
      for (size_t i = i0; i < i1; i++) {
        const float* row = E + static_cast<size_t>(tokens[i]) * D;
        float* dst = out + i * D;
        for (int j = 0; j < D; j++) dst[j] = row[j] * scale;
      }
    });
  }

  void rmsnorm(const float* x, const float* w, float* y, int rows, int D, float eps) override {
    parallel_for(rows, 16, [&](size_t r0, size_t r1) {
      for (size_t r = r0; r < r1; r++) {
        const float* xr = x + r * D;
        float* yr = y + r * D;
        const float inv = inverse_rms(xr, D, eps);
        if (w) {
          for (int j = 0; j < D; j++) yr[j] = (xr[j] * inv) * w[j];
        } else {
          for (int j = 0; j < D; j++) yr[j] = xr[j] * inv;
        }
      }
    });
  }

  void residual(float* x, const float* y, size_t n, float alpha) override {
    parallel_for(n, 1 << 14, [&](size_t i0, size_t i1) {
      if (alpha == 1.0f) {
        for (size_t i = i0; i < i1; i++) x[i] += y[i];
      } else {
        for (size_t i = i0; i < i1; i++) x[i] = x[i] * alpha + y[i];
      }
    });
  }

  void rotate_qk(float* q, float* k, const RetentionDims& d, const int64_t* start, const float* angle,
                 float k_scale) override {
    rotate_pairs(q, k, d, start, angle, k_scale, 1.0f);
  }

  void retention_chunked(const float* q, const float* k, const float* v, float* o, const RetentionDims& d,
                         const float* decay, int C, float inner_clamp_max, const StateView* state) override {
    chunked_retention(q, k, v, o, d, decay, C, inner_clamp_max, state, false);
  }

  bool has_chunked_recurrent() const override { return true; }

  void retention_chunked_recurrent(const float* q, const float* k, const float* v, float* o, const RetentionDims& d,
                                   const float* decay, int C, const StateView& state) override {
    chunked_retention(q, k, v, o, d, decay, C, 0.0f, &state, true);
  }

  void retention_absorb(const float* k, const float* v, const RetentionDims& d, const float* decay,
                        StateView state) override {
    const int B = d.B, T = d.T, H = d.H, dk = d.dk, dv = d.dv;
    const ptrdiff_t ldk = static_cast<ptrdiff_t>(H) * dk, ldv = static_cast<ptrdiff_t>(H) * dv;
    constexpr int BLOCK = 256;
    parallel_for(static_cast<size_t>(B) * H, 1, [&](size_t w0, size_t w1) {
      std::vector<float> wv(static_cast<size_t>(std::min(BLOCK, T)) * dv);
      for (size_t bh = w0; bh < w1; bh++) {
        const int b = static_cast<int>(bh / H), h = static_cast<int>(bh % H);
        const float lambda = decay[h], gamma = std::exp(lambda);
        float* S = state.kv + bh * dv * dk;
        float& s = state.scale[bh];
        // S_new = (γ^T sqrt(s) S + Σ_t γ^(T-1-t) v_t ⊗ k_t) / sqrt(s_new), in place: one pass
        // scales S, the product adds the tokens (a short prompt's absorb is these two passes).
        const float root_old = std::sqrt(s);
        for (int t = 0; t < T; t++) s = s * gamma + 1.0f;
        const float inv = 1.0f / std::sqrt(s);
        const float carry = std::exp(lambda * static_cast<float>(T)) * root_old * inv;
        for (size_t e = 0; e < static_cast<size_t>(dv) * dk; e++) S[e] *= carry;
        const float* kh = k + static_cast<size_t>(b) * T * ldk + h * dk;
        const float* vh = v + static_cast<size_t>(b) * T * ldv + h * dv;
        for (int t0 = 0; t0 < T; t0 += BLOCK) {
          const int n = std::min(BLOCK, T - t0);
          for (int t = 0; t < n; t++) {
            const float w = std::exp(lambda * static_cast<float>(T - 1 - (t0 + t))) * inv;
            const float* vt = vh + static_cast<ptrdiff_t>(t0 + t) * ldv;
            for (int j = 0; j < dv; j++) wv[static_cast<size_t>(t) * dv + j] = vt[j] * w;
          }
          gemm(dv, dk, n, MatView{wv.data(), 1, dv}, row_major(kh + t0 * ldk, ldk), S, dk, true);
        }
      }
    });
  }

  void retention_step(const float* q, const float* k, const float* v, float* o, const RetentionDims& d,
                      const float* decay, const StateView* rows) override {
    const int H = d.H, dk = d.dk, dv = d.dv;
    parallel_for(static_cast<size_t>(d.B) * H, 1, [&](size_t w0, size_t w1) {
      for (size_t bh = w0; bh < w1; bh++) {
        const int b = static_cast<int>(bh / H), h = static_cast<int>(bh % H);
        const float gamma = std::exp(decay[h]);
        float& s = rows[b].scale[h];
        const float s_new = s * gamma + 1.0f;
        const float root_new = std::sqrt(s_new);
        const float keep = std::sqrt(s) * gamma / root_new;
        const float* qh = q + static_cast<size_t>(b) * H * dk + h * dk;
        const float* kh = k + static_cast<size_t>(b) * H * dk + h * dk;
        const float* vh = v + static_cast<size_t>(b) * H * dv + h * dv;
        float* oh = o + static_cast<size_t>(b) * H * dv + h * dv;
        recurrent_head_update(rows[b].kv + static_cast<size_t>(h) * dv * dk, qh, kh, vh, oh, dk, dv, keep, root_new);
        s = s_new;
      }
    });
  }

  void groupnorm_gate(const float* o, const float* g, float* z, int rows, int H, int dv, float eps) override {
    const size_t width = static_cast<size_t>(H) * dv;
    parallel_for(rows, 8, [&](size_t r0, size_t r1) {
      for (size_t r = r0; r < r1; r++) {
        for (int h = 0; h < H; h++) {
          const size_t off = r * width + static_cast<size_t>(h) * dv;
          const float inv = inverse_rms(o + off, dv, eps);
          swish_mul(g + off, o + off, inv, z + off, dv);
        }
      }
    });
  }

  void glu(const float* a, const float* b, float* z, size_t n, Activation act) override {
    parallel_for(n, 1 << 12, [&](size_t i0, size_t i1) {
      switch (act) {
        case Activation::Gelu:
          for (size_t i = i0; i < i1; i++) z[i] = gelu(a[i]) * b[i];
          break;
        case Activation::Swish:
          swish_mul(a + i0, b + i0, 1.0f, z + i0, i1 - i0);
          break;
        case Activation::Relu:
          for (size_t i = i0; i < i1; i++) z[i] = std::max(a[i], 0.0f) * b[i];
          break;
      }
    });
  }

  // k *= k_scale and rotate q, k pairs by direction * φ (1: forward, -1: the transpose).
  // sin(-φ) = -sin(φ) exactly, so the transpose uses the same fl32 phase as the forward.
  static void rotate_pairs(float* q, float* k, const RetentionDims& d, const int64_t* start, const float* angle,
                           float k_scale, float direction) {
    const int width = d.H * d.dk;
    parallel_for(static_cast<size_t>(d.B) * d.T, 16, [&](size_t r0, size_t r1) {
      // cos, sin per pair; per thread and kept, so a decode step allocates nothing
      thread_local std::vector<float> cs;
      if (cs.size() < static_cast<size_t>(d.dk)) cs.resize(d.dk);
      for (size_t r = r0; r < r1; r++) {
        const int b = static_cast<int>(r / d.T), t = static_cast<int>(r % d.T);
        const float pos = static_cast<float>(start[b] + t);
        for (int j = 0; j < d.dk / 2; j++) {
          const float phi = pos * angle[2 * j];
          cs[2 * j] = std::cos(phi);
          cs[2 * j + 1] = direction * std::sin(phi);
        }
        float* qr = q + r * width;
        float* kr = k + r * width;
        for (int i = 0; i < width; i++) kr[i] *= k_scale;
        for (int h = 0; h < d.H; h++) {
          for (float* x : {qr + h * d.dk, kr + h * d.dk}) {
            for (int j = 0; j < d.dk / 2; j++) {
              const float c = cs[2 * j], s = cs[2 * j + 1];
              const float x0 = x[2 * j], x1 = x[2 * j + 1];
              x[2 * j] = x0 * c + (-x1) * s;
              x[2 * j + 1] = x1 * c + x0 * s;
            }
          }
        }
      }
    });
  }

  // ---- Training ops.

  void linear_backward(int M, int N, int K, const float* X, const float* W, const float* dY, float* dX, float* dW,
                       bool accumulate_dx, Precision precision) override {
    gemm(M, K, N, row_major(dY, N), row_major(W, K), dX, K, accumulate_dx, precision);
    // dW[N, K] += dY^T X: gemm splits by output tile, so the sum over rows runs in a fixed order.
    gemm(N, K, M, transposed(dY, N), row_major(X, K), dW, K, true, precision);
  }

  void embed_backward(const int32_t* tokens, int n, const float* dout, int D, float scale, float* dE) override {
    // Split over columns: rows sharing a token then add in row order.
    constexpr size_t kCols = 32;
    parallel_for((static_cast<size_t>(D) + kCols - 1) / kCols, 1, [&](size_t b0, size_t b1) {
      const int j0 = static_cast<int>(b0 * kCols), j1 = std::min(D, static_cast<int>(b1 * kCols));
      for (int i = 0; i < n; i++) {
        float* row = dE + static_cast<size_t>(tokens[i]) * D;
        const float* src = dout + static_cast<size_t>(i) * D;
        for (int j = j0; j < j1; j++) row[j] += src[j] * scale;
      }
    });
  }

  void rmsnorm_backward(const float* x, const float* w, const float* dy, float* dx, float* dw, int rows, int D,
                        float eps, bool accumulate_dx) override {
    std::vector<float> inv(rows);
    parallel_for(rows, 64, [&](size_t r0, size_t r1) {
      for (size_t r = r0; r < r1; r++) {
        const float* xr = x + r * D;
        inv[r] = inverse_rms(xr, D, eps);
      }
    });
    // dw[j] += Σ_r dy[r, j] n[r, j] before dx overwrites a dy it may alias; columns split
    // across threads, rows summed in order.
    parallel_for(D, 64, [&](size_t j0, size_t j1) {
      for (int r = 0; r < rows; r++) {
        const float* xr = x + static_cast<size_t>(r) * D;
        const float* dyr = dy + static_cast<size_t>(r) * D;
        for (size_t j = j0; j < j1; j++) dw[j] += dyr[j] * (xr[j] * inv[r]);
      }
    });
    // dx = inv * (dn - n * mean(dn * n)) with dn = dy * w, n = x * inv.
    parallel_for(rows, 16, [&](size_t r0, size_t r1) {
      for (size_t r = r0; r < r1; r++) {
        const float* xr = x + r * D;
        const float* dyr = dy + r * D;
        float* dxr = dx + r * D;
        const float rinv = inv[r];
        double dot = 0;
        for (int j = 0; j < D; j++) dot += static_cast<double>(dyr[j] * w[j]) * (xr[j] * rinv);
        const float mean = static_cast<float>(dot / D);
        for (int j = 0; j < D; j++) {
          const float g = rinv * (dyr[j] * w[j] - (xr[j] * rinv) * mean);
          dxr[j] = accumulate_dx ? dxr[j] + g : g;
        }
      }
    });
  }

  void rotate_qk_backward(float* dq, float* dk, const RetentionDims& d, const int64_t* start, const float* angle,
                          float k_scale) override {
    rotate_pairs(dq, dk, d, start, angle, k_scale, -1.0f);
  }

  void retention_chunked_backward(const float* q, const float* k, const float* v, const float* d_o, float* dq,
                                  float* dk, float* dv, const RetentionDims& d, const float* decay, int C,
                                  float inner_clamp_max) override {
    const int B = d.B, T = d.T, H = d.H, dk_ = d.dk, dv_ = d.dv;
    const ptrdiff_t ldq = static_cast<ptrdiff_t>(H) * dk_, ldv = static_cast<ptrdiff_t>(H) * dv_;
    C = std::max(1, std::min(C, T));
    const std::vector<ChunkConstants> consts = chunk_constants(decay, H, C);
    const int nchunks = (T + C - 1) / C;
    const size_t kv_size = static_cast<size_t>(dk_) * dv_;
    // Each (b, h) is independent and owns its head's columns of dq, dk, dv.
    parallel_for(static_cast<size_t>(B) * H, 1, [&](size_t w0, size_t w1) {
      std::vector<float> kv_in(nchunks * kv_size), kappa(nchunks), scratch;
      std::vector<float> A(static_cast<size_t>(C) * C), dS(static_cast<size_t>(C) * C);
      std::vector<float> dOs(static_cast<size_t>(C) * dv_), tmp(static_cast<size_t>(C) * dv_), G(kv_size),
          dKV(kv_size), mu(C);
      for (size_t bh = w0; bh < w1; bh++) {
        const int b = static_cast<int>(bh / H), h = static_cast<int>(bh % H);
        const ChunkConstants& cc = consts[h];
        const size_t base = static_cast<size_t>(b) * T;
        // Forward sweep: the state entering each chunk and its κ, as the forward made them.
        std::fill(kv_in.begin(), kv_in.begin() + kv_size, 0.f);
        kappa[0] = 1.f;
        for (int c = 0; c + 1 < nchunks; c++) {
          float* next = kv_in.data() + (c + 1) * kv_size;
          std::copy(kv_in.begin() + c * kv_size, kv_in.begin() + (c + 1) * kv_size, next);
          const size_t row0 = base + static_cast<size_t>(c) * C;
          absorb_chunk(k + row0 * ldq + h * dk_, v + row0 * ldv + h * dv_, ldq, ldv, C, dk_, dv_, cc, next, scratch);
          kappa[c + 1] = column_abs_max(next, dk_, dv_);
        }
        // Reverse sweep; G = dLoss/dKV of the state leaving the chunk being processed.
        std::fill(G.begin(), G.end(), 0.f);
        for (int c = nchunks - 1; c >= 0; c--) {
          const int c0 = c * C, rows = std::min(C, T - c0);
          const size_t row0 = base + c0;
          const float* qh = q + row0 * ldq + h * dk_;
          const float* kh = k + row0 * ldq + h * dk_;
          const float* vh = v + row0 * ldv + h * dv_;
          const float* doh = d_o + row0 * ldv + h * dv_;
          float* dqh = dq + row0 * ldq + h * dk_;
          float* dkh = dk + row0 * ldq + h * dk_;
          float* dvh = dv + row0 * ldv + h * dv_;
          const bool use_cross = c > 0;
          const float* KV = kv_in.data() + c * kv_size;
          // A = (Q K^T) ⊙ M̃ (causal), and the detached row scale 1/μ_i.
          gemm(rows, rows, dk_, row_major(qh, ldq), transposed(kh, ldq), A.data(), rows, false);
          for (int i = 0; i < rows; i++) {
            float* arow = A.data() + static_cast<size_t>(i) * rows;
            const float abs_sum = mask_row(arow, cc.decays_of_row(i), cc.sigma[i], i + 1);
            for (int j = i + 1; j < rows; j++) arow[j] = 0.f;
            const float iota = std::min(std::max(abs_sum, 1.0f), inner_clamp_max);
            mu[i] = use_cross ? std::max(iota, kappa[c]) : iota;
          }
          // o_i = (Σ_j A_ij v_j + α_i q_i^T KV) / μ_i, so dO' = dO / μ carries both terms.
          for (int i = 0; i < rows; i++)
            for (int e = 0; e < dv_; e++) dOs[static_cast<size_t>(i) * dv_ + e] = doh[i * ldv + e] / mu[i];
          // dV = A^T dO';  dS = (dO' V^T) ⊙ M̃;  dQ = dS K;  dK = dS^T Q.
          gemm(rows, dv_, rows, transposed(A.data(), rows), row_major(dOs.data(), dv_), dvh, ldv, false);
          gemm(rows, rows, dv_, row_major(dOs.data(), dv_), transposed(vh, ldv), dS.data(), rows, false);
          for (int i = 0; i < rows; i++) {
            float* srow = dS.data() + static_cast<size_t>(i) * rows;
            mask_row(srow, cc.decays_of_row(i), cc.sigma[i], i + 1);
            for (int j = i + 1; j < rows; j++) srow[j] = 0.f;
          }
          gemm(rows, dk_, rows, row_major(dS.data(), rows), row_major(kh, ldq), dqh, ldq, false);
          gemm(rows, dk_, rows, transposed(dS.data(), rows), row_major(qh, ldq), dkh, ldq, false);
          if (c + 1 < nchunks) {
            // The state update KV' = KV Γ + Σ_j k_j ⊗ β_j v_j: dk_j += β_j G v_j, dv_j += β_j G^T k_j.
            for (int j = 0; j < rows; j++)
              for (int e = 0; e < dv_; e++) tmp[static_cast<size_t>(j) * dv_ + e] = vh[j * ldv + e] * cc.beta[j];
            gemm(rows, dk_, dv_, row_major(tmp.data(), dv_), transposed(G.data(), dv_), dkh, ldq, true);
            gemm(rows, dv_, dk_, row_major(kh, ldq), row_major(G.data(), dv_), tmp.data(), dv_, false);
            for (int j = 0; j < rows; j++)
              for (int e = 0; e < dv_; e++) dvh[j * ldv + e] += tmp[static_cast<size_t>(j) * dv_ + e] * cc.beta[j];
          }
          if (use_cross) {
            // Cross term α_i q_i^T KV / μ_i: dq_i += α_i KV dO'_i, dKV += Σ_i α_i q_i ⊗ dO'_i.
            for (int i = 0; i < rows; i++)
              for (int e = 0; e < dv_; e++) tmp[static_cast<size_t>(i) * dv_ + e] = dOs[static_cast<size_t>(i) * dv_ + e] * cc.alpha[i];
            gemm(rows, dk_, dv_, row_major(tmp.data(), dv_), transposed(KV, dv_), dqh, ldq, true);
            gemm(dk_, dv_, rows, transposed(qh, ldq), row_major(tmp.data(), dv_), dKV.data(), dv_, false);
            for (size_t e = 0; e < kv_size; e++) G[e] = G[e] * cc.cross_decay + dKV[e];
          }
        }
      }
    });
  }

  void groupnorm_gate_backward(const float* o, const float* g, const float* dz, float* d_o, float* dg, int rows, int H,
                               int dv, float eps) override {
    const size_t width = static_cast<size_t>(H) * dv;
    parallel_for(rows, 8, [&](size_t r0, size_t r1) {
      std::vector<float> sigma_g(dv);  // training only: one buffer per piece
      for (size_t r = r0; r < r1; r++) {
        for (int h = 0; h < H; h++) {
          const size_t off = r * width + static_cast<size_t>(h) * dv;
          const float inv = inverse_rms(o + off, dv, eps);
          // z = swish(g) n with n = o * inv: dg = dz n swish'(g); dn = dz swish(g).
          sigmoid(g + off, sigma_g.data(), dv);
          double dot = 0;
          for (int j = 0; j < dv; j++) {
            const float x = g[off + j], sig = sigma_g[j];
            const float n = o[off + j] * inv;
            dg[off + j] = dz[off + j] * n * (sig * (1.0f + x * (1.0f - sig)));
            dot += static_cast<double>(dz[off + j] * x * sig) * n;
          }
          const float mean = static_cast<float>(dot / dv);
          for (int j = 0; j < dv; j++) {
            const float x = g[off + j], sig = sigma_g[j];
            d_o[off + j] = inv * (dz[off + j] * x * sig - (o[off + j] * inv) * mean);
          }
        }
      }
    });
  }

  void glu_backward(const float* a, const float* b, const float* dz, float* da, float* db, size_t n,
                    Activation act) override {
    parallel_for(n, 1 << 12, [&](size_t i0, size_t i1) {
      float sig[kSigmoidBlock];
      for (size_t i = i0; i < i1; i++) {
        if (act == Activation::Swish && (i - i0) % kSigmoidBlock == 0) sigmoid(a + i, sig, std::min(kSigmoidBlock, i1 - i));
        const float x = a[i];
        float f, df;
        switch (act) {
          case Activation::Gelu: {
            const float cdf = 0.5f * (1.0f + std::erf(x * 0.70710678118654752440f));
            f = x * cdf;
            df = cdf + x * 0.39894228040143267794f * std::exp(-0.5f * x * x);
            break;
          }
          case Activation::Swish: {
            const float sg = sig[(i - i0) % kSigmoidBlock];
            f = x * sg;
            df = sg * (1.0f + x * (1.0f - sg));
            break;
          }
          default:
            f = std::max(x, 0.0f);
            df = x > 0 ? 1.0f : 0.0f;
            break;
        }
        da[i] = dz[i] * b[i] * df;
        db[i] = dz[i] * f;
      }
    });
  }

  void softmax_cross_entropy(float* logits, const int32_t* targets, const float* weights, int rows, int V,
                             float* row_loss) override {
    parallel_for(rows, 4, [&](size_t r0, size_t r1) {
      for (size_t r = r0; r < r1; r++) {
        float* x = logits + r * V;
        const float w = weights[r];
        const int target = targets[r];
        if (target < 0 || w == 0.0f) {
          std::fill(x, x + V, 0.0f);
          row_loss[r] = 0.0f;
          continue;
        }
        const float target_logit = x[target];
        const ShiftedExp e = shifted_exp(x, V);
        row_loss[r] = static_cast<float>(e.max + std::log(e.sum) - target_logit);
        // The gradient is w (softmax - one-hot); softmax = e^(x - max) / sum.
        const float scale = static_cast<float>(w / e.sum);
        for (int j = 0; j < V; j++) x[j] *= scale;
        x[target] -= w;
      }
    });
  }

  void dropout(float* x, size_t n, float p, uint64_t seed) override {
    const float keep_scale = 1.0f / (1.0f - p);
    parallel_for(n, 1 << 14, [&](size_t i0, size_t i1) {
      for (size_t i = i0; i < i1; i++) x[i] = uniform01(seed, i) < p ? 0.0f : x[i] * keep_scale;
    });
  }

  void drop_path(float* x, int samples, size_t per_sample, float p, uint64_t seed) override {
    const float keep_scale = 1.0f / (1.0f - p);
    for (int b = 0; b < samples; b++) {
      const float factor = uniform01(seed, b) < p ? 0.0f : keep_scale;
      float* xs = x + static_cast<size_t>(b) * per_sample;
      parallel_for(per_sample, 1 << 14, [&](size_t i0, size_t i1) {
        for (size_t i = i0; i < i1; i++) xs[i] *= factor;
      });
    }
  }

  double sum_squares(const float* x, size_t n) override {
    constexpr size_t kBlock = 1 << 16;
    const size_t blocks = (n + kBlock - 1) / kBlock;
    std::vector<double> partial(blocks, 0.0);
    parallel_for(blocks, 1, [&](size_t b0, size_t b1) {
      for (size_t blk = b0; blk < b1; blk++) {
        double s = 0;
        for (size_t i = blk * kBlock, end = std::min(n, i + kBlock); i < end; i++) s += static_cast<double>(x[i]) * x[i];
        partial[blk] = s;
      }
    });
    double total = 0;
    for (double s : partial) total += s;
    return total;
  }

  bool all_finite(const float* x, size_t n) override {
    constexpr size_t kBlock = 1 << 16;
    std::atomic<bool> finite{true};
    parallel_for((n + kBlock - 1) / kBlock, 1, [&](size_t b0, size_t b1) {
      const size_t i0 = b0 * kBlock, i1 = std::min(n, b1 * kBlock);
      if (!retnet::all_finite(x + i0, i1 - i0)) finite = false;
    });
    return finite;
  }

  void adamw(float* p, const float* g, float* m, float* v, size_t n, const AdamWStep& s) override {
    parallel_for(n, 1 << 14, [&](size_t i0, size_t i1) { adamw_range(p + i0, g + i0, m + i0, v + i0, i1 - i0, s); });
  }

 private:
  std::mutex mapped_mutex_;
  std::unordered_map<void*, size_t> mapped_;  // alloc's mappings and their lengths
};

}  // namespace

bool all_finite(const float* p, size_t n) {
  uint32_t non_finite = 0;
  for (size_t i = 0; i < n; i++) {
    uint32_t bits;
    std::memcpy(&bits, p + i, sizeof bits);
    non_finite |= static_cast<uint32_t>((bits & 0x7f800000u) == 0x7f800000u);
  }
  return non_finite == 0;
}

void discard_host_memory(void* p, size_t bytes) {
  if (bytes == 0) return;
  // Whole 2 MiB pages only: releasing part of a huge page splits it, and that range then
  // faults back in as small pages (slower faults, more TLB misses) for good.
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  char* const begin = static_cast<char*>(p);
  char* const end = begin + bytes;
  char* const first = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(begin) + kHuge - 1) / kHuge * kHuge);
  char* const last = reinterpret_cast<char*>(reinterpret_cast<uintptr_t>(end) / kHuge * kHuge);
  // Linux's MADV_DONTNEED on private anonymous memory guarantees zero-filled pages on the
  // next touch; other systems only promise that the contents may be dropped.
#ifdef __linux__
  const bool released = first < last && madvise(first, last - first, MADV_DONTNEED) == 0;
#else
  const bool released = false;
#endif
  if (!released) {
    std::memset(begin, 0, bytes);
    return;
  }
  std::memset(begin, 0, first - begin);
  std::memset(last, 0, end - last);
}

std::unique_ptr<Ops> make_cpu_ops() { return std::make_unique<CpuOps>(); }

}  // namespace retnet
