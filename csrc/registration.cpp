// The one TORCH_LIBRARY of topk-distill: every op's schema, with what it means.
//
// A loss call is three steps (docs/DESIGN.md):
//   1. shard_pass  - reads this rank's logits once: row max, sums of exp, teacher and label
//                    logits, the entropy sum and the student's top-k when asked.
//   2. epilogue    - after the (optional) TP collectives: per-row loss, masses and
//                    g = dL/ds_k. The only step that knows which divergence it is.
//   3. backward    - reads the logits once, writes the gradient once (or in place).
//
// Shapes: N rows (all leading dims), V_r = this rank's vocab columns, K teacher entries per row.
// "acc" is float32, or float64 when the logits are float64.
//
// The same schemas are defined twice: topk_distill::* (CPU kernels in csrc/cpu/, CUDA kernels in
// csrc/cuda/) and topk_distill_emu::* (the CUDA kernels run on CPU tensors under the CUDA
// emulator, csrc/emu/; what TOPK_DISTILL_EMULATE_CUDA=1 routes the Python API through).
#include <torch/library.h>

namespace {

void define_ops(torch::Library& m) {
  // logits: this rank's shard, [N, V_r] or [B, T, V_r] with ANY strides on the leading dims and
  // a unit column stride (row n = (b, t), b = n / T, t = n % T, starts at b * stride(0) + t *
  // stride(1)): the views training frameworks pass (logits[:, :-1], [1, total, V]) need no copy.
  // teacher_ids [N, K] int32/int64 (negative = padding); labels [N] int32/int64 or None.
  // with_entropy: also accumulate the entropy sum; topk: also select this shard's top-k (0: off).
  // Returns:
  //   row_max   [N] acc     max_v z[n, v] * inv_temperature over this shard (NaN if a logit is)
  //   sums      [N, 5] acc  relative to row_max (e_v = exp(z_v * inv_temperature - row_max)):
  //                         [0] rest: sum of e_v over the shard's columns that are not a valid
  //                             teacher id (kept apart so that the epilogue forms 1 - Q
  //                             without cancellation),
  //                         [1] teach: ... over the distinct teacher columns in this shard,
  //                         [2] dup: ... over the repeated teacher entries (2nd, 3rd... copy),
  //                         [3] the number of distinct teacher columns in this shard (exact up to
  //                             2^24 in fp32): summed over ranks it says whether the teacher's
  //                             ids cover the whole vocabulary (then there is no tail bin),
  //                         [4] with_entropy: sum over ALL columns of e_v * (z_v * inv_temperature
  //                             - row_max), else 0.
  //   gathered  [N, K + L] acc  z[n, id - vocab_start] * inv_temperature for the teacher ids in
  //                         this shard, else 0 (a SUM all-reduce over ranks assembles every
  //                         teacher logit exactly); with labels (L = 1) the label's, likewise.
  //   topk_logits [N, topk] acc  this shard's `topk` largest RAW logits z (not / T), descending,
  //                         ties broken by the lower column; -inf where the shard has fewer.
  //   topk_ids  [N, topk] int64  their global ids (vocab_start + column); -1 where padded.
  m.def(
      "shard_pass(Tensor logits, Tensor teacher_ids, Tensor? labels, int vocab_start,"
      " float inv_temperature, bool with_entropy, int topk)"
      " -> (Tensor row_max, Tensor sums, Tensor gathered, Tensor topk_logits, Tensor topk_ids)");

  // Per-row loss from the global (all-reduced) shard statistics. Runs identically on every rank.
  //   vocab_size: the global V; ids >= vocab_size are ignored and make their row's loss NaN; a
  //   label >= vocab_size makes that row's label_logprobs NaN.
  //   The loss is sum_i weight[i] * L_i over the terms i (SPEC 9.3): loss[i] in fkl | rkl | jsd |
  //   fkl+rkl | tvd | skl | srkl, support[i] in topk | renorm | tail | sampled | generalized,
  //   with that term's beta, rkl_ratio and skew; a term of weight 0 is skipped. loss_scale
  //   multiplies the loss and its gradient (T^2 with t2_scale), not label_logprobs / entropy.
  //   support="sampled" (SPEC 10.2) needs labels (the sampled tokens y) and
  //   label_teacher_logprobs [N] f64 (log p_y); label_sample_logprobs [N] f64 (log mu_y) is
  //   optional (None: mu = the student's own q_y), sample_weight_clip c optional (the weight
  //   min(1/mu_y, c/q_y)); drop_missing_label: a NaN log p_y means no sampled entry (else NaN).
  // Returns loss [N] acc, student_mass [N] f32, teacher_mass [N] f32, label_logprobs [N] acc
  // (z_y / T - LSE; 0 without labels, for an ignored label < 0 or a masked row), entropy [N] acc
  // (-sum_v q_v log q_v with with_entropy, else 0; 0 for a masked row), and for the backward:
  //   row_coefs [N, 7] f64: [0] log_sum = log of the global sum of exp(z/T - row_max)
  //                             (LSE = row_max + log_sum),
  //                         [1] dense_coef, [2] outside_coef (see backward below),
  //                         [3] the entropy H (what its gradient needs),
  //                         [4] label_factor: 1, or 0 where label_logprobs is a constant 0 (no
  //                             labels, ignored label, masked row), NaN for a label >= V,
  //                         [5] entropy_factor: 1, or 0 for a masked row or without entropy,
  //                         [6] label_coef: dL/ds_y of the sampled entry (0 without one); the
  //                             caller adds grad_rows * label_coef to the label's upstream
  //                             gradient, so the backward's label path carries it;
  //   grad_logprobs [N, K] f64: g_k, the direct part of dL/ds_k (0 for padding, invalid entries
  //                             and masked rows), summed over the terms.
  // The dependence of the tail / outside bin on u = 1 - Q (the student's mass off the teacher's
  // entries) is kept out of g: folded into g_k it would be cancelled again at the teacher columns
  // by softmax * sum(g), a ~1e4x loss of precision as Q -> 1 with a teacher tail >> the
  // student's. For the same reason these are float64 whatever the logits; they are O(N * K).
  m.def(
      "epilogue(Tensor row_max, Tensor sums, Tensor gathered, Tensor teacher_ids,"
      " Tensor teacher_logprobs, Tensor? mask, Tensor? labels, int vocab_size, str[] loss,"
      " str[] support, float[] weight, float[] beta, float[] rkl_ratio, float[] skew,"
      " float? log_prob_min_clamp, float loss_scale, bool with_entropy,"
      " Tensor? label_teacher_logprobs=None, Tensor? label_sample_logprobs=None,"
      " float? sample_weight_clip=None, bool drop_missing_label=False)"
      " -> (Tensor loss, Tensor student_mass, Tensor teacher_mass, Tensor label_logprobs,"
      " Tensor entropy, Tensor row_coefs, Tensor grad_logprobs)");

  // The gradient w.r.t. the logits of  grad_rows . loss + grad_label . label_logprobs
  // + grad_entropy . entropy  (the upstream gradients [N] acc; the last two may be None = 0):
  // with s = inv_temperature, q_v = exp(z_v * s - row_max - log_sum), t_v = log q_v,
  //   gl = grad_rows, gy = grad_label * label_factor, gh = grad_entropy * entropy_factor
  //   (a zero upstream gradient contributes 0 even against a NaN factor),
  // dL/dz[n, v] = s * ( gl * sum_{k: t_k = v} g_k + gy [v == y]
  //     - q_v (gl * dense_coef + gy + gh * H)
  //     + gl * outside_coef * q_v ([v is no teacher id] - (m_v - 1) [m_v > 1])
  //     - gh * q_v t_v )
  // with m_v the number of valid teacher entries with id v (duplicates). No communication.
  // Returns a new tensor shaped like the logits (contiguous) in their dtype.
  m.def(
      "backward(Tensor logits, Tensor teacher_ids, Tensor? labels, Tensor row_max,"
      " Tensor row_coefs, Tensor grad_logprobs, Tensor grad_rows, Tensor? grad_label,"
      " Tensor? grad_entropy, int vocab_start, float inv_temperature) -> Tensor");

  // Same, written into the logits' own storage through their strides (inplace_backward=True).
  // Logits whose rows overlap in memory (a stride-0 expand) are refused.
  m.def(
      "backward_(Tensor(a!) logits, Tensor teacher_ids, Tensor? labels, Tensor row_max,"
      " Tensor row_coefs, Tensor grad_logprobs, Tensor grad_rows, Tensor? grad_label,"
      " Tensor? grad_entropy, int vocab_start, float inv_temperature) -> ()");
}

}  // namespace

TORCH_LIBRARY(topk_distill, m) { define_ops(m); }
TORCH_LIBRARY(topk_distill_emu, m) { define_ops(m); }
