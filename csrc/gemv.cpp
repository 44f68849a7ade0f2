// Dense matmuls with few rows of x (decode): y = x W^T + bias, W [N, K] float32 or bfloat16 as stored.
//
// Why our own: a decode step is bound by reading the weights once, and MKL's float32 path for one row
// of x read a 113 MB matrix (SmolLM2's LM head) at ~11 GB/s where the machine streams ~24 GB/s (AMD
// EPYC, 2 cores; `scripts/qbench`-style figures in docs/benchmarks.md). Here each weight row is read
// once for every row of x, the products stay in registers, and rows ahead are prefetched.
// Float32 arithmetic (bfloat16 weights widened in registers); x is taken as float32.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>

#include "native.h"

namespace tgi {
namespace {

struct Gemv {
  const float* x;  // [m, k] contiguous
  const void* w;  // [n, k] contiguous
  const float* bias;  // [n] or null
  float* y;  // [m, n]
  int64_t m, n, k;
};

constexpr int64_t kAhead = 8;  // rows prefetched ahead of a tile

#define TGI_ISA_BODY "gemv_isa.inc"
#include "isa.h"

// Tile sizes per ISA: R * MB accumulators + R weight vectors + x within the 32 (AVX-512) or 16 (AVX2)
// vector registers.
template <class TW>
void run_rows(int64_t isa, const Gemv& j, int64_t n0, int64_t n1) {
  if (isa == kAvx512 && j.k % 16 == 0) avx512::rows<TW, 4, 4>(j, n0, n1);
  else if (isa >= kAvx2 && j.k % 8 == 0) avx2::rows<TW, 4, 2>(j, n0, n1);
  else scalar::rows<TW, 4, 2>(j, n0, n1);
}

}  // namespace

at::Tensor gemv(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias, int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "x [M, K] and w [N, K]");
  TORCH_CHECK(w.is_contiguous() && (w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16),
              "w: contiguous float32 or bfloat16");
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor bf;
  Gemv j{};
  j.m = x.size(0), j.n = w.size(0), j.k = w.size(1);
  if (bias.has_value()) {
    bf = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(bf.numel() == j.n, "bias must be [N]");
    j.bias = bf.data_ptr<float>();
  }
  at::Tensor y = at::empty({j.m, j.n}, x.options().dtype(at::kFloat));
  j.x = xf.data_ptr<float>(), j.w = w.data_ptr(), j.y = y.data_ptr<float>();
  isa = resolve_isa(isa);
  const bool bf16 = w.scalar_type() == at::kBFloat16;
  // tasks of 4-row tiles, each at least ~64 KB of weights
  const int64_t tiles = (j.n + 3) / 4, grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, j.k));
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    const int64_t n0 = t0 * 4, n1 = std::min(j.n, t1 * 4);
    if (bf16) run_rows<at::BFloat16>(isa, j, n0, n1);
    else run_rows<float>(isa, j, n0, n1);
  });
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

}  // namespace tgi
