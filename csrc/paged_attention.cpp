// Decode attention over the paged KV cache, read in place (tgi_zmq.attention).
//
// Why our own: torch has no CPU kernel that reads a block table. Gathering each request's pages into
// a new tensor every step (index_select) and then attending reads and writes the whole context twice
// more than attending in place; at 2k tokens of context that copy was most of a decode step.
//
// One query token per row, each with its own block table and length (a decode, or one token of a prompt
// over the keys up to its own), H query heads sharing KVH key/value heads (GQA: G = H / KVH query heads
// read each K/V row once). A row's keys are cut into parts at fixed positions (kPart: batch invariance,
// below); a part reads its tokens' K and V of every head, contiguous in the cache, keeping a running max
// and sum (online softmax), and a row's parts are merged at the end. Float32 arithmetic; the query and
// the cache may be float32 or bfloat16 (read as they are stored).
//
// One source for every x86-64 CPU: the loop (paged_attention_isa.inc) is compiled three times, over
// AVX-512, AVX2 and one-lane vectors, the best chosen at run time (like qkernels.cpp, never -march).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "native.h"

namespace tgi {
namespace {

#define TGI_INLINE inline __attribute__((always_inline))

constexpr int64_t kMaxDim = 256;
constexpr int64_t kChunk = 32;  // keys scored before the softmax update

TGI_INLINE float to_float(float v) { return v; }
TGI_INLINE float to_float(at::BFloat16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
TGI_INLINE void from_float(float v, float* out) { *out = v; }
TGI_INLINE void from_float(float v, at::BFloat16* out) { *out = at::BFloat16(v); }

struct Args {
  const void* q;  // [n, H, D] contiguous
  const void* k;  // [blocks, block_size, KVH, D] contiguous
  const void* v;
  void* out;  // [n, H, D] contiguous, q's dtype
  const int64_t* tables;  // [n, max_blocks]
  const int64_t* lens;  // [n] keys per request
  int64_t heads, kv_heads, dim, block_size, max_blocks;
  float scale;
  int64_t window;  // > 0: a query sees only its last `window` keys (sliding-window layers)
  float softcap;  // > 0: scores become softcap * tanh(score / softcap) (Gemma 2)
};

// A task: keys [t0, t1) of request b, every head; writes its running max, sum and unnormalised output.
struct Task {
  int64_t b, t0, t1;
};

// Partial results: [task, H] (max, sum) and [task, H, D] (output).
struct Partials {
  float *max, *sum, *acc;
};

#define TGI_ISA_BODY "paged_attention_isa.inc"
#include "isa.h"  // the loop, compiled once per instruction set: avx512::, avx2::, scalar::

// The parts [first, last) of one row merged in order into out (q's dtype).
template <class TQ>
void merge(const Args& a, const Task* tasks, int64_t first, int64_t last, const Partials& p) {
  const int64_t H = a.heads, D = a.dim;
  TQ* out = static_cast<TQ*>(a.out) + tasks[first].b * H * D;
  for (int64_t h = 0; h < H; h++) {
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t i = first; i < last; i++) top = std::max(top, p.max[i * H + h]);
    float total = 0.f;
    float o[kMaxDim] = {};
    for (int64_t i = first; i < last; i++) {
      const float w = p.sum[i * H + h] > 0.f ? std::exp(p.max[i * H + h] - top) : 0.f;
      total += w * p.sum[i * H + h];
      const float* acc = p.acc + (i * H + h) * D;
      for (int64_t d = 0; d < D; d++) o[d] += w * acc[d];
    }
    const float inv = total > 0.f ? 1.f / total : 0.f;
    for (int64_t d = 0; d < D; d++) from_float(o[d] * inv, out + h * D + d);
  }
}

// A row's context is cut into parts of kPart keys at fixed positions (0, kPart, 2 kPart, ...), each
// reduced alone (online softmax) and then merged in order: a row's arithmetic depends on its own length
// only, never on the other rows of the step or the thread count (batch invariance), and a prompt's
// query i gives the bits that decoding at position i gives. The threads only change who computes what:
// few rows, (row, part) tasks fill the threads (flash-decoding); many rows (prefill), a task per row.
constexpr int64_t kPart = 256;

// A windowed row's keys start at len - window: its parts are the fixed ones that hold its keys, the first
// one cut at that start (still the same bits whatever else the step holds).
int64_t first_key(const Args& a, int64_t b) {
  return a.window > 0 ? std::max<int64_t>(0, a.lens[b] - a.window) : 0;
}

int64_t parts_of(const Args& a, int64_t b) {
  return std::max<int64_t>(1, (a.lens[b] + kPart - 1) / kPart - first_key(a, b) / kPart);
}

Task part(const Args& a, int64_t b, int64_t i) {
  const int64_t first = first_key(a, b), j = first / kPart + i;
  return {b, std::max(first, j * kPart), std::min(a.lens[b], (j + 1) * kPart)};
}

template <class TQ, class TKV>
void attend_part(int64_t isa, const Args& a, const Task& t, const Partials& p, int64_t i) {
  const Partials at{p.max + i * a.heads, p.sum + i * a.heads, p.acc + i * a.heads * a.dim};
  if (isa == kAvx512 && a.dim % 16 == 0) avx512::attend<TQ, TKV>(a, t, at.max, at.sum, at.acc);
  else if (isa >= kAvx2 && a.dim % 8 == 0) avx2::attend<TQ, TKV>(a, t, at.max, at.sum, at.acc);
  else scalar::attend<TQ, TKV>(a, t, at.max, at.sum, at.acc);
}

// Few rows: every (row, part) is a task, the parts in one buffer, then each row's merged.
template <class TQ, class TKV>
void run_parts(const Args& a, int64_t rows, int64_t isa) {
  std::vector<Task> tasks;
  std::vector<int64_t> starts;
  for (int64_t b = 0; b < rows; b++) {
    starts.push_back(static_cast<int64_t>(tasks.size()));
    for (int64_t i = 0; i < parts_of(a, b); i++) tasks.push_back(part(a, b, i));
  }
  starts.push_back(static_cast<int64_t>(tasks.size()));
  const int64_t H = a.heads, count = static_cast<int64_t>(tasks.size());
  std::vector<float> buffer(count * H * (2 + a.dim));
  const Partials p{buffer.data(), buffer.data() + count * H, buffer.data() + 2 * count * H};
  at::parallel_for(0, count, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; i++) attend_part<TQ, TKV>(isa, a, tasks[i], p, i);
  });
  at::parallel_for(0, rows, 16, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; u++) merge<TQ>(a, tasks.data(), starts[u], starts[u + 1], p);
  });
}

// Many rows: a task per row, its parts in a buffer of the thread's, merged at once.
template <class TQ, class TKV>
void run_rows(const Args& a, int64_t rows, int64_t isa) {
  at::parallel_for(0, rows, 1, [&](int64_t b0, int64_t b1) {
    std::vector<Task> tasks;
    std::vector<float> buffer;
    for (int64_t b = b0; b < b1; b++) {
      const int64_t count = parts_of(a, b), H = a.heads;
      tasks.clear();
      buffer.resize(count * H * (2 + a.dim));
      const Partials p{buffer.data(), buffer.data() + count * H, buffer.data() + 2 * count * H};
      for (int64_t i = 0; i < count; i++) {
        tasks.push_back(part(a, b, i));
        attend_part<TQ, TKV>(isa, a, tasks.back(), p, i);
      }
      merge<TQ>(a, tasks.data(), 0, count, p);
    }
  });
}

template <class TQ, class TKV>
void run(const Args& a, int64_t rows, int64_t isa) {
  if (rows >= 4 * at::get_num_threads()) run_rows<TQ, TKV>(a, rows, isa);
  else run_parts<TQ, TKV>(a, rows, isa);
}

}  // namespace

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& tables, const at::Tensor& lens, double scale, int64_t isa,
                        int64_t window, double softcap) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous(), "q: contiguous [n, heads, dim]");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  v_cache.sizes() == k_cache.sizes() && v_cache.scalar_type() == k_cache.scalar_type(),
              "caches: contiguous [blocks, block_size, kv_heads, dim], K and V alike");
  TORCH_CHECK(tables.dim() == 2 && tables.scalar_type() == at::kLong && tables.is_contiguous() &&
                  tables.size(0) == q.size(0),
              "tables: contiguous int64 [n, max_blocks]");
  TORCH_CHECK(lens.dim() == 1 && lens.scalar_type() == at::kLong && lens.is_contiguous() && lens.numel() == q.size(0),
              "lens: contiguous int64 [n]");
  Args a{};
  a.heads = q.size(1), a.dim = q.size(2), a.kv_heads = k_cache.size(2), a.block_size = k_cache.size(1);
  a.max_blocks = tables.size(1);
  TORCH_CHECK(k_cache.size(3) == a.dim && a.dim <= kMaxDim, "head dim must match and be at most ", kMaxDim);
  TORCH_CHECK(a.heads % a.kv_heads == 0, "query heads must be a multiple of KV heads");
  const auto qt = q.scalar_type(), ct = k_cache.scalar_type();
  TORCH_CHECK((qt == at::kFloat || qt == at::kBFloat16) && (ct == at::kFloat || ct == at::kBFloat16),
              "float32 or bfloat16 query and cache");
  at::Tensor out = at::empty(q.sizes(), q.options());
  a.q = q.data_ptr(), a.k = k_cache.data_ptr(), a.v = v_cache.data_ptr(), a.out = out.data_ptr();
  a.tables = tables.data_ptr<int64_t>(), a.lens = lens.data_ptr<int64_t>();
  a.scale = static_cast<float>(scale);
  a.window = window, a.softcap = static_cast<float>(softcap);
  for (int64_t b = 0; b < q.size(0); b++)
    TORCH_CHECK(a.lens[b] <= a.max_blocks * a.block_size, "a context is longer than its block table");
  isa = resolve_isa(isa);
  using BF = at::BFloat16;
  const int64_t rows = q.size(0);
  if (qt == at::kFloat && ct == at::kFloat) run<float, float>(a, rows, isa);
  else if (qt == at::kFloat) run<float, BF>(a, rows, isa);
  else if (ct == at::kFloat) run<BF, float>(a, rows, isa);
  else run<BF, BF>(a, rows, isa);
  return out;
}

}  // namespace tgi
