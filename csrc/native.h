// The functions of tgi-zmq's C++ extension (built by tgi_zmq/native.py; bound in module.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>

namespace tgi {

// Code paths: kAuto picks the best the CPU has; a request above it is clamped down.
enum Isa : int64_t { kAuto = 0, kScalar = 1, kAvx2 = 2, kAvx512 = 3 };
int64_t resolve_isa(int64_t want);
std::string isa_name(int64_t isa);

// qkernels.cpp: quantized-weight matmuls.
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                  const std::optional<at::Tensor>& offsets, const std::optional<at::Tensor>& lut, int64_t group,
                  const std::optional<at::Tensor>& bias, int64_t isa);
void dequantize(const at::Tensor& w, const at::Tensor& scales, const std::optional<at::Tensor>& offsets,
                const std::optional<at::Tensor>& lut, int64_t group, at::Tensor& out, int64_t isa);

// paged_attention.cpp: one query token per request over its pages, read in place.
at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& tables, const at::Tensor& lens, double scale, int64_t isa);

// gemv.cpp: dense matmuls with few rows of x.
at::Tensor gemv(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias, int64_t isa);

}  // namespace tgi
