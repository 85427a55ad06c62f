// CUDA epilogue, host launcher: checks, allocation, dispatch and launch (the kernels and what
// they compute: kernels/epilogue.cuh; semantics: csrc/registration.cpp). Compiled by nvcc for
// the GPU and, with TD_EMULATE, by g++ against the CUDA emulator (csrc/emu/epilogue_emu.cpp).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "../ops.h"
#include "host_runtime.h"
#include "kernels/epilogue.cuh"

TD_CUDA_NAMESPACE_BEGIN
namespace {

static_assert(kEpilogueSums == ::topk_distill::kShardSums, "sums layout");
static_assert(kEpilogueRowCoefs == ::topk_distill::kRowCoefs, "row_coefs layout");

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
epilogue_cuda(const at::Tensor& row_max, const at::Tensor& sums, const at::Tensor& gathered,
              const at::Tensor& teacher_ids, const at::Tensor& teacher_logprobs,
              const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& labels,
              int64_t vocab_size, const std::vector<std::string>& loss,
              const std::vector<std::string>& support, c10::ArrayRef<double> weight,
              c10::ArrayRef<double> beta, c10::ArrayRef<double> rkl_ratio,
              c10::ArrayRef<double> skew, std::optional<double> log_prob_min_clamp,
              double loss_scale, bool with_entropy,
              const std::optional<at::Tensor>& label_teacher_logprobs,
              const std::optional<at::Tensor>& label_sample_logprobs,
              std::optional<double> sample_weight_clip, bool drop_missing_label) {
  check_epilogue_args(row_max, sums, gathered, teacher_ids, teacher_logprobs, mask, labels);
  const LossTerms terms = loss_terms_from_args(loss, support, weight, beta, rkl_ratio, skew,
                                               log_prob_min_clamp, loss_scale);
  check_sampled_args(terms, row_max, labels, label_teacher_logprobs, label_sample_logprobs,
                     sample_weight_clip);
  const DeviceGuard guard(row_max.device());
  const int64_t N = teacher_ids.size(0), K = teacher_ids.size(1);
  const auto acc_opts = row_max.options();
  at::Tensor loss_rows = device_empty({N}, acc_opts);
  at::Tensor student_mass = device_empty({N}, acc_opts.dtype(at::kFloat));
  at::Tensor teacher_mass = device_empty({N}, acc_opts.dtype(at::kFloat));
  at::Tensor label_logprobs = device_empty({N}, acc_opts);
  at::Tensor entropy = device_empty({N}, acc_opts);
  at::Tensor row_coefs = device_empty({N, kRowCoefs}, acc_opts.dtype(at::kDouble));
  at::Tensor grad = device_empty({N, K}, acc_opts.dtype(at::kDouble));
  if (N == 0) {
    return {loss_rows, student_mass, teacher_mass, label_logprobs, entropy, row_coefs, grad};
  }
  const gmem_ptr<const bool> mask_ptr = mask.has_value() ? global_in<bool>(*mask, "mask") : nullptr;
  at::Tensor labels64;
  if (labels.has_value()) labels64 = labels->to(at::kLong);
  const Stream stream = current_stream(row_max.device());

  AT_DISPATCH_FLOATING_TYPES(row_max.scalar_type(), "epilogue_cuda", [&] {
    using acc_t = scalar_t;
    AT_DISPATCH_INDEX_TYPES(teacher_ids.scalar_type(), "epilogue_cuda_ids", [&] {
      using id_t = index_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, teacher_logprobs.scalar_type(),
                                      "epilogue_cuda_lp", [&] {
        using lp_t = scalar_t;
        EpilogueArgs<acc_t, id_t, lp_t> a{};
        a.terms = terms;
        a.N = N;
        a.K = K;
        a.vocab_size = vocab_size;
        a.gathered_cols = gathered.size(1);
        a.with_entropy = with_entropy;
        a.row_max = global_in<acc_t>(row_max, "row_max");
        a.sums = global_in<acc_t>(sums, "sums");
        a.gathered = global_in<acc_t>(gathered, "gathered");
        a.ids = global_in<id_t>(teacher_ids, "teacher_ids");
        a.lp = global_in<lp_t>(teacher_logprobs, "teacher_logprobs");
        a.mask = mask_ptr;
        a.labels = labels.has_value() ? global_in<int64_t>(labels64, "labels") : nullptr;
        a.label_teacher_lp = terms.any_sampled
                                 ? global_in<double>(*label_teacher_logprobs,
                                                     "label_teacher_logprobs")
                                 : nullptr;
        a.label_sample_lp = terms.any_sampled && label_sample_logprobs.has_value()
                                ? global_in<double>(*label_sample_logprobs,
                                                    "label_sample_logprobs")
                                : nullptr;
        a.has_clip = sample_weight_clip.has_value();
        a.clip = sample_weight_clip.value_or(0.0);
        a.drop_missing_label = drop_missing_label;
        a.loss = global_out<acc_t>(loss_rows, "loss_rows");
        a.student_mass = global_out<float>(student_mass, "student_mass");
        a.teacher_mass = global_out<float>(teacher_mass, "teacher_mass");
        a.label_logprobs = global_out<acc_t>(label_logprobs, "label_logprobs");
        a.entropy = global_out<acc_t>(entropy, "entropy");
        a.row_coefs = global_out<double>(row_coefs, "row_coefs");
        a.g = global_out<double>(grad, "grad");
        if (K <= kWarpPathMaxK) {
          const int64_t rows_per_block = kEpilogueThreads / 32;
          const unsigned grid = grid_for((N + rows_per_block - 1) / rows_per_block);
          TD_LAUNCH(grid, kEpilogueThreads, 0, stream, kEpilogueThreads,
                    epilogue_warp_kernel<acc_t, id_t, lp_t>)(a);
        } else {
          TD_LAUNCH(grid_for(N), kEpilogueThreads, 0, stream, kEpilogueThreads,
                    epilogue_block_kernel<acc_t, id_t, lp_t>)(a);
        }
        check_launch();
      });
    });
  });
  return {loss_rows, student_mass, teacher_mass, label_logprobs, entropy, row_coefs, grad};
}

}  // namespace
TD_CUDA_NAMESPACE_END

TORCH_LIBRARY_IMPL(TD_OPS_NAMESPACE, TD_DISPATCH_KEY, m) {
  m.impl("epilogue", &topk_distill::cuda::epilogue_cuda);
}
