// CPU shard pass: one read of this rank's logits (what it returns: csrc/registration.cpp).
//
// Memory traffic: reads N * V_r logits once (blocks of kBlock columns stay in L1/L2 between the
// block's max and its sum), N * K ids and K + 1 scattered logits per row; writes N * (6 + K + 1 +
// 2 topk) values. Work split: rows across threads with at::parallel_for; one thread owns a row,
// so the result does not depend on the thread count (bitwise deterministic). Rows are addressed
// through RowLayout: [N, V] or [B, T, V] views with any leading strides, no copy.
//
// Per row: (1) the teacher ids that fall in this shard are gathered and marked in a bitmap of
// the shard's columns (a repeated id is flagged as a duplicate); (2) a streaming pass keeps the
// running max M of z/T and the sum of exp(z/T - M) over the columns NOT in the bitmap ("rest"),
// rescaling when a block raises M - with_entropy also the sum over all columns and the sum of
// e * (z/T - M), and with topk a selection that only looks at a block whose max beats its k-th
// value (so in the common case the top-k costs one compare per block); (3) the distinct and the
// repeated teacher entries are summed from the gathered values. Keeping "rest" apart is what
// lets the epilogue form the student's mass outside the top-k, 1 - Q, without cancellation.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
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

struct RowPassOut {
  double max;   // M = max_v z_v / T
  double rest;  // sum over non-teacher columns of exp(z_v / T - M)
  double all;   // with entropy: sum over all columns of exp(z_v / T - M)
  double ent;   // with entropy: sum over all columns of exp(z_v / T - M) (z_v / T - M)
};

// A (value, column) pair as one totally ordered key, larger = ranks first: a larger value (NaN
// above everything, as torch.sort), then a lower column. For float values that is a single
// uint64 - order-preserving value bits above the complemented column - so the selection sorts
// plain integers; for double a pair with the same order.
template <typename acc_t>
struct RankKey;

template <>
struct RankKey<float> {
  using Key = uint64_t;
  static Key make(float v, int64_t col) {
    if (v == 0.0f) v = 0.0f;  // -0 == +0: equal values, ranked by column
    uint32_t b;
    std::memcpy(&b, &v, sizeof b);
    b = (v != v) ? 0xffffffffu : ((b & 0x80000000u) ? ~b : (b | 0x80000000u));
    return (static_cast<uint64_t>(b) << 32) | (0xffffffffu - static_cast<uint32_t>(col));
  }
  static int64_t col(Key k) { return static_cast<int64_t>(0xffffffffu - static_cast<uint32_t>(k)); }
  static float value(Key k) {
    const uint32_t b = static_cast<uint32_t>(k >> 32);
    if (b == 0xffffffffu) return std::numeric_limits<float>::quiet_NaN();
    const uint32_t u = (b & 0x80000000u) ? (b & 0x7fffffffu) : ~b;
    float v;
    std::memcpy(&v, &u, sizeof v);
    return v;
  }
};

template <>
struct RankKey<double> {
  struct Key {
    double v;
    int64_t col;
    bool operator>(const Key& o) const {
      const bool an = v != v, bn = o.v != o.v;
      if (an || bn) return an && (!bn || col < o.col);
      return v > o.v || (v == o.v && col < o.col);
    }
  };
  static Key make(double v, int64_t col) { return {v, col}; }
  static int64_t col(const Key& k) { return k.col; }
  static double value(const Key& k) { return k.v; }
};

// The k largest raw logits of a row and their columns, ranked by RankKey. Candidates go into a
// buffer; whenever it holds k + max(k, 32), nth_element keeps the k best and the k-th best value
// becomes the threshold a later value must beat (strictly: columns arrive in increasing order,
// so an equal value never displaces - the lower column wins the tie). Compacting that often
// keeps the threshold fresh (a stale one lets many more values through); each compaction costs
// O(k) on plain integer keys. For logits in random order about k * ln(V / k) values pass the
// threshold in a whole row (~400 for k = 64, V = 32000), so past the first block the selection
// costs one compare per value (8 at a time in the SIMD pass).
template <typename acc_t>
class RowTopK {
  using Codec = RankKey<acc_t>;
  using Key = typename Codec::Key;

 public:
  void reset(int64_t k) {
    k_ = static_cast<size_t>(k);
    keys_.clear();
    capacity_ = k_ + std::max<size_t>(k_, 32);
    keys_.reserve(capacity_);
    compacted_ = false;
  }
  // Once compacted, only values above threshold() can enter.
  bool full() const { return compacted_; }
  acc_t threshold() const { return threshold_; }
  // Whether a block whose largest value is `block_max` can change the selection.
  bool wants(acc_t block_max) const { return !full() || block_max > threshold(); }

  void offer(acc_t v, int64_t col) {
    keys_.push_back(Codec::make(v, col));
    if (keys_.size() == capacity_) compact();
  }

  // Offers z[b0, b1): every value until the first compaction, then those above the threshold;
  // fill() stops at that point and returns the first column it did not offer (the vectorised
  // row pass compares the rest 8 at a time).
  template <typename scalar_t>
  int64_t fill(const scalar_t* z, int64_t b0, int64_t b1) {
    int64_t j = b0;
    for (; j < b1 && !full(); ++j) offer(static_cast<acc_t>(z[j]), j);
    return j;
  }
  template <typename scalar_t>
  void offer_block(const scalar_t* z, int64_t b0, int64_t b1) {
    for (int64_t j = fill(z, b0, b1); j < b1; ++j) {
      const acc_t v = static_cast<acc_t>(z[j]);
      if (v > threshold_ || v != v) offer(v, j);  // (NaN: the all-columns redo of a NaN row)
    }
  }

  // The selection, best first, as (value, global id); (-inf, -1) past the shard's columns.
  void write(acc_t* values, int64_t* ids, int64_t vocab_start) {
    if (keys_.size() > k_) compact();
    std::sort(keys_.begin(), keys_.end(), std::greater<Key>());
    for (size_t i = 0; i < k_; ++i) {
      const bool real = i < keys_.size();
      values[i] = real ? Codec::value(keys_[i]) : -std::numeric_limits<acc_t>::infinity();
      ids[i] = real ? vocab_start + Codec::col(keys_[i]) : -1;
    }
  }

 private:
  void compact() {
    const auto kth = keys_.begin() + (k_ - 1);
    std::nth_element(keys_.begin(), kth, keys_.end(), std::greater<Key>());
    keys_.resize(k_);
    threshold_ = Codec::value(keys_[k_ - 1]);  // the k-th best value
    compacted_ = true;
  }

  size_t k_ = 0, capacity_ = 0;
  std::vector<Key> keys_;
  acc_t threshold_ = -std::numeric_limits<acc_t>::infinity();
  bool compacted_ = false;
};

// Scalar row pass in acc_t (float, or double for fp64 logits).
template <typename scalar_t, typename acc_t, bool kEntropy>
RowPassOut row_pass_scalar(const scalar_t* z, int64_t V, acc_t inv_t, const uint64_t* bitmap,
                           RowTopK<acc_t>* topk) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  acc_t rest = 0, all = 0, ent = 0;
  for (int64_t b0 = 0; b0 < V; b0 += kBlock) {
    const int64_t b1 = std::min(V, b0 + kBlock);
    acc_t zmax = -std::numeric_limits<acc_t>::infinity();
    for (int64_t j = b0; j < b1; ++j) {
      const acc_t x = static_cast<acc_t>(z[j]);
      if (x != x) return {std::nan(""), std::nan(""), std::nan(""), std::nan("")};
      zmax = std::max(zmax, x);
    }
    if (topk != nullptr && topk->wants(zmax)) topk->offer_block(z, b0, b1);
    const acc_t bm = zmax * inv_t;
    if (bm > m) {
      const acc_t scale = std::exp(m - bm);
      if constexpr (kEntropy) {
        if (all != 0) ent = (ent + (m - bm) * all) * scale;  // S2' = (S2 + (m - m') S1) e^(m - m')
        all *= scale;
      }
      rest *= scale;
      m = bm;
    }
    if (m == -std::numeric_limits<acc_t>::infinity()) continue;
    acc_t block_rest = 0, block_all = 0, block_ent = 0;
    for (int64_t j = b0; j < b1; ++j) {
      const acc_t t = static_cast<acc_t>(z[j]) * inv_t - m;
      const acc_t e = std::exp(t);
      if constexpr (kEntropy) {
        block_all += e;  // (e * t at t = -inf, a logit of -inf, is 0, not NaN: t floored)
        block_ent += e * std::max(t, -std::numeric_limits<acc_t>::max());
      }
      if (!is_teacher(bitmap, j)) block_rest += e;
    }
    rest += block_rest;
    if constexpr (kEntropy) {
      all += block_all;
      ent += block_ent;
    }
  }
  return {static_cast<double>(m), static_cast<double>(rest), static_cast<double>(all),
          static_cast<double>(ent)};
}

#if TD_HAVE_X86
#define TD_SIMD_TARGET TD_AVX_TARGET
#define TD_SIMD_NAME row_pass_avx
#define TD_SIMD_TOPK_NAME topk_block_avx
#define TD_SIMD_EXP8 exp8_nonpositive
#include "row_pass_simd.inc"
#undef TD_SIMD_TARGET
#undef TD_SIMD_NAME
#undef TD_SIMD_TOPK_NAME
#undef TD_SIMD_EXP8
#define TD_SIMD_TARGET TD_AVX2_TARGET
#define TD_SIMD_NAME row_pass_avx2
#define TD_SIMD_TOPK_NAME topk_block_avx2
#define TD_SIMD_EXP8 exp8_nonpositive_avx2
#include "row_pass_simd.inc"
#undef TD_SIMD_TARGET
#undef TD_SIMD_NAME
#undef TD_SIMD_TOPK_NAME
#undef TD_SIMD_EXP8
#endif

template <typename scalar_t, typename acc_t, bool kEntropy>
RowPassOut row_pass(const scalar_t* z, int64_t V, acc_t inv_t, const uint64_t* bitmap,
                    RowTopK<acc_t>* topk) {
#if TD_HAVE_X86
  if constexpr (std::is_same_v<acc_t, float>) {
    if (cpu_has_avx2()) return row_pass_avx2<scalar_t, kEntropy>(z, V, inv_t, bitmap, topk);
    if (cpu_has_avx_fma()) return row_pass_avx<scalar_t, kEntropy>(z, V, inv_t, bitmap, topk);
  }
#endif
  return row_pass_scalar<scalar_t, acc_t, kEntropy>(z, V, inv_t, bitmap, topk);
}

template <typename scalar_t, typename acc_t, typename id_t, typename label_t>
void shard_pass_kernel(const at::Tensor& logits, const RowLayout& layout, const at::Tensor& ids,
                       const label_t* labels, int64_t vocab_start, double inv_temperature,
                       bool with_entropy, int64_t topk_k, at::Tensor& row_max, at::Tensor& sums,
                       at::Tensor& gathered, at::Tensor& topk_values, at::Tensor& topk_ids) {
  const int64_t N = layout.N, V = layout.V, K = ids.size(1);
  const int64_t G = gathered.size(1);  // K, or K + 1 with labels
  const scalar_t* z_base = logits.const_data_ptr<scalar_t>();
  const id_t* id_base = ids.const_data_ptr<id_t>();
  acc_t* max_out = row_max.mutable_data_ptr<acc_t>();
  acc_t* sums_out = sums.mutable_data_ptr<acc_t>();
  acc_t* gath_out = gathered.mutable_data_ptr<acc_t>();
  acc_t* topk_v_out = topk_k > 0 ? topk_values.mutable_data_ptr<acc_t>() : nullptr;
  int64_t* topk_i_out = topk_k > 0 ? topk_ids.mutable_data_ptr<int64_t>() : nullptr;
  const acc_t inv_t = static_cast<acc_t>(inv_temperature);
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(V, 1));

  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    std::vector<uint64_t> bitmap((V + 63) / 64 + 1, 0);
    std::vector<uint8_t> kind(K);
    RowTopK<acc_t> selector;
    for (int64_t n = begin; n < end; ++n) {
      const scalar_t* z = z_base + layout.offset(n);
      const id_t* row_ids = id_base + n * K;
      acc_t* x = gath_out + n * G;
      int64_t teacher_cols = 0;
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
        teacher_cols += kind[k] == kFirst;
        word |= bit;
      }
      if (labels != nullptr) {
        const int64_t y = static_cast<int64_t>(labels[n]);
        const int64_t local = y - vocab_start;
        x[K] = (y >= 0 && local >= 0 && local < V) ? static_cast<acc_t>(z[local]) * inv_t : acc_t(0);
      }
      RowTopK<acc_t>* sel = nullptr;
      if (topk_k > 0) {
        selector.reset(topk_k);
        sel = &selector;
      }
      const RowPassOut r = with_entropy
                               ? row_pass<scalar_t, acc_t, true>(z, V, inv_t, bitmap.data(), sel)
                               : row_pass<scalar_t, acc_t, false>(z, V, inv_t, bitmap.data(), sel);
      const acc_t m = static_cast<acc_t>(r.max);
      if (sel != nullptr) {
        if (r.max != r.max) {  // a NaN logit: the streaming selection stopped early; redo it all
          selector.reset(topk_k);
          selector.offer_block(z, 0, V);
        }
        selector.write(topk_v_out + n * topk_k, topk_i_out + n * topk_k, vocab_start);
      }
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
      acc_t* s = sums_out + kShardSums * n;
      s[0] = static_cast<acc_t>(r.rest);
      s[1] = teach;
      s[2] = dup;
      s[3] = static_cast<acc_t>(teacher_cols);
      s[4] = with_entropy ? static_cast<acc_t>(r.ent) : acc_t(0);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> shard_pass_cpu(
    const at::Tensor& logits, const at::Tensor& teacher_ids, const std::optional<at::Tensor>& labels,
    int64_t vocab_start, double inv_temperature, bool with_entropy, int64_t topk) {
  const RowLayout layout = check_logits_and_ids(logits, teacher_ids);
  TORCH_CHECK_VALUE(layout.V > 0, "logits must have at least one vocab column");
  TORCH_CHECK_VALUE(topk >= 0, "topk must be >= 0; got ", topk);
  check_labels(labels, layout.N, logits.device());
  const int64_t N = layout.N, K = teacher_ids.size(1);
  const auto opts = logits.options().dtype(acc_dtype(logits.scalar_type()));
  at::Tensor row_max = at::empty({N}, opts);
  at::Tensor sums = at::empty({N, kShardSums}, opts);
  at::Tensor gathered = at::empty({N, K + (labels.has_value() ? 1 : 0)}, opts);
  at::Tensor topk_values = at::empty({N, topk}, opts);
  at::Tensor topk_ids = at::empty({N, topk}, opts.dtype(at::kLong));
  if (N == 0) return {row_max, sums, gathered, topk_values, topk_ids};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "shard_pass_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    AT_DISPATCH_INDEX_TYPES(teacher_ids.scalar_type(), "shard_pass_cpu_ids", [&] {
      using id_t = index_t;
      if (labels.has_value() && labels->scalar_type() == at::kInt) {
        shard_pass_kernel<scalar_t, acc_t, id_t, int32_t>(
            logits, layout, teacher_ids, labels->const_data_ptr<int32_t>(), vocab_start,
            inv_temperature, with_entropy, topk, row_max, sums, gathered, topk_values, topk_ids);
      } else {
        shard_pass_kernel<scalar_t, acc_t, id_t, int64_t>(
            logits, layout, teacher_ids,
            labels.has_value() ? labels->const_data_ptr<int64_t>() : nullptr, vocab_start,
            inv_temperature, with_entropy, topk, row_max, sums, gathered, topk_values, topk_ids);
      }
    });
  });
  return {row_max, sums, gathered, topk_values, topk_ids};
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(topk_distill, CPU, m) { m.impl("shard_pass", &cpu::shard_pass_cpu); }

}  // namespace topk_distill
