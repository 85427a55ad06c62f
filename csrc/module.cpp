// The Python module entry of topk_distill._C. The ops themselves are registered with the
// dispatcher by static initializers (TORCH_LIBRARY in registration.cpp, TORCH_LIBRARY_IMPL in
// cpu/ and cuda/); `import topk_distill._C` only has to load this library for them to run.
// What is exported here is build information, for tests and bug reports.
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>

#include "emu/emu.h"

#include <mutex>
#include <set>
#include <thread>

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif

namespace {

// How many distinct threads an at::parallel_for compiled into *this* library uses for `n`
// independent items (grain size 1). at::parallel_for's OpenMP backend is header code, so
// it is only parallel if this library was built with -fopenmp: a build-system guard.
int64_t parallel_for_threads(int64_t n) {
  std::mutex mu;
  std::set<std::thread::id> ids;
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    // Enough work per chunk that one thread cannot grab every chunk before the others start.
    volatile double x = 0;
    for (int64_t i = begin; i < end; ++i)
      for (int j = 0; j < 2000000; ++j) x = x + 1e-9 * j;
    std::lock_guard<std::mutex> lock(mu);
    ids.insert(std::this_thread::get_id());
  });
  return static_cast<int64_t>(ids.size());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "topk-distill kernels; the ops are torch.ops.topk_distill.*";
#ifdef TOPK_DISTILL_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
#ifdef _OPENMP
  m.attr("with_openmp") = true;
#else
  m.attr("with_openmp") = false;
#endif
  m.def("_parallel_for_threads", &parallel_for_threads, pybind11::arg("n"),
        "Distinct threads used by an at::parallel_for over n items in this library.");
  m.def(
      "_emu_stats",
      [] {
        const td_emu::Stats s = td_emu::stats();
        pybind11::dict d;
        d["launches"] = s.launches;
        d["blocks"] = s.blocks;
        d["threads"] = s.threads;
        d["barriers"] = s.barriers;
        d["warp_collectives"] = s.warp_collectives;
        return d;
      },
      "What the CUDA emulator has run since the last _emu_reset_stats(): launches, blocks, "
      "threads, barriers and warp collectives passed (process-wide).");
  m.def("_emu_reset_stats", &td_emu::reset_stats, "Zero the CUDA emulator's counters.");
}
