#include "quant.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>

#include "huge_pages.h"
#include "simd.h"

namespace retnet {
namespace {

// The scalar weight of row j, column k, before the row scale (int8's, for widen_rows).
float weight_at(const QuantizedMatrix& q, size_t index) {
  return q.format == WeightFormat::BF16 ? from_bf16(q.bf16[index]) : static_cast<float>(q.int8[index]);
}

// bf16 products: the weights widened to fp32 in registers (or VDPBF16PS, below).
void dots_generic(const QuantizedMatrix& q, int M, int n0, int n1, const float* X, float* Y, ptrdiff_t ldy) {
  const int K = q.K;
  for (int j = n0; j < n1; j++) {
    const size_t row = static_cast<size_t>(j) * K;
    for (int i = 0; i < M; i++) {
      float s = 0;
      for (int k = 0; k < K; k++) s += X[static_cast<size_t>(i) * K + k] * weight_at(q, row + k);
      Y[i * ldy + j] = s;
    }
  }
}

#ifdef RETNET_X86
// 16 consecutive weights of a row as two fp32 vectors.
struct LoadBf16 {
  const uint16_t* w;
  static LoadBf16 row(const QuantizedMatrix& q, size_t offset) { return {q.bf16 + offset}; }
  __attribute__((target("avx2,fma"))) void operator()(int k, __m256& w0, __m256& w1) const {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k));
    w0 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(v)), 16));
    w1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(v, 1)), 16));
  }
};

// 16 consecutive weights of a row as two fp32 vectors without shuffles: the even ones (each
// 32-bit lane's low half, shifted up) and the odd ones (its high half, masked). The
// activations come split the same way (bf16_dots_avx2).
struct LoadBf16Pairs {
  const uint16_t* w;
  static LoadBf16Pairs row(const QuantizedMatrix& q, size_t offset) { return {q.bf16 + offset}; }
  __attribute__((target("avx2,fma"))) void operator()(int k, __m256& w0, __m256& w1) const {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k));
    w0 = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    w1 = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
};

struct LoadInt8 {
  const int8_t* w;
  static LoadInt8 row(const QuantizedMatrix& q, size_t offset) { return {q.int8 + offset}; }
  __attribute__((target("avx2,fma"))) void operator()(int k, __m256& w0, __m256& w1) const {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k));
    w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
    w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8)));
  }
};

// WR weight rows (ldw weights apart; outputs ldw_out apart) against ROWS activation rows. Each
// output's sum is two 8-lane chains over k in order, then the tail, whatever WR and ROWS.
template <int ROWS, int WR, typename Load>
__attribute__((target("avx2,fma"))) inline void row_dots(const QuantizedMatrix& q, size_t row, size_t ldw, int K,
                                                         const float* X, float* out, ptrdiff_t ldy, ptrdiff_t ldw_out) {
  Load load[WR];
  for (int w = 0; w < WR; w++) load[w] = Load::row(q, row + w * ldw);
  __m256 a0[WR][ROWS], a1[WR][ROWS];
  for (int w = 0; w < WR; w++)
    for (int r = 0; r < ROWS; r++) a0[w][r] = a1[w][r] = _mm256_setzero_ps();
  int k = 0;
  for (; k + 16 <= K; k += 16) {
    for (int w = 0; w < WR; w++) {
      __m256 w0, w1;
      load[w](k, w0, w1);
      for (int r = 0; r < ROWS; r++) {
        a0[w][r] = _mm256_fmadd_ps(_mm256_loadu_ps(X + r * K + k), w0, a0[w][r]);
        a1[w][r] = _mm256_fmadd_ps(_mm256_loadu_ps(X + r * K + k + 8), w1, a1[w][r]);
      }
    }
  }
  for (int w = 0; w < WR; w++) {
    for (int r = 0; r < ROWS; r++) {
      float s = hsum256(_mm256_add_ps(a0[w][r], a1[w][r]));
      for (int t = k; t < K; t++) s += X[r * K + t] * weight_at(q, row + w * ldw + t);
      out[w * ldw_out + r * ldy] = s;
    }
  }
}

template <typename Load>
__attribute__((target("avx2,fma"))) void dots_avx2(const QuantizedMatrix& q, int M, int n0, int n1, const float* X,
                                                   float* Y, ptrdiff_t ldy) {
  const int K = q.K;
  int j = n0;
  if (M == 1) {
    // Batch 1: row j of the block's first half with row j + half, as two streams (as
    // dots_bf16dp and the fp32 panels read).
    const int half = (n1 - n0) / 2;
    for (; j < n0 + half; j++)
      row_dots<1, 2, Load>(q, static_cast<size_t>(j) * K, static_cast<size_t>(half) * K, K, X, Y + j, ldy, half);
    j = n0 + 2 * half;
  }
  // Four activation rows at a time against every weight row of the block, so those rows (16-28
  // KB at medium's K) stay in L1 and the block's weights come from L2 after the first pass.
  // Each weight row against all the activation rows in turn read the activations from L2 every
  // time: medium bf16 batch 16 took 162-168 ms/step against 135-153 (Zen 3 VM).
  const int j0 = j;
  for (int i = 0; i < M; i += 4) {
    const float* x = X + static_cast<size_t>(i) * K;
    float* y = Y + i * ldy;
    for (j = j0; j < n1; j++) {
      const size_t row = static_cast<size_t>(j) * K;
      switch (std::min(4, M - i)) {
        case 4: row_dots<4, 1, Load>(q, row, 0, K, x, y + j, ldy, 0); break;
        case 3: row_dots<3, 1, Load>(q, row, 0, K, x, y + j, ldy, 0); break;
        case 2: row_dots<2, 1, Load>(q, row, 0, K, x, y + j, ldy, 0); break;
        default: row_dots<1, 1, Load>(q, row, 0, K, x, y + j, ldy, 0); break;
      }
    }
  }
}

// bf16 products on AVX2: the activations' 16-float groups split into their even and odd
// elements, to meet the weights as LoadBf16Pairs widens them (batch 1 about 1.05-1.1x faster
// than widening in order, which takes three shuffles per 16 weights).
__attribute__((target("avx2,fma"))) void bf16_dots_avx2(const QuantizedMatrix& q, int M, int n0, int n1, const float* X,
                                                         float* Y, ptrdiff_t ldy) {
  const int K = q.K;
  thread_local std::vector<float> split;
  if (split.size() < static_cast<size_t>(M) * K) split.resize(static_cast<size_t>(M) * K);
  for (int i = 0; i < M; i++) {
    const float* x = X + static_cast<size_t>(i) * K;
    float* o = split.data() + static_cast<size_t>(i) * K;
    int k = 0;
    for (; k + 16 <= K; k += 16) {
      const __m256d a = _mm256_castps_pd(_mm256_loadu_ps(x + k)), b = _mm256_castps_pd(_mm256_loadu_ps(x + k + 8));
      // shuffle_ps takes lanes within 128-bit halves; the 64-bit permute puts them in order.
      const __m256d even = _mm256_castps_pd(_mm256_shuffle_ps(_mm256_castpd_ps(a), _mm256_castpd_ps(b), 0x88));
      const __m256d odd = _mm256_castps_pd(_mm256_shuffle_ps(_mm256_castpd_ps(a), _mm256_castpd_ps(b), 0xDD));
      _mm256_storeu_ps(o + k, _mm256_castpd_ps(_mm256_permute4x64_pd(even, 0xD8)));
      _mm256_storeu_ps(o + k + 8, _mm256_castpd_ps(_mm256_permute4x64_pd(odd, 0xD8)));
    }
    for (; k < K; k++) o[k] = x[k];
  }
  dots_avx2<LoadBf16Pairs>(q, M, n0, n1, split.data(), Y, ldy);
}

// The AVX-512 versions: 16 weights of a row as one fp32 vector, one 16-lane accumulator per
// activation row, eight rows per pass over the weight row.
struct LoadBf16x16 {
  const uint16_t* w;
  static LoadBf16x16 row(const QuantizedMatrix& q, size_t offset) { return {q.bf16 + offset}; }
  __attribute__((target("avx512f"))) __m512 operator()(int k) const {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k));
    return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(0xFFFF, _mm512_maskz_cvtepu16_epi32(0xFFFF, v), 16));
  }
};

struct LoadInt8x16 {
  const int8_t* w;
  static LoadInt8x16 row(const QuantizedMatrix& q, size_t offset) { return {q.int8 + offset}; }
  __attribute__((target("avx512f"))) __m512 operator()(int k) const {
    // (maskz forms with every lane kept: GCC 12 warns that the plain ones read undefined lanes)
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k));
    return _mm512_maskz_cvtepi32_ps(0xFFFF, _mm512_maskz_cvtepi8_epi32(0xFFFF, v));
  }
};

template <int ROWS, typename Load>
__attribute__((target("avx512f"))) inline void row_dots_avx512(const QuantizedMatrix& q, const Load& load, size_t row,
                                                                int K, const float* X, float* out,
                                                                ptrdiff_t ldy) {
  __m512 acc[ROWS];
  for (int r = 0; r < ROWS; r++) acc[r] = _mm512_setzero_ps();
  int k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m512 w = load(k);
    for (int r = 0; r < ROWS; r++) acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(X + r * K + k), w, acc[r]);
  }
  for (int r = 0; r < ROWS; r++) {
    float s = hsum512(acc[r]);
    for (int t = k; t < K; t++) s += X[r * K + t] * weight_at(q, row + t);
    out[r * ldy] = s;
  }
}

// A batch: WR weight rows against XR activation rows at once, so that each decoded weight
// vector feeds XR multiply-adds and each activation load WR (one weight row at a time, a
// batch-16 bf16 step ran slower than fp32's). Every output is summed exactly as
// row_dots_avx512 sums it, so the numbers do not depend on the batch. (row_dots_avx512 keeps
// the one-row case: as block_dots_avx512<1, 8> a batch-1 step ran slower, with the int8
// weights this kernel then also served: base 1.44 against 1.34 ms/step, medium 9.29 against 8.50.)
template <int WR, int XR, typename Load>
__attribute__((target("avx512f"))) inline void block_dots_avx512(const QuantizedMatrix& q, int j, int K,
                                                                  const float* X, float* out, ptrdiff_t ldy) {
  Load loads[WR];
  for (int w = 0; w < WR; w++) loads[w] = Load::row(q, static_cast<size_t>(j + w) * K);
  __m512 acc[WR][XR];
  for (int w = 0; w < WR; w++)
    for (int x = 0; x < XR; x++) acc[w][x] = _mm512_setzero_ps();
  int k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 xs[XR];
    for (int x = 0; x < XR; x++) xs[x] = _mm512_loadu_ps(X + x * K + k);
    for (int w = 0; w < WR; w++) {
      const __m512 wv = loads[w](k);
      for (int x = 0; x < XR; x++) acc[w][x] = _mm512_fmadd_ps(xs[x], wv, acc[w][x]);
    }
  }
  for (int w = 0; w < WR; w++) {
    const size_t row = static_cast<size_t>(j + w) * K;
    for (int x = 0; x < XR; x++) {
      float s = hsum512(acc[w][x]);
      for (int t = k; t < K; t++) s += X[x * K + t] * weight_at(q, row + t);
      out[x * ldy + w] = s;
    }
  }
}

// The block of `rows` (<= XR) activation rows, with the XR it was compiled for.
template <int WR, int XR, typename Load>
__attribute__((target("avx512f"))) inline void rows_block_avx512(int rows, const QuantizedMatrix& q, int j, int K,
                                                                  const float* X, float* out, ptrdiff_t ldy) {
  if (rows == XR) {
    block_dots_avx512<WR, XR, Load>(q, j, K, X, out, ldy);
  } else if constexpr (XR > 1) {
    rows_block_avx512<WR, XR - 1, Load>(rows, q, j, K, X, out, ldy);
  }
}

template <typename Load>
__attribute__((target("avx512f"))) void dots_avx512(const QuantizedMatrix& q, int M, int n0, int n1, const float* X,
                                                     float* Y, ptrdiff_t ldy) {
  const int K = q.K;
  int j = n0;
  // A batch of 8 or more: four weight rows at a time, the activation rows six at a time.
  // Fewer rows are bound by the weights' bytes, which one row at a time (a single stream)
  // reads faster: medium bf16 at batch 4 took 22.2 ms/step with the blocks against 19.1.
  constexpr int kWR = 4, kXR = 6, kMinRows = 8;
  if (M >= kMinRows) {
    for (; j + kWR <= n1; j += kWR)
      for (int i = 0; i < M; i += kXR)
        rows_block_avx512<kWR, kXR, Load>(std::min(kXR, M - i), q, j, K, X + i * K, Y + i * ldy + j, ldy);
  }
  for (; j < n1; j++) {
    const size_t row = static_cast<size_t>(j) * K;
    const Load load = Load::row(q, row);
    int i = 0;
    for (; i + 8 <= M; i += 8) row_dots_avx512<8>(q, load, row, K, X + i * K, Y + i * ldy + j, ldy);
    float* y = Y + i * ldy + j;
    const float* x = X + i * K;
    switch (M - i) {
      case 7: row_dots_avx512<7>(q, load, row, K, x, y, ldy); break;
      case 6: row_dots_avx512<6>(q, load, row, K, x, y, ldy); break;
      case 5: row_dots_avx512<5>(q, load, row, K, x, y, ldy); break;
      case 4: row_dots_avx512<4>(q, load, row, K, x, y, ldy); break;
      case 3: row_dots_avx512<3>(q, load, row, K, x, y, ldy); break;
      case 2: row_dots_avx512<2>(q, load, row, K, x, y, ldy); break;
      case 1: row_dots_avx512<1>(q, load, row, K, x, y, ldy); break;
      default: break;
    }
  }
}

// bf16 weights where the CPU has AVX512-BF16: the activations are rounded to bf16 too (once
// per call: a 64-row piece of a product), and VDPBF16PS multiplies 32 pairs per instruction into 16 fp32 sums, without
// converting the weights. Every output is summed the same way whatever M (32 columns per
// step in order, hsum512, then the columns past the last multiple of 32 one by one).
// Weight row w at W + w * ldw, its outputs at out + w * ldw_out.
template <int WR, int XR>
__attribute__((target("avx512f,avx512bf16"))) inline void block_dots_bf16dp(const uint16_t* W, int K, const uint16_t* Xb,
                                                                            int ldx, float* out, ptrdiff_t ldy,
                                                                            size_t ldw, ptrdiff_t ldw_out) {
  __m512 acc[WR][XR];
  for (int w = 0; w < WR; w++)
    for (int x = 0; x < XR; x++) acc[w][x] = _mm512_setzero_ps();
  int k = 0;
  for (; k + 32 <= K; k += 32) {
    // Weight rows read as streams (a batch under 8: one row at a time, or batch 1's two)
    // fetch the row three on (past the matrix's end for its last rows: a prefetch never
    // faults): without it a batch-1 step ran slower than the conversion kernel's (base 2.39
    // against 1.79 ms).
    if (WR == 1 || ldw != static_cast<size_t>(K))
      for (int w = 0; w < WR; w++) _mm_prefetch(reinterpret_cast<const char*>(W + w * ldw + 3 * static_cast<size_t>(K) + k), _MM_HINT_T0);
    __m512bh xs[XR];
    for (int x = 0; x < XR; x++) xs[x] = (__m512bh)_mm512_loadu_si512(Xb + x * ldx + k);
    for (int w = 0; w < WR; w++) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(W + w * ldw + k);
      for (int x = 0; x < XR; x++) acc[w][x] = _mm512_dpbf16_ps(acc[w][x], xs[x], wv);
    }
  }
  for (int w = 0; w < WR; w++) {
    for (int x = 0; x < XR; x++) {
      float s = hsum512(acc[w][x]);
      for (int t = k; t < K; t++) s += from_bf16(Xb[x * ldx + t]) * from_bf16(W[w * ldw + t]);
      out[x * ldy + w * ldw_out] = s;
    }
  }
}

template <int WR, int XR>
__attribute__((target("avx512f,avx512bf16"))) inline void rows_block_bf16dp(int count, const uint16_t* W, int K,
                                                                            const uint16_t* Xb, int ldx, float* out,
                                                                            ptrdiff_t ldy) {
  if (count == XR) {
    block_dots_bf16dp<WR, XR>(W, K, Xb, ldx, out, ldy, K, 1);
  } else if constexpr (XR > 1) {
    rows_block_bf16dp<WR, XR - 1>(count, W, K, Xb, ldx, out, ldy);
  }
}

__attribute__((target("avx512f,avx512bf16,avx512bw"))) void dots_bf16dp(const QuantizedMatrix& q, int M, int n0, int n1,
                                                                        const float* X, float* Y, ptrdiff_t ldy) {
  const int K = q.K;
  // The activations as bf16, rounded to nearest even like the weights.
  thread_local std::vector<uint16_t> rounded;
  if (rounded.size() < static_cast<size_t>(M) * K) rounded.resize(static_cast<size_t>(M) * K);
  for (int i = 0; i < M; i++) {
    const float* x = X + static_cast<size_t>(i) * K;
    uint16_t* o = rounded.data() + static_cast<size_t>(i) * K;
    int k = 0;
    for (; k + 32 <= K; k += 32)
      _mm512_storeu_si512(o + k, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + k + 16), _mm512_loadu_ps(x + k)));
    for (; k < K; k++) o[k] = to_bf16(x[k]);
  }
  const uint16_t* Xb = rounded.data();
  int j = n0;
  if (M == 1) {
    // Batch 1: row j of the block's first half with row j + half, read as two streams (as the
    // fp32 panels are, panel_dots_pair): medium batch 1 ran 1.01-1.07x faster. (The int8
    // kernel read that way ran 1.05-1.11x slower.)
    const int half = (n1 - n0) / 2;
    for (; j < n0 + half; j++)
      block_dots_bf16dp<2, 1>(q.bf16 + static_cast<size_t>(j) * K, K, Xb, K, Y + j, ldy,
                              static_cast<size_t>(half) * K, half);
    j = n0 + 2 * half;
  }
  // As dots_avx512: blocks of 4 weight rows from 8 activation rows on, else one row at a time.
  constexpr int kWR = 4, kXR = 6, kMinRows = 8;
  if (M >= kMinRows) {
    for (; j + kWR <= n1; j += kWR)
      for (int i = 0; i < M; i += kXR)
        rows_block_bf16dp<kWR, kXR>(std::min(kXR, M - i), q.bf16 + static_cast<size_t>(j) * K, K,
                                    Xb + static_cast<size_t>(i) * K, K, Y + i * ldy + j, ldy);
  }
  for (; j < n1; j++)
    for (int i = 0; i < M; i += kXR)
      rows_block_bf16dp<1, kXR>(std::min(kXR, M - i), q.bf16 + static_cast<size_t>(j) * K, K,
                                Xb + static_cast<size_t>(i) * K, K, Y + i * ldy + j, ldy);
}
#endif

// The largest |x| of a row, NaN if it holds one.
float max_abs_generic(const float* x, int K) {
  float max_abs = 0;
  for (int k = 0; k < K; k++) {
    const float a = std::fabs(x[k]);
    if (a != a) return NAN;
    max_abs = std::max(max_abs, a);
  }
  return max_abs;
}

#ifdef RETNET_X86
__attribute__((target("avx2,fma"))) float max_abs_avx2(const float* x, int K) {
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 max = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
  int k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256 v = _mm256_and_ps(_mm256_loadu_ps(x + k), magnitude);
    max = _mm256_max_ps(max, v);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  if (_mm256_movemask_ps(nan)) return NAN;
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, max);
  float m = max_abs_generic(x + k, K - k);
  for (const float l : lanes) m = std::max(m, l);  // a NaN in the tail stays: max(NaN, l) is NaN
  return m;
}

// The grid integers of x (activation_level's), 16 at a time; returns how many it wrote.
__attribute__((target("avx2,fma"))) int grid_row_avx2(const float* x, int K, float inverse, int16_t* q) {
  const __m256 scale = _mm256_set1_ps(inverse);
  const __m256i hi = _mm256_set1_epi32(32767), lo = _mm256_set1_epi32(-32767);
  int k = 0;
  for (; k + 16 <= K; k += 16) {
    // x * inverse is exact; the conversion rounds to nearest even, as nearbyint does.
    __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k), scale));
    __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k + 8), scale));
    a = _mm256_min_epi32(_mm256_max_epi32(a, lo), hi);
    b = _mm256_min_epi32(_mm256_max_epi32(b, lo), hi);
    // packs works within 128-bit halves: put the four 64-bit pieces back in order.
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k), packed);
  }
  return k;
}
#endif

// int8 products on the activation grid (quant.h). Integer sums are exact whatever their order,
// so each kernel may split a row's sum across accumulators as suits it. An int32 lane gains at
// most 2 * 128 * 32767 per instruction (two products); a block of kIntBlock columns gives a
// lane at most 128 of those (AVX2's 8 lanes, 2048 / 16), under 2^31, before it is added to an
// int64 total.
constexpr int kIntBlock = 2048;

// Two roundings (to double, then to fp32): within a hair over half an fp32 unit of the exact
// product, and the same on every path, which is what batch invariance needs.
inline float int8_output(int64_t sum, float scale, float step) {
  return static_cast<float>(static_cast<double>(sum) * (static_cast<double>(scale) * step));
}

int64_t int8_tail(const int8_t* w, const int16_t* x, int k0, int K) {
  int64_t s = 0;
  for (int k = k0; k < K; k++) s += static_cast<int32_t>(w[k]) * x[k];
  return s;
}

void int8_dots_generic(const QuantizedMatrix& q, int M, int n0, int n1, const int16_t* Q, const float* steps, float* Y,
                       ptrdiff_t ldy) {
  const int K = q.K;
  for (int j = n0; j < n1; j++) {
    const int8_t* w = q.int8 + static_cast<size_t>(j) * K;
    for (int i = 0; i < M; i++) Y[i * ldy + j] = int8_output(int8_tail(w, Q + static_cast<size_t>(i) * K, 0, K), q.scales[j], steps[i]);
  }
}

#ifdef RETNET_X86
// acc + the pairwise products of a and b (VPDPWSSD), in asm: GCC 12 copies every accumulator
// of the intrinsic's form to another register each step (medium int8 batch 16 ran 40 % slower
// than the fp32-widening kernel this replaces).
__attribute__((target("avx512f,avx512bw,avx512vnni"))) inline __m512i dot_pairs(__m512i acc, __m512i a, __m512i b) {
  asm("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
  return acc;
}

// The 16 int32 lanes' sum, in int64 (it may not fit 32 bits).
__attribute__((target("avx512f,avx512bw,avx512vnni"))) inline int64_t sum_lanes(__m512i lanes) {
  // (maskz forms with every lane kept: GCC 12 warns that the plain ones read undefined lanes)
  const __m512i eight = _mm512_add_epi64(_mm512_maskz_cvtepi32_epi64(0xFF, _mm512_maskz_extracti64x4_epi64(0xF, lanes, 0)),
                                         _mm512_maskz_cvtepi32_epi64(0xFF, _mm512_maskz_extracti64x4_epi64(0xF, lanes, 1)));
  const __m256i four = _mm256_add_epi64(_mm512_maskz_extracti64x4_epi64(0xF, eight, 0), _mm512_maskz_extracti64x4_epi64(0xF, eight, 1));
  const __m128i two = _mm_add_epi64(_mm256_castsi256_si128(four), _mm256_extracti128_si256(four, 1));
  return _mm_cvtsi128_si64(two) + _mm_extract_epi64(two, 1);
}

// WR weight rows against XR activation rows, CH accumulators per pair (one weight row and
// one activation row: independent chains, so a batch-1 row is not one dependent chain).
template <int WR, int XR, int CH>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) inline void int8_block_vnni(const QuantizedMatrix& q, int j,
                                                                                    const int16_t* Q, const float* steps,
                                                                                    float* out, ptrdiff_t ldy) {
  const int K = q.K;
  const int8_t* W = q.int8 + static_cast<size_t>(j) * K;
  int64_t total[WR][XR] = {};
  int k = 0;
  while (k + 32 * CH <= K) {
    __m512i acc[CH][WR][XR];
    for (int c = 0; c < CH; c++)
      for (int w = 0; w < WR; w++)
        for (int x = 0; x < XR; x++) acc[c][w][x] = _mm512_setzero_si512();
    const int end = std::min(K, k + kIntBlock) - 32 * CH;
    for (; k <= end; k += 32 * CH) {
      // One weight row at a time (a batch under 8) fetches the row three on, a line (64
      // weights) at a time, as the fp32 and bf16 rows do (past the matrix's end for its last
      // rows: a prefetch never faults). Base batch 1: 1.02-1.37 against 1.15-1.55 ms/step, 8
      // of 8 rounds; medium 5 of 8, within noise.
      if (WR == 1 && k % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(W + 3 * static_cast<size_t>(K) + k), _MM_HINT_T0);
      for (int c = 0; c < CH; c++) {
        const int kc = k + 32 * c;
        __m512i xs[XR];
        for (int x = 0; x < XR; x++) xs[x] = _mm512_loadu_si512(Q + static_cast<size_t>(x) * K + kc);
        for (int w = 0; w < WR; w++) {
          const __m512i wv = _mm512_maskz_cvtepi8_epi16(~0u, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(W + static_cast<size_t>(w) * K + kc)));
          for (int x = 0; x < XR; x++) acc[c][w][x] = dot_pairs(acc[c][w][x], wv, xs[x]);
        }
      }
    }
    for (int w = 0; w < WR; w++)
      for (int x = 0; x < XR; x++) {
        __m512i lanes = acc[0][w][x];
        for (int c = 1; c < CH; c++) lanes = _mm512_add_epi32(lanes, acc[c][w][x]);  // still within one block
        total[w][x] += sum_lanes(lanes);
      }
  }
  for (int w = 0; w < WR; w++)
    for (int x = 0; x < XR; x++) {
      const int64_t s = total[w][x] + int8_tail(W + static_cast<size_t>(w) * K, Q + static_cast<size_t>(x) * K, k, K);
      out[x * ldy + w] = int8_output(s, q.scales[j + w], steps[x]);
    }
}

// The block of `rows` (<= XR) activation rows, with the XR it was compiled for.
template <int WR, int XR, int CH>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) inline void int8_rows_vnni(int rows, const QuantizedMatrix& q, int j,
                                                                                   const int16_t* Q, const float* steps,
                                                                                   float* out, ptrdiff_t ldy) {
  if (rows == XR) {
    int8_block_vnni<WR, XR, CH>(q, j, Q, steps, out, ldy);
  } else if constexpr (XR > 1) {
    int8_rows_vnni<WR, XR - 1, CH>(rows, q, j, Q, steps, out, ldy);
  }
}

// A batch of 8 or more: four weight rows against six activation rows at a time, so each
// widened weight vector feeds six dot products. Fewer: one weight row at a time (a single
// stream) against up to seven activation rows, a lone row over two accumulators.
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void int8_dots_vnni(const QuantizedMatrix& q, int M, int n0,
                                                                            int n1, const int16_t* Q,
                                                                            const float* steps, float* Y,
                                                                            ptrdiff_t ldy) {
  const size_t K = q.K;
  int j = n0;
  constexpr int kWR = 4, kXR = 6, kMinRows = 8;
  if (M >= kMinRows) {
    for (; j + kWR <= n1; j += kWR)
      for (int i = 0; i < M; i += kXR)
        int8_rows_vnni<kWR, kXR, 1>(std::min(kXR, M - i), q, j, Q + i * K, steps + i, Y + i * ldy + j, ldy);
  }
  for (; j < n1; j++) {
    if (M == 1) {
      int8_block_vnni<1, 1, 2>(q, j, Q, steps, Y + j, ldy);
      continue;
    }
    for (int i = 0; i < M; i += kMinRows - 1)
      int8_rows_vnni<1, kMinRows - 1, 1>(std::min(kMinRows - 1, M - i), q, j, Q + i * K, steps + i, Y + i * ldy + j, ldy);
  }
}

// AVX2: VPMADDWD's 16 products per instruction into 8 int32 lanes (pairs summed), one weight
// row at a time against up to four activation rows, a lone row over two accumulators (CH);
// with WR = 2, two weight rows `apart` rows apart (their outputs as far apart in out).
template <int XR, int CH, int WR = 1>
__attribute__((target("avx2,fma"))) inline void int8_row_avx2(const QuantizedMatrix& q, int j, const int16_t* Q,
                                                              const float* steps, float* out, ptrdiff_t ldy,
                                                              int apart = 0) {
  const int K = q.K;
  const int8_t* W[WR];
  for (int w = 0; w < WR; w++) W[w] = q.int8 + static_cast<size_t>(j + w * apart) * K;
  int64_t total[WR][XR] = {};
  int k = 0;
  while (k + 16 * CH <= K) {
    __m256i acc[WR][CH][XR];
    for (int w = 0; w < WR; w++)
      for (int c = 0; c < CH; c++)
        for (int x = 0; x < XR; x++) acc[w][c][x] = _mm256_setzero_si256();
    const int end = std::min(K, k + kIntBlock) - 16 * CH;
    for (; k <= end; k += 16 * CH) {
      for (int w = 0; w < WR; w++) {
        for (int c = 0; c < CH; c++) {
          const int kc = k + 16 * c;
          const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(W[w] + kc)));
          for (int x = 0; x < XR; x++) {
            const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(Q + static_cast<size_t>(x) * K + kc));
            acc[w][c][x] = _mm256_add_epi32(acc[w][c][x], _mm256_madd_epi16(wv, xv));
          }
        }
      }
    }
    for (int w = 0; w < WR; w++) {
      for (int x = 0; x < XR; x++) {
        __m256i lanes = acc[w][0][x];
        for (int c = 1; c < CH; c++) lanes = _mm256_add_epi32(lanes, acc[w][c][x]);
        const __m256i wide = _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(lanes)),
                                              _mm256_cvtepi32_epi64(_mm256_extracti128_si256(lanes, 1)));
        alignas(32) int64_t parts[4];
        _mm256_store_si256(reinterpret_cast<__m256i*>(parts), wide);
        total[w][x] += parts[0] + parts[1] + parts[2] + parts[3];
      }
    }
  }
  for (int w = 0; w < WR; w++) {
    for (int x = 0; x < XR; x++) {
      const int64_t s = total[w][x] + int8_tail(W[w], Q + static_cast<size_t>(x) * K, k, K);
      out[w * apart + x * ldy] = int8_output(s, q.scales[j + w * apart], steps[x]);
    }
  }
}

__attribute__((target("avx2,fma"))) void int8_dots_avx2(const QuantizedMatrix& q, int M, int n0, int n1,
                                                        const int16_t* Q, const float* steps, float* Y, ptrdiff_t ldy) {
  const size_t K = q.K;
  int j = n0;
  if (M == 1) {
    // Batch 1: row j of the block's first half with row j + half, as two streams (as the fp32
    // and bf16 products read); on the Zen 3 VM medium steps ran 1.06-1.15x faster. (On the
    // Zen 5, the VNNI kernel read that way ran slower: int8_dots_vnni.)
    const int half = (n1 - n0) / 2;
    for (; j < n0 + half; j++) int8_row_avx2<1, 2, 2>(q, j, Q, steps, Y + j, ldy, half);
    j = n0 + 2 * half;
  }
  if (M == 1) {
    for (; j < n1; j++) int8_row_avx2<1, 2>(q, j, Q, steps, Y + j, ldy);
    return;
  }
  // Four activation rows at a time against every weight row of the block, as dots_avx2 does
  // (medium batch 16 faster in 4 of 7 alternating rounds, slower in 2; 1.04-1.1x the
  // products' rate in a harness).
  const int j0 = j;
  for (size_t i = 0; i < static_cast<size_t>(M); i += 4) {
    const int16_t* x = Q + i * K;
    float* y = Y + i * ldy;
    for (j = j0; j < n1; j++) {
      switch (std::min<size_t>(4, M - i)) {
        case 4: int8_row_avx2<4, 1>(q, j, x, steps + i, y + j, ldy); break;
        case 3: int8_row_avx2<3, 1>(q, j, x, steps + i, y + j, ldy); break;
        case 2: int8_row_avx2<2, 1>(q, j, x, steps + i, y + j, ldy); break;
        default: int8_row_avx2<1, 1>(q, j, x, steps + i, y + j, ldy); break;
      }
    }
  }
}
#endif

// widen_rows per instruction set: 16 weights per step (one AVX-512 vector, two AVX2 ones), the
// columns past the last multiple of 16 one by one.
void widen_rows_generic(const QuantizedMatrix& q, int n0, int rows, int k0, int kc, float* out, ptrdiff_t ldo) {
  for (int r = 0; r < rows; r++) {
    const size_t at = static_cast<size_t>(n0 + r) * q.K + k0;
    const float scale = q.format == WeightFormat::Int8 ? q.scales[n0 + r] : 1.0f;
    for (int k = 0; k < kc; k++) out[r * ldo + k] = weight_at(q, at + k) * scale;
  }
}

#ifdef RETNET_X86
template <typename Load>
__attribute__((target("avx512f"))) void widen_avx512(const QuantizedMatrix& q, int n0, int rows, int k0, int kc,
                                                      float* out, ptrdiff_t ldo, int ahead) {
  const int bytes = q.format == WeightFormat::BF16 ? 2 : 1;
  for (int r = 0; r < rows; r++) {
    const size_t at = static_cast<size_t>(n0 + r) * q.K + k0;
    const Load load = Load::row(q, at);
    const char* next = reinterpret_cast<const char*>(load.w + static_cast<size_t>(ahead) * q.K);
    const float scale = q.format == WeightFormat::Int8 ? q.scales[n0 + r] : 1.0f;
    const __m512 s = _mm512_set1_ps(scale);
    float* dst = out + r * ldo;
    int k = 0;
    for (; k + 16 <= kc; k += 16) {
      if (ahead) _mm_prefetch(next + k * bytes, _MM_HINT_T0);
      _mm512_storeu_ps(dst + k, _mm512_mul_ps(load(k), s));
    }
    for (; k < kc; k++) dst[k] = weight_at(q, at + k) * scale;
  }
}

void widen_rows_avx512(const QuantizedMatrix& q, int n0, int rows, int k0, int kc, float* out, ptrdiff_t ldo,
                       int ahead) {
  if (q.format == WeightFormat::BF16) return widen_avx512<LoadBf16x16>(q, n0, rows, k0, kc, out, ldo, ahead);
  widen_avx512<LoadInt8x16>(q, n0, rows, k0, kc, out, ldo, ahead);
}

template <typename Load>
__attribute__((target("avx2,fma"))) void widen_avx2(const QuantizedMatrix& q, int n0, int rows, int k0, int kc,
                                                     float* out, ptrdiff_t ldo) {
  for (int r = 0; r < rows; r++) {
    const size_t at = static_cast<size_t>(n0 + r) * q.K + k0;
    const Load load = Load::row(q, at);
    const float scale = q.format == WeightFormat::Int8 ? q.scales[n0 + r] : 1.0f;
    const __m256 s = _mm256_set1_ps(scale);
    float* dst = out + r * ldo;
    int k = 0;
    for (; k + 16 <= kc; k += 16) {
      __m256 w0, w1;
      load(k, w0, w1);
      _mm256_storeu_ps(dst + k, _mm256_mul_ps(w0, s));
      _mm256_storeu_ps(dst + k + 8, _mm256_mul_ps(w1, s));
    }
    for (; k < kc; k++) dst[k] = weight_at(q, at + k) * scale;
  }
}

void widen_rows_avx2(const QuantizedMatrix& q, int n0, int rows, int k0, int kc, float* out, ptrdiff_t ldo) {
  if (q.format == WeightFormat::BF16) return widen_avx2<LoadBf16>(q, n0, rows, k0, kc, out, ldo);
  widen_avx2<LoadInt8>(q, n0, rows, k0, kc, out, ldo);
}
#endif

}  // namespace

size_t compact_bytes(int N, int K, WeightFormat format) {
  const size_t n = static_cast<size_t>(N) * K;
  auto line = [](size_t bytes) { return (bytes + 63) / 64 * 64; };
  if (format == WeightFormat::BF16) return line(n * sizeof(uint16_t));
  if (format == WeightFormat::Int8) return line(N * sizeof(float)) + line(n);
  return 0;
}

std::shared_ptr<void> compact_storage(size_t bytes) {
  if (bytes >= 2 * kHugePage) {
    if (void* p = map_huge(bytes)) return std::shared_ptr<void>(p, [bytes](void* q) { munmap(q, huge_mapping_size(bytes)); });
  }
  void* p = std::aligned_alloc(64, std::max<size_t>(64, (bytes + 63) / 64 * 64));
  if (!p) throw std::bad_alloc();
  return std::shared_ptr<void>(p, std::free);
}

QuantizedMatrix compact_matrix(int N, int K, WeightFormat format, std::shared_ptr<void> storage, size_t offset) {
  QuantizedMatrix q;
  q.format = format;
  q.N = N;
  q.K = K;
  if (!storage) {
    storage = compact_storage(compact_bytes(N, K, format));
    offset = 0;
  }
  char* const at = static_cast<char*>(storage.get()) + offset;
  if (format == WeightFormat::BF16) q.bf16 = reinterpret_cast<uint16_t*>(at);
  if (format == WeightFormat::Int8) {
    q.scales = reinterpret_cast<float*>(at);
    q.int8 = reinterpret_cast<int8_t*>(at + (N * sizeof(float) + 63) / 64 * 64);
  }
  q.storage = std::move(storage);
  return q;
}

void check_bf16_range(const float* x, size_t n, size_t first) {
  for (size_t i = 0; i < n; i++) {
    const uint16_t b = to_bf16(x[i]);
    if ((b & 0x7FFFu) == 0x7F80u && std::isfinite(x[i])) {
      char value[32];
      std::snprintf(value, sizeof value, "%.9g", x[i]);
      throw std::invalid_argument(std::string("value ") + value + " at index " + std::to_string(first + i) +
                                  " is beyond bf16's range (largest finite 3.3895e38)");
    }
  }
}

void quantize_into(QuantizedMatrix& q, const RowReader& read_row) {
  const int N = q.N, K = q.K;
  std::vector<float> scratch(K);
  for (int j = 0; j < N; j++) {
    const float* row = read_row(j, scratch.data());
    const size_t at = static_cast<size_t>(j) * K;
    if (q.format == WeightFormat::BF16) {
      // A finite weight rounded to infinity would turn every output it touches to NaN: refuse it.
      check_bf16_range(row, K, at);
      for (int k = 0; k < K; k++) q.bf16[at + k] = to_bf16(row[k]);
    } else if (q.format == WeightFormat::Int8) {
      float max_abs = 0;
      for (int k = 0; k < K; k++) max_abs = std::max(max_abs, std::fabs(row[k]));
      const float scale = max_abs > 0 ? max_abs / 127.0f : 1.0f;
      q.scales[j] = scale;
      for (int k = 0; k < K; k++) {
        const float v = std::nearbyint(row[k] / scale);
        q.int8[at + k] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, v)));
      }
    }
  }
}

QuantizedMatrix quantize(int N, int K, WeightFormat format, const RowReader& read_row, std::shared_ptr<void> storage,
                         size_t offset) {
  QuantizedMatrix q = compact_matrix(N, K, format, std::move(storage), offset);
  quantize_into(q, read_row);
  return q;
}

void widen_rows(const QuantizedMatrix& q, int n0, int rows, int k0, int kc, float* out, ptrdiff_t ldo, int ahead) {
#ifdef RETNET_X86
  if (cpu_isa() >= CpuIsa::Avx512) return widen_rows_avx512(q, n0, rows, k0, kc, out, ldo, ahead);
  if (cpu_has_avx2_fma()) return widen_rows_avx2(q, n0, rows, k0, kc, out, ldo);
#endif
  widen_rows_generic(q, n0, rows, k0, kc, out, ldo);
}

void bf16_dots(const QuantizedMatrix& q, int M, int n0, int n1, const float* X, float* Y, ptrdiff_t ldy) {
#ifdef RETNET_X86
  if (cpu_has_avx512_bf16()) return dots_bf16dp(q, M, n0, n1, X, Y, ldy);
  if (cpu_isa() >= CpuIsa::Avx512) return dots_avx512<LoadBf16x16>(q, M, n0, n1, X, Y, ldy);
  if (cpu_has_avx2_fma()) return bf16_dots_avx2(q, M, n0, n1, X, Y, ldy);
#endif
  dots_generic(q, M, n0, n1, X, Y, ldy);
}

float activation_step(const float* x, int K) {
#ifdef RETNET_X86
  const float max_abs = cpu_has_avx2_fma() ? max_abs_avx2(x, K) : max_abs_generic(x, K);
#else
  const float max_abs = max_abs_generic(x, K);
#endif
  if (!std::isfinite(max_abs)) return NAN;
  if (max_abs == 0) return 1.0f;
  // max_abs / step in [2^14, 2^15) (below 2^-112, a coarser grid: the step stays a normal float).
  return std::ldexp(1.0f, std::max(std::ilogb(max_abs) - 14, -126));
}

void to_activation_grid(const float* X, int M, int K, int16_t* Q, float* steps) {
  for (int i = 0; i < M; i++) {
    const float* x = X + static_cast<size_t>(i) * K;
    int16_t* q = Q + static_cast<size_t>(i) * K;
    const float step = activation_step(x, K);
    steps[i] = step;
    if (step != step) {
      std::fill(q, q + K, int16_t{0});
      continue;
    }
    const float inverse = 1.0f / step;
    int k = 0;
#ifdef RETNET_X86
    if (cpu_has_avx2_fma()) k = grid_row_avx2(x, K, inverse, q);
#endif
    for (; k < K; k++) q[k] = static_cast<int16_t>(activation_level(x[k], inverse));
  }
}

void int8_dots(const QuantizedMatrix& q, int M, int n0, int n1, const int16_t* Q, const float* steps, float* Y,
               ptrdiff_t ldy) {
#ifdef RETNET_X86
  if (cpu_has_avx512_vnni()) return int8_dots_vnni(q, M, n0, n1, Q, steps, Y, ldy);
  if (cpu_has_avx2_fma()) return int8_dots_avx2(q, M, n0, n1, Q, steps, Y, ldy);
#endif
  int8_dots_generic(q, M, n0, n1, Q, steps, Y, ldy);
}

}  // namespace retnet
