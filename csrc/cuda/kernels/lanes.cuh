// Lanes policies for the shared per-row driver `epilogue_row` (csrc/divergences.h) on CUDA: the
// same interface as SerialLanes (first / stride / sum / any / merge / leader / sync).
//
//   WarpLanes   one warp owns a row: entry k goes to lane k % 32; reductions are xor-butterfly
//               shuffles, so every lane ends with the same bits (IEEE + and the LogSumExp merge
//               are symmetric in their two arguments) and the result does not depend on timing.
//   BlockLanes  one block owns a row (large K): warp butterflies, then every thread folds the
//               per-warp partials from shared memory in the same order.
//
// The methods are __host__ __device__ only so that epilogue_row (TD_HD) may call them in nvcc's
// host pass too; they are meaningful in device code only (TD_DEVICE_CODE: nvcc's device pass and
// the emulator - not __CUDA_ARCH__, which the emulated build must not define).
#pragma once

#include <cstdint>

#include "../../divergences.h"
#include "../portability.cuh"

TD_CUDA_NAMESPACE_BEGIN

struct WarpLanes {
  int lane;  // threadIdx.x % 32

  __host__ __device__ __forceinline__ int64_t first() const { return lane; }
  __host__ __device__ __forceinline__ int64_t stride() const { return 32; }

  __host__ __device__ __forceinline__ double sum(double x) const {
#if TD_DEVICE_CODE
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
#endif
    return x;
  }

  __host__ __device__ __forceinline__ bool any(bool x) const {
#if TD_DEVICE_CODE
    return __any_sync(0xffffffffu, x) != 0;
#else
    return x;
#endif
  }

  __host__ __device__ __forceinline__ LogSumExp merge(LogSumExp x) const {
#if TD_DEVICE_CODE
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const double om = __shfl_xor_sync(0xffffffffu, x.max, o);
      const double os = __shfl_xor_sync(0xffffffffu, x.sum, o);
      x.merge(om, os);
    }
#endif
    return x;
  }

  __host__ __device__ __forceinline__ bool leader() const { return lane == 0; }

  __host__ __device__ __forceinline__ void sync() const {
#if TD_DEVICE_CODE
    __syncwarp();
#endif
  }
};

// Scratch for BlockLanes: one slot per warp (blockDim.x <= 1024).
struct BlockScratch {
  double a[32];
  double b[32];
};

struct BlockLanes {
  BlockScratch* scratch;  // in shared memory

  __host__ __device__ __forceinline__ int64_t first() const {
#if TD_DEVICE_CODE
    return threadIdx.x;
#else
    return 0;
#endif
  }
  __host__ __device__ __forceinline__ int64_t stride() const {
#if TD_DEVICE_CODE
    return blockDim.x;
#else
    return 1;
#endif
  }

  __host__ __device__ __forceinline__ double sum(double x) const {
#if TD_DEVICE_CODE
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    if (lane == 0) scratch->a[warp] = x;
    __syncthreads();
    double r = 0.0;
    for (int w = 0; w < warps; ++w) r += scratch->a[w];
    __syncthreads();
    return r;
#else
    return x;
#endif
  }

  __host__ __device__ __forceinline__ bool any(bool x) const {
#if TD_DEVICE_CODE
    return __syncthreads_or(x) != 0;
#else
    return x;
#endif
  }

  __host__ __device__ __forceinline__ LogSumExp merge(LogSumExp x) const {
#if TD_DEVICE_CODE
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const double om = __shfl_xor_sync(0xffffffffu, x.max, o);
      const double os = __shfl_xor_sync(0xffffffffu, x.sum, o);
      x.merge(om, os);
    }
    if (lane == 0) {
      scratch->a[warp] = x.max;
      scratch->b[warp] = x.sum;
    }
    __syncthreads();
    LogSumExp r;
    for (int w = 0; w < warps; ++w) r.merge(scratch->a[w], scratch->b[w]);
    __syncthreads();
    return r;
#else
    return x;
#endif
  }

  __host__ __device__ __forceinline__ bool leader() const {
#if TD_DEVICE_CODE
    return threadIdx.x == 0;
#else
    return true;
#endif
  }

  __host__ __device__ __forceinline__ void sync() const {
#if TD_DEVICE_CODE
    __syncthreads();
#endif
  }
};

TD_CUDA_NAMESPACE_END
