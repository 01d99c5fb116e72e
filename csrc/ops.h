// The op interface the model is written over. A backend (CPU here, CUDA in cuda/)
// implements each op; pointers are the backend's own memory. Ops are whole fused
// passes (a norm, a rotation, a retention core), never per-element calls.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>

#include "gemm.h"

namespace retnet {

enum class Activation { Gelu, Swish, Relu };

// Upper clamp of the parallel form's row normaliser c_n (spec §5).
constexpr float kParallelClampMax = 5e4f;

// One AdamW update (torch.optim.AdamW): bias1/bias2 are 1 - beta^step; grads are
// multiplied by grad_scale first (global-norm clipping).
struct AdamWStep {
  float lr, beta1, beta2, eps, weight_decay, bias1, bias2, grad_scale;
};

// Geometry of a batch of token rows laid out [B, T, H, d] (row = b*T + t).
struct RetentionDims {
  int B, T, H, dk, dv;
};

// A recurrent state in torchscale's layout: kv [B, H, dv, dk] holds S (already divided
// by sqrt(scale)), scale [B, H] holds s. torchscale keeps one scale per head; we keep
// one per row so rows at different positions can share a decode batch.
struct StateView {
  float* kv;
  float* scale;
};

// Whether the n host floats at p are all finite; no early exit, so the loop vectorizes.
bool all_finite(const float* p, size_t n);

class Ops {
 public:
  virtual ~Ops() = default;
  virtual const char* name() const = 0;

  // Backend memory (zero-filled) and transfers from/to host memory.
  virtual float* alloc(size_t n) = 0;
  virtual void release(float* p) = 0;
  virtual void upload(float* dst, const float* src, size_t n) = 0;
  virtual void download(float* dst, const float* src, size_t n) = 0;
  // Backend memory to backend memory (non-overlapping).
  virtual void copy(float* dst, const float* src, size_t n) = 0;
  virtual void fill(float* dst, float value, size_t n) = 0;
  // Sets [p, p+n) to zero for a buffer whose values are done with for now (gradients after
  // an update, a layer's activations after its backward). The CPU backend hands its whole
  // pages back to the system, so they stop counting towards the peak resident set until
  // next written (they come back zeroed).
  virtual void discard(float* p, size_t n) = 0;
  // Hands [p, p+n)'s memory back for good: its values are never read again (a weight that
  // was converted to a compact format). The CPU backend releases every whole small page in
  // it, splitting huge pages at the edges.
  virtual void drop(float* p, size_t n) { discard(p, n); }
  // Backs [p, p+n) with memory now, values unchanged: a discarded buffer about to be written
  // comes back in one pass instead of a page fault at a time inside the kernels writing it.
  virtual void populate(float* p, size_t n) {}

  // Y[M, N] (=|+=) X[M, K] W[N, K]^T, with X and W rounded to `precision` (BF16: the CPU only).
  virtual void linear(int M, int N, int K, const float* X, const float* W, float* Y, bool accumulate,
                      Precision precision) = 0;
  // Y_i[M, N_i] = X[M, K] W_i[N_i, K]^T for each product of the group (one pass over all
  // weights), with every row's result independent of M (batch-invariant), for decode steps:
  // a sequence decodes to the same tokens alone or in a batch.
  virtual void linear_rowwise(int M, int K, const float* X, const LinearOut* outs, int count) = 0;
  // Whether this backend keeps the projection weights of its parameter arena in panels
  // (panels.h; the CPU does): then linear_panels and linear_panels_backward take them, and the
  // arena's copies to and from rows go through to_panels / from_panels on host memory.
  virtual bool weights_in_panels() const { return false; }
  // linear and linear_backward (below) for a weight P stored in panels.
  virtual void linear_panels(int M, int N, int K, const float* X, const float* P, float* Y, bool accumulate,
                             Precision precision) {
    throw std::logic_error(std::string(name()) + " has no weights in panels");
  }
  virtual void linear_panels_backward(int M, int N, int K, const float* X, const float* P, const float* dY, float* dX,
                                      float* dP, bool accumulate_dx, Precision precision) {
    throw std::logic_error(std::string(name()) + " has no weights in panels");
  }
  // Y[M, N] = X[M, K] Wq[N, K]^T for a compact weight (see quant.h); only the CPU has them.
  virtual void linear_compact(int M, const float* X, const QuantizedMatrix& W, float* Y) {
    throw std::logic_error(std::string(name()) + " has no compact weights");
  }
  // out[i, :] = E[tokens[i], :] * scale. tokens are host memory, already range-checked.
  virtual void embed(const int32_t* tokens, int n, const float* E, int D, float scale, float* out) = 0;
  // y = x / sqrt(mean(x^2) + eps) (* w when w is not null), per row of D. y may alias x.
  virtual void rmsnorm(const float* x, const float* w, float* y, int rows, int D, float eps) = 0;
  // x = alpha * x + y.
  virtual void residual(float* x, const float* y, size_t n, float alpha) = 0;
  // k *= k_scale, then rotate q and k in interleaved pairs by fl32(pos * angle[2j]),
  // pos = start[b] + t for row (b, t). start is host memory [B].
  virtual void rotate_qk(float* q, float* k, const RetentionDims& d, const int64_t* start, const float* angle,
                         float k_scale) = 0;
  // Chunkwise retention core (spec §7) over chunks of C rows starting at each row's t = 0.
  // The parallel form is this with C = T and inner_clamp_max = 5e4. When `state` is given,
  // the cross-chunk state starts from it (a prompt continuing a session); it is only read.
  virtual void retention_chunked(const float* q, const float* k, const float* v, float* o, const RetentionDims& d,
                                 const float* decay, int C, float inner_clamp_max, const StateView* state) = 0;
  // The recurrent form's outputs (spec §6: o_n = S_n q_n, the running scale continued from
  // `state`) computed chunk by chunk, so a prefill hands decoding exactly the activations,
  // state and logits that token-by-token decoding reaches. Backends without such a kernel
  // say so with has_chunked_recurrent() and the model prefills them token by token.
  virtual bool has_chunked_recurrent() const { return false; }
  virtual void retention_chunked_recurrent(const float* q, const float* k, const float* v, float* o,
                                           const RetentionDims& d, const float* decay, int C, const StateView& state) {}
  // Advances `state` over the T rows just processed (spec §10.1 hand-off, closed form).
  virtual void retention_absorb(const float* k, const float* v, const RetentionDims& d, const float* decay,
                                StateView state) = 0;
  // One recurrent step (spec §6) for B rows (T = 1), updating state in place. rows[b] views
  // row b's state for this layer ([H, dv, dk] and [H]): rows may belong to different
  // sessions, so one step serves a whole decode batch.
  virtual void retention_step(const float* q, const float* k, const float* v, float* o, const RetentionDims& d,
                              const float* decay, const StateView* rows) = 0;
  // z = swish(g) * groupnorm(o), per row and head over dv values.
  virtual void groupnorm_gate(const float* o, const float* g, float* z, int rows, int H, int dv, float eps) = 0;
  // z = act(a) * b (z may be a).
  virtual void glu(const float* a, const float* b, float* z, size_t n, Activation act) = 0;

  // ---- Training: backward passes, loss and optimizer. Weight gradients always
  // accumulate (+=); reductions over rows run in a fixed order so results do not
  // depend on thread timing.

  // dX (=|+=) dY W and dW += dY^T X for Y[M, N] = X[M, K] W[N, K]^T, inputs rounded to
  // `precision` (BF16: the CPU only).
  virtual void linear_backward(int M, int N, int K, const float* X, const float* W, const float* dY, float* dX,
                               float* dW, bool accumulate_dx, Precision precision) = 0;
  // dE[tokens[i], :] += scale * dout[i, :].
  virtual void embed_backward(const int32_t* tokens, int n, const float* dout, int D, float scale, float* dE) = 0;
  // Backward of y = rmsnorm(x) * w: dx (=|+=) and dw +=. dx may alias dy.
  virtual void rmsnorm_backward(const float* x, const float* w, const float* dy, float* dx, float* dw, int rows, int D,
                                float eps, bool accumulate_dx) = 0;
  // Backward of rotate_qk, in place on the gradients (the rotation is orthogonal).
  virtual void rotate_qk_backward(float* dq, float* dk, const RetentionDims& d, const int64_t* start,
                                  const float* angle, float k_scale) = 0;
  // Backward of retention_chunked from t = 0 (no initial state) with the normalisers
  // detached: writes dq, dk, dv given do. q, k are the rotated inputs. Recomputes the
  // per-chunk KV states (memory linear in T) instead of saving them in the forward.
  virtual void retention_chunked_backward(const float* q, const float* k, const float* v, const float* d_o, float* dq,
                                          float* dk, float* dv, const RetentionDims& d, const float* decay, int C,
                                          float inner_clamp_max) = 0;
  // Backward of groupnorm_gate: writes d_o and dg.
  virtual void groupnorm_gate_backward(const float* o, const float* g, const float* dz, float* d_o, float* dg, int rows,
                                       int H, int dv, float eps) = 0;
  // Backward of glu: writes da and db.
  virtual void glu_backward(const float* a, const float* b, const float* dz, float* da, float* db, size_t n,
                            Activation act) = 0;
  // Fused softmax cross-entropy, in place: logits [rows, V] become weight[r] * (softmax - onehot(target[r])),
  // and row_loss[r] = logsumexp - logit[target]. Rows with weight 0 or target < 0 get zero gradient and
  // loss 0. targets, weights and row_loss are host memory.
  virtual void softmax_cross_entropy(float* logits, const int32_t* targets, const float* weights, int rows, int V,
                                     float* row_loss) = 0;
  // Dropout and drop path (spec §8.3) with a counter-based RNG: whether element i (or
  // sample b) is kept depends only on (seed, i), so the backward regenerates the mask by
  // calling the same op on the gradient. Kept values are scaled by 1/(1-p).
  virtual void dropout(float* x, size_t n, float p, uint64_t seed) = 0;
  // Keeps or zeroes whole samples: x is [samples, per_sample].
  virtual void drop_path(float* x, int samples, size_t per_sample, float p, uint64_t seed) = 0;
  // Σ x² in double, summed in a fixed order.
  virtual double sum_squares(const float* x, size_t n) = 0;
  // Whether every value is finite (non-finite values make the sum of squares non-finite; a
  // backend may check faster).
  virtual bool all_finite(const float* x, size_t n) { return std::isfinite(sum_squares(x, n)); }
  // One AdamW update of p with moments m, v.
  virtual void adamw(float* p, const float* g, float* m, float* v, size_t n, const AdamWStep& s) = 0;
};

// Backend memory owned RAII-style.
class Buffer {
 public:
  Buffer() = default;
  Buffer(Ops* ops, size_t n) : ops_(ops), n_(n), p_(n ? ops->alloc(n) : nullptr) {}
  Buffer(Buffer&& o) noexcept : ops_(o.ops_), n_(o.n_), p_(o.p_) { o.p_ = nullptr; o.n_ = 0; }
  Buffer& operator=(Buffer&& o) noexcept {
    if (this != &o) {
      reset();
      ops_ = o.ops_; n_ = o.n_; p_ = o.p_;
      o.p_ = nullptr; o.n_ = 0;
    }
    return *this;
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() { reset(); }
  void reset() {
    if (p_) ops_->release(p_);
    p_ = nullptr;
    n_ = 0;
  }
  float* data() const { return p_; }
  size_t size() const { return n_; }

 private:
  Ops* ops_ = nullptr;
  size_t n_ = 0;
  float* p_ = nullptr;
};

// The CPU backend (always built).
std::unique_ptr<Ops> make_cpu_ops();

// Zeroes host memory whose values are done with, handing its whole pages back to the system
// (Ops::discard on the CPU backend).
void discard_host_memory(void* p, size_t bytes);

}  // namespace retnet
