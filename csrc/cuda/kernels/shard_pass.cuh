// CUDA shard pass, device code: one read of this rank's logits (semantics: the shard_pass schema
// in csrc/registration.cpp; the CPU kernel csrc/cpu/shard_pass.cpp computes the same).
//
// Memory traffic: reads N * V_r logits once, in packs of 16 bytes (a row that is not 16-byte
// aligned: each pack from its aligned block plus exactly the next block's first MIS elements,
// one to three loads of 8 / 4 / 2 bytes, an L1 hit; V_r % VEC columns one by one); reads the N * K ids once (twice on the split path, or for a row with a repeated id) and
// each in-shard teacher logit once more (K scattered elements per row, issued while marking so
// that their latency hides behind the stream); writes N * (6 + K + L) acc values. Nothing of size
// [N, V_r] is allocated; the split path adds a [N, splits, 8] workspace.
//
// Work split: one block per (row, column range). With enough rows a range is the whole row;
// with few long rows (N * V_r >> N, e.g. N = 64, V_r = 262144) each row is cut into ranges of
// >= 8192 columns so that ~4 blocks per SM are busy, and a second small kernel (one block per
// row) merges the ranges' statistics and finalises the row. Per block:
//   1. marks: the row's in-range teacher columns are set in a shared-memory bitmap (zeroed
//      whole first, one writer per word - see zero_bitmap - then atomicOr,
//      which also counts the distinct columns and detects a repeated id); without a split, each
//      thread also issues the load of its first teacher logit here;
//   2. the stream: every thread reads its packs once (which thread sums which column depends on
//      the column indices only, so a row's results do not depend on where it is stored: a view
//      and its contiguous copy agree bitwise), keeping in registers the raw max zmax and,
//      relative to shift = zmax * c (c = log2(e) / T, rounded once), rest = sum of
//      2^(z c - shift) over the unmarked columns (and, with entropy, the marked columns' sum and
//      sum 2^y * y). The common iteration (4 packs, no new max, no marked column) is a loop of
//      its own: per logit one convert, one FMNMX, one FFMA, one MUFU.EX2 (ftz) and one FADD; a
//      new max or a marked column leaves it for one iteration that rescales and masks;
//   3. each thread converts its sums to natural units relative to M = zmax / T (the rounding of
//      c and of the shift is undone exactly, in fp64, by one factor per thread), then a
//      deterministic block merge gives the range's (M, rest, all, ent);
//   4. the row's finaliser (same kernel without split, else the combine kernel) writes the
//      gathered logits and sums exp(x_k - M) over the distinct ("teach") and repeated ("dup")
//      in-shard entries - for a row with a repeat, in the order of the host's stable sort of
//      the row's ids (first copy = lowest k), O(K) - and the label's logit.
// NaN: the max ignores NaN (one FMNMX); a NaN logit shows in rest (non-teacher column) or in its
// gathered value (teacher column); a range whose max is +inf (where inf - inf also makes NaN) is
// rescanned for NaN. A NaN logit makes the row's max NaN and every sum with a term NaN, as on
// the CPU (the distinct-column count stays).
// Accumulation is fp32 (fp64 for fp64 logits).
//
// Reads outside the row (what compute-sanitizer's memcheck would see): a row that is not
// 16-byte aligned reads, on purpose, the MIS elements before its first column that share its
// first 16-byte block (one aligned 16-byte load; allowed and bounded: never more than 16 - the
// element size bytes, never outside that block). The block lies inside the allocation whenever
// the storage's base is 16-byte aligned, which every torch allocator guarantees (CUDA: 256 / 512
// bytes, CPU: 64), so memcheck - which checks allocations - cannot report it; the emulator
// checks it against the tensor's storage. After the row nothing is read: the heads of the next
// blocks are loaded exactly (8 / 4 / 2-byte pieces), not rounded up to 8 bytes, so the last
// pack of the last row of a storage that does not end on 16 bytes stays inside it.
//
// Device code only: CUDA through portability.cuh; the host launcher is csrc/cuda/shard_pass.cu.
#pragma once

#include <cstdint>

#include "common.cuh"

TD_CUDA_NAMESPACE_BEGIN

// Threads per block: at most this (threads_for), four blocks per SM (__launch_bounds__: 64
// registers). 256 x 4 rather than 512 x 2: the same registers and threads per SM, but while one
// block is in its prologue (marks) or epilogue (reductions, gathers) three quarters of the SM
// still stream instead of half.
// fp64 (not budgeted; its libdevice exp2 alone needs more) gets two blocks, 128 registers.
constexpr int kShardPassMaxThreads = kMaxStreamThreads;
static_assert(kShardPassMaxThreads == 256, "the launch bounds below assume 256");
constexpr int kShardCombineThreads = 128;
constexpr int kPartialFields = 8;  // m, rest, all, ent, distinct columns, NaN, repeat, (spare)

template <typename scalar_t, typename id_t>
struct ShardArgs {
  using acc_t = acc_of<scalar_t>;
  gmem_ptr<const scalar_t> logits;
  RowMap rows;
  int64_t N, V, K;
  gmem_ptr<const id_t> ids;         // [N, K]
  gmem_ptr<const id_t> sorted;      // [N, K]: each row's ids sorted (stable), or null when K <= 1
  gmem_ptr<const int64_t> order;    // [N, K]: their positions k
  gmem_ptr<const int64_t> labels;   // [N] or null
  int64_t vocab_start;
  acc_t inv_t;             // fl(inv_temperature)
  acc_t c;                 // fl(inv_t * log2(e))
  double c_ln2_minus_inv_t;  // c * ln2 - inv_t in fp64: the relative rounding of c, times inv_t
  int64_t splits, chunk, bitmap_words;
  gmem_ptr<acc_t> row_max;          // [N]
  gmem_ptr<acc_t> sums;             // [N, 5]
  gmem_ptr<acc_t> gathered;         // [N, K + L]
  int64_t gathered_cols;   // K + L
  gmem_ptr<acc_t> partials;         // [N, splits, kPartialFields] (split path only)
};

// ---------------------------------------------------------------------------------------------
// The stream: one thread's running state, in base 2 (see the file comment).
// ---------------------------------------------------------------------------------------------

template <typename acc_t>
__device__ __forceinline__ acc_t ent_floor() {
  // e * max(y, floor) == e * y except where e == 0 (y = -inf: 0 * -inf would be NaN)
  return std::is_same_v<acc_t, float> ? acc_t(-256) : acc_t(-2048);
}

template <typename acc_t, bool kEnt>
struct StreamState {
  acc_t zmax;   // max raw logit seen (NaN ignored)
  acc_t shift;  // fl(zmax * c), clamped above -inf: the base-2 reference of the sums
  acc_t rest;   // sum over unmarked columns of 2^(z c - shift)
  acc_t tsum;   // kEnt: ... over marked columns
  acc_t ent;    // kEnt: sum over all columns of 2^y * y, y = z c - shift

  __device__ __forceinline__ void init() {
    zmax = neg_inf<acc_t>();
    shift = lowest<acc_t>();  // finite: an all -inf range gives 2^-inf = 0, never -inf + inf
    rest = tsum = ent = acc_t(0);
  }

  // cm: the max of some new raw logits. Rare after the first packs of a row.
  __device__ __forceinline__ void raise(acc_t cm, acc_t c) {
    if (!(cm > zmax)) return;
    // (mul_rn: these products are kept and later added to; nvcc must not fuse them into the add)
    const acc_t ns = max_ignore_nan(mul_rn(cm, c), lowest<acc_t>());
    if (zmax != neg_inf<acc_t>()) {  // (before: nothing but -inf / NaN, sums 0 or NaN)
      const acc_t d = shift - ns;
      const acc_t f = fast_exp2(d);
      if constexpr (kEnt) {
        // y' = y + d, e' = e 2^d:  sum e' y' = 2^d (sum e y + d sum_all e)
        ent = mul_rn(fma_rn(d, rest + tsum, ent), f);
        tsum = mul_rn(tsum, f);
      }
      rest = mul_rn(rest, f);
    }
    zmax = cm;
    shift = ns;
  }

  // VEC columns, none marked, none above zmax: the hot path.
  template <int VEC>
  __device__ __forceinline__ void add_fast(const acc_t (&x)[VEC], acc_t c) {
    acc_t e[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const acc_t y = fma_rn(x[i], c, -shift);
      e[i] = fast_exp2(y);
      if constexpr (kEnt) ent = fma_rn(e[i], max_ignore_nan(y, ent_floor<acc_t>()), ent);
    }
#pragma unroll
    for (int w = 1; w < VEC; w *= 2) {  // pairwise: shorter dependency chains, same count
#pragma unroll
      for (int i = 0; i + w < VEC; i += 2 * w) e[i] += e[i + w];
    }
    rest += e[0];
  }

  // VEC columns with their marks (bit i = column i); raise() must have seen their max. The same
  // pairwise sum as add_fast: without a mark, both paths give the same bits.
  template <int VEC>
  __device__ __forceinline__ void add_masked(const acc_t (&x)[VEC], uint32_t bits, acc_t c) {
    acc_t e[VEC], m[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const acc_t y = fma_rn(x[i], c, -shift);
      const acc_t ei = fast_exp2(y);
      const bool marked = (bits >> i) & 1u;
      e[i] = marked ? acc_t(0) : ei;
      m[i] = marked ? ei : acc_t(0);
      if constexpr (kEnt) ent = fma_rn(ei, max_ignore_nan(y, ent_floor<acc_t>()), ent);
    }
#pragma unroll
    for (int w = 1; w < VEC; w *= 2) {
#pragma unroll
      for (int i = 0; i + w < VEC; i += 2 * w) {
        e[i] += e[i + w];
        m[i] += m[i + w];
      }
    }
    rest += e[0];
    if constexpr (kEnt) tsum += m[0];
  }

  // In natural units relative to M = zmax * inv_t (rounded as the CPU kernel does). Element v
  // was summed as 2^(y_v), y_v = fl(x_v c - shift); exp(x_v inv_t - M) = 2^(y_v) * exp(lnr)
  // with lnr = shift ln2 - M - x_v (c ln2 - inv_t), up to (zmax - x_v)(c ln2 - inv_t) - a
  // relative 6e-6 on an element e^100 below the max - so one factor per thread, computed in
  // fp64 from exact products, undoes the rounding of c and of the shift. With |z| ~ 1e4 the
  // shift alone is off by ~1e-3, which this restores to the CPU kernel's accuracy.
  __device__ __forceinline__ RowStat<acc_t> finish(acc_t inv_t, double c_ln2_minus_inv_t) const {
    const acc_t all = kEnt ? rest + tsum : rest;
    if (!(zmax > neg_inf<acc_t>() && zmax < pos_inf<acc_t>())) {
      return {zmax, rest, all, kEnt ? ent : acc_t(0)};
    }
    // (mul_rn: M is stored as the row max and used below; every product that is added to is
    // rounded on its own, as the emulator and the CPU kernel round it)
    const acc_t M = mul_rn(zmax, inv_t);
    const double lnr = mul_rn(static_cast<double>(shift), kLn2) - static_cast<double>(M) -
                       mul_rn(static_cast<double>(zmax), c_ln2_minus_inv_t);
    const acc_t corr = static_cast<acc_t>(::exp(lnr));
    acc_t s2 = acc_t(0);
    if constexpr (kEnt) {
      s2 = corr * (mul_rn(ent, static_cast<acc_t>(kLn2)) + mul_rn(static_cast<acc_t>(lnr), all));
    }
    return {M, rest * corr, all * corr, s2};
  }
};

// Logical pack i of a range: its columns [VEC i, VEC i + VEC), anchored at the range's first
// column (a multiple of 64, so at the row's column 0 too), whatever the row's address. zb is the
// 16-byte aligned address MIS elements before the range's first column (MIS = the row's
// misalignment). MIS == 0: one 16-byte load. Else the aligned block holding the pack's first
// elements (16 bytes) and exactly the next block's first MIS elements (MIS * sizeof bytes as
// naturally aligned 8 / 4 / 2-byte pieces, which the neighbouring thread's 16-byte load brings
// into L1): 2-4 loads, the same bytes from DRAM. Nothing past the range's last pack is read;
// before the range, only the MIS elements that share its first aligned block (file comment).
template <typename scalar_t, int N>
__device__ __forceinline__ Pack<scalar_t, N> load_piece(gmem_ptr<const scalar_t> p) {
  return *gmem_cast<const Pack<scalar_t, N>>(p);
}

template <int MIS, typename scalar_t, typename acc_t, int VEC>
__device__ __forceinline__ void load_logical(gmem_ptr<const scalar_t> zb, int i, acc_t (&x)[VEC]) {
  if constexpr (MIS == 0) {
    load_pack<acc_t, scalar_t, VEC>(zb + i * VEC, x);
  } else {
    constexpr int S = static_cast<int>(sizeof(scalar_t));
    constexpr int HB = MIS * S;                     // head bytes, < 16
    constexpr int N8 = (HB & 8) ? 8 / S : 0;        // elements in the 8-byte piece
    constexpr int N4 = (HB & 4) ? 4 / S : 0;        // ... the 4-byte piece
    constexpr int N2 = (HB & 2) ? 2 / S : 0;        // ... the 2-byte piece (bf16 / fp16)
    static_assert(N8 + N4 + N2 == MIS, "the pieces cover the head exactly");
    acc_t a[VEC];
    load_pack<acc_t, scalar_t, VEC>(zb + i * VEC, a);
    const gmem_ptr<const scalar_t> next = zb + (i + 1) * VEC;  // 16-byte aligned
    scalar_t h[MIS];
    if constexpr (N8 > 0) {
      const auto p = load_piece<scalar_t, (N8 > 0 ? N8 : 1)>(next);
#pragma unroll
      for (int j = 0; j < N8; ++j) h[j] = p.v[j];
    }
    if constexpr (N4 > 0) {
      const auto p = load_piece<scalar_t, (N4 > 0 ? N4 : 1)>(next + N8);
#pragma unroll
      for (int j = 0; j < N4; ++j) h[N8 + j] = p.v[j];
    }
    if constexpr (N2 > 0) h[N8 + N4] = next[N8 + N4];
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      if (e + MIS < VEC) {
        x[e] = a[e + MIS];
      } else {
        x[e] = static_cast<acc_t>(h[e + MIS - VEC]);
      }
    }
  }
}

// This thread's share of the columns [r0, r1) of row z (the block streams them together), in
// natural units. bm: the range's marks (bit j = column r0 + j). Ranges have <= kMaxBlockCols
// columns: 32-bit positions.
//
// Which thread sums which column, and in which order, depends only on the column indices (the
// range and the block size), never on the row's address: logical packs of VEC columns from the
// range's first column, thread t taking packs t, t + B, ...; the last len % VEC columns one per
// thread. So a row gives the same bits wherever it is stored - a view and its contiguous copy,
// any position in a batch (as the CPU kernel guarantees). MIS: the row's misalignment in
// elements (a template argument: every composition of a misaligned pack is fixed at compile
// time, the aligned case pays nothing).
template <typename scalar_t, bool kEnt, int MIS>
__device__ __forceinline__ RowStat<acc_of<scalar_t>> stream_range(
    gmem_ptr<const scalar_t> z, int64_t r0, int64_t r1, smem_ptr<const uint32_t> bm,
    acc_of<scalar_t> inv_t, acc_of<scalar_t> c, double c_ln2_minus_inv_t) {
  using acc_t = acc_of<scalar_t>;
  constexpr int VEC = vec_of<scalar_t>();
  // packs in flight per thread: 4, or 2 where 4 would not fit the 64 registers without spills
  // (fp64: the slow path's fp64 exp2; a misaligned row with the entropy sums: the heads)
  constexpr int U = (sizeof(scalar_t) == 8 || (kEnt && MIS != 0)) ? 2 : 4;
  constexpr uint32_t kPackMask = (VEC >= 32) ? kFullMask : ((1u << VEC) - 1u);
  const int B = blockDim.x;
  StreamState<acc_t, kEnt> st;
  st.init();

  const gmem_ptr<const scalar_t> zr = z + r0;
  const int len = static_cast<int>(r1 - r0);
  const int npk = len / VEC;
  for (int j = npk * VEC + threadIdx.x; j < len; j += B) {  // the last len % VEC columns
    const acc_t x[1] = {static_cast<acc_t>(zr[j])};
    st.raise(x[0], c);
    st.template add_masked<1>(x, (bm[j >> 5] >> (j & 31)) & 1u, c);
  }

  const gmem_ptr<const scalar_t> zb = zr - MIS;  // 16-byte aligned
  const int wstride = B * VEC / 32;  // bitmap words between a thread's consecutive packs
  int i = threadIdx.x;
  acc_t x[U][VEC];
  // Outer loop: one "slow" iteration (new max or a marked column) per pass; the inner loop is
  // the common case and contains nothing else, so its code is the hot loop.
  while (i + (U - 1) * B < npk) {
    bool slow = false;
    acc_t cm;
    int sb;
    uint32_t w[U];
    do {
#pragma unroll
      for (int u = 0; u < U; ++u) load_logical<MIS>(zb, i + u * B, x[u]);
      const int bit = i * VEC;
      sb = bit & 31;
#pragma unroll
      for (int u = 0; u < U; ++u) w[u] = bm[(bit >> 5) + u * wstride];
      cm = x[0][0];
#pragma unroll
      for (int u = 0; u < U; ++u) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) cm = max_ignore_nan(cm, x[u][e]);
      }
      uint32_t any = w[0];
#pragma unroll
      for (int u = 1; u < U; ++u) any |= w[u];
      slow = (cm > st.zmax) || (((any >> sb) & kPackMask) != 0u);
      if (slow) break;
#pragma unroll
      for (int u = 0; u < U; ++u) st.template add_fast<VEC>(x[u], c);
      i += U * B;
    } while (i + (U - 1) * B < npk);
    if (!slow) break;
    st.raise(cm, c);
#pragma unroll
    for (int u = 0; u < U; ++u) st.template add_masked<VEC>(x[u], (w[u] >> sb) & kPackMask, c);
    i += U * B;
  }
  for (; i < npk; i += B) {
    acc_t y[VEC];
    load_logical<MIS>(zb, i, y);
    acc_t cm = y[0];
#pragma unroll
    for (int e = 1; e < VEC; ++e) cm = max_ignore_nan(cm, y[e]);
    st.raise(cm, c);
    st.template add_masked<VEC>(y, bitmap_bits<VEC>(bm, i * VEC), c);
  }
  return st.finish(inv_t, c_ln2_minus_inv_t);
}

template <typename scalar_t, bool kEnt, int MIS = 0>
__device__ __forceinline__ RowStat<acc_of<scalar_t>> stream_range_any(
    gmem_ptr<const scalar_t> z, int64_t r0, int64_t r1, smem_ptr<const uint32_t> bm,
    acc_of<scalar_t> inv_t, acc_of<scalar_t> c, double c_ln2_minus_inv_t) {
  if constexpr (MIS + 1 < vec_of<scalar_t>()) {
    if (misalignment(z) != MIS) {
      return stream_range_any<scalar_t, kEnt, MIS + 1>(z, r0, r1, bm, inv_t, c,
                                                       c_ln2_minus_inv_t);
    }
  }
  return stream_range<scalar_t, kEnt, MIS>(z, r0, r1, bm, inv_t, c, c_ln2_minus_inv_t);
}

// Does [r0, r1) of row z hold a NaN? (Only asked for a range whose max is +inf.) Block-uniform.
template <typename scalar_t>
__device__ __forceinline__ bool range_has_nan(gmem_ptr<const scalar_t> z, int64_t r0, int64_t r1) {
  int nan = 0;
  for (int64_t j = r0 + threadIdx.x; j < r1; j += blockDim.x) {
    const float x = static_cast<float>(z[j]);
    nan |= x != x;
  }
  return __syncthreads_or(nan) != 0;
}

// ---------------------------------------------------------------------------------------------
// The row's finaliser: gathered logits (teacher entries, label), teach / dup / distinct count,
// NaN, and the outputs of row n. Per thread: `fresh` (distinct columns it marked), `nan` (a
// NaN it knows of), z0 (the raw logit of its entry k = threadIdx.x, loaded while marking, when
// have_z0). `repeat` is block-uniform.
// ---------------------------------------------------------------------------------------------

template <bool kEnt, typename scalar_t, typename id_t, typename acc_t>
__device__ __forceinline__ void finalize_row(const ShardArgs<scalar_t, id_t>& a, int64_t n,
                                             const RowStat<acc_t>& st, bool repeat, acc_t fresh,
                                             int nan, bool have_z0, scalar_t z0,
                                             smem_ptr<acc_t> red) {
  const gmem_ptr<const scalar_t> z = a.logits + a.rows.offset(n);
  const gmem_ptr<const id_t> ids = a.ids + n * a.K;
  const gmem_ptr<acc_t> x_out = a.gathered + n * a.gathered_cols;
  const acc_t M = st.m;
  acc_t teach = acc_t(0), dup = acc_t(0);
  for (int64_t k = threadIdx.x; k < a.K; k += blockDim.x) {
    const int64_t id = static_cast<int64_t>(ids[k]);
    const int64_t c = id - a.vocab_start;
    const bool in = id >= 0 && c >= 0 && c < a.V;
    acc_t x = acc_t(0);
    if (in) {
      const scalar_t raw = (have_z0 && k == threadIdx.x) ? z0 : z[c];
      // (mul_rn: x is stored and also summed below; a contracted x - M would disagree with the
      // stored x that a row with a repeated id reads back, by |x| 2^-24)
      x = mul_rn(static_cast<acc_t>(raw), a.inv_t);
      nan |= x != x;
      if (!repeat) teach = add_rn(teach, precise_exp(x - M));  // (add_rn: expf's last product)
    }
    x_out[k] = x;
  }
  if (repeat) {  // (block-uniform) first copy = lowest k, in the sorted order
    __syncthreads();  // the gathered values above are visible to the block
    const gmem_ptr<const id_t> sorted = a.sorted + n * a.K;
    const gmem_ptr<const int64_t> order = a.order + n * a.K;
    for (int64_t p = threadIdx.x; p < a.K; p += blockDim.x) {
      const int64_t id = static_cast<int64_t>(sorted[p]);
      const int64_t c = id - a.vocab_start;
      if (id < 0 || c < 0 || c >= a.V) continue;
      const acc_t e = precise_exp(x_out[order[p]] - M);
      if (first_in_run(sorted, p)) teach = add_rn(teach, e);
      else dup = add_rn(dup, e);
    }
  }
  if (a.gathered_cols > a.K && threadIdx.x == blockDim.x - 1) {  // the label's logit
    const int64_t c = a.labels[n] - a.vocab_start;
    const bool in = a.labels[n] >= 0 && c >= 0 && c < a.V;
    x_out[a.K] = in ? mul_rn(static_cast<acc_t>(z[c]), a.inv_t) : acc_t(0);
  }
  acc_t v[4] = {teach, dup, fresh, static_cast<acc_t>(nan)};
  block_sum_n<4>(v, red);
  if (threadIdx.x == 0) {
    // A NaN logit: every e_v relative to the NaN max is NaN, so rest (and the entropy sum) are
    // NaN, teach / dup NaN where they have a term (a first copy / a repeat), 0 where they have
    // none; the count of distinct columns does not depend on the logits (as the CPU kernel).
    const bool row_nan = v[3] != acc_t(0);
    const acc_t qn = quiet_nan<acc_t>();
    const gmem_ptr<acc_t> s = a.sums + n * 5;
    a.row_max[n] = row_nan ? qn : M;
    s[0] = row_nan ? qn : st.rest;
    s[1] = row_nan ? (v[2] > acc_t(0) ? qn : acc_t(0)) : v[0];
    s[2] = row_nan ? (repeat ? qn : acc_t(0)) : v[1];
    s[3] = v[2];
    s[4] = kEnt ? (row_nan ? qn : st.ent) : acc_t(0);
  }
}

template <typename scalar_t, typename id_t, bool kEnt>
__global__ void __launch_bounds__(kShardPassMaxThreads, stream_min_blocks<scalar_t>())
    shard_pass_kernel(const ShardArgs<scalar_t, id_t> a) {
  using acc_t = acc_of<scalar_t>;
  const smem_ptr<uint32_t> bm = dynamic_shared_memory<uint32_t>();
  TD_SHARED_ARRAY(acc_t, red, 4 * 32);

  const bool split = a.splits > 1;
  const unsigned work = static_cast<unsigned>(a.N * a.splits);  // < 2^31 (host check)
  for (unsigned w = blockIdx.x; w < work; w += gridDim.x) {  // (+ gridDim <= 2^30: no wrap)
    const auto [n, sp] = work_item(w, a.splits);
    const int64_t r0 = sp * a.chunk, r1 = std::min(a.V, r0 + a.chunk);
    const gmem_ptr<const scalar_t> z = a.logits + a.rows.offset(n);
    const gmem_ptr<const id_t> ids = a.ids + n * a.K;
    constexpr int sh = 0;
    zero_bitmap(bm, a.bitmap_words);  // (one writer per word; ends with a barrier)  // (bit j = column r0 + j: logical packs, see stream_range)

    // 1. marks (and, for a whole row, the first teacher logit's load: in flight during the stream)
    acc_t fresh = acc_t(0);
    int rep = 0;
    scalar_t z0 = static_cast<scalar_t>(0.0f);
    for (int64_t k = threadIdx.x; k < a.K; k += blockDim.x) {
      const int64_t id = static_cast<int64_t>(ids[k]);
      const int64_t c = id - a.vocab_start;
      if (id < 0 || c < r0 || c >= r1) continue;  // padding / another shard or range / invalid
      if (!split && k == threadIdx.x) z0 = z[c];
      const int b = static_cast<int>(c - r0) + sh;
      const uint32_t bit = 1u << (b & 31);
      if (atomicOr(&bm[b >> 5], bit) & bit) rep = 1;
      else fresh += acc_t(1);
    }
    const bool repeat = __syncthreads_or(rep) != 0;

    // 2-3. the stream and the block merge (which ends with a barrier: no bitmap read after it)
    RowStat<acc_t> st = stream_range_any<scalar_t, kEnt>(z, r0, r1, bm, a.inv_t, a.c,
                                                         a.c_ln2_minus_inv_t);
    st = block_merge_stat(st, red);
    int nan = (st.rest != st.rest) || (st.all != st.all) || (st.ent != st.ent);
    if (st.m == pos_inf<acc_t>()) nan = range_has_nan(z, r0, r1);  // (block-uniform)

    if (split) {
      const acc_t count = block_sum(fresh, red);
      if (threadIdx.x == 0) {
        const gmem_ptr<acc_t> p = a.partials + static_cast<int64_t>(w) * kPartialFields;
        p[0] = st.m;
        p[1] = st.rest;
        p[2] = st.all;
        p[3] = st.ent;
        p[4] = count;
        p[5] = nan ? acc_t(1) : acc_t(0);
        p[6] = repeat ? acc_t(1) : acc_t(0);
        p[7] = acc_t(0);
      }
    } else {
      finalize_row<kEnt>(a, n, st, repeat, fresh, threadIdx.x == 0 ? nan : 0, true, z0, red);
    }
    __syncthreads();  // every bitmap read done before the next row's zeroing
  }
}

// Split path, step 2: one block per row merges the ranges' statistics and finalises the row.
template <typename scalar_t, typename id_t, bool kEnt>
__global__ void __launch_bounds__(kShardCombineThreads)
    shard_combine_kernel(const ShardArgs<scalar_t, id_t> a) {
  using acc_t = acc_of<scalar_t>;
  TD_SHARED_ARRAY(acc_t, red, 4 * 32);
  for (int64_t n = blockIdx.x; n < a.N; n += gridDim.x) {
    const gmem_ptr<const acc_t> part = a.partials + n * a.splits * kPartialFields;
    RowStat<acc_t> st = identity_stat<acc_t>();
    acc_t fresh = acc_t(0);
    int nan = 0, rep = 0;
    for (int64_t sp = threadIdx.x; sp < a.splits; sp += blockDim.x) {
      const gmem_ptr<const acc_t> p = part + sp * kPartialFields;
      st = merge_stat(st, RowStat<acc_t>{p[0], p[1], p[2], p[3]});
      fresh += p[4];
      nan |= p[5] != acc_t(0);
      rep |= p[6] != acc_t(0);
    }
    st = block_merge_stat(st, red);
    const bool repeat = __syncthreads_or(rep) != 0;
    finalize_row<kEnt>(a, n, st, repeat, fresh, nan, false, static_cast<scalar_t>(0.0f), red);
    __syncthreads();
  }
}

TD_CUDA_NAMESPACE_END
