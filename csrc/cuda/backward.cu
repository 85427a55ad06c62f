// CUDA backward, host launcher: checks, allocation, dispatch, launch geometry and stream (the
// kernel and what it computes: kernels/backward.cuh; semantics: csrc/registration.cpp).
// Compiled by nvcc for the GPU and, with TD_EMULATE, by g++ against the CUDA emulator
// (csrc/emu/backward_emu.cpp).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sort.h>
#include <torch/library.h>

#include <type_traits>

#include "../ops.h"
#include "host_runtime.h"
#include "kernels/backward.cuh"

TD_CUDA_NAMESPACE_BEGIN
namespace {

static_assert(kRowCoefsPerRow == ::topk_distill::kRowCoefs, "row_coefs layout");

// out: the logits themselves (in place: out_layout == layout) or a contiguous tensor shaped
// like them.
void backward_into(const at::Tensor& logits, const RowLayout& l, const at::Tensor& teacher_ids,
                   const std::optional<at::Tensor>& labels, const at::Tensor& row_max,
                   const at::Tensor& row_coefs, const at::Tensor& grad_logprobs,
                   const at::Tensor& grad_rows, const std::optional<at::Tensor>& grad_label,
                   const std::optional<at::Tensor>& grad_entropy, int64_t vocab_start,
                   double inv_temperature, at::Tensor& out, const RowLayout& out_layout) {
  const int64_t N = l.N, V = l.V, K = teacher_ids.size(1);
  if (N == 0 || V == 0) return;
  at::Tensor sorted, order;
  if (K > 1) std::tie(sorted, order) = at::sort(teacher_ids, /*stable=*/true, -1, false);
  at::Tensor labels64;
  if (labels.has_value()) labels64 = labels->to(at::kLong);
  const RowSplit rs = choose_row_split(N, V, sm_count(logits.device()));
  TORCH_CHECK_VALUE(N * rs.splits < (int64_t(1) << 31), "the CUDA backward takes fewer than 2^31 "
                    "(row, column range) work items; got ", N, " rows x ", rs.splits, " ranges");
  const Stream stream = current_stream(logits.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "backward_cuda", [&] {
    using acc_t = acc_of<scalar_t>;
    AT_DISPATCH_INDEX_TYPES(teacher_ids.scalar_type(), "backward_cuda_ids", [&] {
      BackwardArgs<scalar_t, index_t> a{};
      a.logits = global_in<scalar_t>(logits, "logits");
      a.in_rows = RowMap{static_cast<uint32_t>(l.T), l.outer_stride, l.inner_stride};
      a.out = global_out<scalar_t>(out, "out");
      a.out_rows = RowMap{static_cast<uint32_t>(out_layout.T), out_layout.outer_stride, out_layout.inner_stride};
      a.N = N;
      a.V = V;
      a.K = K;
      a.ids = global_in<index_t>(teacher_ids, "teacher_ids");
      a.sorted = K > 1 ? global_in<index_t>(sorted, "sorted") : nullptr;
      a.order = K > 1 ? global_in<int64_t>(order, "order") : nullptr;
      a.labels = labels.has_value() ? global_in<int64_t>(labels64, "labels") : nullptr;
      a.vocab_start = vocab_start;
      a.inv_t = inv_temperature;
      a.inv_t_acc = static_cast<acc_t>(inv_temperature);
      a.c = static_cast<acc_t>(static_cast<double>(a.inv_t_acc) * kLog2e);
      a.c_over_inv_t = static_cast<double>(a.c) / static_cast<double>(a.inv_t_acc);
      a.row_max = global_in<acc_t>(row_max, "row_max");
      a.row_coefs = global_in<double>(row_coefs, "row_coefs");
      a.g = global_in<double>(grad_logprobs, "grad_logprobs");
      a.grad_rows = global_in<acc_t>(grad_rows, "grad_rows");
      a.grad_label = grad_label.has_value() ? global_in<acc_t>(*grad_label, "grad_label") : nullptr;
      a.grad_entropy = grad_entropy.has_value() ? global_in<acc_t>(*grad_entropy, "grad_entropy") : nullptr;
      a.splits = rs.splits;
      a.chunk = rs.chunk;
      a.bitmap_words = bitmap_words(std::min(rs.chunk, V));
      const int threads = threads_for(std::min(rs.chunk, V), vec_of<scalar_t>());
      const size_t smem = static_cast<size_t>(a.bitmap_words) * sizeof(uint32_t);
      const unsigned grid = grid_for(N * rs.splits);
      if (grad_entropy.has_value()) {
        TD_LAUNCH(grid, threads, smem, stream, kBackwardMaxThreads,
                  backward_kernel<scalar_t, index_t, true>)(a);
      } else {
        TD_LAUNCH(grid, threads, smem, stream, kBackwardMaxThreads,
                  backward_kernel<scalar_t, index_t, false>)(a);
      }
      check_launch();
    });
  });
}

at::Tensor backward_cuda(const at::Tensor& logits, const at::Tensor& teacher_ids,
                         const std::optional<at::Tensor>& labels, const at::Tensor& row_max,
                         const at::Tensor& row_coefs, const at::Tensor& grad_logprobs,
                         const at::Tensor& grad_rows, const std::optional<at::Tensor>& grad_label,
                         const std::optional<at::Tensor>& grad_entropy, int64_t vocab_start,
                         double inv_temperature) {
  const RowLayout l = check_backward_args(logits, teacher_ids, labels, row_max, row_coefs,
                                          grad_logprobs, grad_rows, grad_label, grad_entropy);
  const DeviceGuard guard(logits.device());
  at::Tensor out = device_empty(logits.sizes(), logits.options());  // contiguous
  RowLayout ol = l;
  ol.T = l.T;
  ol.inner_stride = l.V;
  ol.outer_stride = logits.dim() == 3 ? l.T * l.V : 0;
  backward_into(logits, l, teacher_ids, labels, row_max, row_coefs, grad_logprobs, grad_rows,
                grad_label, grad_entropy, vocab_start, inv_temperature, out, ol);
  return out;
}

void backward_inplace_cuda(const at::Tensor& logits, const at::Tensor& teacher_ids,
                           const std::optional<at::Tensor>& labels, const at::Tensor& row_max,
                           const at::Tensor& row_coefs, const at::Tensor& grad_logprobs,
                           const at::Tensor& grad_rows,
                           const std::optional<at::Tensor>& grad_label,
                           const std::optional<at::Tensor>& grad_entropy, int64_t vocab_start,
                           double inv_temperature) {
  const RowLayout l = check_backward_args(logits, teacher_ids, labels, row_max, row_coefs,
                                          grad_logprobs, grad_rows, grad_label, grad_entropy);
  check_no_row_overlap(logits, l);
  const DeviceGuard guard(logits.device());
  at::Tensor out = logits;  // same storage, same strides: a block reads each element before writing it
  backward_into(logits, l, teacher_ids, labels, row_max, row_coefs, grad_logprobs, grad_rows,
                grad_label, grad_entropy, vocab_start, inv_temperature, out, l);
}

}  // namespace
TD_CUDA_NAMESPACE_END

TORCH_LIBRARY_IMPL(TD_OPS_NAMESPACE, TD_DISPATCH_KEY, m) {
  m.impl("backward", &topk_distill::cuda::backward_cuda);
  m.impl("backward_", &topk_distill::cuda::backward_inplace_cuda);
}
