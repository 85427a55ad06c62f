// Device helpers shared by the CUDA kernels of topk-distill: accumulation types, 16-byte packs,
// deterministic block reductions and the per-block teacher-column bitmap. Device code: CUDA only
// through portability.cuh (compiled by nvcc and by the emulator, see there).
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "../launch_geometry.h"
#include "../portability.cuh"

TD_CUDA_NAMESPACE_BEGIN

constexpr unsigned kFullMask = 0xffffffffu;

// fp64 logits accumulate in fp64, everything else in fp32 (ops.h: acc_dtype).
template <typename scalar_t>
using acc_of = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Elements per 16-byte load: 8 bf16/fp16, 4 fp32, 2 fp64.
template <typename scalar_t>
constexpr int vec_of() { return 16 / static_cast<int>(sizeof(scalar_t)); }

template <typename T>
__device__ __forceinline__ T neg_inf() { return -std::numeric_limits<T>::infinity(); }
template <typename T>
__device__ __forceinline__ T quiet_nan() { return std::numeric_limits<T>::quiet_NaN(); }

// exp for the O(V) streams: the SFU approximation in fp32 (ex2.approx, ~2 ulp plus the rounding
// of its argument - far inside the fp32 tolerances, and the CPU kernels' own exp is a polynomial
// approximation too), the libdevice exp in fp64.
__device__ __forceinline__ float fast_exp(float x) { return __expf(x); }
__device__ __forceinline__ double fast_exp(double x) { return ::exp(x); }
// exp for the O(K) terms and the merges of partial sums: correctly rounded to ~1 ulp.
__device__ __forceinline__ float precise_exp(float x) { return ::expf(x); }
__device__ __forceinline__ double precise_exp(double x) { return ::exp(x); }

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t v[VEC];
};

template <typename acc_t, typename scalar_t, int VEC>
__device__ __forceinline__ void load_pack(const scalar_t* p, acc_t (&x)[VEC]) {
  const Pack<scalar_t, VEC> pk = *reinterpret_cast<const Pack<scalar_t, VEC>*>(p);
#pragma unroll
  for (int i = 0; i < VEC; ++i) x[i] = static_cast<acc_t>(pk.v[i]);
}

// Misalignment of a row pointer in elements: the row's first 16-byte aligned column is
// (VEC - mis) % VEC. Tensors of scalar_t are always sizeof(scalar_t)-aligned.
template <typename scalar_t>
__device__ __forceinline__ int misalignment(const scalar_t* p) {
  return static_cast<int>((reinterpret_cast<uintptr_t>(p) / sizeof(scalar_t)) %
                          static_cast<uintptr_t>(vec_of<scalar_t>()));
}

// ---------------------------------------------------------------------------------------------
// Reductions. Every thread of the block gets the same result, computed in the same order, so
// results are bitwise reproducible run to run. blockDim.x must be a multiple of 32 (<= 1024).
// ---------------------------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;  // IEEE addition commutes, so every lane holds the same bits
}

template <typename T>
__device__ __forceinline__ T block_sum(T v, smem_ptr<T> scratch /* [32] */) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T r = lane < warps ? scratch[lane] : T(0);
  r = warp_sum(r);
  __syncthreads();  // scratch may be reused right away
  return r;
}

// (max, sum of exp(x - max)) pairs. The merge is symmetric in its two arguments, NaN is sticky
// and a -inf max (nothing but -inf seen) is the identity.
template <typename acc_t>
struct MaxSum {
  acc_t m;
  acc_t s;
};

template <typename acc_t>
__device__ __forceinline__ MaxSum<acc_t> merge_max_sum(MaxSum<acc_t> a, MaxSum<acc_t> b) {
  if (a.m != a.m || b.m != b.m) return {quiet_nan<acc_t>(), quiet_nan<acc_t>()};
  if (a.m == neg_inf<acc_t>()) return b.m == neg_inf<acc_t>() ? MaxSum<acc_t>{a.m, a.s + b.s} : b;
  if (b.m == neg_inf<acc_t>()) return a;
  const acc_t m = a.m > b.m ? a.m : b.m;
  return {m, a.s * precise_exp(a.m - m) + b.s * precise_exp(b.m - m)};
}

template <typename acc_t>
__device__ __forceinline__ MaxSum<acc_t> warp_max_sum(MaxSum<acc_t> v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    MaxSum<acc_t> other{__shfl_xor_sync(kFullMask, v.m, o), __shfl_xor_sync(kFullMask, v.s, o)};
    v = merge_max_sum(v, other);
  }
  return v;
}

template <typename acc_t>
__device__ __forceinline__ MaxSum<acc_t> block_max_sum(MaxSum<acc_t> v, smem_ptr<acc_t> sm /* [32] */,
                                                       smem_ptr<acc_t> ss /* [32] */) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_max_sum(v);
  if (lane == 0) {
    sm[warp] = v.m;
    ss[warp] = v.s;
  }
  __syncthreads();
  MaxSum<acc_t> r = lane < warps ? MaxSum<acc_t>{sm[lane], ss[lane]}
                                 : MaxSum<acc_t>{neg_inf<acc_t>(), acc_t(0)};
  r = warp_max_sum(r);
  __syncthreads();
  return r;
}

// ---------------------------------------------------------------------------------------------
// The teacher-column bitmap of one block's column range [r0, r1) of a row, in shared memory.
// Bit (j - r0 + sh) marks column j, with sh = (mis + r0) % VEC chosen so that every 16-byte
// aligned column lands on a bit index that is a multiple of VEC: the VEC bits of a packed load
// then sit in one 32-bit word and cost one shared-memory read. Words needed:
// bitmap_words(range) (one spare so that a shift never reads past the end).
// ---------------------------------------------------------------------------------------------

__host__ __device__ constexpr int64_t bitmap_words(int64_t range) { return (range + 64) / 32 + 1; }

// Marks the in-range teacher columns; returns (to every thread) whether some column was marked
// twice, i.e. the row has a repeated id in this range. Ends with a block barrier.
template <typename id_t>
__device__ __forceinline__ bool mark_teacher_columns(smem_ptr<uint32_t> bm, const id_t* ids, int64_t K,
                                                     int64_t vocab_start, int64_t r0, int64_t r1,
                                                     int sh) {
  int dup = 0;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    const int64_t id = static_cast<int64_t>(ids[k]);
    if (id < 0) continue;  // padding
    const int64_t c = id - vocab_start;
    if (c < r0 || c >= r1) continue;  // another shard / another block's range / invalid id
    const int64_t b = c - r0 + sh;
    const uint32_t bit = 1u << (b & 31);
    dup |= (atomicOr(&bm[b >> 5], bit) & bit) != 0;
  }
  return __syncthreads_or(dup) != 0;
}

// Undoes mark_teacher_columns (whole words: they hold no other marks afterwards). The caller
// must have a barrier between the last bitmap read and this, and another before the next mark.
template <typename id_t>
__device__ __forceinline__ void clear_teacher_columns(smem_ptr<uint32_t> bm, const id_t* ids, int64_t K,
                                                      int64_t vocab_start, int64_t r0, int64_t r1,
                                                      int sh) {
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    const int64_t id = static_cast<int64_t>(ids[k]);
    if (id < 0) continue;
    const int64_t c = id - vocab_start;
    if (c < r0 || c >= r1) continue;
    bm[(c - r0 + sh) >> 5] = 0u;
  }
}

__device__ __forceinline__ void zero_bitmap(smem_ptr<uint32_t> bm, int64_t words) {
  for (int64_t i = threadIdx.x; i < words; i += blockDim.x) bm[i] = 0u;
  __syncthreads();
}

template <int VEC>
__device__ __forceinline__ uint32_t bitmap_bits(smem_ptr<const uint32_t> bm, int64_t b) {
  return (bm[b >> 5] >> (b & 31)) & ((VEC >= 32) ? kFullMask : ((1u << VEC) - 1u));
}

TD_CUDA_NAMESPACE_END
