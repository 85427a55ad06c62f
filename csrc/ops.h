// Host-side pieces shared by the CPU and CUDA implementations of the ops: argument checks
// (the Python API checks first with friendlier messages; these guard direct torch.ops calls),
// the logits' row layout, the loss-term parsing and the accumulation dtype.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>

#include <string>
#include <vector>

#include "divergences.h"

namespace topk_distill {

// fp64 logits accumulate in fp64, everything else in fp32.
at::ScalarType acc_dtype(at::ScalarType logits_dtype);

// The epilogue's loss terms (parallel lists, one entry per term; terms of weight 0 dropped).
LossTerms loss_terms_from_args(c10::ArrayRef<std::string> loss, c10::ArrayRef<std::string> support,
                               c10::ArrayRef<double> weight, c10::ArrayRef<double> beta,
                               c10::ArrayRef<double> rkl_ratio, c10::ArrayRef<double> skew,
                               std::optional<double> log_prob_min_clamp, double loss_scale);

// Where row n of the logits starts: [N, V] or [B, T, V] with any leading strides (SPEC 9.1).
// Row n = (b, t) = (n / T, n % T) begins at data + b * outer_stride + t * inner_stride.
struct RowLayout {
  int64_t N;             // rows, B * T
  int64_t T;             // rows per outer index (N for 2-D logits)
  int64_t outer_stride;  // stride(0) of 3-D logits (0 for 2-D)
  int64_t inner_stride;  // stride(-2)
  int64_t V;             // columns
  int64_t offset(int64_t n) const { return (n / T) * outer_stride + (n % T) * inner_stride; }
};

// logits [N, V_r] or [B, T, V_r] with unit column stride; teacher_ids [N, K] contiguous
// int32/int64 with N the logits' rows.
RowLayout check_logits_and_ids(const at::Tensor& logits, const at::Tensor& teacher_ids);

// labels: None or a contiguous int32/int64 [N] on the logits' device.
void check_labels(const std::optional<at::Tensor>& labels, int64_t N, const at::Device& device);

// An upstream gradient of a per-row output: None or a contiguous [N] tensor in `acc`.
void check_row_grad(const std::optional<at::Tensor>& grad, const char* name, int64_t N,
                    at::ScalarType acc, const at::Device& device);

void check_epilogue_args(const at::Tensor& row_max, const at::Tensor& sums,
                         const at::Tensor& gathered, const at::Tensor& teacher_ids,
                         const at::Tensor& teacher_logprobs, const std::optional<at::Tensor>& mask,
                         const std::optional<at::Tensor>& labels);

// The sampled support's inputs (SPEC 10.2): with a sampled term, labels and
// label_teacher_logprobs are required; both label log-prob tensors are contiguous f64 [N] on
// row_max's device; the clip is > 0.
void check_sampled_args(const LossTerms& terms, const at::Tensor& row_max,
                        const std::optional<at::Tensor>& labels,
                        const std::optional<at::Tensor>& label_teacher_logprobs,
                        const std::optional<at::Tensor>& label_sample_logprobs,
                        std::optional<double> sample_weight_clip);

// Row n's SampledLabel (divergences.h) from the epilogue's inputs; `sampled` false: none.
template <typename acc_t>
inline SampledLabel sampled_label_of(bool sampled, bool counted, int64_t label, acc_t label_x,
                                     const double* teacher_lp, const double* sample_lp,
                                     std::optional<double> clip, bool drop_nan, int64_t n) {
  if (!sampled || !counted || label < 0) return no_sampled_label();
  return {true, label, to_double(label_x), teacher_lp[n], sample_lp != nullptr,
          sample_lp != nullptr ? sample_lp[n] : 0.0, clip.has_value(), clip.value_or(0.0),
          drop_nan};
}

RowLayout check_backward_args(const at::Tensor& logits, const at::Tensor& teacher_ids,
                              const std::optional<at::Tensor>& labels, const at::Tensor& row_max,
                              const at::Tensor& row_coefs, const at::Tensor& grad_logprobs,
                              const at::Tensor& grad_rows,
                              const std::optional<at::Tensor>& grad_label,
                              const std::optional<at::Tensor>& grad_entropy);

// backward_: the gradient is written through the logits' strides, so no two rows may share
// memory (as PyTorch's own in-place ops refuse internal overlap).
void check_no_row_overlap(const at::Tensor& logits, const RowLayout& layout);

// The shapes of shard_pass's outputs (the fake kernels in ops.py mirror them).
constexpr int64_t kShardSums = 5;
constexpr int64_t kRowCoefs = 7;

}  // namespace topk_distill
