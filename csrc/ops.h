// Host-side pieces shared by the CPU and CUDA implementations of the ops: argument checks
// (the Python API checks first with friendlier messages; these guard direct torch.ops calls),
// the loss-name parsing and the accumulation dtype.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string>

#include "divergences.h"

namespace topk_distill {

// fp64 logits accumulate in fp64, everything else in fp32.
at::ScalarType acc_dtype(at::ScalarType logits_dtype);

LossParams loss_params_from_args(const std::string& loss, const std::string& support, double beta,
                                 double rkl_ratio, double skew,
                                 std::optional<double> log_prob_min_clamp, double loss_scale);

// logits [N, V_r] with unit column stride; teacher_ids [N, K] contiguous int32/int64.
void check_logits_and_ids(const at::Tensor& logits, const at::Tensor& teacher_ids);

void check_epilogue_args(const at::Tensor& row_max, const at::Tensor& sums,
                         const at::Tensor& gathered, const at::Tensor& teacher_ids,
                         const at::Tensor& teacher_logprobs, const std::optional<at::Tensor>& mask);

void check_backward_args(const at::Tensor& logits, const at::Tensor& teacher_ids,
                         const at::Tensor& row_max, const at::Tensor& row_coefs,
                         const at::Tensor& grad_logprobs, const at::Tensor& grad_rows);

}  // namespace topk_distill
