// CUDA backward, device code: the gradient of  grad_rows . loss + grad_label . label_logprobs
// + grad_entropy . entropy  w.r.t. the logits (the formula and row_coefs: the backward schema in
// csrc/registration.cpp; the CPU kernel csrc/cpu/backward.cpp computes the same):
//   dL/dz_v = s ( gl sum_{k: t_k = v} g_k + gy [v == y] - q_v (gl dense + gy + gh H)
//                 + gl outside q_v ([v not teacher] - (m_v - 1) [m_v > 1]) - gh q_v t_v )
// with gy = grad_label * label_factor, gh = grad_entropy * entropy_factor (0 for a zero upstream
// gradient, whatever the factor), t_v = log q_v.
//
// Memory traffic: reads N * V_r logits once and writes N * V_r gradients once, in 16-byte packs
// where the rows allow it (in place: the same memory, through the logits' strides), plus O(N * K)
// for the ids and g. Every gradient element is written exactly once.
//
// Work split: one block per (row, column range), with the same range split as the shard pass
// (whole rows when there are enough of them; >= 8192-column ranges for few long rows). No
// communication between blocks: a column belongs to exactly one range. Per block:
//   1. marks: the in-range teacher columns are set in a shared-memory bitmap (atomicOr, which
//      also detects a repeated id); the same loop reads g (is any nonzero?), notes whether the
//      label is a teacher id, and loads each thread's first teacher logit (before any write, so
//      in place is safe); a label column that is no teacher column is marked after a barrier;
//   2. sparse pass: each in-range teacher column is written by one entry (the lowest k with its
//      id: for a row with a repeated id, the first of its run in the host's stable sort of the
//      row's ids - O(K)), the label column by one thread: from scratch in fp64, rounded once;
//   3. dense pass (no barrier in between): every other column gets q_v (A + B t_v), with per-row
//      A, B; B != 0 only with an entropy gradient, a separate instantiation (kEntGrad), so the
//      common loop is: convert, one FFMA, one MUFU.EX2 (ftz; log2(e) folded into the scale and
//      the shift, their rounding undone exactly by a per-row factor folded into A and B), one
//      FMUL, convert. Marked columns are skipped - their loaded value unused, never written -
//      so in place is safe without ordering the two passes.
// Rows: no active part (gl != 0 with some nonzero coefficient, gy != 0, gh != 0): exact zeros,
// even if the logits are not finite; an active part with a NaN coefficient, or a non-finite
// shift (row_max + log_sum): all NaN.
//
// Device code only: CUDA through portability.cuh; the host launcher is csrc/cuda/backward.cu.
#pragma once

#include <cmath>
#include <cstdint>

#include "common.cuh"

TD_CUDA_NAMESPACE_BEGIN

// Threads per block: at most this (threads_for), four blocks per SM (__launch_bounds__: 64
// registers); fp64 two (128 registers).
constexpr int kBackwardMaxThreads = kMaxStreamThreads;
static_assert(kBackwardMaxThreads == 256, "the launch bounds below assume 256");

template <typename scalar_t, typename id_t>
struct BackwardArgs {
  using acc_t = acc_of<scalar_t>;
  gmem_ptr<const scalar_t> logits;
  RowMap in_rows;
  gmem_ptr<scalar_t> out;  // == logits for the in-place op
  RowMap out_rows;
  int64_t N, V, K;
  gmem_ptr<const id_t> ids;        // [N, K]
  gmem_ptr<const id_t> sorted;     // [N, K]: each row's ids sorted (stable), or null when K <= 1
  gmem_ptr<const int64_t> order;   // [N, K]: their positions k
  gmem_ptr<const int64_t> labels;  // [N] or null
  int64_t vocab_start;
  double inv_t;           // s
  acc_t inv_t_acc;        // fl(inv_t): the forward's scale of z
  acc_t c;                // fl(inv_t_acc * log2(e))
  double c_over_inv_t;    // c / inv_t_acc in fp64 (host: no fp64 division subroutine here)
  gmem_ptr<const acc_t> row_max;       // [N]
  gmem_ptr<const double> row_coefs;    // [N, 6]
  gmem_ptr<const double> g;            // [N, K]
  gmem_ptr<const acc_t> grad_rows;     // [N]
  gmem_ptr<const acc_t> grad_label;    // [N] or null (0)
  gmem_ptr<const acc_t> grad_entropy;  // [N] or null (0)
  int64_t splits, chunk, bitmap_words;
};

// out[r0, r1) = v, packed where the output row allows.
template <typename scalar_t>
__device__ __forceinline__ void fill_range(gmem_ptr<scalar_t> o, int64_t r0, int64_t r1, scalar_t v) {
  constexpr int VEC = vec_of<scalar_t>();
  const int B = blockDim.x;
  const int sh = static_cast<int>((misalignment(o) + r0) % VEC);
  const int64_t j0 = std::min<int64_t>(r1, r0 + (VEC - sh) % VEC);
  const int64_t npk = (r1 - j0) / VEC;
  const int64_t jt = j0 + npk * VEC;
  const int64_t n_pro = j0 - r0, n_scalar = n_pro + (r1 - jt);
  for (int64_t t = threadIdx.x; t < n_scalar; t += B) o[t < n_pro ? r0 + t : jt + (t - n_pro)] = v;
  Pack<scalar_t, VEC> pk;
#pragma unroll
  for (int i = 0; i < VEC; ++i) pk.v[i] = v;
  const gmem_ptr<Pack<scalar_t, VEC>> op = gmem_cast<Pack<scalar_t, VEC>>(o + j0);
  for (int64_t i = threadIdx.x; i < npk; i += B) op[i] = pk;
}

// The dense columns' value q_v (A + B t_v), in base 2: u = fl(x c - m2), 2^u = q_v 2^-D with
// D = m2 - log_sum log2(e) - M c / inv_t exactly (up to the (x inv_t - M)(c / inv_t - log2 e)
// of a far element), t_v = (u + D) ln 2, so  q_v (A + B t_v) = 2^u (a + b u)  with
// a = 2^D (A + B D ln 2), b = 2^D B ln 2  (fp64 per row). With |z| ~ 1e4 the fp32 shift alone is
// off by ~1e-3; D restores the CPU kernel's accuracy.
template <typename scalar_t, bool kEntGrad>
struct DenseFn {
  using acc_t = acc_of<scalar_t>;
  acc_t c, m2, a, b;
  static __device__ __forceinline__ acc_t lowest_u() {
    return std::is_same_v<acc_t, float> ? acc_t(-256) : acc_t(-2048);
  }
  __device__ __forceinline__ acc_t operator()(acc_t x) const {
    const acc_t u = fma_rn(x, c, -m2);
    const acc_t e = fast_exp2(u);
    // (kEntGrad: e * u, with u floored where e is 0 anyway: a -inf logit gives 0, not 0 * inf)
    if constexpr (kEntGrad) return e * fma_rn(b, max_ignore_nan(u, lowest_u()), a);
    else return e * a;
  }
  __device__ __forceinline__ scalar_t one(acc_t x) const { return static_cast<scalar_t>((*this)(x)); }
};

// Dense pass over the unmarked columns of a range: z, o point at the range's first column,
// len <= kMaxBlockCols columns (32-bit indices: fewer registers in the hot loop), sh is the
// bitmap shift of the INPUT row (bit t + sh marks column t of the range).
template <typename scalar_t, bool kEntGrad>
__device__ __forceinline__ void dense_range(gmem_ptr<const scalar_t> z, gmem_ptr<scalar_t> o,
                                            int len, int sh,
                                            smem_ptr<const uint32_t> bm,
                                            const DenseFn<scalar_t, kEntGrad> f) {
  using acc_t = acc_of<scalar_t>;
  using P = Pack<scalar_t, vec_of<scalar_t>()>;
  constexpr int VEC = vec_of<scalar_t>();
  constexpr int U = 2;  // packs in flight per thread
  constexpr uint32_t kPackMask = (VEC >= 32) ? kFullMask : ((1u << VEC) - 1u);
  const int B = blockDim.x;
  if (misalignment(z) != misalignment(o)) {
    // Input and output rows disagree on 16-byte alignment (out of place from a view with an odd
    // storage offset or row stride): element-wise, still coalesced.
    for (int t = threadIdx.x; t < len; t += B) {
      const int b = t + sh;
      if (!((bm[b >> 5] >> (b & 31)) & 1u)) o[t] = f.one(static_cast<acc_t>(z[t]));
    }
    return;
  }
  const int j0 = min(len, (VEC - sh) % VEC);  // first 16-byte aligned column
  const int npk = (len - j0) / VEC;
  const int jt = j0 + npk * VEC;
  const int n_scalar = j0 + (len - jt);
  for (int t = threadIdx.x; t < n_scalar; t += B) {
    const int j = t < j0 ? t : jt + (t - j0);
    const int b = j + sh;
    if (!((bm[b >> 5] >> (b & 31)) & 1u)) o[j] = f.one(static_cast<acc_t>(z[j]));
  }
  const gmem_ptr<const P> zp = gmem_cast<const P>(z + j0);
  const gmem_ptr<P> op = gmem_cast<P>(o + j0);
  const int b0 = j0 + sh;  // a multiple of VEC
  const int wstride = B * VEC / 32;
  int i = threadIdx.x;
  for (; i + (U - 1) * B < npk; i += U * B) {
    P in[U];
#pragma unroll
    for (int u = 0; u < U; ++u) in[u] = zp[i + u * B];
    const int bit = b0 + i * VEC;
    uint32_t tb[U];
#pragma unroll
    for (int u = 0; u < U; ++u) tb[u] = (bm[(bit >> 5) + u * wstride] >> (bit & 31)) & kPackMask;
    P r[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      acc_t x[VEC];
      unpack(in[u], x);
#pragma unroll
      for (int e = 0; e < VEC; ++e) x[e] = f(x[e]);
      r[u] = repack<scalar_t, VEC>(x);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (tb[u] == 0u) {
        op[i + u * B] = r[u];
      } else {  // a marked column inside: leave it to the sparse pass
        const gmem_ptr<scalar_t> oe = gmem_cast<scalar_t>(op + i + u * B);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          if (!((tb[u] >> e) & 1u)) oe[e] = r[u].v[e];
        }
      }
    }
  }
  for (; i < npk; i += B) {
    const uint32_t tb = bitmap_bits<VEC>(bm, b0 + i * VEC);
    acc_t x[VEC];
    unpack(zp[i], x);
#pragma unroll
    for (int e = 0; e < VEC; ++e) x[e] = f(x[e]);
    const P r = repack<scalar_t, VEC>(x);
    if (tb == 0u) {
      op[i] = r;
    } else {
      const gmem_ptr<scalar_t> oe = gmem_cast<scalar_t>(op + i);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        if (!((tb >> e) & 1u)) oe[e] = r.v[e];
      }
    }
  }
}

// One row's coefficients, fp64: the active parts' terms, exactly 0 for an inactive part (so
// that a NaN coefficient behind a zero upstream gradient never reaches the result).
struct RowGrad {
  double s, M, log_sum;
  double gl;   // grad_rows                (loss part active, else 0)
  double gld;  // grad_rows * dense_coef   (  "  )
  double glo;  // grad_rows * outside_coef (  "  )
  double gy;   // grad_label * label_factor
  double gh;   // grad_entropy * entropy_factor
  double ghH;  // gh * H
};

// A sparse column's value, in fp64, rounded once: g_sum = sum of g over the column's m entries
// (m = 0: the label column that is no teacher id), label: the column is the label's.
template <typename scalar_t>
__device__ __forceinline__ scalar_t sparse_value(const RowGrad& r, double x, double g_sum,
                                                 int64_t m, bool label) {
  const double t = (x - r.M) - r.log_sum;
  const double q = ::exp(t);
  const double outside = m == 0 ? 1.0 : -static_cast<double>(m - 1);
  // (mul_rn: the products added to are rounded on their own, as in the CPU kernel)
  double v = (r.gl != 0.0 ? mul_rn(r.gl, g_sum) : 0.0) + (label ? r.gy : 0.0);
  if (q != 0.0) {  // (a -inf logit: q = 0 and t = -inf; its q-terms are 0)
    double inner = mul_rn(r.glo, outside) - r.gld - r.gy - r.ghH;
    if (r.gh != 0.0) inner -= mul_rn(r.gh, t);
    v += mul_rn(q, inner);
  }
  return static_cast<scalar_t>(r.s * v);
}

constexpr int64_t kRowCoefsPerRow = 7;  // (csrc/ops.h kRowCoefs)
constexpr uint32_t kFlagRepeat = 1u, kFlagAnyG = 2u, kFlagLabelHit = 4u;

template <typename scalar_t, typename id_t, bool kEntGrad>
__global__ void __launch_bounds__(kBackwardMaxThreads, stream_min_blocks<scalar_t>())
    backward_kernel(const BackwardArgs<scalar_t, id_t> a) {
  using acc_t = acc_of<scalar_t>;
  constexpr int VEC = vec_of<scalar_t>();
  const smem_ptr<uint32_t> bm = dynamic_shared_memory<uint32_t>();
  TD_SHARED_OBJECT(uint32_t, row_flags);

  const unsigned work = static_cast<unsigned>(a.N * a.splits);  // < 2^31 (host check)
  for (unsigned w = blockIdx.x; w < work; w += gridDim.x) {  // (+ gridDim <= 2^30: no wrap)
    // A clean bitmap per row (not a clear of the marked words afterwards: nothing about the
    // row's ids has to stay live across the dense loop, which keeps it within 64 registers).
    if (threadIdx.x == 0) row_flags = 0u;
    zero_bitmap(bm, a.bitmap_words);  // (ends with a barrier)
    const auto [n, sp] = work_item(w, a.splits);
    const int64_t r0 = sp * a.chunk, r1 = std::min(a.V, r0 + a.chunk);
    const gmem_ptr<const scalar_t> z = a.logits + a.in_rows.offset(n);
    const gmem_ptr<scalar_t> o = a.out + a.out_rows.offset(n);
    const gmem_ptr<const id_t> ids = a.ids + n * a.K;
    const gmem_ptr<const double> g = a.g + n * a.K;
    const int sh = static_cast<int>((misalignment(z) + r0) % VEC);
    const int64_t label = a.labels != nullptr ? a.labels[n] : int64_t(-1);
    const int64_t lc = label - a.vocab_start;  // the label's column
    const bool label_here = label >= 0 && lc >= r0 && lc < r1;

    // 1. marks, g, the label; each thread's first in-range teacher logit (read before any write)
    uint32_t flags = 0u;
    scalar_t z0 = static_cast<scalar_t>(0.0f);
    for (int64_t k = threadIdx.x; k < a.K; k += blockDim.x) {
      if (g[k] != 0.0) flags |= kFlagAnyG;
      const int64_t id = static_cast<int64_t>(ids[k]);
      const int64_t c = id - a.vocab_start;
      if (id < 0 || c < r0 || c >= r1) continue;
      if (k == threadIdx.x) z0 = z[c];
      if (c == lc) flags |= kFlagLabelHit;
      const int b = static_cast<int>(c - r0) + sh;
      const uint32_t bit = 1u << (b & 31);
      if (atomicOr(&bm[b >> 5], bit) & bit) flags |= kFlagRepeat;
    }
    if (flags != 0u) atomicOr(&row_flags, flags);
    __syncthreads();
    flags = row_flags;

    // The row's coefficients (every thread, the same).
    const gmem_ptr<const double> rc = a.row_coefs + n * kRowCoefsPerRow;
    RowGrad r;
    r.s = a.inv_t;
    r.M = static_cast<double>(a.row_max[n]);
    r.log_sum = rc[0];
    const double dense = rc[1], outside = rc[2], H = rc[3];
    const double gl = static_cast<double>(a.grad_rows[n]);
    const double gy_up = a.grad_label != nullptr ? static_cast<double>(a.grad_label[n]) : 0.0;
    const double gh_up = a.grad_entropy != nullptr ? static_cast<double>(a.grad_entropy[n]) : 0.0;
    // (a zero upstream gradient contributes 0 even against a NaN factor)
    // (mul_rn: each coefficient below is compared and also added to the others)
    r.gy = gy_up == 0.0 ? 0.0 : mul_rn(gy_up, rc[4]);
    r.gh = gh_up == 0.0 ? 0.0 : mul_rn(gh_up, rc[5]);
    const bool act_l = gl != 0.0 && ((flags & kFlagAnyG) || dense != 0.0 || outside != 0.0);
    const bool act_y = r.gy != 0.0, act_h = r.gh != 0.0;
    r.gl = act_l ? gl : 0.0;
    r.gld = act_l ? mul_rn(gl, dense) : 0.0;
    r.glo = act_l ? mul_rn(gl, outside) : 0.0;
    r.ghH = act_h ? mul_rn(r.gh, H) : 0.0;
    const double shift = r.M + r.log_sum;
    const bool nan_row = !isfinite(shift) || isnan(r.gld) || isnan(r.glo) || isnan(r.gl) ||
                         isnan(r.gy) || isnan(r.ghH);
    if (!(act_l || act_y || act_h) || nan_row) {
      // masked / zero-weight row: exact zeros, even if the logits are not finite; else NaN
      fill_range(o, r0, r1,
                 static_cast<scalar_t>(nan_row && (act_l || act_y || act_h) ? quiet_nan<float>()
                                                                             : 0.0f));
    } else {
      const bool label_alone = label_here && !(flags & kFlagLabelHit);
      if (label_alone) {  // (block-uniform) mark the label column too, before anyone streams
        if (threadIdx.x == 0) {
          const int b = static_cast<int>(lc - r0) + sh;
          bm[b >> 5] |= 1u << (b & 31);
        }
        __syncthreads();
      }

      // 2. sparse pass
      if (!(flags & kFlagRepeat)) {
        for (int64_t k = threadIdx.x; k < a.K; k += blockDim.x) {
          const int64_t id = static_cast<int64_t>(ids[k]);
          const int64_t c = id - a.vocab_start;
          if (id < 0 || c < r0 || c >= r1) continue;
          const scalar_t raw = k == threadIdx.x ? z0 : z[c];
          // (mul_rn: the forward's rounded x = z / T, not one fused into sparse_value's x - M)
          const double x = static_cast<double>(mul_rn(static_cast<acc_t>(raw), a.inv_t_acc));
          o[c] = sparse_value<scalar_t>(r, x, g[k], 1, c == lc);
        }
      } else {  // (block-uniform) each id's run in the sorted order, written by its first entry
        const gmem_ptr<const id_t> sorted = a.sorted + n * a.K;
        const gmem_ptr<const int64_t> order = a.order + n * a.K;
        for (int64_t p = threadIdx.x; p < a.K; p += blockDim.x) {
          const int64_t id = static_cast<int64_t>(sorted[p]);
          const int64_t c = id - a.vocab_start;
          if (id < 0 || c < r0 || c >= r1 || !first_in_run(sorted, p)) continue;
          double g_sum = 0.0;
          int64_t m = 0;
          for (int64_t p2 = p; p2 < a.K && static_cast<int64_t>(sorted[p2]) == id; ++p2, ++m) {
            g_sum += g[order[p2]];
          }
          const double x = static_cast<double>(mul_rn(static_cast<acc_t>(z[c]), a.inv_t_acc));
          o[c] = sparse_value<scalar_t>(r, x, g_sum, m, c == lc);
        }
      }
      if (label_alone && threadIdx.x == 0) {  // (nobody else reads or writes this column)
        const double x = static_cast<double>(mul_rn(static_cast<acc_t>(z[lc]), a.inv_t_acc));
        o[lc] = sparse_value<scalar_t>(r, x, 0.0, 0, true);
      }

      // 3. dense pass: A = s (gl (outside - dense) - gy - gh H), B = -s gh, in base 2 (DenseFn)
      //    (mul_rn: the two products of m2d are used again in D, which must measure exactly how
      //    m2 was rounded from them - not from an FMA's unrounded product)
      const double A = mul_rn(r.s, r.glo - r.gld - r.gy - r.ghH);
      const double Bc = -r.s * r.gh;
      const double c_over_inv_t = a.c_over_inv_t;
      const double m_c = mul_rn(r.M, c_over_inv_t), l_c = mul_rn(r.log_sum, kLog2e);
      const double m2d = m_c + l_c;
      const acc_t m2 = static_cast<acc_t>(m2d);
      const double D = static_cast<double>(m2) - l_c - m_c;
      const double corr = ::exp2(D);
      DenseFn<scalar_t, kEntGrad> f;
      f.c = a.c;
      f.m2 = m2;
      f.a = static_cast<acc_t>(corr * (A + mul_rn(Bc * kLn2, D)));
      f.b = static_cast<acc_t>(corr * Bc * kLn2);
      dense_range<scalar_t, kEntGrad>(z + r0, o + r0, static_cast<int>(r1 - r0), sh, bm, f);
    }
    __syncthreads();  // every bitmap and flag read done before the next row's zeroing
  }
}

TD_CUDA_NAMESPACE_END
