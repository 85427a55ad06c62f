// The one TORCH_LIBRARY of topk-distill: every op's schema, with what it means.
//
// A loss call is three steps (see ARCHITECTURE in the README):
//   1. shard_pass  - reads this rank's logits once: row max, sums of exp, teacher logits.
//   2. epilogue    - after the (optional) TP collectives: per-row loss, masses and
//                    g = dL/ds_k. The only step that knows which divergence it is.
//   3. backward    - reads the logits once, writes the gradient once (or in place).
//
// Shapes: N rows, V_r = this rank's vocab columns, K teacher entries per row.
// "acc" is float32, or float64 when the logits are float64.
//
// The same schemas are defined twice: topk_distill::* (CPU kernels in csrc/cpu/, CUDA kernels in
// csrc/cuda/) and topk_distill_emu::* (the CUDA kernels run on CPU tensors under the CUDA
// emulator, csrc/emu/; what TOPK_DISTILL_EMULATE_CUDA=1 routes the Python API through).
#include <torch/library.h>

namespace {

void define_ops(torch::Library& m) {
  // logits [N, V_r] (any row stride, unit column stride), teacher_ids [N, K] int32/int64.
  // Returns, all in acc dtype:
  //   row_max  [N]     max_v logits[n, v] * inv_temperature over this shard
  //   sums     [N, 3]  relative to row_max, i.e. sum of exp(logits * inv_temperature - row_max) over
  //                    [0] the shard's columns that are not a valid teacher id ("rest"),
  //                    [1] the distinct teacher columns in this shard,
  //                    [2] the repeated teacher entries in this shard (2nd, 3rd... copy of an id).
  //                    Keeping "rest" apart lets the epilogue form 1 - Q without cancellation.
  //   gathered [N, K]  logits[n, id - vocab_start] * inv_temperature for ids in this shard, else 0,
  //                    so that a SUM all-reduce over ranks assembles every teacher logit exactly.
  m.def(
      "shard_pass(Tensor logits, Tensor teacher_ids, int vocab_start, float inv_temperature)"
      " -> (Tensor row_max, Tensor sums, Tensor gathered)");

  // Per-row loss from the global (all-reduced) shard statistics. Runs identically on every rank.
  //   vocab_size: the global V; ids >= vocab_size are ignored and make their row's loss NaN.
  //   loss: fkl | rkl | jsd | fkl+rkl | tvd | skl | srkl;  support: topk | renorm | tail.
  //   loss_scale multiplies loss and grad (T^2 when t2_scale).
  // Returns loss [N] acc, student_mass [N] f32, teacher_mass [N] f32, and for the backward:
  //   row_coefs [N, 3] f64: [0] log_sum = log of the global sum of exp(z/T - row_max)
  //                             (LSE = row_max + log_sum),
  //                         [1] dense_coef, [2] outside_coef (see backward below);
  //   grad_logprobs [N, K] f64: g_k, the direct part of dL/ds_k (0 for padding, invalid entries
  //                             and masked rows).
  // The dependence of the tail / outside bin on u = 1 - Q (the student's mass off the teacher's
  // entries) is kept out of g: folded into g_k it would be cancelled again at the teacher columns
  // by softmax * sum(g), a ~1e4x loss of precision as Q -> 1 with a teacher tail >> the
  // student's. For the same reason these are float64 whatever the logits; they are O(N * K).
  m.def(
      "epilogue(Tensor row_max, Tensor sums, Tensor gathered, Tensor teacher_ids,"
      " Tensor teacher_logprobs, Tensor? mask, int vocab_size, str loss, str support,"
      " float beta, float rkl_ratio, float skew, float? log_prob_min_clamp, float loss_scale)"
      " -> (Tensor loss, Tensor student_mass, Tensor teacher_mass, Tensor row_coefs, Tensor grad_logprobs)");

  // dL/dlogits[n, v] = grad_rows[n] * inv_temperature * (
  //     sum_{k: t_k = v} g_k - q_v * dense_coef
  //     + q_v * outside_coef * ([v is no teacher id] - (m_v - 1) [m_v > 1]) )
  // with q_v = exp(logits * inv_temperature - row_max - log_sum) and m_v the number of valid
  // entries with id v (duplicates). Teacher columns are those with a valid id in this shard.
  // No communication. Returns a new [N, V_r] tensor in the logits' dtype.
  m.def(
      "backward(Tensor logits, Tensor teacher_ids, Tensor row_max, Tensor row_coefs,"
      " Tensor grad_logprobs, Tensor grad_rows, int vocab_start, float inv_temperature) -> Tensor");

  // Same, written into the logits' own storage (inplace_backward=True).
  m.def(
      "backward_(Tensor(a!) logits, Tensor teacher_ids, Tensor row_max, Tensor row_coefs,"
      " Tensor grad_logprobs, Tensor grad_rows, int vocab_start, float inv_temperature) -> ()");
}

}  // namespace

TORCH_LIBRARY(topk_distill, m) { define_ops(m); }
TORCH_LIBRARY(topk_distill_emu, m) { define_ops(m); }
