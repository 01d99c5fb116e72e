#include "panels.h"

#include <algorithm>
#include <climits>
#include <cmath>

#include "simd.h"

namespace retnet {
namespace {

// panel_dots per instruction set. Each kernel reads one panel's columns [c, c + width) (P
// points at column c; `stride` is the panel's width), rows of X against them, and keeps every
// output in one lane from 0 to the end: acc = fma(x[k], w[k], acc), k in order.
// The generic kernel runs the panel's columns side by side (independent chains, each line read
// in order), so a target with vector FMAs can vectorize it: GCC 12 with -march=haswell emits
// packed FMAs for this loop and none for the column-at-a-time one it replaced. (This build's
// x86-64 baseline has no FMA instruction: std::fma is a libm call there either way.)
void panel_dots_generic(const float* P, int stride, int width, int K, const float* X, int M, float* Y, ptrdiff_t ldy) {
  float acc[kPanelWidth];
  for (int i = 0; i < M; i++) {
    const float* x = X + static_cast<size_t>(i) * K;
    std::fill(acc, acc + width, 0.0f);
    for (int k = 0; k < K; k++) {
      const float* line = P + static_cast<size_t>(k) * stride;
      for (int c = 0; c < width; c++) acc[c] = std::fma(x[k], line[c], acc[c]);
    }
    for (int c = 0; c < width; c++) Y[i * ldy + c] = acc[c];
  }
}

#ifdef RETNET_X86
// XR activation rows by NV vectors of 16 columns (the last masked to `last` unless FULL: a
// whole panel, whose unmasked loads at a constant stride ran 1.6x faster at batch 16).
template <int XR, int NV, bool FULL>
__attribute__((target("avx512f"))) inline void panel_block_avx512(const float* P, int stride, int K, const float* X,
                                                                   float* Y, ptrdiff_t ldy, __mmask16 last) {
  if constexpr (FULL) stride = kPanelWidth;
  __m512 acc[XR][NV];
  for (int x = 0; x < XR; x++)
    for (int v = 0; v < NV; v++) acc[x][v] = _mm512_setzero_ps();
  for (int k = 0; k < K; k++) {
    const float* p = P + static_cast<size_t>(k) * stride;
    __m512 w[NV];
    for (int v = 0; v + 1 < NV; v++) w[v] = _mm512_loadu_ps(p + 16 * v);
    w[NV - 1] = FULL ? _mm512_loadu_ps(p + 16 * (NV - 1)) : _mm512_maskz_loadu_ps(last, p + 16 * (NV - 1));
    for (int x = 0; x < XR; x++) {
      const __m512 xv = _mm512_set1_ps(X[static_cast<size_t>(x) * K + k]);
      for (int v = 0; v < NV; v++) acc[x][v] = _mm512_fmadd_ps(xv, w[v], acc[x][v]);
    }
  }
  for (int x = 0; x < XR; x++) {
    for (int v = 0; v + 1 < NV; v++) _mm512_storeu_ps(Y + x * ldy + 16 * v, acc[x][v]);
    if (FULL) {
      _mm512_storeu_ps(Y + x * ldy + 16 * (NV - 1), acc[x][NV - 1]);
    } else {
      _mm512_mask_storeu_ps(Y + x * ldy + 16 * (NV - 1), last, acc[x][NV - 1]);
    }
  }
}

template <int XR>
__attribute__((target("avx512f"))) inline void panel_rows_avx512(int rows, int nv, const float* P, int stride, int K,
                                                                  const float* X, float* Y, ptrdiff_t ldy,
                                                                  __mmask16 last) {
  if (rows < XR) {
    if constexpr (XR > 1) panel_rows_avx512<XR - 1>(rows, nv, P, stride, K, X, Y, ldy, last);
    return;
  }
  if (stride == kPanelWidth && nv == 4 && last == 0xFFFF) return panel_block_avx512<XR, 4, true>(P, stride, K, X, Y, ldy, last);
  switch (nv) {
    case 4: panel_block_avx512<XR, 4, false>(P, stride, K, X, Y, ldy, last); break;
    case 3: panel_block_avx512<XR, 3, false>(P, stride, K, X, Y, ldy, last); break;
    case 2: panel_block_avx512<XR, 2, false>(P, stride, K, X, Y, ldy, last); break;
    default: panel_block_avx512<XR, 1, false>(P, stride, K, X, Y, ldy, last); break;
  }
}

// Blocks of 6 activation rows by up to 64 columns: 24 accumulators, each weight vector used 6
// times per load.
__attribute__((target("avx512f"))) void panel_dots_avx512(const float* P, int stride, int width, int K, const float* X,
                                                           int M, float* Y, ptrdiff_t ldy) {
  const int nv = (width + 15) / 16;
  const __mmask16 last = static_cast<__mmask16>((1u << (width - 16 * (nv - 1))) - 1u);
  constexpr int kXR = 6;
  for (int i = 0; i < M; i += kXR)
    panel_rows_avx512<kXR>(std::min(kXR, M - i), nv, P, stride, K, X + static_cast<size_t>(i) * K, Y + i * ldy, ldy, last);
}

// One activation row against two whole panels, each output's chain as panel_block_avx512<1, 4, true>.
__attribute__((target("avx512f"))) void panel_pair_avx512(const float* a, const float* b, int K, const float* x,
                                                           float* ya, float* yb) {
  __m512 acc_a[4], acc_b[4];
  for (int v = 0; v < 4; v++) acc_a[v] = acc_b[v] = _mm512_setzero_ps();
  for (int k = 0; k < K; k++) {
    const __m512 xv = _mm512_set1_ps(x[k]);
    const float* pa = a + static_cast<size_t>(k) * kPanelWidth;
    const float* pb = b + static_cast<size_t>(k) * kPanelWidth;
    for (int v = 0; v < 4; v++) {
      acc_a[v] = _mm512_fmadd_ps(xv, _mm512_loadu_ps(pa + 16 * v), acc_a[v]);
      acc_b[v] = _mm512_fmadd_ps(xv, _mm512_loadu_ps(pb + 16 * v), acc_b[v]);
    }
  }
  for (int v = 0; v < 4; v++) {
    _mm512_storeu_ps(ya + 16 * v, acc_a[v]);
    _mm512_storeu_ps(yb + 16 * v, acc_b[v]);
  }
}

// AVX2: blocks of 2 activation rows by up to 32 columns (four 8-lane vectors, the last masked).
template <int XR>
__attribute__((target("avx2,fma"))) inline void panel_block_avx2(const float* P, int stride, int nv, int K,
                                                                  const float* X, float* Y, ptrdiff_t ldy, __m256i last) {
  __m256 acc[XR][4];
  for (int x = 0; x < XR; x++)
    for (int v = 0; v < 4; v++) acc[x][v] = _mm256_setzero_ps();
  for (int k = 0; k < K; k++) {
    const float* p = P + static_cast<size_t>(k) * stride;
    __m256 w[4];
    for (int v = 0; v < 4; v++)
      w[v] = v + 1 < nv ? _mm256_loadu_ps(p + 8 * v) : v + 1 == nv ? _mm256_maskload_ps(p + 8 * v, last) : _mm256_setzero_ps();
    for (int x = 0; x < XR; x++) {
      const __m256 xv = _mm256_set1_ps(X[static_cast<size_t>(x) * K + k]);
      for (int v = 0; v < 4; v++) acc[x][v] = _mm256_fmadd_ps(xv, w[v], acc[x][v]);
    }
  }
  for (int x = 0; x < XR; x++) {
    for (int v = 0; v + 1 < nv; v++) _mm256_storeu_ps(Y + x * ldy + 8 * v, acc[x][v]);
    _mm256_maskstore_ps(Y + x * ldy + 8 * (nv - 1), last, acc[x][nv - 1]);
  }
}

// Software prefetches a block issues as it goes: at lines next, next + every, ..., the same
// columns `ahead` lines on (none by default: next never comes).
struct LinePrefetch {
  int next = INT_MAX, every = 1, ahead = 0;
};

// XR activation rows by NV 8-lane vectors of a whole panel's columns over lines [k0, k1),
// unmasked (P points at the first column; lines are kPanelWidth apart). Each output's chain
// starts from 0 at line 0 and otherwise goes on from its value in Y.
template <int XR, int NV>
__attribute__((target("avx2,fma"))) inline void panel_whole_block_avx2(const float* P, int k0, int k1, int K,
                                                                        const float* X, float* Y, ptrdiff_t ldy,
                                                                        LinePrefetch prefetch = {}) {
  __m256 acc[XR][NV];
  for (int x = 0; x < XR; x++)
    for (int v = 0; v < NV; v++) acc[x][v] = k0 == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(Y + x * ldy + 8 * v);
  for (int k = k0; k < k1; k++) {
    const float* p = P + static_cast<size_t>(k) * kPanelWidth;
    if (k == prefetch.next) {
      for (int v = 0; v < NV; v += 2)
        _mm_prefetch(reinterpret_cast<const char*>(p + static_cast<ptrdiff_t>(prefetch.ahead) * kPanelWidth + 8 * v),
                     _MM_HINT_T0);
      prefetch.next += prefetch.every;
    }
    for (int x = 0; x < XR; x++) {
      const __m256 xv = _mm256_set1_ps(X[static_cast<size_t>(x) * K + k]);
      for (int v = 0; v < NV; v++) acc[x][v] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(p + 8 * v), acc[x][v]);
    }
  }
  for (int x = 0; x < XR; x++)
    for (int v = 0; v < NV; v++) _mm256_storeu_ps(Y + x * ldy + 8 * v, acc[x][v]);
}

// A whole panel on AVX2. The first row reads every line whole, one stream from DRAM (passes
// over half of each line, as the masked kernel below makes, read slower); the other rows then
// find the lines in cache and run three by 32 columns (12 accumulators). In a harness on a Zen 3
// VM: batch 16 at 71 GFLOP/s against 38 for the masked kernel, one row 1.7x faster.
// From kChunkedMinRows to kChunkedMaxRows rows, where reading the panel from DRAM takes about
// as long as the products, the rows pass over kChunkLines lines at a time, and the three-row
// blocks fetch the next chunk while they compute (each block a share of its lines): the DRAM
// stream overlaps the arithmetic instead of preceding it. The chains are the same, so are the
// bits. Medium's decode products at batch 16 and 32 ran faster in 11 of 12 alternating pairs,
// median 1.2x (Zen 3 VM, MEASUREMENTS.md); with fewer rows the stream is the bound either way,
// and with more the products are (at 256 rows of K 512, chunks were slower).
// 16 KiB of a panel: it and the one being fetched fill a Zen 3's 32 KiB L1 (chunks of 32 and 128
// lines ran no differently). Before a partial last chunk, the fetches run a few lines past the
// panel, into the next one's (a prefetch never faults).
constexpr int kChunkLines = 64;
constexpr int kChunkedMinRows = 16, kChunkedMaxRows = 64;
__attribute__((target("avx2,fma"))) void panel_whole_avx2(const float* P, int K, const float* X, int M, float* Y,
                                                           ptrdiff_t ldy) {
  const int chunk = M >= kChunkedMinRows && M <= kChunkedMaxRows ? kChunkLines : K;
  const int groups = (M - 1) / 3;
  for (int k0 = 0; k0 < K; k0 += chunk) {
    const int k1 = std::min(K, k0 + chunk);
    panel_whole_block_avx2<1, 8>(P, k0, k1, K, X, Y, ldy);
    int i = 1;
    for (int g = 0; g < groups; g++, i += 3) {
      LinePrefetch prefetch;
      if (k1 < K) prefetch = {k0 + g, groups, chunk};
      for (int c = 0; c < kPanelWidth; c += 32)
        panel_whole_block_avx2<3, 4>(P + c, k0, k1, K, X + static_cast<size_t>(i) * K, Y + i * ldy + c, ldy, prefetch);
    }
    for (; i < M; i++) panel_whole_block_avx2<1, 8>(P, k0, k1, K, X + static_cast<size_t>(i) * K, Y + i * ldy, ldy);
  }
}

// One activation row against two whole panels, as two streams; each output's chain as
// panel_whole_block_avx2<1, 8>. (16 accumulators and the broadcast: the compiler keeps one or
// two accumulators on the stack, which a memory-bound loop does not notice.)
__attribute__((target("avx2,fma"))) void panel_pair_avx2(const float* a, const float* b, int K, const float* x, float* ya,
                                                          float* yb) {
  __m256 acc_a[8], acc_b[8];
  for (int v = 0; v < 8; v++) acc_a[v] = acc_b[v] = _mm256_setzero_ps();
  for (int k = 0; k < K; k++) {
    const __m256 xv = _mm256_set1_ps(x[k]);
    const float* pa = a + static_cast<size_t>(k) * kPanelWidth;
    const float* pb = b + static_cast<size_t>(k) * kPanelWidth;
    for (int v = 0; v < 8; v++) {
      acc_a[v] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(pa + 8 * v), acc_a[v]);
      acc_b[v] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(pb + 8 * v), acc_b[v]);
    }
  }
  for (int v = 0; v < 8; v++) {
    _mm256_storeu_ps(ya + 8 * v, acc_a[v]);
    _mm256_storeu_ps(yb + 8 * v, acc_b[v]);
  }
}

// Part of a panel on AVX2 (a product's last, narrower panel, or a slice of one).
__attribute__((target("avx2,fma"))) void panel_dots_avx2(const float* P, int stride, int width, int K, const float* X,
                                                          int M, float* Y, ptrdiff_t ldy) {
  if (stride == kPanelWidth && width == kPanelWidth) return panel_whole_avx2(P, K, X, M, Y, ldy);
  for (int c = 0; c < width; c += 32) {
    const int cw = std::min(32, width - c);
    const int nv = (cw + 7) / 8;
    const int tail = cw - 8 * (nv - 1);
    const __m256i last = _mm256_cmpgt_epi32(_mm256_set1_epi32(tail), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    int i = 0;
    for (; i + 2 <= M; i += 2) panel_block_avx2<2>(P + c, stride, nv, K, X + static_cast<size_t>(i) * K, Y + i * ldy + c, ldy, last);
    if (i < M) panel_block_avx2<1>(P + c, stride, nv, K, X + static_cast<size_t>(i) * K, Y + i * ldy + c, ldy, last);
  }
}

// dst[j ldd + i] = src[i lds + j] for an 8 x 8 tile, in registers.
__attribute__((target("avx2,fma"))) inline void transpose8x8_avx2(const float* src, ptrdiff_t lds, float* dst,
                                                                  ptrdiff_t ldd) {
  __m256 r[8];
  for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(src + i * lds);
  transpose8(r);
  for (int i = 0; i < 8; i++) _mm256_storeu_ps(dst + i * ldd, r[i]);
}
#endif

// dst[j ldd + i] = src[i lds + j] for i < rows, j < cols, 16 source rows at a time: each
// destination row then takes a whole 64-byte line per visit (half lines cost twice the misses
// where rows are 4 KiB apart). 8 x 8 tiles in registers where AVX2 is, single floats at the edges.
void transpose(const float* src, ptrdiff_t lds, int rows, int cols, float* dst, ptrdiff_t ldd) {
  constexpr int kRows = 16;
  for (int i0 = 0; i0 < rows; i0 += kRows) {
    const int i1 = std::min(rows, i0 + kRows);
    int j = 0;
#ifdef RETNET_X86
    if (cpu_has_avx2_fma() && i1 - i0 == kRows) {
      for (; j + 8 <= cols; j += 8) {
        transpose8x8_avx2(src + i0 * lds + j, lds, dst + j * ldd + i0, ldd);
        transpose8x8_avx2(src + (i0 + 8) * lds + j, lds, dst + j * ldd + i0 + 8, ldd);
      }
    }
#endif
    for (; j < cols; j++)
      for (int i = i0; i < i1; i++) dst[j * ldd + i] = src[i * lds + j];
  }
}

}  // namespace

// Both conversions are transposes within a panel (`transpose`): written a float at a time along
// the strided side, every write went to another line (rows 4 KiB apart share one L1 set), and
// medium's head took 239 ms to widen; blocked, 31-35 ms, and 13-15 ms to convert (harness).
void to_panels(const float* W, int N, int K, float* P) {
  for (int p = 0; p * kPanelWidth < N; p++) {
    const int width = panel_width(N, p);
    transpose(W + panel_offset(K, p), K, width, K, P + panel_offset(K, p), width);
  }
}

void from_panels(const float* P, int N, int K, int n0, int rows, int k0, int kc, float* out, ptrdiff_t ldo) {
  for (int r = 0; r < rows;) {
    const int n = n0 + r, p = n / kPanelWidth;
    const int width = panel_width(N, p);
    const int count = std::min(rows - r, (p + 1) * kPanelWidth - n);
    const float* first = P + panel_offset(K, p) + (n - p * kPanelWidth);
    transpose(first + static_cast<size_t>(k0) * width, width, kc, count, out + r * ldo, ldo);
    r += count;
  }
}

void panel_dots(const float* P, int N, int K, int M, int n0, int n1, const float* X, float* Y, ptrdiff_t ldy) {
  const int p = n0 / kPanelWidth;
  const int stride = panel_width(N, p);
  const float* first = P + panel_offset(K, p) + (n0 - p * kPanelWidth);
  float* out = Y + n0;
#ifdef RETNET_X86
  if (cpu_isa() >= CpuIsa::Avx512) return panel_dots_avx512(first, stride, n1 - n0, K, X, M, out, ldy);
  if (cpu_has_avx2_fma()) return panel_dots_avx2(first, stride, n1 - n0, K, X, M, out, ldy);
#endif
  panel_dots_generic(first, stride, n1 - n0, K, X, M, out, ldy);
}

void panel_dots_pair(const PanelSlice& a, const PanelSlice& b, int K, const float* x) {
#ifdef RETNET_X86
  auto whole = [](const PanelSlice& s) { return s.n0 % kPanelWidth == 0 && s.n1 - s.n0 == kPanelWidth; };
  if (whole(a) && whole(b)) {
    const float* pa = a.P + panel_offset(K, a.n0 / kPanelWidth);
    const float* pb = b.P + panel_offset(K, b.n0 / kPanelWidth);
    if (cpu_isa() >= CpuIsa::Avx512) return panel_pair_avx512(pa, pb, K, x, a.Y + a.n0, b.Y + b.n0);
    if (cpu_has_avx2_fma()) return panel_pair_avx2(pa, pb, K, x, a.Y + a.n0, b.Y + b.n0);
  }
#endif
  panel_dots(a.P, a.N, K, 1, a.n0, a.n1, x, a.Y, a.N);
  panel_dots(b.P, b.N, K, 1, b.n0, b.n1, x, b.Y, b.N);
}

}  // namespace retnet
