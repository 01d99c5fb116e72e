// N-API binding: every call that computes runs in an AsyncWorker off the JS thread and
// resolves a Promise, except NativeSampler.sample (tens of microseconds: less than the worker
// round trip). Native objects hold shared_ptrs, so dispose() on the JS side only
// drops a reference and an in-flight call keeps what it uses alive.
#include <napi.h>
#include <v8.h>

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "bench.h"
#include "gemm.h"
#ifdef RETNET_WITH_CUDA
#include "ops_cuda.h"
#endif
#include "model.h"
#include "panels.h"
#include "sampler.h"
#include "threadpool.h"
#include "train.h"

namespace retnet {
namespace {

// The V8 value behind a napi_value, for what N-API has no call for (below): a napi_value is a
// V8 handle (Node's N-API converts them the same way).
v8::Local<v8::Value> v8_value(Napi::Value value) {
  napi_value raw = value;
  v8::Local<v8::Value> local;
  static_assert(sizeof(local) == sizeof(raw), "napi_value is a V8 handle");
  std::memcpy(static_cast<void*>(&local), &raw, sizeof(raw));
  return local;
}

// The memory behind a typed array or ArrayBuffer a worker reads. A reference keeps the JS
// object alive, but a transfer (postMessage, structuredClone) detaches it and hands its memory
// to a new object that a GC may then free under the worker (a restored session read freed
// memory and crashed). Holding the V8 backing store keeps the memory itself: a transfer moves
// that same store.
std::shared_ptr<v8::BackingStore> backing_store_of(Napi::Value value) {
  const v8::Local<v8::Value> local = v8_value(value);
  if (local->IsArrayBufferView()) return local.As<v8::ArrayBufferView>()->Buffer()->GetBackingStore();
  if (local->IsArrayBuffer()) return local.As<v8::ArrayBuffer>()->GetBackingStore();
  return nullptr;
}

// A typed array a worker will read or write in place, checked once the call has read all its
// arguments (their getters may run JS meanwhile). An array detached by then left its pointer
// dangling (a getter transferring it crashed the worker); one on a resizable ArrayBuffer could
// shrink under the worker, which frees the pages it reads. A growable SharedArrayBuffer only
// grows, into memory reserved up front.
void require_stable_array(const Napi::Value& value, const std::string& what) {
  const v8::Local<v8::Value> local = v8_value(value);
  if (!local->IsArrayBufferView()) return;
  const v8::Local<v8::ArrayBuffer> buffer = local.As<v8::ArrayBufferView>()->Buffer();
  if (buffer->WasDetached()) throw std::invalid_argument(what + " was detached while the call read its arguments");
  if (buffer->GetBackingStore()->IsResizableByUserJavaScript())
    throw std::invalid_argument(what + " is on a resizable ArrayBuffer, which could shrink during the call: pass a fixed-length one");
}

// A Promise-returning async worker: `work` runs on a libuv thread, `done` turns the
// result into a JS value on the main thread. JS values the work reads are held in `keep`,
// with the memory of typed arrays (backing_store_of), until the call settles.
class PromiseWorker : public Napi::AsyncWorker {
 public:
  PromiseWorker(Napi::Env env, std::function<void()> work, std::function<Napi::Value(Napi::Env)> done)
      : Napi::AsyncWorker(env, "retnet"),
        deferred_(Napi::Promise::Deferred::New(env)),
        work_(std::move(work)),
        done_(std::move(done)) {}

  void keep(Napi::Value v) {
    kept_.push_back(Napi::Persistent(v));
    if (auto store = backing_store_of(v)) stores_.push_back(std::move(store));
  }
  Napi::Promise promise() const { return deferred_.Promise(); }

  void Execute() override {
    try {
      work_();
    } catch (const std::bad_alloc&) {
      SetError("out of memory");
    } catch (const std::exception& e) {
      SetError(e.what());
    }
  }
  void OnOK() override {
    Napi::Env env = Env();
    release();
    try {
      deferred_.Resolve(done_(env));
    } catch (const Napi::Error& e) {
      deferred_.Reject(e.Value());
    } catch (const std::exception& e) {
      deferred_.Reject(Napi::Error::New(env, e.what()).Value());
    }
  }
  void OnError(const Napi::Error& e) override {
    release();
    deferred_.Reject(e.Value());
  }

 private:
  // On the JS thread, where V8 frees an ArrayBuffer's memory.
  void release() { stores_.clear(); }
  Napi::Promise::Deferred deferred_;
  std::function<void()> work_;
  std::function<Napi::Value(Napi::Env)> done_;
  std::vector<Napi::Reference<Napi::Value>> kept_;
  std::vector<std::shared_ptr<v8::BackingStore>> stores_;
};

// An allocation on the JS thread, sized by the caller's arguments: failing is an Error that
// says what needed the memory, not std::terminate.
template <typename F>
auto or_out_of_memory(Napi::Env env, const std::string& what, F&& allocate) -> decltype(allocate()) {
  try {
    return allocate();
  } catch (const std::bad_alloc&) {
    throw Napi::Error::New(env, "out of memory: " + what);
  }
}

// A host float array handed to JS without a copy.
Napi::Float32Array to_js(Napi::Env env, std::vector<float>&& data) {
  auto* owned = new std::vector<float>(std::move(data));
  Napi::ArrayBuffer ab = Napi::ArrayBuffer::New(env, owned->data(), owned->size() * sizeof(float),
                                                [](Napi::Env, void*, std::vector<float>* v) { delete v; }, owned);
  return Napi::Float32Array::New(env, owned->size(), ab, 0);
}

// Host buffers reused across calls. A fresh buffer per decode step costs a page fault per
// 4 KiB (JS frees the last ones only at its next GC), and faults are slow under
// virtualisation: 0.25-0.4 ms for a 128 KB logits row on the 2-core VM.
std::shared_ptr<std::vector<float>> reused_buffer(size_t n) {
  static std::mutex mu;
  static std::vector<std::vector<float>*> free_list;
  std::vector<float>* b = nullptr;
  {
    std::lock_guard<std::mutex> lock(mu);
    if (!free_list.empty()) {
      b = free_list.back();
      free_list.pop_back();
    }
  }
  if (!b) b = new std::vector<float>();
  b->resize(n);
  return std::shared_ptr<std::vector<float>>(b, [](std::vector<float>* used) {
    std::lock_guard<std::mutex> lock(mu);
    if (free_list.size() < 8) {
      free_list.push_back(used);
    } else {
      delete used;
    }
  });
}

Mode parse_mode(const Napi::Value& v) {
  if (!v.IsString()) throw std::invalid_argument("mode must be 'parallel', 'chunkwise' or 'recurrent'");
  const std::string m = v.As<Napi::String>().Utf8Value();
  if (m == "parallel") return Mode::Parallel;
  if (m == "chunkwise") return Mode::Chunkwise;
  if (m == "recurrent") return Mode::Recurrent;
  throw std::invalid_argument("mode must be 'parallel', 'chunkwise' or 'recurrent', got '" + m + "'");
}

int to_int(const Napi::Value& v, const char* what) {
  if (!v.IsNumber()) throw std::invalid_argument(std::string(what) + " must be a number");
  const double d = v.As<Napi::Number>().DoubleValue();
  if (!(d == std::floor(d)) || d < 0 || d > 2147483647.0) throw std::invalid_argument(std::string(what) + " must be a non-negative integer");
  return static_cast<int>(d);
}

// Throws naming a tensor's first non-finite value as JS prints it: tensor "x" has a
// non-finite value (NaN) at flat index 17.
void require_finite(const std::string& name, const float* p, size_t n) {
  if (all_finite(p, n)) return;
  size_t i = 0;
  while (std::isfinite(p[i])) i++;
  const char* value = std::isnan(p[i]) ? "NaN" : p[i] > 0 ? "Infinity" : "-Infinity";
  throw std::invalid_argument("tensor \"" + name + "\" has a non-finite value (" + value + ") at flat index " + std::to_string(i));
}

// A decode position or a count of steps: any integer a double holds exactly (a long session
// passes 2^31 tokens).
int64_t to_position(const Napi::Value& v, const char* what = "position") {
  if (!v.IsNumber()) throw std::invalid_argument(std::string(what) + " must be a number");
  const double d = v.As<Napi::Number>().DoubleValue();
  if (!(d == std::floor(d)) || d < 0 || d > 9007199254740991.0)
    throw std::invalid_argument(std::string(what) + " must be a non-negative integer");
  return static_cast<int64_t>(d);
}

Napi::Int32Array int32_arg(const Napi::Value& v, const char* what) {
  if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != napi_int32_array)
    throw std::invalid_argument(std::string(what) + " must be an Int32Array");
  return v.As<Napi::Int32Array>();
}

// Token ids are copied when the call is made, then checked and read from the copy: the
// caller may refill its array while the worker runs (a loader reusing one buffer), and ids
// checked in the array but read after a refill indexed the embedding out of bounds.
using Ids = std::shared_ptr<const std::vector<int32_t>>;
Ids copy_ids(const Napi::Int32Array& a) {
  return std::make_shared<const std::vector<int32_t>>(a.Data(), a.Data() + a.ElementLength());
}

Napi::Float32Array float32_arg(const Napi::Value& v, const char* what) {
  if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != napi_float32_array)
    throw std::invalid_argument(std::string(what) + " must be a Float32Array");
  return v.As<Napi::Float32Array>();
}

// The config lib/config.ts resolved; checked again here, each error naming its key.
ModelConfig parse_config(const Napi::Value& config) {
  if (!config.IsObject()) throw std::invalid_argument("config must be an object");
  const Napi::Object o = config.As<Napi::Object>();
  auto num = [&](const char* k) {
    const Napi::Value v = o.Get(k);
    if (!v.IsNumber()) throw std::invalid_argument(std::string("config.") + k + " must be a number");
    return v.As<Napi::Number>().DoubleValue();
  };
  auto dim = [&](const char* k) {
    const double d = num(k);
    if (!(d >= 1 && d <= INT32_MAX && d == std::floor(d)))
      throw std::invalid_argument(std::string("config.") + k + " must be an integer >= 1");
    return static_cast<int>(d);
  };
  auto flag = [&](const char* k) {
    const Napi::Value v = o.Get(k);
    if (!v.IsBoolean()) throw std::invalid_argument(std::string("config.") + k + " must be a boolean");
    return v.As<Napi::Boolean>().Value();
  };
  ModelConfig c{};
  c.V = dim("vocab_size");
  c.D = dim("decoder_embed_dim");
  c.Dv = dim("decoder_value_embed_dim");
  c.H = dim("decoder_retention_heads");
  c.F = dim("decoder_ffn_embed_dim");
  c.L = dim("decoder_layers");
  c.pre_norm = flag("decoder_normalize_before");
  c.layernorm_embedding = flag("layernorm_embedding");
  c.tied = flag("share_decoder_input_output_embed");
  const Napi::Value act_arg = o.Get("activation_fn");
  const std::string act = act_arg.IsString() ? act_arg.As<Napi::String>().Utf8Value() : "";
  if (act != "gelu" && act != "swish" && act != "relu")
    throw std::invalid_argument("config.activation_fn must be 'gelu', 'swish' or 'relu'");
  c.activation = act == "gelu" ? Activation::Gelu : act == "swish" ? Activation::Swish : Activation::Relu;
  const double eps = num("layernorm_eps");
  if (!(eps >= 0 && eps <= FLT_MAX)) throw std::invalid_argument("config.layernorm_eps must be a number >= 0 that float32 holds");
  c.eps = static_cast<float>(eps);
  c.embed_scale = flag("no_scale_embedding") ? 1.0f : static_cast<float>(std::sqrt(static_cast<double>(c.D)));
  c.alpha = flag("deepnorm") ? static_cast<float>(std::pow(2.0 * c.L, 0.25)) : 1.0f;
  auto probability = [&](const char* k) {
    const float p = o.Has(k) ? static_cast<float>(num(k)) : 0.0f;
    if (!(p >= 0 && p < 1)) throw std::invalid_argument(std::string(k) + " must be in [0, 1)");
    return p;
  };
  c.dropout = probability("dropout");
  c.activation_dropout = probability("activation_dropout");
  c.drop_path_rate = probability("drop_path_rate");
  if (c.D % c.H || c.Dv % c.H || c.dk() % 2)
    throw std::invalid_argument("invalid model dimensions: heads must divide decoder_embed_dim and decoder_value_embed_dim into even key dims");
  return c;
}

// Who uses a model's weights: n > 0 readers (forward, prefill, step, getParam) or one
// writer (-1: lossAndGradients, trainStep, setParam, setOptimizerState, which change the
// weights or the shared gradient arena). A conflicting call fails at once instead of waiting.
class AccessGuard {
 public:
  void acquire_read() {
    int cur = count_.load();
    do {
      if (cur < 0) throw std::runtime_error("model is busy with a training call");
    } while (!count_.compare_exchange_weak(cur, cur + 1));
  }
  void release_read() { count_--; }
  void acquire_write() {
    int expected = 0;
    if (!count_.compare_exchange_strong(expected, -1)) throw std::runtime_error("model is busy with another call");
  }
  void release_write() { count_ = 0; }
  // Counts the calls that change the weights (setParam, setParams, trainStep), so a reader
  // that takes them a tensor at a time across several calls (save) can tell they moved.
  void note_weights_changed() { weight_version_++; }
  uint64_t weight_version() const { return weight_version_.load(); }

 private:
  std::atomic<int> count_{0};
  std::atomic<uint64_t> weight_version_{0};
};

// Releases a claim when the worker finishes, whether it succeeded or threw.
struct ReadClaim {
  std::shared_ptr<AccessGuard> guard;
  ~ReadClaim() { guard->release_read(); }
};
struct WriteClaim {
  std::shared_ptr<AccessGuard> guard;
  ~WriteClaim() { guard->release_write(); }
};

Napi::Value get_or_null(const Napi::Object& o, const char* key) {
  return o.Has(key) ? o.Get(key) : o.Env().Null();
}

// Named parameter values from a JS object { name: Float32Array }; `keep` pins the arrays
// while a worker copies them.
struct ParamSource {
  std::string name;
  const float* data;
  size_t n;
};
std::vector<ParamSource> param_sources(const Napi::Value& v, std::vector<Napi::Value>& keep) {
  if (!v.IsObject()) throw std::invalid_argument("tensors must be an object of Float32Arrays");
  Napi::Object obj = v.As<Napi::Object>();
  Napi::Array names = obj.GetPropertyNames();
  std::vector<ParamSource> sources;
  for (uint32_t i = 0; i < names.Length(); i++) {
    const std::string name = names.Get(i).As<Napi::String>().Utf8Value();
    Napi::Float32Array arr = float32_arg(obj.Get(name), name.c_str());
    sources.push_back({name, arr.Data(), arr.ElementLength()});
    keep.push_back(arr);
  }
  for (size_t i = 0; i < sources.size(); i++) require_stable_array(keep[i], "tensor \"" + sources[i].name + "\"");
  return sources;
}

// One training batch, copied out of its JS arrays (as copy_ids, for the same reason): `view`
// points into the copies.
struct OwnedBatch {
  std::vector<int32_t> tokens, targets;
  std::vector<float> mask;
  TrainBatch view{};
};
using Batch = std::shared_ptr<const OwnedBatch>;

Batch parse_batch(const Napi::Value& tokens_v, const Napi::Value& batch_v, const Napi::Value& length_v,
                  const Napi::Value& targets_v, const Napi::Value& mask_v) {
  Napi::Int32Array tokens = int32_arg(tokens_v, "tokens");
  auto b = std::make_shared<OwnedBatch>();
  b->view = TrainBatch{nullptr, to_int(batch_v, "batch"), to_int(length_v, "length"), nullptr, nullptr};
  if (b->view.B < 1 || b->view.T < 1) throw std::invalid_argument("batch and length must be >= 1");
  const size_t n = static_cast<size_t>(b->view.B) * b->view.T;
  if (tokens.ElementLength() != n) throw std::invalid_argument("tokens length is not batch * length");
  b->tokens.assign(tokens.Data(), tokens.Data() + n);
  b->view.tokens = b->tokens.data();
  if (!targets_v.IsNull() && !targets_v.IsUndefined()) {
    Napi::Int32Array targets = int32_arg(targets_v, "targets");
    if (targets.ElementLength() != n) throw std::invalid_argument("targets length is not batch * length");
    b->targets.assign(targets.Data(), targets.Data() + n);
    b->view.targets = b->targets.data();
  }
  if (!mask_v.IsNull() && !mask_v.IsUndefined()) {
    Napi::Float32Array mask = float32_arg(mask_v, "mask");
    if (mask.ElementLength() != n) throw std::invalid_argument("mask length is not batch * length");
    b->mask.assign(mask.Data(), mask.Data() + n);
    b->view.mask = b->mask.data();
  }
  return b;
}

Mode parse_train_mode(const Napi::Value& v) {
  const Mode mode = parse_mode(v);
  if (mode == Mode::Recurrent) throw std::invalid_argument("training mode must be 'parallel' or 'chunkwise'");
  return mode;
}

// What products round their inputs to: 'fp32' (also when absent) or 'bf16'.
Precision parse_precision(const Napi::Value& v) {
  if (v.IsUndefined()) return Precision::F32;
  const std::string s = v.IsString() ? v.As<Napi::String>().Utf8Value() : "";
  if (s == "fp32") return Precision::F32;
  if (s == "bf16") return Precision::BF16;
  throw std::invalid_argument("precision must be 'fp32' or 'bf16'");
}

// Retention form, chunk size, activation checkpointing (absent: off) and the precision of
// the linear products (absent: fp32) of a training pass.
PassOptions parse_pass(const Napi::Value& mode, const Napi::Value& chunk_size, const Napi::Value& checkpoint,
                       const Napi::Value& precision) {
  PassOptions pass{parse_train_mode(mode), to_int(chunk_size, "chunkSize"), false, parse_precision(precision)};
  if (pass.C < 1) throw std::invalid_argument("chunkSize must be >= 1");
  if (!checkpoint.IsUndefined()) {
    if (!checkpoint.IsBoolean()) throw std::invalid_argument("checkpointActivations must be a boolean");
    pass.checkpoint_activations = checkpoint.As<Napi::Boolean>().Value();
  }
  return pass;
}

// The seed of the training-only random ops (dropout, drop path; spec §8.3).
uint64_t parse_seed(const Napi::Value& v) {
  if (!v.IsNumber()) throw std::invalid_argument("seed must be a number");
  const double d = v.As<Napi::Number>().DoubleValue();
  if (!(d == std::floor(d)) || d < 0 || d > 9007199254740991.0) throw std::invalid_argument("seed must be a non-negative safe integer");
  return static_cast<uint64_t>(d);
}

// The backend for createModel's `device` argument: "cpu" or "cuda" (device 0).
std::unique_ptr<Ops> make_ops(const std::string& device) {
  if (device == "cpu") return make_cpu_ops();
  if (device != "cuda") throw std::invalid_argument("device must be 'cpu' or 'cuda', got '" + device + "'");
#ifdef RETNET_WITH_CUDA
  return make_cuda_ops(0);
#else
  throw std::runtime_error("retnet was built without CUDA");
#endif
}

// Per-environment constructors so the addon works in several worker_threads at once.
struct Constructors {
  Napi::FunctionReference model, state, sampler;
};

// Each wrapped class tags the objects it makes, and a wrapped argument is taken only with its
// class's tag: InstanceOf reads the prototype chain, which JS can change (Object.setPrototypeOf,
// Reflect.construct), and Unwrap then reads one class's object as another's (a segfault).
constexpr napi_type_tag kStateTag{0x72657421e3a1d05bULL, 0x8c61f0a3b2d94e01ULL};
constexpr napi_type_tag kSamplerTag{0x72657421e3a1d05bULL, 0x8c61f0a3b2d94e02ULL};
// The Externals a model and a state are constructed from (only this addon makes them).
constexpr napi_type_tag kModelSourceTag{0x72657421e3a1d05bULL, 0x8c61f0a3b2d94e03ULL};
constexpr napi_type_tag kStateSourceTag{0x72657421e3a1d05bULL, 0x8c61f0a3b2d94e04ULL};

// What a wrapped class's constructor was given by this addon, or an Error: JS may call it too.
template <typename T>
T* constructor_source(const Napi::CallbackInfo& info, const napi_type_tag& tag, const char* made_by) {
  if (info.Length() != 1 || !info[0].IsExternal() || !info[0].As<Napi::External<T>>().CheckTypeTag(&tag))
    throw Napi::TypeError::New(info.Env(), std::string("this class is not constructed directly: use ") + made_by);
  return info[0].As<Napi::External<T>>().Data();
}

template <typename T>
T* unwrap_tagged(Napi::Env env, const Napi::Value& v, const napi_type_tag& tag, const std::string& what, const char* type) {
  if (!v.IsObject() || !v.As<Napi::Object>().CheckTypeTag(&tag)) throw Napi::Error::New(env, what + " is not a " + type);
  return Napi::ObjectWrap<T>::Unwrap(v.As<Napi::Object>());
}

// new NativeSampler({ temperature, topK, topP, repetitionPenalty }, seed): one sampler and its
// PRNG stream. sample(logits, history) runs on the calling thread: at vocabulary 32000 it takes
// tens of microseconds, about what queueing a worker would cost. stepBatch may also draw with
// it on its worker (busy meanwhile).
class NativeSampler : public Napi::ObjectWrap<NativeSampler> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "NativeSampler", {InstanceMethod("sample", &NativeSampler::Sample)});
  }

  explicit NativeSampler(const Napi::CallbackInfo& info) : Napi::ObjectWrap<NativeSampler>(info) {
    Napi::Env env = info.Env();
    info.This().As<Napi::Object>().TypeTag(&kSamplerTag);
    try {
      if (!info[0].IsObject()) throw std::invalid_argument("sampler options must be an object");
      Napi::Object o = info[0].As<Napi::Object>();
      const auto number = [&](const char* key) {
        const Napi::Value v = o.Get(key);
        if (!v.IsNumber()) throw std::invalid_argument(std::string(key) + " must be a number");
        return v.As<Napi::Number>().DoubleValue();
      };
      SamplerOptions options;
      options.temperature = number("temperature");
      const double top_k = number("topK");
      if (!(top_k >= 0 && top_k <= 9007199254740991.0 && top_k == std::floor(top_k)))
        throw std::invalid_argument("topK must be an integer >= 0");
      options.top_k = static_cast<size_t>(top_k);
      options.top_p = number("topP");
      options.repetition_penalty = number("repetitionPenalty");
      if (!info[1].IsNumber()) throw std::invalid_argument("seed must be a number");
      const double seed = info[1].As<Napi::Number>().DoubleValue();
      if (!(std::fabs(seed) <= 9007199254740991.0 && seed == std::floor(seed)))
        throw std::invalid_argument("seed must be a safe integer");
      sampler_ = std::make_shared<Sampler>(options, static_cast<int64_t>(seed));
    } catch (const std::exception& e) {
      throw Napi::Error::New(env, e.what());
    }
  }

  // For a draw on a worker: the sampler, and its busy flag, already set by the caller.
  struct Claim {
    std::shared_ptr<Sampler> sampler;
    std::shared_ptr<std::atomic<bool>> busy;
  };
  // Marks the sampler busy, or returns an empty Claim when it is.
  Claim claim() {
    bool expected = false;
    if (!busy_->compare_exchange_strong(expected, true)) return {};
    return {sampler_, busy_};
  }

 private:
  Napi::Value Sample(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (*busy_) throw Napi::Error::New(env, "sampler is busy with a stepBatch call");
    try {
      Napi::Float32Array logits = float32_arg(info[0], "logits");
      Napi::Int32Array history = int32_arg(info[1], "history");
      return Napi::Number::New(env, sampler_->sample(logits.Data(), logits.ElementLength(), history.Data(),
                                                     history.ElementLength()));
    } catch (const std::bad_alloc&) {
      throw Napi::Error::New(env, "out of memory");
    } catch (const std::exception& e) {
      throw Napi::Error::New(env, e.what());
    }
  }

  std::shared_ptr<Sampler> sampler_;
  std::shared_ptr<std::atomic<bool>> busy_ = std::make_shared<std::atomic<bool>>(false);
};

// Clears a busy flag when a worker's work ends, however it ends.
struct BusyRelease {
  std::atomic<bool>* flag;
  ~BusyRelease() { *flag = false; }
};

// Native memory behind a small JS object, told to V8 so that objects dropped without
// dispose() count toward its next collection (a medium state is 28 MB, a model 1 GB).
class ExternalMemory {
 public:
  void hold(Napi::Env env, int64_t bytes) {
    bytes_ = bytes;
    Napi::MemoryManagement::AdjustExternalMemory(env, bytes_);
  }
  void release(Napi::BasicEnv env) {
    if (bytes_ == 0) return;
    Napi::MemoryManagement::AdjustExternalMemory(env, -bytes_);
    bytes_ = 0;
  }

 private:
  int64_t bytes_ = 0;
};

// A decode state plus the model it belongs to; busy guards against two calls at once.
struct StateHandle {
  std::shared_ptr<const Model> model;
  std::shared_ptr<DecodeState> state;
  std::shared_ptr<AccessGuard> access;  // the model binding's, for its weight version
  std::shared_ptr<std::atomic<bool>> busy = std::make_shared<std::atomic<bool>>(false);
};

class NativeState : public Napi::ObjectWrap<NativeState> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "NativeState",
                       {InstanceMethod("positions", &NativeState::Positions),
                        InstanceMethod("clone", &NativeState::Clone),
                        InstanceMethod("exportState", &NativeState::Export),
                        InstanceMethod("saveState", &NativeState::Save),
                        InstanceMethod("importState", &NativeState::Import),
                        InstanceMethod("dispose", &NativeState::Dispose)});
  }
  explicit NativeState(const Napi::CallbackInfo& info) : Napi::ObjectWrap<NativeState>(info) {
    handle_ = *constructor_source<StateHandle>(info, kStateSourceTag, "NativeModel.createState()");
    info.This().As<Napi::Object>().TypeTag(&kStateTag);
    external_.hold(info.Env(), static_cast<int64_t>((handle_.state->kv_size() + handle_.state->scale_size()) * sizeof(float)));
  }
  ~NativeState() override { external_.release(Env()); }

  static Napi::Object Wrap(Napi::Env env, const StateHandle& h) {
    StateHandle copy = h;
    Napi::External<StateHandle> source = Napi::External<StateHandle>::New(env, &copy);
    source.TypeTag(&kStateSourceTag);
    return env.GetInstanceData<Constructors>()->state.New({source});
  }

  StateHandle& handle(Napi::Env env) {
    if (!handle_.state) throw Napi::Error::New(env, "decode state was disposed");
    return handle_;
  }

 private:
  Napi::Value Positions(const Napi::CallbackInfo& info) {
    StateHandle& h = handle(info.Env());
    Napi::Array out = Napi::Array::New(info.Env(), h.state->position.size());
    for (size_t i = 0; i < h.state->position.size(); i++) out[i] = static_cast<double>(h.state->position[i]);
    return out;
  }
  Napi::Value Clone(const Napi::CallbackInfo& info) {
    StateHandle& h = handle(info.Env());
    if (*h.busy) throw Napi::Error::New(info.Env(), "decode state is busy with another call");
    StateHandle c{h.model,
                  or_out_of_memory(info.Env(), "a clone of a decode state",
                                   [&] { return std::make_shared<DecodeState>(*h.model, h.state->batch()); }),
                  h.access};
    c.state->share_from(*h.state);  // copied on a worker when either is written
    return Wrap(info.Env(), c);
  }
  // The state's kv and scale into host memory: zeros while the state has no memory.
  static void download(const StateHandle& h, float* kv, float* scale) {
    const DecodeState& s = *h.state;
    if (!s.materialized()) {
      std::fill(kv, kv + s.kv_size(), 0.f);
      std::fill(scale, scale + s.scale_size(), 0.f);
      return;
    }
    h.model->ops()->download(kv, s.kv(), s.kv_size());
    h.model->ops()->download(scale, s.scale(), s.scale_size());
  }
  Napi::Value Export(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    StateHandle& h = handle(env);
    if (*h.busy) throw Napi::Error::New(env, "decode state is busy with another call");
    std::vector<float> kv(h.state->kv_size()), scale(h.state->scale_size());
    download(h, kv.data(), scale.data());
    Napi::Object out = Napi::Object::New(env);
    out.Set("kv", to_js(env, std::move(kv)));
    out.Set("scale", to_js(env, std::move(scale)));
    out.Set("positions", Positions(info));
    return out;
  }
  // saveState(prefix: Uint8Array, a multiple of 4 bytes) -> Promise<Buffer>: `prefix`, then kv
  // and scale as float32 (exportState's order), assembled on a worker: a medium state is 28 MB,
  // whose copy and page faults held the JS thread for 12-150 ms.
  Napi::Value Save(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    StateHandle h = handle(env);
    if (!info[0].IsTypedArray() || info[0].As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array ||
        info[0].As<Napi::Uint8Array>().ElementLength() % sizeof(float) != 0)
      throw Napi::TypeError::New(env, "saveState: prefix must be a Uint8Array of a multiple of 4 bytes");
    Napi::Uint8Array prefix_arg = info[0].As<Napi::Uint8Array>();
    const size_t prefix_floats = prefix_arg.ElementLength() / sizeof(float);
    const size_t floats = prefix_floats + h.state->kv_size() + h.state->scale_size();
    auto out = std::make_shared<std::vector<float>>();
    auto prefix = std::make_shared<std::vector<float>>(prefix_floats);
    std::memcpy(prefix->data(), prefix_arg.Data(), prefix_arg.ElementLength());
    bool expected = false;
    if (!h.busy->compare_exchange_strong(expected, true)) throw Napi::Error::New(env, "decode state is busy with another call");
    auto* worker = new PromiseWorker(
        env,
        [h, prefix, out, floats] {
          BusyRelease release{h.busy.get()};
          out->resize(floats);
          std::copy(prefix->begin(), prefix->end(), out->begin());
          float* kv = out->data() + prefix->size();
          download(h, kv, kv + h.state->kv_size());
        },
        [out](Napi::Env env) -> Napi::Value {
          auto* owned = new std::vector<float>(std::move(*out));
          return Napi::Buffer<uint8_t>::New(env, reinterpret_cast<uint8_t*>(owned->data()), owned->size() * sizeof(float),
                                            [](Napi::Env, uint8_t*, std::vector<float>* v) { delete v; }, owned);
        });
    worker->keep(info.This());
    worker->Queue();
    return worker->promise();
  }
  // importState(kv, scale, positions) -> Promise<void>: the sizes, scale and positions are
  // checked here (they are small) and the positions set; kv is checked for non-finite values
  // and copied into the state on a worker, which keeps `kv` alive and reads it then (a medium
  // state is 28 MB: its check, copy and page faults held the JS thread for 5-56 ms).
  Napi::Value Import(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    StateHandle h = handle(env);
    if (*h.busy) throw Napi::Error::New(env, "decode state is busy with another call");
    Napi::Float32Array kv;
    auto scale = std::make_shared<std::vector<float>>();
    std::vector<int64_t> positions;
    try {
      kv = float32_arg(info[0], "kv");
      Napi::Float32Array scale_arg = float32_arg(info[1], "scale");
      if (!info[2].IsArray()) throw std::invalid_argument("positions must be an array");
      Napi::Array pos = info[2].As<Napi::Array>();
      if (kv.ElementLength() != h.state->kv_size() || scale_arg.ElementLength() != h.state->scale_size() ||
          pos.Length() != h.state->position.size())
        throw std::invalid_argument("state sizes do not match this model and batch");
      scale->assign(scale_arg.Data(), scale_arg.Data() + scale_arg.ElementLength());
      for (float x : *scale)
        if (!(x >= 0) || !std::isfinite(x)) throw std::invalid_argument("state scale must be finite and >= 0");
      for (uint32_t i = 0; i < pos.Length(); i++) positions.push_back(to_position(pos.Get(i)));
      require_stable_array(kv, "kv");
    } catch (const std::exception& e) {
      throw Napi::Error::New(env, e.what());
    }
    bool expected = false;
    if (!h.busy->compare_exchange_strong(expected, true)) throw Napi::Error::New(env, "decode state is busy with another call");
    h.state->position = std::move(positions);
    // An imported state is taken as made by the weights of now: nothing records which made it.
    h.state->weights_version = h.access->weight_version();
    const float* kv_data = kv.Data();
    auto* worker = new PromiseWorker(
        env,
        [h, kv_data, scale] {
          BusyRelease release{h.busy.get()};
          if (!all_finite(kv_data, h.state->kv_size())) throw std::invalid_argument("state holds a non-finite value");
          h.state->load(kv_data, scale->data());
        },
        [](Napi::Env env) -> Napi::Value { return env.Undefined(); });
    worker->keep(kv);
    worker->Queue();
    return worker->promise();
  }
  Napi::Value Dispose(const Napi::CallbackInfo& info) {
    handle_.state.reset();
    handle_.model.reset();
    external_.release(info.Env());
    return info.Env().Undefined();
  }

  StateHandle handle_;
  ExternalMemory external_;
};

// The NativeState `v` holds, or an Error naming `what`.
NativeState* unwrap_state(Napi::Env env, const Napi::Value& v, const std::string& what) {
  return unwrap_tagged<NativeState>(env, v, kStateTag, what, "NativeState");
}

// A draw made on a worker for one batch-1 state, with that state's sampler.
struct Draw {
  NativeSampler* wrap = nullptr;  // JS thread only
  NativeSampler::Claim sampler;   // claimed (busy) until the work ends
  std::vector<int32_t> history;   // copied: JS may change its array while the worker reads
  size_t vocab = 0, row = 0;      // row: in the logits
  int32_t token = -1;
};

// What a call on several states holds until its work ends: the states and samplers it
// claimed (busy) and a read claim on the model. release() frees them, on the worker.
struct StatesClaim {
  std::shared_ptr<Model> model;
  std::vector<StateHandle> handles;
  std::vector<Draw> draws;  // one per state with `sampling`, else none
  std::shared_ptr<AccessGuard> guard;

  std::vector<DecodeState*> states() const {
    std::vector<DecodeState*> s;
    for (const StateHandle& h : handles) s.push_back(h.state.get());
    return s;
  }
  // Each state's next token from its logits rows (`V` floats each), on both threads: the
  // draws of a batch take about as long as a small model's step.
  void draw(const float* logits, size_t V) {
    parallel_for(draws.size(), 1, [&](size_t d0, size_t d1) {
      for (size_t i = d0; i < d1; i++) {
        Draw& d = draws[i];
        if (d.sampler.sampler)
          d.token = d.sampler.sampler->sample(logits + d.row * V, d.vocab, d.history.data(), d.history.size());
      }
    });
  }
  void release() {
    for (const StateHandle& h : handles) *h.busy = false;
    handles.clear();
    for (Draw& d : draws)
      if (d.sampler.busy) *d.sampler.busy = false;
    draws.clear();
    if (guard) guard->release_read();
    guard.reset();
  }
  ~StatesClaim() { release(); }
};

// What decodeRun's caller changes while the run goes on.
struct DecodeRunControl {
  std::atomic<int64_t> granted{0};  // steps the run may take in all
  std::atomic<bool> stopped{false};
};

// decodeRun's worker: decode steps on one libuv thread, each state's drawn token fed back as
// its next one, each step's tokens sent to JS in order. AsyncProgressQueueWorker delivers
// every Send before OnOK, so `done` settles after the last onStep.
class DecodeRunWorker : public Napi::AsyncProgressQueueWorker<int32_t> {
 public:
  DecodeRunWorker(Napi::Env env, std::shared_ptr<StatesClaim> claim, std::vector<int32_t> tokens,
                  std::vector<int64_t> max_steps, std::vector<std::vector<int32_t>> stop_tokens,
                  std::shared_ptr<DecodeRunControl> control, Napi::Function on_step)
      : Napi::AsyncProgressQueueWorker<int32_t>(env),
        deferred_(Napi::Promise::Deferred::New(env)),
        claim_(std::move(claim)),
        tokens_(std::move(tokens)),
        max_steps_(std::move(max_steps)),
        stop_tokens_(std::move(stop_tokens)),
        control_(std::move(control)),
        on_step_(Napi::Persistent(on_step)) {}

  Napi::Promise promise() const { return deferred_.Promise(); }

  void Execute(const ExecutionProgress& progress) override {
    struct Release {
      StatesClaim& c;
      ~Release() { c.release(); }
    } release{*claim_};
    try {
      const size_t V = static_cast<size_t>(claim_->model->config().V);
      const std::vector<DecodeState*> states = claim_->states();
      auto logits = reused_buffer(states.size() * V);
      for (int64_t step = 1;; step++) {
        claim_->model->step_batch(states, tokens_.data(), logits->data());
        claim_->draw(logits->data(), V);
        bool ends = control_->stopped || step >= control_->granted;
        for (size_t i = 0; i < states.size(); i++) {
          Draw& d = claim_->draws[i];
          tokens_[i] = d.token;
          if (d.sampler.sampler->penalizes()) d.history.push_back(d.token);
          const std::vector<int32_t>& stops = stop_tokens_[i];
          ends = ends || step >= max_steps_[i] || std::find(stops.begin(), stops.end(), d.token) != stops.end();
        }
        progress.Send(tokens_.data(), tokens_.size());
        steps_ = step;
        if (ends) break;
      }
    } catch (const std::bad_alloc&) {
      SetError("out of memory");
    } catch (const std::exception& e) {
      SetError(e.what());
    }
  }

  void OnProgress(const int32_t* tokens, size_t count) override {
    Napi::Env env = Env();
    Napi::HandleScope scope(env);
    if (!callback_error_.IsEmpty()) return;
    // One array for the whole run, refilled each step: onStep reads it during its call.
    if (drawn_.IsEmpty()) drawn_ = Napi::Persistent(Napi::Int32Array::New(env, count));
    Napi::Int32Array drawn = drawn_.Value();
    std::copy(tokens, tokens + count, drawn.Data());
    try {
      on_step_.Call({drawn});
    } catch (const Napi::Error& e) {
      // The run stops at its next step and `done` rejects with what onStep threw. That may be
      // any value, and only an object can be held by reference: it is kept in one.
      Napi::Object holder = Napi::Object::New(env);
      holder.Set("thrown", e.Value());
      callback_error_ = Napi::Persistent(holder);
      control_->stopped = true;
    }
  }
  void OnOK() override {
    if (!callback_error_.IsEmpty()) {
      deferred_.Reject(callback_error_.Value().Get("thrown"));
    } else {
      deferred_.Resolve(Napi::Number::New(Env(), static_cast<double>(steps_)));
    }
  }
  void OnError(const Napi::Error& e) override { deferred_.Reject(e.Value()); }

 private:
  Napi::Promise::Deferred deferred_;
  std::shared_ptr<StatesClaim> claim_;
  std::vector<int32_t> tokens_;
  std::vector<int64_t> max_steps_;
  std::vector<std::vector<int32_t>> stop_tokens_;
  std::shared_ptr<DecodeRunControl> control_;
  Napi::FunctionReference on_step_;
  Napi::Reference<Napi::Int32Array> drawn_;
  Napi::ObjectReference callback_error_;
  int64_t steps_ = 0;
};

class NativeModel : public Napi::ObjectWrap<NativeModel> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "NativeModel",
                       {InstanceMethod("forward", &NativeModel::Forward),
                        InstanceMethod("lossSum", &NativeModel::LossSum),
                        InstanceMethod("createState", &NativeModel::CreateState),
                        InstanceMethod("prefill", &NativeModel::Prefill),
                        InstanceMethod("step", &NativeModel::Step),
                        InstanceMethod("stepBatch", &NativeModel::StepBatch),
                        InstanceMethod("decodeRun", &NativeModel::DecodeRun),
                        InstanceMethod("prefillBatch", &NativeModel::PrefillBatch),
                        InstanceMethod("getParam", &NativeModel::GetParam),
                        InstanceMethod("readParam", &NativeModel::ReadParam),
                        InstanceMethod("paramNames", &NativeModel::ParamNames),
                        InstanceMethod("setParam", &NativeModel::SetParam),
                        InstanceMethod("resetOptimizer", &NativeModel::ResetOptimizer),
                        InstanceMethod("setParams", &NativeModel::SetParams),
                        InstanceMethod("weightVersion", &NativeModel::WeightVersion),
                        InstanceMethod("setWeightFormat", &NativeModel::SetWeightFormat),
                        InstanceMethod("lossAndGradients", &NativeModel::LossAndGradients),
                        InstanceMethod("trainStep", &NativeModel::TrainStep),
                        InstanceMethod("readOptimizerState", &NativeModel::ReadOptimizerState),
                        InstanceMethod("setOptimizerState", &NativeModel::SetOptimizerState),
                        InstanceMethod("dispose", &NativeModel::Dispose)});
  }
  explicit NativeModel(const Napi::CallbackInfo& info) : Napi::ObjectWrap<NativeModel>(info) {
    model_ = *constructor_source<std::shared_ptr<Model>>(info, kModelSourceTag, "createModel()");
    external_.hold(info.Env(), static_cast<int64_t>(model_->parameter_floats() * sizeof(float)));
  }
  ~NativeModel() override { external_.release(Env()); }

  // createModel(config, tensors: { name: Float32Array }, device = 'cpu') -> Promise<NativeModel>.
  // Parameters not given start at zero; setParams fills them in later.
  static Napi::Value Create(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    ModelConfig config;
    std::vector<ParamSource> sources;
    std::vector<Napi::Value> keep;
    std::string device = "cpu";
    try {
      config = parse_config(info[0]);
      if (info.Length() > 2 && !info[2].IsUndefined()) {
        if (!info[2].IsString()) throw std::invalid_argument("device must be a string");
        device = info[2].As<Napi::String>().Utf8Value();
      }
      sources = param_sources(info[1], keep);
    } catch (const std::exception& e) {
      throw Napi::Error::New(env, e.what());
    }
    auto result = std::make_shared<std::shared_ptr<Model>>();
    auto* worker = new PromiseWorker(
        env,
        [config, sources, result, device] {
          auto model = std::make_shared<Model>(make_ops(device), config);
          for (const ParamSource& s : sources) model->set_param(s.name, s.data, s.n);
          *result = model;
        },
        [result](Napi::Env env) -> Napi::Value {
          Napi::External<std::shared_ptr<Model>> source = Napi::External<std::shared_ptr<Model>>::New(env, result.get());
          source.TypeTag(&kModelSourceTag);
          return env.GetInstanceData<Constructors>()->model.New({source});
        });
    for (const Napi::Value& v : keep) worker->keep(v);
    worker->Queue();
    return worker->promise();
  }

 private:
  std::shared_ptr<Model> model(Napi::Env env) {
    if (!model_) throw Napi::Error::New(env, "model was disposed");
    return model_;
  }

  // The arguments of forward and lossSum: (tokens: Int32Array [B*T], B, T, mode, chunk), the ids
  // copied and checked; `min_length` is the shortest T the call takes.
  struct SequenceArgs {
    Ids ids;
    int B, T, C;
    Mode mode;
  };
  SequenceArgs parse_sequences(const Napi::CallbackInfo& info, const Model& m, int min_length) {
    try {
      Napi::Int32Array tokens = int32_arg(info[0], "tokens");
      SequenceArgs a{nullptr, to_int(info[1], "batch"), to_int(info[2], "length"), to_int(info[4], "chunkSize"), parse_mode(info[3])};
      if (a.B < 1 || a.T < min_length || a.C < 1)
        throw std::invalid_argument("batch and chunkSize must be >= 1 and length >= " + std::to_string(min_length));
      if (tokens.ElementLength() != static_cast<size_t>(a.B) * a.T) throw std::invalid_argument("tokens length is not batch * length");
      a.ids = copy_ids(tokens);
      m.check_tokens(a.ids->data(), a.ids->size());
      return a;
    } catch (const std::exception& e) {
      throw Napi::Error::New(info.Env(), e.what());
    }
  }

  // forward(tokens: Int32Array, B, T, mode, chunk) -> Promise<Float32Array [B,T,V]>
  Napi::Value Forward(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto m = model(env);
    const SequenceArgs a = parse_sequences(info, *m, 1);
    auto out = std::make_shared<std::vector<float>>();
    auto guard = claim_read(env);
    auto* worker = new PromiseWorker(
        env,
        [m, out, a, guard] {
          ReadClaim claim{guard};
          out->resize(static_cast<size_t>(a.B) * a.T * m->config().V);
          m->forward(a.ids->data(), a.B, a.T, a.mode, a.C, out->data());
        },
        [out](Napi::Env env) -> Napi::Value { return to_js(env, std::move(*out)); });
    worker->Queue();
    return worker->promise();
  }

  // lossSum(tokens: Int32Array, B, T (>= 2), mode, chunk) -> Promise<number>: Model::next_token_loss_sum.
  Napi::Value LossSum(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto m = model(env);
    const SequenceArgs a = parse_sequences(info, *m, 2);
    auto result = std::make_shared<double>(0);
    auto guard = claim_read(env);
    auto* worker = new PromiseWorker(
        env,
        [m, a, guard, result] {
          ReadClaim claim{guard};
          *result = m->next_token_loss_sum(a.ids->data(), a.B, a.T, a.mode, a.C);
        },
        [result](Napi::Env env) -> Napi::Value { return Napi::Number::New(env, *result); });
    worker->Queue();
    return worker->promise();
  }

  Napi::Value CreateState(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto m = model(env);
    int batch;
    try {
      batch = to_int(info[0], "batch");
      if (batch < 1 || batch > kMaxDecodeBatch)
        throw std::invalid_argument("batch must be from 1 to " + std::to_string(kMaxDecodeBatch) + ", got " + std::to_string(batch));
    } catch (const std::exception& e) {
      throw Napi::Error::New(env, e.what());
    }
    auto state = or_out_of_memory(env, "a decode state of batch " + std::to_string(batch),
                                  [&] { return std::make_shared<DecodeState>(*m, batch); });
    state->weights_version = access_->weight_version();
    return NativeState::Wrap(env, StateHandle{m, state, access_});
  }

  // Shared by prefill and step: claims the state, runs `work`, releases it, resolves logits:
  // a new Float32Array, or `into` (checked by the caller to hold batch * V) filled in place.
  Napi::Value RunOnState(Napi::Env env, const Napi::Value& state_arg,
                         std::function<void(const Model&, DecodeState&, float*)> work,
                         Napi::Float32Array into = Napi::Float32Array()) {
    auto m = model(env);
    StateHandle h = unwrap_state(env, state_arg, "state")->handle(env);
    if (h.model != m) throw Napi::Error::New(env, "state belongs to another model");
    try {
      require_current_weights(*h.state, "");
    } catch (const std::exception& e) {
      throw Napi::Error::New(env, e.what());
    }
    const size_t n = static_cast<size_t>(h.state->batch()) * m->config().V;
    std::shared_ptr<Napi::Reference<Napi::Float32Array>> target;
    if (!into.IsEmpty()) target = std::make_shared<Napi::Reference<Napi::Float32Array>>(Napi::Persistent(into));
    auto out = or_out_of_memory(env, "logits of " + std::to_string(h.state->batch()) + " rows", [&] {
      return target ? reused_buffer(n) : std::make_shared<std::vector<float>>(n);
    });
    bool expected = false;
    if (!h.busy->compare_exchange_strong(expected, true)) throw Napi::Error::New(env, "decode state is busy with another call");
    std::shared_ptr<AccessGuard> guard;
    try {
      guard = claim_read(env);
    } catch (...) {
      *h.busy = false;
      throw;
    }
    // The weights cannot change while the read claim is held: the call advances it with these.
    h.state->weights_version = access_->weight_version();
    auto* worker = new PromiseWorker(
        env,
        [h, out, work, guard] {
          ReadClaim claim{guard};
          BusyRelease release{h.busy.get()};
          work(*h.model, *h.state, out->data());
        },
        [out, target, n](Napi::Env env) -> Napi::Value {
          if (!target) return to_js(env, std::move(*out));
          // Filled here on the JS thread, not by the worker: JS may have detached the buffer since.
          Napi::Float32Array dst = target->Value();
          if (dst.ElementLength() != n) throw std::invalid_argument("the logits buffer was detached during the call");
          std::memcpy(dst.Data(), out->data(), n * sizeof(float));
          return dst;
        });
    worker->keep(state_arg);
    worker->Queue();
    return worker->promise();
  }

  // prefill(state, tokens: Int32Array [B*T], T, mode, chunk) -> Promise<Float32Array [B,V]>
  Napi::Value Prefill(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Ids ids;
    int T, C;
    Mode mode;
    try {
      Napi::Int32Array tokens = int32_arg(info[1], "tokens");
      T = to_int(info[2], "length");
      mode = parse_mode(info[3]);
      C = to_int(info[4], "chunkSize");
      if (T < 1 || C < 1) throw std::invalid_argument("length and chunkSize must be >= 1");
      const int B = unwrap_state(env, info[0], "state")->handle(env).state->batch();
      if (tokens.ElementLength() != static_cast<size_t>(B) * T) throw std::invalid_argument("tokens length is not batch * length");
      ids = copy_ids(tokens);
      model(env)->check_tokens(ids->data(), ids->size());
    } catch (const std::exception& e) {
      throw Napi::Error::New(env, e.what());
    }
    return RunOnState(env, info[0], [ids, T, mode, C](const Model& m, DecodeState& s, float* logits) {
      m.prefill(s, ids->data(), T, mode, C, logits);
    });
  }

  // The states of a call on several states (`call` in its errors): this model's, with current
  // weights, each once. `rows` gets the sum of rows_of.
  std::vector<StateHandle> parse_states(Napi::Env env, const char* call, const Napi::Value& states_arg,
                                        const std::function<int(const DecodeState&)>& rows_of, size_t& rows) {
    auto m = model(env);
    if (!states_arg.IsArray()) throw std::invalid_argument(std::string(call) + ": states must be an array of NativeState");
    Napi::Array arr = states_arg.As<Napi::Array>();
    if (arr.Length() == 0) throw std::invalid_argument(std::string(call) + " needs at least one state");
    std::vector<StateHandle> handles;
    rows = 0;
    for (uint32_t i = 0; i < arr.Length(); i++) {
      Napi::Value v = arr.Get(i);
      StateHandle h = unwrap_state(env, v, "states[" + std::to_string(i) + "]")->handle(env);
      if (h.model != m) throw std::invalid_argument("states[" + std::to_string(i) + "] belongs to another model");
      for (const StateHandle& other : handles)
        if (other.state == h.state) throw std::invalid_argument("states[" + std::to_string(i) + "] appears twice");
      require_current_weights(*h.state, "states[" + std::to_string(i) + "]: ");
      rows += rows_of(*h.state);
      handles.push_back(h);
    }
    return handles;
  }

  // `sampling`'s samplers, histories and vocab sizes (one entry per state, batch-1 states; a
  // null sampler draws nothing) as draws from logits rows of V floats.
  std::vector<Draw> parse_draws(Napi::Env env, const Napi::Value& sampling_arg, const std::vector<StateHandle>& handles,
                                size_t V) {
    if (!sampling_arg.IsObject()) throw std::invalid_argument("sampling must be an object");
    Napi::Object o = sampling_arg.As<Napi::Object>();
    const size_t n = handles.size();
    const Napi::Value samplers = o.Get("samplers"), histories = o.Get("histories");
    if (!samplers.IsArray() || samplers.As<Napi::Array>().Length() != n || !histories.IsArray() ||
        histories.As<Napi::Array>().Length() != n)
      throw std::invalid_argument("sampling.samplers and sampling.histories need one entry per state");
    const Napi::Int32Array vocab = int32_arg(o.Get("vocab"), "sampling.vocab");
    if (vocab.ElementLength() != n) throw std::invalid_argument("sampling.vocab needs one entry per state");
    std::vector<Draw> draws(n);
    for (uint32_t i = 0, row = 0; i < n; row += handles[i].state->batch(), i++) {
      const Napi::Value sv = samplers.As<Napi::Array>().Get(i);
      if (sv.IsNull() || sv.IsUndefined()) continue;
      const std::string name = "sampling.samplers[" + std::to_string(i) + "]";
      Draw& d = draws[i];
      d.wrap = unwrap_tagged<NativeSampler>(env, sv, kSamplerTag, name, "NativeSampler");
      if (vocab[i] < 1 || static_cast<size_t>(vocab[i]) > V)
        throw std::invalid_argument("sampling.vocab[" + std::to_string(i) + "] must be in [1, " + std::to_string(V) + "]");
      const std::string hname = "sampling.histories[" + std::to_string(i) + "]";
      const Napi::Int32Array history = int32_arg(histories.As<Napi::Array>().Get(i), hname.c_str());
      for (const Draw& other : draws)
        if (&other != &d && other.wrap == d.wrap) throw std::invalid_argument(name + " appears twice");
      d.history.assign(history.Data(), history.Data() + history.ElementLength());
      d.vocab = static_cast<size_t>(vocab[i]);
      d.row = row;
    }
    return draws;
  }

  // Claims every state and sampler of `claim` (or none) and the model for reading.
  void claim_states(Napi::Env env, StatesClaim& claim) {
    std::vector<StateHandle> handles = std::move(claim.handles);
    std::vector<Draw> draws = std::move(claim.draws);
    claim.handles.clear();
    claim.draws.clear();
    for (size_t i = 0; i < handles.size(); i++) {
      bool expected = false;
      if (!handles[i].busy->compare_exchange_strong(expected, true)) {
        claim.release();
        throw Napi::Error::New(env, "decode state " + std::to_string(i) + " is busy with another call");
      }
      claim.handles.push_back(handles[i]);
    }
    for (size_t i = 0; i < draws.size(); i++) {
      Draw& d = draws[i];
      if (d.wrap) {
        d.sampler = d.wrap->claim();
        if (!d.sampler.sampler) {
          claim.release();
          throw Napi::Error::New(env, "sampling.samplers[" + std::to_string(i) + "] is busy with another call");
        }
      }
      claim.draws.push_back(std::move(d));
    }
    try {
      claim.guard = claim_read(env);
    } catch (...) {
      claim.release();
      throw;
    }
    for (const StateHandle& h : claim.handles) h.state->weights_version = access_->weight_version();
  }

  // A call (named `call` in its errors) on several states at once, each owning
  // `rows_of(state)` logits rows: claims every state (or none) and the model for reading, runs
  // `work` on a worker and resolves the logits [sum of rows, V], or with `outputs` (one
  // Float32Array per state, its rows * V floats) fills those on the JS thread and resolves
  // `outputs`. `check(total rows)` validates the rest of the call before anything is claimed.
  // With `sampling` (needs `outputs`; see prefillBatch) the worker also draws the next token of
  // each batch-1 state given a sampler, and that state's output is left as it was.
  using StatesWork = std::function<void(const Model&, const std::vector<DecodeState*>&, float*)>;
  Napi::Value RunOnStates(const char* call, const Napi::CallbackInfo& info, const Napi::Value& states_arg,
                          const Napi::Value& outputs_arg, const Napi::Value& sampling_arg,
                          const std::function<int(const DecodeState&)>& rows_of,
                          const std::function<void(size_t)>& check, StatesWork work) {
    Napi::Env env = info.Env();
    auto claim = std::make_shared<StatesClaim>();
    claim->model = model(env);
    const size_t V = static_cast<size_t>(claim->model->config().V);
    size_t rows = 0;
    Napi::Array outputs;
    Napi::Int32Array sampled;
    std::shared_ptr<std::vector<float>> out;
    try {
      claim->handles = parse_states(env, call, states_arg, rows_of, rows);
      const size_t n = claim->handles.size();
      if (!outputs_arg.IsUndefined()) {
        if (!outputs_arg.IsArray() || outputs_arg.As<Napi::Array>().Length() != n)
          throw std::invalid_argument("outputs must be an array with one Float32Array per state");
        outputs = outputs_arg.As<Napi::Array>();
        for (uint32_t i = 0; i < n; i++) {
          const std::string name = "outputs[" + std::to_string(i) + "]";
          const size_t own = rows_of(*claim->handles[i].state) * V;
          if (float32_arg(outputs.Get(i), name.c_str()).ElementLength() != own)
            throw std::invalid_argument(name + " must hold that state's rows * vocab = " + std::to_string(own) + " floats");
        }
      }
      if (!sampling_arg.IsUndefined()) {
        if (outputs.IsEmpty()) throw std::invalid_argument("sampling needs outputs");
        claim->draws = parse_draws(env, sampling_arg, claim->handles, V);
        sampled = int32_arg(sampling_arg.As<Napi::Object>().Get("sampled"), "sampling.sampled");
        if (sampled.ElementLength() != n) throw std::invalid_argument("sampling.sampled needs one entry per state");
      }
      check(rows);
      // A fresh [rows, V] buffer per call would fault in its pages every time: 2 MB at 16 rows.
      out = or_out_of_memory(env, std::string(call) + " logits of " + std::to_string(rows) + " rows", [&] {
        return outputs.IsEmpty() ? std::make_shared<std::vector<float>>(rows * V) : reused_buffer(rows * V);
      });
    } catch (const Napi::Error&) {
      throw;
    } catch (const std::exception& e) {
      throw Napi::Error::New(env, e.what());
    }
    claim_states(env, *claim);
    // Taken before the worker releases the claim.
    auto tokens = std::make_shared<std::vector<int32_t>>(claim->draws.size(), -1);
    std::vector<size_t> row_counts;
    for (const StateHandle& h : claim->handles) row_counts.push_back(rows_of(*h.state));
    std::vector<bool> drawn;
    for (const Draw& d : claim->draws) drawn.push_back(d.sampler.sampler != nullptr);
    std::shared_ptr<Napi::Reference<Napi::Array>> targets;
    if (!outputs.IsEmpty()) targets = std::make_shared<Napi::Reference<Napi::Array>>(Napi::Persistent(outputs));
    std::shared_ptr<Napi::Reference<Napi::Int32Array>> sampled_ref;
    if (!sampled.IsEmpty()) sampled_ref = std::make_shared<Napi::Reference<Napi::Int32Array>>(Napi::Persistent(sampled));
    auto* worker = new PromiseWorker(
        env,
        [claim, out, work, tokens, V] {
          struct Release {
            StatesClaim& c;
            ~Release() { c.release(); }
          } release{*claim};
          work(*claim->model, claim->states(), out->data());
          claim->draw(out->data(), V);
          for (size_t i = 0; i < claim->draws.size(); i++) (*tokens)[i] = claim->draws[i].token;
        },
        [out, targets, row_counts, V, drawn, tokens, sampled_ref](Napi::Env env) -> Napi::Value {
          if (!targets) return to_js(env, std::move(*out));
          // Filled here on the JS thread, as step's `logits`.
          Napi::Array dsts = targets->Value();
          const float* src = out->data();
          for (uint32_t i = 0; i < row_counts.size(); i++) {
            const size_t count = row_counts[i] * V;
            if (drawn.empty() || !drawn[i]) {
              Napi::Value d = dsts.Get(i);
              if (!d.IsTypedArray() || d.As<Napi::TypedArray>().TypedArrayType() != napi_float32_array ||
                  d.As<Napi::Float32Array>().ElementLength() != count)
                throw std::invalid_argument("outputs[" + std::to_string(i) + "] was replaced or detached during the call");
              std::memcpy(d.As<Napi::Float32Array>().Data(), src, count * sizeof(float));
            }
            src += count;
          }
          if (sampled_ref) {
            Napi::Int32Array dst = sampled_ref->Value();
            if (dst.ElementLength() != row_counts.size())
              throw std::invalid_argument("sampling.sampled was detached during the call");
            for (size_t i = 0; i < row_counts.size(); i++) dst[i] = (*tokens)[i];
          }
          return dsts;
        });
    worker->keep(states_arg);
    worker->Queue();
    return worker->promise();
  }

  // stepBatch(states: NativeState[], tokens: Int32Array [sum of batches], outputs?: Float32Array[])
  //   -> Promise<Float32Array [rows, V]>, or with `outputs` (one per state, its batch * V floats)
  //   -> Promise<outputs>, each filled with its state's rows: one decode step for several
  // sessions at once (continuous batching; decodeRun takes several steps and draws tokens).
  Napi::Value StepBatch(const Napi::CallbackInfo& info) {
    Ids ids;
    try {
      ids = copy_ids(int32_arg(info[1], "tokens"));
    } catch (const std::exception& e) {
      throw Napi::Error::New(info.Env(), e.what());
    }
    auto m = model(info.Env());
    return RunOnStates(
        "stepBatch", info, info[0], info[2], Napi::Value(), [](const DecodeState& s) { return s.batch(); },
        [&](size_t rows) {
          if (ids->size() != rows) throw std::invalid_argument("stepBatch takes one token per row of every state");
          m->check_tokens(ids->data(), rows);
        },
        [ids](const Model& model, const std::vector<DecodeState*>& states, float* logits) {
          model.step_batch(states, ids->data(), logits);
        });
  }

  // decodeRun(states: NativeState[] (batch 1), tokens: Int32Array (one per state), sampling:
  //   { samplers, histories, vocab } (a sampler per state), maxSteps: Int32Array, stopTokens:
  //   Int32Array[], granted, onStep: (tokens: Int32Array) => void) -> { done, grant, stop }:
  // decode steps on one worker, each state's drawn token fed back as its next token with no
  // trip through JS between steps. onStep gets each step's drawn tokens, in order, in one
  // array the run refills (read it during the call); `done`
  // resolves the number of steps after the last onStep. The run ends after a step where stop()
  // was called, a state drew one of its stopTokens or took maxSteps[i] steps, or the steps
  // taken reach `granted` (grant(n) raises it to n).
  Napi::Value DecodeRun(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto claim = std::make_shared<StatesClaim>();
    claim->model = model(env);
    std::vector<int32_t> tokens;
    std::vector<int64_t> max_steps;
    std::vector<std::vector<int32_t>> stop_tokens;
    auto control = std::make_shared<DecodeRunControl>();
    try {
      size_t rows = 0;
      claim->handles = parse_states(
          env, "decodeRun", info[0],
          [](const DecodeState& s) {
            if (s.batch() != 1) throw std::invalid_argument("decodeRun takes batch-1 states");
            return 1;
          },
          rows);
      const size_t n = claim->handles.size();
      const Napi::Int32Array token_arg = int32_arg(info[1], "tokens");
      if (token_arg.ElementLength() != n) throw std::invalid_argument("decodeRun takes one token per state");
      tokens.assign(token_arg.Data(), token_arg.Data() + n);
      claim->model->check_tokens(tokens.data(), n);
      claim->draws = parse_draws(env, info[2], claim->handles, static_cast<size_t>(claim->model->config().V));
      for (size_t i = 0; i < n; i++)
        if (!claim->draws[i].wrap) throw std::invalid_argument("decodeRun: sampling.samplers[" + std::to_string(i) + "] must be a NativeSampler");
      const Napi::Int32Array max_arg = int32_arg(info[3], "maxSteps");
      if (max_arg.ElementLength() != n) throw std::invalid_argument("maxSteps needs one entry per state");
      for (size_t i = 0; i < n; i++) {
        if (max_arg[i] < 1) throw std::invalid_argument("maxSteps must be >= 1");
        max_steps.push_back(max_arg[i]);
      }
      if (!info[4].IsArray() || info[4].As<Napi::Array>().Length() != n)
        throw std::invalid_argument("stopTokens must be an array with one Int32Array per state");
      for (uint32_t i = 0; i < n; i++) {
        const std::string name = "stopTokens[" + std::to_string(i) + "]";
        const Napi::Int32Array stops = int32_arg(info[4].As<Napi::Array>().Get(i), name.c_str());
        stop_tokens.emplace_back(stops.Data(), stops.Data() + stops.ElementLength());
      }
      const int granted = to_int(info[5], "granted");
      if (granted < 1) throw std::invalid_argument("granted must be >= 1");
      control->granted = granted;
      if (!info[6].IsFunction()) throw std::invalid_argument("onStep must be a function");
    } catch (const Napi::Error&) {
      throw;
    } catch (const std::exception& e) {
      throw Napi::Error::New(env, e.what());
    }
    claim_states(env, *claim);
    auto* worker = new DecodeRunWorker(env, claim, std::move(tokens), std::move(max_steps), std::move(stop_tokens), control,
                                       info[6].As<Napi::Function>());
    Napi::Object run = Napi::Object::New(env);
    run.Set("done", worker->promise());
    run.Set("grant", Napi::Function::New(env, [control](const Napi::CallbackInfo& call) {
              int64_t steps;
              try {
                steps = to_position(call[0], "grant: steps");
              } catch (const std::exception& e) {
                throw Napi::Error::New(call.Env(), e.what());
              }
              int64_t now = control->granted;
              while (steps > now && !control->granted.compare_exchange_weak(now, steps)) {
              }
            }));
    run.Set("stop", Napi::Function::New(env, [control](const Napi::CallbackInfo&) { control->stopped = true; }));
    worker->Queue();
    return run;
  }

  // prefillBatch(states: NativeState[] (batch 1), tokens: Int32Array, lengths: Int32Array, mode, chunk,
  //   outputs?: Float32Array[], sampling?) -> as stepBatch, one logits row per state: state i consumes
  // the next lengths[i] tokens (Model::prefill_batch: the products over every state's rows at once).
  Napi::Value PrefillBatch(const Napi::CallbackInfo& info) {
    Ids ids;
    Napi::Int32Array lengths;
    Mode mode;
    int C;
    try {
      ids = copy_ids(int32_arg(info[1], "tokens"));
      lengths = int32_arg(info[2], "lengths");
      mode = parse_mode(info[3]);
      C = to_int(info[4], "chunkSize");
      if (C < 1) throw std::invalid_argument("chunkSize must be >= 1");
    } catch (const std::exception& e) {
      throw Napi::Error::New(info.Env(), e.what());
    }
    auto m = model(info.Env());
    auto length_list = std::make_shared<std::vector<int>>(lengths.Data(), lengths.Data() + lengths.ElementLength());
    return RunOnStates(
        "prefillBatch", info, info[0], info[5], info[6],
        [](const DecodeState& s) {
          if (s.batch() != 1) throw std::invalid_argument("prefillBatch takes batch-1 states");
          return 1;
        },
        [&](size_t rows) {
          if (length_list->size() != rows) throw std::invalid_argument("prefillBatch takes one length per state");
          size_t total = 0;
          for (int n : *length_list) {
            if (n < 1) throw std::invalid_argument("prefillBatch lengths must be >= 1");
            total += n;
          }
          if (ids->size() != total) throw std::invalid_argument("prefillBatch tokens must hold the sum of lengths");
          m->check_tokens(ids->data(), total);
        },
        [ids, length_list, mode, C](const Model& model, const std::vector<DecodeState*>& states, float* logits) {
          model.prefill_batch(states, ids->data(), *length_list, mode, C, logits);
        });
  }

  // step(state, tokens: Int32Array [B], logits?: Float32Array [B*V]) -> Promise<Float32Array [B,V]>:
  // with `logits`, fills and resolves that buffer instead of a new one.
  Napi::Value Step(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Ids ids;
    Napi::Float32Array into;
    try {
      ids = copy_ids(int32_arg(info[1], "tokens"));
      const int batch = unwrap_state(env, info[0], "state")->handle(env).state->batch();
      if (ids->size() != static_cast<size_t>(batch)) throw std::invalid_argument("step takes one token per batch row");
      model(env)->check_tokens(ids->data(), ids->size());
      if (info.Length() > 2 && !info[2].IsUndefined()) {
        into = float32_arg(info[2], "logits");
        const size_t n = static_cast<size_t>(batch) * model(env)->config().V;
        if (into.ElementLength() != n)
          throw std::invalid_argument("logits buffer has " + std::to_string(into.ElementLength()) + " floats; the step writes batch * vocab = " + std::to_string(n));
      }
    } catch (const std::exception& e) {
      throw Napi::Error::New(env, e.what());
    }
    return RunOnState(
        env, info[0], [ids](const Model& m, DecodeState& s, float* logits) { m.step(s, ids->data(), logits); }, into);
  }

  // The parameter getParam / readParam name (an Error for an unknown one).
  static const ParamInfo& param_named(Napi::Env env, const Model& m, const Napi::Value& name_arg) {
    if (!name_arg.IsString()) throw Napi::TypeError::New(env, "parameter name must be a string");
    const std::string name = name_arg.As<Napi::String>().Utf8Value();
    const ParamInfo* p = m.find_param(name);
    if (!p) throw Napi::Error::New(env, "unknown parameter " + name);
    return *p;
  }

  Napi::Value GetParam(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto m = model(env);
    const ParamInfo& p = param_named(env, *m, info[0]);
    ReadClaim claim{claim_read(env)};
    auto data = or_out_of_memory(env, "parameter " + p.name, [&] { return std::vector<float>(p.size); });
    m->get_param(p.name, data.data(), data.size());
    return to_js(env, std::move(data));
  }

  // readParam(name) -> Promise<Float32Array>: getParam with the copy made on a worker (saving a
  // medium model, the embedding's and the head's copies held the JS thread for 0.4-0.7 s each),
  // rejecting a tensor that holds a non-finite value.
  Napi::Value ReadParam(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto m = model(env);
    const ParamInfo& p = param_named(env, *m, info[0]);
    auto guard = claim_read(env);
    auto data = std::make_shared<std::vector<float>>();
    auto* worker = new PromiseWorker(
        env,
        [m, guard, data, name = p.name, size = p.size] {
          ReadClaim claim{guard};
          data->resize(size);
          m->get_param(name, data->data(), data->size());
          // Its one reader is save: non-finite weights must not replace a good file.
          require_finite(name, data->data(), data->size());
        },
        [data](Napi::Env env) -> Napi::Value { return to_js(env, std::move(*data)); });
    worker->Queue();
    return worker->promise();
  }

  // A compact model keeps no fp32 projection weights to train.
  static void require_fp32_weights(const Model& m, const char* what) {
    if (m.weight_format() != WeightFormat::F32)
      throw std::invalid_argument(std::string(what) + " needs a model with fp32 weights; this one holds bf16/int8 weights (load it with weights 'f32')");
  }

  // setWeightFormat('f32' | 'bf16' | 'int8') -> Promise<void>: converts the projection weights
  // (Model::set_weight_format).
  Napi::Value SetWeightFormat(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto m = model(env);
    WeightFormat format;
    try {
      const std::string name = info[0].IsString() ? info[0].As<Napi::String>().Utf8Value() : "";
      if (name == "f32") {
        format = WeightFormat::F32;
      } else if (name == "bf16") {
        format = WeightFormat::BF16;
      } else if (name == "int8") {
        format = WeightFormat::Int8;
      } else {
        throw std::invalid_argument("weights must be 'f32', 'bf16' or 'int8', got '" + name + "'");
      }
    } catch (const std::exception& e) {
      throw Napi::Error::New(env, e.what());
    }
    // A conversion changes what every step computes: sessions that consumed tokens before it
    // are refused after it, as after a training step.
    auto guard = claim_write(env, format != m->weight_format());
    auto* worker = new PromiseWorker(
        env,
        [m, guard, format] {
          WriteClaim claim{guard};
          m->set_weight_format(format);
        },
        [](Napi::Env env) -> Napi::Value { return env.Undefined(); });
    worker->Queue();
    return worker->promise();
  }

  // setParam(name, data: Float32Array): replaces one parameter (sizes checked; a compact model
  // stores a projection in its format).
  Napi::Value SetParam(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto m = model(env);
    WriteClaim claim{claim_write(env, true)};
    try {
      if (!info[0].IsString()) throw std::invalid_argument("parameter name must be a string");
      const std::string name = info[0].As<Napi::String>().Utf8Value();
      Napi::Float32Array data = float32_arg(info[1], "data");
      require_finite(name, data.Data(), data.ElementLength());
      m->set_param(name, data.Data(), data.ElementLength());
    } catch (const std::exception& e) {
      throw Napi::Error::New(env, e.what());
    }
    return env.Undefined();
  }

  // resetOptimizer(): a new Trainer's fresh start: the AdamW moments and step go (made again, zero,
  // at the next step). Refused while a call uses the model.
  Napi::Value ResetOptimizer(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    model(env);
    if (!trainer_) return env.Undefined();
    WriteClaim claim{claim_write(env)};
    trainer_.reset();
    return env.Undefined();
  }

  // setParams({ name: Float32Array }) -> Promise<void>: checks the values are finite and copies
  // them into the model off the JS thread (loading streams a file in through this one tensor at
  // a time; checked on the JS thread, a medium model's tensors held it for about 550 ms).
  Napi::Value SetParams(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto m = model(env);
    std::vector<ParamSource> sources;
    std::vector<Napi::Value> keep;
    try {
      sources = param_sources(info[0], keep);
    } catch (const std::exception& e) {
      throw Napi::Error::New(env, e.what());
    }
    auto guard = claim_write(env, true);
    auto* worker = new PromiseWorker(
        env,
        [m, guard, sources] {
          WriteClaim claim{guard};
          for (const ParamSource& s : sources) {
            require_finite(s.name, s.data, s.n);
            m->set_param(s.name, s.data, s.n);
          }
        },
        [](Napi::Env env) -> Napi::Value { return env.Undefined(); });
    for (const Napi::Value& v : keep) worker->keep(v);
    worker->Queue();
    return worker->promise();
  }

  // lossAndGradients(tokens, B, T, mode, chunkSize, targets|null, mask|null, seed, checkpointActivations, precision)
  //   -> Promise<{ loss, grads: { name: Float32Array } }> (trainable parameters only; tied: embed_tokens.weight).
  Napi::Value LossAndGradients(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto m = model(env);
    Batch batch;
    PassOptions pass;
    uint64_t seed;
    try {
      batch = parse_batch(info[0], info[1], info[2], info[5], info[6]);
      pass = parse_pass(info[3], info[4], info[8], info[9]);
      seed = parse_seed(info[7]);
      require_fp32_weights(*m, "lossAndGradients");
      trainer(env)->check_batch(batch->view);
    } catch (const std::exception& e) {
      throw Napi::Error::New(env, e.what());
    }
    auto guard = claim_write(env);
    auto trainer_ptr = trainer(env);
    struct Result {
      double loss = 0;
      std::vector<std::pair<std::string, std::vector<float>>> grads;
    };
    auto result = std::make_shared<Result>();
    auto* worker = new PromiseWorker(
        env,
        [m, trainer_ptr, guard, batch, pass, seed, result] {
          WriteClaim claim{guard};
          trainer_ptr->zero_gradients();
          result->loss = trainer_ptr->accumulate_gradients(batch->view, pass, 1.0f, seed);
          for (const ParamInfo& p : m->params()) {
            if (is_buffer_param(p)) continue;
            std::vector<float> g(p.size);
            trainer_ptr->get_gradient(p, g.data());
            result->grads.emplace_back(p.name, std::move(g));
          }
          trainer_ptr->zero_gradients();
        },
        [result](Napi::Env env) -> Napi::Value {
          Napi::Object out = Napi::Object::New(env);
          out.Set("loss", result->loss);
          Napi::Object grads = Napi::Object::New(env);
          for (auto& [name, g] : result->grads) grads.Set(name, to_js(env, std::move(g)));
          out.Set("grads", grads);
          return out;
        });
    worker->Queue();
    return worker->promise();
  }

  // trainStep(micro: [{ tokens, batch, length, targets, mask }], opts) -> Promise<{ loss, gradNorm, tokens }>
  Napi::Value TrainStep(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto m = model(env);
    std::vector<Batch> owned;
    std::vector<TrainBatch> micro;
    PassOptions pass;
    OptimizerOptions opt;
    try {
      if (!info[0].IsArray()) throw std::invalid_argument("micro-batches must be an array");
      Napi::Array arr = info[0].As<Napi::Array>();
      for (uint32_t i = 0; i < arr.Length(); i++) {
        if (!arr.Get(i).IsObject()) throw std::invalid_argument("each micro-batch must be an object");
        Napi::Object o = arr.Get(i).As<Napi::Object>();
        owned.push_back(parse_batch(o.Get("tokens"), o.Get("batch"), o.Get("length"), get_or_null(o, "targets"),
                                    get_or_null(o, "mask")));
        micro.push_back(owned.back()->view);
      }
      if (!info[1].IsObject()) throw std::invalid_argument("trainStep options must be an object");
      Napi::Object o = info[1].As<Napi::Object>();
      pass = parse_pass(o.Get("mode"), o.Get("chunkSize"), o.Get("checkpointActivations"), o.Get("precision"));
      auto num = [&](const char* key) {
        Napi::Value v = o.Get(key);
        if (!v.IsNumber() || !std::isfinite(v.As<Napi::Number>().DoubleValue()))
          throw std::invalid_argument(std::string(key) + " must be a finite number");
        return static_cast<float>(v.As<Napi::Number>().DoubleValue());
      };
      opt.lr = num("lr");
      opt.beta1 = num("beta1");
      opt.beta2 = num("beta2");
      opt.eps = num("eps");
      opt.weight_decay = num("weightDecay");
      opt.clip_norm = num("clipNorm");
      if (!(opt.beta1 >= 0 && opt.beta1 < 1 && opt.beta2 >= 0 && opt.beta2 < 1))
        throw std::invalid_argument("beta1 and beta2 must be in [0, 1)");
      if (opt.lr < 0 || opt.eps <= 0 || opt.weight_decay < 0 || opt.clip_norm < 0)
        throw std::invalid_argument("lr, weightDecay and clipNorm must be >= 0 and eps > 0");
      Napi::Value nd = get_or_null(o, "noDecay");
      if (nd.IsArray()) {
        Napi::Array names = nd.As<Napi::Array>();
        for (uint32_t i = 0; i < names.Length(); i++) {
          if (!names.Get(i).IsString()) throw std::invalid_argument("noDecay must hold parameter names");
          opt.no_decay.push_back(names.Get(i).As<Napi::String>().Utf8Value());
        }
      } else if (!nd.IsNull() && !nd.IsUndefined()) {
        throw std::invalid_argument("noDecay must be an array of parameter names");
      }
      opt.seed = parse_seed(o.Get("seed"));
      for (const TrainBatch& b : micro) trainer(env)->check_batch(b);
      require_fp32_weights(*m, "trainStep");
    } catch (const std::exception& e) {
      throw Napi::Error::New(env, e.what());
    }
    auto guard = claim_write(env, true);
    auto trainer_ptr = trainer(env);
    auto result = std::make_shared<StepResult>();
    auto* worker = new PromiseWorker(
        env,
        [trainer_ptr, guard, owned, micro, pass, opt, result] {
          WriteClaim claim{guard};
          *result = trainer_ptr->step(micro, pass, opt);
        },
        [result](Napi::Env env) -> Napi::Value {
          Napi::Object out = Napi::Object::New(env);
          out.Set("loss", result->loss);
          out.Set("gradNorm", result->grad_norm);
          out.Set("tokens", static_cast<double>(result->tokens));
          return out;
        });
    worker->Queue();
    return worker->promise();
  }

  // readOptimizerState() -> Promise<{ step, m, v }> (parameter arena layout), copied on a
  // worker: the two moments are twice the weights (a medium model's: 1.9 GB).
  Napi::Value ReadOptimizerState(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto m = model(env);
    std::shared_ptr<Trainer> t = trainer(env);
    auto guard = claim_write(env);
    struct Moments {
      std::vector<float> m, v;
      int64_t step = 0;
    };
    auto out = std::make_shared<Moments>();
    auto* worker = new PromiseWorker(
        env,
        [m, t, guard, out] {
          WriteClaim claim{guard};
          out->m.resize(m->parameter_floats());
          out->v.resize(m->parameter_floats());
          t->get_optimizer_state(out->m.data(), out->v.data());
          out->step = t->optimizer_step();
        },
        [out](Napi::Env env) -> Napi::Value {
          Napi::Object result = Napi::Object::New(env);
          result.Set("step", static_cast<double>(out->step));
          result.Set("m", to_js(env, std::move(out->m)));
          result.Set("v", to_js(env, std::move(out->v)));
          return result;
        });
    worker->Queue();
    return worker->promise();
  }

  // setOptimizerState(step, m: Float32Array, v: Float32Array) -> Promise<void>: the sizes are
  // checked here; the values are checked and copied in on a worker, which keeps m and v alive.
  Napi::Value SetOptimizerState(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto m = model(env);
    int step;
    Napi::Float32Array mv, vv;
    try {
      step = to_int(info[0], "step");
      mv = float32_arg(info[1], "m");
      vv = float32_arg(info[2], "v");
      if (mv.ElementLength() != m->parameter_floats() || vv.ElementLength() != m->parameter_floats())
        throw std::invalid_argument("optimizer state must hold " + std::to_string(m->parameter_floats()) +
                                    " values per moment");
      require_stable_array(mv, "m");
      require_stable_array(vv, "v");
    } catch (const std::exception& e) {
      throw Napi::Error::New(env, e.what());
    }
    std::shared_ptr<Trainer> t = trainer(env);
    auto guard = claim_write(env);
    auto* worker = new PromiseWorker(
        env,
        [t, guard, step, m_data = mv.Data(), v_data = vv.Data()] {
          WriteClaim claim{guard};
          t->set_optimizer_state(step, m_data, v_data);
        },
        [](Napi::Env env) -> Napi::Value { return env.Undefined(); });
    worker->keep(mv);
    worker->keep(vv);
    worker->Queue();
    return worker->promise();
  }

  std::shared_ptr<AccessGuard> claim_read(Napi::Env env) {
    try {
      access_->acquire_read();
    } catch (const std::exception& e) {
      throw Napi::Error::New(env, e.what());
    }
    return access_;
  }
  // A state that has consumed tokens holds what the weights of its last call made of them:
  // after a training step or setParam it would mix two models' numbers without a sign.
  void require_current_weights(const DecodeState& s, const std::string& which) const {
    if (s.weights_version == access_->weight_version()) return;
    for (int64_t p : s.position) {
      if (p > 0) {
        throw std::invalid_argument(which + "this session's state was made with weights that have changed since (a training step or setParam): start a new session");
      }
    }
  }

  // `changes_weights`: the call will modify the weights (see AccessGuard::weight_version).
  std::shared_ptr<AccessGuard> claim_write(Napi::Env env, bool changes_weights = false) {
    try {
      access_->acquire_write();
    } catch (const std::exception& e) {
      throw Napi::Error::New(env, e.what());
    }
    if (changes_weights) access_->note_weights_changed();
    return access_;
  }

  // weightVersion() -> number: changes whenever a call that modifies the weights starts.
  Napi::Value WeightVersion(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), static_cast<double>(access_->weight_version()));
  }
  // Gradient and optimizer arenas, made on first use.
  // After the call's arguments are read: their getters may have disposed the model.
  std::shared_ptr<Trainer> trainer(Napi::Env env) {
    auto m = model(env);
    if (!trainer_) trainer_ = std::make_shared<Trainer>(m);
    return trainer_;
  }

  Napi::Value ParamNames(const Napi::CallbackInfo& info) {
    auto m = model(info.Env());
    Napi::Array out = Napi::Array::New(info.Env(), m->params().size());
    for (size_t i = 0; i < m->params().size(); i++) out[i] = Napi::String::New(info.Env(), m->params()[i].name);
    return out;
  }

  Napi::Value Dispose(const Napi::CallbackInfo& info) {
    trainer_.reset();
    model_.reset();
    external_.release(info.Env());
    return info.Env().Undefined();
  }

  ExternalMemory external_;
  std::shared_ptr<Model> model_;
  std::shared_ptr<Trainer> trainer_;
  std::shared_ptr<AccessGuard> access_ = std::make_shared<AccessGuard>();
};

// benchKernel(name, params) -> Promise<number>: 'fma_peak' {reps} -> GFLOP/s; 'bandwidth' {megabytes, reps} -> GB/s;
// 'linear' {M, N, K, reps} -> seconds; 'decode_product' {M, N, K, reps} -> seconds (weight from memory);
// 'retention' {B, T, H, dk, dv, chunk, parallel, reps} -> seconds.
Napi::Value BenchKernel(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::function<double()> run;
  try {
    if (!info[0].IsString()) throw std::invalid_argument("benchKernel: the kernel name must be a string");
    const std::string name = info[0].As<Napi::String>().Utf8Value();
    if (!info[1].IsObject()) throw std::invalid_argument("benchKernel: params must be an object");
    Napi::Object p = info[1].As<Napi::Object>();
    auto get = [&](const char* key) {
      const int v = to_int(p.Get(key), key);
      if (v < 1) throw std::invalid_argument(std::string(key) + " must be >= 1");
      return v;
    };
    const int reps = get("reps");
    if (name == "fma_peak") {
      run = [reps] { return measure_fma_peak(reps); };
    } else if (name == "bandwidth") {
      const size_t bytes = static_cast<size_t>(get("megabytes")) << 20;
      run = [bytes, reps] { return measure_read_bandwidth(bytes, reps); };
    } else if (name == "linear") {
      const int M = get("M"), N = get("N"), K = get("K");
      run = [M, N, K, reps] { return time_linear(M, N, K, reps); };
    } else if (name == "decode_product") {
      const int M = get("M"), N = get("N"), K = get("K");
      run = [M, N, K, reps] { return time_decode_product(M, N, K, reps); };
    } else if (name == "retention") {
      const int B = get("B"), T = get("T"), H = get("H"), dk = get("dk"), dv = get("dv"), chunk = get("chunk");
      const bool parallel = p.Get("parallel").ToBoolean();
      run = [=] { return time_retention(B, T, H, dk, dv, chunk, parallel, reps); };
    } else {
      throw std::invalid_argument("unknown kernel " + name);
    }
  } catch (const std::exception& e) {
    throw Napi::Error::New(env, e.what());
  }
  auto result = std::make_shared<double>(0);
  auto* worker = new PromiseWorker(
      env, [run, result] { *result = run(); },
      [result](Napi::Env env) -> Napi::Value { return Napi::Number::New(env, *result); });
  worker->Queue();
  return worker->promise();
}

// gemm(a, b, c, { M, N, K, aTransposed, bTransposed, accumulate, precision? }) -> Promise<void>:
// the CPU GEMM on its own, C[M, N] (=|+=) A B with A stored [M, K] (or [K, M] when
// aTransposed) and B stored [K, N] (or [N, K] when bTransposed), all row-major, inputs
// rounded to `precision` ('fp32' or 'bf16'): tests compare it with a reference.
Napi::Value Gemm(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Float32Array a, b, c;
  int M, N, K;
  bool a_t, b_t, accumulate;
  Precision precision;
  try {
    a = float32_arg(info[0], "a");
    b = float32_arg(info[1], "b");
    c = float32_arg(info[2], "c");
    if (!info[3].IsObject()) throw std::invalid_argument("gemm options must be an object");
    Napi::Object o = info[3].As<Napi::Object>();
    M = to_int(o.Get("M"), "M");
    N = to_int(o.Get("N"), "N");
    K = to_int(o.Get("K"), "K");
    a_t = o.Get("aTransposed").ToBoolean();
    b_t = o.Get("bTransposed").ToBoolean();
    accumulate = o.Get("accumulate").ToBoolean();
    precision = parse_precision(o.Get("precision"));
    if (M < 1 || N < 1 || K < 1) throw std::invalid_argument("M, N and K must be >= 1");
    if (a.ElementLength() != static_cast<size_t>(M) * K || b.ElementLength() != static_cast<size_t>(K) * N ||
        c.ElementLength() != static_cast<size_t>(M) * N)
      throw std::invalid_argument("gemm: a, b, c must hold M*K, K*N and M*N values");
    require_stable_array(a, "a");
    require_stable_array(b, "b");
    require_stable_array(c, "c");
  } catch (const std::exception& e) {
    throw Napi::Error::New(env, e.what());
  }
  const MatView A = a_t ? transposed(a.Data(), M) : row_major(a.Data(), K);
  const MatView B = b_t ? transposed(b.Data(), K) : row_major(b.Data(), N);
  float* C = c.Data();
  auto* worker = new PromiseWorker(
      env, [=] { gemm(M, N, K, A, B, C, N, accumulate, precision); }, [](Napi::Env env) -> Napi::Value { return env.Undefined(); });
  worker->keep(a);
  worker->keep(b);
  worker->keep(c);
  worker->Queue();
  return worker->promise();
}

// The { M, N, K } of a product test call, each >= 1.
struct ProductShape {
  int M, N, K;
};
ProductShape product_shape(const Napi::Value& shape, const char* call) {
  if (!shape.IsObject()) throw std::invalid_argument(std::string(call) + " options must be an object");
  Napi::Object o = shape.As<Napi::Object>();
  const ProductShape s{to_int(o.Get("M"), "M"), to_int(o.Get("N"), "N"), to_int(o.Get("K"), "K")};
  if (s.M < 1 || s.N < 1 || s.K < 1) throw std::invalid_argument("M, N and K must be >= 1");
  return s;
}
void check_size(const Napi::TypedArray& a, size_t n, const char* call, const char* what) {
  if (a.ElementLength() != n)
    throw std::invalid_argument(std::string(call) + ": " + what + " must hold " + std::to_string(n) + " values");
}

// int8Linear(weights, scales, x, y, { M, N, K }) -> Promise<void>: y[M, N] = x[M, K] times an
// int8 matrix (an Int8Array [N, K] with its row scales) as a model's compact projection
// computes it (dot products up to kCompactDotsMaxRows rows, the packed path past), for the tests.
Napi::Value Int8Linear(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::shared_ptr<QuantizedMatrix> matrix;
  Napi::Float32Array x, y;
  int M;
  try {
    const ProductShape s = product_shape(info[4], "int8Linear");
    M = s.M;
    if (!info[0].IsTypedArray() || info[0].As<Napi::TypedArray>().TypedArrayType() != napi_int8_array)
      throw std::invalid_argument("weights must be an Int8Array");
    Napi::Int8Array weights = info[0].As<Napi::Int8Array>();
    Napi::Float32Array scales = float32_arg(info[1], "scales");
    x = float32_arg(info[2], "x");
    y = float32_arg(info[3], "y");
    check_size(weights, static_cast<size_t>(s.N) * s.K, "int8Linear", "weights");
    check_size(scales, s.N, "int8Linear", "scales");
    check_size(x, static_cast<size_t>(s.M) * s.K, "int8Linear", "x");
    check_size(y, static_cast<size_t>(s.M) * s.N, "int8Linear", "y");
    require_stable_array(x, "x");
    require_stable_array(y, "y");
    matrix = std::make_shared<QuantizedMatrix>(compact_matrix(s.N, s.K, WeightFormat::Int8));
    std::memcpy(matrix->int8, weights.Data(), weights.ElementLength());
    std::memcpy(matrix->scales, scales.Data(), s.N * sizeof(float));
  } catch (const std::exception& e) {
    throw Napi::Error::New(env, e.what());
  }
  const float* X = x.Data();
  float* Y = y.Data();
  auto* worker = new PromiseWorker(
      env, [=] { linear_compact(M, X, *matrix, Y); }, [](Napi::Env env) -> Napi::Value { return env.Undefined(); });
  worker->keep(x);
  worker->keep(y);
  worker->Queue();
  return worker->promise();
}

// panelLinear(weights, x, y, { M, N, K, precision }) -> Promise<void>: y[M, N] = x[M, K]
// weights^T as the CPU model computes it with its weights in panels (linear_panels; `weights`
// a Float32Array [N, K] in rows, laid out in panels first), for the tests.
// panelLinearBackward(weights, x, dy, dx, dw, { M, N, K, accumulateDx, precision }) ->
// Promise<void>: its backward (linear_panels_backward): dx (=|+=) dy W and dw += dy^T x, dw
// [N, K] in rows (laid out in panels for the call and back).
Napi::Value PanelLinear(const Napi::CallbackInfo& info, bool backward) {
  Napi::Env env = info.Env();
  const char* call = backward ? "panelLinearBackward" : "panelLinear";
  std::vector<Napi::Float32Array> arrays;
  ProductShape s;
  bool accumulate_dx = false;
  Precision precision;
  try {
    const Napi::Value options = info[backward ? 5 : 3];
    s = product_shape(options, call);
    precision = parse_precision(options.As<Napi::Object>().Get("precision"));
    accumulate_dx = options.As<Napi::Object>().Get("accumulateDx").ToBoolean();
    const size_t MK = static_cast<size_t>(s.M) * s.K, MN = static_cast<size_t>(s.M) * s.N,
                 NK = static_cast<size_t>(s.N) * s.K;
    const std::vector<std::pair<const char*, size_t>> expected =
        backward ? std::vector<std::pair<const char*, size_t>>{{"weights", NK}, {"x", MK}, {"dy", MN}, {"dx", MK}, {"dw", NK}}
                 : std::vector<std::pair<const char*, size_t>>{{"weights", NK}, {"x", MK}, {"y", MN}};
    for (size_t i = 0; i < expected.size(); i++) {
      arrays.push_back(float32_arg(info[i], expected[i].first));
      check_size(arrays.back(), expected[i].second, call, expected[i].first);
      require_stable_array(arrays.back(), expected[i].first);
    }
  } catch (const std::exception& e) {
    throw Napi::Error::New(env, e.what());
  }
  const float* W = arrays[0].Data();
  const float* X = arrays[1].Data();
  float* out = arrays[2].Data();  // y, or dy
  float* dX = backward ? arrays[3].Data() : nullptr;
  float* dW = backward ? arrays[4].Data() : nullptr;
  auto* worker = new PromiseWorker(
      env,
      [=] {
        const size_t NK = static_cast<size_t>(s.N) * s.K;
        std::vector<float> panels(NK);
        to_panels(W, s.N, s.K, panels.data());
        if (!backward) return linear_panels(s.M, s.N, s.K, X, panels.data(), out, false, precision);
        std::vector<float> dw_panels(NK);
        to_panels(dW, s.N, s.K, dw_panels.data());
        linear_panels_backward(s.M, s.N, s.K, X, panels.data(), out, dX, dw_panels.data(), accumulate_dx, precision);
        from_panels(dw_panels.data(), s.N, s.K, 0, s.N, 0, s.K, dW, s.K);
      },
      [](Napi::Env env) -> Napi::Value { return env.Undefined(); });
  for (const Napi::Float32Array& a : arrays) worker->keep(a);
  worker->Queue();
  return worker->promise();
}

Napi::Value BuildInfo(const Napi::CallbackInfo& info) {
  Napi::Object o = Napi::Object::New(info.Env());
  o.Set("threads", num_threads());
  o.Set("gemm", gemm_isa());
  o.Set("bf16Dot", gemm_has_bf16_dot());
#ifdef RETNET_WITH_CUDA
  o.Set("cuda", true);
  o.Set("cudaDevices", cuda_device_count(nullptr));
  o.Set("cudaGemm", cuda_gemm());
#else
  o.Set("cuda", false);
  o.Set("cudaDevices", 0);
  o.Set("cudaGemm", "");
#endif
  return o;
}

void DiscardMemory(const Napi::CallbackInfo& info) {
  if (info.Length() != 1 || !info[0].IsTypedArray() || info[0].As<Napi::TypedArray>().TypedArrayType() != napi_float32_array)
    throw Napi::TypeError::New(info.Env(), "discardMemory takes one Float32Array");
  Napi::Float32Array a = info[0].As<Napi::Float32Array>();
  discard_host_memory(a.Data(), a.ByteLength());
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  auto* ctors = new Constructors();
  ctors->model = Napi::Persistent(NativeModel::Define(env));
  ctors->state = Napi::Persistent(NativeState::Define(env));
  ctors->sampler = Napi::Persistent(NativeSampler::Define(env));
  env.SetInstanceData<Constructors>(ctors);
  exports.Set("NativeModel", ctors->model.Value());
  exports.Set("NativeState", ctors->state.Value());
  exports.Set("NativeSampler", ctors->sampler.Value());
  exports.Set("createModel", Napi::Function::New(env, NativeModel::Create));
  exports.Set("buildInfo", Napi::Function::New(env, BuildInfo));
  exports.Set("benchKernel", Napi::Function::New(env, BenchKernel));
  exports.Set("gemm", Napi::Function::New(env, Gemm));
  exports.Set("int8Linear", Napi::Function::New(env, Int8Linear));
  exports.Set("panelLinear", Napi::Function::New(env, [](const Napi::CallbackInfo& info) { return PanelLinear(info, false); }));
  exports.Set("panelLinearBackward",
              Napi::Function::New(env, [](const Napi::CallbackInfo& info) { return PanelLinear(info, true); }));
  exports.Set("discardMemory", Napi::Function::New(env, DiscardMemory));
  return exports;
}

}  // namespace
}  // namespace retnet

static Napi::Object InitRetnet(Napi::Env env, Napi::Object exports) { return retnet::Init(env, exports); }
NODE_API_MODULE(retnet, InitRetnet)
