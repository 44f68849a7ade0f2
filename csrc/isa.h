// Vector operations per instruction set, and the three compilations of a loop body written over them.
//
// A kernel file defines TGI_ISA_BODY (a file name) and includes this header inside its own namespace:
// the body is compiled in avx512:: (under `#pragma GCC target`), avx2:: and scalar::, each with its V
// (V::R a vector of V::W floats). The caller picks one at run time (resolve_isa): one .so runs on any
// x86-64 CPU, never -march. No include guard: included once per kernel file.

#include <immintrin.h>

#include <algorithm>
#include <cmath>

// exp(x) for x <= 0 (scores minus their max): 2^n * 2^f with f in [-0.5, 0.5], 2^f by its Taylor series
// to f^7 (relative error < 1e-7, below float32's rounding). Below -87 (exp < 1.6e-38) it returns ~0.
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kExp2[8] = {1.f, 0.6931471805599453f, 0.2402265069591007f, 0.05550410866482158f,
                            0.009618129107628477f, 0.0013333558146428443f, 0.00015403530393381606f,
                            1.525273380405984e-05f};

#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
namespace avx512 {
struct V {
  using R = __m512;
  static constexpr int W = 16;
  static R zero() { return _mm512_setzero_ps(); }
  static R set1(float v) { return _mm512_set1_ps(v); }
  static R load(const float* p) { return _mm512_loadu_ps(p); }
  static R load(const at::BFloat16* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static void store(float* p, R v) { _mm512_storeu_ps(p, v); }
  static R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  static R add(R a, R b) { return _mm512_add_ps(a, b); }
  static R sub(R a, R b) { return _mm512_sub_ps(a, b); }
  static R max(R a, R b) { return _mm512_max_ps(a, b); }
  static bool any_nan(R v) { return _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) != 0; }
  // The sum of v's lanes by a fixed tree: lanes i + i+8, then j + j+4, then k + k+2, then 0 + 1 (GCC's
  // _mm512_reduce_add_ps, spelled out so that sum16 gives the same bits under any compiler).
  static float sum(R v) {
    const __m256 t3 = _mm256_add_ps(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)), _mm512_castps512_ps256(v));
    const __m128 t6 = _mm_add_ps(_mm256_extractf128_ps(t3, 1), _mm256_castps256_ps128(t3));
    const __m128 t8 = _mm_add_ps(t6, _mm_shuffle_ps(t6, t6, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm_cvtss_f32(_mm_add_ss(t8, _mm_shuffle_ps(t8, t8, _MM_SHUFFLE(1, 1, 1, 1))));
  }
  // out[i] = sum(v[i]) for 16 vectors, the same tree on all 16 at once (a transpose as it adds): a
  // sixteenth of the shuffles of 16 sums.
  static void sum16(const R* v, float* out) {
    R a[8], b[4], c[2];
    for (int i = 0; i < 8; i++) {  // in the order that leaves lane L holding the sum of v[L] at the end
      const R x = v[4 * ((2 * i) % 4) + (2 * i) / 4], y = v[4 * ((2 * i + 1) % 4) + (2 * i + 1) / 4];
      a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0xEE), _mm512_shuffle_f32x4(x, y, 0x44));  // i + i+8
    }
    for (int i = 0; i < 4; i++)  // j + j+4
      b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xDD),
                           _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x88));
    for (int i = 0; i < 2; i++)  // k + k+2
      c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                           _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    _mm512_storeu_ps(out, _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                        _mm512_shuffle_ps(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1))));
  }
  static float top(R v) { return _mm512_reduce_max_ps(v); }
  static R exp(R x) {
    const R t = _mm512_mul_ps(_mm512_max_ps(x, set1(-87.f)), set1(kLog2e));
    const R n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const R f = _mm512_sub_ps(t, n);
    R p = set1(kExp2[7]);
    for (int i = 6; i >= 0; i--) p = fma(p, f, set1(kExp2[i]));
    return _mm512_scalef_ps(p, n);
  }
};
#include TGI_ISA_BODY
}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
struct V {
  using R = __m256;
  static constexpr int W = 8;
  static R zero() { return _mm256_setzero_ps(); }
  static R set1(float v) { return _mm256_set1_ps(v); }
  static R load(const float* p) { return _mm256_loadu_ps(p); }
  static R load(const at::BFloat16* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static void store(float* p, R v) { _mm256_storeu_ps(p, v); }
  static R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  static R add(R a, R b) { return _mm256_add_ps(a, b); }
  static R sub(R a, R b) { return _mm256_sub_ps(a, b); }
  static R max(R a, R b) { return _mm256_max_ps(a, b); }
  static bool any_nan(R v) { return _mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)) != 0; }
  static float top(R v) {
    float lane[W];
    _mm256_storeu_ps(lane, v);
    float t = lane[0];
    for (int l = 1; l < W; l++) t = std::max(t, lane[l]);
    return t;
  }
  static void sum16(const R* v, float* out) {
    for (int i = 0; i < 16; i++) out[i] = sum(v[i]);
  }
  static float sum(R v) {
    const __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
  }
  static R exp(R x) {
    const R t = _mm256_mul_ps(_mm256_max_ps(x, set1(-87.f)), set1(kLog2e));
    const R n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const R f = _mm256_sub_ps(t, n);
    R p = set1(kExp2[7]);
    for (int i = 6; i >= 0; i--) p = fma(p, f, set1(kExp2[i]));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  }
};
#include TGI_ISA_BODY
}  // namespace avx2
#pragma GCC pop_options

namespace scalar {
struct V {  // one lane: any length
  using R = float;
  static constexpr int W = 1;
  static R zero() { return 0.f; }
  static R set1(float v) { return v; }
  static R load(const float* p) { return *p; }
  static R load(const at::BFloat16* p) { return static_cast<float>(*p); }
  static void store(float* p, R v) { *p = v; }
  static R fma(R a, R b, R c) { return a * b + c; }
  static R mul(R a, R b) { return a * b; }
  static R add(R a, R b) { return a + b; }
  static R sub(R a, R b) { return a - b; }
  static R max(R a, R b) { return std::max(a, b); }
  static bool any_nan(R v) { return std::isnan(v); }
  static float sum(R v) { return v; }
  static void sum16(const R* v, float* out) {
    for (int i = 0; i < 16; i++) out[i] = v[i];
  }
  static float top(R v) { return v; }
  static R exp(R x) { return std::exp(x); }
};
#include TGI_ISA_BODY
}  // namespace scalar

