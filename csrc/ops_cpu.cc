// CPU backend: fused passes parallelised over rows with the thread pool; matrix
// products go through gemm.cc. Floating-point order follows torchscale where the
// spec calls it out (mask values, normaliser order, the recurrent update).
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <vector>

#include "gemm.h"
#include "ops.h"
#include "threadpool.h"

namespace retnet {
namespace {

// Per-head constants of a chunk of length C (spec §7), in float32 as torchscale makes them.
struct ChunkConstants {
  std::vector<float> pow;    // pow[k] = exp(λ k), k = 0..C
  std::vector<float> sigma;  // σ_i = sqrt(ρ_i)
  std::vector<float> alpha;  // query_inner_decay α_i
  std::vector<float> beta;   // value_inner_decay β_j
  float cross_decay = 0;     // Γ = exp(λ C)
  float total = 0;           // S_C = ρ_{C-1}

  ChunkConstants(float lambda, int C) : pow(C + 1), sigma(C), alpha(C), beta(C) {
    for (int k = 0; k <= C; k++) pow[k] = std::exp(lambda * static_cast<float>(k));
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

float dot(const float* a, const float* b, int n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; l++) acc[l] += a[i + l] * b[i + l];
  float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  for (; i < n; i++) s += a[i] * b[i];
  return s;
}

float gelu(float x) { return 0.5f * x * (1.0f + std::erf(x * 0.70710678118654752440f)); }
float swish(float x) { return x / (1.0f + std::exp(-x)); }

class CpuOps final : public Ops {
 public:
  const char* name() const override { return "cpu"; }

  float* alloc(size_t n) override {
    void* p = std::aligned_alloc(64, ((n * sizeof(float)) + 63) / 64 * 64);
    if (!p) throw std::bad_alloc();
    std::memset(p, 0, n * sizeof(float));
    return static_cast<float*>(p);
  }
  void release(float* p) override { std::free(p); }
  void upload(float* dst, const float* src, size_t n) override { std::memcpy(dst, src, n * sizeof(float)); }
  void download(float* dst, const float* src, size_t n) override { std::memcpy(dst, src, n * sizeof(float)); }
  void fill(float* dst, float value, size_t n) override { std::fill(dst, dst + n, value); }

  void linear(int M, int N, int K, const float* X, const float* W, float* Y, bool accumulate) override {
    retnet::linear(M, N, K, X, W, Y, accumulate);
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
        double ss = 0;
        for (int j = 0; j < D; j++) ss += static_cast<double>(xr[j]) * xr[j];
        const float inv = 1.0f / std::sqrt(static_cast<float>(ss / D) + eps);
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
    const int width = d.H * d.dk;
    parallel_for(static_cast<size_t>(d.B) * d.T, 16, [&](size_t r0, size_t r1) {
      std::vector<float> cs(d.dk);  // cos, sin per pair
      for (size_t r = r0; r < r1; r++) {
        const int b = static_cast<int>(r / d.T), t = static_cast<int>(r % d.T);
        const float pos = static_cast<float>(start[b] + t);
        for (int j = 0; j < d.dk / 2; j++) {
          const float phi = pos * angle[2 * j];
          cs[2 * j] = std::cos(phi);
          cs[2 * j + 1] = std::sin(phi);
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

  void retention_chunked(const float* q, const float* k, const float* v, float* o, const RetentionDims& d,
                         const float* decay, int C, float inner_clamp_max, const StateView* state) override {
    const int B = d.B, T = d.T, H = d.H, dk = d.dk, dv = d.dv;
    const ptrdiff_t ldq = static_cast<ptrdiff_t>(H) * dk, ldv = static_cast<ptrdiff_t>(H) * dv;
    C = std::max(1, std::min(C, T));
    std::vector<ChunkConstants> consts;
    consts.reserve(H);
    for (int h = 0; h < H; h++) consts.emplace_back(decay[h], C);

    // Cross-chunk state per (b, h): KV [dk, dv] un-normalised, kappa its abs-sum scale.
    const size_t BH = static_cast<size_t>(B) * H;
    std::vector<float> kv(BH * dk * dv, 0.f), kappa(BH, 1.f);
    bool have_state = false;
    if (state) {
      // KV = U^T / S_C with U = S * sqrt(s): the state as if the previous tokens ended a chunk.
      for (size_t bh = 0; bh < BH; bh++) {
        const int h = static_cast<int>(bh % H);
        const float s = state->scale[bh];
        if (s <= 0) continue;
        const float mult = std::sqrt(s) / consts[h].total;
        const float* S = state->kv + bh * dv * dk;
        float* KV = kv.data() + bh * dk * dv;
        for (int j = 0; j < dv; j++)
          for (int i = 0; i < dk; i++) KV[i * dv + j] = S[j * dk + i] * mult;
        kappa[bh] = column_abs_max(KV, dk, dv);
        have_state = true;
      }
    }

    constexpr int TILE = 64;
    const int nchunks = (T + C - 1) / C;
    for (int c = 0; c < nchunks; c++) {
      const int c0 = c * C, rows = std::min(C, T - c0);
      const bool use_cross = c > 0 || have_state;
      const int tiles = (rows + TILE - 1) / TILE;
      parallel_for(BH * tiles, 1, [&](size_t w0, size_t w1) {
        std::vector<float> scores(static_cast<size_t>(TILE) * rows), inner(static_cast<size_t>(TILE) * dv),
            kvn(use_cross ? static_cast<size_t>(dk) * dv : 0), qa(dk);
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
            float abs_sum = 0;
            for (int j = 0; j <= i; j++) {
              const float mask = cc.pow[i - j] / cc.sigma[i];
              srow[j] *= mask;
              abs_sum += std::fabs(srow[j]);
            }
            const float io = std::min(std::max(abs_sum, 1.0f), inner_clamp_max);
            for (int j = 0; j <= i; j++) srow[j] /= io;
            for (int j = i + 1; j < ncol; j++) srow[j] = 0.f;
            iota[i - i0] = io;
          }
          gemm(i1 - i0, dv, ncol, row_major(scores.data(), ncol), row_major(vh, ldv), inner.data(), dv, false);
          if (use_cross && kvn_for != bh) {
            const float* KV = kv.data() + bh * dk * dv;
            const float kap = kappa[bh];
            for (size_t e = 0; e < static_cast<size_t>(dk) * dv; e++) kvn[e] = KV[e] / kap;
            kvn_for = bh;
          }
          for (int i = i0; i < i1; i++) {
            float* orow = o + (row0 + i) * ldv + h * dv;
            const float* in = inner.data() + static_cast<size_t>(i - i0) * dv;
            if (!use_cross) {
              std::memcpy(orow, in, dv * sizeof(float));
              continue;
            }
            const float* qi = qh + i * ldq;
            for (int e = 0; e < dk; e++) qa[e] = qi[e] * cc.alpha[i];
            const float io = iota[i - i0], kap = kappa[bh];
            const float mu = std::max(io, kap);
            const float align_inner = mu / io, align_cross = mu / kap;
            for (int j = 0; j < dv; j++) orow[j] = 0.f;
            for (int e = 0; e < dk; e++) {
              const float a = qa[e];
              const float* kvrow = kvn.data() + static_cast<size_t>(e) * dv;
              for (int j = 0; j < dv; j++) orow[j] += a * kvrow[j];
            }
            for (int j = 0; j < dv; j++) orow[j] = in[j] / align_inner + orow[j] / align_cross;
          }
        }
      });
      if (c + 1 == nchunks) break;
      // KV = KV * Γ + K_c^T (β ⊙ V_c); κ from the new KV.
      parallel_for(BH, 1, [&](size_t w0, size_t w1) {
        std::vector<float> bv(static_cast<size_t>(rows) * dv), kvc(static_cast<size_t>(dk) * dv);
        for (size_t bh = w0; bh < w1; bh++) {
          const int b = static_cast<int>(bh / H), h = static_cast<int>(bh % H);
          const ChunkConstants& cc = consts[h];
          const size_t row0 = static_cast<size_t>(b) * T + c0;
          const float* kh = k + row0 * ldq + h * dk;
          const float* vh = v + row0 * ldv + h * dv;
          for (int j = 0; j < rows; j++)
            for (int e = 0; e < dv; e++) bv[static_cast<size_t>(j) * dv + e] = vh[j * ldv + e] * cc.beta[j];
          gemm(dk, dv, rows, MatView{kh, 1, ldq}, row_major(bv.data(), dv), kvc.data(), dv, false);
          float* KV = kv.data() + bh * dk * dv;
          for (size_t e = 0; e < static_cast<size_t>(dk) * dv; e++) KV[e] = KV[e] * cc.cross_decay + kvc[e];
          kappa[bh] = column_abs_max(KV, dk, dv);
        }
      });
    }
  }

  void retention_absorb(const float* k, const float* v, const RetentionDims& d, const float* decay,
                        StateView state) override {
    const int B = d.B, T = d.T, H = d.H, dk = d.dk, dv = d.dv;
    const ptrdiff_t ldk = static_cast<ptrdiff_t>(H) * dk, ldv = static_cast<ptrdiff_t>(H) * dv;
    constexpr int BLOCK = 256;
    parallel_for(static_cast<size_t>(B) * H, 1, [&](size_t w0, size_t w1) {
      std::vector<float> wv(static_cast<size_t>(BLOCK) * dv), U(static_cast<size_t>(dv) * dk);
      for (size_t bh = w0; bh < w1; bh++) {
        const int b = static_cast<int>(bh / H), h = static_cast<int>(bh % H);
        const float lambda = decay[h], gamma = std::exp(lambda);
        float* S = state.kv + bh * dv * dk;
        float& s = state.scale[bh];
        // U = γ^T S sqrt(s) + Σ_t γ^(T-1-t) v_t ⊗ k_t, then S = U / sqrt(s_new).
        const float carry = std::exp(lambda * static_cast<float>(T)) * std::sqrt(s);
        for (size_t e = 0; e < U.size(); e++) U[e] = S[e] * carry;
        const float* kh = k + static_cast<size_t>(b) * T * ldk + h * dk;
        const float* vh = v + static_cast<size_t>(b) * T * ldv + h * dv;
        for (int t0 = 0; t0 < T; t0 += BLOCK) {
          const int n = std::min(BLOCK, T - t0);
          for (int t = 0; t < n; t++) {
            const float w = std::exp(lambda * static_cast<float>(T - 1 - (t0 + t)));
            const float* vt = vh + static_cast<ptrdiff_t>(t0 + t) * ldv;
            for (int j = 0; j < dv; j++) wv[static_cast<size_t>(t) * dv + j] = vt[j] * w;
          }
          gemm(dv, dk, n, MatView{wv.data(), 1, dv}, row_major(kh + t0 * ldk, ldk), U.data(), dk, true);
        }
        for (int t = 0; t < T; t++) s = s * gamma + 1.0f;
        const float inv = 1.0f / std::sqrt(s);
        for (size_t e = 0; e < U.size(); e++) S[e] = U[e] * inv;
      }
    });
  }

  void retention_step(const float* q, const float* k, const float* v, float* o, const RetentionDims& d,
                      const float* decay, StateView state) override {
    const int H = d.H, dk = d.dk, dv = d.dv;
    parallel_for(static_cast<size_t>(d.B) * H, 1, [&](size_t w0, size_t w1) {
      for (size_t bh = w0; bh < w1; bh++) {
        const int b = static_cast<int>(bh / H), h = static_cast<int>(bh % H);
        const float gamma = std::exp(decay[h]);
        float& s = state.scale[bh];
        const float s_new = s * gamma + 1.0f;
        const float root_new = std::sqrt(s_new);
        const float keep = std::sqrt(s) * gamma / root_new;
        const float* qh = q + static_cast<size_t>(b) * H * dk + h * dk;
        const float* kh = k + static_cast<size_t>(b) * H * dk + h * dk;
        const float* vh = v + static_cast<size_t>(b) * H * dv + h * dv;
        float* oh = o + static_cast<size_t>(b) * H * dv + h * dv;
        float* S = state.kv + bh * dv * dk;
        for (int j = 0; j < dv; j++) {
          float* Sj = S + static_cast<size_t>(j) * dk;
          const float vj = vh[j];
          for (int i = 0; i < dk; i++) Sj[i] = Sj[i] * keep + (kh[i] * vj) / root_new;
          oh[j] = dot(qh, Sj, dk);
        }
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
          double ss = 0;
          for (int j = 0; j < dv; j++) ss += static_cast<double>(o[off + j]) * o[off + j];
          const float inv = 1.0f / std::sqrt(static_cast<float>(ss / dv) + eps);
          for (int j = 0; j < dv; j++) z[off + j] = swish(g[off + j]) * (o[off + j] * inv);
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
          for (size_t i = i0; i < i1; i++) z[i] = swish(a[i]) * b[i];
          break;
        case Activation::Relu:
          for (size_t i = i0; i < i1; i++) z[i] = std::max(a[i], 0.0f) * b[i];
          break;
      }
    });
  }

 private:
  // κ = max over value columns of the key-summed |KV|, at least 1 (spec §7).
  static float column_abs_max(const float* KV, int dk, int dv) {
    std::vector<float> col(dv, 0.f);
    for (int e = 0; e < dk; e++)
      for (int j = 0; j < dv; j++) col[j] += std::fabs(KV[static_cast<size_t>(e) * dv + j]);
    float m = 1.0f;
    for (int j = 0; j < dv; j++) m = std::max(m, col[j]);
    return m;
  }
};

}  // namespace

std::unique_ptr<Ops> make_cpu_ops() { return std::make_unique<CpuOps>(); }

}  // namespace retnet
