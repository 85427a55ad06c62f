// CUDA epilogue: per-row loss, masses and g = dL/ds from the global row statistics (semantics:
// csrc/registration.cpp; the math is the shared driver epilogue_row in csrc/divergences.h, the
// same code the CPU kernel runs, here with a warp or a block as its Lanes).
//
// Memory traffic: O(N * K) - reads the row stats, the gathered logits, ids, teacher log-probs
// (and the mask), writes g [N, K] f64 and O(N) results; compute-bound on the fp64 exp / log of
// the bins, not on memory.
//
// Work split: K <= 256 (the fast path): one warp per row (WarpLanes), 8 rows per 256-thread
// block, entry k on lane k % 32. K > 256: one 256-thread block per row (BlockLanes). Reductions
// are fixed-order butterflies, so results are bitwise reproducible.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../ops.h"
#include "common.cuh"
#include "lanes.cuh"

namespace topk_distill {
namespace cuda {
namespace {

constexpr int64_t kWarpPathMaxK = 256;
constexpr int kEpilogueThreads = 256;

template <typename acc_t, typename id_t, typename lp_t>
struct EpilogueArgs {
  LossParams params;
  int64_t N, K, vocab_size;
  const acc_t* row_max;   // [N]
  const acc_t* sums;      // [N, 3]
  const acc_t* gathered;  // [N, K]
  const id_t* ids;        // [N, K]
  const lp_t* lp;         // [N, K]
  const bool* mask;       // [N] or null
  acc_t* loss;            // [N]
  float* student_mass;    // [N]
  float* teacher_mass;    // [N]
  double* row_coefs;      // [N, 3]
  double* g;              // [N, K]
};

template <class Lanes, typename acc_t, typename id_t, typename lp_t>
__device__ __forceinline__ void epilogue_one_row(const Lanes& lanes,
                                                 const EpilogueArgs<acc_t, id_t, lp_t>& a,
                                                 int64_t n) {
  const RowStats st{static_cast<double>(a.row_max[n]), static_cast<double>(a.sums[3 * n]),
                    static_cast<double>(a.sums[3 * n + 1]), static_cast<double>(a.sums[3 * n + 2])};
  const bool counted = a.mask == nullptr || a.mask[n];
  const RowResult r = epilogue_row(lanes, a.params, a.K, st, counted, a.vocab_size,
                                   a.gathered + n * a.K, a.ids + n * a.K, a.lp + n * a.K,
                                   a.g + n * a.K);
  if (lanes.leader()) {
    a.loss[n] = static_cast<acc_t>(r.loss);
    a.student_mass[n] = static_cast<float>(r.student_mass);
    a.teacher_mass[n] = static_cast<float>(r.teacher_mass);
    a.row_coefs[3 * n + 0] = r.log_sum;
    a.row_coefs[3 * n + 1] = r.dense_coef;
    a.row_coefs[3 * n + 2] = r.outside_coef;
  }
}

// One warp per row. A warp's row index is uniform across its lanes, so the whole warp enters
// or leaves the loop together (the shuffles in WarpLanes need all 32 lanes).
template <typename acc_t, typename id_t, typename lp_t>
__global__ void __launch_bounds__(kEpilogueThreads)
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
__global__ void __launch_bounds__(kEpilogueThreads)
    epilogue_block_kernel(const EpilogueArgs<acc_t, id_t, lp_t> a) {
  __shared__ BlockScratch scratch;
  const BlockLanes lanes{&scratch};
  for (int64_t n = blockIdx.x; n < a.N; n += gridDim.x) {
    epilogue_one_row(lanes, a, n);
    __syncthreads();  // (BlockLanes already ends each reduction with a barrier; cheap insurance)
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> epilogue_cuda(
    const at::Tensor& row_max, const at::Tensor& sums, const at::Tensor& gathered,
    const at::Tensor& teacher_ids, const at::Tensor& teacher_logprobs,
    const std::optional<at::Tensor>& mask, int64_t vocab_size, c10::string_view loss,
    c10::string_view support, double beta, double rkl_ratio, double skew,
    std::optional<double> log_prob_min_clamp, double loss_scale) {
  check_epilogue_args(row_max, sums, gathered, teacher_ids, teacher_logprobs, mask);
  if (mask.has_value()) {
    TORCH_CHECK_VALUE(mask->device() == row_max.device(), "mask must be on ", row_max.device(),
                      " like the other epilogue inputs; got ", mask->device());
  }
  const LossParams params = loss_params_from_args(std::string(loss), std::string(support), beta,
                                                  rkl_ratio, skew, log_prob_min_clamp, loss_scale);
  const c10::cuda::CUDAGuard guard(row_max.device());
  const int64_t N = teacher_ids.size(0), K = teacher_ids.size(1);
  const auto acc_opts = row_max.options();
  at::Tensor loss_rows = at::empty({N}, acc_opts);
  at::Tensor student_mass = at::empty({N}, acc_opts.dtype(at::kFloat));
  at::Tensor teacher_mass = at::empty({N}, acc_opts.dtype(at::kFloat));
  at::Tensor row_coefs = at::empty({N, 3}, acc_opts.dtype(at::kDouble));
  at::Tensor grad = at::empty({N, K}, acc_opts.dtype(at::kDouble));
  if (N == 0) return {loss_rows, student_mass, teacher_mass, row_coefs, grad};
  const bool* mask_ptr = mask.has_value() ? mask->const_data_ptr<bool>() : nullptr;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(row_max.device().index()).stream();

  AT_DISPATCH_FLOATING_TYPES(row_max.scalar_type(), "epilogue_cuda", [&] {
    using acc_t = scalar_t;
    AT_DISPATCH_INDEX_TYPES(teacher_ids.scalar_type(), "epilogue_cuda_ids", [&] {
      using id_t = index_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, teacher_logprobs.scalar_type(),
                                      "epilogue_cuda_lp", [&] {
        using lp_t = scalar_t;
        EpilogueArgs<acc_t, id_t, lp_t> a{};
        a.params = params;
        a.N = N;
        a.K = K;
        a.vocab_size = vocab_size;
        a.row_max = row_max.const_data_ptr<acc_t>();
        a.sums = sums.const_data_ptr<acc_t>();
        a.gathered = gathered.const_data_ptr<acc_t>();
        a.ids = teacher_ids.const_data_ptr<id_t>();
        a.lp = teacher_logprobs.const_data_ptr<lp_t>();
        a.mask = mask_ptr;
        a.loss = loss_rows.mutable_data_ptr<acc_t>();
        a.student_mass = student_mass.mutable_data_ptr<float>();
        a.teacher_mass = teacher_mass.mutable_data_ptr<float>();
        a.row_coefs = row_coefs.mutable_data_ptr<double>();
        a.g = grad.mutable_data_ptr<double>();
        if (K <= kWarpPathMaxK) {
          const int64_t rows_per_block = kEpilogueThreads / 32;
          const unsigned grid = grid_for((N + rows_per_block - 1) / rows_per_block);
          epilogue_warp_kernel<acc_t, id_t, lp_t><<<grid, kEpilogueThreads, 0, stream>>>(a);
        } else {
          epilogue_block_kernel<acc_t, id_t, lp_t><<<grid_for(N), kEpilogueThreads, 0, stream>>>(a);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return {loss_rows, student_mass, teacher_mass, row_coefs, grad};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(topk_distill, CUDA, m) { m.impl("epilogue", &cuda::epilogue_cuda); }

}  // namespace topk_distill
