// The CUDA emulator's scheduler and runtime (interface: lp_cuda_emu.h; design:
// docs/cuda_emulator.md).
//
// A launch runs its blocks on a small pool of OS threads (the caller is one of them); each OS
// thread runs one block at a time, all of its CUDA threads as fibres with their own stacks. The
// scheduler resumes the ready fibres in a fixed order (forward, reverse or seeded random); a
// fibre runs until it must wait (block barrier, warp collective whose lanes have not all arrived)
// or exits. The last thread to arrive at a barrier or collective completes it and carries on, so
// a kernel without divergence switches about once per thread per synchronisation point. When no
// fibre is ready but some have not exited, the block is deadlocked: the launch fails with a
// description of who waits where, instead of hanging.
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdarg>
#include <cstdlib>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "lp_cuda_emu.h"

#if defined(__SANITIZE_ADDRESS__)
#define LP_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define LP_EMU_ASAN 1
#endif
#endif
#ifdef LP_EMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#if !defined(__x86_64__)
#error "the CUDA emulator's context switch is written for x86-64"
#endif

// ---- context switch (x86-64 System V) ---------------------------------------------------------------
// lp_emu_switch(save, load): pushes the callee-saved registers and the SSE/x87 control words on
// the current stack, stores the stack pointer in *save, switches to `load` and pops the same there.
// A new fibre's stack is prepared so that the first switch "returns" into the trampoline, which
// calls lp_emu_fibre_entry(r12 = the Thread).
extern "C" void lp_emu_switch(void** save, void* load);
extern "C" void lp_emu_fibre_trampoline();
extern "C" [[noreturn]] void lp_emu_fibre_entry(void* thread);
asm(R"(
  .pushsection .text
  .globl lp_emu_switch
  .hidden lp_emu_switch
  .type lp_emu_switch, @function
lp_emu_switch:
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
  .size lp_emu_switch, .-lp_emu_switch

  .globl lp_emu_fibre_trampoline
  .hidden lp_emu_fibre_trampoline
  .type lp_emu_fibre_trampoline, @function
lp_emu_fibre_trampoline:
  endbr64
  movq %r12, %rdi
  andq $-16, %rsp
  call lp_emu_fibre_entry@PLT
  ud2
  .size lp_emu_fibre_trampoline, .-lp_emu_fibre_trampoline
  .popsection
)");

namespace lp_emu {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr size_t kDefaultDynamicSmemLimit = 48 * 1024;   // without cudaFuncSetAttribute
constexpr size_t kMaxDynamicSmemOptin = 227 * 1024;       // Hopper's opt-in limit per block

struct Block;

struct AsyncCopy {
  void* dst;
  const void* src;
  int bytes, src_bytes;
  int64_t group;  // -1 until committed
};

enum class State { kReady, kBarrier, kWarp, kDone };

struct Thread {
  void* sp = nullptr;
  char* stack_lo = nullptr;  // usable stack: [stack_lo, stack_lo + stack_size)
  size_t stack_size = 0;
  Block* block = nullptr;
  uint3 tid{0, 0, 0};
  unsigned linear = 0, lane = 0, warp = 0;
  State state = State::kReady;
  Site wait_site{"", 0};
  const char* wait_what = "";
  int barrier_pred = 0;
  int barrier_result = 0;
  std::vector<AsyncCopy> copies;
  int64_t next_group = 0;
#ifdef LP_EMU_ASAN
  void* fake_stack = nullptr;
#endif
};

struct PendingCollective {
  unsigned mask = 0, arrived = 0;
  const char* what = "";
  Site site{"", 0};
  CollectiveFn fn = nullptr;
  void* ctx = nullptr;
  void* bufs[32] = {};
};

struct Block {
  const LaunchConfig* cfg = nullptr;
  const std::function<void()>* body = nullptr;
  uint3 bid{0, 0, 0};
  unsigned nthreads = 0;
  std::vector<Thread>* threads = nullptr;
  std::vector<std::vector<PendingCollective>> warps;  // pending collectives per warp
  unsigned live = 0;
  unsigned at_barrier = 0;
  Site barrier_site{"", 0};
  int barrier_op = 0;
  Thread* current = nullptr;
  void* sched_sp = nullptr;
  std::vector<unsigned char> dyn_smem;
  bool failed = false;
  std::string error;
#ifdef LP_EMU_ASAN
  const void* sched_stack_lo = nullptr;
  size_t sched_stack_size = 0;
#endif
};

// Fibre stacks of one OS thread, reused across blocks and launches. Each stack has a PROT_NONE
// guard page below it, so an overflow faults instead of corrupting its neighbour.
struct StackPool {
  std::vector<Thread> threads;
  size_t stack_size = 0;
  ~StackPool() { release(); }
  void release() {
    for (Thread& t : threads)
      if (t.stack_lo) munmap(t.stack_lo - page(), t.stack_size + page());
    threads.clear();
  }
  static size_t page() { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }
  std::vector<Thread>& get(unsigned n, size_t want) {
    want = (want + page() - 1) / page() * page();
    if (want != stack_size) {
      release();
      stack_size = want;
    }
    while (threads.size() < n) {
      threads.emplace_back();
      void* m = mmap(nullptr, stack_size + page(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                     -1, 0);
      if (m == MAP_FAILED) {
        std::fprintf(stderr, "lp_emu: cannot map a fibre stack\n");
        std::abort();
      }
      mprotect(m, page(), PROT_NONE);
      threads.back().stack_lo = static_cast<char*>(m) + page();
      threads.back().stack_size = stack_size;
    }
    return threads;
  }
};

thread_local Block* tls_block = nullptr;
thread_local StackPool tls_stacks;

std::string site_str(Site s) {
  const char* f = std::strrchr(s.file, '/');
  return std::string(f ? f + 1 : s.file) + ":" + std::to_string(s.line);
}
std::string hex32(unsigned v) {
  char h[16];
  std::snprintf(h, sizeof h, "0x%08x", v);
  return h;
}
std::string who(const Block& b, const Thread& t) {
  char buf[128];
  std::snprintf(buf, sizeof buf, "block (%u,%u,%u) thread (%u,%u,%u) [warp %u lane %u]", b.bid.x, b.bid.y, b.bid.z,
                t.tid.x, t.tid.y, t.tid.z, t.warp, t.lane);
  return buf;
}

Block& cur_block() {
  if (tls_block == nullptr || tls_block->current == nullptr) {
    std::fprintf(stderr, "lp_emu: a device intrinsic was called outside a kernel launch\n");
    std::abort();
  }
  return *tls_block;
}
Thread& cur() { return *cur_block().current; }

// ---- switching ------------------------------------------------------------------------------------
void to_scheduler(Thread& t, bool exiting) {
  Block& b = *t.block;
#ifdef LP_EMU_ASAN
  __sanitizer_start_switch_fiber(exiting ? nullptr : &t.fake_stack, b.sched_stack_lo, b.sched_stack_size);
#else
  (void)exiting;
#endif
  lp_emu_switch(&t.sp, b.sched_sp);
#ifdef LP_EMU_ASAN
  __sanitizer_finish_switch_fiber(t.fake_stack, nullptr, nullptr);
#endif
}

void to_fibre(Block& b, Thread& t) {
  b.current = &t;
#ifdef LP_EMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, t.stack_lo, t.stack_size);
#endif
  lp_emu_switch(&b.sched_sp, t.sp);
#ifdef LP_EMU_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  b.current = nullptr;
}

void prepare_stack(Thread& t) {
#ifdef LP_EMU_ASAN
  // A reused stack still carries the poisoning of the frames its last fibre never unwound.
  ASAN_UNPOISON_MEMORY_REGION(t.stack_lo, t.stack_size);
  t.fake_stack = nullptr;
#endif
  uintptr_t top = reinterpret_cast<uintptr_t>(t.stack_lo + t.stack_size) & ~static_cast<uintptr_t>(15);
  uintptr_t* sp = reinterpret_cast<uintptr_t*>(top);
  *--sp = 0;                                                     // alignment slot
  *--sp = reinterpret_cast<uintptr_t>(&lp_emu_fibre_trampoline);  // "return" address
  *--sp = 0;                                                     // rbp
  *--sp = 0;                                                     // rbx
  *--sp = reinterpret_cast<uintptr_t>(&t);                       // r12: the trampoline's argument
  *--sp = 0;                                                     // r13
  *--sp = 0;                                                     // r14
  *--sp = 0;                                                     // r15
  *--sp = (static_cast<uintptr_t>(0x037f) << 32) | 0x1f80;       // fpcw, mxcsr (the defaults)
  t.sp = sp;
}

// Raises a failure for the running block and leaves the current fibre for good.
[[noreturn]] void fail_block(Block& b, const std::string& msg) {
  if (!b.failed) {
    b.failed = true;
    b.error = msg;
  }
  Thread& t = *b.current;
  to_scheduler(t, true);
  std::abort();  // never resumed
}

void perform_copies(Thread& t, int64_t upto_group, bool all) {
  size_t keep = 0;
  for (size_t i = 0; i < t.copies.size(); ++i) {
    AsyncCopy& c = t.copies[i];
    if (all || (c.group >= 0 && c.group < upto_group)) {
      std::memcpy(c.dst, c.src, static_cast<size_t>(c.src_bytes));
      if (c.src_bytes < c.bytes) std::memset(static_cast<char*>(c.dst) + c.src_bytes, 0, static_cast<size_t>(c.bytes - c.src_bytes));
    } else {
      t.copies[keep++] = c;
    }
  }
  t.copies.resize(keep);
}

void release_barrier(Block& b) {
  int count = 0;
  for (unsigned i = 0; i < b.nthreads; ++i) {
    Thread& t = (*b.threads)[i];
    if (t.state == State::kBarrier) count += t.barrier_pred;
  }
  const int n = static_cast<int>(b.at_barrier);
  const int result = b.barrier_op == 0 ? count : b.barrier_op == 1 ? (count == n) : (count > 0);
  for (unsigned i = 0; i < b.nthreads; ++i) {
    Thread& t = (*b.threads)[i];
    if (t.state == State::kBarrier) {
      t.state = State::kReady;
      t.barrier_result = result;
    }
  }
  b.at_barrier = 0;
}

std::string describe_waiters(const Block& b) {
  std::string s;
  int shown = 0;
  for (unsigned i = 0; i < b.nthreads && shown < 8; ++i) {
    const Thread& t = (*b.threads)[i];
    if (t.state == State::kBarrier || t.state == State::kWarp) {
      s += "\n  " + who(b, t) + " waits in " + t.wait_what + " at " + site_str(t.wait_site);
      ++shown;
    }
  }
  unsigned done = 0;
  for (unsigned i = 0; i < b.nthreads; ++i) done += (*b.threads)[i].state == State::kDone;
  s += "\n  (" + std::to_string(done) + " of " + std::to_string(b.nthreads) + " threads have exited)";
  return s;
}

void thread_exit(Thread& t) {
  Block& b = *t.block;
  perform_copies(t, 0, true);  // outstanding cp.async still land, as on the hardware
  t.state = State::kDone;
  --b.live;
  // A lane that exits while its warp-mates wait for it in a collective: they can never complete.
  for (const PendingCollective& pc : b.warps[t.warp])
    if ((pc.mask >> t.lane & 1u) && !(pc.arrived >> t.lane & 1u))
      fail_block(b, who(b, t) + " exited, but lanes of its warp wait for it in " + pc.what + " at " +
                        site_str(pc.site) + " (mask " + hex32(pc.mask) + ")");
  if (b.at_barrier > 0 && b.at_barrier == b.live) release_barrier(b);
}

}  // namespace
}  // namespace lp_emu

extern "C" void lp_emu_fibre_entry(void* p) {
  using namespace lp_emu;
  Thread& t = *static_cast<Thread*>(p);
#ifdef LP_EMU_ASAN
  const void* lo = nullptr;
  size_t size = 0;
  __sanitizer_finish_switch_fiber(nullptr, &lo, &size);
  if (t.block->sched_stack_lo == nullptr) {
    t.block->sched_stack_lo = lo;
    t.block->sched_stack_size = size;
  }
#endif
  (*t.block->body)();
  thread_exit(t);
  to_scheduler(t, true);
  std::abort();  // an exited fibre is never resumed
}

namespace lp_emu {
namespace {

// ---- running one block --------------------------------------------------------------------------
void run_block(Block& b, const Settings& s, uint64_t block_linear) {
  const dim3 bd = b.cfg->block;
  b.nthreads = bd.x * bd.y * bd.z;
  b.threads = &tls_stacks.get(b.nthreads, s.stack_bytes);
  b.warps.assign((b.nthreads + 31) / 32, {});
  b.live = b.nthreads;
  b.at_barrier = 0;
  b.failed = false;
  b.error.clear();
  // Uninitialised dynamic shared memory reads as NaN (0xff bytes) rather than as zeros or stale data.
  if (b.cfg->smem > 0) b.dyn_smem.assign(b.cfg->smem + 128, 0xff);
  else b.dyn_smem.clear();
  for (unsigned i = 0; i < b.nthreads; ++i) {
    Thread& t = (*b.threads)[i];
    t.block = &b;
    t.linear = i;
    t.tid = uint3{i % bd.x, (i / bd.x) % bd.y, i / (bd.x * bd.y)};
    t.lane = i % 32;
    t.warp = i / 32;
    t.state = State::kReady;
    t.copies.clear();
    t.next_group = 0;
    prepare_stack(t);
  }
  std::vector<unsigned> order(b.nthreads);
  for (unsigned i = 0; i < b.nthreads; ++i) order[i] = s.schedule == 1 ? b.nthreads - 1 - i : i;
  std::mt19937_64 rng(s.seed * 0x9E3779B97F4A7C15ull + block_linear);
  tls_block = &b;
  while (b.live > 0 && !b.failed) {
    if (s.schedule == 2) std::shuffle(order.begin(), order.end(), rng);
    bool progressed = false;
    for (unsigned i : order) {
      Thread& t = (*b.threads)[i];
      if (t.state != State::kReady) continue;
      progressed = true;
      to_fibre(b, t);
      if (b.failed) break;
    }
    if (!progressed && !b.failed) {
      b.failed = true;
      b.error = "deadlock: no thread of the block can proceed" + describe_waiters(b);
    }
  }
  tls_block = nullptr;
}

// ---- the pool of OS threads running blocks ----------------------------------------------------------
class Pool {
 public:
  static Pool& get() {
    static Pool* pool = new Pool();  // never destroyed: workers may outlive static destructors
    return *pool;
  }
  // Runs job(worker) on `n` threads, the caller being worker 0; returns when all are done.
  void run(int n, const std::function<void(int)>& job) {
    std::lock_guard<std::mutex> one_launch_at_a_time(launch_mu_);
    while (static_cast<int>(workers_.size()) < n - 1) {
      const int id = static_cast<int>(workers_.size()) + 1;
      workers_.emplace_back([this, id] { loop(id); });
      workers_.back().detach();
    }
    {
      std::lock_guard<std::mutex> l(mu_);
      job_ = &job;
      active_ = n;
      remaining_ = n - 1;
      ++generation_;
    }
    cv_.notify_all();
    job(0);
    std::unique_lock<std::mutex> l(mu_);
    done_cv_.wait(l, [this] { return remaining_ == 0; });
    job_ = nullptr;
  }

 private:
  void loop(int id) {
    uint64_t seen = 0;
    for (;;) {
      const std::function<void(int)>* job;
      {
        std::unique_lock<std::mutex> l(mu_);
        cv_.wait(l, [&] { return generation_ != seen; });
        seen = generation_;
        if (id >= active_) continue;
        job = job_;
      }
      (*job)(id);
      {
        std::lock_guard<std::mutex> l(mu_);
        --remaining_;
      }
      done_cv_.notify_all();
    }
  }
  std::mutex launch_mu_, mu_;
  std::condition_variable cv_, done_cv_;
  std::vector<std::thread> workers_;
  const std::function<void(int)>* job_ = nullptr;
  int active_ = 0, remaining_ = 0;
  uint64_t generation_ = 0;
};

// ---- runtime state: the last error (cudaGetLastError) and the kernels' dynamic smem limits -----------
std::mutex g_state_mu;  // guards the three below
cudaError_t g_last_error = cudaSuccess;
std::string g_last_message;
std::map<const void*, size_t> g_dyn_smem_limit;

cudaError_t set_error(cudaError_t e, const std::string& msg) {
  std::lock_guard<std::mutex> l(g_state_mu);
  g_last_error = e;
  g_last_message = msg;
  return e;
}

}  // namespace

Settings& settings() {
  static Settings s = [] {
    Settings v;
    if (const char* e = std::getenv("LP_EMU_THREADS")) v.threads = std::atoi(e);
    if (const char* e = std::getenv("LP_EMU_SCHEDULE")) {
      const std::string m = e;
      if (m == "reverse") v.schedule = 1;
      else if (m.rfind("random", 0) == 0) {
        v.schedule = 2;
        if (m.size() > 7) v.seed = std::strtoull(m.c_str() + 7, nullptr, 10);
      }
    }
    return v;
  }();
  return s;
}

const char* last_error_message() {
  static thread_local std::string copy;
  std::lock_guard<std::mutex> l(g_state_mu);
  copy = g_last_message;
  return copy.c_str();
}

cudaError_t launch(const LaunchConfig& cfg, const std::function<void()>& body) {
  const dim3 g = cfg.grid, bl = cfg.block;
  const uint64_t nthreads = static_cast<uint64_t>(bl.x) * bl.y * bl.z;
  const std::string where = " (launch at " + site_str(cfg.site) + ")";
  if (g.x == 0 || g.y == 0 || g.z == 0 || nthreads == 0)
    return set_error(cudaErrorInvalidConfiguration, "empty grid or block" + where);
  if (nthreads > 1024 || bl.x > 1024 || bl.y > 1024 || bl.z > 64)
    return set_error(cudaErrorInvalidConfiguration,
                     "block (" + std::to_string(bl.x) + "," + std::to_string(bl.y) + "," + std::to_string(bl.z) +
                         ") exceeds 1024 threads or the per-dimension limits" + where);
  if (g.x > 2147483647u || g.y > 65535u || g.z > 65535u)
    return set_error(cudaErrorInvalidConfiguration, "grid exceeds the per-dimension limits" + where);
  size_t smem_limit = kDefaultDynamicSmemLimit;
  {
    std::lock_guard<std::mutex> l(g_state_mu);
    auto it = g_dyn_smem_limit.find(cfg.kernel);
    if (it != g_dyn_smem_limit.end()) smem_limit = it->second;
  }
  if (cfg.smem > smem_limit)
    return set_error(cudaErrorInvalidValue, std::to_string(cfg.smem) + " bytes of dynamic shared memory exceed the " +
                                                std::to_string(smem_limit) + "-byte limit of this kernel" + where);

  const Settings s = settings();
  const uint64_t nblocks = static_cast<uint64_t>(g.x) * g.y * g.z;
  int workers = s.threads > 0 ? s.threads : static_cast<int>(std::thread::hardware_concurrency());
  workers = static_cast<int>(std::max<uint64_t>(1, std::min<uint64_t>(nblocks, std::max(1, std::min(workers, 16)))));
  std::atomic<uint64_t> next{0};
  std::atomic<bool> failed{false};
  std::mutex fail_mu;
  std::string fail_msg;
  Pool::get().run(workers, [&](int) {
    Block b;
    b.cfg = &cfg;
    b.body = &body;
    for (;;) {
      if (failed.load()) return;
      const uint64_t i = next.fetch_add(1);
      if (i >= nblocks) return;
      b.bid = uint3{static_cast<unsigned>(i % g.x), static_cast<unsigned>((i / g.x) % g.y),
                    static_cast<unsigned>(i / (static_cast<uint64_t>(g.x) * g.y))};
      run_block(b, s, i);
      if (b.failed) {
        std::lock_guard<std::mutex> l(fail_mu);
        if (!failed.exchange(true)) fail_msg = b.error;
        return;
      }
    }
  });
  if (failed.load()) return set_error(cudaErrorLaunchFailure, fail_msg + where);
  return cudaSuccess;
}

// ---- device-side interface ---------------------------------------------------------------------------
const uint3& thread_idx() { return cur().tid; }
const uint3& block_idx() { return cur_block().bid; }
const dim3& block_dim() { return cur_block().cfg->block; }
const dim3& grid_dim() { return cur_block().cfg->grid; }
void* dynamic_smem() {
  Block& b = cur_block();
  if (b.dyn_smem.empty()) return nullptr;
  const uintptr_t p = reinterpret_cast<uintptr_t>(b.dyn_smem.data());
  return reinterpret_cast<void*>((p + 127) & ~static_cast<uintptr_t>(127));
}

void fail(Site site, const char* fmt, ...) {
  Block& b = cur_block();
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  fail_block(b, who(b, cur()) + " at " + site_str(site) + ": " + buf);
}

int syncthreads(Site site, int predicate, int op) {
  Block& b = cur_block();
  Thread& t = cur();
  if (b.at_barrier > 0 && (b.barrier_site.line != site.line || std::strcmp(b.barrier_site.file, site.file) != 0))
    fail_block(b, "barrier divergence: " + who(b, t) + " reached __syncthreads at " + site_str(site) +
                      " while other threads wait at " + site_str(b.barrier_site));
  if (b.at_barrier > 0 && b.barrier_op != op)
    fail_block(b, "barrier divergence: different __syncthreads forms meet at " + site_str(site));
  if (b.at_barrier == 0) {
    b.barrier_site = site;
    b.barrier_op = op;
  }
  t.state = State::kBarrier;
  t.wait_site = site;
  t.wait_what = "__syncthreads";
  t.barrier_pred = predicate;
  ++b.at_barrier;
  if (b.at_barrier == b.live) release_barrier(b);  // the last to arrive carries on
  else to_scheduler(t, false);
  return t.barrier_result;
}

void warp_collective(Site site, const char* what, unsigned mask, void* buf, CollectiveFn complete, void* ctx) {
  Block& b = cur_block();
  Thread& t = cur();
  auto hex = [mask] { return hex32(mask); };  // for messages only: nothing is built on the fast path
  if (!(mask >> t.lane & 1u))
    fail_block(b, who(b, t) + " calls " + what + " at " + site_str(site) + " with mask " + hex() +
                      ", which does not contain its own lane");
  // Lanes of the mask that do not exist (a partial last warp) or have exited can never arrive.
  const unsigned first = t.warp * 32;
  for (unsigned l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    if (first + l >= b.nthreads || (*b.threads)[first + l].state == State::kDone)
      fail_block(b, who(b, t) + " calls " + what + " at " + site_str(site) + " with mask " + hex() + ", but lane " +
                        std::to_string(l) + (first + l >= b.nthreads ? " does not exist" : " has exited"));
  }
  std::vector<PendingCollective>& pend = b.warps[t.warp];
  PendingCollective* pc = nullptr;
  // Collectives of overlapping masks may be pending at once (a half-warp vote while the other half
  // is already at a full-warp __syncwarp); if they can never complete, the deadlock check says so.
  for (PendingCollective& p : pend)
    if (p.mask == mask) pc = &p;
  if (pc == nullptr) {
    pend.emplace_back();
    pc = &pend.back();
    pc->mask = mask;
    pc->what = what;
    pc->site = site;
    pc->fn = complete;
    pc->ctx = ctx;
  } else if (std::strcmp(pc->what, what) != 0) {  // the same mask may meet from different sites (sm_70+)
    fail_block(b, "warp divergence: " + who(b, t) + " calls " + what + " at " + site_str(site) +
                      " while the other lanes of mask " + hex() + " wait in " + pc->what + " at " + site_str(pc->site));
  }
  pc->bufs[t.lane] = buf;
  pc->arrived |= 1u << t.lane;
  if (pc->arrived == mask) {
    const PendingCollective done = *pc;
    pend.erase(pend.begin() + (pc - pend.data()));
    done.fn(done.ctx, done.bufs, mask);
    for (unsigned l = 0; l < 32; ++l)
      if ((mask >> l & 1u) && l != t.lane) (*b.threads)[first + l].state = State::kReady;
    return;  // the last to arrive carries on
  }
  t.state = State::kWarp;
  t.wait_site = site;
  t.wait_what = what;
  to_scheduler(t, false);
}

void syncwarp(Site site, unsigned mask) {
  warp_collective(site, "__syncwarp", mask, nullptr, [](void*, void* const*, unsigned) {}, nullptr);
}

unsigned activemask() {
  // The lanes of this warp that have not exited: the emulator has no notion of which lanes
  // happen to execute together, so this is the most a kernel may rely on.
  Block& b = cur_block();
  Thread& t = cur();
  unsigned m = 0;
  for (unsigned l = 0; l < 32; ++l) {
    const unsigned i = t.warp * 32 + l;
    if (i < b.nthreads && (*b.threads)[i].state != State::kDone) m |= 1u << l;
  }
  return m;
}

unsigned ballot(Site site, unsigned mask, int predicate) {
  struct Buf { int pred; unsigned result; } buf{predicate, 0};
  warp_collective(site, "__ballot_sync", mask, &buf, [](void*, void* const* bufs, unsigned m) {
    unsigned r = 0;
    for (unsigned l = 0; l < 32; ++l)
      if ((m >> l & 1u) && static_cast<Buf*>(bufs[l])->pred) r |= 1u << l;
    for (unsigned l = 0; l < 32; ++l)
      if (m >> l & 1u) static_cast<Buf*>(bufs[l])->result = r;
  }, nullptr);
  return buf.result;
}

bool uni(Site site, unsigned mask, int predicate) {
  const unsigned r = ballot(site, mask, predicate);
  return r == 0 || r == mask;
}

uint64_t shfl(Site site, unsigned mask, uint64_t value, unsigned bval, unsigned c, ShflMode mode) {
  struct Buf {
    uint64_t value, result;
    unsigned b, c;
    ShflMode mode;
    int bad_src;  // set by the completer: the lane read from outside the mask
  } buf{value, 0, bval, c, mode, -1};
  static const char* names[4] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync"};
  warp_collective(site, names[static_cast<int>(mode)], mask, &buf, [](void*, void* const* bufs, unsigned m) {
    for (unsigned lane = 0; lane < 32; ++lane) {
      if (!(m >> lane & 1u)) continue;
      Buf& me = *static_cast<Buf*>(bufs[lane]);
      // PTX ISA, shfl.sync: segment mask and clamp from c, source lane j, in-range predicate.
      const unsigned bv = me.b & 31u, cval = me.c & 31u, segmask = (me.c >> 8) & 31u;
      const unsigned max_lane = (lane & segmask) | (cval & ~segmask);
      const unsigned min_lane = lane & segmask;
      int j = 0;
      bool pval = false;
      switch (me.mode) {
        case ShflMode::kUp: j = static_cast<int>(lane) - static_cast<int>(bv); pval = j >= static_cast<int>(max_lane); break;
        case ShflMode::kDown: j = static_cast<int>(lane + bv); pval = j <= static_cast<int>(max_lane); break;
        case ShflMode::kBfly: j = static_cast<int>(lane ^ bv); pval = j <= static_cast<int>(max_lane); break;
        case ShflMode::kIdx: j = static_cast<int>(min_lane | (bv & ~segmask)); pval = j <= static_cast<int>(max_lane); break;
      }
      if (!pval) j = static_cast<int>(lane);
      if (!(m >> j & 1u)) {
        me.bad_src = j;  // undefined on the hardware: reported by the lane itself below
        continue;
      }
      me.result = static_cast<Buf*>(bufs[j])->value;
    }
  }, nullptr);
  if (buf.bad_src >= 0)
    fail(site, "%s reads lane %d, which is not in the mask 0x%08x (undefined on the hardware)",
         names[static_cast<int>(mode)], buf.bad_src, mask);
  return buf.result;
}

// ---- tensor-core and copy instructions ---------------------------------------------------------------
namespace {
uint16_t lo16(uint32_t r) { return static_cast<uint16_t>(r & 0xffffu); }
uint16_t hi16(uint32_t r) { return static_cast<uint16_t>(r >> 16); }
uint32_t pack16(uint16_t lo, uint16_t hi) { return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16); }
}  // namespace

void ldmatrix(Site site, int num, bool trans, uint32_t* regs, const void* row_addr) {
  struct Buf { uint32_t* regs; const void* addr; int num; } buf{regs, row_addr, num};
  static const char* names[2][5] = {{"", "ldmatrix.x1", "ldmatrix.x2", "", "ldmatrix.x4"},
                                    {"", "ldmatrix.x1.trans", "ldmatrix.x2.trans", "", "ldmatrix.x4.trans"}};
  if (num != 1 && num != 2 && num != 4) fail(site, "ldmatrix: .x%d is not a valid count", num);
  // Rows are 16 bytes and must be 16-byte aligned (the lanes that provide addresses check theirs).
  const unsigned lane = cur().lane;
  if (lane < 8u * static_cast<unsigned>(num) && (reinterpret_cast<uintptr_t>(row_addr) & 15u) != 0)
    fail(site, "%s: row address %p of lane %u is not 16-byte aligned", names[trans][num], row_addr, lane);
  static const CollectiveFn load_trans = [](void*, void* const* bufs, unsigned) {
    const int n = static_cast<Buf*>(bufs[0])->num;
    for (int i = 0; i < n; ++i) {
      uint16_t m[8][8];  // matrix i: row r from the address of lane 8i + r
      for (int r = 0; r < 8; ++r) std::memcpy(m[r], static_cast<Buf*>(bufs[8 * i + r])->addr, 16);
      for (int l = 0; l < 32; ++l)  // transposed: lane l holds M[2(l%4)][l/4], M[2(l%4)+1][l/4]
        static_cast<Buf*>(bufs[l])->regs[i] = pack16(m[2 * (l % 4)][l / 4], m[2 * (l % 4) + 1][l / 4]);
    }
  };
  static const CollectiveFn load = [](void*, void* const* bufs, unsigned) {
    const int n = static_cast<Buf*>(bufs[0])->num;
    for (int i = 0; i < n; ++i) {
      uint16_t m[8][8];
      for (int r = 0; r < 8; ++r) std::memcpy(m[r], static_cast<Buf*>(bufs[8 * i + r])->addr, 16);
      for (int l = 0; l < 32; ++l)  // lane l holds row l/4, columns 2(l%4) and 2(l%4)+1
        static_cast<Buf*>(bufs[l])->regs[i] = pack16(m[l / 4][2 * (l % 4)], m[l / 4][2 * (l % 4) + 1]);
    }
  };
  warp_collective(site, names[trans][num], kFullMask, &buf, trans ? load_trans : load, nullptr);
}

void mma_m16n8k16(Site site, bool bf16, float* d, const uint32_t* a, const uint32_t* b, const float* c) {
  struct Buf { float* d; const uint32_t* a; const uint32_t* b; const float* c; } buf{d, a, b, c};
  auto complete = [](void* ctx, void* const* bufs, unsigned) {
    const bool is_bf16 = ctx != nullptr;
    auto val = [is_bf16](uint16_t h) {
      return static_cast<double>(is_bf16 ? bf16_to_f32(h) : f16_to_f32(h));
    };
    double A[16][16], B[16][8], C[16][8];
    for (int l = 0; l < 32; ++l) {
      const Buf& f = *static_cast<Buf*>(bufs[l]);
      const int g = l >> 2, t = l & 3;
      // A (16 x 16, row): a0..a7 in 4 registers; a_i row g (+8 for i in 2,3,6,7), col 2t + (i&1) (+8 for i >= 4).
      for (int i = 0; i < 8; ++i) {
        const int row = g + (((i >> 1) & 1) ? 8 : 0), col = 2 * t + (i & 1) + (i >= 4 ? 8 : 0);
        const uint32_t r = f.a[i / 2];
        A[row][col] = val((i & 1) ? hi16(r) : lo16(r));
      }
      // B (16 x 8, col): b0..b3 in 2 registers; b_i row 2t + (i&1) (+8 for i >= 2), col g.
      for (int i = 0; i < 4; ++i) {
        const int row = 2 * t + (i & 1) + (i >= 2 ? 8 : 0);
        const uint32_t r = f.b[i / 2];
        B[row][g] = val((i & 1) ? hi16(r) : lo16(r));
      }
      // C/D (16 x 8, f32): c_i row g (+8 for i >= 2), col 2t + (i&1).
      for (int i = 0; i < 4; ++i) C[g + (i >= 2 ? 8 : 0)][2 * t + (i & 1)] = f.c[i];
    }
    // The products of f16/bf16 values are exact in fp64, and so is their sum here: D is the exact
    // A·B + C rounded once to fp32 (the hardware's own summation order is not specified).
    for (int l = 0; l < 32; ++l) {
      const Buf& f = *static_cast<Buf*>(bufs[l]);
      const int g = l >> 2, t = l & 3;
      for (int i = 0; i < 4; ++i) {
        const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
        double s = C[row][col];
        for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
        f.d[i] = static_cast<float>(s);
      }
    }
  };
  // Every lane's inputs are read before any output is written, so d may alias c.
  warp_collective(site, bf16 ? "mma.m16n8k16.bf16" : "mma.m16n8k16.f16", kFullMask, &buf, complete,
                  bf16 ? reinterpret_cast<void*>(1) : nullptr);
}

void cp_async(Site site, void* dst, const void* src, int bytes, int src_bytes) {
  if (bytes != 4 && bytes != 8 && bytes != 16) fail(site, "cp.async copies 4, 8 or 16 bytes, not %d", bytes);
  if (src_bytes < 0 || src_bytes > bytes) fail(site, "cp.async: src-size %d outside [0, %d]", src_bytes, bytes);
  if ((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src)) % static_cast<unsigned>(bytes) != 0)
    fail(site, "cp.async of %d bytes needs %d-byte aligned addresses (dst %p, src %p)", bytes, bytes, dst, src);
  Thread& t = cur();
  t.copies.push_back(AsyncCopy{dst, src, bytes, src_bytes, -1});
  // Until the wait, the destination holds nothing a kernel may read: make early reads visible.
  std::memset(dst, 0xff, static_cast<size_t>(bytes));
}

void cp_async_commit() {
  Thread& t = cur();
  for (AsyncCopy& c : t.copies)
    if (c.group < 0) c.group = t.next_group;
  ++t.next_group;
}

void cp_async_wait(Site site, int n) {
  if (n < 0) fail(site, "cp.async.wait_group %d", n);
  Thread& t = cur();
  perform_copies(t, t.next_group - n, false);  // all but the n most recent committed groups
}

}  // namespace lp_emu

// ---- runtime API ---------------------------------------------------------------------------------------
using lp_emu::set_error;

cudaError_t cudaGetLastError() {
  std::lock_guard<std::mutex> l(lp_emu::g_state_mu);
  const cudaError_t e = lp_emu::g_last_error;
  lp_emu::g_last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() {
  std::lock_guard<std::mutex> l(lp_emu::g_state_mu);
  return lp_emu::g_last_error;
}
const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDeviceFunction: return "cudaErrorInvalidDeviceFunction";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorIllegalAddress: return "cudaErrorIllegalAddress";
    case cudaErrorLaunchOutOfResources: return "cudaErrorLaunchOutOfResources";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    case cudaErrorNotSupported: return "cudaErrorNotSupported";
  }
  return "cudaErrorUnknown";
}
const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure (emulator: see lp_emu::last_error_message)";
    default: return cudaGetErrorName(e);
  }
}
cudaError_t cudaMalloc(void** p, size_t bytes) {
  *p = std::aligned_alloc(256, (bytes + 255) / 256 * 256 + 256);
  return *p ? cudaSuccess : set_error(cudaErrorMemoryAllocation, "cudaMalloc");
}
cudaError_t cudaFree(void* p) {
  std::free(p);
  return cudaSuccess;
}
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind) {
  if (bytes) std::memmove(dst, src, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t) {
  return cudaMemcpy(dst, src, bytes, kind);
}
cudaError_t cudaMemset(void* p, int value, size_t bytes) {
  if (bytes) std::memset(p, value, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) { return cudaMemset(p, value, bytes); }
// Launches run to completion before they return: every stream is always idle.
cudaError_t cudaDeviceSynchronize() { return cudaPeekAtLastError(); }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaPeekAtLastError(); }
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) {
  return device == 0 ? cudaSuccess : set_error(cudaErrorInvalidDevice, "the emulator has one device");
}
cudaError_t cudaRuntimeGetVersion(int* version) {
  *version = 0;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = static_cast<int>(lp_emu::kDefaultDynamicSmemLimit); break;
    case cudaDevAttrWarpSize: *value = 32; break;
    case cudaDevAttrMultiProcessorCount: *value = lp_emu::settings().sm_count; break;
    case cudaDevAttrL2CacheSize: *value = 50 * 1024 * 1024; break;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; break;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = static_cast<int>(lp_emu::kMaxDynamicSmemOptin); break;
    default: return set_error(cudaErrorInvalidValue, "cudaDeviceGetAttribute: attribute not emulated");
  }
  return cudaSuccess;
}
cudaError_t lp_emu_func_set_attribute(const void* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaSuccess;  // carveout: a hint
  if (value < 0 || static_cast<size_t>(value) > lp_emu::kMaxDynamicSmemOptin)
    return set_error(cudaErrorInvalidValue, "cudaFuncSetAttribute: dynamic shared memory above the opt-in limit");
  std::lock_guard<std::mutex> l(lp_emu::g_state_mu);
  lp_emu::g_dyn_smem_limit[kernel] = static_cast<size_t>(value);
  return cudaSuccess;
}
