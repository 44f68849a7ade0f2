// Quantized-weight matmuls for tgi_zmq.quant.kernels: y = x W^T (+ bias) with W in one of the two
// formats of tgi_zmq/quant/formats.py, read as stored (int8 codes; 4-bit codes in GGML's nibble order).
// int8 codes may carry offsets (w = q * scale + offset: GGUF's Q5_1, Q5_K) or a scale per 16 inputs
// (GGUF's Q6_K sub-blocks); every other group is a multiple of 32 inputs.
//
// Why our own: on AVX2-only CPUs torch's int8/int4 weight kernels are vectorised only for bf16
// activations (tens of times slower than float32), and small-M decode is bound by weight bytes, so
// streaming 1 or 0.5 byte per weight and dequantizing in registers beats a float32 matmul.
//
// Numerics: float32 throughout, the activations never quantized. Several rows of x: each weight is
// dequantized in registers as the reference does (int8: q * scale; int4: lut[q] * scale + offset, one
// FMA), then FMAs. One row of x (decode): per group, sum x * q (or x * lut[q]), then scale once and add
// offset * sum(x) (fewer operations per weight; not for scales per 16 inputs, dequantized first). Either way x @ W.dequantize().T within float rounding.
//
// One .so for every x86-64 CPU: the AVX-512 and AVX2 paths are compiled with function target
// attributes and chosen at run time (__builtin_cpu_supports), with a scalar fallback; never -march.
// Work is split over output rows with at::parallel_for (torch's pool: respects set_num_threads).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>

#include "native.h"

namespace tgi {
namespace {

#define TGI_AVX512 __attribute__((target("avx512f,avx2,fma")))
#define TGI_AVX2 __attribute__((target("avx2,fma")))

int64_t best_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma")) return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
  return kScalar;
}


// One matmul's operands as raw pointers. Weight row n starts at w + n * row_bytes; the kernels step 32
// inputs (one run of nibbles), reading the scales of each run's two halves (the same group unless the
// group is 16).
struct Job {
  const float* x;  // [m, k] float32
  int64_t m, k, n;
  const uint8_t* w;
  int64_t row_bytes;  // k (int8) or k / 2 (int4)
  const float* scales;  // [n, groups]
  const float* offsets;  // [n, groups] (int4; int8 when given, else null)
  const float* lut;  // [16] (int4 only)
  bool uniform;  // lut[q] == q
  bool rows_alike;  // every row of x by the same formula (batch invariance): no one-row shortcut
  int64_t groups, group;
  const float* bias;  // [n] or null
  float* y;  // [m, n] float32
};

// ---- weight decoding: 32 inputs at a time, per format and ISA ----------------------------------------

// kInt4: 4-bit codes and a table; kOffsets: w = q * scale + offset; kHalf: a scale per 16 inputs (int8).
struct I8 {
  static constexpr bool kInt4 = false, kOffsets = false, kHalf = false;
  static float scalar(const Job& j, const uint8_t* row, int64_t i, float s, float) {
    return static_cast<float>(static_cast<int8_t>(row[i])) * s;
  }
  // Inputs k..k+15 and k+16..k+31.
  TGI_AVX512 static inline void raw(const uint8_t* row, int64_t k, __m512, __m512& w0, __m512& w1) {
    const __m128i* p = reinterpret_cast<const __m128i*>(row + k);
    w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p)));
    w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p + 1)));
  }
  TGI_AVX512 static inline __m512 scale(__m512 v, __m512 s, __m512) { return _mm512_mul_ps(v, s); }
  // Half h of the run: inputs k+16h..k+16h+7 and k+16h+8..k+16h+15.
  static constexpr int kOff[2][2] = {{0, 8}, {16, 24}};
  TGI_AVX2 static inline void raw(const uint8_t* row, int64_t k, int h, __m256, __m256, __m256& w0, __m256& w1) {
    const uint8_t* p = row + k + 16 * h;
    w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
    w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8))));
  }
  TGI_AVX2 static inline __m256 scale(__m256 v, __m256 s, __m256) { return _mm256_mul_ps(v, s); }
};

struct I4 {
  static constexpr bool kInt4 = true, kOffsets = true, kHalf = false;
  // Input i of a row: byte (i / 32) * 16 + i % 16, low nibble for i % 32 < 16, else high (GGML's order).
  static float scalar(const Job& j, const uint8_t* row, int64_t i, float s, float o) {
    const uint8_t b = row[(i / 32) * 16 + i % 16];
    return j.lut[(i % 32 < 16) ? (b & 15) : (b >> 4)] * s + o;
  }
  // 16 bytes: low nibbles are inputs k..k+15, high ones k+16..k+31. The permute reads the low 4 bits
  // of each lane, so the low nibbles need no mask.
  TGI_AVX512 static inline void raw(const uint8_t* row, int64_t k, __m512 lut, __m512& w0, __m512& w1) {
    const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k / 2)));
    w0 = _mm512_permutexvar_ps(q, lut);
    w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), lut);
  }
  TGI_AVX512 static inline __m512 scale(__m512 v, __m512 s, __m512 o) { return _mm512_fmadd_ps(v, s, o); }
  // Half h: bytes 8h..8h+7, i.e. inputs k+8h..k+8h+7 (low nibbles) and k+16+8h..k+23+8h (high). AVX2
  // permutes 8 lanes: look up both table halves and blend on bit 3 of the code.
  static constexpr int kOff[2][2] = {{0, 16}, {8, 24}};
  TGI_AVX2 static inline __m256 lookup(__m256i q, __m256 lut_lo, __m256 lut_hi) {
    const __m256 bit3 = _mm256_castsi256_ps(_mm256_slli_epi32(q, 28));
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lut_lo, q), _mm256_permutevar8x32_ps(lut_hi, q), bit3);
  }
  TGI_AVX2 static inline __m256i codes(const uint8_t* row, int64_t k, int h, __m256i& hi) {
    const __m256i q = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k / 2 + 8 * h)));
    hi = _mm256_srli_epi32(q, 4);
    return _mm256_and_si256(q, _mm256_set1_epi32(15));
  }
  TGI_AVX2 static inline void raw(const uint8_t* row, int64_t k, int h, __m256 lut_lo, __m256 lut_hi, __m256& w0,
                                  __m256& w1) {
    __m256i hi;
    const __m256i lo = codes(row, k, h, hi);
    w0 = lookup(lo, lut_lo, lut_hi);
    w1 = lookup(hi, lut_lo, lut_hi);
  }
  TGI_AVX2 static inline __m256 scale(__m256 v, __m256 s, __m256 o) { return _mm256_fmadd_ps(v, s, o); }
};

// A uniform table (lut[q] == q: GGUF, GPTQ, AWQ): AVX2 converts the code instead of two permutes and a
// blend. AVX-512's one permute is as fast as the conversion.
struct I4U : I4 {
  using I4::raw;  // the AVX-512 one
  TGI_AVX2 static inline void raw(const uint8_t* row, int64_t k, int h, __m256, __m256, __m256& w0, __m256& w1) {
    __m256i hi;
    w0 = _mm256_cvtepi32_ps(codes(row, k, h, hi));
    w1 = _mm256_cvtepi32_ps(hi);
  }
};

// int8 codes with offsets (GGUF's Q5_1 and Q5_K: unsigned 5-bit codes, w = q * d + m).
struct I8O : I8 {
  static constexpr bool kOffsets = true;
  static float scalar(const Job&, const uint8_t* row, int64_t i, float s, float o) {
    return static_cast<float>(static_cast<int8_t>(row[i])) * s + o;
  }
  TGI_AVX512 static inline __m512 scale(__m512 v, __m512 s, __m512 o) { return _mm512_fmadd_ps(v, s, o); }
  TGI_AVX2 static inline __m256 scale(__m256 v, __m256 s, __m256 o) { return _mm256_fmadd_ps(v, s, o); }
};

// int8 codes with a scale per 16 inputs (GGUF's Q6_K sub-blocks): each half of a run of 32 has its own.
struct I8H : I8 {
  static constexpr bool kHalf = true;
};

// Inputs k..k+15 and k+16..k+31 dequantized: the first half scaled by s0, the second by s1.
template <class F>
TGI_AVX512 inline void decode(const uint8_t* row, int64_t k, __m512 lut, __m512 s0, __m512 s1, __m512 o,
                              __m512& w0, __m512& w1) {
  F::raw(row, k, lut, w0, w1);
  w0 = F::scale(w0, s0, o);
  w1 = F::scale(w1, s1, o);
}

// The inputs a tile reads between loads of scales (and offsets): a group, or a run of 32 when the group
// is 16 (its two scales are read at the run's start).
template <class F>
int64_t span(const Job& j) {
  return F::kHalf ? 32 : j.group;
}

// Prefetch the weights kPrefetchRows rows ahead (not past the last), every 32 bytes of a row: each
// line twice, as a prefetch dropped while the miss buffers are full gets a second chance (once a line
// measured up to 2x slower). The hardware's stream prefetch loses short rows: the LM head's 576 bytes
// ran 2-3x slower without this.
constexpr int kPrefetchRows = 8;

template <class F, int R>
inline void prefetch_ahead(const Job& j, int64_t n, int64_t k) {
  const int64_t offset = F::kInt4 ? k / 2 : k;
  if (F::kInt4 && offset % 32 != 0) return;
  for (int r = 0; r < R; r++) {
    const int64_t row = std::min(n + r + kPrefetchRows, j.n - 1);
    _mm_prefetch(reinterpret_cast<const char*>(j.w + row * j.row_bytes + offset), _MM_HINT_T0);
  }
}

// ---- tiles: R output rows x MB activation rows, the weights dequantized once per 32 inputs ---------------

template <class F, int R, int MB>
TGI_AVX512 void tile_avx512(const Job& j, int64_t n, int64_t m) {
  __m512 acc[MB][R];
  for (int a = 0; a < MB; a++)
    for (int r = 0; r < R; r++) acc[a][r] = _mm512_setzero_ps();
  const __m512 lut = F::kInt4 ? _mm512_loadu_ps(j.lut) : _mm512_setzero_ps();
  for (int64_t k0 = 0, step = span<F>(j); k0 < j.k; k0 += step) {
    __m512 s0[R], s1[R], o[R];
    for (int r = 0; r < R; r++) {
      const int64_t at = (n + r) * j.groups + k0 / j.group;
      s0[r] = _mm512_set1_ps(j.scales[at]);
      s1[r] = F::kHalf ? _mm512_set1_ps(j.scales[at + 1]) : s0[r];
      o[r] = F::kOffsets ? _mm512_set1_ps(j.offsets[at]) : _mm512_setzero_ps();
    }
    for (int64_t k = k0; k < k0 + step; k += 32) {
      prefetch_ahead<F, R>(j, n, k);
      __m512 w0[R], w1[R];
      for (int r = 0; r < R; r++) decode<F>(j.w + (n + r) * j.row_bytes, k, lut, s0[r], s1[r], o[r], w0[r], w1[r]);
      for (int a = 0; a < MB; a++) {
        const float* xa = j.x + (m + a) * j.k + k;
        const __m512 x0 = _mm512_loadu_ps(xa), x1 = _mm512_loadu_ps(xa + 16);
        for (int r = 0; r < R; r++) acc[a][r] = _mm512_fmadd_ps(x1, w1[r], _mm512_fmadd_ps(x0, w0[r], acc[a][r]));
      }
    }
  }
  for (int a = 0; a < MB; a++)
    for (int r = 0; r < R; r++)
      j.y[(m + a) * j.n + n + r] = _mm512_reduce_add_ps(acc[a][r]) + (j.bias ? j.bias[n + r] : 0.0f);
}

// One row of x: sum x * raw codes per group, then scale once per group (and add offset * sum x): fewer
// multiplies per weight than dequantizing first.
template <class F, int R>
TGI_AVX512 void tile_avx512_m1(const Job& j, int64_t n, int64_t m) {
  __m512 acc[R];
  for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
  const __m512 lut = F::kInt4 ? _mm512_loadu_ps(j.lut) : _mm512_setzero_ps();
  const float* xm = j.x + m * j.k;
  for (int64_t g = 0; g < j.groups; g++) {
    __m512 gacc[R], xs = _mm512_setzero_ps();
    for (int r = 0; r < R; r++) gacc[r] = _mm512_setzero_ps();
    for (int64_t k = g * j.group, end = k + j.group; k < end; k += 32) {
      prefetch_ahead<F, R>(j, n, k);
      __m512 w0[R], w1[R];
      for (int r = 0; r < R; r++) F::raw(j.w + (n + r) * j.row_bytes, k, lut, w0[r], w1[r]);
      const __m512 x0 = _mm512_loadu_ps(xm + k), x1 = _mm512_loadu_ps(xm + k + 16);
      if (F::kOffsets) xs = _mm512_add_ps(xs, _mm512_add_ps(x0, x1));
      for (int r = 0; r < R; r++) gacc[r] = _mm512_fmadd_ps(x1, w1[r], _mm512_fmadd_ps(x0, w0[r], gacc[r]));
    }
    for (int r = 0; r < R; r++) {
      acc[r] = _mm512_fmadd_ps(gacc[r], _mm512_set1_ps(j.scales[(n + r) * j.groups + g]), acc[r]);
      if (F::kOffsets) acc[r] = _mm512_fmadd_ps(xs, _mm512_set1_ps(j.offsets[(n + r) * j.groups + g]), acc[r]);
    }
  }
  for (int r = 0; r < R; r++)
    j.y[m * j.n + n + r] = _mm512_reduce_add_ps(acc[r]) + (j.bias ? j.bias[n + r] : 0.0f);
}

TGI_AVX2 inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

template <class F, int R>
TGI_AVX2 void tile_avx2_m1(const Job& j, int64_t n, int64_t m) {
  __m256 acc[R];
  for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
  const __m256 lut_lo = F::kInt4 ? _mm256_loadu_ps(j.lut) : _mm256_setzero_ps();
  const __m256 lut_hi = F::kInt4 ? _mm256_loadu_ps(j.lut + 8) : _mm256_setzero_ps();
  const float* xm = j.x + m * j.k;
  for (int64_t g = 0; g < j.groups; g++) {
    __m256 gacc[R], xs = _mm256_setzero_ps();
    for (int r = 0; r < R; r++) gacc[r] = _mm256_setzero_ps();
    for (int64_t k = g * j.group, end = k + j.group; k < end; k += 32) {
      prefetch_ahead<F, R>(j, n, k);
      for (int h = 0; h < 2; h++) {
        const __m256 x0 = _mm256_loadu_ps(xm + k + F::kOff[h][0]), x1 = _mm256_loadu_ps(xm + k + F::kOff[h][1]);
        if (F::kOffsets) xs = _mm256_add_ps(xs, _mm256_add_ps(x0, x1));
        for (int r = 0; r < R; r++) {
          __m256 w0, w1;
          F::raw(j.w + (n + r) * j.row_bytes, k, h, lut_lo, lut_hi, w0, w1);
          gacc[r] = _mm256_fmadd_ps(x1, w1, _mm256_fmadd_ps(x0, w0, gacc[r]));
        }
      }
    }
    for (int r = 0; r < R; r++) {
      acc[r] = _mm256_fmadd_ps(gacc[r], _mm256_set1_ps(j.scales[(n + r) * j.groups + g]), acc[r]);
      if (F::kOffsets) acc[r] = _mm256_fmadd_ps(xs, _mm256_set1_ps(j.offsets[(n + r) * j.groups + g]), acc[r]);
    }
  }
  for (int r = 0; r < R; r++) j.y[m * j.n + n + r] = hsum256(acc[r]) + (j.bias ? j.bias[n + r] : 0.0f);
}

template <class F, int R, int MB>
TGI_AVX2 void tile_avx2(const Job& j, int64_t n, int64_t m) {
  __m256 acc[MB][R];
  for (int a = 0; a < MB; a++)
    for (int r = 0; r < R; r++) acc[a][r] = _mm256_setzero_ps();
  const __m256 lut_lo = F::kInt4 ? _mm256_loadu_ps(j.lut) : _mm256_setzero_ps();
  const __m256 lut_hi = F::kInt4 ? _mm256_loadu_ps(j.lut + 8) : _mm256_setzero_ps();
  for (int64_t k0 = 0, step = span<F>(j); k0 < j.k; k0 += step) {
    __m256 s[2][R], o[R];  // the scales of each half of a run (alike unless the group is 16)
    for (int r = 0; r < R; r++) {
      const int64_t at = (n + r) * j.groups + k0 / j.group;
      s[0][r] = _mm256_set1_ps(j.scales[at]);
      s[1][r] = F::kHalf ? _mm256_set1_ps(j.scales[at + 1]) : s[0][r];
      o[r] = F::kOffsets ? _mm256_set1_ps(j.offsets[at]) : _mm256_setzero_ps();
    }
    for (int64_t k = k0; k < k0 + step; k += 32) {
      prefetch_ahead<F, R>(j, n, k);
      for (int h = 0; h < 2; h++) {
        __m256 w0[R], w1[R];
        for (int r = 0; r < R; r++) {
          F::raw(j.w + (n + r) * j.row_bytes, k, h, lut_lo, lut_hi, w0[r], w1[r]);
          w0[r] = F::scale(w0[r], s[h][r], o[r]);
          w1[r] = F::scale(w1[r], s[h][r], o[r]);
        }
        for (int a = 0; a < MB; a++) {
          const float* xa = j.x + (m + a) * j.k + k;
          const __m256 x0 = _mm256_loadu_ps(xa + F::kOff[h][0]), x1 = _mm256_loadu_ps(xa + F::kOff[h][1]);
          for (int r = 0; r < R; r++)
            acc[a][r] = _mm256_fmadd_ps(x1, w1[r], _mm256_fmadd_ps(x0, w0[r], acc[a][r]));
        }
      }
    }
  }
  for (int a = 0; a < MB; a++)
    for (int r = 0; r < R; r++) j.y[(m + a) * j.n + n + r] = hsum256(acc[a][r]) + (j.bias ? j.bias[n + r] : 0.0f);
}

template <class F, int R, int MB>
void tile_scalar(const Job& j, int64_t n, int64_t m) {
  for (int r = 0; r < R; r++) {
    const uint8_t* row = j.w + (n + r) * j.row_bytes;
    for (int a = 0; a < MB; a++) {
      const float* xa = j.x + (m + a) * j.k;
      float acc = 0.0f;
      for (int64_t i = 0; i < j.k; i++) {
        const int64_t g = (n + r) * j.groups + i / j.group;
        acc += xa[i] * F::scalar(j, row, i, j.scales[g], F::kOffsets ? j.offsets[g] : 0.0f);
      }
      j.y[(m + a) * j.n + n + r] = acc + (j.bias ? j.bias[n + r] : 0.0f);
    }
  }
}

// ---- drivers: rows [n0, n1) in tiles of R (then single rows), all of x in blocks of MB ----------------

template <class F, int R, int MB>
void tile(int64_t isa, const Job& j, int64_t n, int64_t m) {
  constexpr bool m1 = MB == 1 && !F::kHalf;  // the one-row shortcut scales once per group
  if (isa == kAvx512 && m1 && !j.rows_alike) return tile_avx512_m1<F, R>(j, n, m);
  if (isa == kAvx512) return tile_avx512<F, R, MB>(j, n, m);
  if (isa == kAvx2 && m1 && !j.rows_alike) return tile_avx2_m1<F, R>(j, n, m);
  if (isa == kAvx2) return tile_avx2<F, R, MB>(j, n, m);
  tile_scalar<F, R, MB>(j, n, m);
}

template <class F, int R, int MB>
void rows_of(int64_t isa, const Job& j, int64_t n) {
  int64_t m = 0;
  for (; m + MB <= j.m; m += MB) tile<F, R, MB>(isa, j, n, m);
  const int64_t left = j.m - m;
  if constexpr (MB > 3) if (left == 3) return tile<F, R, 3>(isa, j, n, m);
  if constexpr (MB > 2) if (left == 2) return tile<F, R, 2>(isa, j, n, m);
  if constexpr (MB > 1) if (left == 1) return tile<F, R, 1>(isa, j, n, m);
}

// Tile sizes per ISA: accumulators (R * MB), decoded weights (2R) and x fit the 32 (AVX-512) or 16
// (AVX2) vector registers.
// For one row of x and int8 weights, AVX-512 reads one weight row at a time (as gemv.cpp: one sequential
// stream per thread read weights from memory ~1.7x faster than 4 interleaved rows; decode step 11.5 ->
// 7.8 ms). Not for 4-bit codes or more rows of x, where decoding and the loads of x bound the tiles
// and 4 rows share them (one row at a time was 10-30% slower). Each output is summed in the same order
// either way.
template <class F>
bool stream_rows(const Job& j) {
  return j.m == 1 && !F::kInt4;
}

template <class F>
void rows(int64_t isa, const Job& j, int64_t n0, int64_t n1) {
  constexpr int R = 4;
  int64_t n = n0;
  if (isa == kAvx512) {
    if (!stream_rows<F>(j))
      for (; n + R <= n1; n += R) rows_of<F, R, 4>(isa, j, n);
    for (; n < n1; n++) rows_of<F, 1, 4>(isa, j, n);
  } else {
    for (; n + R <= n1; n += R) rows_of<F, R, 2>(isa, j, n);
    for (; n < n1; n++) rows_of<F, 1, 2>(isa, j, n);
  }
}

// ---- dequantize (for large M: a dense matmul over the dequantized weights wins) ---------------------

inline uint16_t bf16_scalar(float v) {
  uint32_t b;
  std::memcpy(&b, &v, 4);
  return static_cast<uint16_t>((b + 0x7fff + ((b >> 16) & 1)) >> 16);  // round to nearest even, as torch
}

TGI_AVX512 inline void store512(float* dst, __m512 v) { _mm512_storeu_ps(dst, v); }
TGI_AVX512 inline void store512(uint16_t* dst, __m512 v) {
  const __m512i b = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  const __m512i round = _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd);
  _mm256_storeu_si256((__m256i*)dst, _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_add_epi32(b, round), 16)));
}
TGI_AVX2 inline void store256(float* dst, __m256 v) { _mm256_storeu_ps(dst, v); }
TGI_AVX2 inline void store256(uint16_t* dst, __m256 v) {
  const __m256i b = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  const __m256i round = _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd);
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(b, round), 16);
  _mm_storeu_si128((__m128i*)dst, _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
}

template <class F, class T>
TGI_AVX512 void dequant_avx512(const Job& j, int64_t n, T* out) {
  const __m512 lut = F::kInt4 ? _mm512_loadu_ps(j.lut) : _mm512_setzero_ps();
  const uint8_t* row = j.w + n * j.row_bytes;
  for (int64_t k0 = 0, step = span<F>(j); k0 < j.k; k0 += step) {
    const int64_t at = n * j.groups + k0 / j.group;
    const __m512 s0 = _mm512_set1_ps(j.scales[at]), s1 = F::kHalf ? _mm512_set1_ps(j.scales[at + 1]) : s0;
    const __m512 o = F::kOffsets ? _mm512_set1_ps(j.offsets[at]) : _mm512_setzero_ps();
    for (int64_t k = k0; k < k0 + step; k += 32) {
      __m512 w0, w1;
      decode<F>(row, k, lut, s0, s1, o, w0, w1);
      store512(out + k, w0);
      store512(out + k + 16, w1);
    }
  }
}

template <class F, class T>
TGI_AVX2 void dequant_avx2(const Job& j, int64_t n, T* out) {
  const __m256 lut_lo = F::kInt4 ? _mm256_loadu_ps(j.lut) : _mm256_setzero_ps();
  const __m256 lut_hi = F::kInt4 ? _mm256_loadu_ps(j.lut + 8) : _mm256_setzero_ps();
  const uint8_t* row = j.w + n * j.row_bytes;
  for (int64_t k0 = 0, step = span<F>(j); k0 < j.k; k0 += step) {
    const int64_t at = n * j.groups + k0 / j.group;
    const __m256 s0 = _mm256_set1_ps(j.scales[at]);
    const __m256 s[2] = {s0, F::kHalf ? _mm256_set1_ps(j.scales[at + 1]) : s0};
    const __m256 o = F::kOffsets ? _mm256_set1_ps(j.offsets[at]) : _mm256_setzero_ps();
    for (int64_t k = k0; k < k0 + step; k += 32) {
      for (int h = 0; h < 2; h++) {
        __m256 w0, w1;
        F::raw(row, k, h, lut_lo, lut_hi, w0, w1);
        store256(out + k + F::kOff[h][0], F::scale(w0, s[h], o));
        store256(out + k + F::kOff[h][1], F::scale(w1, s[h], o));
      }
    }
  }
}

template <class F, class T>
void dequant_scalar(const Job& j, int64_t n, T* out) {
  const uint8_t* row = j.w + n * j.row_bytes;
  for (int64_t i = 0; i < j.k; i++) {
    const int64_t g = n * j.groups + i / j.group;
    const float v = F::scalar(j, row, i, j.scales[g], F::kOffsets ? j.offsets[g] : 0.0f);
    if constexpr (std::is_same_v<T, float>) out[i] = v;
    else out[i] = bf16_scalar(v);
  }
}

template <class F, class T>
void dequant_rows(int64_t isa, const Job& j, int64_t n0, int64_t n1, T* out) {
  for (int64_t n = n0; n < n1; n++) {
    if (isa == kAvx512) dequant_avx512<F, T>(j, n, out + n * j.k);
    else if (isa == kAvx2) dequant_avx2<F, T>(j, n, out + n * j.k);
    else dequant_scalar<F, T>(j, n, out + n * j.k);
  }
}

// ---- the Python entry points ----------------------------------------------------------------------------

Job make_job(const at::Tensor& w, const at::Tensor& scales, const std::optional<at::Tensor>& offsets,
             const std::optional<at::Tensor>& lut, int64_t group) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.element_size() == 1,
              "weight codes: contiguous [N, K] bytes");
  const bool int4 = lut.has_value();
  const int64_t n = w.size(0), k = int4 ? w.size(1) * 2 : w.size(1);
  const bool half = group == 16 && !int4 && !offsets.has_value();
  TORCH_CHECK((group % 32 == 0 || half) && k % group == 0 && k % 32 == 0,
              "group must divide K and be a multiple of 32 (or 16: int8 codes without offsets)");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == n * (k / group),
              "scales: contiguous float32 [N, K / group]");
  Job j{};
  j.n = n;
  j.k = k;
  j.w = static_cast<const uint8_t*>(w.data_ptr());
  j.row_bytes = w.size(1);
  j.scales = scales.data_ptr<float>();
  j.groups = k / group;
  j.group = group;
  TORCH_CHECK(offsets.has_value() || !int4, "4-bit codes need offsets");
  if (offsets.has_value()) {
    TORCH_CHECK(offsets->scalar_type() == at::kFloat && offsets->is_contiguous() && offsets->numel() == scales.numel(),
                "offsets: contiguous float32 like scales");
    j.offsets = offsets->data_ptr<float>();
  }
  if (int4) {
    TORCH_CHECK(lut->scalar_type() == at::kFloat && lut->is_contiguous() && lut->numel() == 16,
                "lut: float32 [16]");
    j.lut = lut->data_ptr<float>();
    j.uniform = true;
    for (int q = 0; q < 16; q++) j.uniform = j.uniform && j.lut[q] == static_cast<float>(q);
  }
  return j;
}

// Calls fn with a value of the format struct of j's weights (its members are static).
template <class Fn>
void with_format(const Job& j, Fn&& fn) {
  if (j.lut && j.uniform) fn(I4U{});
  else if (j.lut) fn(I4{});
  else if (j.offsets) fn(I8O{});
  else if (j.group == 16) fn(I8H{});
  else fn(I8{});
}

// Rows per parallel task: enough work (~64K weights x rows of x) to be worth a thread.
int64_t grain_rows(int64_t k, int64_t m) {
  return std::max<int64_t>(4, (int64_t{1} << 16) / std::max<int64_t>(1, k * m));
}

}  // namespace

// A request clamped to what the CPU has (kAuto: the best).
int64_t resolve_isa(int64_t want) {
  const int64_t best = best_isa();
  return (want == kAuto || want > best) ? best : want;
}

// y = x W^T + bias in x's dtype (float32 or bfloat16; converted to float32 once per call).
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                  const std::optional<at::Tensor>& offsets, const std::optional<at::Tensor>& lut, int64_t group,
                  const std::optional<at::Tensor>& bias, int64_t isa, bool rows_alike, bool float_out) {
  Job j = make_job(w, scales, offsets, lut, group);
  j.rows_alike = rows_alike;
  TORCH_CHECK(x.dim() == 2 && x.size(1) == j.k, "x must be [M, K]");
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor bf;
  if (bias.has_value()) {
    bf = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(bf.numel() == j.n, "bias must be [N]");
    j.bias = bf.data_ptr<float>();
  }
  at::Tensor y = at::empty({x.size(0), j.n}, x.options().dtype(at::kFloat));
  j.x = xf.data_ptr<float>();
  j.m = x.size(0);
  j.y = y.data_ptr<float>();
  isa = resolve_isa(isa);
  const int64_t blocks = (j.n + 3) / 4;  // tiles of 4 rows never straddle two tasks
  at::parallel_for(0, blocks, std::max<int64_t>(1, grain_rows(j.k, j.m) / 4), [&](int64_t b0, int64_t b1) {
    const int64_t n0 = b0 * 4, n1 = std::min(j.n, b1 * 4);
    with_format(j, [&](auto format) { rows<decltype(format)>(isa, j, n0, n1); });
  });
  return x.scalar_type() == at::kFloat || float_out ? y : y.to(x.scalar_type());
}

// Writes the dequantized weights into out ([N, K] contiguous, float32 or bfloat16).
void dequantize(const at::Tensor& w, const at::Tensor& scales, const std::optional<at::Tensor>& offsets,
                const std::optional<at::Tensor>& lut, int64_t group, at::Tensor& out, int64_t isa) {
  const Job j = make_job(w, scales, offsets, lut, group);
  TORCH_CHECK(out.is_contiguous() && out.size(0) == j.n && out.size(1) == j.k, "out must be contiguous [N, K]");
  TORCH_CHECK(out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16, "out: float32 or bfloat16");
  isa = resolve_isa(isa);
  const bool f32 = out.scalar_type() == at::kFloat;
  void* dst = out.data_ptr();
  at::parallel_for(0, j.n, grain_rows(j.k, 1), [&](int64_t n0, int64_t n1) {
    with_format(j, [&](auto format) {
      using F = decltype(format);
      if (f32) dequant_rows<F>(isa, j, n0, n1, static_cast<float*>(dst));
      else dequant_rows<F>(isa, j, n0, n1, static_cast<uint16_t*>(dst));
    });
  });
}

std::string isa_name(int64_t isa) {
  switch (resolve_isa(isa)) {
    case kAvx512: return "avx512";
    case kAvx2: return "avx2";
    default: return "scalar";
  }
}

}  // namespace tgi
