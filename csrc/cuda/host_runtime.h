// What the host launchers (csrc/cuda/*.cu) need from the CUDA runtime: the device guard, the
// current stream, the SM count, output allocation, the launch check, the kernels' global pointers
// (global_in / global_out: a tensor's data as gmem_ptr, checked against the tensor's storage under
// the emulator), and where the ops are registered. Two implementations of one interface:
//   * the GPU build (nvcc): c10's CUDA guard and stream, cudaDeviceGetAttribute, at::empty;
//   * the emulated build (g++, TD_EMULATE; csrc/emu/*_emu.cpp): CPU tensors, no stream, the SM
//     count from TOPK_DISTILL_EMU_SMS (default 132, an H100) so that the launch geometry - the
//     split-row path included - is what a GPU of that size would get, at test sizes; outputs
//     are poisoned (NaN, or all bits set for integers) so that an element a kernel forgets to
//     write shows instead of reading as a plausible 0.
// The ops register under TD_OPS_NAMESPACE for TD_DISPATCH_KEY: topk_distill / CUDA, or
// topk_distill_emu / CPU (the same schemas, csrc/registration.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdlib>
#include <limits>

#include "portability.cuh"

#if defined(TD_EMULATE)

#define TD_OPS_NAMESPACE topk_distill_emu
#define TD_DISPATCH_KEY CPU

TD_CUDA_NAMESPACE_BEGIN

using Stream = int;

struct DeviceGuard {
  explicit DeviceGuard(const at::Device& device) {
    TORCH_CHECK_VALUE(device.is_cpu(), "the emulated CUDA kernels run on CPU tensors; got ", device);
  }
};

inline Stream current_stream(const at::Device&) { return 0; }

inline int sm_count(const at::Device&) {
  const char* v = std::getenv("TOPK_DISTILL_EMU_SMS");
  const int sms = (v != nullptr && *v != '\0') ? std::atoi(v) : 132;
  TORCH_CHECK_VALUE(sms > 0, "TOPK_DISTILL_EMU_SMS must be a positive integer; got '", v, "'");
  return sms;
}

inline void check_launch() {}  // the emulator throws from the launch itself

// A tensor's data as a kernel's global pointer, checked against the tensor's whole storage (what
// compute-sanitizer's memcheck sees as its allocation once torch's caching allocator is off) and
// named `what` in the checker's messages.
template <typename T>
gmem_ptr<T> global_ptr(T* p, const at::Tensor& t, const char* what) {
  const auto* begin = static_cast<const unsigned char*>(t.storage().data());
  return gmem_ptr<T>(p, td_emu::GlobalRegion{begin, begin + (begin ? t.storage().nbytes() : 0), what});
}

// An output the kernels will fill: poisoned here (see above).
inline at::Tensor device_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  if (at::isFloatingType(t.scalar_type())) {
    t.fill_(std::numeric_limits<double>::quiet_NaN());
  } else {
    t.fill_(-1);
  }
  return t;
}

TD_CUDA_NAMESPACE_END

#else  // the GPU

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#define TD_OPS_NAMESPACE topk_distill
#define TD_DISPATCH_KEY CUDA

TD_CUDA_NAMESPACE_BEGIN

using Stream = cudaStream_t;
using DeviceGuard = c10::cuda::CUDAGuard;

inline Stream current_stream(const at::Device& device) {
  return c10::cuda::getCurrentCUDAStream(device.index()).stream();
}

inline int sm_count(const at::Device& device) {
  static int cached[64] = {0};
  const int d = static_cast<int>(device.index());
  if (d >= 0 && d < 64 && cached[d] > 0) return cached[d];
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, d));
  if (d >= 0 && d < 64) cached[d] = sms;
  return sms;
}

inline void check_launch() { C10_CUDA_KERNEL_LAUNCH_CHECK(); }

inline at::Tensor device_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::empty(sizes, options);
}

template <typename T>
T* global_ptr(T* p, const at::Tensor&, const char*) {
  return p;
}

TD_CUDA_NAMESPACE_END

#endif

TD_CUDA_NAMESPACE_BEGIN
// Inputs (read-only) and outputs of a kernel, as the global pointers its arguments hold.
template <typename T>
gmem_ptr<const T> global_in(const at::Tensor& t, const char* what) {
  return global_ptr(t.const_data_ptr<T>(), t, what);
}
template <typename T>
gmem_ptr<T> global_out(const at::Tensor& t, const char* what) {
  return global_ptr(t.mutable_data_ptr<T>(), t, what);
}
TD_CUDA_NAMESPACE_END
