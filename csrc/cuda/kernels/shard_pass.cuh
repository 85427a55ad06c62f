// CUDA shard pass, device code: one read of this rank's logits (semantics: csrc/registration.cpp, and the CPU
// kernel csrc/cpu/shard_pass.cpp, which this matches entry for entry).
//
// Memory traffic: reads N * V_r logits once, in 16-byte packs wherever the row allows it (a
// scalar prologue up to the first aligned column and a scalar tail handle any row stride,
// storage offset and V_r); reads the N * K ids twice and the in-shard teacher logits once more
// (K scattered elements per row, L2 hits mostly); writes N * (4 + K) acc values. Nothing of
// size [N, V_r] is allocated; the split path adds a [N, splits, 3] workspace.
//
// Work split: one block per (row, column range). With enough rows a range is the whole row;
// with few long rows (N * V_r >> N, e.g. N = 64, V_r = 262144) each row is cut into ranges of
// >= 8192 columns so that ~4 blocks per SM are busy, and a second tiny kernel (one block per
// row) merges the per-range (max, sum) pairs. Per block:
//   1. the row's in-range teacher columns are marked in a shared-memory bitmap (atomicOr, which
//      also detects repeated ids);
//   2. every thread streams its packs once, keeping an online (max, sum of exp) over the
//      columns that are NOT marked ("rest") - the max over all columns;
//   3. a deterministic block reduction gives the range's (max, rest);
//   4. the row's finaliser (same kernel without split, else the combine kernel) gathers the
//      K teacher logits and sums exp(x_k - M) over the distinct ("teach") and the repeated
//      ("dup") in-shard entries; a row with a repeated id decides "first copy" = lowest k by a
//      scan of the earlier ids (rows without repeats, the normal case, skip it).
// Accumulation is fp32 (fp64 for fp64 logits); a NaN logit makes the row's max and sums NaN.
//
// Device code only: CUDA through portability.cuh; the host launcher is csrc/cuda/shard_pass.cu.
#pragma once

#include <cstdint>

#include "common.cuh"

TD_CUDA_NAMESPACE_BEGIN

// Threads per block: at most this (threads_for), two blocks per SM (__launch_bounds__).
constexpr int kShardPassMaxThreads = 512;
constexpr int kShardCombineThreads = 128;

template <typename scalar_t, typename id_t>
struct ShardArgs {
  const scalar_t* logits;
  int64_t row_stride;
  int64_t N, V, K;
  const id_t* ids;
  int64_t vocab_start;
  acc_of<scalar_t> inv_t;
  int64_t splits, chunk, bitmap_words;
  acc_of<scalar_t>* row_max;   // [N]
  acc_of<scalar_t>* sums;      // [N, 3]
  acc_of<scalar_t>* gathered;  // [N, K]
  acc_of<scalar_t>* partials;  // [N, splits, 3] (split path only): max, rest, repeated-id flag
};

// Folds VEC consecutive columns into a thread's online (max, rest). tbits: the teacher marks
// of the columns (bit i = column i), which count towards the max but not the sum.
template <int VEC, typename acc_t>
__device__ __forceinline__ void accumulate(acc_t& m, acc_t& s, bool& nan, const acc_t (&x)[VEC],
                                           uint32_t tbits, acc_t inv_t) {
  acc_t cm = x[0];
  bool cn = x[0] != x[0];
#pragma unroll
  for (int i = 1; i < VEC; ++i) {
    cm = cm > x[i] ? cm : x[i];
    cn |= x[i] != x[i];
  }
  nan |= cn;
  cm *= inv_t;  // max(z) / T == max(z / T): rounding is monotone
  if (cm > m) {
    s *= fast_exp(m - cm);  // exp(-inf) = 0 while nothing but -inf was seen
    m = cm;
  }
  if (m != neg_inf<acc_t>()) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const acc_t e = fast_exp(fma_rn(x[i], inv_t, -m));  // one rounding, as the CPU kernel
      s += ((tbits >> i) & 1u) ? acc_t(0) : e;
    }
  }
}

// This block's (max, rest) over the columns [r0, r1) of row z. Every thread gets the result.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ MaxSum<acc_t> range_max_rest(const scalar_t* z, int64_t r0, int64_t r1,
                                                        int sh, smem_ptr<const uint32_t> bm,
                                                        acc_t inv_t, smem_ptr<acc_t> red_m,
                                                        smem_ptr<acc_t> red_s) {
  constexpr int VEC = vec_of<scalar_t>();
  constexpr int U = 4;  // packs in flight per thread
  const int B = blockDim.x;
  acc_t m = neg_inf<acc_t>(), s = acc_t(0);
  bool nan = false;

  const int64_t j0 = std::min<int64_t>(r1, r0 + (VEC - sh) % VEC);  // first aligned column
  const int64_t npk = (r1 - j0) / VEC;
  const int64_t jt = j0 + npk * VEC;  // first tail column
  const int64_t n_pro = j0 - r0, n_scalar = n_pro + (r1 - jt);
  for (int64_t t = threadIdx.x; t < n_scalar; t += B) {
    const int64_t j = t < n_pro ? r0 + t : jt + (t - n_pro);
    const acc_t x[1] = {static_cast<acc_t>(z[j])};
    const int64_t b = j - r0 + sh;
    accumulate<1>(m, s, nan, x, (bm[b >> 5] >> (b & 31)) & 1u, inv_t);
  }

  const scalar_t* zp = z + j0;
  const int64_t b0 = j0 - r0 + sh;  // a multiple of VEC
  int64_t i = threadIdx.x;
  for (; i + (U - 1) * B < npk; i += U * B) {
    acc_t x[U][VEC];
    uint32_t tb[U];
#pragma unroll
    for (int u = 0; u < U; ++u) load_pack<acc_t, scalar_t, VEC>(zp + (i + u * B) * VEC, x[u]);
#pragma unroll
    for (int u = 0; u < U; ++u) tb[u] = bitmap_bits<VEC>(bm, b0 + (i + u * B) * VEC);
#pragma unroll
    for (int u = 0; u < U; ++u) accumulate<VEC>(m, s, nan, x[u], tb[u], inv_t);
  }
  for (; i < npk; i += B) {
    acc_t x[VEC];
    load_pack<acc_t, scalar_t, VEC>(zp + i * VEC, x);
    accumulate<VEC>(m, s, nan, x, bitmap_bits<VEC>(bm, b0 + i * VEC), inv_t);
  }
  if (nan) m = quiet_nan<acc_t>();
  return block_max_sum<acc_t>({m, s}, red_m, red_s);
}

// Gathers the row's teacher logits and writes row_max, sums and gathered for row n.
template <typename scalar_t, typename acc_t, typename id_t>
__device__ __forceinline__ void finalize_row(const ShardArgs<scalar_t, id_t>& a, int64_t n,
                                             MaxSum<acc_t> mr, bool has_repeat,
                                             smem_ptr<acc_t> scratch) {
  const scalar_t* z = a.logits + n * a.row_stride;
  const id_t* ids = a.ids + n * a.K;
  acc_t* x_out = a.gathered + n * a.K;
  const acc_t M = mr.m;
  acc_t teach = acc_t(0), dup = acc_t(0);
  for (int64_t k = threadIdx.x; k < a.K; k += blockDim.x) {
    const int64_t id = static_cast<int64_t>(ids[k]);
    const int64_t c = id - a.vocab_start;
    if (id < 0 || c < 0 || c >= a.V) {
      x_out[k] = acc_t(0);
      continue;
    }
    const acc_t x = static_cast<acc_t>(z[c]) * a.inv_t;
    x_out[k] = x;
    const acc_t e = precise_exp(x - M);
    bool first = true;
    if (has_repeat) {
      for (int64_t k2 = 0; k2 < k; ++k2) {
        if (static_cast<int64_t>(ids[k2]) == id) {
          first = false;
          break;
        }
      }
    }
    if (first) teach += e;
    else dup += e;
  }
  teach = block_sum(teach, scratch);
  dup = block_sum(dup, scratch);
  if (threadIdx.x == 0) {
    a.row_max[n] = M;
    a.sums[3 * n + 0] = mr.s;
    a.sums[3 * n + 1] = teach;
    a.sums[3 * n + 2] = dup;
  }
}

template <typename scalar_t, typename id_t, bool kSplit>
__global__ void __launch_bounds__(kShardPassMaxThreads, 2)
    shard_pass_kernel(const ShardArgs<scalar_t, id_t> a) {
  using acc_t = acc_of<scalar_t>;
  constexpr int VEC = vec_of<scalar_t>();
  const smem_ptr<uint32_t> bm = dynamic_shared_memory<uint32_t>();
  TD_SHARED_ARRAY(acc_t, red_m, 32);
  TD_SHARED_ARRAY(acc_t, red_s, 32);

  zero_bitmap(bm, a.bitmap_words);
  const int64_t work = a.N * a.splits;
  for (int64_t w = blockIdx.x; w < work; w += gridDim.x) {
    const int64_t n = w / a.splits, sp = w - n * a.splits;
    const int64_t r0 = sp * a.chunk, r1 = std::min(a.V, r0 + a.chunk);
    const scalar_t* z = a.logits + n * a.row_stride;
    const id_t* ids = a.ids + n * a.K;
    const int sh = static_cast<int>((misalignment(z) + r0) % VEC);

    const bool repeat = mark_teacher_columns(bm, ids, a.K, a.vocab_start, r0, r1, sh);
    const MaxSum<acc_t> mr = range_max_rest<scalar_t, acc_t>(z, r0, r1, sh, bm, a.inv_t, red_m, red_s);
    // (range_max_rest ends with barriers: nobody reads the bitmap any more)
    clear_teacher_columns(bm, ids, a.K, a.vocab_start, r0, r1, sh);
    if constexpr (kSplit) {
      if (threadIdx.x == 0) {
        a.partials[3 * w + 0] = mr.m;
        a.partials[3 * w + 1] = mr.s;
        a.partials[3 * w + 2] = repeat ? acc_t(1) : acc_t(0);
      }
    } else {
      finalize_row<scalar_t, acc_t, id_t>(a, n, mr, repeat, red_m);
    }
    __syncthreads();  // clears done before the next row's marks
  }
}

// Split path, step 2: one block per row merges the ranges' (max, rest) and finalises the row.
template <typename scalar_t, typename id_t>
__global__ void __launch_bounds__(kShardCombineThreads)
    shard_combine_kernel(const ShardArgs<scalar_t, id_t> a) {
  using acc_t = acc_of<scalar_t>;
  TD_SHARED_ARRAY(acc_t, red_m, 32);
  TD_SHARED_ARRAY(acc_t, red_s, 32);
  for (int64_t n = blockIdx.x; n < a.N; n += gridDim.x) {
    const acc_t* part = a.partials + 3 * n * a.splits;
    MaxSum<acc_t> v{neg_inf<acc_t>(), acc_t(0)};
    int repeat = 0;
    for (int64_t sp = threadIdx.x; sp < a.splits; sp += blockDim.x) {
      v = merge_max_sum(v, MaxSum<acc_t>{part[3 * sp], part[3 * sp + 1]});
      repeat |= part[3 * sp + 2] != acc_t(0);
    }
    const bool has_repeat = __syncthreads_or(repeat) != 0;
    v = block_max_sum(v, red_m, red_s);
    finalize_row<scalar_t, acc_t, id_t>(a, n, v, has_repeat, red_m);
  }
}

TD_CUDA_NAMESPACE_END
