// Launch geometry of the CUDA kernels: host code, plain C++, shared by the GPU build and the
// emulated one (which is how the split-row path gets exercised at test sizes: the emulated host
// sees TOPK_DISTILL_EMU_SMS streaming multiprocessors, see host_runtime.h).
//
// A row is one block's work when there are enough rows to fill the GPU; otherwise (few rows,
// long rows: N = 64, V = 262144) each row is split into column ranges of at least
// kMinSplitCols, one block each. A range never exceeds kMaxBlockCols, which bounds the
// teacher-column bitmap at 32 KiB of shared memory (no opt-in above 48 KiB needed).
#pragma once

#include <algorithm>
#include <cstdint>

namespace topk_distill {
namespace cuda {

constexpr int64_t kMaxBlockCols = int64_t(1) << 18;
constexpr int64_t kMinSplitCols = int64_t(1) << 13;

// 32-bit words of the teacher-column bitmap of a `range`-column block (kernels/common.cuh): one
// spare so that a shift never reads past the end.
constexpr int64_t bitmap_words(int64_t range) { return (range + 64) / 32 + 1; }

struct RowSplit {
  int64_t splits;  // column ranges per row
  int64_t chunk;   // columns per range (a multiple of 64, the last range may be shorter)
};

inline RowSplit choose_row_split(int64_t N, int64_t V, int sms) {
  auto cdiv = [](int64_t a, int64_t b) { return (a + b - 1) / b; };
  int64_t splits = cdiv(V, kMaxBlockCols);
  const int64_t target_blocks = int64_t(4) * sms;
  if (N * splits < target_blocks) {
    const int64_t want = cdiv(target_blocks, std::max<int64_t>(N, 1));
    splits = std::max(splits, std::min(want, std::max<int64_t>(1, V / kMinSplitCols)));
  }
  int64_t chunk = cdiv(cdiv(V, splits), 64) * 64;
  chunk = std::min(chunk, kMaxBlockCols);
  return {cdiv(V, chunk), chunk};
}

// Threads per block for a range of `cols` columns of VEC-element packs: 256 (the streaming
// kernels' __launch_bounds__ maximum: 4 blocks of 256 per SM rather than 2 of 512, so that a
// block's prologue / epilogue idles a quarter of the SM's threads, not half), 128 for short
// ranges.
constexpr int kMaxStreamThreads = 256;
inline int threads_for(int64_t cols, int vec) {
  const int64_t packs = cols / vec;
  return packs >= 2048 ? kMaxStreamThreads : 128;
}

// Blocks per SM the streaming kernels (shard pass, backward) are built for (__launch_bounds__'s
// second argument): four of 256 threads (64 registers each), two for fp64 (128 registers).
template <typename scalar_t>
constexpr int stream_min_blocks() { return sizeof(scalar_t) == 8 ? 2 : 4; }

inline unsigned grid_for(int64_t work_items) {
  return static_cast<unsigned>(std::min<int64_t>(std::max<int64_t>(work_items, 1), int64_t(1) << 30));
}

}  // namespace cuda
}  // namespace topk_distill
