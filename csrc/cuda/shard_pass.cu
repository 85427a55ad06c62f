// CUDA shard pass, host launcher: checks, allocation, dispatch, launch geometry and stream (the
// kernels and what they compute: kernels/shard_pass.cuh; semantics: csrc/registration.cpp).
// Compiled twice: by nvcc for the GPU and, with TD_EMULATE, by g++ against the CUDA emulator
// (csrc/emu/shard_pass_emu.cpp); host_runtime.h is the difference.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../ops.h"
#include "host_runtime.h"
#include "kernels/shard_pass.cuh"

TD_CUDA_NAMESPACE_BEGIN
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> shard_pass_cuda(const at::Tensor& logits,
                                                              const at::Tensor& teacher_ids,
                                                              int64_t vocab_start,
                                                              double inv_temperature) {
  check_logits_and_ids(logits, teacher_ids);
  TORCH_CHECK_VALUE(logits.size(1) > 0, "logits must have at least one vocab column");
  const DeviceGuard guard(logits.device());
  const int64_t N = logits.size(0), V = logits.size(1), K = teacher_ids.size(1);
  const auto opts = logits.options().dtype(acc_dtype(logits.scalar_type()));
  at::Tensor row_max = device_empty({N}, opts);
  at::Tensor sums = device_empty({N, 3}, opts);
  at::Tensor gathered = device_empty({N, K}, opts);
  if (N == 0) return {row_max, sums, gathered};

  const RowSplit rs = choose_row_split(N, V, sm_count(logits.device()));
  at::Tensor partials;
  if (rs.splits > 1) partials = device_empty({N, rs.splits, 3}, opts);
  const Stream stream = current_stream(logits.device());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "shard_pass_cuda", [&] {
    using acc_t = acc_of<scalar_t>;
    AT_DISPATCH_INDEX_TYPES(teacher_ids.scalar_type(), "shard_pass_cuda_ids", [&] {
      ShardArgs<scalar_t, index_t> a{};
      a.logits = logits.const_data_ptr<scalar_t>();
      a.row_stride = logits.stride(0);
      a.N = N;
      a.V = V;
      a.K = K;
      a.ids = teacher_ids.const_data_ptr<index_t>();
      a.vocab_start = vocab_start;
      a.inv_t = static_cast<acc_t>(inv_temperature);
      a.splits = rs.splits;
      a.chunk = rs.chunk;
      a.bitmap_words = bitmap_words(std::min(rs.chunk, V));
      a.row_max = row_max.mutable_data_ptr<acc_t>();
      a.sums = sums.mutable_data_ptr<acc_t>();
      a.gathered = gathered.mutable_data_ptr<acc_t>();
      a.partials = rs.splits > 1 ? partials.mutable_data_ptr<acc_t>() : nullptr;
      const int threads = threads_for(std::min(rs.chunk, V), vec_of<scalar_t>());
      const size_t smem = static_cast<size_t>(a.bitmap_words) * sizeof(uint32_t);
      const unsigned grid = grid_for(N * rs.splits);
      if (rs.splits > 1) {
        TD_LAUNCH(grid, threads, smem, stream, kShardPassMaxThreads,
                  shard_pass_kernel<scalar_t, index_t, true>)(a);
        check_launch();
        TD_LAUNCH(grid_for(N), kShardCombineThreads, 0, stream, kShardCombineThreads,
                  shard_combine_kernel<scalar_t, index_t>)(a);
        check_launch();
      } else {
        TD_LAUNCH(grid, threads, smem, stream, kShardPassMaxThreads,
                  shard_pass_kernel<scalar_t, index_t, false>)(a);
        check_launch();
      }
    });
  });
  return {row_max, sums, gathered};
}

}  // namespace
TD_CUDA_NAMESPACE_END

TORCH_LIBRARY_IMPL(TD_OPS_NAMESPACE, TD_DISPATCH_KEY, m) {
  m.impl("shard_pass", &topk_distill::cuda::shard_pass_cuda);
}
