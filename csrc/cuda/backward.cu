// CUDA backward, host launcher: checks, allocation, dispatch, launch geometry and stream (the
// kernel and what it computes: kernels/backward.cuh; semantics: csrc/registration.cpp).
// Compiled by nvcc for the GPU and, with TD_EMULATE, by g++ against the CUDA emulator
// (csrc/emu/backward_emu.cpp).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../ops.h"
#include "host_runtime.h"
#include "kernels/backward.cuh"

TD_CUDA_NAMESPACE_BEGIN
namespace {

void backward_into(const at::Tensor& logits, const at::Tensor& teacher_ids,
                   const at::Tensor& row_max, const at::Tensor& row_coefs,
                   const at::Tensor& grad_logprobs, const at::Tensor& grad_rows,
                   int64_t vocab_start, double inv_temperature, at::Tensor& out) {
  const int64_t N = logits.size(0), V = logits.size(1), K = teacher_ids.size(1);
  if (N == 0 || V == 0) return;
  const RowSplit rs = choose_row_split(N, V, sm_count(logits.device()));
  const Stream stream = current_stream(logits.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "backward_cuda", [&] {
    using acc_t = acc_of<scalar_t>;
    AT_DISPATCH_INDEX_TYPES(teacher_ids.scalar_type(), "backward_cuda_ids", [&] {
      BackwardArgs<scalar_t, index_t> a{};
      a.logits = logits.const_data_ptr<scalar_t>();
      a.in_stride = logits.stride(0);
      a.out = out.mutable_data_ptr<scalar_t>();
      a.out_stride = out.stride(0);
      a.N = N;
      a.V = V;
      a.K = K;
      a.ids = teacher_ids.const_data_ptr<index_t>();
      a.vocab_start = vocab_start;
      a.inv_t = inv_temperature;
      a.row_max = row_max.const_data_ptr<acc_t>();
      a.row_coefs = row_coefs.const_data_ptr<double>();
      a.g = grad_logprobs.const_data_ptr<double>();
      a.grad_rows = grad_rows.const_data_ptr<acc_t>();
      a.splits = rs.splits;
      a.chunk = rs.chunk;
      a.bitmap_words = bitmap_words(std::min(rs.chunk, V));
      const int threads = threads_for(std::min(rs.chunk, V), vec_of<scalar_t>());
      const size_t smem = static_cast<size_t>(a.bitmap_words) * sizeof(uint32_t);
      TD_LAUNCH(grid_for(N * rs.splits), threads, smem, stream, kBackwardMaxThreads,
                backward_kernel<scalar_t, index_t>)(a);
      check_launch();
    });
  });
}

at::Tensor backward_cuda(const at::Tensor& logits, const at::Tensor& teacher_ids,
                         const at::Tensor& row_max, const at::Tensor& row_coefs,
                         const at::Tensor& grad_logprobs, const at::Tensor& grad_rows,
                         int64_t vocab_start, double inv_temperature) {
  check_backward_args(logits, teacher_ids, row_max, row_coefs, grad_logprobs, grad_rows);
  const DeviceGuard guard(logits.device());
  at::Tensor out = device_empty({logits.size(0), logits.size(1)}, logits.options());
  backward_into(logits, teacher_ids, row_max, row_coefs, grad_logprobs, grad_rows, vocab_start,
                inv_temperature, out);
  return out;
}

void backward_inplace_cuda(const at::Tensor& logits, const at::Tensor& teacher_ids,
                           const at::Tensor& row_max, const at::Tensor& row_coefs,
                           const at::Tensor& grad_logprobs, const at::Tensor& grad_rows,
                           int64_t vocab_start, double inv_temperature) {
  check_backward_args(logits, teacher_ids, row_max, row_coefs, grad_logprobs, grad_rows);
  const DeviceGuard guard(logits.device());
  at::Tensor out = logits;  // same storage: a block reads each element before writing it
  backward_into(logits, teacher_ids, row_max, row_coefs, grad_logprobs, grad_rows, vocab_start,
                inv_temperature, out);
}

}  // namespace
TD_CUDA_NAMESPACE_END

TORCH_LIBRARY_IMPL(TD_OPS_NAMESPACE, TD_DISPATCH_KEY, m) {
  m.impl("backward", &topk_distill::cuda::backward_cuda);
  m.impl("backward_", &topk_distill::cuda::backward_inplace_cuda);
}
