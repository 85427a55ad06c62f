// The per-row mathematics of every loss: one header, compiled unchanged by the C++ compiler
// (CPU kernels) and by nvcc (CUDA kernels).
//
// Everything in here works on ONE row, in double precision, from the row's global statistics
// (after the tensor-parallel collectives): the row max M and the sums of exp(z/T - M) over the
// non-teacher columns ("rest"), the distinct teacher columns and the repeated teacher entries,
// plus the K gathered teacher logits x_k = z_{t_k} / T and the teacher log-probs l_k.
//
// Notation (docs/SPEC.md section 3):
//   log_sum = log(rest + teach)            LSE = M + log_sum
//   s_k = x_k - M - log_sum                student log-prob of teacher token k
//   Q = sum_k exp(s_k), P = sum_k exp(l_k) over valid k (id >= 0), unclamped
//   1 - Q = (rest - dup) / (rest + teach)  computed from the sums, never as 1 - Q, so the
//                                          student's tail has full relative precision as Q -> 1.
//
// Each divergence is a pure function of one bin's (log a, log b) - teacher and student - that
// returns the bin's value, d value / d log b and d value / d b. The row driver combines the bins
// per support (topk | renorm | tail) and produces the loss and g_k = dL/ds_k.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define TD_HD __host__ __device__ __forceinline__
#else
#define TD_HD inline
#endif

namespace topk_distill {

enum class Divergence : int32_t { kFKL = 0, kRKL, kJSD, kFKLRKL, kTVD, kSKL, kSRKL };
enum class Support : int32_t { kTopK = 0, kRenorm, kTail, kSampled, kGeneralized };

// Parameters of one loss call, with the derived constants the bins need.
struct LossParams {
  Divergence divergence;
  Support support;
  double beta;        // JSD mixture weight of the teacher, strictly inside (0, 1) here
  double rkl_ratio;   // fkl+rkl
  double skew;        // skl / srkl lambda
  bool has_clamp;
  double clamp;       // log_prob_min_clamp
  double loss_scale;  // T^2 with t2_scale, else 1
  double log_beta, log_1m_beta, log_skew, log_1m_skew;
  double outside_coeff;  // topk support: the loss adds outside_coeff * (1 - Q)
  double generalized_slope;  // generalized support: each bin adds generalized_slope * (b - a)
};

TD_HD double td_inf() { return std::numeric_limits<double>::infinity(); }
TD_HD double td_nan() { return std::numeric_limits<double>::quiet_NaN(); }

// Builds the derived constants. beta == 0 / beta == 1 turn JSD into FKL / RKL (TRL's
// generalized_jsd_loss convention); the mixture formula would give 0 there.
inline LossParams make_loss_params(Divergence d, Support s, double beta, double rkl_ratio,
                                   double skew, bool has_clamp, double clamp, double loss_scale) {
  LossParams p{};
  p.divergence = d;
  if (d == Divergence::kJSD && beta == 0.0) p.divergence = Divergence::kFKL;
  if (d == Divergence::kJSD && beta == 1.0) p.divergence = Divergence::kRKL;
  if (d == Divergence::kFKLRKL && rkl_ratio == 0.0) p.divergence = Divergence::kFKL;
  if (d == Divergence::kFKLRKL && rkl_ratio == 1.0) p.divergence = Divergence::kRKL;
  p.support = s;
  p.beta = beta;
  p.rkl_ratio = rkl_ratio;
  p.skew = skew;
  p.has_clamp = has_clamp;
  p.clamp = clamp;
  p.loss_scale = loss_scale;
  p.log_beta = std::log(beta);
  p.log_1m_beta = std::log1p(-beta);
  p.log_skew = std::log(skew);
  p.log_1m_skew = std::log1p(-skew);
  // topk support: the student's mass outside the top-k, u = 1 - Q, against a teacher of 0.
  // The term is linear in u; it is left out where it is infinite (RKL, SRKL with skew 0).
  switch (p.divergence) {
    case Divergence::kJSD: p.outside_coeff = -(1.0 - beta) * p.log_1m_beta; break;
    case Divergence::kTVD: p.outside_coeff = 0.5; break;
    case Divergence::kSRKL: p.outside_coeff = skew > 0.0 ? -p.log_skew : 0.0; break;
    default: p.outside_coeff = 0.0; break;
  }
  // generalized support (SPEC 10.3): fkl - a + b, rkl - b + a, skl - a + m = (1-skew)(b - a),
  // srkl - b + m' = (1-skew)(a - b), fkl+rkl the mix; JSD and TVD need nothing.
  switch (p.divergence) {
    case Divergence::kFKL: p.generalized_slope = 1.0; break;
    case Divergence::kRKL: p.generalized_slope = -1.0; break;
    case Divergence::kFKLRKL: p.generalized_slope = 1.0 - 2.0 * rkl_ratio; break;
    case Divergence::kSKL: p.generalized_slope = 1.0 - skew; break;
    case Divergence::kSRKL: p.generalized_slope = -(1.0 - skew); break;
    default: p.generalized_slope = 0.0; break;
  }
  return p;
}

// A loss mixture (SPEC 9.3): sum_i weight[i] * L_i, every term over the same row statistics.
// A single loss is a mixture of one term of weight 1 (computed bitwise as before: a weight of 1
// is never multiplied). Terms of weight 0 are dropped by whoever builds this.
constexpr int kMaxLossTerms = 8;
struct LossTerms {
  int count;
  LossParams term[kMaxLossTerms];
  double weight[kMaxLossTerms];
  bool any_renorm;  // some term renormalises over the K bins (its normalisers are computed once)
  bool any_sampled;  // some term completes the bins with the sampled token (SPEC 10.2)
};

// log(exp(x) + exp(y)), exact for -inf arguments, NaN in -> NaN out.
TD_HD double log_add_exp(double x, double y) {
  if (x != x || y != y) return td_nan();
  const double hi = x > y ? x : y;
  const double lo = x > y ? y : x;
  if (hi == -td_inf()) return -td_inf();
  if (hi == td_inf()) return td_inf();
  return hi + std::log1p(std::exp(lo - hi));
}

// max(v, c) that keeps a NaN v (as torch.clamp_min does), instead of fmax's "the other one".
TD_HD double clamp_min(double v, double c) { return v < c ? c : v; }

// Streaming log-sum-exp, mergeable across lanes.
struct LogSumExp {
  double max = -std::numeric_limits<double>::infinity();
  double sum = 0.0;
  TD_HD void add(double x) {
    if (x != x) { max = x; sum = 1.0; return; }  // NaN is sticky
    if (x == -td_inf()) return;
    if (x > max) { sum = sum * std::exp(max - x) + 1.0; max = x; }
    else sum += std::exp(x - max);
  }
  TD_HD void merge(double other_max, double other_sum) {
    if (other_max != other_max || max != max) { max = td_nan(); sum = 1.0; return; }
    if (other_max == -td_inf()) return;
    if (max == -td_inf()) { max = other_max; sum = other_sum; return; }
    if (other_max > max) { sum = sum * std::exp(max - other_max) + other_sum; max = other_max; }
    else sum += other_sum * std::exp(other_max - max);
  }
  TD_HD double value() const { return max == -td_inf() ? -td_inf() : max + std::log(sum); }
};

// One bin of a divergence between teacher a and student b, given log a and log b.
struct Bin {
  double value;   // the bin's contribution to the loss
  double d_logb;  // d value / d log b
  double d_b;     // d value / d b  (the tail bin's b is 1 - Q)
};

// KL(a||b) bin: a (log a - log b).
TD_HD Bin fkl_bin(double la, double lb) {
  const double a = std::exp(la);
  if (a == 0.0) return {0.0, 0.0, 0.0};
  return {a * (la - lb), -a, -a / std::exp(lb)};
}

// KL(b||a) bin: b (log b - log a). A bin with b = 0 contributes nothing, gradient included.
TD_HD Bin rkl_bin(double la, double lb) {
  const double b = std::exp(lb);
  if (b == 0.0) return {0.0, 0.0, 0.0};
  const double h = lb - la + 1.0;
  return {b * (lb - la), b * h, h};
}

// Generalised JSD bin, m = w a + (1 - w) b:  w a log(a/m) + (1 - w) b log(b/m).
// d/db = (1 - w) log(b/m)  (the other terms cancel).
TD_HD Bin jsd_bin(double la, double lb, const LossParams& p) {
  const double w = p.beta;
  const double a = std::exp(la), b = std::exp(lb);
  // log(b/m) = -log(w a/b + 1 - w), log(a/m) = -log(w + (1 - w) b/a): bounded, no inf - inf.
  const double lb_m = (a == 0.0) ? -p.log_1m_beta : -log_add_exp(la - lb + p.log_beta, p.log_1m_beta);
  const double la_m = (b == 0.0) ? -p.log_beta : -log_add_exp(p.log_beta, lb - la + p.log_1m_beta);
  const double value = (a == 0.0 ? 0.0 : w * a * la_m) + (b == 0.0 ? 0.0 : (1.0 - w) * b * lb_m);
  if (b == 0.0) return {value, 0.0, 0.0};
  const double d_b = (1.0 - w) * lb_m;
  return {value, b * d_b, d_b};
}

// Total variation bin: |a - b| / 2, derivative sign(b - a) / 2 with sign(0) = 0 (as autograd).
TD_HD Bin tvd_bin(double la, double lb) {
  const double a = std::exp(la), b = std::exp(lb);
  const double sign = (b > a) ? 1.0 : ((b < a) ? -1.0 : 0.0);
  return {0.5 * std::fabs(a - b), 0.5 * sign * b, 0.5 * sign};
}

// Skew KL bin (DistiLLM), m = lambda a + (1 - lambda) b: a log(a/m).
TD_HD Bin skl_bin(double la, double lb, const LossParams& p) {
  const double a = std::exp(la);
  if (a == 0.0) return {0.0, 0.0, 0.0};
  const double one_m = 1.0 - p.skew;
  const double la_m = -log_add_exp(p.log_skew, lb - la + p.log_1m_skew);  // log(a/m)
  const double lb_m = -log_add_exp(la - lb + p.log_skew, p.log_1m_skew);  // log(b/m) <= -log(1-l)
  // d/db = -(1 - lambda) a / m;  d/dlog b = -(1 - lambda) a b / m
  return {a * la_m, -one_m * a * std::exp(lb_m), -one_m * std::exp(la_m)};
}

// Skew reverse KL bin, m = lambda b + (1 - lambda) a: b log(b/m).
// d/db = log(b/m) + 1 - lambda b / m.
TD_HD Bin srkl_bin(double la, double lb, const LossParams& p) {
  const double b = std::exp(lb);
  if (b == 0.0) return {0.0, 0.0, 0.0};
  const double lb_m = -log_add_exp(p.log_skew, la - lb + p.log_1m_skew);  // <= -log(lambda)
  const double d_b = lb_m + 1.0 - (p.skew == 0.0 ? 0.0 : p.skew * std::exp(lb_m));
  return {b * lb_m, b * d_b, d_b};
}

TD_HD Bin divergence_bin(double la, double lb, const LossParams& p) {
  switch (p.divergence) {
    case Divergence::kFKL: return fkl_bin(la, lb);
    case Divergence::kRKL: return rkl_bin(la, lb);
    case Divergence::kJSD: return jsd_bin(la, lb, p);
    case Divergence::kFKLRKL: {
      const Bin f = fkl_bin(la, lb), r = rkl_bin(la, lb);
      const double wr = p.rkl_ratio, wf = 1.0 - p.rkl_ratio;
      return {wf * f.value + wr * r.value, wf * f.d_logb + wr * r.d_logb, wf * f.d_b + wr * r.d_b};
    }
    case Divergence::kTVD: return tvd_bin(la, lb);
    case Divergence::kSKL: return skl_bin(la, lb, p);
    case Divergence::kSRKL: return srkl_bin(la, lb, p);
  }
  return {td_nan(), td_nan(), td_nan()};
}

// A term's bin on its support: the divergence's own bin, and for "generalized" (SPEC 10.3) plus
// kappa * (b - a), which makes every term a divergence between unnormalised measures (>= 0,
// 0 only at b = a).
TD_HD Bin support_bin(double la, double lb, const LossParams& p) {
  Bin bin = divergence_bin(la, lb, p);
  if (p.support == Support::kGeneralized && p.generalized_slope != 0.0) {
    const double kappa = p.generalized_slope, a = std::exp(la), b = std::exp(lb);
    bin.value += kappa * (b - a);
    bin.d_logb += kappa * b;
    bin.d_b += kappa;
  }
  return bin;
}

// ---------------------------------------------------------------------------------------------
// The row driver. `Lanes` says how the K entries of a row are split among threads and how the
// threads combine partial results: SerialLanes (one CPU thread owns the row) or a CUDA warp.
// Entries are visited as k = lanes.first(), first() + stride(), ... < K in three passes; the
// g output row doubles as scratch between passes 2 and 3, so no per-entry state is kept.
// ---------------------------------------------------------------------------------------------

struct SerialLanes {
  TD_HD int64_t first() const { return 0; }
  TD_HD int64_t stride() const { return 1; }
  TD_HD double sum(double x) const { return x; }
  TD_HD bool any(bool x) const { return x; }
  TD_HD LogSumExp merge(LogSumExp x) const { return x; }
  TD_HD bool leader() const { return true; }
  TD_HD void sync() const {}
};

// The global statistics of one row (after the collectives; the shard pass's sums).
struct RowStats {
  double row_max;        // M, max of z / T over the full vocab
  double rest;           // sum of exp(z/T - M) over non-teacher columns
  double teach;          // ... over distinct valid teacher columns
  double dup;            // ... over repeated teacher entries
  double teacher_cols;   // the number of distinct valid teacher columns (all shards)
  double ent;            // sum over all columns of exp(z/T - M) (z/T - M) (entropy only)
};

// What the backward needs besides g (all scaled by loss_scale). With u = the student's mass
// outside the teacher's entries (1 - Q) and d_b = dL/du (the tail / outside bin):
//   dL/dz_j = [j teacher] sum_{k: t_k = j} g_k - q_j * dense_coef
//             + q_j * outside_coef * ([j not teacher] - (m_j - 1) [m_j > 1])
// (m_j: how many valid entries have id j). This keeps the large d_b / u terms out of the
// teacher columns, where folding them into g_k would cancel catastrophically as Q -> 1.
struct RowResult {
  double loss;
  double student_mass;
  double teacher_mass;
  double log_sum;       // LSE = row_max + log_sum
  double dense_coef;    // sum_k g_k + d_b * u (summed over the terms)
  double outside_coef;  // d_b (summed over the terms)
  double label_coef;    // dL/ds_y of the sampled token (SPEC 10.2; 0 without one): the backward
                        // takes it through the label's path, grad_rows * label_coef added to
                        // the label's upstream gradient
};

TD_HD double to_double(double v) { return v; }
TD_HD double to_double(float v) { return static_cast<double>(v); }
template <typename T>
TD_HD double to_double(T v) { return static_cast<double>(static_cast<float>(v)); }

// One row's entries as the terms read them: entry k's student log-prob s_k, teacher log-prob
// l_k, and their clamped bin log-probs. s_k = (x_k - M) - log_sum: subtracting M first keeps
// x_k - M exact for nearby logits even when |z| is large (the backward recomputes softmax the
// same way).
template <typename acc_t, typename id_t, typename lp_t>
struct RowEntries {
  int64_t K;
  int64_t vocab_size;
  const acc_t* x;
  const id_t* ids;
  const lp_t* lp;
  double row_max, log_sum;
  bool clamp;
  double c;
  TD_HD bool valid(int64_t k) const {
    const int64_t id = static_cast<int64_t>(ids[k]);
    return id >= 0 && id < vocab_size;
  }
  TD_HD double s(int64_t k) const { return (to_double(x[k]) - row_max) - log_sum; }
  TD_HD double l(int64_t k) const { return to_double(lp[k]); }
  TD_HD double bin_la(double l) const { return clamp ? clamp_min(l, c) : l; }
  TD_HD double bin_lb(double s) const { return clamp ? clamp_min(s, c) : s; }
  // A bin passes gradient through its own term only where s_k >= c (SPEC 3).
  TD_HD bool passes(double s) const { return !(clamp && s < c); }
};

// w * v, with a weight of 1 never multiplied (a one-term list is bitwise the plain call).
TD_HD double weighted(double w, double v) { return w == 1.0 ? v : w * v; }

// What one term adds to its row, before its weight and the loss scale: the loss, its part of
// dense_coef (sum_k g_k + d_b * u) and of outside_coef (d_b). Its g_k are added to g directly,
// already weighted and scaled.
struct TermResult {
  double loss;
  double dense;
  double outside;
};

// The student's mass beyond the valid teacher entries, u = 1 - Q, as the topk and tail supports
// see it. Duplicated ids count once per entry (DECISIONS 8), so 1 - Q can go below 0: the tail
// support floors it at 0 like the teacher's (DECISIONS 3), with no gradient through the floor.
// A row whose distinct valid ids cover the whole vocabulary has no outside bin at all, on
// either side, whatever the masses round to (DECISIONS 20; decided from the ids' count).
struct OutsideMass {
  bool covered;
  double student_tail;      // u
  bool floored;             // rest - dup < 0
  double log_student_tail;  // log u, -inf when floored
};

TD_HD OutsideMass outside_mass(const RowStats& st, int64_t vocab_size, double log_sum) {
  OutsideMass o;
  o.covered = st.teacher_cols == static_cast<double>(vocab_size);
  o.student_tail = o.covered ? 0.0 : (st.rest - st.dup) / (st.rest + st.teach);
  o.floored = st.rest - st.dup < 0.0;
  o.log_student_tail = o.floored ? -td_inf() : std::log(st.rest - st.dup) - log_sum;
  return o;
}

// The outside bin of one term: "tail" compares the teacher's 1 - P with the student's u as a
// (K+1)-th bin; "topk" adds outside_coeff * u (a teacher of 0 there); nothing when covered.
TD_HD Bin outside_bin(const LossParams& p, const OutsideMass& o, double P) {
  if (o.covered) return {0.0, 0.0, 0.0};
  if (p.support == Support::kTail) {
    const double teacher_tail = 1.0 - P > 0.0 ? 1.0 - P : 0.0;
    Bin tail = divergence_bin(std::log(teacher_tail), o.log_student_tail, p);
    if (o.floored) tail.d_b = 0.0;
    return tail;
  }
  if (p.support == Support::kTopK) return {p.outside_coeff * o.student_tail, 0.0, p.outside_coeff};
  return {0.0, 0.0, 0.0};
}

// The bins are the K entries as they are (topk, tail, generalized, sampled): one pass, each bin's gradient its own
// derivative, plus the outside bin. g gets each gradient times the term's weight w and the loss
// scale.
template <class Lanes, class Row>
TD_HD TermResult own_bins_term(const Lanes& lanes, const Row& row, const LossParams& p, double w,
                               double loss_scale, const Bin& outside, double student_tail,
                               double* g) {
  double loss = 0.0, sum_g = 0.0;
  for (int64_t k = lanes.first(); k < row.K; k += lanes.stride()) {
    if (!row.valid(k)) continue;
    const double s = row.s(k);
    const Bin bin = support_bin(row.bin_la(row.l(k)), row.bin_lb(s), p);
    loss += bin.value;
    if (row.passes(s)) {
      sum_g += bin.d_logb;
      g[k] += weighted(w, bin.d_logb) * loss_scale;
    }
  }
  // The outside bin depends on the logits through u = 1 - Q whether or not an entry is clamped;
  // that part goes to the backward as dense_coef / outside_coef (see RowResult). u = 0 with an
  // infinite d_b (FKL tail against a student tail that underflowed): the loss is inf and
  // inf * 0 makes the row's gradient NaN - reported, not hidden.
  const double outside_term = outside.d_b != 0.0 ? outside.d_b * student_tail : 0.0;
  return {lanes.sum(loss) + outside.value, lanes.sum(sum_g) + outside_term, outside.d_b};
}

// The renorm normalisers, log sum over the valid bins of exp(clamped log-prob): without a clamp
// simply log Q and log P, unless a sum is so small (or 0) that its log loses precision in
// double; then, and with a clamp, a streaming log-sum-exp over the entries.
template <class Lanes, class Row>
TD_HD void renorm_normalisers(const Lanes& lanes, const Row& row, double Q, double P,
                              double& log_norm_a, double& log_norm_b) {
  constexpr double kTiny = 1e-280;
  if (!row.clamp && Q > kTiny && P > kTiny) {
    log_norm_a = std::log(P);
    log_norm_b = std::log(Q);
    return;
  }
  LogSumExp norm_a, norm_b;
  for (int64_t k = lanes.first(); k < row.K; k += lanes.stride()) {
    if (!row.valid(k)) continue;
    norm_a.add(row.bin_la(row.l(k)));
    norm_b.add(row.bin_lb(row.s(k)));
  }
  log_norm_a = lanes.merge(norm_a).value();
  log_norm_b = lanes.merge(norm_b).value();
}

// Both sides renormalised over the K valid bins. Pass 1: the bins' values and sum_d =
// sum_k d value / d log b_k. Pass 2: log b_j = s'_j - logsumexp(s'), so d/ds'_k = d_k - b_k sum_j
// d_j. Under renorm the g'_k of ALL valid bins sum to exactly 0 (sum_k b_k = 1), so sum_g is minus
// the sum over the clamped bins: exactly 0 when nothing is clamped (renorm is then blind to the
// non-teacher logits) instead of rounding noise on the scale of the largest d_k, which can be
// enormous (teacher log-probs of -1e30 under RKL). scratch: nullptr, or room for 2K doubles
// that keep each bin's derivative and probability between the passes; without it the bins are
// recomputed (terms accumulate into g, so g cannot serve).
template <class Lanes, class Row>
TD_HD TermResult renorm_term(const Lanes& lanes, const Row& row, const LossParams& p, double w,
                             double loss_scale, double log_norm_a, double log_norm_b, double* g,
                             double* scratch) {
  const int64_t K = row.K;
  double loss = 0.0, sum_d = 0.0;
  for (int64_t k = lanes.first(); k < K; k += lanes.stride()) {
    if (!row.valid(k)) continue;
    const double lb = row.bin_lb(row.s(k)) - log_norm_b;
    const Bin bin = divergence_bin(row.bin_la(row.l(k)) - log_norm_a, lb, p);
    loss += bin.value;
    sum_d += bin.d_logb;
    if (scratch != nullptr) {
      scratch[k] = bin.d_logb;
      scratch[K + k] = std::exp(lb);
    }
  }
  sum_d = lanes.sum(sum_d);
  double sum_clamped = 0.0;
  for (int64_t k = lanes.first(); k < K; k += lanes.stride()) {
    if (!row.valid(k)) continue;
    const double s = row.s(k);
    double gk;
    if (scratch != nullptr) {
      gk = scratch[k] - scratch[K + k] * sum_d;
    } else {
      const double lb = row.bin_lb(s) - log_norm_b;
      gk = divergence_bin(row.bin_la(row.l(k)) - log_norm_a, lb, p).d_logb - std::exp(lb) * sum_d;
    }
    if (!row.passes(s)) {
      sum_clamped += gk;
      continue;
    }
    g[k] += weighted(w, gk) * loss_scale;
  }
  return {lanes.sum(loss), -lanes.sum(sum_clamped), 0.0};
}

// The sampled token of a row as the epilogue receives it (SPEC 10.2). present: the call has a
// sampled term and the row a label >= 0.
struct SampledLabel {
  bool present;
  int64_t label;
  double x;          // z_y / T, gathered like the teacher logits
  double l;          // log p_y, the teacher's log-prob of y
  bool has_mu;
  double log_mu;     // log mu_y, the log-prob of y under the distribution it was drawn from
  bool has_clip;
  double clip;       // sample_weight_clip c
  bool drop_nan;     // missing_teacher="drop": a NaN l means the entry is not there
};

TD_HD SampledLabel no_sampled_label() { return {false, -1, 0.0, 0.0, false, 0.0, false, 0.0, false}; }

// The sampled entry of a row: used when y is in the vocab, not a valid teacher id and not
// dropped; importance weight w = 1 / mu_y (mu = q, the student's own s_y, by default), with a
// clip min(1 / mu_y, c / q_y); a constant (no gradient), as is q_y in the clip.
struct SampledEntry {
  bool use;
  double s;  // s_y, unclamped
  double l;  // log p_y
  double w;
};

TD_HD SampledEntry sampled_entry(const SampledLabel& y, bool among_teacher_ids, int64_t vocab_size,
                                 double row_max, double log_sum) {
  SampledEntry e{false, 0.0, y.l, 0.0};
  if (!y.present || y.label >= vocab_size || among_teacher_ids) return e;
  if (y.drop_nan && y.l != y.l) return e;
  e.use = true;
  e.s = (y.x - row_max) - log_sum;
  double log_w = -(y.has_mu ? y.log_mu : e.s);
  if (y.has_clip) {
    const double clipped = std::log(y.clip) - e.s;
    log_w = clipped < log_w ? clipped : log_w;
  }
  e.w = std::exp(log_w);
  return e;
}

// support="sampled": the K entries as they are and no outside bin, plus the sampled entry's
// w * f(p_y, q_y). Its gradient w * d f / d s_y (times the term's weight and the loss scale) is
// added to *label_coef: it reaches the logits through the label's column, not through g.
template <class Lanes, class Row>
TD_HD TermResult sampled_term(const Lanes& lanes, const Row& row, const LossParams& p, double w,
                              double loss_scale, const SampledEntry& y, double* g,
                              double* label_coef) {
  TermResult t = own_bins_term(lanes, row, p, w, loss_scale, Bin{0.0, 0.0, 0.0}, 0.0, g);
  if (!y.use) return t;
  const Bin bin = divergence_bin(row.bin_la(y.l), row.bin_lb(y.s), p);
  t.loss += y.w * bin.value;
  if (row.passes(y.s)) *label_coef += weighted(w, y.w * bin.d_logb) * loss_scale;
  return t;
}

// Computes one row's loss (the weighted sum of the terms), masses and g_k = dL/ds_k (written to
// g[k], scaled by loss_scale). x: gathered teacher logits z/T (0 where the id is invalid), ids,
// lp: teacher log-probs. All terms share the statistics, the clamp and the masses; each support
// is its own function above (renorm_term, own_bins_term with outside_bin).
// scratch: nullptr, or room for 2K doubles for renorm_term (the CPU passes one; a CUDA lane has
// no per-entry storage to spare and recomputes).
template <class Lanes, typename acc_t, typename id_t, typename lp_t>
TD_HD RowResult epilogue_row(const Lanes& lanes, const LossTerms& terms, int64_t K,
                             const RowStats& st, bool counted, int64_t vocab_size,
                             const acc_t* x, const id_t* ids, const lp_t* lp, double* g,
                             double* scratch = nullptr,
                             const SampledLabel& label = no_sampled_label()) {
  RowResult res{0.0, 0.0, 0.0, std::log(st.rest + st.teach), 0.0, 0.0, 0.0};
  for (int64_t k = lanes.first(); k < K; k += lanes.stride()) g[k] = 0.0;
  if (!counted) return res;
  const LossParams& p0 = terms.term[0];
  const RowEntries<acc_t, id_t, lp_t> row{K, vocab_size, x, ids, lp, st.row_max, res.log_sum,
                                          p0.has_clamp, p0.clamp};
  const double loss_scale = p0.loss_scale;

  // Masses, invalid ids, and whether the sampled label is a valid teacher id.
  double Q = 0.0, P = 0.0;
  bool invalid = false, label_among = false;
  for (int64_t k = lanes.first(); k < K; k += lanes.stride()) {
    const int64_t id = static_cast<int64_t>(ids[k]);
    if (id < 0) continue;
    if (id >= vocab_size) { invalid = true; continue; }
    label_among |= id == label.label;
    Q += std::exp(row.s(k));
    P += std::exp(row.l(k));
  }
  Q = lanes.sum(Q);
  P = lanes.sum(P);
  invalid = lanes.any(invalid);
  // A label >= V (check_inputs=False) is never read: a sampled term makes its row NaN (SPEC 7).
  invalid |= label.present && label.label >= vocab_size;
  const SampledEntry sampled =
      sampled_entry(label, label.present && lanes.any(label_among), vocab_size, st.row_max,
                    res.log_sum);
  double log_norm_a = 0.0, log_norm_b = 0.0;
  if (terms.any_renorm) renorm_normalisers(lanes, row, Q, P, log_norm_a, log_norm_b);
  const OutsideMass outside = outside_mass(st, vocab_size, res.log_sum);

  double loss = 0.0, dense = 0.0, outside_coef = 0.0;
  for (int i = 0; i < terms.count; ++i) {
    const LossParams& p = terms.term[i];
    const double w = terms.weight[i];
    TermResult t;
    if (p.support == Support::kRenorm) {
      t = renorm_term(lanes, row, p, w, loss_scale, log_norm_a, log_norm_b, g, scratch);
    } else if (p.support == Support::kSampled) {
      t = sampled_term(lanes, row, p, w, loss_scale, sampled, g, &res.label_coef);
    } else {  // topk, tail: with their outside bin; generalized: none (outside_bin gives 0)
      t = own_bins_term(lanes, row, p, w, loss_scale, outside_bin(p, outside, P),
                        outside.student_tail, g);
    }
    loss += weighted(w, t.loss);
    dense += weighted(w, t.dense);
    outside_coef += weighted(w, t.outside);
  }
  lanes.sync();
  res.dense_coef = dense * loss_scale;
  res.outside_coef = outside_coef * loss_scale;
  res.loss = invalid ? td_nan() : loss * loss_scale;
  // A row whose loss is inf or NaN has no meaningful gradient: all NaN (DECISIONS 15), so the
  // backward cannot hand out a mix of inf, NaN and finite numbers that looks usable.
  if (!(res.loss - res.loss == 0.0)) {
    res.dense_coef = td_nan();
    res.label_coef = 0.0;  // (the NaN row needs nothing more; an inf here would only add noise)
  }
  res.student_mass = Q;
  res.teacher_mass = P;
  return res;
}

// The per-row outputs beside the loss (SPEC 9.2), and the factors the backward scales their
// upstream gradients by. has_label: labels were given; label < 0 is ignored.
struct RowExtras {
  double label_logprob;   // z_y / T - LSE; 0 ignored / masked; NaN for a label >= V
  double entropy;         // -sum_v q_v log q_v; 0 masked or not asked for
  double label_factor;    // 1, 0 where label_logprob is a constant 0, NaN for a label >= V
  double entropy_factor;  // 1, or 0 (masked, not asked for)
};

// A row's row_coefs (what the backward needs; the layout is the epilogue's schema in
// csrc/registration.cpp).
TD_HD void write_row_coefs(double* c, const RowResult& r, const RowExtras& e) {
  c[0] = r.log_sum;
  c[1] = r.dense_coef;
  c[2] = r.outside_coef;
  c[3] = e.entropy;
  c[4] = e.label_factor;
  c[5] = e.entropy_factor;
  c[6] = r.label_coef;
}

template <typename acc_t>
TD_HD RowExtras row_extras(const RowStats& st, double log_sum, bool counted, bool has_label,
                           int64_t label, int64_t vocab_size, acc_t label_x, bool with_entropy) {
  RowExtras e{0.0, 0.0, 0.0, 0.0};
  if (!counted) return e;
  if (has_label && label >= 0) {
    if (label < vocab_size) {
      e.label_logprob = (to_double(label_x) - st.row_max) - log_sum;
      e.label_factor = 1.0;
    } else {
      e.label_logprob = td_nan();
      e.label_factor = td_nan();
    }
  }
  if (with_entropy) {
    // H = -sum q log q with q = e_v / S, log q = t_v - log S: H = log S - (sum e_v t_v) / S.
    e.entropy = log_sum - st.ent / (st.rest + st.teach);
    e.entropy_factor = 1.0;
  }
  return e;
}

}  // namespace topk_distill
