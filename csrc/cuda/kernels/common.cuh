// Device helpers shared by the CUDA kernels of topk-distill: accumulation types, 16-byte packs,
// the logits' row layout, exp2 with log2(e) folded in, deterministic block reductions, the
// mergeable per-row statistics and the per-block teacher-column bitmap. Device code: CUDA only
// through portability.cuh (compiled by nvcc and by the emulator, see there).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "../launch_geometry.h"
#include "../portability.cuh"

TD_CUDA_NAMESPACE_BEGIN

constexpr unsigned kFullMask = 0xffffffffu;
constexpr double kLog2e = 1.4426950408889634074;
constexpr double kLn2 = 0.69314718055994530942;

// fp64 logits accumulate in fp64, everything else in fp32 (ops.h: acc_dtype).
template <typename scalar_t>
using acc_of = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Elements per 16-byte load: 8 bf16/fp16, 4 fp32, 2 fp64.
template <typename scalar_t>
constexpr int vec_of() { return 16 / static_cast<int>(sizeof(scalar_t)); }

template <typename T>
__device__ __forceinline__ T neg_inf() { return -std::numeric_limits<T>::infinity(); }
template <typename T>
__device__ __forceinline__ T pos_inf() { return std::numeric_limits<T>::infinity(); }
template <typename T>
__device__ __forceinline__ T quiet_nan() { return std::numeric_limits<T>::quiet_NaN(); }
template <typename T>
__device__ __forceinline__ T lowest() { return std::numeric_limits<T>::lowest(); }

// 2^x for the O(V) streams. fp32: ex2.approx.ftz (one MUFU, no range fix-up; results below
// 2^-126 flush to 0, as the CPU kernels' polynomial exp flushes them too; the emulator's is exact
// exp2 with the same flush). fp64: the libdevice exp2. Callers fold log2(e) into their scale and
// shift once per row (see shard_pass.cuh / backward.cuh for how the rounding of the folded
// constant is corrected exactly), so no element pays a multiply by log2(e).
__device__ __forceinline__ float fast_exp2(float x) { return exp2_approx_ftz(x); }
__device__ __forceinline__ double fast_exp2(double x) { return ::exp2(x); }
// exp for the O(K) terms and the merges of partial sums: correctly rounded to ~1 ulp.
__device__ __forceinline__ float precise_exp(float x) { return ::expf(x); }
__device__ __forceinline__ double precise_exp(double x) { return ::exp(x); }
// max that ignores a NaN operand (one FMNMX): NaN is tracked apart, through the sums.
__device__ __forceinline__ float max_ignore_nan(float a, float b) { return ::fmaxf(a, b); }
__device__ __forceinline__ double max_ignore_nan(double a, double b) { return ::fmax(a, b); }

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t v[VEC];
};

// bf16 / fp16 told apart without naming c10's types (their numeric_limits say it).
template <typename scalar_t>
constexpr bool is_bf16() { return sizeof(scalar_t) == 2 && std::numeric_limits<scalar_t>::digits == 8; }
template <typename scalar_t>
constexpr bool is_f16() { return sizeof(scalar_t) == 2 && std::numeric_limits<scalar_t>::digits == 11; }

// A pack's values in acc_t. bf16: the high half of each 32-bit pair is already a float's top
// bits (one LOP per value instead of a byte permute and a shift), exactly c10's conversion.
template <typename acc_t, typename scalar_t, int VEC>
__device__ __forceinline__ void unpack(const Pack<scalar_t, VEC>& pk, acc_t (&x)[VEC]) {
  if constexpr (is_bf16<scalar_t>() && std::is_same_v<acc_t, float>) {
    uint32_t w[VEC / 2];
    memcpy(w, &pk, sizeof(w));  // (not a reinterpret_cast: strict aliasing, in the host build)
#pragma unroll
    for (int i = 0; i < VEC / 2; ++i) {
      x[2 * i] = bits_to_float(w[i] << 16);
      x[2 * i + 1] = bits_to_float(w[i] & 0xffff0000u);
    }
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) x[i] = static_cast<acc_t>(pk.v[i]);
  }
}

template <typename acc_t, typename scalar_t, int VEC>
__device__ __forceinline__ void load_pack(gmem_ptr<const scalar_t> p, acc_t (&x)[VEC]) {
  // (a copy of the whole pack first: one 16-byte load, not one per 32-bit word)
  const Pack<scalar_t, VEC> pk = *gmem_cast<const Pack<scalar_t, VEC>>(p);
  unpack(pk, x);
}

// acc_t values rounded to nearest even into a pack; bf16 / fp16 two at a time (one F2FP).
template <typename scalar_t, int VEC, typename acc_t>
__device__ __forceinline__ Pack<scalar_t, VEC> repack(const acc_t (&x)[VEC]) {
  Pack<scalar_t, VEC> pk;
  if constexpr ((is_bf16<scalar_t>() || is_f16<scalar_t>()) && std::is_same_v<acc_t, float> &&
                VEC % 2 == 0) {
    uint32_t w[VEC / 2];
#pragma unroll
    for (int i = 0; i < VEC / 2; ++i) {
      w[i] = is_bf16<scalar_t>() ? pack_bf16x2_rn(x[2 * i], x[2 * i + 1])
                                 : pack_f16x2_rn(x[2 * i], x[2 * i + 1]);
    }
    memcpy(&pk, w, sizeof(w));
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) pk.v[i] = static_cast<scalar_t>(x[i]);
  }
  return pk;
}

// Misalignment of a row pointer in elements: the row's first 16-byte aligned column is
// (VEC - mis) % VEC. Tensors of scalar_t are always sizeof(scalar_t)-aligned.
template <typename Ptr>
__device__ __forceinline__ int misalignment(const Ptr& p) {
  using scalar_t = std::remove_cv_t<std::remove_reference_t<decltype(*p)>>;
  return static_cast<int>((address_of(p) / sizeof(scalar_t)) %
                          static_cast<uintptr_t>(vec_of<scalar_t>()));
}

// Where row n of a [N, V] or [B, T, V] tensor starts (csrc/ops.h RowLayout, SPEC 9.1): element
// offset (n / T) * outer + (n % T) * inner. Computed once per row, never per element. Row and
// work-item indices are below 2^31 (the host launchers check it): 32-bit divisions, inline,
// where a 64-bit one is a subroutine call whose register saves would count as spills.
struct RowMap {
  uint32_t T;
  int64_t outer, inner;
  __host__ __device__ __forceinline__ int64_t offset(int64_t n) const {
    const uint32_t n32 = static_cast<uint32_t>(n);
    const uint32_t b = n32 / T;
    return static_cast<int64_t>(b) * outer + static_cast<int64_t>(n32 - b * T) * inner;
  }
};

// (row, column range) of work item w < 2^31 of a grid over N rows x `splits` ranges.
struct WorkItem {
  int64_t n, sp;
};
__device__ __forceinline__ WorkItem work_item(int64_t w, int64_t splits) {
  const uint32_t n = static_cast<uint32_t>(w) / static_cast<uint32_t>(splits);
  return {static_cast<int64_t>(n), w - static_cast<int64_t>(n) * splits};
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

// Sums NV values over the block at once (one pair of barriers). scratch: [NV * 32].
template <int NV, typename T>
__device__ __forceinline__ void block_sum_n(T (&v)[NV], smem_ptr<T> scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
  for (int j = 0; j < NV; ++j) v[j] = warp_sum(v[j]);
  if (lane == 0) {
#pragma unroll
    for (int j = 0; j < NV; ++j) scratch[j * 32 + warp] = v[j];
  }
  __syncthreads();
#pragma unroll
  for (int j = 0; j < NV; ++j) v[j] = warp_sum(lane < warps ? scratch[j * 32 + lane] : T(0));
  __syncthreads();  // scratch may be reused right away
}

template <typename T>
__device__ __forceinline__ T block_sum(T v, smem_ptr<T> scratch /* [32] */) {
  T a[1] = {v};
  block_sum_n<1>(a, scratch);
  return a[0];
}

// ---------------------------------------------------------------------------------------------
// A row's (or a column range's) streaming statistics in natural units, mergeable:
//   m     the max of z / T (NaN logits ignored: NaN is detected through the sums),
//   rest  sum of exp(z/T - m) over the non-teacher columns,
//   all   ... over every column (what the entropy sum's rescale needs),
//   ent   sum over every column of exp(z/T - m) (z/T - m)  (entropy instantiation; else 0).
// merge() is canonical: the operand with the larger m is always `hi`, and with equal m the
// result is a plain sum, so merge(a, b) and merge(b, a) are the same expression with the same
// roundings (FMAs spelled out with fma_rn): both lanes of a butterfly step hold identical bits.
// A -inf m (nothing but -inf seen) contributes nothing; NaN sums stay NaN.
// ---------------------------------------------------------------------------------------------

template <typename acc_t>
struct RowStat {
  acc_t m, rest, all, ent;
};

template <typename acc_t>
__device__ __forceinline__ RowStat<acc_t> identity_stat() {
  return {neg_inf<acc_t>(), acc_t(0), acc_t(0), acc_t(0)};
}

template <typename acc_t>
__device__ __forceinline__ RowStat<acc_t> merge_stat(const RowStat<acc_t>& a,
                                                     const RowStat<acc_t>& b) {
  const bool a_hi = !(b.m > a.m);
  // (field-wise selects, not references: a selected reference would put both in local memory)
  const RowStat<acc_t> hi{a_hi ? a.m : b.m, a_hi ? a.rest : b.rest, a_hi ? a.all : b.all,
                          a_hi ? a.ent : b.ent};
  const RowStat<acc_t> lo{a_hi ? b.m : a.m, a_hi ? b.rest : a.rest, a_hi ? b.all : a.all,
                          a_hi ? b.ent : a.ent};
  if (hi.m == lo.m) return {hi.m, hi.rest + lo.rest, hi.all + lo.all, hi.ent + lo.ent};
  if (lo.m == neg_inf<acc_t>() || hi.m == pos_inf<acc_t>()) {
    // lo is worth nothing next to hi (0 * its sums keeps a NaN, drops the rest)
    const acc_t zero = mul_rn(lo.rest + lo.all + lo.ent, acc_t(0));
    return {hi.m, hi.rest + zero, hi.all + zero, hi.ent + zero};
  }
  const acc_t d = lo.m - hi.m;  // < 0
  const acc_t f = precise_exp(d);
  // S2' = (S2 + (m - m') S1_all) e^(m - m')  (SPEC 9.2)
  return {hi.m, fma_rn(lo.rest, f, hi.rest), fma_rn(lo.all, f, hi.all),
          fma_rn(fma_rn(d, lo.all, lo.ent), f, hi.ent)};
}

template <typename acc_t>
__device__ __forceinline__ RowStat<acc_t> warp_merge_stat(RowStat<acc_t> v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const RowStat<acc_t> other{__shfl_xor_sync(kFullMask, v.m, o),
                               __shfl_xor_sync(kFullMask, v.rest, o),
                               __shfl_xor_sync(kFullMask, v.all, o),
                               __shfl_xor_sync(kFullMask, v.ent, o)};
    v = merge_stat(v, other);
  }
  return v;
}

// Every thread gets the block's merge. scratch: [4 * 32].
template <typename acc_t>
__device__ __forceinline__ RowStat<acc_t> block_merge_stat(RowStat<acc_t> v,
                                                           smem_ptr<acc_t> scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_merge_stat(v);
  if (lane == 0) {
    scratch[warp] = v.m;
    scratch[32 + warp] = v.rest;
    scratch[64 + warp] = v.all;
    scratch[96 + warp] = v.ent;
  }
  __syncthreads();
  RowStat<acc_t> r = identity_stat<acc_t>();
  if (lane < warps) r = {scratch[lane], scratch[32 + lane], scratch[64 + lane], scratch[96 + lane]};
  r = warp_merge_stat(r);
  __syncthreads();
  return r;
}

// ---------------------------------------------------------------------------------------------
// The teacher-column bitmap of one block's column range [r0, r1) of a row, in shared memory.
// Bit (j - r0 + sh) marks column j, with sh = (mis + r0) % VEC chosen so that every 16-byte
// aligned column lands on a bit index that is a multiple of VEC: the VEC bits of a packed load
// then sit in one 32-bit word and cost one shared-memory read. Words needed:
// bitmap_words(range) (launch_geometry.h; one spare so that a shift never reads past the end).
// ---------------------------------------------------------------------------------------------

// Every word is written by exactly one thread (word i by thread i mod blockDim): a block that
// reuses its bitmap for the next row zeroes it whole rather than undoing its marks, because
// undoing them would have several threads store 0 to one word (ids in the same 32 columns),
// harmless on the hardware but a hazard that compute-sanitizer's racecheck reports. The cost is
// bitmap_words stores per row (one per 32 columns), next to the row's V loads.
__device__ __forceinline__ void zero_bitmap(smem_ptr<uint32_t> bm, int64_t words) {
  for (int64_t i = threadIdx.x; i < words; i += blockDim.x) bm[i] = 0u;
  __syncthreads();
}


template <int VEC>
__device__ __forceinline__ uint32_t bitmap_bits(smem_ptr<const uint32_t> bm, int b) {
  return (bm[b >> 5] >> (b & 31)) & ((VEC >= 32) ? kFullMask : ((1u << VEC) - 1u));
}

// The first copy of each repeated id (lowest k) in a row that has repeats: the host sorts each
// row's ids once (stable: at::sort), so entry k = order[p] is the first copy of its id iff p == 0
// or sorted[p - 1] != sorted[p], and its copies are the run sorted[p..]. O(K) per row after an
// O(K log K) sort, instead of an O(K^2) scan.
template <typename IdPtr>
__device__ __forceinline__ bool first_in_run(const IdPtr& sorted, int64_t p) {
  return p == 0 || sorted[p - 1] != sorted[p];
}

TD_CUDA_NAMESPACE_END
