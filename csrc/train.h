// Training over a Model (llm.c style): a forward that keeps the activations the
// backward needs, a hand-written backward through every op (spec §8.2: the retention
// normalisers c_n, ι, κ are constants), next-token cross-entropy, and AdamW with
// global-norm clipping. Gradients and optimizer moments share the parameter arena's
// layout (Model::params() offsets); a tied output projection's gradient lands in
// embed_tokens.weight.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "model.h"

namespace retnet {

// One batch of token rows [B, T]. targets [B*T] (-1 = ignore) default to the next token;
// mask [B*T] weights each position (default 1). Both are host memory and may be null.
struct TrainBatch {
  const int32_t* tokens;
  int B, T;
  const int32_t* targets;
  const float* mask;
};

// The rotation angles and decays are buffers: no gradient, no update.
inline bool is_buffer_param(const ParamInfo& p) { return p.name.rfind("retnet_rel_pos.", 0) == 0; }

// How a forward + backward runs: the retention form (C: chunk size for chunkwise), and
// whether to checkpoint activations: keep only each layer's input in the forward and
// recompute the layer's activations just before its backward. That holds one layer's
// activations instead of L, for one more forward pass through the layers (not the head).
// `products`: what the layers' linear products (projections and feed-forward, forward and
// backward) round their inputs to; the output head, retention, norms and everything else
// stay fp32, as do the weights, gradients and optimizer state.
struct PassOptions {
  Mode mode;
  int C;
  bool checkpoint_activations;
  Precision products = Precision::F32;
};

struct OptimizerOptions {
  float lr, beta1, beta2, eps, weight_decay;
  float clip_norm;                     // 0 = no clipping
  std::vector<std::string> no_decay;   // parameter names without weight decay
  uint64_t seed;                       // dropout / drop path stream of this step
};

struct StepResult {
  double loss;       // mean over micro-batches of each one's mean loss
  double grad_norm;  // global L2 norm before clipping
  int64_t tokens;    // tokens processed (Σ B*T)
};

class Trainer {
 public:
  explicit Trainer(std::shared_ptr<Model> model);
  ~Trainer();

  // Adds d(loss_scale * loss)/dθ to the gradients and returns the batch's mean loss.
  // `seed` drives dropout and drop path (unused when the config's rates are 0).
  double accumulate_gradients(const TrainBatch& batch, const PassOptions& pass, float loss_scale, uint64_t seed);
  void zero_gradients();
  // Host copy of one parameter's gradient (tied: output_projection.weight is embed_tokens.weight).
  void get_gradient(const ParamInfo& p, float* out) const;

  // Forward+backward of each micro-batch (equal weights), clipping, one AdamW update, zeroed gradients.
  StepResult step(const std::vector<TrainBatch>& micro, const PassOptions& pass, const OptimizerOptions& opt);

  int64_t optimizer_step() const { return step_; }
  void get_optimizer_state(float* m, float* v) const;
  // Sizes are parameter_floats() each; throws std::invalid_argument on non-finite values or a negative v.
  void set_optimizer_state(int64_t step, const float* m, const float* v);

  // Throws std::invalid_argument for token ids, targets or mask values out of range.
  void check_batch(const TrainBatch& batch) const;

 private:
  struct Activations;

  // Where one layer's gradients lie in the gradient arena: [first, end), holding `floats`.
  struct GradientSpan {
    size_t first = SIZE_MAX, end = 0, floats = 0;
  };

  std::shared_ptr<Model> model_;
  Buffer grads_, m_, v_;
  std::vector<GradientSpan> layer_grads_;  // per layer, from the parameter names
  std::unique_ptr<Activations> acts_;  // reused across steps of the same shape
  int64_t step_ = 0;
  int64_t diverged_at_ = 0;  // the step whose update left non-finite parameters; 0: none
};

}  // namespace retnet
