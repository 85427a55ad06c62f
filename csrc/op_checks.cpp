#include "ops.h"

#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>

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
  if (name == "sampled") return Support::kSampled;
  if (name == "generalized") return Support::kGeneralized;
  TORCH_CHECK_VALUE(false, "support must be one of topk, renorm, tail, sampled, generalized; got '",
                    name, "'");
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

LossTerms loss_terms_from_args(c10::ArrayRef<std::string> loss, c10::ArrayRef<std::string> support,
                               c10::ArrayRef<double> weight, c10::ArrayRef<double> beta,
                               c10::ArrayRef<double> rkl_ratio, c10::ArrayRef<double> skew,
                               std::optional<double> log_prob_min_clamp, double loss_scale) {
  const size_t n = loss.size();
  TORCH_CHECK_VALUE(n >= 1, "loss must name at least one term");
  TORCH_CHECK_VALUE(support.size() == n && weight.size() == n && beta.size() == n &&
                        rkl_ratio.size() == n && skew.size() == n,
                    "loss, support, weight, beta, rkl_ratio and skew must be lists of one length "
                    "(one entry per term); got ", n, ", ", support.size(), ", ", weight.size(), ", ",
                    beta.size(), ", ", rkl_ratio.size(), ", ", skew.size());
  LossTerms terms{};
  terms.count = 0;
  terms.any_renorm = false;
  terms.any_sampled = false;
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(std::isfinite(weight[i]), "weight[", i, "] must be finite; got ", weight[i]);
    // Parsed (and so checked) even when the weight is 0: a bad name is never silently ignored.
    const LossParams p = loss_params_from_args(loss[i], support[i], beta[i], rkl_ratio[i], skew[i],
                                               log_prob_min_clamp, loss_scale);
    if (weight[i] == 0.0) continue;  // dropped exactly: an infinite term times 0 is not NaN
    TORCH_CHECK_VALUE(terms.count < kMaxLossTerms, "at most ", kMaxLossTerms,
                      " loss terms of nonzero weight; got more");
    terms.term[terms.count] = p;
    terms.weight[terms.count] = weight[i];
    terms.any_renorm |= p.support == Support::kRenorm;
    terms.any_sampled |= p.support == Support::kSampled;
    ++terms.count;
  }
  if (terms.count == 0) {  // every weight 0: the loss is 0; keep one term for the shared params
    terms.term[0] = loss_params_from_args(loss[0], support[0], beta[0], rkl_ratio[0], skew[0],
                                          log_prob_min_clamp, loss_scale);
  }
  return terms;
}

RowLayout check_logits_and_ids(const at::Tensor& logits, const at::Tensor& teacher_ids) {
  TORCH_CHECK_VALUE(logits.dim() == 2 || logits.dim() == 3,
                    "logits must be 2-D [N, V_r] or 3-D [B, T, V_r]; got ", logits.sizes());
  TORCH_CHECK_VALUE(teacher_ids.dim() == 2, "teacher_ids must be 2-D [N, K]; got ",
                    teacher_ids.sizes());
  RowLayout l{};
  l.V = logits.size(-1);
  l.T = logits.size(-2);
  l.N = logits.dim() == 3 ? logits.size(0) * l.T : l.T;
  l.inner_stride = logits.stride(-2);
  l.outer_stride = logits.dim() == 3 ? logits.stride(0) : 0;
  if (l.T == 0) l.T = 1;  // N = 0: no row is ever addressed
  TORCH_CHECK_VALUE(l.N == teacher_ids.size(0),
                    "logits and teacher_ids must have the same number of rows; got ", l.N, " and ",
                    teacher_ids.size(0));
  TORCH_CHECK_VALUE(l.V == 1 || logits.stride(-1) == 1,
                    "logits must have unit stride along the vocab dim");
  TORCH_CHECK_TYPE(teacher_ids.scalar_type() == at::kInt || teacher_ids.scalar_type() == at::kLong,
                   "teacher_ids must be int32 or int64; got ", teacher_ids.scalar_type());
  const auto t = logits.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble,
                   "logits must be float32, bfloat16, float16 or float64; got ", t);
  TORCH_CHECK_VALUE(teacher_ids.is_contiguous(), "teacher_ids must be contiguous");
  TORCH_CHECK_VALUE(logits.device() == teacher_ids.device(),
                    "logits and teacher_ids must be on the same device");
  return l;
}

void check_labels(const std::optional<at::Tensor>& labels, int64_t N, const at::Device& device) {
  if (!labels.has_value()) return;
  TORCH_CHECK_VALUE(labels->dim() == 1 && labels->size(0) == N && labels->is_contiguous(),
                    "labels must be a contiguous [N] tensor with N = ", N, "; got ",
                    labels->sizes());
  TORCH_CHECK_TYPE(labels->scalar_type() == at::kInt || labels->scalar_type() == at::kLong,
                   "labels must be int32 or int64; got ", labels->scalar_type());
  TORCH_CHECK_VALUE(labels->device() == device, "labels must be on ", device, "; got ",
                    labels->device());
}

void check_row_grad(const std::optional<at::Tensor>& grad, const char* name, int64_t N,
                    at::ScalarType acc, const at::Device& device) {
  if (!grad.has_value()) return;
  TORCH_CHECK_VALUE(grad->dim() == 1 && grad->size(0) == N && grad->is_contiguous(), name,
                    " must be a contiguous [N] tensor; got ", grad->sizes());
  TORCH_CHECK_TYPE(grad->scalar_type() == acc, name, " must be in the accumulation dtype (", acc,
                   ")");
  TORCH_CHECK_VALUE(grad->device() == device, name, " must be on ", device);
}

void check_epilogue_args(const at::Tensor& row_max, const at::Tensor& sums,
                         const at::Tensor& gathered, const at::Tensor& teacher_ids,
                         const at::Tensor& teacher_logprobs, const std::optional<at::Tensor>& mask,
                         const std::optional<at::Tensor>& labels) {
  TORCH_CHECK_VALUE(teacher_ids.dim() == 2 && teacher_ids.is_contiguous(),
                    "teacher_ids must be a contiguous [N, K] tensor");
  const int64_t N = teacher_ids.size(0), K = teacher_ids.size(1);
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
  TORCH_CHECK_VALUE(sums.dim() == 2 && sums.size(0) == N && sums.size(1) == kShardSums &&
                        sums.is_contiguous() && sums.scalar_type() == acc,
                    "sums must be contiguous [N, ", kShardSums, "] in row_max's dtype");
  const int64_t L = labels.has_value() ? 1 : 0;
  TORCH_CHECK_VALUE(gathered.dim() == 2 && gathered.size(0) == N && gathered.size(1) == K + L &&
                        gathered.is_contiguous() && gathered.scalar_type() == acc,
                    "gathered must be contiguous [N, K", (L ? " + 1" : ""), "] in row_max's dtype");
  if (mask.has_value()) {
    TORCH_CHECK_VALUE(mask->dim() == 1 && mask->size(0) == N && mask->is_contiguous() &&
                          mask->scalar_type() == at::kBool,
                      "mask must be a contiguous bool [N] tensor");
    TORCH_CHECK_VALUE(mask->device() == row_max.device(), "mask must be on ", row_max.device(),
                      " like the other epilogue inputs; got ", mask->device());
  }
  check_labels(labels, N, row_max.device());
  for (const at::Tensor* t : {&sums, &gathered, &teacher_ids, &teacher_logprobs}) {
    TORCH_CHECK_VALUE(t->device() == row_max.device(), "epilogue inputs must share one device");
  }
}

void check_sampled_args(const LossTerms& terms, const at::Tensor& row_max,
                        const std::optional<at::Tensor>& labels,
                        const std::optional<at::Tensor>& label_teacher_logprobs,
                        const std::optional<at::Tensor>& label_sample_logprobs,
                        std::optional<double> sample_weight_clip) {
  if (!terms.any_sampled) return;
  TORCH_CHECK_VALUE(labels.has_value(), "support=sampled needs labels (the sampled tokens)");
  TORCH_CHECK_VALUE(label_teacher_logprobs.has_value(),
                    "support=sampled needs label_teacher_logprobs (log p_y)");
  const int64_t N = row_max.size(0);
  for (const auto* t : {&label_teacher_logprobs, &label_sample_logprobs}) {
    if (!t->has_value()) continue;
    TORCH_CHECK_VALUE((*t)->dim() == 1 && (*t)->size(0) == N && (*t)->is_contiguous() &&
                          (*t)->scalar_type() == at::kDouble &&
                          (*t)->device() == row_max.device(),
                      "label_teacher_logprobs / label_sample_logprobs must be contiguous float64 "
                      "[N] tensors on ", row_max.device(), "; got ", (*t)->sizes(), " ",
                      (*t)->scalar_type());
  }
  TORCH_CHECK_VALUE(!sample_weight_clip.has_value() || *sample_weight_clip > 0.0,
                    "sample_weight_clip must be > 0");
}

RowLayout check_backward_args(const at::Tensor& logits, const at::Tensor& teacher_ids,
                              const std::optional<at::Tensor>& labels, const at::Tensor& row_max,
                              const at::Tensor& row_coefs, const at::Tensor& grad_logprobs,
                              const at::Tensor& grad_rows,
                              const std::optional<at::Tensor>& grad_label,
                              const std::optional<at::Tensor>& grad_entropy) {
  const RowLayout l = check_logits_and_ids(logits, teacher_ids);
  const int64_t N = l.N, K = teacher_ids.size(1);
  const auto acc = acc_dtype(logits.scalar_type());
  for (const at::Tensor* t : {&row_max, &grad_rows}) {
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == N && t->is_contiguous(),
                      "row_max and grad_rows must be contiguous [N] tensors");
  }
  TORCH_CHECK_TYPE(row_max.scalar_type() == acc && grad_rows.scalar_type() == acc,
                   "row_max and grad_rows must be in the accumulation dtype (", acc, ")");
  TORCH_CHECK_VALUE(row_coefs.dim() == 2 && row_coefs.size(0) == N &&
                        row_coefs.size(1) == kRowCoefs && row_coefs.is_contiguous(),
                    "row_coefs must be a contiguous [N, ", kRowCoefs, "] tensor");
  TORCH_CHECK_TYPE(row_coefs.scalar_type() == at::kDouble, "row_coefs must be float64");
  TORCH_CHECK_VALUE(grad_logprobs.dim() == 2 && grad_logprobs.size(0) == N &&
                        grad_logprobs.size(1) == K && grad_logprobs.is_contiguous(),
                    "grad_logprobs must be a contiguous [N, K] tensor");
  TORCH_CHECK_TYPE(grad_logprobs.scalar_type() == at::kDouble, "grad_logprobs must be float64");
  check_labels(labels, N, logits.device());
  check_row_grad(grad_label, "grad_label", N, acc, logits.device());
  check_row_grad(grad_entropy, "grad_entropy", N, acc, logits.device());
  for (const at::Tensor* t : {&row_max, &row_coefs, &grad_logprobs, &grad_rows}) {
    TORCH_CHECK_VALUE(t->device() == logits.device(), "backward inputs must share one device");
  }
  return l;
}

namespace {

// Rows at i * s0 + j * s1 (0 <= i < b, 0 <= j < t), each `span` elements long, with b, t > 1 and
// s0, s1 >= span: do two distinct rows share memory? Exact; O(min(b, t)) (topk_distill/_layout.py
// rows_overlap is the same rule, with the derivation).
bool two_stride_overlap(int64_t b, int64_t s0, int64_t t, int64_t s1, int64_t span) {
  if (s0 >= (t - 1) * s1 + span || s1 >= (b - 1) * s0 + span) return false;  // nested layouts
  if (b > t) {
    std::swap(b, t);
    std::swap(s0, s1);
  }
  for (int64_t di = 1; di < b; ++di) {
    const int64_t x = di * s0, q = x / s1;
    for (int64_t dj : {-q, -q - 1}) {
      dj = std::max(dj, -(t - 1));
      if (std::llabs(x + dj * s1) < span) return true;
    }
  }
  return false;
}

}  // namespace

void check_no_row_overlap(const at::Tensor& logits, const RowLayout& l) {
  if (l.N <= 1 || l.V == 0) return;
  const at::MemOverlap quick = at::has_internal_overlap(logits);
  bool overlap = quick == at::MemOverlap::Yes;
  if (quick == at::MemOverlap::TooHard) {
    // (the elements of a row are distinct: unit stride) rows collide along a leading dim whose
    // stride is below a row's span, or through interleaved strides
    const int64_t B = l.N / l.T;
    std::vector<std::pair<int64_t, int64_t>> dims;
    if (B > 1) dims.push_back({B, l.outer_stride});
    if (l.T > 1) dims.push_back({l.T, l.inner_stride});
    for (const auto& [size, stride] : dims) overlap |= std::llabs(stride) < l.V;
    if (!overlap && dims.size() == 2) {
      overlap = two_stride_overlap(dims[0].first, std::llabs(dims[0].second), dims[1].first,
                                   std::llabs(dims[1].second), l.V);
    }
  }
  TORCH_CHECK_VALUE(!overlap,
                    "inplace_backward: the rows of logits overlap in memory (e.g. an expand, stride "
                    "0); the gradient cannot be written into them. Pass logits.contiguous() or "
                    "inplace_backward=False");
}

}  // namespace topk_distill
