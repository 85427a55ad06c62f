// CUDA shard pass, host launcher: checks, allocation, dispatch, launch geometry and stream (the
// kernels and what they compute: kernels/shard_pass.cuh; semantics: csrc/registration.cpp), and
// the student's top-k.
// Compiled twice: by nvcc for the GPU and, with TD_EMULATE, by g++ against the CUDA emulator
// (csrc/emu/shard_pass_emu.cpp); host_runtime.h is the difference.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/topk.h>
#include <ATen/ops/where.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <vector>

#include "../ops.h"
#include "host_runtime.h"
#include "kernels/shard_pass.cuh"

TD_CUDA_NAMESPACE_BEGIN
namespace {

// ---------------------------------------------------------------------------------------------
// The shard's top-k of the RAW logits (registration.cpp: descending, ties broken by the lower
// column, NaN above everything as torch.sort ranks it; (-inf, -1) padding when V_r < topk).
//
// Computed here with ATen ops on the logits' own rows, not inside the streaming kernel: a fused
// streaming selection (per-warp queues, as FAISS's WarpSelect) was not written, because without a
// GPU nobody can show that it beats torch.topk on the shard, which is the condition issue 16 sets
// for writing one. It is exact, ties included: each value becomes a 64-bit key
//   (order-preserving bits of the value, read in place: -0 as +0, every NaN the largest) << 32
//   | (0xffffffff - column)
// (bf16 / fp16 / fp32 bits order like the values once the magnitude bits of a negative are
// flipped), so that the keys are distinct and at::topk of the keys is the stable order; the
// values returned are gathered from the logits (exact, -0 and NaN payloads kept). fp64 logits (no
// room for a 64-bit value and a column in one key) take a stable descending sort instead. Rows
// go in chunks of at most ~128 MiB of keys and at most N / 16 rows (so that no temporary is
// [N, V_r]-sized, even for a small batch), on views of the logits: 3-D logits are chunked within
// one leading index or over whole leading indices, so every chunk is a plain strided view, and
// nothing of the logits is copied. (TOPK_DISTILL_TOPK_CHUNK_BYTES sets the chunk's key bytes
// instead, for the tests of the chunking.)
// ---------------------------------------------------------------------------------------------

// Rows [n0, n1) of the logits as a view whose last dim is V (2-D, or 3-D over whole b's).
at::Tensor rows_view(const at::Tensor& logits, const RowLayout& l, int64_t n0, int64_t n1) {
  if (logits.dim() == 2) return logits.narrow(0, n0, n1 - n0);
  const int64_t b0 = n0 / l.T, t0 = n0 % l.T;
  if (t0 == 0 && (n1 - n0) % l.T == 0) return logits.narrow(0, b0, (n1 - n0) / l.T);
  return logits.select(0, b0).narrow(0, t0, n1 - n0);  // (within one b)
}

// Order-preserving integer keys of the values of `view` (bf16 / fp16 / fp32), widened to int64
// and shifted into the high half.
at::Tensor value_keys(const at::Tensor& view) {
  const bool half = view.element_size() == 2;
  const auto itype = half ? at::kShort : at::kInt;
  const int64_t imax = half ? 0x7fff : 0x7fffffff;
  const int64_t imin = half ? -0x8000 : -0x80000000LL;
  const at::Tensor bits = view.view(itype);  // (same element size, unit last stride: a view)
  at::Tensor ord = at::where(bits.lt(0), bits.bitwise_xor(imax), bits);
  ord.masked_fill_(bits.eq(imin), 0);  // -0 -> +0: a tie, as torch.sort sees them
  ord.masked_fill_(view.isnan(), imax);
  return ord.to(at::kLong).bitwise_left_shift_(32);
}

void shard_topk(const at::Tensor& logits, const RowLayout& l, int64_t topk, int64_t vocab_start,
                at::Tensor& values, at::Tensor& ids) {
  const int64_t N = l.N, V = l.V;
  const int64_t kk = std::min(topk, V);
  if (kk < topk) {
    values.narrow(1, kk, topk - kk).fill_(-std::numeric_limits<double>::infinity());
    ids.narrow(1, kk, topk - kk).fill_(-1);
  }
  if (kk == 0 || N == 0) return;
  const bool fp64 = logits.scalar_type() == at::kDouble;
  const int64_t key_bytes = fp64 ? 16 : 8;  // (the sort keeps values and indices)
  int64_t rows = std::min((int64_t(128) << 20) / (key_bytes * V), N / 16);
  if (const char* env = std::getenv("TOPK_DISTILL_TOPK_CHUNK_BYTES")) {  // (tests: exact size)
    if (std::atoll(env) > 0) rows = std::atoll(env) / (key_bytes * V);
  }
  rows = std::max<int64_t>(1, rows);
  if (logits.dim() == 3) {  // a chunk is within one b (rows <= T) or whole b's
    rows = rows >= l.T ? (rows / l.T) * l.T : rows;
  }
  const at::Tensor col_key =
      at::arange(V, logits.options().dtype(at::kLong)).neg_().add_(0xffffffffLL);
  for (int64_t n0 = 0; n0 < N;) {
    int64_t n1 = std::min(N, n0 + rows);
    if (logits.dim() == 3 && rows < l.T) n1 = std::min(n1, (n0 / l.T + 1) * l.T);
    const at::Tensor view = rows_view(logits, l, n0, n1);
    at::Tensor idx;
    if (fp64) {
      idx = std::get<1>(at::sort(view, /*stable=*/true, /*dim=*/-1, /*descending=*/true))
                .narrow(-1, 0, kk);
    } else {
      const at::Tensor key = value_keys(view).bitwise_or_(col_key);
      idx = std::get<1>(at::topk(key, kk, -1, /*largest=*/true, /*sorted=*/true));
    }
    const at::Tensor vals = view.gather(-1, idx);
    values.narrow(0, n0, n1 - n0).narrow(1, 0, kk).copy_(vals.reshape({n1 - n0, kk}));
    ids.narrow(0, n0, n1 - n0).narrow(1, 0, kk).copy_(idx.reshape({n1 - n0, kk}).add(vocab_start));
    n0 = n1;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> shard_pass_cuda(
    const at::Tensor& logits, const at::Tensor& teacher_ids, const std::optional<at::Tensor>& labels,
    int64_t vocab_start, double inv_temperature, bool with_entropy, int64_t topk) {
  const RowLayout l = check_logits_and_ids(logits, teacher_ids);
  check_labels(labels, l.N, logits.device());
  TORCH_CHECK_VALUE(l.V > 0, "logits must have at least one vocab column");
  TORCH_CHECK_VALUE(topk >= 0, "topk must be >= 0; got ", topk);
  const DeviceGuard guard(logits.device());
  const int64_t N = l.N, V = l.V, K = teacher_ids.size(1);
  const int64_t L = labels.has_value() ? 1 : 0;
  const auto acc = acc_dtype(logits.scalar_type());
  const auto opts = logits.options().dtype(acc);
  at::Tensor row_max = device_empty({N}, opts);
  at::Tensor sums = device_empty({N, kShardSums}, opts);
  at::Tensor gathered = device_empty({N, K + L}, opts);
  at::Tensor topk_logits = device_empty({N, topk}, opts);
  at::Tensor topk_ids = device_empty({N, topk}, opts.dtype(at::kLong));
  if (topk > 0) shard_topk(logits, l, topk, vocab_start, topk_logits, topk_ids);
  if (N == 0) return {row_max, sums, gathered, topk_logits, topk_ids};

  // Repeated ids: each row's ids sorted once (stable), for the rows that have a repeat.
  at::Tensor sorted, order;
  if (K > 1) std::tie(sorted, order) = at::sort(teacher_ids, /*stable=*/true, -1, false);
  at::Tensor labels64;
  if (L) labels64 = labels->to(at::kLong);

  const RowSplit rs = choose_row_split(N, V, sm_count(logits.device()));
  TORCH_CHECK_VALUE(N * rs.splits < (int64_t(1) << 31), "the CUDA shard pass takes fewer than "
                    "2^31 (row, column range) work items; got ", N, " rows x ", rs.splits,
                    " ranges");
  at::Tensor partials;
  if (rs.splits > 1) partials = device_empty({N, rs.splits, kPartialFields}, opts);
  const Stream stream = current_stream(logits.device());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "shard_pass_cuda", [&] {
    using acc_t = acc_of<scalar_t>;
    AT_DISPATCH_INDEX_TYPES(teacher_ids.scalar_type(), "shard_pass_cuda_ids", [&] {
      ShardArgs<scalar_t, index_t> a{};
      a.logits = global_in<scalar_t>(logits, "logits");
      a.rows = RowMap{static_cast<uint32_t>(l.T), l.outer_stride, l.inner_stride};
      a.N = N;
      a.V = V;
      a.K = K;
      a.ids = global_in<index_t>(teacher_ids, "teacher_ids");
      a.sorted = K > 1 ? global_in<index_t>(sorted, "sorted") : nullptr;
      a.order = K > 1 ? global_in<int64_t>(order, "order") : nullptr;
      a.labels = L ? global_in<int64_t>(labels64, "labels") : nullptr;
      a.vocab_start = vocab_start;
      a.inv_t = static_cast<acc_t>(inv_temperature);
      a.c = static_cast<acc_t>(static_cast<double>(a.inv_t) * kLog2e);
      a.c_ln2_minus_inv_t = static_cast<double>(a.c) * kLn2 - static_cast<double>(a.inv_t);
      a.splits = rs.splits;
      a.chunk = rs.chunk;
      a.bitmap_words = bitmap_words(std::min(rs.chunk, V));
      a.row_max = global_out<acc_t>(row_max, "row_max");
      a.sums = global_out<acc_t>(sums, "sums");
      a.gathered = global_out<acc_t>(gathered, "gathered");
      a.gathered_cols = K + L;
      a.partials = rs.splits > 1 ? global_out<acc_t>(partials, "partials") : nullptr;
      const int threads = threads_for(std::min(rs.chunk, V), vec_of<scalar_t>());
      const size_t smem = static_cast<size_t>(a.bitmap_words) * sizeof(uint32_t);
      const unsigned grid = grid_for(N * rs.splits);
      auto run = [&](auto ent) {
        constexpr bool kEnt = decltype(ent)::value;
        TD_LAUNCH(grid, threads, smem, stream, kShardPassMaxThreads,
                  shard_pass_kernel<scalar_t, index_t, kEnt>)(a);
        check_launch();
        if (rs.splits > 1) {
          TD_LAUNCH(grid_for(N), kShardCombineThreads, 0, stream, kShardCombineThreads,
                    shard_combine_kernel<scalar_t, index_t, kEnt>)(a);
          check_launch();
        }
      };
      if (with_entropy) run(std::true_type{});
      else run(std::false_type{});
    });
  });
  return {row_max, sums, gathered, topk_logits, topk_ids};
}

}  // namespace
TD_CUDA_NAMESPACE_END

TORCH_LIBRARY_IMPL(TD_OPS_NAMESPACE, TD_DISPATCH_KEY, m) {
  m.impl("shard_pass", &topk_distill::cuda::shard_pass_cuda);
}
