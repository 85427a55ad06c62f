// CUDA epilogue, device code: per-row loss (a weighted sum of loss terms), masses, the label's
// log-prob, the entropy, and g = dL/ds_k from the global row statistics (semantics:
// csrc/registration.cpp; the math is the shared drivers epilogue_row and row_extras in
// csrc/divergences.h, the same code the CPU kernel runs, here with a warp or a block as Lanes).
//
// Memory traffic: O(N * K) - reads the row stats, the gathered logits, ids, teacher log-probs
// (and the mask, the labels, the sampled support's label log-probs), writes g [N, K] f64 and O(N) results; compute-bound on the fp64
// exp / log of the bins, not on memory.
//
// Work split: K <= 256 (the fast path): one warp per row (WarpLanes), 8 rows per 256-thread
// block, entry k on lane k % 32. K > 256: one 256-thread block per row (BlockLanes). Reductions
// are fixed-order butterflies, so results are bitwise reproducible.
//
// Device code only: CUDA through portability.cuh; the host launcher is csrc/cuda/epilogue.cu.
#pragma once

#include <cstdint>

#include "../../divergences.h"
#include "common.cuh"
#include "lanes.cuh"

TD_CUDA_NAMESPACE_BEGIN

constexpr int64_t kWarpPathMaxK = 256;
constexpr int kEpilogueThreads = 256;
constexpr int64_t kEpilogueSums = 5;       // (csrc/ops.h kShardSums)
constexpr int64_t kEpilogueRowCoefs = 7;   // (csrc/ops.h kRowCoefs)

template <typename acc_t, typename id_t, typename lp_t>
struct EpilogueArgs {
  LossTerms terms;
  int64_t N, K, vocab_size;
  int64_t gathered_cols;  // K + L
  bool with_entropy;
  gmem_ptr<const acc_t> row_max;   // [N]
  gmem_ptr<const acc_t> sums;      // [N, 5]
  gmem_ptr<const acc_t> gathered;  // [N, K + L]
  gmem_ptr<const id_t> ids;        // [N, K]
  gmem_ptr<const lp_t> lp;         // [N, K]
  gmem_ptr<const bool> mask;       // [N] or null
  gmem_ptr<const int64_t> labels;  // [N] or null
  // support="sampled" (SPEC 10.2; terms.any_sampled): the label's teacher log-prob [N], its
  // sampling log-prob [N] or null (mu = q), the weight clip, and missing_teacher="drop".
  gmem_ptr<const double> label_teacher_lp;
  gmem_ptr<const double> label_sample_lp;
  bool has_clip;
  double clip;
  bool drop_missing_label;
  gmem_ptr<acc_t> loss;            // [N]
  gmem_ptr<float> student_mass;    // [N]
  gmem_ptr<float> teacher_mass;    // [N]
  gmem_ptr<acc_t> label_logprobs;  // [N]
  gmem_ptr<acc_t> entropy;         // [N]
  gmem_ptr<double> row_coefs;      // [N, 7]
  gmem_ptr<double> g;              // [N, K]
};

template <class Lanes, typename acc_t, typename id_t, typename lp_t>
__device__ __forceinline__ void epilogue_one_row(const Lanes& lanes,
                                                 const EpilogueArgs<acc_t, id_t, lp_t>& a,
                                                 int64_t n) {
  const gmem_ptr<const acc_t> s = a.sums + n * kEpilogueSums;
  const RowStats st{static_cast<double>(a.row_max[n]), static_cast<double>(s[0]),
                    static_cast<double>(s[1]), static_cast<double>(s[2]),
                    static_cast<double>(s[3]), static_cast<double>(s[4])};
  const bool counted = a.mask == nullptr || a.mask[n];
  const gmem_ptr<const acc_t> x = a.gathered + n * a.gathered_cols;
  // The sampled token (row-uniform: every lane builds the same one).
  SampledLabel sampled = no_sampled_label();
  if (a.terms.any_sampled && counted && a.labels[n] >= 0) {
    sampled = {true, a.labels[n], to_double(x[a.K]), a.label_teacher_lp[n],
               a.label_sample_lp != nullptr,
               a.label_sample_lp != nullptr ? a.label_sample_lp[n] : 0.0, a.has_clip, a.clip,
               a.drop_missing_label};
  }
  // (epilogue_row is shared with the CPU kernel and takes raw pointers: the row's spans are
  // checked whole here, under the emulator; it reads entries [0, K) only)
  const RowResult r = epilogue_row(lanes, a.terms, a.K, st, counted, a.vocab_size,
                                   gmem_span(x, a.K), gmem_span(a.ids + n * a.K, a.K),
                                   gmem_span(a.lp + n * a.K, a.K), gmem_span(a.g + n * a.K, a.K),
                                   nullptr, sampled);
  if (lanes.leader()) {
    const bool has_label = a.labels != nullptr;
    const RowExtras e = row_extras(st, r.log_sum, counted, has_label,
                                   has_label ? a.labels[n] : int64_t(-1), a.vocab_size,
                                   has_label ? x[a.K] : acc_t(0), a.with_entropy);
    a.loss[n] = static_cast<acc_t>(r.loss);
    a.student_mass[n] = static_cast<float>(r.student_mass);
    a.teacher_mass[n] = static_cast<float>(r.teacher_mass);
    a.label_logprobs[n] = static_cast<acc_t>(e.label_logprob);
    a.entropy[n] = static_cast<acc_t>(e.entropy);
    write_row_coefs(gmem_span(a.row_coefs + n * kEpilogueRowCoefs, kEpilogueRowCoefs), r, e);
  }
}

// Both kernels say "at least 1 block per SM" (__launch_bounds__'s second argument): without it
// nvcc 13.0's ptxas capped the epilogue at 128 registers for sm_100 and spilled 12-36 bytes per
// thread; with it, 162-170 registers and no spills on sm_100 (sm_90: unchanged, no spills), at
// 1 block (8 warps) per SM for this O(N K) kernel (make sass: benchmarks/results/sass_sm100.md).
//
// One warp per row. A warp's row index is uniform across its lanes, so the whole warp enters
// or leaves the loop together (the shuffles in WarpLanes need all 32 lanes).
template <typename acc_t, typename id_t, typename lp_t>
__global__ void __launch_bounds__(kEpilogueThreads, 1)
    epilogue_warp_kernel(const EpilogueArgs<acc_t, id_t, lp_t> a) {
  const int lane = threadIdx.x & 31;
  const int64_t warps_per_block = blockDim.x >> 5;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * warps_per_block + (threadIdx.x >> 5);
  const int64_t step = static_cast<int64_t>(gridDim.x) * warps_per_block;
  const WarpLanes lanes{lane};
  for (int64_t n = first; n < a.N; n += step) epilogue_one_row(lanes, a, n);
}

// One block per row (large K).
template <typename acc_t, typename id_t, typename lp_t>
__global__ void __launch_bounds__(kEpilogueThreads, 1)
    epilogue_block_kernel(const EpilogueArgs<acc_t, id_t, lp_t> a) {
  TD_SHARED_OBJECT(BlockScratch, scratch);
  const BlockLanes lanes{&scratch};
  for (int64_t n = blockIdx.x; n < a.N; n += gridDim.x) {
    epilogue_one_row(lanes, a, n);
    __syncthreads();  // (BlockLanes already ends each reduction with a barrier; cheap insurance)
  }
}

TD_CUDA_NAMESPACE_END
