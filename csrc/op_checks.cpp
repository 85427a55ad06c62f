#include "ops.h"

#include <c10/util/Exception.h>

namespace topk_distill {

at::ScalarType acc_dtype(at::ScalarType logits_dtype) {
  return logits_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

static Divergence parse_divergence(const std::string& name) {
  if (name == "fkl") return Divergence::kFKL;
  if (name == "rkl") return Divergence::kRKL;
  if (name == "jsd") return Divergence::kJSD;
  if (name == "fkl+rkl") return Divergence::kFKLRKL;
  if (name == "tvd") return Divergence::kTVD;
  if (name == "skl") return Divergence::kSKL;
  if (name == "srkl") return Divergence::kSRKL;
  TORCH_CHECK_VALUE(false, "loss must be one of fkl, rkl, jsd, fkl+rkl, tvd, skl, srkl; got '",
                    name, "'");
}

static Support parse_support(const std::string& name) {
  if (name == "topk") return Support::kTopK;
  if (name == "renorm") return Support::kRenorm;
  if (name == "tail") return Support::kTail;
  TORCH_CHECK_VALUE(false, "support must be one of topk, renorm, tail; got '", name, "'");
}

LossParams loss_params_from_args(const std::string& loss, const std::string& support, double beta,
                                 double rkl_ratio, double skew,
                                 std::optional<double> log_prob_min_clamp, double loss_scale) {
  TORCH_CHECK_VALUE(beta >= 0.0 && beta <= 1.0, "beta must be in [0, 1]; got ", beta);
  TORCH_CHECK_VALUE(rkl_ratio >= 0.0 && rkl_ratio <= 1.0, "rkl_ratio must be in [0, 1]; got ",
                    rkl_ratio);
  TORCH_CHECK_VALUE(skew >= 0.0 && skew <= 1.0, "skew must be in [0, 1]; got ", skew);
  TORCH_CHECK_VALUE(std::isfinite(loss_scale), "loss_scale must be finite; got ", loss_scale);
  const bool has_clamp = log_prob_min_clamp.has_value();
  const double clamp = has_clamp ? *log_prob_min_clamp : 0.0;
  TORCH_CHECK_VALUE(!has_clamp || !(clamp > 0.0 || clamp != clamp),
                    "log_prob_min_clamp must be <= 0; got ", clamp);
  return make_loss_params(parse_divergence(loss), parse_support(support), beta, rkl_ratio, skew,
                          has_clamp, clamp, loss_scale);
}

void check_logits_and_ids(const at::Tensor& logits, const at::Tensor& teacher_ids) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "logits must be 2-D [N, V_r]; got ", logits.sizes());
  TORCH_CHECK_VALUE(teacher_ids.dim() == 2, "teacher_ids must be 2-D [N, K]; got ",
                    teacher_ids.sizes());
  TORCH_CHECK_VALUE(logits.size(0) == teacher_ids.size(0),
                    "logits and teacher_ids must have the same number of rows; got ",
                    logits.size(0), " and ", teacher_ids.size(0));
  TORCH_CHECK_VALUE(logits.size(1) == 1 || logits.stride(1) == 1,
                    "logits must have unit stride along the vocab dim");
  TORCH_CHECK_TYPE(teacher_ids.scalar_type() == at::kInt || teacher_ids.scalar_type() == at::kLong,
                   "teacher_ids must be int32 or int64; got ", teacher_ids.scalar_type());
  const auto t = logits.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble,
                   "logits must be float32, bfloat16, float16 or float64; got ", t);
  TORCH_CHECK_VALUE(teacher_ids.is_contiguous(), "teacher_ids must be contiguous");
  TORCH_CHECK_VALUE(logits.device() == teacher_ids.device(),
                    "logits and teacher_ids must be on the same device");
}

void check_epilogue_args(const at::Tensor& row_max, const at::Tensor& sums,
                         const at::Tensor& gathered, const at::Tensor& teacher_ids,
                         const at::Tensor& teacher_logprobs, const std::optional<at::Tensor>& mask) {
  const int64_t N = teacher_ids.size(0);
  TORCH_CHECK_VALUE(teacher_ids.dim() == 2 && teacher_ids.is_contiguous(),
                    "teacher_ids must be a contiguous [N, K] tensor");
  const int64_t K = teacher_ids.size(1);
  TORCH_CHECK_TYPE(teacher_ids.scalar_type() == at::kInt || teacher_ids.scalar_type() == at::kLong,
                   "teacher_ids must be int32 or int64");
  TORCH_CHECK_VALUE(teacher_logprobs.sizes() == teacher_ids.sizes() &&
                        teacher_logprobs.is_contiguous(),
                    "teacher_logprobs must be a contiguous tensor shaped like teacher_ids");
  TORCH_CHECK_TYPE(at::isFloatingType(teacher_logprobs.scalar_type()),
                   "teacher_logprobs must be floating point");
  const auto acc = row_max.scalar_type();
  TORCH_CHECK_TYPE(acc == at::kFloat || acc == at::kDouble, "row_max must be float32 or float64");
  TORCH_CHECK_VALUE(row_max.dim() == 1 && row_max.size(0) == N && row_max.is_contiguous(),
                    "row_max must be contiguous [N]");
  TORCH_CHECK_VALUE(sums.dim() == 2 && sums.size(0) == N && sums.size(1) == 3 &&
                        sums.is_contiguous() && sums.scalar_type() == acc,
                    "sums must be contiguous [N, 3] in row_max's dtype");
  TORCH_CHECK_VALUE(gathered.dim() == 2 && gathered.size(0) == N && gathered.size(1) == K &&
                        gathered.is_contiguous() && gathered.scalar_type() == acc,
                    "gathered must be contiguous [N, K] in row_max's dtype");
  if (mask.has_value()) {
    TORCH_CHECK_VALUE(mask->dim() == 1 && mask->size(0) == N && mask->is_contiguous() &&
                          mask->scalar_type() == at::kBool,
                      "mask must be a contiguous bool [N] tensor");
  }
  for (const at::Tensor* t : {&sums, &gathered, &teacher_ids, &teacher_logprobs}) {
    TORCH_CHECK_VALUE(t->device() == row_max.device(), "epilogue inputs must share one device");
  }
}

void check_backward_args(const at::Tensor& logits, const at::Tensor& teacher_ids,
                         const at::Tensor& row_max, const at::Tensor& row_coefs,
                         const at::Tensor& grad_logprobs, const at::Tensor& grad_rows) {
  check_logits_and_ids(logits, teacher_ids);
  const int64_t N = logits.size(0), K = teacher_ids.size(1);
  const auto acc = acc_dtype(logits.scalar_type());
  for (const at::Tensor* t : {&row_max, &grad_rows}) {
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == N && t->is_contiguous(),
                      "row_max and grad_rows must be contiguous [N] tensors");
  }
  TORCH_CHECK_TYPE(row_max.scalar_type() == acc && grad_rows.scalar_type() == acc,
                   "row_max and grad_rows must be in the accumulation dtype (", acc, ")");
  TORCH_CHECK_VALUE(row_coefs.dim() == 2 && row_coefs.size(0) == N && row_coefs.size(1) == 3 &&
                        row_coefs.is_contiguous(),
                    "row_coefs must be a contiguous [N, 3] tensor");
  TORCH_CHECK_TYPE(row_coefs.scalar_type() == at::kDouble, "row_coefs must be float64");
  TORCH_CHECK_VALUE(grad_logprobs.dim() == 2 && grad_logprobs.size(0) == N &&
                        grad_logprobs.size(1) == K && grad_logprobs.is_contiguous(),
                    "grad_logprobs must be a contiguous [N, K] tensor");
  TORCH_CHECK_TYPE(grad_logprobs.scalar_type() == at::kDouble, "grad_logprobs must be float64");
  for (const at::Tensor* t : {&row_max, &row_coefs, &grad_logprobs, &grad_rows}) {
    TORCH_CHECK_VALUE(t->device() == logits.device(), "backward inputs must share one device");
  }
}

}  // namespace topk_distill
