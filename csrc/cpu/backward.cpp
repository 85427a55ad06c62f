// CPU backward: the gradient of grad_rows . loss + grad_label . label_logprobs + grad_entropy .
// entropy w.r.t. the logits (the formula and row_coefs: the backward schema in registration.cpp).
//
// Memory traffic: reads N * V_r logits once and writes N * V_r gradients once (in place: the
// same memory, through the logits' strides), plus O(N * K). Work split: rows across threads with
// at::parallel_for; one thread owns a row (deterministic for any thread count).
//
// Per row: the sparse columns - the in-shard teacher columns and the label's - are collected
// first (sorted, duplicates merged, their logits read before an in-place pass overwrites them);
// the dense pass writes q_v * (A + B log q_v) for every column (B != 0 only with an entropy
// gradient); then each sparse column is recomputed from scratch in double and rounded once -
// never patched after a first rounding.
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
#include <limits>
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
  double direct;  // gl * (sum of g_k over the entries with this column) + gy [col == label]
  double logit;   // the column's logit z * inv_t, read before the dense pass
  int64_t count;  // valid teacher entries with this column (duplicates > 1; 0: the label only)
};

// out[v] = a q_v + b q_v log q_v,  q_v = exp(t_v),  t_v = (z[v] * inv_t - shift_max) - shift_log
template <typename scalar_t, typename acc_t>
void dense_row_scalar(const scalar_t* z, scalar_t* out, int64_t V, acc_t inv_t, acc_t shift_max,
                      acc_t shift_log, acc_t a, acc_t b) {
  for (int64_t j = 0; j < V; ++j) {
    const acc_t t = (static_cast<acc_t>(z[j]) * inv_t - shift_max) - shift_log;
    const acc_t q = std::exp(t);
    // q log q = 0 (not 0 * -inf) at a -inf logit: t floored at the lowest finite value first
    out[j] = static_cast<scalar_t>(a * q + b * (q * std::max(t, -std::numeric_limits<acc_t>::max())));
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
               acc_t shift_log, acc_t a, acc_t b) {
#if TD_HAVE_X86
  if constexpr (std::is_same_v<acc_t, float>) {
    if (cpu_has_avx2()) return dense_row_avx2<scalar_t>(z, out, V, inv_t, shift_max, shift_log, a, b);
    if (cpu_has_avx_fma()) return dense_row_avx<scalar_t>(z, out, V, inv_t, shift_max, shift_log, a, b);
  }
#endif
  dense_row_scalar<scalar_t, acc_t>(z, out, V, inv_t, shift_max, shift_log, a, b);
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

// The upstream gradient of a per-row output times its factor (row_coefs [4] / [5]): 0 when the
// upstream gradient is 0, even against a NaN factor; NaN when the output is NaN and gets a
// nonzero gradient.
inline double scaled_grad(double grad, double factor) { return grad == 0.0 ? 0.0 : grad * factor; }

template <typename scalar_t, typename acc_t, typename id_t, typename label_t>
void backward_kernel(const at::Tensor& logits, const RowLayout& in_layout, const at::Tensor& ids,
                     const label_t* labels, const at::Tensor& row_max, const at::Tensor& row_coefs,
                     const at::Tensor& grad_logprobs, const at::Tensor& grad_rows,
                     const acc_t* grad_label, const acc_t* grad_entropy, int64_t vocab_start,
                     double inv_temperature, scalar_t* out_base, const RowLayout& out_layout) {
  const int64_t N = in_layout.N, V = in_layout.V, K = ids.size(1);
  const scalar_t* z_base = logits.const_data_ptr<scalar_t>();
  const id_t* id_base = ids.const_data_ptr<id_t>();
  const acc_t* m = row_max.const_data_ptr<acc_t>();
  const double* coefs = row_coefs.const_data_ptr<double>();
  const double* g_base = grad_logprobs.const_data_ptr<double>();
  const acc_t* gr = grad_rows.const_data_ptr<acc_t>();
  const acc_t inv_t = static_cast<acc_t>(inv_temperature);
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(V, 1));

  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    std::vector<SparseEntry> sparse;
    sparse.reserve(K + 1);
    for (int64_t n = begin; n < end; ++n) {
      const scalar_t* z = z_base + in_layout.offset(n);
      scalar_t* o = out_base + out_layout.offset(n);
      const id_t* row_ids = id_base + n * K;
      const double* g = g_base + n * K;
      const double* c = coefs + kRowCoefs * n;
      const double log_sum = c[0], dense_coef = c[1], outside_coef = c[2], entropy = c[3];
      // The three parts of the row's gradient and whether each is active.
      const double gl = static_cast<double>(gr[n]);
      const double gy = grad_label != nullptr ? scaled_grad(grad_label[n], c[4]) : 0.0;
      const double gh = grad_entropy != nullptr ? scaled_grad(grad_entropy[n], c[5]) : 0.0;
      bool loss_part = dense_coef != 0.0 || outside_coef != 0.0;
      for (int64_t k = 0; k < K && !loss_part; ++k) loss_part = g[k] != 0.0;
      loss_part = loss_part && gl != 0.0;
      if (!loss_part && gy == 0.0 && gh == 0.0) {
        // masked / zero-weight row: exactly zero, even if the logits are not finite
        std::fill(o, o + V, scalar_t(0));
        continue;
      }
      // NaN / inf logits, a row whose loss is not finite (the epilogue's NaN dense_coef), an
      // invalid label or a NaN entropy with a gradient: the whole row is NaN (DECISIONS 15).
      const double shift = static_cast<double>(m[n]) + log_sum;
      const double coef_total =
          (loss_part ? gl * dense_coef : 0.0) + gy + (gh != 0.0 ? gh * entropy : 0.0);
      const double outside = loss_part ? gl * outside_coef : 0.0;
      if (!std::isfinite(shift) || std::isnan(coef_total) || std::isnan(outside)) {
        std::fill(o, o + V, static_cast<scalar_t>(std::nan("")));
        continue;
      }
      sparse.clear();
      if (loss_part) {
        for (int64_t k = 0; k < K; ++k) {
          const int64_t id = static_cast<int64_t>(row_ids[k]);
          const int64_t local = id - vocab_start;
          if (id < 0 || local < 0 || local >= V) continue;
          sparse.push_back({local, gl * g[k], 0.0, 1});
        }
      } else {  // only the columns matter (the outside term's duplicate correction is inactive)
        for (int64_t k = 0; k < K; ++k) {
          const int64_t id = static_cast<int64_t>(row_ids[k]);
          const int64_t local = id - vocab_start;
          if (id < 0 || local < 0 || local >= V) continue;
          sparse.push_back({local, 0.0, 0.0, 1});
        }
      }
      std::sort(sparse.begin(), sparse.end(),
                [](const SparseEntry& a, const SparseEntry& b) { return a.col < b.col; });
      size_t unique = 0;
      for (size_t i = 0; i < sparse.size(); ++i) {
        if (unique > 0 && sparse[unique - 1].col == sparse[i].col) {
          sparse[unique - 1].direct += sparse[i].direct;
          sparse[unique - 1].count += 1;
        } else {
          sparse[unique++] = sparse[i];
        }
      }
      sparse.resize(unique);
      if (gy != 0.0) {  // the label's column: its own sparse entry, or added to a teacher column
        const int64_t local = static_cast<int64_t>(labels[n]) - vocab_start;
        if (local >= 0 && local < V) {
          auto it = std::lower_bound(sparse.begin(), sparse.end(), local,
                                     [](const SparseEntry& e, int64_t col) { return e.col < col; });
          if (it != sparse.end() && it->col == local) {
            it->direct += gy;
          } else {
            sparse.insert(it, SparseEntry{local, gy, 0.0, 0});
          }
        }
      }
      for (SparseEntry& e : sparse) e.logit = static_cast<double>(static_cast<acc_t>(z[e.col]) * inv_t);

      // Dense: s * q_v * (outside - coef_total - gh * t_v) for every column (the sparse ones are
      // overwritten below).
      const acc_t shift_max = m[n];
      dense_row<scalar_t, acc_t>(z, o, V, inv_t, shift_max, static_cast<acc_t>(log_sum),
                                 static_cast<acc_t>(inv_temperature * (outside - coef_total)),
                                 static_cast<acc_t>(-inv_temperature * gh));
      for (const SparseEntry& e : sparse) {
        const double t = (e.logit - static_cast<double>(shift_max)) - log_sum;
        const double q = std::exp(t);
        // outside term: +q on a non-teacher column, -(m - 1) q on a column with m copies
        const double outside_part = e.count == 0 ? outside : -static_cast<double>(e.count - 1) * outside;
        const double q_log_q = q > 0.0 ? q * t : 0.0;  // 0 log 0 = 0 at a -inf logit
        o[e.col] = static_cast<scalar_t>(
            inv_temperature * (e.direct - q * coef_total + q * outside_part - gh * q_log_q));
      }
    }
  });
}

void backward_into(const at::Tensor& logits, const RowLayout& layout, const at::Tensor& teacher_ids,
                   const std::optional<at::Tensor>& labels, const at::Tensor& row_max,
                   const at::Tensor& row_coefs, const at::Tensor& grad_logprobs,
                   const at::Tensor& grad_rows, const std::optional<at::Tensor>& grad_label,
                   const std::optional<at::Tensor>& grad_entropy, int64_t vocab_start,
                   double inv_temperature, at::Tensor& out, const RowLayout& out_layout) {
  if (layout.N == 0 || layout.V == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "backward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const acc_t* gy = grad_label.has_value() && labels.has_value()
                          ? grad_label->const_data_ptr<acc_t>() : nullptr;
    const acc_t* gh = grad_entropy.has_value() ? grad_entropy->const_data_ptr<acc_t>() : nullptr;
    scalar_t* out_base = out.mutable_data_ptr<scalar_t>();
    AT_DISPATCH_INDEX_TYPES(teacher_ids.scalar_type(), "backward_cpu_ids", [&] {
      if (labels.has_value() && labels->scalar_type() == at::kInt) {
        backward_kernel<scalar_t, acc_t, index_t, int32_t>(
            logits, layout, teacher_ids, labels->const_data_ptr<int32_t>(), row_max, row_coefs,
            grad_logprobs, grad_rows, gy, gh, vocab_start, inv_temperature, out_base, out_layout);
      } else {
        backward_kernel<scalar_t, acc_t, index_t, int64_t>(
            logits, layout, teacher_ids,
            labels.has_value() ? labels->const_data_ptr<int64_t>() : nullptr, row_max, row_coefs,
            grad_logprobs, grad_rows, gy, gh, vocab_start, inv_temperature, out_base, out_layout);
      }
    });
  });
}

at::Tensor backward_cpu(const at::Tensor& logits, const at::Tensor& teacher_ids,
                        const std::optional<at::Tensor>& labels, const at::Tensor& row_max,
                        const at::Tensor& row_coefs, const at::Tensor& grad_logprobs,
                        const at::Tensor& grad_rows, const std::optional<at::Tensor>& grad_label,
                        const std::optional<at::Tensor>& grad_entropy, int64_t vocab_start,
                        double inv_temperature) {
  const RowLayout layout = check_backward_args(logits, teacher_ids, labels, row_max, row_coefs,
                                               grad_logprobs, grad_rows, grad_label, grad_entropy);
  at::Tensor out = GradBufferCache::instance().empty_like_rows(logits);  // contiguous
  const RowLayout out_layout{layout.N, layout.N > 0 ? layout.N : 1, 0, layout.V, layout.V};
  backward_into(logits, layout, teacher_ids, labels, row_max, row_coefs, grad_logprobs, grad_rows,
                grad_label, grad_entropy, vocab_start, inv_temperature, out, out_layout);
  return out;
}

void backward_inplace_cpu(const at::Tensor& logits, const at::Tensor& teacher_ids,
                          const std::optional<at::Tensor>& labels, const at::Tensor& row_max,
                          const at::Tensor& row_coefs, const at::Tensor& grad_logprobs,
                          const at::Tensor& grad_rows, const std::optional<at::Tensor>& grad_label,
                          const std::optional<at::Tensor>& grad_entropy, int64_t vocab_start,
                          double inv_temperature) {
  const RowLayout layout = check_backward_args(logits, teacher_ids, labels, row_max, row_coefs,
                                               grad_logprobs, grad_rows, grad_label, grad_entropy);
  check_no_row_overlap(logits, layout);
  at::Tensor out = logits;  // same storage and strides: each row is read before it is written
  backward_into(logits, layout, teacher_ids, labels, row_max, row_coefs, grad_logprobs, grad_rows,
                grad_label, grad_entropy, vocab_start, inv_temperature, out, layout);
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(topk_distill, CPU, m) {
  m.impl("backward", &cpu::backward_cpu);
  m.impl("backward_", &cpu::backward_inplace_cpu);
}

}  // namespace topk_distill
