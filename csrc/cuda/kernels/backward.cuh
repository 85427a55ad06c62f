// CUDA backward, device code: grad = grad_rows[n] / T * (sum_k g_k [v == t_k] - q_v * dense_coef
//                                           + q_v * outside_coef * ([v not teacher] - extra copies))
// (formula and row_coefs: the backward schema in csrc/registration.cpp; semantics copied from
// the CPU kernel csrc/cpu/backward.cpp, including the all-zero and all-NaN rows).
//
// Memory traffic: reads N * V_r logits once and writes N * V_r gradients once, in 16-byte packs
// where the row allows it (in place: the same memory), plus O(N * K) for the ids and g. Every
// gradient element is written exactly once.
//
// Work split: one block per (row, column range), with the same range split as the shard pass
// (whole rows when there are enough of them; >= 8192-column ranges for few long rows). No
// communication between blocks: a teacher column belongs to exactly one range. Per block:
//   1. the in-range teacher columns are marked in a shared-memory bitmap (atomicOr, which also
//      detects repeated ids);
//   2. sparse pass: the first entry (lowest k) of each in-range teacher column sums g over the
//      entries with its id (m of them), reads the column's logit and writes
//      scale * (g_sum - q * (dense_coef + (m - 1) * outside_coef)), computed in fp64 and rounded
//      once;
//   3. dense pass (no barrier in between): every non-teacher column gets
//      -scale * (dense_coef - outside_coef) * q_v (fp32 math, fp64 for fp64 logits); teacher
//      columns are skipped - their loaded value unused, never written - so in place is safe
//      without ordering the two passes.
// Rows with all-zero g and coefficients, or grad_rows == 0, are written as zeros; rows whose
// shift is not finite or whose dense_coef is NaN (non-finite loss) as NaN.
//
// Device code only: CUDA through portability.cuh; the host launcher is csrc/cuda/backward.cu.
#pragma once

#include <cmath>
#include <cstdint>

#include "common.cuh"

TD_CUDA_NAMESPACE_BEGIN

// Threads per block: at most this (threads_for), two blocks per SM (__launch_bounds__).
constexpr int kBackwardMaxThreads = 512;

template <typename scalar_t, typename id_t>
struct BackwardArgs {
  const scalar_t* logits;
  int64_t in_stride;
  scalar_t* out;  // == logits for the in-place op
  int64_t out_stride;
  int64_t N, V, K;
  const id_t* ids;
  int64_t vocab_start;
  double inv_t;
  const acc_of<scalar_t>* row_max;  // [N]
  const double* row_coefs;          // [N, 3]: log_sum, dense_coef, outside_coef
  const double* g;                  // [N, K]
  const acc_of<scalar_t>* grad_rows;  // [N]
  int64_t splits, chunk, bitmap_words;
};

// out[r0, r1) = v, packed where the output row allows.
template <typename scalar_t>
__device__ __forceinline__ void fill_range(scalar_t* o, int64_t r0, int64_t r1, scalar_t v) {
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
  Pack<scalar_t, VEC>* op = reinterpret_cast<Pack<scalar_t, VEC>*>(o + j0);
  for (int64_t i = threadIdx.x; i < npk; i += B) op[i] = pk;
}

template <typename scalar_t, typename acc_t>
struct DenseCoefs {
  acc_t inv_t, row_max, log_sum, coef;
  __device__ __forceinline__ scalar_t operator()(acc_t x) const {
    return static_cast<scalar_t>(coef * fast_exp(fma_rn(x, inv_t, -row_max) - log_sum));
  }
};

// Dense pass over the non-teacher columns of a range: z, o point at the range's first column,
// len <= kMaxBlockCols columns (32-bit indices: fewer registers in the hot loop), sh is the
// bitmap shift of the INPUT row (bit t + sh marks column t of the range).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void dense_range(const scalar_t* z, scalar_t* o, int len, int sh,
                                            smem_ptr<const uint32_t> bm,
                                            const DenseCoefs<scalar_t, acc_t> f) {
  constexpr int VEC = vec_of<scalar_t>();
  constexpr int U = 2;  // packs in flight per thread
  const int B = blockDim.x;
  if (misalignment(z) != misalignment(o)) {
    // Input and output rows disagree on 16-byte alignment (out of place from a view with an odd
    // storage offset or row stride): element-wise, still coalesced.
    for (int t = threadIdx.x; t < len; t += B) {
      const int b = t + sh;
      if (!((bm[b >> 5] >> (b & 31)) & 1u)) o[t] = f(static_cast<acc_t>(z[t]));
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
    if (!((bm[b >> 5] >> (b & 31)) & 1u)) o[j] = f(static_cast<acc_t>(z[j]));
  }
  const Pack<scalar_t, VEC>* zp = reinterpret_cast<const Pack<scalar_t, VEC>*>(z + j0);
  Pack<scalar_t, VEC>* op = reinterpret_cast<Pack<scalar_t, VEC>*>(o + j0);
  const int b0 = j0 + sh;  // a multiple of VEC
  for (int i = threadIdx.x; i < npk; i += U * B) {
    Pack<scalar_t, VEC> in[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (i + u * B < npk) in[u] = zp[i + u * B];
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int p = i + u * B;
      if (p >= npk) break;
      const uint32_t tb = bitmap_bits<VEC>(bm, b0 + p * VEC);
      Pack<scalar_t, VEC> r;
#pragma unroll
      for (int e = 0; e < VEC; ++e) r.v[e] = f(static_cast<acc_t>(in[u].v[e]));
      if (tb == 0u) {
        op[p] = r;
      } else {  // a teacher column inside: leave it to the sparse pass
        scalar_t* oe = reinterpret_cast<scalar_t*>(op + p);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          if (!((tb >> e) & 1u)) oe[e] = r.v[e];
        }
      }
    }
  }
}

// Sparse pass over the teacher columns of [r0, r1), each written by the lowest entry k with its
// id (fp64, rounded once).
template <typename scalar_t, typename acc_t, typename id_t>
__device__ __forceinline__ void sparse_range(const scalar_t* z, scalar_t* o, const id_t* ids,
                                          const double* g, int64_t K, int64_t vocab_start,
                                          int64_t r0, int64_t r1, bool repeat, acc_t inv_t,
                                          acc_t m, double log_sum, double dense_coef,
                                          double outside_coef, double scale) {
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    const int64_t id = static_cast<int64_t>(ids[k]);
    if (id < 0) continue;
    const int64_t c = id - vocab_start;
    if (c < r0 || c >= r1) continue;
    double g_sum = g[k];
    int64_t copies = 1;
    if (repeat) {
      bool owner = true;
      for (int64_t k2 = 0; k2 < k && owner; ++k2) owner = static_cast<int64_t>(ids[k2]) != id;
      if (!owner) continue;
      for (int64_t k2 = k + 1; k2 < K; ++k2) {
        if (static_cast<int64_t>(ids[k2]) == id) {
          g_sum += g[k2];
          ++copies;
        }
      }
    }
    const double logit = static_cast<double>(static_cast<acc_t>(z[c]) * inv_t);
    const double q = ::exp((logit - static_cast<double>(m)) - log_sum);
    const double coef = dense_coef + static_cast<double>(copies - 1) * outside_coef;
    o[c] = static_cast<scalar_t>(scale * (g_sum - q * coef));
  }
}

template <typename scalar_t, typename id_t>
__global__ void __launch_bounds__(kBackwardMaxThreads, 2)
    backward_kernel(const BackwardArgs<scalar_t, id_t> a) {
  using acc_t = acc_of<scalar_t>;
  constexpr int VEC = vec_of<scalar_t>();
  const smem_ptr<uint32_t> bm = dynamic_shared_memory<uint32_t>();

  zero_bitmap(bm, a.bitmap_words);
  const int64_t work = a.N * a.splits;
  for (int64_t w = blockIdx.x; w < work; w += gridDim.x) {
    const int64_t n = w / a.splits, sp = w - n * a.splits;
    const int64_t r0 = sp * a.chunk, r1 = std::min(a.V, r0 + a.chunk);
    const scalar_t* z = a.logits + n * a.in_stride;
    scalar_t* o = a.out + n * a.out_stride;
    const id_t* ids = a.ids + n * a.K;
    const double* g = a.g + n * a.K;
    const double log_sum = a.row_coefs[3 * n + 0];
    const double dense_coef = a.row_coefs[3 * n + 1];
    const double outside_coef = a.row_coefs[3 * n + 2];

    int nonzero_g = 0;
    for (int64_t k = threadIdx.x; k < a.K; k += blockDim.x) nonzero_g |= g[k] != 0.0;
    const bool any = (__syncthreads_or(nonzero_g) != 0) || dense_coef != 0.0 || outside_coef != 0.0;
    const double scale = static_cast<double>(a.grad_rows[n]) * a.inv_t;
    const acc_t m = a.row_max[n];
    const double shift = static_cast<double>(m) + log_sum;
    if (!any || scale == 0.0) {  // masked / zero-weight row: exactly zero, even if logits are not
      fill_range(o, r0, r1, static_cast<scalar_t>(0.0f));
      continue;  // (the next iteration's __syncthreads_or orders nothing that matters here)
    }
    if (!isfinite(shift) || isnan(dense_coef)) {  // NaN / inf logits or a non-finite loss
      fill_range(o, r0, r1, static_cast<scalar_t>(quiet_nan<float>()));
      continue;
    }

    const int sh = static_cast<int>((misalignment(z) + r0) % VEC);
    const bool repeat = mark_teacher_columns(bm, ids, a.K, a.vocab_start, r0, r1, sh);

    const acc_t inv_t = static_cast<acc_t>(a.inv_t);
    sparse_range<scalar_t, acc_t, id_t>(z, o, ids, g, a.K, a.vocab_start, r0, r1, repeat, inv_t, m,
                                        log_sum, dense_coef, outside_coef, scale);
    // Dense pass last: fewer values live across its loop. (It never touches a teacher column, so
    // the order of the two passes does not matter, in place included.)
    const DenseCoefs<scalar_t, acc_t> f{inv_t, m, static_cast<acc_t>(log_sum),
                                        static_cast<acc_t>(-scale * (dense_coef - outside_coef))};
    dense_range<scalar_t, acc_t>(z + r0, o + r0, static_cast<int>(r1 - r0), sh, bm, f);
    __syncthreads();  // every bitmap read done
    clear_teacher_columns(bm, ids, a.K, a.vocab_start, r0, r1, sh);
    __syncthreads();  // clears done before the next row's marks
  }
}

TD_CUDA_NAMESPACE_END
