// The CUDA execution-model emulator (what it does and checks: emu.h).
//
// Structure: launch() shuffles the grid's blocks and hands them to a few OS threads
// (Workers). A Worker runs one block at a time: a fiber per CUDA thread, all on its OS thread,
// and a scheduler loop that repeatedly picks a warp with runnable lanes (at random) and runs
// those lanes (in a random order) until each reaches its next synchronisation point. A
// synchronisation point records the thread's arrival in the block's barrier slot or its warp's
// collective slot; the last arrival computes everyone's result and makes them runnable again.
// Nothing runnable while some threads have not exited is a deadlock, reported with where every
// thread waits.
#include "emu.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <thread>
#include <tuple>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace td_emu {

thread_local Dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace {

// ---------------------------------------------------------------------------------------------
// Context switching. glibc's swapcontext makes a signal-mask system call per switch (~7x slower
// for barrier-heavy kernels), so on x86-64 a switch saves only what the SysV ABI says a callee
// must preserve: rbx, rbp, r12-r15, the stack pointer, MXCSR and the x87 control word.
// ---------------------------------------------------------------------------------------------
#if defined(__x86_64__)

extern "C" void td_emu_swap_context(void** save_sp, void* load_sp);
extern "C" void td_emu_fiber_start();

asm(R"(
  .text
  .p2align 4
  .globl td_emu_swap_context
  .hidden td_emu_swap_context
  .type td_emu_swap_context, @function
td_emu_swap_context:
  endbr64
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size td_emu_swap_context, .-td_emu_swap_context

  .p2align 4
  .globl td_emu_fiber_start
  .hidden td_emu_fiber_start
  .type td_emu_fiber_start, @function
td_emu_fiber_start:
  .cfi_startproc
  .cfi_undefined rip
  endbr64
  movq %r12, %rdi
  callq *%r13
  ud2
  .cfi_endproc
  .size td_emu_fiber_start, .-td_emu_fiber_start
)");

struct Context {
  void* sp = nullptr;
};

inline void switch_context(Context& from, Context& to) { td_emu_swap_context(&from.sp, to.sp); }

// A fresh context that calls fn(arg) on [stack, stack + size) when first switched to.
void make_context(Context& c, char* stack, size_t size, void (*fn)(void*), void* arg) {
  const uintptr_t top = reinterpret_cast<uintptr_t>(stack + size) & ~uintptr_t(15);
  // What td_emu_swap_context pops: MXCSR | x87 CW, r15, r14, r13, r12, rbx, rbp, return address.
  // After its `ret` the stack pointer is top - 16: 16-byte aligned at the trampoline's call.
  auto* sp = reinterpret_cast<uint64_t*>(top - 80);
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  sp[0] = static_cast<uint64_t>(mxcsr) | (static_cast<uint64_t>(fpucw) << 32);
  sp[1] = 0;                                      // r15
  sp[2] = 0;                                      // r14
  sp[3] = reinterpret_cast<uint64_t>(fn);         // r13
  sp[4] = reinterpret_cast<uint64_t>(arg);        // r12
  sp[5] = 0;                                      // rbx
  sp[6] = 0;                                      // rbp
  sp[7] = reinterpret_cast<uint64_t>(&td_emu_fiber_start);
  c.sp = sp;
}

#else  // portable fallback

struct Context {
  ucontext_t uc;
};

inline void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }

void (*g_fn)(void*);
void make_context(Context& c, char* stack, size_t size, void (*fn)(void*), void* arg) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  // makecontext passes ints; split the pointers.
  const auto f = reinterpret_cast<uintptr_t>(fn), a = reinterpret_cast<uintptr_t>(arg);
  makecontext(&c.uc, reinterpret_cast<void (*)()>(+[](unsigned fl, unsigned fh, unsigned al, unsigned ah) {
                reinterpret_cast<void (*)(void*)>((uintptr_t(fh) << 32) | fl)(
                    reinterpret_cast<void*>((uintptr_t(ah) << 32) | al));
              }),
              4, unsigned(f), unsigned(f >> 32), unsigned(a), unsigned(a >> 32));
}

#endif

// ---------------------------------------------------------------------------------------------
// Fiber stacks: mmap'ed with a guard page below (an overflow faults instead of corrupting a
// neighbour), kept in a process-wide pool so that launches reuse them.
// ---------------------------------------------------------------------------------------------
constexpr size_t kStackBytes = 256 * 1024;

struct Stack {
  char* base = nullptr;  // the guard page; usable memory starts one page above
  char* lo = nullptr;
  size_t size = 0;
};

class StackPool {
 public:
  Stack take() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!free_.empty()) {
        Stack s = free_.back();
        free_.pop_back();
        return s;
      }
    }
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
    if (p == MAP_FAILED) throw Error("CUDA emulator: cannot map a fiber stack");
    mprotect(p, page, PROT_NONE);
    Stack s;
    s.base = static_cast<char*>(p);
    s.lo = s.base + page;
    s.size = kStackBytes - page;
    return s;
  }
  void give(const Stack& s) {
    std::lock_guard<std::mutex> lock(mu_);
    free_.push_back(s);
  }

 private:
  std::mutex mu_;
  std::vector<Stack> free_;
};

StackPool& stack_pool() {
  static StackPool* pool = new StackPool();  // leaked: fibers may outlive static destructors
  return *pool;
}

// ---------------------------------------------------------------------------------------------
// Random schedules: splitmix64, seeded per (seed, launch, block) so that a block's schedule does
// not depend on which OS thread runs it.
// ---------------------------------------------------------------------------------------------
struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed) {}
  uint64_t next() {
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  uint32_t below(uint32_t n) { return static_cast<uint32_t>(next() % n); }
};

uint64_t mix(uint64_t a, uint64_t b) { return Rng(a * 0x100000001b3ull ^ b).next(); }

uint64_t env_u64(const char* name, uint64_t fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  char* end = nullptr;
  const unsigned long long x = std::strtoull(v, &end, 10);
  return (end != nullptr && *end == '\0') ? x : fallback;
}

// ---------------------------------------------------------------------------------------------
// The state of one block's threads.
// ---------------------------------------------------------------------------------------------
enum class State : uint8_t { kRunnable, kWaiting, kExited };

bool is_block_op(Op op) { return op <= Op::kSyncThreadsOr; }

const char* op_name(Op op) {
  switch (op) {
    case Op::kSyncThreads: return "__syncthreads";
    case Op::kSyncThreadsCount: return "__syncthreads_count";
    case Op::kSyncThreadsAnd: return "__syncthreads_and";
    case Op::kSyncThreadsOr: return "__syncthreads_or";
    case Op::kSyncWarp: return "__syncwarp";
    case Op::kShfl: return "__shfl_sync";
    case Op::kShflUp: return "__shfl_up_sync";
    case Op::kShflDown: return "__shfl_down_sync";
    case Op::kShflXor: return "__shfl_xor_sync";
    case Op::kAny: return "__any_sync";
    case Op::kAll: return "__all_sync";
    case Op::kBallot: return "__ballot_sync";
  }
  return "?";
}

bool same_site(const std::source_location& a, const std::source_location& b) {
  return a.line() == b.line() && a.column() == b.column() &&
         (a.file_name() == b.file_name() || std::strcmp(a.file_name(), b.file_name()) == 0);
}

std::string site_str(const std::source_location& s) {
  const char* f = s.file_name();
  const char* slash = std::strrchr(f, '/');
  // keep the last two path components: "kernels/shard_pass.cuh:123"
  if (slash != nullptr && slash != f) {
    const char* p = slash - 1;
    while (p > f && *p != '/') --p;
    f = (*p == '/') ? p + 1 : p;
  }
  return std::string(f) + ":" + std::to_string(s.line());
}

std::string hex(unsigned m) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08x", m);
  return buf;
}

struct Fiber {
  Context ctx;
  Stack stack;
  Dim3 idx;
  int tid = 0, warp = 0, lane = 0;
  State state = State::kRunnable;
  Op op = Op::kSyncThreads;  // where it waits, for reports
  std::source_location site;
  unsigned mask = 0;
  uint64_t result = 0;
};

struct BarrierSlot {
  bool open = false;
  Op op = Op::kSyncThreads;
  std::source_location site;
  int arrived = 0;
  int count = 0;
};

struct WarpSlot {
  Op op = Op::kSyncWarp;
  unsigned mask = 0, arrived = 0, size = 0;
  int width = 32;
  std::source_location site;
  uint64_t value[32];
  int arg[32];
};

struct StaticShared {
  const char* file;
  uint32_t line, column;
  size_t offset, bytes;
  std::string what;
};

constexpr size_t kArenaBytes = kMaxSharedBytes + 64;

struct Worker {
  const LaunchConfig* cfg = nullptr;
  const std::function<void()>* body = nullptr;
  Context scheduler;
  std::vector<Fiber> fibers;
  Fiber* current = nullptr;
  int nthreads = 0, nwarps = 0, exited = 0;
  BarrierSlot barrier;
  // Open warp collectives, per warp: several at once when their masks are disjoint (e.g. two
  // half-warps each shuffling among themselves), else one.
  std::vector<std::vector<WarpSlot>> warps;
  std::unique_ptr<unsigned char[]> arena{new unsigned char[kArenaBytes]};
  size_t arena_used = 0;
  std::deque<StaticShared> statics;  // a deque: `what` strings keep their addresses
  uint64_t launch_seed = 0;
  Rng rng{0};
  bool failed = false;
  std::string error;
  std::exception_ptr thrown;
  uint64_t barriers = 0, collectives = 0;
  std::vector<int> ready;  // scratch of the scheduler
  std::vector<int> order;

  ~Worker() {
    for (Fiber& f : fibers) stack_pool().give(f.stack);
  }
};

thread_local Worker* t_worker = nullptr;

Worker& worker() {
  if (t_worker == nullptr || t_worker->current == nullptr)
    throw Error("CUDA emulator: a device function was called outside an emulated kernel launch");
  return *t_worker;
}

std::string where(const Worker& w, const Fiber& f) {
  std::ostringstream s;
  s << "emulated CUDA kernel `" << w.cfg->kernel << "`, block (" << blockIdx.x << "," << blockIdx.y
    << "," << blockIdx.z << "), thread (" << f.idx.x << "," << f.idx.y << "," << f.idx.z << ")";
  return s.str();
}

// Suspends the running fiber (state already set) and returns to the scheduler.
void suspend(Worker& w, Fiber& f) { switch_context(f.ctx, w.scheduler); }

void release(Fiber& f, uint64_t result) {
  f.result = result;
  f.state = State::kRunnable;
}

void fiber_main(void* arg) {
  Worker& w = *static_cast<Worker*>(arg);
  Fiber& f = *w.current;
  try {
    (*w.body)();
    // Exit checks: nobody may be left waiting for this thread.
    ++w.exited;
    if (w.barrier.open) {
      throw Error("this thread exited while " + std::to_string(w.barrier.arrived) +
                  " thread(s) of the block wait at " + op_name(w.barrier.op) + " (" +
                  site_str(w.barrier.site) + "): a barrier must be reached by every thread");
    }
    for (const WarpSlot& s : w.warps[f.warp]) {
      if ((s.mask >> f.lane) & 1u) {
        throw Error("this lane exited while lanes of its warp wait at " + std::string(op_name(s.op)) +
                    " (" + site_str(s.site) + ") with mask " + hex(s.mask) + ", which names it");
      }
    }
  } catch (const Error& e) {
    if (!w.failed) {
      w.failed = true;
      w.error = where(w, f) + ": " + e.what();
    }
  } catch (...) {
    if (!w.failed) {
      w.failed = true;
      w.error = where(w, f) + ": an exception escaped the kernel";
      w.thrown = std::current_exception();
    }
  }
  f.state = State::kExited;
  switch_context(f.ctx, w.scheduler);
  std::abort();  // an exited fiber is never resumed
}

std::string deadlock_report(const Worker& w) {
  // Group the waiting threads by (operation, site, mask).
  std::map<std::tuple<std::string, int, unsigned>, std::vector<int>> groups;
  for (const Fiber& f : w.fibers) {
    if (f.state != State::kWaiting) continue;
    groups[{site_str(f.site), static_cast<int>(f.op), is_block_op(f.op) ? 0u : f.mask}].push_back(f.tid);
  }
  std::ostringstream s;
  s << "emulated CUDA kernel `" << w.cfg->kernel << "`, block (" << blockIdx.x << "," << blockIdx.y
    << "," << blockIdx.z << "): deadlock - no thread can make progress";
  if (w.exited > 0) s << "; " << w.exited << " thread(s) have exited";
  for (const auto& [key, tids] : groups) {
    const Op op = static_cast<Op>(std::get<1>(key));
    s << "; " << tids.size() << " thread(s) wait at " << op_name(op);
    if (!is_block_op(op)) s << " (mask " << hex(std::get<2>(key)) << ")";
    s << " at " << std::get<0>(key) << " (thread " << tids.front();
    if (tids.size() > 1) s << " ... thread " << tids.back();
    s << ")";
  }
  if (groups.size() > 1) s << ": threads of one block wait at different synchronisation points";
  return s.str();
}

void run_block(Worker& w, uint64_t linear) {
  const LaunchConfig& cfg = *w.cfg;
  blockIdx = Dim3(static_cast<unsigned>(linear % cfg.grid.x),
                  static_cast<unsigned>((linear / cfg.grid.x) % cfg.grid.y),
                  static_cast<unsigned>(linear / (uint64_t(cfg.grid.x) * cfg.grid.y)));
  w.rng = Rng(mix(w.launch_seed, linear));
  w.exited = 0;
  w.barrier = BarrierSlot{};
  for (auto& slots : w.warps) slots.clear();
  std::memset(w.arena.get(), 0xFF, w.arena_used);  // poison: a read before a write shows
  for (Fiber& f : w.fibers) {
    f.state = State::kRunnable;
    make_context(f.ctx, f.stack.lo, f.stack.size, &fiber_main, &w);
  }

  const int warp_size = 32;
  for (;;) {
    w.ready.clear();
    for (int wi = 0; wi < w.nwarps; ++wi) {
      const int l0 = wi * warp_size, l1 = std::min(w.nthreads, l0 + warp_size);
      for (int t = l0; t < l1; ++t) {
        if (w.fibers[t].state == State::kRunnable) {
          w.ready.push_back(wi);
          break;
        }
      }
    }
    if (w.ready.empty()) {
      if (w.exited != w.nthreads) {
        w.failed = true;
        w.error = deadlock_report(w);
      }
      return;
    }
    const int wi = w.ready[w.rng.below(static_cast<uint32_t>(w.ready.size()))];
    const int l0 = wi * warp_size, lanes = std::min(w.nthreads, l0 + warp_size) - l0;
    // Lane order: ascending, descending or a random permutation.
    w.order.resize(lanes);
    for (int i = 0; i < lanes; ++i) w.order[i] = i;
    switch (w.rng.below(3)) {
      case 1: std::reverse(w.order.begin(), w.order.end()); break;
      case 2:
        for (int i = lanes - 1; i > 0; --i) std::swap(w.order[i], w.order[w.rng.below(i + 1)]);
        break;
      default: break;
    }
    for (int i = 0; i < lanes; ++i) {
      Fiber& f = w.fibers[l0 + w.order[i]];
      if (f.state != State::kRunnable) continue;
      threadIdx = f.idx;
      w.current = &f;
      switch_context(w.scheduler, f.ctx);
      w.current = nullptr;
      if (w.failed) return;
    }
  }
}

std::atomic<uint64_t> g_launch_counter{0};  // seeds schedules; never reset
std::atomic<uint64_t> g_launches{0}, g_blocks{0}, g_threads{0}, g_barriers{0}, g_collectives{0};

std::string dims(const Dim3& d) {
  return "(" + std::to_string(d.x) + "," + std::to_string(d.y) + "," + std::to_string(d.z) + ")";
}

void check_launch(const LaunchConfig& cfg) {
  const std::string k = std::string("emulated CUDA kernel `") + cfg.kernel + "`: invalid launch: ";
  const uint64_t threads = uint64_t(cfg.block.x) * cfg.block.y * cfg.block.z;
  if (threads == 0 || cfg.grid.x == 0 || cfg.grid.y == 0 || cfg.grid.z == 0)
    throw Error(k + "a zero grid or block dimension (grid " + dims(cfg.grid) + ", block " +
                dims(cfg.block) + ")");
  if (threads > kMaxThreadsPerBlock || cfg.block.x > 1024 || cfg.block.y > 1024 || cfg.block.z > 64)
    throw Error(k + "block " + dims(cfg.block) + " = " + std::to_string(threads) +
                " threads exceeds the device limit of 1024 threads per block (x, y <= 1024, z <= 64)");
  if (cfg.max_threads > 0 && threads > cfg.max_threads)
    throw Error(k + std::to_string(threads) + " threads per block exceeds the kernel's __launch_bounds__(" +
                std::to_string(cfg.max_threads) + ")");
  if (cfg.grid.y > 65535 || cfg.grid.z > 65535 || cfg.grid.x > 2147483647u)
    throw Error(k + "grid " + dims(cfg.grid) + " exceeds the device limits (x < 2^31, y, z <= 65535)");
  if (cfg.dynamic_smem > kMaxSharedBytes)
    throw Error(k + std::to_string(cfg.dynamic_smem) +
                " bytes of dynamic shared memory exceed 48 KiB (more needs an opt-in with "
                "cudaFuncSetAttribute, which these kernels do not make)");
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Synchronisation points.
// ---------------------------------------------------------------------------------------------

int block_barrier(Op op, int predicate, std::source_location site) {
  Worker& w = worker();
  Fiber& f = *w.current;
  ++w.barriers;
  if (w.exited > 0) {
    throw Error(std::string(op_name(op)) + " at " + site_str(site) + " after " +
                std::to_string(w.exited) + " thread(s) of the block exited: a barrier must be "
                "reached by every thread of the block");
  }
  BarrierSlot& b = w.barrier;
  if (!b.open) {
    b = BarrierSlot{true, op, site, 0, 0};
  } else if (b.op != op || !same_site(b.site, site)) {
    throw Error("divergent barrier: this thread is at " + std::string(op_name(op)) + " (" +
                site_str(site) + ") while " + std::to_string(b.arrived) + " thread(s) wait at " +
                op_name(b.op) + " (" + site_str(b.site) + ")");
  }
  ++b.arrived;
  if (predicate != 0) ++b.count;
  f.op = op;
  f.site = site;
  if (b.arrived == w.nthreads) {
    int result = 0;
    if (op == Op::kSyncThreadsCount) result = b.count;
    if (op == Op::kSyncThreadsAnd) result = b.count == w.nthreads;
    if (op == Op::kSyncThreadsOr) result = b.count > 0;
    for (Fiber& other : w.fibers) release(other, static_cast<uint64_t>(result));
    b.open = false;
  } else {
    f.state = State::kWaiting;
  }
  suspend(w, f);  // the last arrival yields too: who runs first after a barrier is drawn
  return static_cast<int>(f.result);
}

uint64_t warp_collective(Op op, unsigned mask, uint64_t bits, unsigned size, int arg, int width,
                         std::source_location site) {
  Worker& w = worker();
  Fiber& f = *w.current;
  ++w.collectives;
  const std::string here = std::string(op_name(op)) + "(mask " + hex(mask) + ") at " + site_str(site);
  if (!((mask >> f.lane) & 1u))
    throw Error(here + ": the calling lane " + std::to_string(f.lane) + " is not in the mask");
  const int lanes_here = std::min(32, w.nthreads - f.warp * 32);
  const unsigned existing = lanes_here == 32 ? 0xffffffffu : ((1u << lanes_here) - 1u);
  if (mask & ~existing)
    throw Error(here + ": the mask names lanes that do not exist (this warp has " +
                std::to_string(lanes_here) + " lanes)");
  if (width < 1 || width > 32 || (width & (width - 1)) != 0)
    throw Error(here + ": width " + std::to_string(width) + " is not a power of 2 in [1, 32]");
  for (int l = 0; l < lanes_here; ++l) {
    if (((mask >> l) & 1u) && w.fibers[f.warp * 32 + l].state == State::kExited)
      throw Error(here + ": the mask names lane " + std::to_string(l) + ", which has exited");
  }
  // The open collective this lane belongs to: the one whose mask names it, if any.
  std::vector<WarpSlot>& slots = w.warps[f.warp];
  size_t si = 0;
  while (si < slots.size() && !((slots[si].mask >> f.lane) & 1u)) ++si;
  if (si == slots.size()) {
    for (const WarpSlot& o : slots) {
      if (o.mask & mask) {
        throw Error("divergent warp collective: this lane calls " + here + " while lanes " +
                    hex(o.arrived) + " of its warp wait at " + op_name(o.op) + "(mask " +
                    hex(o.mask) + ") at " + site_str(o.site) + ": the masks overlap");
      }
    }
    slots.emplace_back();
    WarpSlot& n = slots.back();
    n.op = op;
    n.mask = mask;
    n.arrived = 0;
    n.size = size;
    n.width = width;
    n.site = site;
  }
  WarpSlot& s = slots[si];
  if (s.op != op || s.mask != mask || s.size != size || s.width != width || !same_site(s.site, site)) {
    throw Error("divergent warp collective: this lane calls " + here + " while lanes " +
                hex(s.arrived) + " of its warp wait at " + op_name(s.op) + "(mask " + hex(s.mask) +
                ") at " + site_str(s.site));
  }
  s.value[f.lane] = bits;
  s.arg[f.lane] = arg;
  s.arrived |= 1u << f.lane;
  f.op = op;
  f.site = site;
  f.mask = mask;
  if (s.arrived == mask) {
    const int base = f.warp * 32;
    uint64_t vote = 0;
    if (op == Op::kAny || op == Op::kAll || op == Op::kBallot) {
      unsigned ballot = 0;
      for (int l = 0; l < 32; ++l)
        if (((mask >> l) & 1u) && s.value[l] != 0) ballot |= 1u << l;
      vote = op == Op::kBallot ? ballot : op == Op::kAny ? (ballot != 0) : (ballot == mask);
    }
    for (int l = 0; l < 32; ++l) {
      if (!((mask >> l) & 1u)) continue;
      uint64_t r = vote;
      if (op == Op::kShfl || op == Op::kShflUp || op == Op::kShflDown || op == Op::kShflXor) {
        const int seg = l & ~(width - 1);
        int src = l;
        switch (op) {
          case Op::kShfl: src = seg + (s.arg[l] & (width - 1)); break;
          case Op::kShflUp: src = (l - s.arg[l] >= seg) ? l - s.arg[l] : l; break;
          case Op::kShflDown: src = (l + s.arg[l] < seg + width) ? l + s.arg[l] : l; break;
          default: src = (l ^ s.arg[l]); src = (src < seg + width) ? src : l; break;
        }
        if (!((mask >> src) & 1u))
          throw Error(here + ": lane " + std::to_string(l) + " reads lane " + std::to_string(src) +
                      ", which is not in the mask (its value is undefined on the device)");
        r = s.value[src];
      }
      release(w.fibers[base + l], r);
    }
    slots.erase(slots.begin() + static_cast<std::ptrdiff_t>(si));
  } else {
    f.state = State::kWaiting;
  }
  suspend(w, f);
  return f.result;
}

// ---------------------------------------------------------------------------------------------
// Shared memory.
// ---------------------------------------------------------------------------------------------

SharedRegion shared_region(size_t bytes, size_t align, std::source_location key, bool dynamic) {
  Worker& w = worker();
  unsigned char* arena = w.arena.get();
  if (dynamic) return {arena, arena + w.cfg->dynamic_smem, "dynamic shared memory"};
  for (const StaticShared& s : w.statics) {
    if (s.line == key.line() && s.column == key.column() &&
        (s.file == key.file_name() || std::strcmp(s.file, key.file_name()) == 0)) {
      return {arena + s.offset, arena + s.offset + s.bytes, s.what.c_str()};
    }
  }
  const size_t offset = (w.arena_used + align - 1) / align * align;
  if (offset + bytes > kMaxSharedBytes) {
    throw Error("the shared array declared at " + site_str(key) + " (" + std::to_string(bytes) +
                " bytes) brings static + dynamic shared memory to " + std::to_string(offset + bytes) +
                " bytes, over the 48 KiB a launch may use without opt-in");
  }
  std::memset(arena + w.arena_used, 0xFF, offset + bytes - w.arena_used);
  w.statics.push_back({key.file_name(), key.line(), key.column(), offset, bytes,
                       "the __shared__ array declared at " + site_str(key)});
  w.arena_used = offset + bytes;
  const StaticShared& s = w.statics.back();
  return {arena + s.offset, arena + s.offset + s.bytes, s.what.c_str()};
}

void shared_out_of_bounds(const SharedRegion& region, const void* address, size_t size) {
  const auto* a = static_cast<const unsigned char*>(address);
  const long long offset = static_cast<long long>(a - region.begin);
  throw Error("shared memory access out of bounds: " + std::to_string(size) + " byte(s) at byte offset " +
              std::to_string(offset) + " of " + region.what + ", which has " +
              std::to_string(region.end - region.begin) + " bytes");
}

void global_out_of_bounds(const GlobalRegion& region, const void* address, size_t size,
                          bool read_only) {
  const auto* a = static_cast<const unsigned char*>(address);
  if (region.begin == nullptr) {
    throw Error(std::string("global memory ") + (read_only ? "read" : "access") + " of " +
                std::to_string(size) + " byte(s) through `" + region.what +
                "`, which points to no storage (a null or empty tensor's pointer)");
  }
  const long long offset = static_cast<long long>(a - region.begin);
  throw Error(std::string("global memory ") + (read_only ? "read" : "access (read or write)") +
              " out of bounds: " + std::to_string(size) + " byte(s) at byte offset " +
              std::to_string(offset) + " of `" + region.what + "`'s storage, which has " +
              std::to_string(region.end - region.begin) + " bytes");
}

void global_misaligned(const GlobalRegion& region, const void* address, size_t size,
                       size_t align) {
  const auto* a = static_cast<const unsigned char*>(address);
  throw Error("misaligned global memory access: " + std::to_string(size) + " byte(s) at byte "
              "offset " + std::to_string(static_cast<long long>(a - region.begin)) + " of `" +
              region.what + "`'s storage (address = " +
              std::to_string(reinterpret_cast<uintptr_t>(a) % align) + " mod " +
              std::to_string(align) + "), which must be " + std::to_string(align) + "-byte aligned");
}

// ---------------------------------------------------------------------------------------------
// Launch.
// ---------------------------------------------------------------------------------------------

void launch(const LaunchConfig& cfg, const std::function<void()>& body) {
  check_launch(cfg);
  const uint64_t nblocks = uint64_t(cfg.grid.x) * cfg.grid.y * cfg.grid.z;
  const int nthreads = static_cast<int>(cfg.block.x * cfg.block.y * cfg.block.z);
  const uint64_t seed = env_u64("TOPK_DISTILL_EMU_SEED", 0);
  const uint64_t launch_seed = mix(seed, g_launch_counter.fetch_add(1));
  ++g_launches;
  const uint64_t hw = std::max(1u, std::thread::hardware_concurrency());
  const uint64_t os_threads = std::max<uint64_t>(
      1, std::min<uint64_t>(nblocks, env_u64("TOPK_DISTILL_EMU_THREADS", std::min<uint64_t>(hw, 8))));

  // Block order: a permutation drawn from the seed.
  std::vector<uint64_t> order(nblocks);
  for (uint64_t i = 0; i < nblocks; ++i) order[i] = i;
  Rng rng(launch_seed);
  for (uint64_t i = nblocks; i > 1; --i) std::swap(order[i - 1], order[rng.next() % i]);

  std::atomic<uint64_t> next{0};
  std::atomic<bool> failed{false};
  std::mutex mu;
  std::string first_error;
  std::exception_ptr first_exception;

  auto work = [&]() {
    Worker w;
    w.cfg = &cfg;
    w.body = &body;
    w.launch_seed = launch_seed;
    w.nthreads = nthreads;
    w.nwarps = (nthreads + 31) / 32;
    w.warps.resize(w.nwarps);
    w.arena_used = cfg.dynamic_smem;
    w.fibers.resize(nthreads);
    for (int t = 0; t < nthreads; ++t) {
      Fiber& f = w.fibers[t];
      f.stack = stack_pool().take();
      f.tid = t;
      f.warp = t / 32;
      f.lane = t % 32;
      f.idx = Dim3(t % cfg.block.x, (t / cfg.block.x) % cfg.block.y, t / (cfg.block.x * cfg.block.y));
    }
    Worker* saved = t_worker;
    const Dim3 saved_dims[4] = {threadIdx, blockIdx, blockDim, gridDim};
    t_worker = &w;
    blockDim = cfg.block;
    gridDim = cfg.grid;
    uint64_t blocks = 0;
    while (!failed.load(std::memory_order_relaxed)) {
      const uint64_t i = next.fetch_add(1);
      if (i >= nblocks) break;
      run_block(w, order[i]);
      ++blocks;
      if (w.failed) {
        std::lock_guard<std::mutex> lock(mu);
        if (!failed.exchange(true)) {
          first_error = w.error;
          first_exception = w.thrown;
        }
        break;
      }
    }
    t_worker = saved;
    threadIdx = saved_dims[0];
    blockIdx = saved_dims[1];
    blockDim = saved_dims[2];
    gridDim = saved_dims[3];
    g_blocks += blocks;
    g_threads += blocks * static_cast<uint64_t>(nthreads);
    g_barriers += w.barriers;
    g_collectives += w.collectives;
  };

  std::vector<std::thread> helpers;
  for (uint64_t i = 1; i < os_threads; ++i) helpers.emplace_back(work);
  work();
  for (std::thread& t : helpers) t.join();
  if (failed.load()) {
    if (first_exception) {
      try {
        std::rethrow_exception(first_exception);
      } catch (const std::exception& e) {
        throw Error(first_error + ": " + e.what());
      } catch (...) {
        throw Error(first_error);
      }
    }
    throw Error(first_error);
  }
}

Stats stats() {
  return {g_launches.load(), g_blocks.load(), g_threads.load(), g_barriers.load(), g_collectives.load()};
}

void reset_stats() {
  g_launches = 0;
  g_blocks = 0;
  g_threads = 0;
  g_barriers = 0;
  g_collectives = 0;
}

}  // namespace td_emu
