// A Llama stack's layers in one call (the CPU twin of a captured decode graph): the kernels of gemv.cpp,
// rowwise.cpp and paged_attention.cpp called in the order tgi_zmq/models/llama.py calls them, without
// the ~10 Python calls and ~40 small torch ops a layer costs there (the most of a one-token step
// outside the matmuls). Same kernels, same order: the same bits as the Python layers.
//
// It serves the steps whose every query row is one row of the in-place attention kernel (decodes; every
// step when batch-invariant), on dense float32 or bfloat16 weights or quantized ones the fused kernel
// takes, and pages of the model's dtype, on one rank (tensor parallelism all-reduces between the
// matmuls: the Python layers do).
#include <ATen/core/Tensor.h>
#include <ATen/ops/linear.h>

#include <cstring>
#include <vector>

#include "native.h"

namespace tgi {

namespace {

// A linear as llama.py hands it over, 4 tensors: [w, -, -, -] dense (group 0), or [codes, scales,
// offsets, lut] in a format of qkernels.cpp with its group (an empty tensor where there is none).
struct Weight {
  const at::Tensor* w;
  const at::Tensor* scales = nullptr;
  std::optional<at::Tensor> offsets, lut;
  int64_t group = 0;
};

std::optional<at::Tensor> given(const at::Tensor& t) { return t.numel() ? std::optional<at::Tensor>(t) : std::nullopt; }

// One layer's 19 tensors: input_norm, post_norm, qkv_bias (empty: none), then 4 for each of qkv, o,
// gate_up and down (``Weight``); ``groups``: their groups (0: dense). The input norm (t[0]) is read
// where the previous layer ends.
struct Layer {
  const at::Tensor& post_norm;
  std::optional<at::Tensor> qkv_bias;
  Weight qkv, o, gate_up, down;
};

Layer layer_of(const std::vector<at::Tensor>& t, const int64_t* groups) {
  Weight w[4];
  for (int i = 0; i < 4; i++) {
    const at::Tensor* part = &t[3 + 4 * i];
    w[i].w = part;
    if (groups[i] > 0) w[i] = Weight{part, part + 1, given(part[2]), given(part[3]), groups[i]};
  }
  return Layer{t[1], given(t[2]), w[0], w[1], w[2], w[3]};
}

// x W^T (+ b) as llama.py's linears compute it: a quantized weight by the fused kernel (rows_alike when
// batch-invariant), a dense one by our gemv up to gemv_rows rows of x and torch's matmul above.
at::Tensor matmul(const at::Tensor& x, const Weight& w, const std::optional<at::Tensor>& bias, int64_t gemv_rows,
                  bool invariant, int64_t isa) {
  if (w.scales) return linear(x, *w.w, *w.scales, w.offsets, w.lut, w.group, bias, isa, invariant, false);
  if (x.size(0) <= gemv_rows) return gemv(x, *w.w, bias, isa, false);
  return at::linear(x, *w.w, bias);
}

// K and V rows [T, kv_heads * dim] (strided views of the qkv output) into their cache slots.
void store(const at::Tensor& rows, const at::Tensor& cache, const int64_t* slots) {
  const int64_t width = rows.size(1), bytes = width * rows.element_size();
  TORCH_CHECK(cache.is_contiguous() && cache.size(2) * cache.size(3) == width &&
                  cache.scalar_type() == rows.scalar_type(),
              "a contiguous cache of the model's dtype, [blocks, block_size, kv_heads, dim]");
  const auto* src = static_cast<const char*>(rows.data_ptr());
  auto* dst = static_cast<char*>(cache.data_ptr());
  const int64_t capacity = cache.size(0) * cache.size(1), stride = rows.stride(0) * rows.element_size();
  for (int64_t t = 0; t < rows.size(0); t++) {
    TORCH_CHECK(slots[t] >= 0 && slots[t] < capacity, "a slot outside the cache");
    std::memcpy(dst + slots[t] * bytes, src + t * stride, bytes);
  }
}

}  // namespace

at::Tensor llama_layers(const at::Tensor& x, const std::vector<std::vector<at::Tensor>>& layers,
                        const std::vector<int64_t>& groups, const std::vector<at::Tensor>& k_caches,
                        const std::vector<at::Tensor>& v_caches, const at::Tensor& slots, const at::Tensor& cos,
                        const at::Tensor& sin, const at::Tensor& positions, const at::Tensor& tables,
                        const at::Tensor& lens, int64_t heads, int64_t kv_heads, double eps, double scale,
                        int64_t gemv_rows, bool invariant, int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x: the contiguous residual stream [T, hidden]");
  TORCH_CHECK(!layers.empty() && k_caches.size() == layers.size() && v_caches.size() == layers.size(),
              "one K and V cache a layer");
  TORCH_CHECK(groups.size() == 4 * layers.size(), "4 groups a layer");
  for (const auto& t : layers)
    TORCH_CHECK(t.size() == 19, "a layer: input_norm, post_norm, qkv_bias, then 4 tensors per linear");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() == x.size(0),
              "slots: contiguous int64 [T]");
  const int64_t T = x.size(0), dim = k_caches[0].size(3);
  const int64_t q_width = heads * dim, kv_width = kv_heads * dim;
  const auto mm = [&](const at::Tensor& in, const Weight& w, const std::optional<at::Tensor>& bias) {
    return matmul(in, w, bias, gemv_rows, invariant, isa);
  };
  // a layer's input norm is its first tensor: each is normed after the previous layer's MLP add
  at::Tensor normed = rms_norm(x, layers[0][0], eps, isa), mlp;
  for (size_t i = 0; i < layers.size(); i++) {
    const Layer l = layer_of(layers[i], groups.data() + 4 * i);
    const at::Tensor qkv = mm(normed, l.qkv, l.qkv_bias);
    TORCH_CHECK(qkv.size(1) == q_width + 2 * kv_width, "qkv: heads and kv_heads of head_dim columns");
    const at::Tensor q = qkv.narrow(1, 0, q_width).view({T, heads, dim});
    const at::Tensor k = qkv.narrow(1, q_width, kv_width), v = qkv.narrow(1, q_width + kv_width, kv_width);
    rope_(q, k.view({T, kv_heads, dim}), cos, sin, positions);
    store(k, k_caches[i], slots.data_ptr<int64_t>());
    store(v, v_caches[i], slots.data_ptr<int64_t>());
    const at::Tensor attn = paged_decode(q.contiguous(), k_caches[i], v_caches[i], tables, lens, scale, isa);
    normed = add_rms_norm_(x, mm(attn.view({T, q_width}), l.o, std::nullopt), l.post_norm, eps, isa);
    mlp = mm(silu_mul(mm(normed, l.gate_up, std::nullopt), isa), l.down, std::nullopt);
    if (i + 1 < layers.size()) normed = add_rms_norm_(x, mlp, layers[i + 1][0], eps, isa);
  }
  return mlp;
}

}  // namespace tgi
