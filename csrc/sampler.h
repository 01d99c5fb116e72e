// Next-token sampling: repetition penalty, temperature, top-k, top-p and a seeded draw, in
// float64. lib/sampling.ts documents the semantics and validates the options; the tests hold a
// full-sort reference that this must draw the same tokens as.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace retnet {

// xoshiro128** with lib/random.ts's seeding, so a seed gives the same stream on both sides.
class Xoshiro128 {
 public:
  // Any integer seed (JS safe integers, negative ones included).
  explicit Xoshiro128(int64_t seed);
  uint32_t next_uint32();
  // Uniform in [0, 1) from 53 random bits (two draws), as Rng.nextFloat.
  double next_double();

 private:
  uint32_t s_[4];
};

struct SamplerOptions {
  double temperature = 1;  // 0 = greedy
  size_t top_k = 0;        // 0 = off
  double top_p = 1;        // in (0, 1]
  double repetition_penalty = 1;
};

class Sampler {
 public:
  // Throws std::invalid_argument for options outside their ranges.
  Sampler(const SamplerOptions& options, int64_t seed);

  // One id from logits[0..vocab) (not modified). `history` is only read by the repetition
  // penalty, which applies once per distinct id. Throws std::invalid_argument on empty or NaN
  // logits and on history ids outside [0, vocab).
  int32_t sample(const float* logits, size_t vocab, const int32_t* history, size_t history_len);
  // Whether sample() reads `history` (the repetition penalty is on).
  bool penalizes() const { return options_.repetition_penalty != 1; }

 private:
  void penalize(const int32_t* history, size_t history_len, size_t vocab);
  size_t select_top_k(size_t vocab);
  int32_t draw_from_nucleus(size_t count, double total);
  // Fills block_mass_ for weights_[0..count) and returns their sum.
  double block_masses(size_t count);
  // ids_[j] with probability weights_[j] / total, j < count; block_mass_ must be current.
  int32_t draw(size_t count, double total);

  SamplerOptions options_;
  Xoshiro128 rng_;
  // Working buffers, sized to the vocabulary on first use.
  std::vector<double> scores_;
  std::vector<int32_t> ids_;
  std::vector<double> weights_;
  std::vector<double> boundary_weights_;
  std::vector<double> block_mass_;
  // seen_[id] == seen_mark_ marks ids already penalised in this call.
  std::vector<uint32_t> seen_;
  uint32_t seen_mark_ = 0;
};

}  // namespace retnet
