// CPU shard pass: one read of this rank's logits.
//
// Memory traffic: reads N * V_r logits once (blocks of kBlock columns stay in L1/L2 between the
// block's max and its sum), N * K ids and K scattered logits per row; writes N * (4 + K) acc
// values. Work split: rows across threads with at::parallel_for; one thread owns a row, so the
// result does not depend on the thread count (bitwise deterministic).
//
// Per row: (1) the teacher ids that fall in this shard are gathered and marked in a bitmap of
// the shard's columns (a repeated id is flagged as a duplicate); (2) a streaming pass keeps the
// running max M of z/T and the sum of exp(z/T - M) over the columns NOT in the bitmap ("rest"),
// rescaling when a block raises M; (3) the distinct and the repeated teacher entries are summed
// from the gathered values. Keeping "rest" apart is what lets the epilogue form the student's
// mass outside the top-k, 1 - Q, without cancellation.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../ops.h"
#include "simd.h"

namespace topk_distill {
namespace cpu {
namespace {

constexpr int64_t kBlock = 2048;  // columns per block: 8 KiB of fp32, fits L1

enum EntryKind : uint8_t { kOutside = 0, kFirst = 1, kRepeat = 2 };

inline bool is_teacher(const uint64_t* bitmap, int64_t j) { return (bitmap[j >> 6] >> (j & 63)) & 1; }

struct RowMaxRest {
  double max;   // M = max_v z_v / T
  double rest;  // sum over non-teacher columns of exp(z_v / T - M)
};

// Scalar row pass in acc_t (float, or double for fp64 logits).
template <typename scalar_t, typename acc_t>
RowMaxRest row_pass_scalar(const scalar_t* z, int64_t V, acc_t inv_t, const uint64_t* bitmap) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  acc_t rest = 0;
  for (int64_t b0 = 0; b0 < V; b0 += kBlock) {
    const int64_t b1 = std::min(V, b0 + kBlock);
    acc_t zmax = -std::numeric_limits<acc_t>::infinity();
    for (int64_t j = b0; j < b1; ++j) {
      const acc_t x = static_cast<acc_t>(z[j]);
      if (x != x) return {std::nan(""), std::nan("")};
      zmax = std::max(zmax, x);
    }
    const acc_t bm = zmax * inv_t;
    if (bm > m) {
      rest *= std::exp(m - bm);
      m = bm;
    }
    if (m == -std::numeric_limits<acc_t>::infinity()) continue;
    acc_t block_rest = 0;
    for (int64_t j = b0; j < b1; ++j) {
      if (!is_teacher(bitmap, j)) block_rest += std::exp(static_cast<acc_t>(z[j]) * inv_t - m);
    }
    rest += block_rest;
  }
  return {static_cast<double>(m), static_cast<double>(rest)};
}

#if TD_HAVE_X86
#define TD_SIMD_TARGET TD_AVX_TARGET
#define TD_SIMD_NAME row_pass_avx
#define TD_SIMD_EXP8 exp8_nonpositive
#include "row_pass_simd.inc"
#undef TD_SIMD_TARGET
#undef TD_SIMD_NAME
#undef TD_SIMD_EXP8
#define TD_SIMD_TARGET TD_AVX2_TARGET
#define TD_SIMD_NAME row_pass_avx2
#define TD_SIMD_EXP8 exp8_nonpositive_avx2
#include "row_pass_simd.inc"
#undef TD_SIMD_TARGET
#undef TD_SIMD_NAME
#undef TD_SIMD_EXP8
#endif

template <typename scalar_t, typename acc_t>
RowMaxRest row_pass(const scalar_t* z, int64_t V, acc_t inv_t, const uint64_t* bitmap) {
#if TD_HAVE_X86
  if constexpr (std::is_same_v<acc_t, float>) {
    if (cpu_has_avx2()) return row_pass_avx2<scalar_t>(z, V, inv_t, bitmap);
    if (cpu_has_avx_fma()) return row_pass_avx<scalar_t>(z, V, inv_t, bitmap);
  }
#endif
  return row_pass_scalar<scalar_t, acc_t>(z, V, inv_t, bitmap);
}

template <typename scalar_t, typename acc_t, typename id_t>
void shard_pass_kernel(const at::Tensor& logits, const at::Tensor& ids, int64_t vocab_start,
                       double inv_temperature, at::Tensor& row_max, at::Tensor& sums,
                       at::Tensor& gathered) {
  const int64_t N = logits.size(0), V = logits.size(1), K = ids.size(1);
  const int64_t row_stride = logits.stride(0);
  const scalar_t* z_base = logits.const_data_ptr<scalar_t>();
  const id_t* id_base = ids.const_data_ptr<id_t>();
  acc_t* max_out = row_max.mutable_data_ptr<acc_t>();
  acc_t* sums_out = sums.mutable_data_ptr<acc_t>();
  acc_t* gath_out = gathered.mutable_data_ptr<acc_t>();
  const acc_t inv_t = static_cast<acc_t>(inv_temperature);
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(V, 1));

  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    std::vector<uint64_t> bitmap((V + 63) / 64 + 1, 0);
    std::vector<uint8_t> kind(K);
    for (int64_t n = begin; n < end; ++n) {
      const scalar_t* z = z_base + n * row_stride;
      const id_t* row_ids = id_base + n * K;
      acc_t* x = gath_out + n * K;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t id = static_cast<int64_t>(row_ids[k]);
        const int64_t local = id - vocab_start;
        if (id < 0 || local < 0 || local >= V) {
          x[k] = acc_t(0);
          kind[k] = kOutside;
          continue;
        }
        x[k] = static_cast<acc_t>(z[local]) * inv_t;
        uint64_t& word = bitmap[local >> 6];
        const uint64_t bit = uint64_t(1) << (local & 63);
        kind[k] = (word & bit) ? kRepeat : kFirst;
        word |= bit;
      }
      const RowMaxRest mr = row_pass<scalar_t, acc_t>(z, V, inv_t, bitmap.data());
      const acc_t m = static_cast<acc_t>(mr.max);
      acc_t teach = 0, dup = 0;
      for (int64_t k = 0; k < K; ++k) {
        if (kind[k] == kOutside) continue;
        const acc_t e = std::exp(x[k] - m);
        if (kind[k] == kFirst) {
          teach += e;
          bitmap[(static_cast<int64_t>(row_ids[k]) - vocab_start) >> 6] = 0;  // reset for next row
        } else {
          dup += e;
        }
      }
      max_out[n] = m;
      sums_out[3 * n + 0] = static_cast<acc_t>(mr.rest);
      sums_out[3 * n + 1] = teach;
      sums_out[3 * n + 2] = dup;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> shard_pass_cpu(const at::Tensor& logits,
                                                             const at::Tensor& teacher_ids,
                                                             int64_t vocab_start,
                                                             double inv_temperature) {
  check_logits_and_ids(logits, teacher_ids);
  TORCH_CHECK_VALUE(logits.size(1) > 0, "logits must have at least one vocab column");
  const int64_t N = logits.size(0), K = teacher_ids.size(1);
  const auto opts = logits.options().dtype(acc_dtype(logits.scalar_type()));
  at::Tensor row_max = at::empty({N}, opts);
  at::Tensor sums = at::empty({N, 3}, opts);
  at::Tensor gathered = at::empty({N, K}, opts);
  if (N == 0) return {row_max, sums, gathered};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "shard_pass_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    AT_DISPATCH_INDEX_TYPES(teacher_ids.scalar_type(), "shard_pass_cpu_ids", [&] {
      shard_pass_kernel<scalar_t, acc_t, index_t>(logits, teacher_ids, vocab_start,
                                                  inv_temperature, row_max, sums, gathered);
    });
  });
  return {row_max, sums, gathered};
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(topk_distill, CPU, m) { m.impl("shard_pass", &cpu::shard_pass_cpu); }

}  // namespace topk_distill
