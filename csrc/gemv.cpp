// Dense matmuls on the CPU: y = x W^T + bias, W [N, K] float32 or bfloat16 as stored, any number of
// rows of x.
//
// Why our own: a decode step is bound by reading the weights once, and MKL's float32 path for one row
// of x read a 113 MB matrix (SmolLM2's LM head) at ~11 GB/s where the machine streams ~24 GB/s (AMD
// EPYC, 2 cores; `scripts/qbench`-style figures in docs/benchmarks.md). Here each weight row is read
// once for every row of x, the products stay in registers, and rows ahead are prefetched.
//
// Batch invariance: every element of y is one dot product reduced in the same order whatever the
// number of rows of x and wherever its row sits in x (tiles only change which registers hold it), so a
// token's output does not depend on the step it is in. The code path depends only on the dtypes, K and
// the CPU: float32 FMAs (bfloat16 weights widened in registers, x taken as float32), or with bfloat16 x
// and W on a CPU with AVX512-BF16, pairs of bfloat16 products summed into float32 (vdpbf16ps: twice the
// products per instruction, x read as stored).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>

#include "native.h"

namespace tgi {
namespace {

struct Gemv {
  const void* x;  // [m, k] contiguous: float32, or bfloat16 on the dot-product path
  const void* w;  // [n, k] contiguous
  const float* bias;  // [n] or null
  float* y;  // [m, n] float32 out, or
  at::BFloat16* y_bf16;  // [m, n] bfloat16 out: rounded as torch rounds (to nearest even)
  int64_t m, n, k;

  void put(int64_t i, float v) const {
    if (y_bf16) y_bf16[i] = at::BFloat16(v);
    else y[i] = v;
  }
};

constexpr int64_t kAhead = 8;  // rows prefetched ahead of a tile
constexpr int64_t kRowBlock = 128;  // rows of x per pass over a task's weights: they stay in L2
// Up to this many rows of x the bfloat16 dot-product path reads one weight row at a time: a single
// sequential stream per thread read SmolLM2's 212 MB of layer weights at 23-28 GB/s where tiles of 4
// interleaved rows got 14-17 (AMD Zen 4; a plain reduction reads ~30). Above it, 4 rows per tile
// share each load of x (the loads, not the memory, bound many rows). Either way each output is one
// dot product summed in the same order: the same bits.
constexpr int64_t kStreamRows = 4;
// The same on the float32 FMA path, up to 2 rows of x (float32 weights, SmolLM2's layers: 1 row of x
// 23-24 -> 25-29 GB/s, 2 rows 20-22 -> 23-26; at 4 rows the loads of x bound it and tiles win).
constexpr int64_t kStreamRowsFma = 2;

#define TGI_ISA_BODY "gemv_isa.inc"
#include "isa.h"

// Tile sizes per ISA: R * MB accumulators + R weight vectors + x within the 32 (AVX-512) or 16 (AVX2)
// vector registers.
template <class TW>
void run_rows(int64_t isa, const Gemv& j, int64_t n0, int64_t n1) {
  if (isa == kAvx512 && j.k % 16 == 0) {
    if (j.m <= kStreamRowsFma) avx512::rows<TW, 1, 4>(j, n0, n1);
    else avx512::rows<TW, 4, 4>(j, n0, n1);
  } else if (isa >= kAvx2 && j.k % 8 == 0) avx2::rows<TW, 4, 2>(j, n0, n1);
  else scalar::rows<TW, 4, 2>(j, n0, n1);
}

// ---- bfloat16 x and W with AVX512-BF16: 32 products per vdpbf16ps, summed in float32 pairs ----------

#define TGI_BF16 __attribute__((target("avx512f,avx512bf16,avx512bw,avx512vl,avx2,fma")))

bool cpu_has_dpbf16() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
}

template <int R, int MB>
TGI_BF16 void tile_dp(const Gemv& j, int64_t n, int64_t m) {
  const uint16_t* w = static_cast<const uint16_t*>(j.w) + n * j.k;
  const uint16_t* x = static_cast<const uint16_t*>(j.x) + m * j.k;
  const int64_t ahead = std::min<int64_t>(kAhead, j.n - n - R) * j.k;
  __m512 acc[MB][R];
  for (int a = 0; a < MB; a++)
    for (int r = 0; r < R; r++) acc[a][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < j.k; k += 32) {
    if (ahead > 0)
      for (int r = 0; r < R; r++) _mm_prefetch(reinterpret_cast<const char*>(w + r * j.k + ahead + k), _MM_HINT_T1);
    __m512bh wr[R];
    for (int r = 0; r < R; r++) wr[r] = (__m512bh)_mm512_loadu_si512(w + r * j.k + k);
    for (int a = 0; a < MB; a++) {
      const __m512bh xa = (__m512bh)_mm512_loadu_si512(x + a * j.k + k);
      for (int r = 0; r < R; r++) acc[a][r] = _mm512_dpbf16_ps(acc[a][r], xa, wr[r]);
    }
  }
  float sums[MB * R];  // avx512::V::sum's tree (GCC's _mm512_reduce_add_ps), 16 at once where it can
  if constexpr (MB * R == 16) avx512::V::sum16(&acc[0][0], sums);
  else
    for (int i = 0; i < MB * R; i++) sums[i] = avx512::V::sum(acc[i / R][i % R]);
  for (int a = 0; a < MB; a++)
    for (int r = 0; r < R; r++) j.put((m + a) * j.n + n + r, sums[a * R + r] + (j.bias ? j.bias[n + r] : 0.f));
}

template <int R>
TGI_BF16 void tiles_dp(const Gemv& j, int64_t n, int64_t m0, int64_t m1) {
  int64_t m = m0;
  for (; m + 4 <= m1; m += 4) tile_dp<R, 4>(j, n, m);
  for (; m < m1; m++) tile_dp<R, 1>(j, n, m);
}

TGI_BF16 void rows_dp(const Gemv& j, int64_t n0, int64_t n1) {
  for (int64_t m0 = 0; m0 < j.m; m0 += kRowBlock) {
    const int64_t m1 = std::min(j.m, m0 + kRowBlock);
    int64_t n = n0;
    if (j.m > kStreamRows)
      for (; n + 4 <= n1; n += 4) tiles_dp<4>(j, n, m0, m1);
    for (; n < n1; n++) tiles_dp<1>(j, n, m0, m1);
  }
}

}  // namespace

at::Tensor gemv(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias, int64_t isa,
                bool float_out) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "x [M, K] and w [N, K]");
  TORCH_CHECK(w.is_contiguous() && (w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16),
              "w: contiguous float32 or bfloat16");
  isa = resolve_isa(isa);
  const bool bf16 = w.scalar_type() == at::kBFloat16;
  static const bool dpbf16 = cpu_has_dpbf16();
  const bool dot_pairs = bf16 && x.scalar_type() == at::kBFloat16 && isa == kAvx512 && dpbf16 && w.size(1) % 32 == 0;
  const at::Tensor xs = dot_pairs ? x.contiguous() : x.to(at::kFloat).contiguous();
  at::Tensor bf;
  Gemv j{};
  j.m = x.size(0), j.n = w.size(0), j.k = w.size(1);
  if (bias.has_value()) {
    bf = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(bf.numel() == j.n, "bias must be [N]");
    j.bias = bf.data_ptr<float>();
  }
  // bfloat16 out written as such: no float32 buffer and conversion per matmul (120 a decode step)
  const bool out_bf16 = x.scalar_type() == at::kBFloat16 && !float_out;
  at::Tensor y = at::empty({j.m, j.n}, x.options().dtype(out_bf16 ? at::kBFloat16 : at::kFloat));
  j.x = xs.data_ptr(), j.w = w.data_ptr();
  if (out_bf16) j.y_bf16 = y.data_ptr<at::BFloat16>();
  else j.y = y.data_ptr<float>();
  // tasks of 4-row tiles, each at least ~64 KB of weights
  const int64_t tiles = (j.n + 3) / 4, grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, j.k));
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    const int64_t n0 = t0 * 4, n1 = std::min(j.n, t1 * 4);
    if (dot_pairs) rows_dp(j, n0, n1);
    else if (bf16) run_rows<at::BFloat16>(isa, j, n0, n1);
    else run_rows<float>(isa, j, n0, n1);
  });
  return y.scalar_type() == x.scalar_type() || float_out ? y : y.to(x.scalar_type());
}

}  // namespace tgi
