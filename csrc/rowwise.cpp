// Row-wise work between the matmuls of a layer (tgi_zmq.layers): RMSNorm, SiLU(gate) * up, and rotary
// position embeddings (Llama's rotate-half form) applied in place to q and k.
//
// Why our own: torch's CPU kernels for these pick vectorized or scalar code by where an element falls in
// the whole tensor and how it is split over threads (silu's exp differs by an ulp between the two), so a
// token's values could depend on how many tokens the step has. Here each row is computed alone by the
// same code, whatever the rows around it (batch invariance), and each is one pass instead of torch's
// 4-6 ops with their temporaries. Float32 arithmetic, rounded to x's dtype where transformers rounds.
//
// One source for every x86-64 CPU: the loops (rowwise_isa.inc) are compiled over AVX-512, AVX2 and
// one-lane vectors (isa.h), the best chosen at run time.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>

#include "native.h"

namespace tgi {
namespace {

inline float to_float(float v) { return v; }
inline float to_float(at::BFloat16 v) { return static_cast<float>(v); }
// A float rounded to T and back (transformers' casts between ops, in bfloat16).
template <class T>
inline float round_to(float v) {
  return to_float(static_cast<T>(v));
}

#define TGI_ISA_BODY "rowwise_isa.inc"
#include "isa.h"

template <class Fn>
void over_rows(int64_t rows, int64_t width, Fn fn) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, width)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) fn(r);
  });
}

template <class T>
void rms_norm_rows(const at::Tensor& x, const at::Tensor& w, double eps, at::Tensor& out, int64_t isa) {
  const int64_t rows = x.size(0), d = x.size(1);
  const T* xp = x.data_ptr<T>();
  const T* wp = w.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const float e = static_cast<float>(eps);
  over_rows(rows, d, [&](int64_t r) {
    if (isa == kAvx512 && d % 16 == 0) avx512::rms_norm_row(xp + r * d, wp, d, e, op + r * d);
    else if (isa >= kAvx2 && d % 8 == 0) avx2::rms_norm_row(xp + r * d, wp, d, e, op + r * d);
    else scalar::rms_norm_row(xp + r * d, wp, d, e, op + r * d);
  });
}

// x += delta (rounded to T, as torch's add), then out = RMSNorm(x): a residual add and the next norm.
template <class T>
void add_rms_norm_rows(const at::Tensor& x, const at::Tensor& delta, const at::Tensor& w, double eps,
                       at::Tensor& out, int64_t isa) {
  const int64_t rows = x.size(0), d = x.size(1);
  T* xp = x.data_ptr<T>();
  const T* dp = delta.data_ptr<T>();
  const T* wp = w.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const float e = static_cast<float>(eps);
  over_rows(rows, d, [&](int64_t r) {
    T* xr = xp + r * d;
    for (int64_t i = 0; i < d; i++) xr[i] = static_cast<T>(to_float(xr[i]) + to_float(dp[r * d + i]));
    if (isa == kAvx512 && d % 16 == 0) avx512::rms_norm_row(xr, wp, d, e, op + r * d);
    else if (isa >= kAvx2 && d % 8 == 0) avx2::rms_norm_row(xr, wp, d, e, op + r * d);
    else scalar::rms_norm_row(xr, wp, d, e, op + r * d);
  });
}

template <class T>
void silu_mul_rows(const at::Tensor& gate_up, at::Tensor& out, int64_t isa) {
  const int64_t rows = gate_up.size(0), d = out.size(1);
  const T* gp = gate_up.data_ptr<T>();
  T* op = out.data_ptr<T>();
  over_rows(rows, d, [&](int64_t r) {
    const T* g = gp + r * 2 * d;
    if (isa == kAvx512 && d % 16 == 0) avx512::silu_mul_row(g, g + d, d, op + r * d);
    else if (isa >= kAvx2 && d % 8 == 0) avx2::silu_mul_row(g, g + d, d, op + r * d);
    else scalar::silu_mul_row(g, g + d, d, op + r * d);
  });
}

// x[r, h, :] rotated by position pos[r]: (a, b) -> (a cos - b sin, b cos + a sin) over the two halves of
// each head, in float32, rounded once (torch's four ops round after each). x's rows may be strided (q
// and k are views of the q|k|v matmul's output); a head's dims are contiguous.
template <class T>
void rope_rows(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const int64_t* pos) {
  const int64_t rows = x.size(0), heads = x.size(1), dim = x.size(2), half = dim / 2;
  const int64_t row_stride = x.stride(0), head_stride = x.stride(1);
  T* xp = x.data_ptr<T>();
  const T* cp = cos.data_ptr<T>();
  const T* sp = sin.data_ptr<T>();
  over_rows(rows, heads * dim, [&](int64_t r) {
    const T* c = cp + pos[r] * dim;
    const T* s = sp + pos[r] * dim;
    for (int64_t h = 0; h < heads; h++) {
      T* v = xp + r * row_stride + h * head_stride;
      for (int64_t i = 0; i < half; i++) {
        const float a = to_float(v[i]), b = to_float(v[i + half]);
        v[i] = static_cast<T>(a * to_float(c[i]) - b * to_float(s[i]));
        v[i + half] = static_cast<T>(b * to_float(c[i + half]) + a * to_float(s[i + half]));
      }
    }
  });
}

void check_rows(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), what, ": contiguous [rows, width]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, what, ": float32 or bfloat16");
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, int64_t isa) {
  check_rows(x, "x");
  TORCH_CHECK(weight.dim() == 1 && weight.is_contiguous() && weight.numel() == x.size(1) &&
                  weight.scalar_type() == x.scalar_type(),
              "weight: contiguous [width] in x's dtype");
  at::Tensor out = at::empty(x.sizes(), x.options());
  isa = resolve_isa(isa);
  if (x.scalar_type() == at::kFloat) rms_norm_rows<float>(x, weight, eps, out, isa);
  else rms_norm_rows<at::BFloat16>(x, weight, eps, out, isa);
  return out;
}

at::Tensor add_rms_norm_(const at::Tensor& x, const at::Tensor& delta, const at::Tensor& weight, double eps,
                         int64_t isa) {
  check_rows(x, "x");
  TORCH_CHECK(delta.sizes() == x.sizes() && delta.is_contiguous() && delta.scalar_type() == x.scalar_type(),
              "delta: contiguous, x's shape and dtype");
  TORCH_CHECK(weight.dim() == 1 && weight.is_contiguous() && weight.numel() == x.size(1) &&
                  weight.scalar_type() == x.scalar_type(),
              "weight: contiguous [width] in x's dtype");
  at::Tensor out = at::empty(x.sizes(), x.options());
  isa = resolve_isa(isa);
  if (x.scalar_type() == at::kFloat) add_rms_norm_rows<float>(x, delta, weight, eps, out, isa);
  else add_rms_norm_rows<at::BFloat16>(x, delta, weight, eps, out, isa);
  return out;
}

at::Tensor silu_mul(const at::Tensor& gate_up, int64_t isa) {
  check_rows(gate_up, "gate_up");
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "gate_up: [rows, 2 * width]");
  at::Tensor out = at::empty({gate_up.size(0), gate_up.size(1) / 2}, gate_up.options());
  isa = resolve_isa(isa);
  if (gate_up.scalar_type() == at::kFloat) silu_mul_rows<float>(gate_up, out, isa);
  else silu_mul_rows<at::BFloat16>(gate_up, out, isa);
  return out;
}

void rope_(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
           const at::Tensor& positions) {
  TORCH_CHECK(positions.dim() == 1 && positions.scalar_type() == at::kLong && positions.is_contiguous(),
              "positions: contiguous int64 [rows]");
  TORCH_CHECK(cos.dim() == 2 && cos.is_contiguous() && sin.sizes() == cos.sizes() && sin.is_contiguous() &&
                  sin.scalar_type() == cos.scalar_type(),
              "cos and sin: contiguous [positions, dim] tables");
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t r = 0; r < positions.numel(); r++)
    TORCH_CHECK(pos[r] >= 0 && pos[r] < cos.size(0), "a position is outside the cos/sin tables");
  for (const at::Tensor* x : {&q, &k}) {
    TORCH_CHECK(x->dim() == 3 && x->size(0) == positions.numel() && x->size(2) == cos.size(1) &&
                    x->size(2) % 2 == 0 && x->stride(2) == 1 && x->scalar_type() == cos.scalar_type(),
                "q and k: [rows, heads, dim] with contiguous heads, in the tables' dtype");
    if (x->scalar_type() == at::kFloat) rope_rows<float>(*x, cos, sin, pos);
    else if (x->scalar_type() == at::kBFloat16) rope_rows<at::BFloat16>(*x, cos, sin, pos);
    else TORCH_CHECK(false, "rope_: float32 or bfloat16");
  }
}

std::tuple<at::Tensor, at::Tensor> greedy(const at::Tensor& logits, int64_t isa) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() && logits.scalar_type() == at::kFloat,
              "logits: contiguous float32 [rows, vocab]");
  const int64_t rows = logits.size(0), n = logits.size(1);
  TORCH_CHECK(n > 0, "logits: an empty vocabulary");
  at::Tensor ids = at::empty({rows}, logits.options().dtype(at::kLong));
  at::Tensor logprobs = at::empty({rows}, logits.options());
  const float* x = logits.data_ptr<float>();
  int64_t* id = ids.data_ptr<int64_t>();
  float* lp = logprobs.data_ptr<float>();
  isa = resolve_isa(isa);
  over_rows(rows, n, [&](int64_t r) {
    if (isa == kAvx512) avx512::greedy_row(x + r * n, n, id + r, lp + r);
    else if (isa >= kAvx2) avx2::greedy_row(x + r * n, n, id + r, lp + r);
    else scalar::greedy_row(x + r * n, n, id + r, lp + r);
  });
  return {ids, logprobs};
}

}  // namespace tgi
