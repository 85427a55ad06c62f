// The CUDA execution model on the CPU: just what topk-distill's device code uses, and a checker.
//
// Device code (csrc/cuda/kernels/*.cuh) reaches CUDA only through csrc/cuda/portability.cuh.
// Compiled by nvcc that header maps to CUDA itself; compiled by g++ with TD_EMULATE it includes
// this file and cuda_names.h (CUDA's names mapped onto this API), and the same kernel text runs
// here:
//
//   * a launch runs every block of the grid; blocks are taken in an order shuffled from a seed
//     by a few OS threads (one block at a time per OS thread);
//   * a block's threads are fibers (user-level threads with their own stacks) on that OS thread,
//     switched cooperatively at every synchronisation point: __syncthreads(_count/_and/_or),
//     __syncwarp, shuffles and votes. Between two such points a thread runs alone; which warp
//     and which lanes run next is drawn from the seed (TOPK_DISTILL_EMU_SEED), so code that
//     relies on warp lock-step, on one warp not running ahead of another, or on block order
//     gives different results under different seeds instead of passing by luck;
//   * static and dynamic __shared__ memory is one arena per block, filled with 0xFF bytes (NaN
//     for floats) when the block starts, so a read before the first write shows.
//
// What the checker reports (each a td_emu::Error naming the kernel, block and thread; the op
// wrappers turn it into a Python RuntimeError), i.e. what compute-sanitizer's synccheck /
// racecheck / memcheck would for the features used here:
//   * a __syncthreads not reached by every thread of the block: a deadlock (some threads wait at
//     a barrier, others at another barrier, a warp collective or nowhere), threads of one block
//     at barriers on different source lines, or a thread that exited while (or before) others
//     wait at a barrier;
//   * a warp collective (shuffle, vote, __syncwarp) whose mask does not contain the calling
//     lane, names a lane that has exited or does not exist, whose lanes disagree on the
//     operation, the mask or the source line, or a shuffle that reads a lane outside the mask;
//   * a shared-memory access outside its array or outside the launch's dynamic size (through
//     smem_ptr, see portability.cuh);
//   * a launch over the device limits: more than 1024 threads per block (or than the kernel's
//     __launch_bounds__), a grid dimension over its limit, more than 48 KiB of shared memory
//     (static + dynamic; no opt-in is emulated).
//
//   * a global-memory access outside the tensor's storage, or a misaligned one (a 16-byte pack
//     not on 16 bytes), through gmem_ptr (see portability.cuh): every pointer a kernel receives
//     is one, made by the host launcher from the tensor (host_runtime.h: global_ptr).
//
// What it cannot tell: speed, the memory model (all accesses here are sequentially consistent;
// a missing __threadfence is invisible), races on GLOBAL memory between blocks (blocks never run
// interleaved), and the hardware's arithmetic: the
// fast-math intrinsics are replaced by host functions at least as accurate (list below).
//
// Host equivalents of the device intrinsics (each at least as accurate as the device's):
//   __expf(x), __logf(x)      -> std::exp, std::log (the device's are ~2 ulp SFU approximations)
//   exp2f_approx_ftz(x)       -> std::exp2, then denormal results flushed to 0 as .ftz does
//   __fdividef(a, b)          -> a / b
//   atomicAdd/Or/And/Max/Min/Exch/CAS -> GCC __atomic builtins (sequentially consistent)
//   __shfl*_sync, __any/__all/__ballot_sync, __syncthreads*, __syncwarp -> exact semantics of
//   the CUDA programming guide (width segments included).
//
// Pure C++20 and POSIX: no CUDA, no torch. Environment (read at every launch):
//   TOPK_DISTILL_EMU_SEED     schedule seed (default 0); each launch mixes in a launch counter
//   TOPK_DISTILL_EMU_THREADS  OS threads running blocks (default: hardware threads, at most 8)
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <cstddef>
#include <functional>
#include <source_location>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace td_emu {

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr Dim3() = default;
  constexpr Dim3(unsigned x_, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// A checker finding or a fault inside an emulated kernel.
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The running thread's coordinates. Per OS thread: the scheduler sets them before it switches
// to a thread of the block it runs.
extern thread_local Dim3 threadIdx, blockIdx, blockDim, gridDim;

// Device limits the launch is checked against (an H100 / H200 without opt-in).
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr size_t kMaxSharedBytes = 48 * 1024;

struct LaunchConfig {
  const char* kernel;   // for error messages: the launch expression's text
  Dim3 grid, block;
  size_t dynamic_smem;  // bytes
  unsigned max_threads; // the kernel's __launch_bounds__ maximum (0: none declared)
};

// Runs `body` once per thread of every block of the grid; returns when all have finished.
// Throws Error on a checker finding (or rethrows what a thread threw) after abandoning the grid.
void launch(const LaunchConfig& config, const std::function<void()>& body);

// ---- synchronisation points (called from inside a kernel) ------------------------------------

enum class Op : uint8_t {
  kSyncThreads, kSyncThreadsCount, kSyncThreadsAnd, kSyncThreadsOr,
  kSyncWarp, kShfl, kShflUp, kShflDown, kShflXor, kAny, kAll, kBallot,
};

// A block barrier; returns the count / and / or of `predicate` over the block.
int block_barrier(Op op, int predicate, std::source_location site);
// A warp collective. For shuffles `bits` is the value (size bytes) and `arg` the lane argument;
// for votes `bits` is the predicate. Returns the value read / the vote.
uint64_t warp_collective(Op op, unsigned mask, uint64_t bits, unsigned size, int arg, int width,
                         std::source_location site);

template <typename T>
T shuffle(Op op, unsigned mask, T value, int arg, int width, std::source_location site) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffles move up to 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = warp_collective(op, mask, bits, sizeof(T), arg, width, site);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

// ---- shared memory --------------------------------------------------------------------------

// Where a shared array lives in this block's arena; every thread of the block gets the same one.
// `key` tells declarations apart (their source locations). bytes == 0: the dynamic array.
struct SharedRegion {
  unsigned char* begin;
  unsigned char* end;
  const char* what;  // "dynamic shared memory" or the declaration's site, for messages
};
SharedRegion shared_region(size_t bytes, size_t align, std::source_location key, bool dynamic);

[[noreturn]] void shared_out_of_bounds(const SharedRegion& region, const void* address,
                                       size_t size);

// A pointer into shared memory whose every dereference is bounds-checked against its array.
// Arithmetic is free (as with a raw pointer), only accesses are checked.
template <typename T>
class SmemPtr {
 public:
  SmemPtr() = default;
  SmemPtr(T* p, const SharedRegion& region) : p_(p), region_(region) {}
  template <typename U, typename = std::enable_if_t<std::is_convertible_v<U*, T*>>>
  SmemPtr(const SmemPtr<U>& other) : p_(other.get()), region_(other.region()) {}

  T& operator[](int64_t i) const { return *checked(p_ + i); }
  T& operator*() const { return *checked(p_); }
  T* operator->() const { return checked(p_); }
  SmemPtr operator+(int64_t i) const { return {p_ + i, region_}; }
  SmemPtr operator-(int64_t i) const { return {p_ - i, region_}; }
  T* get() const { return p_; }
  const SharedRegion& region() const { return region_; }

 private:
  T* checked(T* q) const {
    const auto* a = reinterpret_cast<const unsigned char*>(q);
    if (a < region_.begin || a + sizeof(T) > region_.end) shared_out_of_bounds(region_, a, sizeof(T));
    return q;
  }
  T* p_ = nullptr;
  SharedRegion region_{nullptr, nullptr, ""};
};

template <typename U, typename T>
SmemPtr<U> smem_cast(const SmemPtr<T>& p) {
  return SmemPtr<U>(reinterpret_cast<U*>(p.get()), p.region());
}

template <typename T>
SmemPtr<T> dynamic_shared(std::source_location site = std::source_location::current()) {
  const SharedRegion r = shared_region(0, alignof(T), site, true);
  return SmemPtr<T>(reinterpret_cast<T*>(r.begin), r);
}

template <typename T>
SmemPtr<T> static_shared(size_t count, std::source_location site) {
  const SharedRegion r = shared_region(count * sizeof(T), alignof(T) < 16 ? 16 : alignof(T), site, false);
  return SmemPtr<T>(reinterpret_cast<T*>(r.begin), r);
}

// ---- global memory --------------------------------------------------------------------------

// The storage a global pointer may reach: a tensor's whole storage (what compute-sanitizer's
// memcheck checks against, with torch's caching allocator off), named for messages.
struct GlobalRegion {
  const unsigned char* begin;
  const unsigned char* end;
  const char* what;  // the kernel argument, e.g. "logits"
};

[[noreturn]] void global_out_of_bounds(const GlobalRegion& region, const void* address,
                                       size_t size, bool read_only);
[[noreturn]] void global_misaligned(const GlobalRegion& region, const void* address, size_t size,
                                    size_t align);

// A pointer into global memory whose every dereference is checked: the accessed bytes must lie
// inside the region, and the address must be aligned for the accessed type (a 16-byte pack:
// 16 bytes, as the GPU's vector loads require; x86 forgives what the GPU does not). Arithmetic is
// free, as with a raw pointer (a pointer may point outside while nothing is read through it).
template <typename T>
class GmemPtr {
 public:
  GmemPtr() = default;
  GmemPtr(std::nullptr_t) {}  // NOLINT: an absent optional argument
  GmemPtr(T* p, const GlobalRegion& region) : p_(p), region_(region) {}
  template <typename U, typename = std::enable_if_t<std::is_convertible_v<U*, T*>>>
  GmemPtr(const GmemPtr<U>& other) : p_(other.get()), region_(other.region()) {}

  T& operator[](int64_t i) const { return *checked(p_ + i); }
  T& operator*() const { return *checked(p_); }
  T* operator->() const { return checked(p_); }
  GmemPtr operator+(int64_t i) const { return {p_ + i, region_}; }
  GmemPtr operator-(int64_t i) const { return {p_ - i, region_}; }
  friend bool operator==(const GmemPtr& a, std::nullptr_t) { return a.p_ == nullptr; }
  friend bool operator!=(const GmemPtr& a, std::nullptr_t) { return a.p_ != nullptr; }
  T* get() const { return p_; }
  const GlobalRegion& region() const { return region_; }

  // The raw pointer to `count` elements from here, all checked now (for code shared with the
  // CPU kernels, which takes raw pointers: csrc/divergences.h).
  T* span(int64_t count) const {
    if (count > 0) {
      checked(p_);
      checked(p_ + (count - 1));
    }
    return p_;
  }

 private:
  T* checked(T* q) const {
    const auto* a = reinterpret_cast<const unsigned char*>(q);
    if (a < region_.begin || a + sizeof(T) > region_.end || region_.begin == nullptr) {
      global_out_of_bounds(region_, a, sizeof(T), std::is_const_v<T>);
    }
    if (reinterpret_cast<uintptr_t>(a) % alignof(T) != 0) {
      global_misaligned(region_, a, sizeof(T), alignof(T));
    }
    return q;
  }
  T* p_ = nullptr;
  GlobalRegion region_{nullptr, nullptr, ""};
};

// reinterpret_cast for a checked pointer (a 16-byte pack over scalars, scalars inside a pack).
template <typename U, typename T>
GmemPtr<U> gmem_cast(const GmemPtr<T>& p) {
  return GmemPtr<U>(reinterpret_cast<U*>(p.get()), p.region());
}

// Counters of what the checker saw, for tests (process-wide; reset with reset_stats()).
struct Stats {
  uint64_t launches, blocks, threads, barriers, warp_collectives;
};
Stats stats();
void reset_stats();

}  // namespace td_emu
