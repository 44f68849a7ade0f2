// The functions of tgi-zmq's C++ extension (built by tgi_zmq/native.py; bound in module.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace tgi {

// Code paths: kAuto picks the best the CPU has; a request above it is clamped down.
enum Isa : int64_t { kAuto = 0, kScalar = 1, kAvx2 = 2, kAvx512 = 3 };
int64_t resolve_isa(int64_t want);
std::string isa_name(int64_t isa);

// qkernels.cpp: quantized-weight matmuls; rows_alike: each row of x by one formula (batch invariance).
// float_out (here and in gemv): y in float32 as computed, not rounded to x's dtype (the LM head's logits).
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                  const std::optional<at::Tensor>& offsets, const std::optional<at::Tensor>& lut, int64_t group,
                  const std::optional<at::Tensor>& bias, int64_t isa, bool rows_alike, bool float_out);
void dequantize(const at::Tensor& w, const at::Tensor& scales, const std::optional<at::Tensor>& offsets,
                const std::optional<at::Tensor>& lut, int64_t group, at::Tensor& out, int64_t isa);

// paged_attention.cpp: one query token per row over its request's pages, read in place.
at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& tables, const at::Tensor& lens, double scale, int64_t isa,
                        int64_t window = 0, double softcap = 0.0);

// rowwise.cpp: RMSNorm, SiLU(gate) * up, RoPE and greedy sampling, row by row.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, int64_t isa);
at::Tensor add_rms_norm_(const at::Tensor& x, const at::Tensor& delta, const at::Tensor& weight, double eps,
                         int64_t isa);
at::Tensor silu_mul(const at::Tensor& gate_up, int64_t isa);
void rope_(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
           const at::Tensor& positions);
// The greedy token of each row of float32 logits and its log-softmax (argmax + log_softmax + gather).
std::tuple<at::Tensor, at::Tensor> greedy(const at::Tensor& logits, int64_t isa);

// gemv.cpp: dense matmuls, each row reduced alike whatever the rows of x.
at::Tensor gemv(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias, int64_t isa,
                bool float_out);

// llama_stack.cpp: a Llama stack's layers in one call, each row one row of paged_decode (see the file).
at::Tensor llama_layers(const at::Tensor& x, const std::vector<std::vector<at::Tensor>>& layers,
                        const std::vector<int64_t>& groups, const std::vector<at::Tensor>& k_caches,
                        const std::vector<at::Tensor>& v_caches, const at::Tensor& slots, const at::Tensor& cos,
                        const at::Tensor& sin, const at::Tensor& positions, const at::Tensor& tables,
                        const at::Tensor& lens, int64_t heads, int64_t kv_heads, double eps, double scale,
                        int64_t gemv_rows, bool invariant, int64_t isa);

}  // namespace tgi
