// The RetNet decoder over the op interface: weights, full-sequence forward in the
// three retention forms, prefill into a recurrent state, and batched decode steps.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <string>
#include <vector>

#include "ops.h"
#include "quant.h"

namespace retnet {

struct ModelConfig {
  int V, D, Dv, H, F, L;
  bool pre_norm;             // decoder_normalize_before
  bool layernorm_embedding;
  bool tied;                 // share_decoder_input_output_embed
  Activation activation;
  float eps;                 // layernorm_eps
  float embed_scale;         // 1 or sqrt(D)
  float alpha;               // residual multiplier, (2L)^(1/4) with deepnorm
  // Training-only (spec §8.3); the forward never reads them.
  float dropout, activation_dropout, drop_path_rate;
  int dk() const { return D / H; }
  int dv() const { return Dv / H; }
};

enum class Mode { Parallel, Chunkwise, Recurrent };

// One entry of the state_dict: where it lives in the parameter arena, and whether it lies
// there in panels (panels.h; the backend's projection weights) rather than in rows.
struct ParamInfo {
  std::string name;
  std::vector<int> shape;
  size_t offset;
  size_t size;
  bool panels = false;
};

class Model;
class Trainer;

// Memory of released decode states, handed to new states of the same size. A fresh state's
// pages fault in one by one (on the development VM ~45 ms for a medium batch-1 state, 28 MB);
// a reused one costs a fill or a copy. Keeps at most kMaxBytes; any thread may take or give.
class StatePool : public std::enable_shared_from_this<StatePool> {
 public:
  static constexpr size_t kMaxBytes = size_t{512} << 20;
  // `n` floats, zeroed when `zeroed`; going back to the pool when the last owner drops it.
  std::shared_ptr<Buffer> take(Ops* ops, size_t n, bool zeroed);
  void clear();

 private:
  void give(Buffer&& memory);
  std::mutex mu_;
  std::vector<Buffer> free_;
  size_t bytes_ = 0;
};

// The most rows a decode state may have. Its positions come back to JS as an array, which V8
// cannot make past about 2^27 elements (a larger batch crashed the process there); a million
// rows is far beyond any batch a step can serve.
constexpr int kMaxDecodeBatch = 1 << 20;

// A recurrent decode state for B rows: O(1) in context length. Its memory is taken on first
// write, and a clone shares its source's memory until either of them is written (copy on
// write); model calls make their states writable on their worker, so creating or cloning a
// state costs the JS thread nothing. A state with no memory is all zeros.
class DecodeState {
 public:
  DecodeState(const Model& model, int batch);
  DecodeState(const DecodeState&) = delete;
  DecodeState& operator=(const DecodeState&) = delete;
  int batch() const { return batch_; }
  std::vector<int64_t> position;  // tokens consumed, per row
  // The model's weight version the state was last advanced with (the binding's count): a
  // state advanced by other weights is refused (its S and s belong to the old ones).
  uint64_t weights_version = 0;
  // Gives the state memory of its own: zeroed, or a copy of the memory it shared.
  void make_writable();
  // Gives the state memory of its own holding host `kv` and `scale` (kv_size() and
  // scale_size() floats): nothing is zeroed or copied first.
  void load(const float* kv, const float* scale);
  bool materialized() const { return memory_ != nullptr; }
  // Valid once materialized: kv [L, B, H, dv, dk], then scale [L, B, H], in one block.
  float* kv() const { return memory_->data(); }
  float* scale() const { return memory_->data() + kv_size_; }
  size_t kv_size() const { return kv_size_; }
  size_t scale_size() const { return scale_size_; }
  // Views for a model call; the state must be writable.
  StateView layer(const ModelConfig& c, int l) const;
  // Becomes a copy of `other`, sharing its memory until one of them is written.
  void share_from(const DecodeState& other);

 private:
  friend class Model;
  Ops* ops_;
  std::shared_ptr<StatePool> pool_;
  int batch_;
  size_t kv_size_, scale_size_;
  std::shared_ptr<Buffer> memory_;
  struct Scratch;
  std::shared_ptr<Scratch> scratch_;  // step workspace, allocated once per state
};

class Model {
 public:
  Model(std::unique_ptr<Ops> ops, const ModelConfig& config);
  ~Model();

  const ModelConfig& config() const { return c_; }
  Ops* ops() const { return ops_.get(); }
  const std::vector<ParamInfo>& params() const { return params_; }
  const ParamInfo* find_param(const std::string& name) const;
  // Copies host data into / out of a named parameter (sizes are checked), always in rows (the
  // state_dict's layout). A compact model stores a projection in its format (set before the
  // weights: its fp32 pages are never touched) and gives it back widened.
  void set_param(const std::string& name, const float* data, size_t n);
  void get_param(const std::string& name, float* data, size_t n) const;
  // Parameter p's slice of an arena-shaped buffer (the weights, their gradients or moments)
  // to host rows, and back.
  void read_arena_slice(const ParamInfo& p, const float* arena_like, float* host) const;
  void write_arena_slice(const ParamInfo& p, float* arena_like, const float* host) const;
  size_t parameter_floats() const { return arena_.size(); }

  // logits [B, T, V] (host) for tokens [B, T] in the given form; C is the chunk size.
  void forward(const int32_t* tokens, int B, int T, Mode mode, int C, float* logits) const;
  // Σ over b and t < T-1 of -log softmax(logits[b, t])[tokens[b, t+1]]: what an evaluation
  // averages, without handing the [B, T, V] logits out.
  double next_token_loss_sum(const int32_t* tokens, int B, int T, Mode mode, int C) const;
  // Runs the prompt through the model from the state's positions, leaves the recurrent
  // state after it, and writes the next-token logits [B, V] (host).
  void prefill(DecodeState& state, const int32_t* tokens, int T, Mode mode, int C, float* logits) const;
  // Prefills several batch-1 states at once: state i consumes lengths[i] tokens (tokens holds
  // them one state after another) and gets its next-token logits in row i of [count, V]. The
  // products run over every state's rows together (weights streamed once), retention per
  // state, so (with the CPU's batch-invariant row sums) each state ends exactly as prefill()
  // alone would leave it.
  void prefill_batch(const std::vector<DecodeState*>& states, const int32_t* tokens, const std::vector<int>& lengths,
                     Mode mode, int C, float* logits) const;
  // One token per row: next-token logits [B, V] (host).
  void step(DecodeState& state, const int32_t* tokens, float* logits) const;
  // One decode step for several states at once (continuous batching): rows are the states'
  // rows in order, tokens and logits [sum of batches, V]. Weights are streamed once.
  void step_batch(const std::vector<DecodeState*>& states, const int32_t* tokens, float* logits) const;

  // Converts every projection weight to a compact format (bf16, int8) and hands their fp32
  // memory back: from then on every product, prefill and forward as well as decode, reads the
  // compact matrices, set_param converts, get_param widens, and the model can't be trained.
  // Once compact, its format can't change again.
  void set_weight_format(WeightFormat format);
  WeightFormat weight_format() const { return weight_format_; }

  // Throws std::invalid_argument naming the first token id outside [0, V).
  void check_tokens(const int32_t* tokens, size_t n) const;

  struct Workspace;  // activations of one call (defined in model.cc)

 private:
  friend class Trainer;  // the training forward/backward reads the layer weights and updates the arena
  friend class DecodeState;  // takes its memory from state_pool_
  struct Layer {
    const float *q, *k, *v, *g, *out, *ret_ln, *fc1, *fc2, *gate, *ffn_ln;
  };
  // One state's rows [row0, row0 + T) within a batched prefill's workspace.
  struct Segment {
    int row0, T;
    DecodeState* state;
  };
  // With `segments`, the rows are those states' prompts one after another (d covers them all);
  // rotation and retention then run per segment. `rowwise_products`: every product as decode
  // dot products (a row's numbers then don't depend on the others), whatever the row count.
  void run_layers(Workspace& ws, const RetentionDims& d, const int64_t* start,
                  const std::vector<StateView>* states, Mode mode, int C,
                  const std::vector<Segment>* segments = nullptr, bool rowwise_products = false) const;
  // prefill_batch's pass over states[members[g]] together, their tokens at offsets[g].
  void prefill_together(const std::vector<DecodeState*>& states, const int32_t* tokens, const std::vector<int>& lengths,
                        const std::vector<size_t>& members, const std::vector<size_t>& offsets, Mode mode, int C,
                        bool rowwise_products, float* logits) const;
  // The rows at `row_ends[i] - 1` of x, normed and projected into logits row i (batch-invariant).
  void logits_of_last_rows(Workspace& ws, const std::vector<int>& row_ends, float* logits) const;
  void logits_of_rows(Workspace& ws, const float* x_rows, int rows, bool rowwise, float* logits_host) const;
  // The full-sequence pass of forward (parallel or chunkwise) up to the final hidden rows, in ws.x.
  void hidden_rows(Workspace& ws, const int32_t* tokens, int B, int T, Mode mode, int C) const;
  // The recurrent form of forward: one step per position t, its [B, V] logits handed to take(t, logits).
  void recurrent_columns(const int32_t* tokens, int B, int T, const std::function<void(int, const float*)>& take) const;
  // The rows of `count` states, in order (a pointer and a count: a single step builds no vector).
  void step_rows(DecodeState* const* states, size_t count, Workspace& ws, const int32_t* tokens, int rows,
                 float* logits) const;

  std::unique_ptr<Ops> ops_;
  ModelConfig c_;
  std::vector<ParamInfo> params_;
  Buffer arena_;
  std::vector<Layer> layers_;
  const float *embed_ = nullptr, *output_ = nullptr, *emb_ln_ = nullptr, *final_ln_ = nullptr;
  const float *angle_ = nullptr, *decay_ = nullptr;
  std::vector<float> angle_host_, decay_host_;
  WeightFormat weight_format_ = WeightFormat::F32;
  // The compact projections, by where their fp32 weights were in the arena (those pages are
  // handed back, except a tied output projection's: it is the embedding too).
  std::unordered_map<const float*, QuantizedMatrix> compact_;
  const QuantizedMatrix* compact_of(const float* W) const;
  // Whether the backend keeps the projections in panels: every one but a tied head (the
  // embedding, whose rows a token lookup reads).
  bool panels_ = false;
  bool in_panels(const float* W) const { return panels_ && W != embed_; }
  // W's product as linear_rowwise takes it: through its compact matrix, or from its panels.
  LinearOut rowwise_out(const float* W, int N, float* Y) const {
    const QuantizedMatrix* compact = compact_of(W);
    return {W, N, Y, compact, !compact && in_panels(W)};
  }
  // The most rows whose products run as decode dot products when alone: fp32 rows hand more
  // than a few to the GEMM, panels and compact weights more than a few hundred.
  int dot_product_rows() const {
    return panels_ || weight_format_ != WeightFormat::F32 ? kCompactDotsMaxRows : kGemmDotsMaxRows;
  }
  // Y = X W^T and its backward for an fp32 weight of the arena, in whichever layout it lies.
  void linear(int M, int N, int K, const float* X, const float* W, float* Y, Precision precision) const;
  void linear_backward(int M, int N, int K, const float* X, const float* W, const float* dY, float* dX, float* dW,
                       bool accumulate_dx, Precision precision) const;
  std::shared_ptr<StatePool> state_pool_ = std::make_shared<StatePool>();
  // Workspace of step_batch, grown to the largest batch seen.
  mutable std::mutex batch_mu_;
  mutable std::unique_ptr<Workspace> batch_ws_;
};

}  // namespace retnet
