// The one door between topk-distill's device code and CUDA.
//
// Device code (csrc/cuda/kernels/*.cuh: kernels and their helpers) uses CUDA only through what
// this header provides, and never tests __CUDA_ARCH__ itself (c10's headers change behaviour
// with it). The same text then compiles
//   * under nvcc, for the GPU: everything below maps to CUDA itself, at no cost;
//   * under g++ with TD_EMULATE defined (csrc/emu/*_emu.cpp), against the emulator of the CUDA
//     execution model in csrc/emu/emu.h, which runs it on the CPU and checks it.
//
// What device code may use:
//   qualifiers     __global__ __device__ __host__ __forceinline__ __launch_bounds__ __align__
//   indices        threadIdx blockIdx blockDim gridDim (.x; the kernels are 1-D)
//   barriers       __syncthreads, __syncthreads_count/_and/_or, __syncwarp
//   warp           __shfl_sync, __shfl_up/down/xor_sync, __any_sync, __all_sync, __ballot_sync
//   atomics        atomicAdd/Or/And/Max/Min/Exch/CAS
//   math           <cmath>, __expf, __logf, __fdividef, exp2_approx_ftz, fma_rn, mul_rn,
//                  bits_to_float, pack_bf16x2_rn, pack_f16x2_rn (below),
//                  min/max/isnan/isfinite. nvcc contracts a * b + c into one FMA by default (also
//                  when the product a * b is stored or compared elsewhere: that use then sees the
//                  rounded product, the sum the exact one) and the host compiler does not. So
//                  device code never leaves it to the compiler where the rounding is visible:
//                  fma_rn(a, b, c) where it wants one rounding (both builds: the same FMA), and
//                  mul_rn(a, b) for a product that is stored or compared and also added
//                  (__fmul_rn / __dmul_rn: never contracted; a plain multiply under g++), and
//                  add_rn(a, b) for a sum of a math function's result (expf ends with a product).
//                  python -m tools.fmad_check shows what nvcc would still contract.
//   global memory  gmem_ptr<T>                   a pointer into a tensor: T* on the GPU, a pointer
//                                                checked against the tensor's storage (bounds) and
//                                                the accessed type (alignment) under the emulator;
//                                                every global pointer a kernel receives is one
//                  gmem_cast<U>(p)               reinterpret a gmem_ptr (16-byte packs)
//                  gmem_span(p, n)               the raw T* to n elements, checked once (for code
//                                                shared with the CPU: csrc/divergences.h)
//                  address_of(p)                 the address, for alignment arithmetic
//   shared memory  TD_SHARED_ARRAY(T, name, n)   a static __shared__ T name[n], used as smem_ptr<T>
//                  TD_SHARED_OBJECT(T, name)     a static __shared__ T name
//                  dynamic_shared_memory<T>()    the launch's dynamic shared memory as smem_ptr<T>
//                  smem_ptr<T>                   a pointer into shared memory: T* on the GPU, a
//                                                bounds-checked pointer under the emulator
//                  smem_cast<U>(p)               reinterpret a smem_ptr
//   TD_DEVICE_CODE 1 where device code is being compiled (nvcc's device pass, the emulator),
//                  0 in nvcc's host pass (for __host__ __device__ helpers)
//   TD_CUDA_NAMESPACE_BEGIN / _END   open topk_distill::cuda plus an inline namespace that
//                  differs between the two builds, so that the GPU build's host-pass copies of
//                  __host__ __device__ helpers and the emulated build's real ones can never be
//                  merged by the linker (same names, different bodies).
//
// Host launchers launch with TD_LAUNCH(grid, block, smem_bytes, stream, max_threads, kernel)(args),
// max_threads being the kernel's __launch_bounds__ maximum (the emulator enforces it; on the GPU
// the launch itself fails when exceeded).
#pragma once

#include <cstdint>

#if defined(TD_EMULATE)

#include <bit>
#include <source_location>

#include "../emu/cuda_names.h"
#include "../emu/emu.h"

#define TD_DEVICE_CODE 1
#define TD_BACKEND_NAMESPACE emulated

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

template <typename T>
using smem_ptr = td_emu::SmemPtr<T>;
using td_emu::smem_cast;

#define TD_SHARED_ARRAY(T, name, n) \
  const smem_ptr<T> name = td_emu::static_shared<T>((n), std::source_location::current())
#define TD_SHARED_OBJECT(T, name) \
  T& name = *td_emu::static_shared<T>(1, std::source_location::current()).get()

template <typename T>
inline smem_ptr<T> dynamic_shared_memory() {
  return td_emu::dynamic_shared<T>();
}

template <typename T>
using gmem_ptr = td_emu::GmemPtr<T>;
using td_emu::gmem_cast;
template <typename T>
inline T* gmem_span(const gmem_ptr<T>& p, int64_t n) { return p.span(n); }
template <typename T>
inline uintptr_t address_of(const gmem_ptr<T>& p) { return reinterpret_cast<uintptr_t>(p.get()); }

// a * b + c rounded once (std::fma is correctly rounded, with or without hardware FMA).
inline float fma_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
// a + b rounded (for a sum whose operand is a library function's last product, e.g. expf's
// scaling: nvcc would fuse that product into the sum).
inline float add_rn(float a, float b) { return a + b; }
inline double add_rn(double a, double b) { return a + b; }
// a * b rounded. (g++ contracts nothing here: setup.py compiles in ISO C++ mode, where
// -ffp-contract=off is the default, and baseline x86-64 has no FMA instruction to contract into.)
inline float mul_rn(float a, float b) { return a * b; }
inline double mul_rn(double a, double b) { return a * b; }

// 2^x with denormal results flushed to zero, like ex2.approx.ftz.f32 (exact here).
inline float exp2_approx_ftz(float x) {
  const float r = std::exp2(x);
  return std::fpclassify(r) == FP_SUBNORMAL ? 0.0f : r;
}

// The float with these bits (__uint_as_float).
inline float bits_to_float(uint32_t u) { return std::bit_cast<float>(u); }

// Two floats rounded to nearest even into a bf16 / fp16 pair, lo in the low 16 bits
// (__floats2bfloat162_rn / __floats2half2_rn: one F2FP for two values on the GPU).
inline uint32_t pack_bf16x2_rn(float lo, float hi) {
  auto one = [](float f) -> uint32_t {
    const uint32_t u = std::bit_cast<uint32_t>(f);
    if (f != f) return 0x7fc0u;  // (c10's NaN)
    return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  };
  return one(lo) | (one(hi) << 16);
}
inline uint32_t pack_f16x2_rn(float lo, float hi) {
  auto one = [](float f) -> uint32_t {
    return std::bit_cast<uint16_t>(static_cast<_Float16>(f));  // IEEE round to nearest even
  };
  return one(lo) | (one(hi) << 16);
}

namespace td_emu {
template <typename Kernel>
struct PendingLaunch {
  LaunchConfig config;
  Kernel* kernel;
  template <typename... Args>
  void operator()(const Args&... args) const {
    launch(config, [&] { kernel(args...); });  // each thread gets its own copy of the arguments
  }
};
template <typename Kernel>
PendingLaunch<Kernel> make_launch(const char* name, Dim3 grid, Dim3 block, size_t smem,
                                  unsigned max_threads, Kernel* kernel) {
  return {{name, grid, block, smem, max_threads}, kernel};
}
template <typename Kernel, typename Stream>
PendingLaunch<Kernel> make_launch(const char* name, Dim3 grid, Dim3 block, size_t smem,
                                  Stream /* no streams: launches run to completion */,
                                  unsigned max_threads, Kernel* kernel) {
  return make_launch(name, grid, block, smem, max_threads, kernel);
}
}  // namespace td_emu

#define TD_LAUNCH(grid, block, smem, stream, max_threads, ...)                              \
  ::td_emu::make_launch(#__VA_ARGS__, ::td_emu::Dim3(grid), ::td_emu::Dim3(block), (smem), \
                        (stream), (max_threads), &__VA_ARGS__)

#else  // nvcc

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#if defined(__CUDA_ARCH__)
#define TD_DEVICE_CODE 1
#else
#define TD_DEVICE_CODE 0
#endif
#define TD_BACKEND_NAMESPACE device

template <typename T>
using smem_ptr = T*;

#define TD_SHARED_ARRAY(T, name, n) __shared__ T name[n]
#define TD_SHARED_OBJECT(T, name) __shared__ T name

template <typename T>
__device__ __forceinline__ T* dynamic_shared_memory() {
  extern __shared__ __align__(16) unsigned char td_dynamic_smem[];
  return reinterpret_cast<T*>(td_dynamic_smem);
}

template <typename U, typename T>
__device__ __forceinline__ U* smem_cast(T* p) {
  return reinterpret_cast<U*>(p);
}

template <typename T>
using gmem_ptr = T*;
template <typename U, typename T>
__device__ __forceinline__ U* gmem_cast(T* p) {
  return reinterpret_cast<U*>(p);
}
template <typename T>
__device__ __forceinline__ T* gmem_span(T* p, int64_t) { return p; }
template <typename T>
__device__ __forceinline__ uintptr_t address_of(const T* p) { return reinterpret_cast<uintptr_t>(p); }

__device__ __forceinline__ float fma_rn(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fma_rn(double a, double b, double c) { return __fma_rn(a, b, c); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

__device__ __forceinline__ float exp2_approx_ftz(float x) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}

__device__ __forceinline__ float bits_to_float(uint32_t u) { return __uint_as_float(u); }

__device__ __forceinline__ uint32_t pack_bf16x2_rn(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
__device__ __forceinline__ uint32_t pack_f16x2_rn(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

#define TD_LAUNCH(grid, block, smem, stream, max_threads, ...) \
  __VA_ARGS__<<<(grid), (block), (smem), (stream)>>>

#endif

#define TD_CUDA_NAMESPACE_BEGIN \
  namespace topk_distill {      \
  namespace cuda {              \
  inline namespace TD_BACKEND_NAMESPACE {
#define TD_CUDA_NAMESPACE_END \
  }                           \
  }                           \
  }
