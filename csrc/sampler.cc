#include "sampler.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include "simd.h"

namespace retnet {
namespace {

// murmur3's 32-bit finaliser, as lib/random.ts's mix32.
uint32_t mix32(uint32_t x) {
  x = (x ^ (x >> 16)) * 0x85ebca6bu;
  x = (x ^ (x >> 13)) * 0xc2b2ae35u;
  return x ^ (x >> 16);
}

uint32_t rotl(uint32_t x, int k) { return (x << k) | (x >> (32 - k)); }

// Weights are e^((score - max) / temperature) <= 1. Top-p buckets them by the top 16 bits of
// the float64 (sign, exponent, 4 mantissa bits): 16 buckets per halving below 1, the last one
// for everything under 2^-63, each a contiguous range of weights, heaviest first.
constexpr size_t kNucleusBuckets = 1024;
constexpr uint32_t kWeightOneKey = 0x3ff0;  // the top 16 bits of 1.0

size_t nucleus_bucket(double weight) {
  uint64_t bits;
  std::memcpy(&bits, &weight, sizeof bits);
  const uint32_t bucket = kWeightOneKey - static_cast<uint32_t>(bits >> 48);
  return bucket < kNucleusBuckets ? bucket : kNucleusBuckets - 1;
}

// The draw skips whole blocks of candidates by their summed weight.
constexpr size_t kDrawBlock = 256;

// Below this e^x rounds to 0 in float64 (half the smallest subnormal).
constexpr double kExpUnderflow = -745.1332191019412;

#ifdef RETNET_X86
// 2^e for 4 exponents in the normal range.
__attribute__((target("avx2,fma"))) inline __m256d power_of_two(__m128i e) {
  return _mm256_castsi256_pd(_mm256_slli_epi64(_mm256_add_epi64(_mm256_cvtepi32_epi64(e), _mm256_set1_epi64x(1023)), 52));
}

// e^x for x <= 0 (-Infinity included), 4 lanes: e^x = 2^n e^r with r = x - n ln2 in
// [-ln2/2, ln2/2] (ln2 split in two so r is exact to float64) and e^r from its Taylor
// series to r^13 (truncation below 1e-17). 2^n is applied as two normal powers of two so a
// subnormal result is rounded once.
__attribute__((target("avx2,fma"))) inline __m256d exp_nonpositive_avx2(__m256d x) {
  const __m256d underflow = _mm256_cmp_pd(x, _mm256_set1_pd(kExpUnderflow), _CMP_LT_OQ);
  x = _mm256_max_pd(x, _mm256_set1_pd(-745.2));
  const __m256d n = _mm256_round_pd(_mm256_mul_pd(x, _mm256_set1_pd(1.4426950408889634)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256d r = _mm256_fnmadd_pd(n, _mm256_set1_pd(6.93147180369123816490e-01), x);
  r = _mm256_fnmadd_pd(n, _mm256_set1_pd(1.90821492927058770002e-10), r);
  // 1/k! for k = 13 down to 2.
  static constexpr double kInvFactorial[] = {1.6059043836821613e-10, 2.08767569878681e-09,  2.505210838544172e-08,
                                             2.755731922398589e-07,  2.7557319223985893e-06, 2.48015873015873e-05,
                                             1.984126984126984e-04,  1.3888888888888889e-03, 8.333333333333333e-03,
                                             4.1666666666666664e-02, 1.6666666666666666e-01, 0.5};
  __m256d p = _mm256_set1_pd(kInvFactorial[0]);
  for (size_t k = 1; k < sizeof kInvFactorial / sizeof kInvFactorial[0]; k++) {
    p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(kInvFactorial[k]));
  }
  p = _mm256_fmadd_pd(_mm256_mul_pd(p, r), r, _mm256_add_pd(r, _mm256_set1_pd(1.0)));
  // n in [-1075, 0]: n = n1 + n2 with both halves >= -538.
  const __m128i ni = _mm256_cvtpd_epi32(n);
  const __m128i n1 = _mm_srai_epi32(ni, 1);
  const __m128i n2 = _mm_sub_epi32(ni, n1);
  const __m256d result = _mm256_mul_pd(_mm256_mul_pd(p, power_of_two(n1)), power_of_two(n2));
  return _mm256_andnot_pd(underflow, result);
}

// out[i] = scores[i] == max ? 1 : e^((scores[i] - max) / temperature); scores[i] <= max.
__attribute__((target("avx2,fma"))) size_t shifted_exp_avx2(const double* scores, size_t n, double max,
                                                            double temperature, double* out) {
  const __m256d vmax = _mm256_set1_pd(max), vt = _mm256_set1_pd(temperature), one = _mm256_set1_pd(1.0);
  size_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const __m256d s = _mm256_loadu_pd(scores + i);
    const __m256d at_max = _mm256_cmp_pd(s, vmax, _CMP_EQ_OQ);
    // At the max (+/-Infinity included) the blend discards the lane's arithmetic.
    const __m256d w = exp_nonpositive_avx2(_mm256_div_pd(_mm256_sub_pd(s, vmax), vt));
    _mm256_storeu_pd(out + i, _mm256_blendv_pd(w, one, at_max));
  }
  // The tail goes through the same lanes (padded with the max): equal scores must get equal
  // weights wherever they sit, or ties at a top-p cutoff would be broken by position.
  if (i < n) {
    double in[4] = {max, max, max, max}, tail[4];
    std::memcpy(in, scores + i, (n - i) * sizeof(double));
    shifted_exp_avx2(in, 4, max, temperature, tail);
    std::memcpy(out + i, tail, (n - i) * sizeof(double));
  }
  return n;
}

// out[i] = in[i] as float64; returns whether any input is NaN.
__attribute__((target("avx2,fma"))) bool widen_avx2(const float* in, size_t n, double* out, size_t* done) {
  __m256 nan = _mm256_setzero_ps();
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(in + i);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    _mm256_storeu_pd(out + i, _mm256_cvtps_pd(_mm256_castps256_ps128(x)));
    _mm256_storeu_pd(out + i + 4, _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)));
  }
  *done = i;
  return _mm256_movemask_ps(nan) != 0;
}

// The largest of x[0..n), n >= 1, no NaN.
__attribute__((target("avx2,fma"))) double max_avx2(const double* x, size_t n) {
  __m256d m0 = _mm256_set1_pd(x[0]), m1 = m0;
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    m0 = _mm256_max_pd(m0, _mm256_loadu_pd(x + i));
    m1 = _mm256_max_pd(m1, _mm256_loadu_pd(x + i + 4));
  }
  double lanes[4];
  _mm256_storeu_pd(lanes, _mm256_max_pd(m0, m1));
  double m = std::max(std::max(lanes[0], lanes[1]), std::max(lanes[2], lanes[3]));
  for (; i < n; i++) m = std::max(m, x[i]);
  return m;
}
#endif

bool widen(const float* in, size_t n, double* out) {
  size_t i = 0;
  bool nan = false;
#ifdef RETNET_X86
  if (cpu_has_avx2_fma()) nan = widen_avx2(in, n, out, &i);
#endif
  for (; i < n; i++) {
    nan |= std::isnan(in[i]);
    out[i] = in[i];
  }
  return nan;
}

double max_of(const double* x, size_t n) {
#ifdef RETNET_X86
  if (cpu_has_avx2_fma()) return max_avx2(x, n);
#endif
  return *std::max_element(x, x + n);
}

void shifted_exp(const double* scores, size_t n, double max, double temperature, double* out) {
  size_t i = 0;
#ifdef RETNET_X86
  if (cpu_has_avx2_fma()) i = shifted_exp_avx2(scores, n, max, temperature, out);
#endif
  // Subtracting the max before dividing keeps the exponent <= 0 even for tiny temperatures;
  // equality is tested first so that +/-Infinity scores give weight 1 rather than NaN.
  for (; i < n; i++) out[i] = scores[i] == max ? 1.0 : std::exp((scores[i] - max) / temperature);
}

std::string token_range(size_t vocab) { return "[0, " + std::to_string(vocab) + ")"; }

}  // namespace

Xoshiro128::Xoshiro128(int64_t seed) {
  const uint32_t low = static_cast<uint32_t>(seed);
  const uint32_t high = static_cast<uint32_t>(seed >> 32);  // floor(seed / 2^32) mod 2^32
  // Consecutive golden-ratio steps through a bijective mixer: four distinct words, never all zero.
  uint32_t x = low ^ mix32(high);
  for (uint32_t& word : s_) {
    x += 0x9e3779b9u;
    word = mix32(x);
  }
}

uint32_t Xoshiro128::next_uint32() {
  const uint32_t result = rotl(s_[1] * 5, 7) * 9;
  const uint32_t t = s_[1] << 9;
  s_[2] ^= s_[0];
  s_[3] ^= s_[1];
  s_[1] ^= s_[2];
  s_[0] ^= s_[3];
  s_[2] ^= t;
  s_[3] = rotl(s_[3], 11);
  return result;
}

double Xoshiro128::next_double() {
  const uint32_t high = next_uint32() >> 5;  // 27 bits
  const uint32_t low = next_uint32() >> 6;   // 26 bits
  return (high * 67108864.0 + low) / 9007199254740992.0;
}

Sampler::Sampler(const SamplerOptions& options, int64_t seed) : options_(options), rng_(seed) {
  if (!(std::isfinite(options.temperature) && options.temperature >= 0))
    throw std::invalid_argument("temperature must be a finite number >= 0");
  if (!(options.top_p > 0 && options.top_p <= 1)) throw std::invalid_argument("topP must be in (0, 1]");
  if (!(std::isfinite(options.repetition_penalty) && options.repetition_penalty > 0))
    throw std::invalid_argument("repetitionPenalty must be a finite number > 0");
}

int32_t Sampler::sample(const float* logits, size_t vocab, const int32_t* history, size_t history_len) {
  if (vocab == 0) throw std::invalid_argument("Sampler.sample: logits are empty");
  if (vocab > static_cast<size_t>(INT32_MAX)) throw std::invalid_argument("Sampler.sample: more logits than int32 ids");
  if (scores_.size() != vocab) {
    scores_.assign(vocab, 0);
    ids_.assign(vocab, 0);
    weights_.assign(vocab, 0);
    boundary_weights_.assign(vocab, 0);
    block_mass_.assign((vocab + kDrawBlock - 1) / kDrawBlock, 0);
    seen_.assign(vocab, 0);
    seen_mark_ = 0;
  }
  double* scores = scores_.data();
  if (widen(logits, vocab, scores)) {
    const size_t at = std::find_if(logits, logits + vocab, [](float x) { return std::isnan(x); }) - logits;
    throw std::invalid_argument("Sampler.sample: logits[" + std::to_string(at) + "] is NaN");
  }
  if (options_.repetition_penalty != 1) penalize(history, history_len, vocab);
  if (options_.temperature == 0) {
    // Lowest id among the maxima.
    const double max = max_of(scores, vocab);
    return static_cast<int32_t>(std::find(scores, scores + vocab, max) - scores);
  }

  double* weights = weights_.data();
  size_t count;
  if (options_.top_k > 0 && options_.top_k < vocab) {
    count = select_top_k(vocab);
    // The kept scores, gathered in id order, are the input of the exponentials.
    for (size_t j = 0; j < count; j++) boundary_weights_[j] = scores[ids_[j]];
    const double max = max_of(boundary_weights_.data(), count);
    shifted_exp(boundary_weights_.data(), count, max, options_.temperature, weights);
  } else {
    count = vocab;
    for (size_t i = 0; i < vocab; i++) ids_[i] = static_cast<int32_t>(i);
    const double max = max_of(scores, vocab);
    shifted_exp(scores, vocab, max, options_.temperature, weights);
  }
  const double total = block_masses(count);
  if (options_.top_p < 1) return draw_from_nucleus(count, total);
  return draw(count, total);
}

void Sampler::penalize(const int32_t* history, size_t history_len, size_t vocab) {
  if (++seen_mark_ == 0) {
    std::fill(seen_.begin(), seen_.end(), 0);
    seen_mark_ = 1;
  }
  const double penalty = options_.repetition_penalty;
  for (size_t p = 0; p < history_len; p++) {
    const int32_t id = history[p];
    if (id < 0 || static_cast<size_t>(id) >= vocab) {
      throw std::invalid_argument("Sampler.sample: history[" + std::to_string(p) + "] = " + std::to_string(id) +
                                  " is not a token id in " + token_range(vocab));
    }
    if (seen_[id] == seen_mark_) continue;
    seen_[id] = seen_mark_;
    double& score = scores_[id];
    score = score > 0 ? score / penalty : score * penalty;
  }
}

// The k highest-scoring ids (lower id wins ties) into ids_[0..k), in id order, through a size-k
// min-heap: O(V log k) rather than sorting the vocabulary.
size_t Sampler::select_top_k(size_t vocab) {
  const size_t k = options_.top_k;
  const double* scores = scores_.data();
  int32_t* heap = ids_.data();
  // "Worse" = lower score, or equal score and higher id; the heap root is the worst kept id.
  const auto worse = [scores](int32_t a, int32_t b) { return scores[a] < scores[b] || (scores[a] == scores[b] && a > b); };
  const auto sift_down = [&](size_t parent) {
    for (;;) {
      const size_t left = 2 * parent + 1;
      if (left >= k) return;
      const size_t right = left + 1;
      const size_t child = right < k && worse(heap[right], heap[left]) ? right : left;
      if (!worse(heap[child], heap[parent])) return;
      std::swap(heap[parent], heap[child]);
      parent = child;
    }
  };
  for (size_t i = 0; i < k; i++) heap[i] = static_cast<int32_t>(i);
  for (size_t i = k / 2; i-- > 0;) sift_down(i);
  for (size_t id = k; id < vocab; id++) {
    // A later id with an equal score is never better than the root, so ties keep the lower id.
    if (worse(heap[0], static_cast<int32_t>(id))) {
      heap[0] = static_cast<int32_t>(id);
      sift_down(0);
    }
  }
  std::sort(heap, heap + k);
  return k;
}

// Keeps the most likely candidates (lower id first among equal weights) until their mass
// reaches topP, at least one, then draws among them. Whole buckets from the heaviest down, then
// the part of the bucket where the mass is reached, which alone gets sorted: O(V) whatever the
// distribution.
int32_t Sampler::draw_from_nucleus(size_t count, double total) {
  double* weights = weights_.data();
  int32_t* ids = ids_.data();
  double bucket_mass[kNucleusBuckets] = {};
  for (size_t j = 0; j < count; j++) bucket_mass[nucleus_bucket(weights[j])] += weights[j];
  const double target_mass = options_.top_p * total;
  // The last bucket with mass stops the walk too: rounding can leave the sum short of topP * total.
  size_t last_with_mass = kNucleusBuckets - 1;
  while (last_with_mass > 0 && bucket_mass[last_with_mass] == 0) last_with_mass--;
  size_t boundary = 0;
  double mass_above = 0;
  for (; boundary < last_with_mass; boundary++) {
    if (mass_above + bucket_mass[boundary] >= target_mass) break;
    mass_above += bucket_mass[boundary];
  }
  double* sorted = boundary_weights_.data();
  size_t sorted_count = 0;
  for (size_t j = 0; j < count; j++) {
    if (nucleus_bucket(weights[j]) == boundary) sorted[sorted_count++] = weights[j];
  }
  std::sort(sorted, sorted + sorted_count);
  // Walk down from the boundary bucket's heaviest until the mass is reached; `cutoff` is the
  // lightest kept weight. Every heavier bucket's weights exceed it.
  size_t i = sorted_count;
  double mass = mass_above;
  do {
    i--;
    mass += sorted[i];
  } while (i > 0 && mass < target_mass);
  const double cutoff = sorted[i];
  size_t cutoff_ties_to_keep = 0;
  for (size_t x = i; x < sorted_count && sorted[x] == cutoff; x++) cutoff_ties_to_keep++;
  // Compact the kept candidates in place, in id order, so ties at the cutoff keep the lowest ids.
  size_t kept = 0;
  for (size_t j = 0; j < count; j++) {
    const double weight = weights[j];
    if (weight > cutoff || (weight == cutoff && cutoff_ties_to_keep > 0)) {
      if (weight == cutoff) cutoff_ties_to_keep--;
      ids[kept] = ids[j];
      weights[kept] = weight;
      kept++;
    }
  }
  return draw(kept, block_masses(kept));
}

double Sampler::block_masses(size_t count) {
  const double* weights = weights_.data();
  double total = 0;
  for (size_t b = 0; b * kDrawBlock < count; b++) {
    const size_t end = std::min(count, (b + 1) * kDrawBlock);
    // Four running sums: one sequential sum would be latency-bound.
    double sums[4] = {0, 0, 0, 0};
    size_t j = b * kDrawBlock;
    for (; j + 4 <= end; j += 4) {
      for (int lane = 0; lane < 4; lane++) sums[lane] += weights[j + lane];
    }
    for (; j < end; j++) sums[0] += weights[j];
    block_mass_[b] = (sums[0] + sums[1]) + (sums[2] + sums[3]);
    total += block_mass_[b];
  }
  return total;
}

int32_t Sampler::draw(size_t count, double total) {
  const double* weights = weights_.data();
  const int32_t* ids = ids_.data();
  const double target = rng_.next_double() * total;
  // Skip to the block holding the target, then walk it; rounding (the block's own sum order,
  // or a target equal to the total) can leave the walk short, and its last positive weight wins.
  double cumulative = 0;
  size_t b = 0;
  const size_t blocks = (count + kDrawBlock - 1) / kDrawBlock;
  while (b + 1 < blocks && !(target < cumulative + block_mass_[b])) cumulative += block_mass_[b++];
  int32_t last_positive = ids[b * kDrawBlock];
  for (size_t j = b * kDrawBlock; j < std::min(count, (b + 1) * kDrawBlock); j++) {
    if (weights[j] <= 0) continue;
    cumulative += weights[j];
    last_positive = ids[j];
    if (target < cumulative) return ids[j];
  }
  return last_positive;
}

}  // namespace retnet
