// CPU epilogue: per-row loss, masses and g = dL/ds from the global row statistics.
//
// Memory traffic: O(N * K * terms) - reads the gathered logits, ids and teacher log-probs,
// writes g. Work split: rows across threads (at::parallel_for); each row is one SerialLanes call
// of the shared driver in divergences.h (epilogue_row, row_extras), in double precision.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

#include "../ops.h"

namespace topk_distill {
namespace cpu {
namespace {

template <typename acc_t, typename id_t, typename lp_t, typename label_t>
void epilogue_kernel(const LossTerms& terms, const at::Tensor& row_max, const at::Tensor& sums,
                     const at::Tensor& gathered, const at::Tensor& ids, const at::Tensor& lp,
                     const bool* mask, const label_t* labels, int64_t vocab_size,
                     bool with_entropy, const double* label_teacher_lp,
                     const double* label_sample_lp, std::optional<double> clip, bool drop_nan,
                     at::Tensor& loss, at::Tensor& student_mass,
                     at::Tensor& teacher_mass, at::Tensor& label_logprobs, at::Tensor& entropy,
                     at::Tensor& row_coefs, at::Tensor& grad) {
  const int64_t N = ids.size(0), K = ids.size(1), G = gathered.size(1);
  const acc_t* m = row_max.const_data_ptr<acc_t>();
  const acc_t* s = sums.const_data_ptr<acc_t>();
  const acc_t* x = gathered.const_data_ptr<acc_t>();
  const id_t* id = ids.const_data_ptr<id_t>();
  const lp_t* l = lp.const_data_ptr<lp_t>();
  acc_t* loss_out = loss.mutable_data_ptr<acc_t>();
  float* q_out = student_mass.mutable_data_ptr<float>();
  float* p_out = teacher_mass.mutable_data_ptr<float>();
  acc_t* label_out = label_logprobs.mutable_data_ptr<acc_t>();
  acc_t* entropy_out = entropy.mutable_data_ptr<acc_t>();
  double* coefs_out = row_coefs.mutable_data_ptr<double>();
  double* g = grad.mutable_data_ptr<double>();
  // ~64K entry-terms per task: a [512, 64] batch stays on one thread, where waking a second one
  // (busy elsewhere) would cost more than the whole epilogue (measured: ~7 ms on a loaded 2-core
  // VM, against 1-2 ms of work).
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(K * terms.count, 1));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    std::vector<double> scratch(terms.any_renorm ? 2 * K : 0);
    for (int64_t n = begin; n < end; ++n) {
      const acc_t* sn = s + kShardSums * n;
      const RowStats st{static_cast<double>(m[n]), static_cast<double>(sn[0]),
                        static_cast<double>(sn[1]), static_cast<double>(sn[2]),
                        static_cast<double>(sn[3]), static_cast<double>(sn[4])};
      const bool counted = mask == nullptr || mask[n];
      const int64_t label = labels != nullptr ? static_cast<int64_t>(labels[n]) : -1;
      const SampledLabel sampled =
          sampled_label_of(terms.any_sampled, counted, label, labels != nullptr ? x[n * G + K]
                                                                               : acc_t(0),
                           label_teacher_lp, label_sample_lp, clip, drop_nan, n);
      const RowResult r = epilogue_row(SerialLanes{}, terms, K, st, counted, vocab_size,
                                       x + n * G, id + n * K, l + n * K, g + n * K,
                                       terms.any_renorm ? scratch.data() : nullptr, sampled);
      const RowExtras e = row_extras(st, r.log_sum, counted, labels != nullptr,
                                     labels != nullptr ? static_cast<int64_t>(labels[n]) : -1,
                                     vocab_size, labels != nullptr ? x[n * G + K] : acc_t(0),
                                     with_entropy);
      loss_out[n] = static_cast<acc_t>(r.loss);
      q_out[n] = static_cast<float>(r.student_mass);
      p_out[n] = static_cast<float>(r.teacher_mass);
      label_out[n] = static_cast<acc_t>(e.label_logprob);
      entropy_out[n] = static_cast<acc_t>(e.entropy);
      write_row_coefs(coefs_out + kRowCoefs * n, r, e);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
epilogue_cpu(const at::Tensor& row_max, const at::Tensor& sums, const at::Tensor& gathered,
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
  const double* lt_ptr = terms.any_sampled ? label_teacher_logprobs->const_data_ptr<double>()
                                           : nullptr;
  const double* ls_ptr = terms.any_sampled && label_sample_logprobs.has_value()
                             ? label_sample_logprobs->const_data_ptr<double>()
                             : nullptr;
  const int64_t N = teacher_ids.size(0), K = teacher_ids.size(1);
  const auto acc_opts = row_max.options();
  at::Tensor loss_rows = at::empty({N}, acc_opts);
  at::Tensor student_mass = at::empty({N}, acc_opts.dtype(at::kFloat));
  at::Tensor teacher_mass = at::empty({N}, acc_opts.dtype(at::kFloat));
  at::Tensor label_logprobs = at::empty({N}, acc_opts);
  at::Tensor entropy = at::empty({N}, acc_opts);
  at::Tensor row_coefs = at::empty({N, kRowCoefs}, acc_opts.dtype(at::kDouble));
  at::Tensor grad = at::empty({N, K}, acc_opts.dtype(at::kDouble));
  if (N == 0) {
    return {loss_rows, student_mass, teacher_mass, label_logprobs, entropy, row_coefs, grad};
  }
  const bool* mask_ptr = mask.has_value() ? mask->const_data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(row_max.scalar_type(), "epilogue_cpu", [&] {
    using acc_t = scalar_t;
    AT_DISPATCH_INDEX_TYPES(teacher_ids.scalar_type(), "epilogue_cpu_ids", [&] {
      using id_t = index_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, teacher_logprobs.scalar_type(),
                                      "epilogue_cpu_lp", [&] {
        using lp_t = scalar_t;
        if (labels.has_value() && labels->scalar_type() == at::kInt) {
          epilogue_kernel<acc_t, id_t, lp_t, int32_t>(
              terms, row_max, sums, gathered, teacher_ids, teacher_logprobs, mask_ptr,
              labels->const_data_ptr<int32_t>(), vocab_size, with_entropy, lt_ptr, ls_ptr,
              sample_weight_clip, drop_missing_label, loss_rows,
              student_mass, teacher_mass, label_logprobs, entropy, row_coefs, grad);
        } else {
          epilogue_kernel<acc_t, id_t, lp_t, int64_t>(
              terms, row_max, sums, gathered, teacher_ids, teacher_logprobs, mask_ptr,
              labels.has_value() ? labels->const_data_ptr<int64_t>() : nullptr, vocab_size,
              with_entropy, lt_ptr, ls_ptr, sample_weight_clip, drop_missing_label, loss_rows, student_mass, teacher_mass, label_logprobs, entropy,
              row_coefs, grad);
        }
      });
    });
  });
  return {loss_rows, student_mass, teacher_mass, label_logprobs, entropy, row_coefs, grad};
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(topk_distill, CPU, m) { m.impl("epilogue", &cpu::epilogue_cpu); }

}  // namespace topk_distill
