#include "train.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>

namespace retnet {
namespace {

struct RetentionForm {
  int C;
  float clamp_max;
};

RetentionForm retention_form(Mode mode, int T, int C) {
  if (mode == Mode::Parallel) return {T, kParallelClampMax};
  if (mode == Mode::Chunkwise) {
    if (C < 1) throw std::invalid_argument("chunk size must be >= 1");
    return {C, std::numeric_limits<float>::infinity()};
  }
  throw std::invalid_argument("training runs in the parallel or chunkwise form, not recurrent");
}

}  // namespace

// What the backward reads, for R = B*T rows. Each residual block computes
// sum = α·x_in + branch(in) with in = rmsnorm(x_in) (pre-norm) or x_in (post-norm), and
// out = sum (pre-norm) or rmsnorm(sum) (post-norm).
// What one elementwise pass makes from kept values is not kept: the pre-norm branch input,
// the gated retention output z and the GLU output u are made again in the backward, into
// buffers shared by all layers (less activation memory for a few elementwise passes).
struct Trainer::Activations {
  struct Block {
    Buffer sum;  // post-norm: the norm's input
  };
  struct Layer {
    Block ret, ffn;
    Buffer q, k, v, g, o;  // retention: rotated q, k; core output o
    Buffer a, b;           // GLU: fc1 out, gate out
  };
  Buffer normed, z, u;         // one layer's branch input, gated retention output, GLU output
  Buffer embedded;             // embedding before layernorm_embedding
  std::vector<Buffer> stream;  // residual stream: [0] block inputs of layer 0, then each block's output
  std::vector<Layer> layers;
  Buffer final_normed;         // pre-norm: final norm output
  Buffer logits;               // one block of rows' logits, which become their dlogits in place
  // Backward scratch: gradients of the residual stream and of one layer's intermediates.
  Buffer scratch, dx, dh, dq, dk, dz, d_o, dv, dg, du, da, db, dy_branch;
};

namespace {
// Logits held at once by the training head (16 Mi floats: 64 MiB), as whole rows.
constexpr size_t kHeadBlockFloats = size_t{16} << 20;

// Rows per head block: as many as kHeadBlockFloats holds, in whole 256s where that is at least
// 256. The rows are the K of the head's dW product, whose K blocks (at most 256 floats) then
// come out full: at vocabulary 32000, 512 rows instead of 524 took dW from 322-331 to
// 343-359 GFLOP/s (32000 x 512|1024, 2 threads).
int head_block_rows(int V) {
  const int rows = static_cast<int>(kHeadBlockFloats / V);
  return rows >= 256 ? rows / 256 * 256 : rows;
}

// Activation buffers are kept across steps and resized only when the batch shape changes:
// reallocating hundreds of MB per step costs page faults and zeroing. Every buffer is fully
// written before it is read, so stale contents don't matter.
void fit(Buffer& buffer, Ops* ops, size_t n) {
  if (buffer.size() != n) buffer = Buffer(ops, n);
}
}  // namespace

Trainer::Trainer(std::shared_ptr<Model> model)
    : model_(std::move(model)),
      grads_(model_->ops(), model_->parameter_floats()),
      m_(model_->ops(), model_->parameter_floats()),
      v_(model_->ops(), model_->parameter_floats()),
      layer_grads_(model_->config().L) {
  for (int l = 0; l < model_->config().L; l++) {
    const std::string prefix = "layers." + std::to_string(l) + ".";
    GradientSpan& span = layer_grads_[l];
    for (const ParamInfo& p : model_->params()) {
      if (p.name.compare(0, prefix.size(), prefix) != 0) continue;
      span.first = std::min(span.first, p.offset);
      span.end = std::max(span.end, p.offset + p.size);
      span.floats += p.size;
    }
  }
  zero_gradients();
}

Trainer::~Trainer() = default;

// Between steps the gradients take no memory: discarded pages come back zeroed as the
// next backward writes them, while that backward frees the activations it is done with.
void Trainer::zero_gradients() { model_->ops()->discard(grads_.data(), grads_.size()); }

void Trainer::get_gradient(const ParamInfo& p, float* out) const { model_->read_arena_slice(p, grads_.data(), out); }

void Trainer::check_batch(const TrainBatch& batch) const {
  if (batch.B < 1 || batch.T < 1) throw std::invalid_argument("batch and length must be >= 1");
  const size_t n = static_cast<size_t>(batch.B) * batch.T;
  model_->check_tokens(batch.tokens, n);
  const int V = model_->config().V;
  for (size_t i = 0; batch.targets && i < n; i++) {
    if (batch.targets[i] < -1 || batch.targets[i] >= V) {
      throw std::invalid_argument("target " + std::to_string(batch.targets[i]) + " at index " + std::to_string(i) +
                                  " is outside [-1, " + std::to_string(V) + ")");
    }
  }
  for (size_t i = 0; batch.mask && i < n; i++) {
    if (!(batch.mask[i] >= 0) || !std::isfinite(batch.mask[i]))
      throw std::invalid_argument("mask value at index " + std::to_string(i) + " must be finite and >= 0");
  }
}

double Trainer::accumulate_gradients(const TrainBatch& batch, const PassOptions& pass, float loss_scale, uint64_t seed) {
  check_batch(batch);
  const Model& m = *model_;
  const ModelConfig& c = m.config();
  Ops& ops = *m.ops();
  const int B = batch.B, T = batch.T, R = B * T;
  const size_t RD = static_cast<size_t>(R) * c.D;
  const RetentionForm form = retention_form(pass.mode, T, pass.C);
  const Precision products = pass.products;
  if (products != Precision::F32 && std::strcmp(ops.name(), "cpu") != 0)
    throw std::invalid_argument(std::string("precision 'bf16' trains on the CPU only; this model is on ") + ops.name());
  const RetentionDims d{B, T, c.H, c.dk(), c.dv()};
  const std::vector<int64_t> start(B, 0);
  const float k_scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(c.dk())));
  float* arena = m.arena_.data();
  auto grad_of = [&](const float* weight) { return grads_.data() + (weight - arena); };
  // Training-only random ops (spec §8.3). Each site has its own stream; the backward
  // applies the same op to the gradient, which regenerates the same mask.
  auto stream = [&](uint64_t site) { return seed * 0x9e3779b97f4a7c15ULL + site * 0xd1b54a32d192ed03ULL; };
  auto drop_path_rate = [&](int l) { return c.L > 1 ? c.drop_path_rate * static_cast<float>(l) / (c.L - 1) : 0.0f; };
  // Dropout then drop path on a branch output [R, D] (both are diagonal scalings).
  auto drop_branch = [&](float* y, int l, uint64_t site) {
    if (c.dropout > 0) ops.dropout(y, RD, c.dropout, stream(site));
    if (drop_path_rate(l) > 0) ops.drop_path(y, B, static_cast<size_t>(T) * c.D, drop_path_rate(l), stream(site + 1));
  };
  const bool branch_dropped = c.dropout > 0 || c.drop_path_rate > 0;
  // Sites: 0 embedding; per layer l, 1 + 5l + {0, 1: retention branch, 2: activation, 3, 4: FFN branch}.
  auto site = [](int l, int k) { return static_cast<uint64_t>(1 + 5 * l + k); };

  // Targets and per-row loss weights: loss = Σ mask·CE / Σ mask over rows with a target.
  std::vector<int32_t> targets(R);
  std::vector<float> weights(R), row_loss(R);
  double total_mask = 0;
  for (int r = 0; r < R; r++) {
    const int t = r % T;
    targets[r] = batch.targets ? batch.targets[r] : (t + 1 < T ? batch.tokens[r + 1] : -1);
    weights[r] = targets[r] >= 0 ? (batch.mask ? batch.mask[r] : 1.0f) : 0.0f;
    total_mask += weights[r];
  }
  if (!(total_mask > 0)) throw std::invalid_argument("no position has a target with a nonzero mask weight");
  for (int r = 0; r < R; r++) weights[r] = static_cast<float>(weights[r] / total_mask * loss_scale);

  // ---- Forward, keeping activations.
  if (!acts_) acts_ = std::make_unique<Activations>();
  Activations& acts = *acts_;
  const size_t RDv = static_cast<size_t>(R) * c.Dv, RF = static_cast<size_t>(R) * c.F;
  fit(acts.scratch, m.ops(), RD);
  float* const scratch = acts.scratch.data();
  fit(acts.normed, m.ops(), c.pre_norm ? RD : 0);
  fit(acts.z, m.ops(), RDv);
  fit(acts.u, m.ops(), RF);
  // z = groupnorm(o) * swish(g), and u = dropout(act(a) * b): the forward's values, made
  // again for the backward.
  auto gate_retention = [&](const Activations::Layer& a) {
    ops.groupnorm_gate(a.o.data(), a.g.data(), acts.z.data(), R, c.H, c.dv(), c.eps);
  };
  auto glu = [&](const Activations::Layer& a, int l) {
    ops.glu(a.a.data(), a.b.data(), acts.u.data(), RF, c.activation);
    if (c.activation_dropout > 0) ops.dropout(acts.u.data(), RF, c.activation_dropout, stream(site(l, 2)));
  };
  acts.stream.resize(2 * c.L + 1);
  for (Buffer& b : acts.stream) fit(b, m.ops(), RD);
  if (m.emb_ln_) {
    fit(acts.embedded, m.ops(), RD);
    ops.embed(batch.tokens, R, m.embed_, c.D, c.embed_scale, acts.embedded.data());
    ops.rmsnorm(acts.embedded.data(), m.emb_ln_, acts.stream[0].data(), R, c.D, c.eps);
  } else {
    ops.embed(batch.tokens, R, m.embed_, c.D, c.embed_scale, acts.stream[0].data());
  }
  if (c.dropout > 0) ops.dropout(acts.stream[0].data(), RD, c.dropout, stream(0));
  // The branch input: rmsnorm(x_in) (pre-norm, into the shared buffer) or x_in itself.
  auto branch_input = [&](const float* x_in, const float* norm_w) -> const float* {
    if (!c.pre_norm) return x_in;
    ops.rmsnorm(x_in, norm_w, acts.normed.data(), R, c.D, c.eps);
    return acts.normed.data();
  };
  // Runs one residual block; `branch(in, y)` writes the branch output y [R, D].
  auto block_forward = [&](Activations::Block& blk, const float* x_in, const float* norm_w, float* out, int l,
                           uint64_t branch_site, const auto& branch) {
    const float* in = branch_input(x_in, norm_w);
    float* sum = out;
    if (!c.pre_norm) {
      fit(blk.sum, m.ops(), RD);
      sum = blk.sum.data();
    }
    branch(in, scratch);
    drop_branch(scratch, l, branch_site);
    ops.copy(sum, x_in, RD);
    ops.residual(sum, scratch, RD, c.alpha);
    if (!c.pre_norm) ops.rmsnorm(sum, norm_w, out, R, c.D, c.eps);
  };
  // Checkpointing keeps one set of layer activations, rewritten by each layer in turn.
  const bool recompute = pass.checkpoint_activations;
  acts.layers.resize(recompute ? 1 : c.L);
  auto layer_acts = [&](int l) -> Activations::Layer& {
    Activations::Layer& a = acts.layers[recompute ? 0 : l];
    for (Buffer* buf : {&a.q, &a.k}) fit(*buf, m.ops(), RD);
    for (Buffer* buf : {&a.v, &a.g, &a.o}) fit(*buf, m.ops(), RDv);
    for (Buffer* buf : {&a.a, &a.b}) fit(*buf, m.ops(), RF);
    for (Buffer* buf : {&a.q, &a.k, &a.v, &a.g, &a.o, &a.a, &a.b}) ops.populate(buf->data(), buf->size());
    return a;
  };
  // What the backward reads of the two branches, made from their inputs: the rotated q and
  // k, v, g and the retention output o; the GLU inputs a and b.
  auto retention_values = [&](const Model::Layer& w, Activations::Layer& a, const float* in) {
    m.linear(R, c.D, c.D, in, w.q, a.q.data(), products);
    m.linear(R, c.D, c.D, in, w.k, a.k.data(), products);
    m.linear(R, c.Dv, c.D, in, w.v, a.v.data(), products);
    m.linear(R, c.Dv, c.D, in, w.g, a.g.data(), products);
    ops.rotate_qk(a.q.data(), a.k.data(), d, start.data(), m.angle_, k_scale);
    ops.retention_chunked(a.q.data(), a.k.data(), a.v.data(), a.o.data(), d, m.decay_, form.C, form.clamp_max,
                          nullptr);
  };
  auto glu_inputs = [&](const Model::Layer& w, Activations::Layer& a, const float* in) {
    m.linear(R, c.F, c.D, in, w.fc1, a.a.data(), products);
    m.linear(R, c.F, c.D, in, w.gate, a.b.data(), products);
  };
  // Layer l's forward from stream[2l] to stream[2l + 2].
  auto layer_forward = [&](int l) {
    const Model::Layer& w = m.layers_[l];
    Activations::Layer& a = layer_acts(l);
    for (int i : {2 * l + 1, 2 * l + 2}) ops.populate(acts.stream[i].data(), RD);
    block_forward(a.ret, acts.stream[2 * l].data(), w.ret_ln, acts.stream[2 * l + 1].data(), l, site(l, 0),
                  [&](const float* in, float* y) {
                    retention_values(w, a, in);
                    gate_retention(a);
                    m.linear(R, c.D, c.Dv, acts.z.data(), w.out, y, products);
                  });
    block_forward(a.ffn, acts.stream[2 * l + 1].data(), w.ffn_ln, acts.stream[2 * l + 2].data(), l, site(l, 3),
                  [&](const float* in, float* y) {
                    glu_inputs(w, a, in);
                    glu(a, l);
                    m.linear(R, c.D, c.F, acts.u.data(), w.fc2, y, products);
                  });
  };
  // Checkpointing: layer l's values again, just before its backward: the same inputs and ops
  // give the same values. Pre-norm, the block outputs are kept in the stream, so the
  // branches stop short of their output projections; post-norm, the backward also reads each
  // block's sum, which takes the whole forward.
  auto recompute_layer = [&](int l) {
    if (!c.pre_norm) {
      layer_forward(l);
      return;
    }
    const Model::Layer& w = m.layers_[l];
    Activations::Layer& a = layer_acts(l);
    retention_values(w, a, branch_input(acts.stream[2 * l].data(), w.ret_ln));
    glu_inputs(w, a, branch_input(acts.stream[2 * l + 1].data(), w.ffn_ln));
  };
  for (int l = 0; l < c.L; l++) layer_forward(l);
  const float* x_last = acts.stream[2 * c.L].data();
  const float* head_in = x_last;
  if (c.pre_norm) {
    fit(acts.final_normed, m.ops(), RD);
    ops.rmsnorm(x_last, m.final_ln_, acts.final_normed.data(), R, c.D, c.eps);
    head_in = acts.final_normed.data();
  }

  // ---- Backward buffers. dx is the gradient of the residual stream at the current point.
  for (Buffer* buf : {&acts.dx, &acts.dh, &acts.dq, &acts.dk}) fit(*buf, m.ops(), RD);
  for (Buffer* buf : {&acts.dz, &acts.d_o, &acts.dv, &acts.dg}) fit(*buf, m.ops(), RDv);
  for (Buffer* buf : {&acts.du, &acts.da, &acts.db}) fit(*buf, m.ops(), RF);
  fit(acts.dy_branch, m.ops(), branch_dropped ? RD : 0);
  Buffer &dx = acts.dx, &dh = acts.dh, &dq = acts.dq, &dk = acts.dk, &dz = acts.dz, &d_o = acts.d_o, &dv = acts.dv,
         &dg = acts.dg, &du = acts.du, &da = acts.da, &db = acts.db, &dy_branch = acts.dy_branch;

  // ---- Output head, loss and the head's backward, a block of rows at a time: the whole
  // batch's logits (R x V: 262 MB for 2048 rows of a 32k vocabulary) are never held at once.
  // A block's logits become its dlogits in place, then go straight through the backward.
  // Its products stay fp32 whatever `products` says: with a bf16 head (forward and backward)
  // the default run's validation loss strayed up to 1.75% from fp32's, with only its forward
  // fp32 1.1%, and with the whole head fp32 0.8% (two fp32 runs differing only in summation
  // order: 0.6%).
  const int head_rows = std::max(1, std::min(R, head_block_rows(c.V)));
  fit(acts.logits, m.ops(), static_cast<size_t>(head_rows) * c.V);
  ops.populate(acts.logits.data(), acts.logits.size());
  ops.populate(grad_of(m.output_), static_cast<size_t>(c.V) * c.D);
  for (int r0 = 0; r0 < R; r0 += head_rows) {
    const int rows = std::min(head_rows, R - r0);
    const float* x = head_in + static_cast<size_t>(r0) * c.D;
    float* logits = acts.logits.data();
    m.linear(rows, c.V, c.D, x, m.output_, logits, Precision::F32);
    ops.softmax_cross_entropy(logits, targets.data() + r0, weights.data() + r0, rows, c.V, row_loss.data() + r0);
    m.linear_backward(rows, c.V, c.D, x, m.output_, logits, dx.data() + static_cast<size_t>(r0) * c.D,
                      grad_of(m.output_), false, Precision::F32);
  }
  // Activations done with go back to the system only as fast as gradients take new pages
  // (`owed`: gradient floats written in this backward, not yet matched): that keeps the
  // resident set at the head's peak while the gradients fill in, and leaves the rest of the
  // activations resident for the next step instead of faulting (and zeroing) them again.
  size_t owed = static_cast<size_t>(c.V) * c.D;  // the output projection's gradient
  auto hand_back = [&](Buffer& b) {
    if (owed == 0 || b.size() == 0) return;
    ops.discard(b.data(), b.size());
    owed -= std::min(owed, b.size());
  };
  hand_back(acts.logits);
  hand_back(acts.final_normed);
  double loss = 0;
  for (int r = 0; r < R; r++)
    if (targets[r] >= 0) loss += static_cast<double>(row_loss[r]) * (batch.mask ? batch.mask[r] : 1.0f);
  loss /= total_mask;
  if (c.pre_norm) ops.rmsnorm_backward(x_last, m.final_ln_, dx.data(), dx.data(), grad_of(m.final_ln_), R, c.D, c.eps, false);
  // Backward of one residual block given d(out) in dx; leaves d(x_in) in dx.
  // `branch(in, dy, d_in)` turns d(branch output) dy into d(branch input) in d_in.
  auto block_backward = [&](const Activations::Block& blk, const float* x_in, const float* norm_w, int l,
                            uint64_t branch_site, const auto& branch) {
    if (!c.pre_norm) ops.rmsnorm_backward(blk.sum.data(), norm_w, dx.data(), dx.data(), grad_of(norm_w), R, c.D, c.eps, false);
    const float* dy = dx.data();
    if (branch_dropped) {
      ops.copy(dy_branch.data(), dx.data(), RD);
      drop_branch(dy_branch.data(), l, branch_site);
      dy = dy_branch.data();
    }
    branch(branch_input(x_in, norm_w), dy, dh.data());
    if (c.pre_norm) ops.rmsnorm_backward(x_in, norm_w, dh.data(), dh.data(), grad_of(norm_w), R, c.D, c.eps, false);
    ops.residual(dx.data(), dh.data(), RD, c.alpha);
  };
  for (int l = c.L - 1; l >= 0; l--) {
    const Model::Layer& w = m.layers_[l];
    const GradientSpan& span = layer_grads_[l];
    if (span.floats) ops.populate(grads_.data() + span.first, span.end - span.first);
    if (recompute) recompute_layer(l);
    // Sized and written by the forward (or recompute_layer) already.
    const Activations::Layer& a = acts.layers[recompute ? 0 : l];
    block_backward(a.ffn, acts.stream[2 * l + 1].data(), w.ffn_ln, l, site(l, 3),
                   [&](const float* in, const float* dy, float* d_in) {
      glu(a, l);
      m.linear_backward(R, c.D, c.F, acts.u.data(), w.fc2, dy, du.data(), grad_of(w.fc2), false, products);
      if (c.activation_dropout > 0) ops.dropout(du.data(), RF, c.activation_dropout, stream(site(l, 2)));
      ops.glu_backward(a.a.data(), a.b.data(), du.data(), da.data(), db.data(), RF, c.activation);
      m.linear_backward(R, c.F, c.D, in, w.fc1, da.data(), d_in, grad_of(w.fc1), false, products);
      m.linear_backward(R, c.F, c.D, in, w.gate, db.data(), d_in, grad_of(w.gate), true, products);
    });
    block_backward(a.ret, acts.stream[2 * l].data(), w.ret_ln, l, site(l, 0),
                   [&](const float* in, const float* dy, float* d_in) {
      gate_retention(a);
      m.linear_backward(R, c.D, c.Dv, acts.z.data(), w.out, dy, dz.data(), grad_of(w.out), false, products);
      ops.groupnorm_gate_backward(a.o.data(), a.g.data(), dz.data(), d_o.data(), dg.data(), R, c.H, c.dv(), c.eps);
      ops.retention_chunked_backward(a.q.data(), a.k.data(), a.v.data(), d_o.data(), dq.data(), dk.data(), dv.data(),
                                     d, m.decay_, form.C, form.clamp_max);
      ops.rotate_qk_backward(dq.data(), dk.data(), d, start.data(), m.angle_, k_scale);
      m.linear_backward(R, c.D, c.D, in, w.q, dq.data(), d_in, grad_of(w.q), false, products);
      m.linear_backward(R, c.D, c.D, in, w.k, dk.data(), d_in, grad_of(w.k), true, products);
      m.linear_backward(R, c.Dv, c.D, in, w.v, dv.data(), d_in, grad_of(w.v), true, products);
      m.linear_backward(R, c.Dv, c.D, in, w.g, dg.data(), d_in, grad_of(w.g), true, products);
    });
    // Layer l's values are done with (except the one set checkpointing reuses).
    owed += span.floats;
    hand_back(acts.stream[2 * l + 1]);
    hand_back(acts.stream[2 * l + 2]);
    if (!recompute) {
      Activations::Layer& done = acts.layers[l];
      for (Buffer* buf : {&done.v, &done.g, &done.o, &done.a, &done.b, &done.q, &done.k, &done.ret.sum, &done.ffn.sum})
        hand_back(*buf);
    }
  }
  if (c.dropout > 0) ops.dropout(dx.data(), RD, c.dropout, stream(0));
  if (m.emb_ln_)
    ops.rmsnorm_backward(acts.embedded.data(), m.emb_ln_, dx.data(), dx.data(), grad_of(m.emb_ln_), R, c.D, c.eps, false);
  ops.embed_backward(batch.tokens, R, dx.data(), c.D, c.embed_scale, grad_of(m.embed_));
  return loss;
}

StepResult Trainer::step(const std::vector<TrainBatch>& micro, const PassOptions& pass, const OptimizerOptions& opt) {
  if (diverged_at_ > 0) {
    throw std::runtime_error("the parameters are non-finite since step " + std::to_string(diverged_at_) +
                             "'s update; load the last checkpoint");
  }
  if (micro.empty()) throw std::invalid_argument("trainStep needs at least one micro-batch");
  for (const TrainBatch& b : micro) check_batch(b);
  std::vector<size_t> no_decay_offsets;
  for (const std::string& name : opt.no_decay) {
    const ParamInfo* p = model_->find_param(name);
    if (!p) throw std::invalid_argument("noDecay names an unknown parameter " + name);
    no_decay_offsets.push_back(p->offset);
  }
  Ops& ops = *model_->ops();
  StepResult result{0, 0, 0};
  try {
    for (size_t k = 0; k < micro.size(); k++) {
      const TrainBatch& b = micro[k];
      // Each micro-batch draws its own dropout masks.
      const uint64_t micro_seed = opt.seed + k * 0x632be59bd9b4e019ULL;
      result.loss += accumulate_gradients(b, pass, 1.0f / static_cast<float>(micro.size()), micro_seed);
      result.tokens += static_cast<int64_t>(b.B) * b.T;
    }
  } catch (...) {
    zero_gradients();
    throw;
  }
  result.loss /= static_cast<double>(micro.size());
  result.grad_norm = std::sqrt(ops.sum_squares(grads_.data(), grads_.size()));
  if (!std::isfinite(result.grad_norm)) {
    zero_gradients();
    throw std::runtime_error("gradient norm is not finite; parameters left unchanged");
  }
  // torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6) when that is below 1.
  float grad_scale = 1.0f;
  if (opt.clip_norm > 0) grad_scale = static_cast<float>(std::min(1.0, opt.clip_norm / (result.grad_norm + 1e-6)));
  step_++;
  AdamWStep s{opt.lr,
              opt.beta1,
              opt.beta2,
              opt.eps,
              opt.weight_decay,
              static_cast<float>(1.0 - std::pow(static_cast<double>(opt.beta1), static_cast<double>(step_))),
              static_cast<float>(1.0 - std::pow(static_cast<double>(opt.beta2), static_cast<double>(step_))),
              grad_scale};
  float* arena = model_->arena_.data();
  for (const ParamInfo& p : model_->params()) {
    if (is_buffer_param(p)) continue;
    AdamWStep ps = s;
    for (size_t off : no_decay_offsets)
      if (off == p.offset) ps.weight_decay = 0;
    ops.adamw(arena + p.offset, grads_.data() + p.offset, m_.data() + p.offset, v_.data() + p.offset, p.size, ps);
  }
  zero_gradients();
  // An update past the float range (a learning rate too large) leaves parameters that cannot be
  // put back. Later steps refuse to run and saves refuse the weights (readParam checks them), so
  // a checkpoint on disk is never replaced by them. (One read of the weights: base 2x256 steps
  // took 546-606 ms with it and 526-594 without, alternating.)
  if (!ops.all_finite(arena, model_->arena_.size())) {
    diverged_at_ = step_;
    throw std::runtime_error("step " + std::to_string(step_) +
                             "'s update made the parameters non-finite (is the learning rate too large?); load the last checkpoint");
  }
  return result;
}

// The moments go out and come in laid out as the state_dict (rows), whatever the arena's layout.
void Trainer::get_optimizer_state(float* m, float* v) const {
  for (const ParamInfo& p : model_->params()) {
    model_->read_arena_slice(p, m_.data(), m + p.offset);
    model_->read_arena_slice(p, v_.data(), v + p.offset);
  }
}

void Trainer::set_optimizer_state(int64_t step, const float* m, const float* v) {
  if (step < 0) throw std::invalid_argument("optimizer step must be >= 0");
  for (size_t i = 0; i < m_.size(); i++) {
    if (!std::isfinite(m[i]) || !std::isfinite(v[i]) || v[i] < 0)
      throw std::invalid_argument("optimizer state holds a non-finite value or a negative second moment at index " +
                                  std::to_string(i));
  }
  for (const ParamInfo& p : model_->params()) {
    model_->write_arena_slice(p, m_.data(), m + p.offset);
    model_->write_arena_slice(p, v_.data(), v + p.offset);
  }
  step_ = step;
}

}  // namespace retnet
