// CUDA's names for emulated device code: threadIdx & co, the barriers, warp collectives,
// atomics and math intrinsics, as global names (as CUDA's are), mapped onto the emulator
// (emu.h). Only translation units that compile device code under TD_EMULATE include this
// (through csrc/cuda/portability.cuh): the names would clash with nothing there, and must not
// leak anywhere else.
#pragma once

#include <cmath>
#include <source_location>

#include "emu.h"

using td_emu::blockDim;
using td_emu::blockIdx;
using td_emu::gridDim;
using td_emu::threadIdx;

inline void __syncthreads(std::source_location site = std::source_location::current()) {
  td_emu::block_barrier(td_emu::Op::kSyncThreads, 0, site);
}
inline int __syncthreads_count(int p, std::source_location site = std::source_location::current()) {
  return td_emu::block_barrier(td_emu::Op::kSyncThreadsCount, p, site);
}
inline int __syncthreads_and(int p, std::source_location site = std::source_location::current()) {
  return td_emu::block_barrier(td_emu::Op::kSyncThreadsAnd, p, site);
}
inline int __syncthreads_or(int p, std::source_location site = std::source_location::current()) {
  return td_emu::block_barrier(td_emu::Op::kSyncThreadsOr, p, site);
}
inline void __syncwarp(unsigned mask = 0xffffffffu,
                       std::source_location site = std::source_location::current()) {
  td_emu::warp_collective(td_emu::Op::kSyncWarp, mask, 0, 0, 0, 32, site);
}
template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32,
              std::source_location site = std::source_location::current()) {
  return td_emu::shuffle(td_emu::Op::kShfl, mask, v, src, width, site);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32,
                 std::source_location site = std::source_location::current()) {
  return td_emu::shuffle(td_emu::Op::kShflUp, mask, v, static_cast<int>(delta), width, site);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32,
                   std::source_location site = std::source_location::current()) {
  return td_emu::shuffle(td_emu::Op::kShflDown, mask, v, static_cast<int>(delta), width, site);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32,
                  std::source_location site = std::source_location::current()) {
  return td_emu::shuffle(td_emu::Op::kShflXor, mask, v, lane_mask, width, site);
}
inline int __any_sync(unsigned mask, int p, std::source_location site = std::source_location::current()) {
  return static_cast<int>(td_emu::warp_collective(td_emu::Op::kAny, mask, p != 0, 0, 0, 32, site));
}
inline int __all_sync(unsigned mask, int p, std::source_location site = std::source_location::current()) {
  return static_cast<int>(td_emu::warp_collective(td_emu::Op::kAll, mask, p != 0, 0, 0, 32, site));
}
inline unsigned __ballot_sync(unsigned mask, int p,
                              std::source_location site = std::source_location::current()) {
  return static_cast<unsigned>(td_emu::warp_collective(td_emu::Op::kBallot, mask, p != 0, 0, 0, 32, site));
}
inline void __threadfence() {}
inline void __threadfence_block() {}

// Atomics: blocks may run on different OS threads at once, so these are real atomics.
template <typename T>
T atomicOr(T* a, T v) { return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST); }
template <typename T>
T atomicAnd(T* a, T v) { return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST); }
template <typename T>
T atomicExch(T* a, T v) { return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST); }
template <typename T>
T atomicCAS(T* a, T expected, T desired) {
  __atomic_compare_exchange_n(a, &expected, desired, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return expected;  // the old value, as CUDA's
}
template <typename T>
T atomicAdd(T* a, T v) {
  if constexpr (std::is_integral_v<T>) {
    return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST);
  } else {
    T old, desired;
    __atomic_load(a, &old, __ATOMIC_SEQ_CST);
    do {
      desired = old + v;
    } while (!__atomic_compare_exchange(a, &old, &desired, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
    return old;
  }
}
template <typename T>
T atomicMax(T* a, T v) {
  T old = __atomic_load_n(a, __ATOMIC_SEQ_CST);
  while (old < v && !__atomic_compare_exchange_n(a, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
  }
  return old;
}
template <typename T>
T atomicMin(T* a, T v) {
  T old = __atomic_load_n(a, __ATOMIC_SEQ_CST);
  while (v < old && !__atomic_compare_exchange_n(a, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
  }
  return old;
}

// Math: CUDA's global overloads, and the fast intrinsics as host functions at least as accurate.
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }
using std::isfinite;
using std::isinf;
using std::isnan;
