#include "model.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>

#include "panels.h"
#include "threadpool.h"

namespace retnet {
namespace {

// Chunkwise prefill runs the prompt in segments of about this many tokens (a multiple of
// the chunk size): each segment continues the recurrent state of the previous one, so the
// result is the same as one pass, and activation memory stays bounded whatever the length.
constexpr int kPrefillSegment = 2048;

size_t product(const std::vector<int>& shape) {
  size_t n = 1;
  for (int s : shape) n *= static_cast<size_t>(s);
  return n;
}

}  // namespace

// Activations for R = B*T rows, sized once per call (or once per decode state).
struct Model::Workspace {
  Workspace(Ops* ops, const ModelConfig& c, size_t rows)
      : rows(rows),
        x(ops, rows * c.D),
        h(ops, rows * c.D),
        q(ops, rows * c.D),
        k(ops, rows * c.D),
        v(ops, rows * c.Dv),
        g(ops, rows * c.Dv),
        o(ops, rows * c.Dv),
        a(ops, rows * std::max(c.F, c.Dv)),
        b(ops, rows * c.F) {}
  size_t rows;
  Buffer x, h, q, k, v, g, o, a, b;
  // Recurrent steps: per (layer, row) state views and per-row positions, reused every step.
  std::vector<StateView> row_views;
  std::vector<int64_t> positions;
  Buffer last;    // gathered rows for logits
  Buffer logits;  // device logits when the backend is not host memory
};

struct DecodeState::Scratch {
  std::unique_ptr<Model::Workspace> ws;
};

std::shared_ptr<Buffer> StatePool::take(Ops* ops, size_t n, bool zeroed) {
  Buffer memory;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (size_t i = 0; i < free_.size(); i++) {
      if (free_[i].size() != n) continue;
      memory = std::move(free_[i]);
      free_.erase(free_.begin() + static_cast<ptrdiff_t>(i));
      bytes_ -= n * sizeof(float);
      break;
    }
  }
  if (memory.data()) {
    if (zeroed) ops->fill(memory.data(), 0.f, n);
  } else {
    memory = Buffer(ops, n);  // zeroed by alloc
  }
  auto pool = shared_from_this();
  return std::shared_ptr<Buffer>(new Buffer(std::move(memory)), [pool](Buffer* b) {
    pool->give(std::move(*b));
    delete b;
  });
}

void StatePool::give(Buffer&& memory) {
  const size_t bytes = memory.size() * sizeof(float);
  std::lock_guard<std::mutex> lock(mu_);
  if (bytes_ + bytes > kMaxBytes) return;  // `memory` is freed by the caller's buffer
  bytes_ += bytes;
  free_.push_back(std::move(memory));
}

void StatePool::clear() {
  std::lock_guard<std::mutex> lock(mu_);
  free_.clear();
  bytes_ = 0;
}

DecodeState::DecodeState(const Model& model, int batch)
    : position(batch, 0),
      ops_(model.ops()),
      pool_(model.state_pool_),
      batch_(batch),
      scratch_(std::make_shared<Scratch>()) {
  const ModelConfig& c = model.config();
  const size_t per_layer = static_cast<size_t>(batch) * c.H;
  kv_size_ = c.L * per_layer * c.dv() * c.dk();
  scale_size_ = c.L * per_layer;
}

void DecodeState::make_writable() {
  // Shared memory is never written: a state sharing it copies it first. (use_count is exact
  // enough here: clones are made only of states no call is using.)
  if (memory_ && memory_.use_count() == 1) return;
  const size_t n = kv_size_ + scale_size_;
  std::shared_ptr<Buffer> own = pool_->take(ops_, n, !memory_);
  if (memory_) ops_->copy(own->data(), memory_->data(), n);
  memory_ = std::move(own);
}

void DecodeState::load(const float* kv_in, const float* scale_in) {
  if (!memory_ || memory_.use_count() != 1) memory_ = pool_->take(ops_, kv_size_ + scale_size_, false);
  ops_->upload(kv(), kv_in, kv_size_);
  ops_->upload(scale(), scale_in, scale_size_);
}

StateView DecodeState::layer(const ModelConfig& c, int l) const {
  if (!materialized()) throw std::logic_error("decode state read before make_writable()");
  const size_t per_layer = static_cast<size_t>(batch_) * c.H;
  return {kv() + l * per_layer * c.dv() * c.dk(), scale() + l * per_layer};
}

void DecodeState::share_from(const DecodeState& other) {
  if (other.batch_ != batch_ || other.kv_size_ != kv_size_) throw std::invalid_argument("state shapes differ");
  position = other.position;
  weights_version = other.weights_version;
  memory_ = other.memory_;
}

Model::Model(std::unique_ptr<Ops> ops, const ModelConfig& config) : ops_(std::move(ops)), c_(config) {
  const ModelConfig& c = c_;
  auto add = [&](const std::string& name, std::vector<int> shape) {
    const size_t offset = params_.empty() ? 0 : params_.back().offset + params_.back().size;
    const size_t size = product(shape);
    params_.push_back({name, std::move(shape), offset, size});
  };
  add("embed_tokens.weight", {c.V, c.D});
  if (!c.tied) add("output_projection.weight", {c.V, c.D});
  if (c.layernorm_embedding) add("layernorm_embedding.weight", {c.D});
  for (int l = 0; l < c.L; l++) {
    const std::string p = "layers." + std::to_string(l) + ".";
    add(p + "retention.q_proj.weight", {c.D, c.D});
    add(p + "retention.k_proj.weight", {c.D, c.D});
    add(p + "retention.v_proj.weight", {c.Dv, c.D});
    add(p + "retention.g_proj.weight", {c.Dv, c.D});
    add(p + "retention.out_proj.weight", {c.D, c.Dv});
    add(p + "retention_layer_norm.weight", {c.D});
    add(p + "ffn.fc1.weight", {c.F, c.D});
    add(p + "ffn.fc2.weight", {c.D, c.F});
    add(p + "ffn.gate.weight", {c.F, c.D});
    add(p + "final_layer_norm.weight", {c.D});
  }
  if (c.pre_norm) add("layer_norm.weight", {c.D});
  add("retnet_rel_pos.angle", {c.dk()});
  add("retnet_rel_pos.decay", {c.H});
  arena_ = Buffer(ops_.get(), params_.back().offset + params_.back().size);

  auto at = [&](const std::string& name) -> const float* { return arena_.data() + find_param(name)->offset; };
  embed_ = at("embed_tokens.weight");
  output_ = c.tied ? embed_ : at("output_projection.weight");
  // One rule for which weights lie in panels: in_panels, by address.
  panels_ = ops_->weights_in_panels();
  for (ParamInfo& p : params_) p.panels = p.shape.size() == 2 && in_panels(arena_.data() + p.offset);
  if (c.layernorm_embedding) emb_ln_ = at("layernorm_embedding.weight");
  if (c.pre_norm) final_ln_ = at("layer_norm.weight");
  for (int l = 0; l < c.L; l++) {
    const std::string p = "layers." + std::to_string(l) + ".";
    layers_.push_back({at(p + "retention.q_proj.weight"), at(p + "retention.k_proj.weight"),
                       at(p + "retention.v_proj.weight"), at(p + "retention.g_proj.weight"),
                       at(p + "retention.out_proj.weight"), at(p + "retention_layer_norm.weight"),
                       at(p + "ffn.fc1.weight"), at(p + "ffn.fc2.weight"), at(p + "ffn.gate.weight"),
                       at(p + "final_layer_norm.weight")});
  }
  angle_ = at("retnet_rel_pos.angle");
  decay_ = at("retnet_rel_pos.decay");
}

Model::~Model() { state_pool_->clear(); }

const ParamInfo* Model::find_param(const std::string& name) const {
  for (const ParamInfo& p : params_)
    if (p.name == name) return &p;
  if (c_.tied && name == "output_projection.weight") return find_param("embed_tokens.weight");
  return nullptr;
}

void Model::set_param(const std::string& name, const float* data, size_t n) {
  const ParamInfo* p = find_param(name);
  if (!p) throw std::invalid_argument("unknown parameter " + name);
  if (p->size != n) {
    throw std::invalid_argument("parameter " + name + " has " + std::to_string(p->size) + " values, got " +
                                std::to_string(n));
  }
  const float* W = arena_.data() + p->offset;
  const auto compact = compact_.find(W);
  if (compact != compact_.end()) {
    QuantizedMatrix& q = compact->second;
    try {
      // Checked whole before any row is written: a value bf16 cannot hold leaves the matrix as it was.
      if (q.format == WeightFormat::BF16) check_bf16_range(data, n);
      quantize_into(q, [&](int j, float*) { return data + static_cast<size_t>(j) * q.K; });
    } catch (const std::invalid_argument& e) {
      throw std::invalid_argument("parameter " + name + ": " + e.what());
    }
    if (W != embed_) return;  // its fp32 pages stay unused
  }
  write_arena_slice(*p, arena_.data(), data);
  if (name == "retnet_rel_pos.angle") angle_host_.assign(data, data + n);
  if (name == "retnet_rel_pos.decay") decay_host_.assign(data, data + n);
}

void Model::get_param(const std::string& name, float* data, size_t n) const {
  const ParamInfo* p = find_param(name);
  if (!p) throw std::invalid_argument("unknown parameter " + name);
  if (p->size != n) throw std::invalid_argument("parameter " + name + " size mismatch");
  const float* W = arena_.data() + p->offset;
  const QuantizedMatrix* compact = W == embed_ ? nullptr : compact_of(W);
  if (compact) {
    widen_rows(*compact, 0, compact->N, 0, compact->K, data, compact->K);
  } else {
    read_arena_slice(*p, arena_.data(), data);
  }
}

// Panels exist on host memory only (the CPU backend), so they convert in place.
void Model::read_arena_slice(const ParamInfo& p, const float* arena_like, float* host) const {
  const float* src = arena_like + p.offset;
  if (p.panels) {
    from_panels(src, p.shape[0], p.shape[1], 0, p.shape[0], 0, p.shape[1], host, p.shape[1]);
  } else {
    ops_->download(host, src, p.size);
  }
}

void Model::write_arena_slice(const ParamInfo& p, float* arena_like, const float* host) const {
  float* dst = arena_like + p.offset;
  if (p.panels) {
    to_panels(host, p.shape[0], p.shape[1], dst);
  } else {
    ops_->upload(dst, host, p.size);
  }
}

void Model::linear(int M, int N, int K, const float* X, const float* W, float* Y, Precision precision) const {
  if (in_panels(W)) {
    ops_->linear_panels(M, N, K, X, W, Y, false, precision);
  } else {
    ops_->linear(M, N, K, X, W, Y, false, precision);
  }
}

void Model::linear_backward(int M, int N, int K, const float* X, const float* W, const float* dY, float* dX, float* dW,
                            bool accumulate_dx, Precision precision) const {
  if (in_panels(W)) {
    ops_->linear_panels_backward(M, N, K, X, W, dY, dX, dW, accumulate_dx, precision);
  } else {
    ops_->linear_backward(M, N, K, X, W, dY, dX, dW, accumulate_dx, precision);
  }
}

const QuantizedMatrix* Model::compact_of(const float* W) const {
  const auto it = compact_.find(W);
  return it == compact_.end() ? nullptr : &it->second;
}

void Model::set_weight_format(WeightFormat format) {
  if (format == weight_format_) return;
  // The fp32 weights are gone once compact: another format would be converted from rounded values.
  if (weight_format_ != WeightFormat::F32)
    throw std::invalid_argument("this model's weights are already compact; load the checkpoint again for another format");
  // Only the CPU has kernels for compact weights.
  if (std::strcmp(ops_->name(), "cpu") != 0)
    throw std::invalid_argument(std::string("weights 'bf16' and 'int8' run on the CPU only; this model is on ") +
                                ops_->name() + " (load it with weights 'f32')");
  const ModelConfig& c = c_;
  struct Weight {
    const float* W;
    int N, K;
  };
  std::vector<Weight> weights;
  for (const Layer& w : layers_) {
    weights.insert(weights.end(), {{w.q, c.D, c.D}, {w.k, c.D, c.D}, {w.v, c.Dv, c.D}, {w.g, c.Dv, c.D},
                                   {w.out, c.D, c.Dv}, {w.fc1, c.F, c.D}, {w.gate, c.F, c.D}, {w.fc2, c.D, c.F}});
  }
  weights.push_back({output_, c.V, c.D});
  auto rows_of = [this](const Weight& w) -> RowReader {
    if (in_panels(w.W)) {
      return [w](int j, float* row) {
        from_panels(w.W, w.N, w.K, j, 1, 0, w.K, row, w.K);
        return static_cast<const float*>(row);
      };
    }
    return [w](int j, float*) { return w.W + static_cast<size_t>(j) * w.K; };
  };
  // A value bf16 cannot hold is refused before anything is converted: a model half converted,
  // its fp32 pages dropped, would go on computing with zeros. (A separate pass rather than
  // converting everything before dropping any fp32 page: that would hold both copies at once.)
  if (format == WeightFormat::BF16) {
    std::vector<float> scratch(std::max({c.D, c.Dv, c.F}));
    for (const Weight& w : weights) {
      const RowReader read = rows_of(w);
      try {
        for (int j = 0; j < w.N; j++) check_bf16_range(read(j, scratch.data()), w.K, static_cast<size_t>(j) * w.K);
      } catch (const std::invalid_argument& e) {
        for (const ParamInfo& p : params_)
          if (arena_.data() + p.offset == w.W) throw std::invalid_argument("parameter " + p.name + ": " + e.what());
        throw;
      }
    }
  }
  // One buffer for every compact matrix, on 2 MiB pages where the kernel allows (one per
  // matrix would round each up to whole 2 MiB pages, or leave them on 4 KiB pages).
  size_t total = 0;
  for (const Weight& w : weights) total += compact_bytes(w.N, w.K, format);
  const std::shared_ptr<void> storage = compact_storage(total);
  size_t offset = 0;
  // The arena is host memory here (the CPU backend): converted in place, no copy.
  for (const Weight& w : weights) {
    compact_.emplace(w.W, quantize(w.N, w.K, format, rows_of(w), storage, offset));
    offset += compact_bytes(w.N, w.K, format);
    if (w.W != embed_) ops_->drop(const_cast<float*>(w.W), static_cast<size_t>(w.N) * w.K);
  }
  weight_format_ = format;
}

void Model::check_tokens(const int32_t* tokens, size_t n) const {
  for (size_t i = 0; i < n; i++) {
    if (tokens[i] < 0 || tokens[i] >= c_.V) {
      throw std::invalid_argument("token id " + std::to_string(tokens[i]) + " at index " + std::to_string(i) +
                                  " is outside the vocabulary [0, " + std::to_string(c_.V) + ")");
    }
  }
}

// Embedding output in ws.x must be ready; runs every layer over the rows of d.
void Model::run_layers(Workspace& ws, const RetentionDims& d, const int64_t* start,
                       const std::vector<StateView>* states, Mode mode, int C,
                       const std::vector<Segment>* segments, bool rowwise_products) const {
  Ops& ops = *ops_;
  const ModelConfig& c = c_;
  const int R = d.B * d.T;
  const float k_scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(c.dk())));
  // Decode steps use batch-invariant products (a row's numbers don't depend on its batch),
  // grouped so that products sharing an input run in one pass. A prefill of a few rows gets
  // the same grouping (its products are those dot products either way).
  auto project = [&](int M, int K, const float* X, std::initializer_list<LinearOut> outs) {
    if (mode == Mode::Recurrent || rowwise_products || M <= kGemmDotsMaxRows) {
      LinearOut group[4];
      int n = 0;
      for (const LinearOut& o : outs) group[n++] = rowwise_out(o.W, o.N, o.Y);
      ops.linear_rowwise(M, K, X, group, n);
    } else {
      for (const LinearOut& o : outs) {
        if (const QuantizedMatrix* compact = compact_of(o.W)) {
          ops.linear_compact(M, X, *compact, o.Y);
        } else {
          linear(M, o.N, K, X, o.W, o.Y, Precision::F32);
        }
      }
    }
  };
  for (int l = 0; l < c.L; l++) {
    const Layer& w = layers_[l];
    // Retention block.
    const float* in = ws.x.data();
    if (c.pre_norm) {
      ops.rmsnorm(ws.x.data(), w.ret_ln, ws.h.data(), R, c.D, c.eps);
      in = ws.h.data();
    }
    project(R, c.D, in, {{w.q, c.D, ws.q.data()}, {w.k, c.D, ws.k.data()}, {w.v, c.Dv, ws.v.data()}, {w.g, c.Dv, ws.g.data()}});
    if (segments) {
      // A batched prefill: each state's rows as prefill() would run them alone.
      for (const Segment& s : *segments) {
        const RetentionDims ds{1, s.T, d.H, d.dk, d.dv};
        const size_t qk = static_cast<size_t>(s.row0) * c.D, vo = static_cast<size_t>(s.row0) * c.Dv;
        const StateView view = s.state->layer(c, l);
        ops.rotate_qk(ws.q.data() + qk, ws.k.data() + qk, ds, s.state->position.data(), angle_, k_scale);
        ops.retention_chunked_recurrent(ws.q.data() + qk, ws.k.data() + qk, ws.v.data() + vo, ws.o.data() + vo, ds,
                                        decay_, mode == Mode::Parallel ? s.T : C, view);
        ops.retention_absorb(ws.k.data() + qk, ws.v.data() + vo, ds, decay_, view);
      }
    } else {
      ops.rotate_qk(ws.q.data(), ws.k.data(), d, start, angle_, k_scale);
      // Recurrent: states holds L*B per-row views (layer-major); otherwise one view per layer.
      const StateView* state = states ? &(*states)[mode == Mode::Recurrent ? static_cast<size_t>(l) * d.B : l] : nullptr;
      const int chunk = mode == Mode::Parallel ? d.T : C;
      if (mode == Mode::Recurrent) {
        ops.retention_step(ws.q.data(), ws.k.data(), ws.v.data(), ws.o.data(), d, decay_, state);
      } else if (state) {
        // A prefill: the chunk algorithm computing the recurrent form, then the state hand-off.
        ops.retention_chunked_recurrent(ws.q.data(), ws.k.data(), ws.v.data(), ws.o.data(), d, decay_, chunk, *state);
        ops.retention_absorb(ws.k.data(), ws.v.data(), d, decay_, *state);
      } else {
        // A full-sequence forward: the torchscale form's own scalars (spec §5, §7).
        const float clamp = mode == Mode::Parallel ? kParallelClampMax : std::numeric_limits<float>::infinity();
        ops.retention_chunked(ws.q.data(), ws.k.data(), ws.v.data(), ws.o.data(), d, decay_, chunk, clamp, nullptr);
      }
    }
    ops.groupnorm_gate(ws.o.data(), ws.g.data(), ws.a.data(), R, c.H, c.dv(), c.eps);
    project(R, c.Dv, ws.a.data(), {{w.out, c.D, ws.h.data()}});
    ops.residual(ws.x.data(), ws.h.data(), static_cast<size_t>(R) * c.D, c.alpha);
    if (!c.pre_norm) ops.rmsnorm(ws.x.data(), w.ret_ln, ws.x.data(), R, c.D, c.eps);
    // GLU feed-forward block.
    in = ws.x.data();
    if (c.pre_norm) {
      ops.rmsnorm(ws.x.data(), w.ffn_ln, ws.h.data(), R, c.D, c.eps);
      in = ws.h.data();
    }
    project(R, c.D, in, {{w.fc1, c.F, ws.a.data()}, {w.gate, c.F, ws.b.data()}});
    ops.glu(ws.a.data(), ws.b.data(), ws.a.data(), static_cast<size_t>(R) * c.F, c.activation);
    project(R, c.F, ws.a.data(), {{w.fc2, c.D, ws.h.data()}});
    ops.residual(ws.x.data(), ws.h.data(), static_cast<size_t>(R) * c.D, c.alpha);
    if (!c.pre_norm) ops.rmsnorm(ws.x.data(), w.ffn_ln, ws.x.data(), R, c.D, c.eps);
  }
}

// Final norm and output projection of `rows` contiguous rows of x, into host logits.
void Model::logits_of_rows(Workspace& ws, const float* x_rows, int rows, bool rowwise, float* logits_host) const {
  Ops& ops = *ops_;
  const float* in = x_rows;
  if (c_.pre_norm) {
    if (ws.last.size() < static_cast<size_t>(rows) * c_.D) ws.last = Buffer(ops_.get(), static_cast<size_t>(rows) * c_.D);
    ops.rmsnorm(x_rows, final_ln_, ws.last.data(), rows, c_.D, c_.eps);
    in = ws.last.data();
  }
  const size_t n = static_cast<size_t>(rows) * c_.V;
  // The CPU backend writes straight into the caller's buffer.
  const bool host = std::strcmp(ops.name(), "cpu") == 0;
  if (!host && ws.logits.size() < n) ws.logits = Buffer(ops_.get(), n);
  float* out = host ? logits_host : ws.logits.data();
  const QuantizedMatrix* compact = compact_of(output_);
  if (rowwise) {
    const LinearOut projection = rowwise_out(output_, c_.V, out);
    ops.linear_rowwise(rows, c_.D, in, &projection, 1);
  } else if (compact) {
    ops.linear_compact(rows, in, *compact, out);
  } else {
    linear(rows, c_.V, c_.D, in, output_, out, Precision::F32);
  }
  if (!host) ops.download(logits_host, out, n);
}

void Model::recurrent_columns(const int32_t* tokens, int B, int T, const std::function<void(int, const float*)>& take) const {
  DecodeState state(*this, B);
  std::vector<int32_t> column(B);
  std::vector<float> column_logits(static_cast<size_t>(B) * c_.V);
  for (int t = 0; t < T; t++) {
    for (int b = 0; b < B; b++) column[b] = tokens[static_cast<size_t>(b) * T + t];
    step(state, column.data(), column_logits.data());
    take(t, column_logits.data());
  }
}

void Model::hidden_rows(Workspace& ws, const int32_t* tokens, int B, int T, Mode mode, int C) const {
  const size_t R = static_cast<size_t>(B) * T;
  ops_->embed(tokens, static_cast<int>(R), embed_, c_.D, c_.embed_scale, ws.x.data());
  if (emb_ln_) ops_->rmsnorm(ws.x.data(), emb_ln_, ws.x.data(), static_cast<int>(R), c_.D, c_.eps);
  const std::vector<int64_t> start(B, 0);
  run_layers(ws, {B, T, c_.H, c_.dk(), c_.dv()}, start.data(), nullptr, mode, C);
}

void Model::forward(const int32_t* tokens, int B, int T, Mode mode, int C, float* logits) const {
  check_tokens(tokens, static_cast<size_t>(B) * T);
  const size_t V = c_.V;
  if (mode == Mode::Recurrent) {
    recurrent_columns(tokens, B, T, [&](int t, const float* column) {
      for (int b = 0; b < B; b++) std::memcpy(logits + (static_cast<size_t>(b) * T + t) * V, column + b * V, V * sizeof(float));
    });
    return;
  }
  const size_t R = static_cast<size_t>(B) * T;
  Workspace ws(ops_.get(), c_, R);
  hidden_rows(ws, tokens, B, T, mode, C);
  logits_of_rows(ws, ws.x.data(), static_cast<int>(R), false, logits);
}

namespace {
// -log softmax(x)[target] over V logits, in float64.
double cross_entropy(const float* x, size_t V, int32_t target) {
  const float max = *std::max_element(x, x + V);
  double sum = 0;
  for (size_t v = 0; v < V; v++) sum += std::exp(static_cast<double>(x[v]) - max);
  return max + std::log(sum) - x[target];
}

// Logits the loss holds at once (16 MiB): the rows' logits never all exist together.
constexpr size_t kLossBlockFloats = size_t{1} << 22;
}  // namespace

double Model::next_token_loss_sum(const int32_t* tokens, int B, int T, Mode mode, int C) const {
  check_tokens(tokens, static_cast<size_t>(B) * T);
  const size_t V = c_.V, per_row = T - 1;
  // One float64 loss per position, summed in order after: the total does not depend on the split.
  std::vector<double> losses(static_cast<size_t>(B) * per_row);
  const auto target = [&](size_t b, size_t t) { return tokens[b * T + t + 1]; };
  if (mode == Mode::Recurrent) {
    recurrent_columns(tokens, B, T, [&](int t, const float* column) {
      if (t + 1 == T) return;
      parallel_for(B, 1, [&](size_t b0, size_t b1) {
        for (size_t b = b0; b < b1; b++) losses[b * per_row + t] = cross_entropy(column + b * V, V, target(b, t));
      });
    });
  } else {
    const size_t R = static_cast<size_t>(B) * T;
    Workspace ws(ops_.get(), c_, R);
    hidden_rows(ws, tokens, B, T, mode, C);
    const size_t block = std::min(R, std::max<size_t>(1, kLossBlockFloats / V));
    std::vector<float> logits(block * V);
    for (size_t r0 = 0; r0 < R; r0 += block) {
      const size_t rows = std::min(block, R - r0);
      logits_of_rows(ws, ws.x.data() + r0 * c_.D, static_cast<int>(rows), false, logits.data());
      parallel_for(rows, 16, [&](size_t i0, size_t i1) {
        for (size_t i = i0; i < i1; i++) {
          const size_t b = (r0 + i) / T, t = (r0 + i) % T;
          if (t < per_row) losses[b * per_row + t] = cross_entropy(logits.data() + i * V, V, target(b, t));
        }
      });
    }
  }
  double total = 0;
  for (double loss : losses) total += loss;
  return total;
}

void Model::prefill(DecodeState& state, const int32_t* tokens, int T, Mode mode, int C, float* logits) const {
  const int B = state.batch();
  check_tokens(tokens, static_cast<size_t>(B) * T);
  if (mode == Mode::Recurrent || !ops_->has_chunked_recurrent()) {
    std::vector<int32_t> column(B);
    for (int t = 0; t < T; t++) {
      for (int b = 0; b < B; b++) column[b] = tokens[static_cast<size_t>(b) * T + t];
      step(state, column.data(), logits);
    }
    return;
  }
  state.make_writable();
  std::vector<StateView> views;
  for (int l = 0; l < c_.L; l++) views.push_back(state.layer(c_, l));
  const int segment = mode == Mode::Parallel ? T : std::max(C, kPrefillSegment / C * C);
  const int first = std::min(segment, T);
  Workspace ws(ops_.get(), c_, static_cast<size_t>(B) * first);
  std::vector<int32_t> seg_tokens(static_cast<size_t>(B) * first);
  for (int t0 = 0; t0 < T; t0 += segment) {
    const int n = std::min(segment, T - t0);
    for (int b = 0; b < B; b++)
      std::memcpy(seg_tokens.data() + static_cast<size_t>(b) * n, tokens + static_cast<size_t>(b) * T + t0,
                  n * sizeof(int32_t));
    const int R = B * n;
    ops_->embed(seg_tokens.data(), R, embed_, c_.D, c_.embed_scale, ws.x.data());
    if (emb_ln_) ops_->rmsnorm(ws.x.data(), emb_ln_, ws.x.data(), R, c_.D, c_.eps);
    run_layers(ws, {B, n, c_.H, c_.dk(), c_.dv()}, state.position.data(), &views, mode, C);
    for (int b = 0; b < B; b++) state.position[b] += n;
    if (t0 + n == T) {
      std::vector<int> row_ends(B);
      for (int b = 0; b < B; b++) row_ends[b] = (b + 1) * n;
      logits_of_last_rows(ws, row_ends, logits);
    }
  }
}

void Model::prefill_batch(const std::vector<DecodeState*>& states, const int32_t* tokens,
                          const std::vector<int>& lengths, Mode mode, int C, float* logits) const {
  if (states.size() != lengths.size()) throw std::invalid_argument("prefill_batch: one length per state");
  size_t rows = 0;
  for (size_t i = 0; i < states.size(); i++) {
    if (states[i]->batch() != 1) throw std::invalid_argument("prefill_batch takes batch-1 states");
    if (lengths[i] < 1) throw std::invalid_argument("prefill_batch: every state needs at least one token");
    rows += lengths[i];
  }
  check_tokens(tokens, rows);
  const int segment = mode == Mode::Parallel ? std::numeric_limits<int>::max() : std::max(C, kPrefillSegment / C * C);
  // Alone, prefill() cuts a prompt longer than a segment: those states, and every state in the
  // recurrent form, run alone. The others share two passes, so that each state's numbers never
  // depend on the others: prompts whose products alone are decode dot products (up to
  // dot_product_rows()), in a pass of dot products over all their rows; the rest in a GEMM pass.
  std::vector<size_t> few, many, few_offsets, many_offsets;
  for (size_t i = 0, offset = 0; i < states.size(); offset += lengths[i], i++) {
    if (mode == Mode::Recurrent || !ops_->has_chunked_recurrent() || lengths[i] > segment) {
      prefill(*states[i], tokens + offset, lengths[i], mode, C, logits + i * c_.V);
    } else if (lengths[i] <= dot_product_rows()) {
      few.push_back(i);
      few_offsets.push_back(offset);
    } else {
      many.push_back(i);
      many_offsets.push_back(offset);
    }
  }
  prefill_together(states, tokens, lengths, few, few_offsets, mode, C, true, logits);
  prefill_together(states, tokens, lengths, many, many_offsets, mode, C, false, logits);
}

void Model::prefill_together(const std::vector<DecodeState*>& states, const int32_t* tokens,
                             const std::vector<int>& lengths, const std::vector<size_t>& members,
                             const std::vector<size_t>& offsets, Mode mode, int C, bool rowwise_products,
                             float* logits) const {
  if (members.empty()) return;
  std::vector<Segment> together;
  int row0 = 0;
  for (size_t i : members) {
    states[i]->make_writable();
    together.push_back({row0, lengths[i], states[i]});
    row0 += lengths[i];
  }
  Workspace ws(ops_.get(), c_, static_cast<size_t>(row0));
  std::vector<int32_t> grouped(row0);
  std::vector<int> row_ends;
  for (size_t g = 0; g < together.size(); g++) {
    std::memcpy(grouped.data() + together[g].row0, tokens + offsets[g], together[g].T * sizeof(int32_t));
    row_ends.push_back(together[g].row0 + together[g].T);
  }
  ops_->embed(grouped.data(), row0, embed_, c_.D, c_.embed_scale, ws.x.data());
  if (emb_ln_) ops_->rmsnorm(ws.x.data(), emb_ln_, ws.x.data(), row0, c_.D, c_.eps);
  run_layers(ws, {1, row0, c_.H, c_.dk(), c_.dv()}, nullptr, nullptr, mode, C, &together, rowwise_products);
  for (const Segment& s : together) s.state->position[0] += s.T;
  std::vector<float> grouped_logits(together.size() * static_cast<size_t>(c_.V));
  logits_of_last_rows(ws, row_ends, grouped_logits.data());
  for (size_t g = 0; g < together.size(); g++)
    std::memcpy(logits + members[g] * c_.V, grouped_logits.data() + g * c_.V, c_.V * sizeof(float));
}

void Model::logits_of_last_rows(Workspace& ws, const std::vector<int>& row_ends, float* logits) const {
  Buffer last_x(ops_.get(), row_ends.size() * c_.D);
  for (size_t i = 0; i < row_ends.size(); i++)
    ops_->copy(last_x.data() + i * c_.D, ws.x.data() + static_cast<size_t>(row_ends[i] - 1) * c_.D, c_.D);
  logits_of_rows(ws, last_x.data(), static_cast<int>(row_ends.size()), true, logits);
}

void Model::step(DecodeState& state, const int32_t* tokens, float* logits) const {
  check_tokens(tokens, state.batch());
  auto& scratch = state.scratch_->ws;
  if (!scratch) scratch = std::make_unique<Workspace>(ops_.get(), c_, static_cast<size_t>(state.batch()));
  DecodeState* const one = &state;
  step_rows(&one, 1, *scratch, tokens, state.batch(), logits);
}

void Model::step_batch(const std::vector<DecodeState*>& states, const int32_t* tokens, float* logits) const {
  int rows = 0;
  for (const DecodeState* s : states) rows += s->batch();
  check_tokens(tokens, rows);
  std::lock_guard<std::mutex> lock(batch_mu_);
  if (!batch_ws_ || batch_ws_->rows < static_cast<size_t>(rows))
    batch_ws_ = std::make_unique<Workspace>(ops_.get(), c_, static_cast<size_t>(rows));
  step_rows(states.data(), states.size(), *batch_ws_, tokens, rows, logits);
}

void Model::step_rows(DecodeState* const* states, size_t count, Workspace& ws, const int32_t* tokens, int rows,
                      float* logits) const {
  ops_->embed(tokens, rows, embed_, c_.D, c_.embed_scale, ws.x.data());
  if (emb_ln_) ops_->rmsnorm(ws.x.data(), emb_ln_, ws.x.data(), rows, c_.D, c_.eps);
  const size_t per_row = static_cast<size_t>(c_.H) * c_.dv() * c_.dk();
  ws.row_views.resize(static_cast<size_t>(c_.L) * rows);
  ws.positions.resize(rows);
  int r = 0;
  for (size_t i = 0; i < count; i++) {
    DecodeState* s = states[i];
    s->make_writable();
    for (int b = 0; b < s->batch(); b++, r++) {
      ws.positions[r] = s->position[b];
      for (int l = 0; l < c_.L; l++) {
        const StateView layer = s->layer(c_, l);
        ws.row_views[static_cast<size_t>(l) * rows + r] = {layer.kv + b * per_row, layer.scale + b * c_.H};
      }
    }
  }
  run_layers(ws, {rows, 1, c_.H, c_.dk(), c_.dv()}, ws.positions.data(), &ws.row_views, Mode::Recurrent, 1);
  for (size_t i = 0; i < count; i++)
    for (int64_t& p : states[i]->position) p += 1;
  logits_of_rows(ws, ws.x.data(), rows, true, logits);
}

}  // namespace retnet
