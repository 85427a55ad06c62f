// CPU backward: grad = grad_rows[n] / T * (sum_k g_k [v == t_k] - q_v * dense_coef
//                                          + q_v * outside_coef * ([v not teacher] - extra copies))
// (the formula and the meaning of row_coefs: the backward schema in registration.cpp).
//
// Memory traffic: reads N * V_r logits once and writes N * V_r gradients once (in place: the
// same memory), plus O(N * K). Work split: rows across threads with at::parallel_for; one
// thread owns a row (deterministic for any thread count).
//
// Per row: the in-shard teacher columns are collected first (sorted, duplicates merged, their
// logits read before an in-place pass overwrites them); the dense pass writes the non-teacher
// value -scale * (dense_coef - outside_coef) * q_v for every column; then each teacher column is
// recomputed from scratch in double, scale * (g_sum - q * (dense_coef + (m - 1) * outside_coef)),
// and rounded once - never patched after a first rounding.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <vector>
#include <new>
#include <mutex>


#include "../ops.h"
#include "simd.h"

namespace topk_distill {
namespace cpu {
namespace {

struct SparseEntry {
  int64_t col;
  double g;      // sum of g_k over the entries with this column
  double logit;  // the column's logit, read before the dense pass
  int64_t count; // valid entries with this column (duplicates > 1)
};

// out[v] = coef * exp(z[v] * inv_t - shift_max - shift_log)
template <typename scalar_t, typename acc_t>
void dense_row_scalar(const scalar_t* z, scalar_t* out, int64_t V, acc_t inv_t, acc_t shift_max,
                      acc_t shift_log, acc_t coef) {
  for (int64_t j = 0; j < V; ++j) {
    const acc_t e = std::exp((static_cast<acc_t>(z[j]) * inv_t - shift_max) - shift_log);
    out[j] = static_cast<scalar_t>(coef * e);
  }
}

#if TD_HAVE_X86
#define TD_SIMD_TARGET TD_AVX_TARGET
#define TD_SIMD_NAME dense_row_avx
#define TD_SIMD_EXP8 exp8_nonpositive
#include "dense_row_simd.inc"
#undef TD_SIMD_TARGET
#undef TD_SIMD_NAME
#undef TD_SIMD_EXP8
#define TD_SIMD_TARGET TD_AVX2_TARGET
#define TD_SIMD_NAME dense_row_avx2
#define TD_SIMD_EXP8 exp8_nonpositive_avx2
#include "dense_row_simd.inc"
#undef TD_SIMD_TARGET
#undef TD_SIMD_NAME
#undef TD_SIMD_EXP8
#endif

template <typename scalar_t, typename acc_t>
void dense_row(const scalar_t* z, scalar_t* out, int64_t V, acc_t inv_t, acc_t shift_max,
               acc_t shift_log, acc_t coef) {
#if TD_HAVE_X86
  if constexpr (std::is_same_v<acc_t, float>) {
    if (cpu_has_avx2()) return dense_row_avx2<scalar_t>(z, out, V, inv_t, shift_max, shift_log, coef);
    if (cpu_has_avx_fma()) return dense_row_avx<scalar_t>(z, out, V, inv_t, shift_max, shift_log, coef);
  }
#endif
  dense_row_scalar<scalar_t, acc_t>(z, out, V, inv_t, shift_max, shift_log, coef);
}

// The gradient buffer. A fresh multi-MB tensor is a fresh mmap, and the kernel zeroing it page
// by page on first touch costs about as much as the backward itself (64 MB: ~12 ms of faults
// vs ~8 ms of work on a 2-core VM; transparent huge pages halve that but, with the common
// defrag=madvise policy, stall for 100+ ms whenever memory must be compacted). A training loop
// asks for the same size every step, so the most recently freed gradient buffer is kept and
// handed out again - one idle buffer, as a caching allocator would. Only buffers of 4 MiB to
// TOPK_DISTILL_CPU_GRAD_CACHE_MB (default 2048; 0 turns the cache off) are cached.
class GradBufferCache {
 public:
  static GradBufferCache& instance() {
    static GradBufferCache* cache = new GradBufferCache();  // leaked: outlives every tensor
    return *cache;
  }

  at::Tensor empty_like_rows(const at::Tensor& logits) {
    const size_t bytes = static_cast<size_t>(logits.numel()) * logits.element_size();
    if (bytes < kMinBytes || bytes > max_bytes_) return at::empty(logits.sizes(), logits.options());
    void* ptr = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (cached_ != nullptr && cached_bytes_ == bytes) {
        ptr = cached_;
        cached_ = nullptr;
      }
    }
    if (ptr == nullptr && posix_memalign(&ptr, 64, bytes) != 0) throw std::bad_alloc();
    return at::from_blob(ptr, logits.sizes(), [bytes](void* p) { instance().release(p, bytes); },
                         logits.options());
  }

 private:
  static constexpr size_t kMinBytes = size_t(4) << 20;

  GradBufferCache() {
    const char* env = std::getenv("TOPK_DISTILL_CPU_GRAD_CACHE_MB");
    max_bytes_ = (env != nullptr ? static_cast<size_t>(std::atoll(env)) : size_t(2048)) << 20;
  }

  void release(void* p, size_t bytes) {
    void* evicted = p;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (bytes <= max_bytes_) {  // keep the newest buffer, free the one it replaces
        evicted = cached_;
        cached_ = p;
        cached_bytes_ = bytes;
      }
    }
    std::free(evicted);
  }

  std::mutex mu_;
  void* cached_ = nullptr;
  size_t cached_bytes_ = 0;
  size_t max_bytes_ = 0;
};

template <typename scalar_t, typename acc_t, typename id_t>
void backward_kernel(const at::Tensor& logits, const at::Tensor& ids, const at::Tensor& row_max,
                     const at::Tensor& row_coefs, const at::Tensor& grad_logprobs,
                     const at::Tensor& grad_rows, int64_t vocab_start, double inv_temperature,
                     at::Tensor& out) {
  const int64_t N = logits.size(0), V = logits.size(1), K = ids.size(1);
  const int64_t in_stride = logits.stride(0), out_stride = out.stride(0);
  const scalar_t* z_base = logits.const_data_ptr<scalar_t>();
  scalar_t* out_base = out.mutable_data_ptr<scalar_t>();
  const id_t* id_base = ids.const_data_ptr<id_t>();
  const acc_t* m = row_max.const_data_ptr<acc_t>();
  const double* coefs = row_coefs.const_data_ptr<double>();
  const double* g_base = grad_logprobs.const_data_ptr<double>();
  const acc_t* gr = grad_rows.const_data_ptr<acc_t>();
  const acc_t inv_t = static_cast<acc_t>(inv_temperature);
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(V, 1));

  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    std::vector<SparseEntry> sparse;
    sparse.reserve(K);
    for (int64_t n = begin; n < end; ++n) {
      const scalar_t* z = z_base + n * in_stride;
      scalar_t* o = out_base + n * out_stride;
      const id_t* row_ids = id_base + n * K;
      const double* g = g_base + n * K;
      const double log_sum = coefs[3 * n], dense_coef = coefs[3 * n + 1];
      const double outside_coef = coefs[3 * n + 2];
      bool any = dense_coef != 0.0 || outside_coef != 0.0;
      for (int64_t k = 0; k < K; ++k) any |= g[k] != 0.0;
      const double scale = static_cast<double>(gr[n]) * inv_temperature;
      const double shift = static_cast<double>(m[n]) + log_sum;
      if (!any || scale == 0.0) {  // masked / zero-weight row: exactly zero, even if logits are not finite
        std::fill(o, o + V, scalar_t(0));
        continue;
      }
      // NaN / inf logits, or a row whose loss is not finite (the epilogue's NaN dense_coef): NaN.
      if (!std::isfinite(shift) || std::isnan(dense_coef)) {
        std::fill(o, o + V, static_cast<scalar_t>(std::nan("")));
        continue;
      }
      sparse.clear();
      for (int64_t k = 0; k < K; ++k) {
        const int64_t id = static_cast<int64_t>(row_ids[k]);
        const int64_t local = id - vocab_start;
        if (id < 0 || local < 0 || local >= V) continue;
        sparse.push_back({local, g[k], 0.0, 1});
      }
      std::sort(sparse.begin(), sparse.end(),
                [](const SparseEntry& a, const SparseEntry& b) { return a.col < b.col; });
      size_t unique = 0;
      for (size_t i = 0; i < sparse.size(); ++i) {
        if (unique > 0 && sparse[unique - 1].col == sparse[i].col) {
          sparse[unique - 1].g += sparse[i].g;
          sparse[unique - 1].count += 1;
        } else {
          sparse[unique++] = sparse[i];
        }
      }
      sparse.resize(unique);
      for (SparseEntry& e : sparse) e.logit = static_cast<double>(static_cast<acc_t>(z[e.col]) * inv_t);

      const acc_t shift_max = m[n];
      dense_row<scalar_t, acc_t>(z, o, V, inv_t, shift_max, static_cast<acc_t>(log_sum),
                                 static_cast<acc_t>(-scale * (dense_coef - outside_coef)));
      for (const SparseEntry& e : sparse) {
        const double q = std::exp((e.logit - static_cast<double>(shift_max)) - log_sum);
        const double coef = dense_coef + static_cast<double>(e.count - 1) * outside_coef;
        o[e.col] = static_cast<scalar_t>(scale * (e.g - q * coef));
      }
    }
  });
}

void backward_into(const at::Tensor& logits, const at::Tensor& teacher_ids,
                   const at::Tensor& row_max, const at::Tensor& row_coefs,
                   const at::Tensor& grad_logprobs, const at::Tensor& grad_rows,
                   int64_t vocab_start, double inv_temperature, at::Tensor& out) {
  if (logits.size(0) == 0 || logits.size(1) == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "backward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    AT_DISPATCH_INDEX_TYPES(teacher_ids.scalar_type(), "backward_cpu_ids", [&] {
      backward_kernel<scalar_t, acc_t, index_t>(logits, teacher_ids, row_max, row_coefs,
                                                grad_logprobs, grad_rows, vocab_start,
                                                inv_temperature, out);
    });
  });
}

at::Tensor backward_cpu(const at::Tensor& logits, const at::Tensor& teacher_ids,
                        const at::Tensor& row_max, const at::Tensor& row_coefs,
                        const at::Tensor& grad_logprobs, const at::Tensor& grad_rows,
                        int64_t vocab_start, double inv_temperature) {
  check_backward_args(logits, teacher_ids, row_max, row_coefs, grad_logprobs, grad_rows);
  at::Tensor out = GradBufferCache::instance().empty_like_rows(logits);
  backward_into(logits, teacher_ids, row_max, row_coefs, grad_logprobs, grad_rows, vocab_start,
                inv_temperature, out);
  return out;
}

void backward_inplace_cpu(const at::Tensor& logits, const at::Tensor& teacher_ids,
                          const at::Tensor& row_max, const at::Tensor& row_coefs,
                          const at::Tensor& grad_logprobs, const at::Tensor& grad_rows,
                          int64_t vocab_start, double inv_temperature) {
  check_backward_args(logits, teacher_ids, row_max, row_coefs, grad_logprobs, grad_rows);
  at::Tensor out = logits;  // same storage: each row is read before it is overwritten
  backward_into(logits, teacher_ids, row_max, row_coefs, grad_logprobs, grad_rows, vocab_start,
                inv_temperature, out);
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(topk_distill, CPU, m) {
  m.impl("backward", &cpu::backward_cpu);
  m.impl("backward_", &cpu::backward_inplace_cpu);
}

}  // namespace topk_distill
