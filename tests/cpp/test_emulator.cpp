// The CUDA emulator (csrc/emu) on small kernels written for it, no torch: the semantics of every
// feature the project's kernels use (barriers, shuffles, votes, atomics, shared memory), and the
// checker catching each fault class it claims to catch - in deliberately broken kernels, test
// code only. Built and run by CMake/CTest (`make test`).
#define TD_EMULATE 1
#include "cuda/portability.cuh"

#include <cstdio>
#include <cstdlib>
#include <functional>
#include <set>
#include <string>
#include <type_traits>
#include <vector>

namespace {

int g_passed = 0, g_failed = 0;

void check(bool ok, const std::string& what) {
  if (ok) {
    ++g_passed;
  } else {
    ++g_failed;
    std::printf("FAIL: %s\n", what.c_str());
  }
}

// Runs f, expects td_emu::Error whose message contains every one of `needles`.
void expect_error(const std::string& what, const std::function<void()>& f,
                  const std::vector<std::string>& needles) {
  try {
    f();
    check(false, what + ": no error was reported");
  } catch (const td_emu::Error& e) {
    const std::string msg = e.what();
    if (std::getenv("TEST_EMULATOR_VERBOSE") != nullptr) std::printf("  %s:\n    %s\n", what.c_str(), msg.c_str());
    bool all = true;
    for (const std::string& n : needles) all &= msg.find(n) != std::string::npos;
    if (!all) std::printf("  message was: %s\n", msg.c_str());
    check(all, what);
  }
}

void set_seed(int seed) { setenv("TOPK_DISTILL_EMU_SEED", std::to_string(seed).c_str(), 1); }

// ------------------------------------------------------------------------- correct kernels

__global__ void shuffles_kernel(int* out) {
  const int lane = threadIdx.x & 31, t = threadIdx.x;
  out[t * 8 + 0] = __shfl_xor_sync(0xffffffffu, 100 + lane, 5);
  out[t * 8 + 1] = __shfl_down_sync(0xffffffffu, 100 + lane, 3);
  out[t * 8 + 2] = __shfl_up_sync(0xffffffffu, 100 + lane, 2, 8);
  out[t * 8 + 3] = __shfl_sync(0xffffffffu, 100 + lane, 7, 16);
  out[t * 8 + 4] = static_cast<int>(__ballot_sync(0xffffffffu, lane % 3 == 0));
  out[t * 8 + 5] = __any_sync(0xffffffffu, lane == 17);
  out[t * 8 + 6] = __all_sync(0xffffffffu, lane < 31);
  const double d = __shfl_xor_sync(0xffffffffu, 0.5 + lane, 16);  // 8-byte values
  out[t * 8 + 7] = static_cast<int>(d * 2);
}

__global__ void barriers_kernel(int* out) {
  const int t = threadIdx.x;
  out[4 * t + 0] = __syncthreads_count(t % 4 == 0);
  out[4 * t + 1] = __syncthreads_and(t < 1000);
  out[4 * t + 2] = __syncthreads_or(t == 77);
  out[4 * t + 3] = __syncthreads_and(t != 5);
}

// Static + dynamic shared memory, atomics, a block reduction through shared memory.
__global__ void shared_kernel(int* out, int n_dynamic) {
  TD_SHARED_ARRAY(int, partial, 32);
  const smem_ptr<unsigned> dyn = dynamic_shared_memory<unsigned>();
  const int t = threadIdx.x;
  for (int i = t; i < n_dynamic; i += blockDim.x) dyn[i] = 0u;
  __syncthreads();
  atomicOr(&dyn[t % n_dynamic], 1u << (t % 32));
  int v = t + 1;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if ((t & 31) == 0) partial[t >> 5] = v;
  __syncthreads();
  if (t == 0) {
    int s = 0;
    for (unsigned w = 0; w < blockDim.x / 32; ++w) s += partial[w];
    out[blockIdx.x * 2] = s;
    unsigned bits = 0;
    for (int i = 0; i < n_dynamic; ++i) bits |= dyn[i];
    out[blockIdx.x * 2 + 1] = static_cast<int>(bits);
  }
}

// Reads shared memory before any thread wrote it: must see the poison (0xFF bytes), not zeros.
__global__ void poison_kernel(unsigned* out) {
  TD_SHARED_ARRAY(unsigned, scratch, 4);
  if (threadIdx.x == 0) out[blockIdx.x] = scratch[blockIdx.x % 4];
}

// Two half-warps shuffling independently (disjoint masks) is legal.
__global__ void half_warps_kernel(int* out) {
  const int lane = threadIdx.x & 31;
  const unsigned mask = lane < 16 ? 0x0000ffffu : 0xffff0000u;
  out[threadIdx.x] = __shfl_xor_sync(mask, lane, 1);
}

// ------------------------------------------------------------------------- broken kernels

__global__ void barrier_in_branch_kernel(int* out) {
  if (threadIdx.x == 0) __syncthreads();  // only one thread reaches it
  out[threadIdx.x] = 1;
}

__global__ void divergent_barrier_sites_kernel(int* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void exit_before_barrier_kernel(int* out) {
  if (threadIdx.x == 5) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void shuffle_names_exited_lane_kernel(int* out) {
  if ((threadIdx.x & 31) == 7) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1, 1);
}

__global__ void lane_not_in_mask_kernel(int* out) {
  out[threadIdx.x] = __shfl_sync(0x1u, 1, 0);
}

// Half a warp shuffles with a full mask while the other half already waits at a barrier.
__global__ void collective_vs_barrier_kernel(int* out) {
  int v = threadIdx.x;
  if ((threadIdx.x & 31) < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
  __syncthreads();
  out[threadIdx.x] = v;
}

// Reads a lane that is not in the mask.
__global__ void read_outside_mask_kernel(int* out) {
  const int lane = threadIdx.x & 31;
  if (lane < 16) out[threadIdx.x] = __shfl_down_sync(0x0000ffffu, lane, 15 - lane + 1, 32);
}

__global__ void dynamic_oob_kernel(int* out, int n) {
  const smem_ptr<int> dyn = dynamic_shared_memory<int>();
  if (threadIdx.x == 3) dyn[n] = 1;  // one past the end
  out[threadIdx.x] = 0;
}

__global__ void static_oob_kernel(int* out) {
  TD_SHARED_ARRAY(int, a, 8);
  a[threadIdx.x % 9] = 1;  // thread 8 writes a[8]
  out[threadIdx.x] = 0;
}

constexpr int kBound = 128;
__global__ void __launch_bounds__(kBound) bounded_kernel(int* out) { out[threadIdx.x] = 1; }

__global__ void huge_static_kernel(int* out) {
  TD_SHARED_ARRAY(double, big, 5000);  // 40000 bytes; with 16 KiB dynamic > 48 KiB
  big[threadIdx.x] = 1.0;
  out[threadIdx.x] = 0;
}

// A block reduction whose shared scratch is reused without the trailing barrier: a warp that
// runs ahead overwrites a partial another warp has not read yet. Correct only by luck of the
// schedule.
__global__ void racy_reduction_kernel(int* out) {
  TD_SHARED_ARRAY(int, scratch, 32);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  int total = 0;
  for (int round = 1; round <= 3; ++round) {
    int v = round * (static_cast<int>(threadIdx.x) + 1);
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    int r = 0;
    for (int w = 0; w < warps; ++w) r += scratch[w];
    total += r;
    // missing: __syncthreads() before scratch is written again
  }
  if (threadIdx.x == 0) out[blockIdx.x] = total;
  out[blockIdx.x + 64 + threadIdx.x] = total;
}

// Relies on lock-step: lane 1 reads what lane 0 wrote, with no __syncwarp in between.
__global__ void lockstep_kernel(int* out) {
  TD_SHARED_ARRAY(int, box, 1);
  if (threadIdx.x == 0) box[0] = 42;
  if (threadIdx.x == 1) out[0] = box[0];
}

// Relies on block order: block 1 reads what block 0 wrote.
__global__ void block_order_kernel(int* flag, int* out) {
  if (threadIdx.x != 0) return;
  if (blockIdx.x == 0) *flag = 7;
  if (blockIdx.x == 1) *out = *flag;
}

// Global memory through gmem_ptr (what every kernel of the project receives): reads and writes
// outside the tensor's storage and a 16-byte pack load off 16 bytes.
struct alignas(16) Float4 {
  float v[4];
};

template <typename T>
gmem_ptr<T> checked(std::vector<std::remove_const_t<T>>& v, const char* what) {
  const auto* b = reinterpret_cast<const unsigned char*>(v.data());
  return gmem_ptr<T>(v.data(), td_emu::GlobalRegion{b, b + v.size() * sizeof(T), what});
}

// Correct: 16-byte packs in, scalars out, every access inside.
__global__ void global_ok_kernel(gmem_ptr<const float> in, gmem_ptr<float> out) {
  const Float4 pk = *gmem_cast<const Float4>(in + 4 * threadIdx.x);
  out[threadIdx.x] = pk.v[0] + pk.v[1] + pk.v[2] + pk.v[3];
}

__global__ void global_oob_read_kernel(gmem_ptr<const float> in, gmem_ptr<float> out, int n) {
  out[threadIdx.x] = in[threadIdx.x + n - 32 + 1];  // the last thread reads in[n]
}

__global__ void global_oob_write_kernel(gmem_ptr<float> out) {
  out[static_cast<int>(threadIdx.x) - 1] = 1.0f;  // thread 0 writes out[-1]
}

__global__ void misaligned_pack_kernel(gmem_ptr<const float> in, gmem_ptr<float> out) {
  // a 16-byte load from a row that starts one float past a 16-byte boundary
  const Float4 pk = *gmem_cast<const Float4>(in + 1 + 4 * threadIdx.x);
  out[threadIdx.x] = pk.v[0];
}

template <typename Kernel, typename... Args>
void launch(Kernel* k, const char* name, unsigned grid, unsigned block, size_t smem,
            unsigned bound, const Args&... args) {
  ::td_emu::make_launch(name, grid, block, smem, bound, k)(args...);
}

}  // namespace

int main() {
  set_seed(0);
  // ---- semantics
  {
    std::vector<int> out(64 * 8, -1);
    launch(&shuffles_kernel, "shuffles_kernel", 1, 64, 0, 0, out.data());
    bool ok = true;
    for (int t = 0; t < 64; ++t) {
      const int lane = t & 31;
      const int* o = &out[t * 8];
      ok &= o[0] == 100 + (lane ^ 5);
      ok &= o[1] == 100 + (lane + 3 < 32 ? lane + 3 : lane);
      ok &= o[2] == 100 + ((lane % 8) >= 2 ? lane - 2 : lane);
      ok &= o[3] == 100 + (lane / 16) * 16 + 7;
      ok &= static_cast<unsigned>(o[4]) == 0x49249249u;
      ok &= o[5] == 1 && o[6] == 0;
      ok &= o[7] == 1 + 2 * (lane ^ 16);
    }
    check(ok, "shuffle and vote semantics (xor, down, up with width 8, idx with width 16, ballot, any, all, doubles)");
  }
  {
    std::vector<int> out(4 * 96, -1);
    launch(&barriers_kernel, "barriers_kernel", 1, 96, 0, 0, out.data());
    bool ok = true;
    for (int t = 0; t < 96; ++t) ok &= out[4 * t] == 24 && out[4 * t + 1] == 1 && out[4 * t + 2] == 1 && out[4 * t + 3] == 0;
    check(ok, "__syncthreads_count / _and / _or");
  }
  for (int seed = 0; seed < 5; ++seed) {
    set_seed(seed);
    std::vector<int> out(2 * 7, -1);
    launch(&shared_kernel, "shared_kernel", 7, 256, 5 * sizeof(unsigned), 0, out.data(), 5);
    bool ok = true;
    for (int b = 0; b < 7; ++b) ok &= out[2 * b] == 256 * 257 / 2 && out[2 * b + 1] == -1;
    check(ok, "static + dynamic shared memory, atomics, block reduction (seed " + std::to_string(seed) + ")");
  }
  {
    std::vector<unsigned> out(3, 0);
    launch(&poison_kernel, "poison_kernel", 3, 32, 0, 0, out.data());
    check(out[0] == 0xffffffffu && out[1] == 0xffffffffu && out[2] == 0xffffffffu,
          "shared memory starts poisoned (0xFF bytes) in every block");
  }
  {
    std::vector<int> out(32, -1);
    launch(&half_warps_kernel, "half_warps_kernel", 1, 32, 0, 0, out.data());
    bool ok = true;
    for (int l = 0; l < 32; ++l) ok &= out[l] == (l ^ 1);
    check(ok, "disjoint-mask collectives of one warp");
  }
  set_seed(0);

  // ---- the checker: each fault class, each error naming the kernel
  std::vector<int> buf(4096, 0);
  int* p = buf.data();
  expect_error("a __syncthreads reached by one thread only",
               [&] { launch(&barrier_in_branch_kernel, "barrier_in_branch_kernel", 1, 64, 0, 0, p); },
               {"barrier_in_branch_kernel", "__syncthreads"});
  expect_error("barriers on different source lines",
               [&] { launch(&divergent_barrier_sites_kernel, "divergent_barrier_sites_kernel", 1, 64, 0, 0, p); },
               {"divergent_barrier_sites_kernel", "divergent barrier"});
  expect_error("a thread that exits before a __syncthreads",
               [&] { launch(&exit_before_barrier_kernel, "exit_before_barrier_kernel", 1, 64, 0, 0, p); },
               {"exit_before_barrier_kernel", "exited"});
  expect_error("a shuffle whose mask names an exited lane",
               [&] { launch(&shuffle_names_exited_lane_kernel, "shuffle_names_exited_lane_kernel", 1, 32, 0, 0, p); },
               {"shuffle_names_exited_lane_kernel", "exited"});
  expect_error("a shuffle whose mask does not contain the calling lane",
               [&] { launch(&lane_not_in_mask_kernel, "lane_not_in_mask_kernel", 1, 32, 0, 0, p); },
               {"lane_not_in_mask_kernel", "not in the mask"});
  expect_error("a full-mask shuffle while half the warp waits at a barrier (deadlock)",
               [&] { launch(&collective_vs_barrier_kernel, "collective_vs_barrier_kernel", 1, 64, 0, 0, p); },
               {"collective_vs_barrier_kernel", "deadlock", "__shfl_xor_sync", "__syncthreads"});
  expect_error("a shuffle that reads a lane outside its mask",
               [&] { launch(&read_outside_mask_kernel, "read_outside_mask_kernel", 1, 32, 0, 0, p); },
               {"read_outside_mask_kernel", "not in the mask"});
  expect_error("dynamic shared memory written one past its end",
               [&] { launch(&dynamic_oob_kernel, "dynamic_oob_kernel", 1, 32, 10 * sizeof(int), 0, p, 10); },
               {"dynamic_oob_kernel", "out of bounds", "dynamic shared memory", "40 bytes"});
  expect_error("a static shared array written one past its end",
               [&] { launch(&static_oob_kernel, "static_oob_kernel", 1, 32, 0, 0, p); },
               {"static_oob_kernel", "out of bounds", "__shared__ array"});
  expect_error("a block of 2048 threads",
               [&] { launch(&bounded_kernel, "bounded_kernel", 1, 2048, 0, 0, p); },
               {"bounded_kernel", "1024"});
  expect_error("a block larger than the kernel's __launch_bounds__",
               [&] { launch(&bounded_kernel, "bounded_kernel", 1, 256, 0, kBound, p); },
               {"bounded_kernel", "__launch_bounds__(128)"});
  expect_error("64 KiB of dynamic shared memory without opt-in",
               [&] { launch(&bounded_kernel, "bounded_kernel", 1, 32, 64 * 1024, 0, p); },
               {"bounded_kernel", "48 KiB"});
  expect_error("static + dynamic shared memory over 48 KiB",
               [&] { launch(&huge_static_kernel, "huge_static_kernel", 1, 32, 16 * 1024, 0, p); },
               {"huge_static_kernel", "48 KiB"});
  {
    std::vector<float> in(4 * 32 + 4, 1.0f), out(32, 0.0f);
    launch(&global_ok_kernel, "global_ok_kernel", 1, 32, 0, 0, checked<const float>(in, "in"),
           checked<float>(out, "out"));
    bool ok = true;
    for (float v : out) ok &= v == 4.0f;
    check(ok, "checked global pointers: in-bounds 16-byte packs and scalar stores pass");
  }
  {
    std::vector<float> in(64, 1.0f), out(32, 0.0f);
    expect_error("a global read one past the tensor's storage",
                 [&] { launch(&global_oob_read_kernel, "global_oob_read_kernel", 1, 32, 0, 0,
                              checked<const float>(in, "in"), checked<float>(out, "out"), 64); },
                 {"global_oob_read_kernel", "global memory read out of bounds", "`in`",
                  "byte offset 256", "256 bytes"});
    expect_error("a global write before the tensor's storage",
                 [&] { launch(&global_oob_write_kernel, "global_oob_write_kernel", 1, 32, 0, 0,
                              checked<float>(out, "out")); },
                 {"global_oob_write_kernel", "out of bounds", "`out`", "byte offset -4"});
    expect_error("a 16-byte vector load off a 16-byte boundary",
                 [&] { launch(&misaligned_pack_kernel, "misaligned_pack_kernel", 1, 4, 0, 0,
                              checked<const float>(in, "in"), checked<float>(out, "out")); },
                 {"misaligned_pack_kernel", "misaligned global memory access", "16 byte(s)",
                  "16-byte aligned"});
  }
  expect_error("a grid.y over 65535",
               [&] { ::td_emu::make_launch("bounded_kernel", td_emu::Dim3(1, 70000), td_emu::Dim3(32), 0, 0, &bounded_kernel)(p); },
               {"bounded_kernel", "65535"});

  // ---- schedules: code that relies on lock-step, on warps not running ahead, or on block order
  // gives different answers under different seeds (and correct code never does).
  {
    std::set<int> totals;
    for (int seed = 0; seed < 40; ++seed) {
      set_seed(seed);
      std::vector<int> out(64 + 256, 0);
      launch(&racy_reduction_kernel, "racy_reduction_kernel", 1, 256, 0, 0, out.data());
      totals.insert(out[0]);
    }
    const int right = (1 + 2 + 3) * 256 * 257 / 2;
    check(totals.size() > 1 && totals.count(right) == 1,
          "a missing trailing barrier gives different block sums under different seeds (" +
              std::to_string(totals.size()) + " distinct)");
  }
  {
    std::set<int> seen;
    for (int seed = 0; seed < 20; ++seed) {
      set_seed(seed);
      int out = -1;
      launch(&lockstep_kernel, "lockstep_kernel", 1, 32, 0, 0, &out);
      seen.insert(out);
    }
    check(seen.count(42) == 1 && seen.size() > 1, "reliance on warp lock-step is exposed by the lane order");
  }
  {
    std::set<int> seen;
    for (int seed = 0; seed < 20; ++seed) {
      set_seed(seed);
      int flag = 0, out = -1;
      setenv("TOPK_DISTILL_EMU_THREADS", "1", 1);
      launch(&block_order_kernel, "block_order_kernel", 2, 32, 0, 0, &flag, &out);
      seen.insert(out);
    }
    unsetenv("TOPK_DISTILL_EMU_THREADS");
    check(seen.count(7) == 1 && seen.count(0) == 1, "reliance on block order is exposed by the block order");
  }

  std::printf("test_emulator: %d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
