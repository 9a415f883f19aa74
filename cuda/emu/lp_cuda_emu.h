// layerpress CUDA emulator: what a .cu file needs from CUDA, for the host C++ compiler.
//
// The kernels' own sources (cuda/kernels/*.cu) are compiled by g++/clang++ with
// cuda/emu/include first on the include path, so their #include <cuda_runtime.h> (and cuda_fp16.h,
// cuda_bf16.h, cuda_runtime_api.h) land here. Every CUDA thread of a block runs as a fibre on one
// OS thread (cuda/emu/emu_runtime.cpp); a fibre runs until it reaches a synchronisation point
// (__syncthreads, a warp collective, cp.async.wait) and then hands over to the next ready one, so
// barriers and warp collectives have their real semantics: a warp collective completes only when
// every lane of its mask has reached it, and mismatches are reported as launch failures instead
// of hanging (docs/cuda_emulator.md lists what is checked).
//
// What cannot be written in plain C++ is spelled by two macros that nvcc maps to the real thing
// (cuda/kernels/launch.cuh): LP_LAUNCH(grid, block, smem, stream, kernel)(args...) for
// kernel<<<...>>>(args...), and LP_DYNAMIC_SMEM(T, name) for extern __shared__. The tensor-core,
// ldmatrix, cp.async, lop3 and prmt instructions are named device functions in
// cuda/kernels/ptx.cuh, which call the lp_emu:: versions below when LP_CUDA_EMU is defined.
#pragma once
#define LP_CUDA_EMU 1

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <math.h>
#include <tuple>
#include <type_traits>
#include <utility>

// ---- qualifiers -----------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __align__(n) __attribute__((aligned(n)))
#define __constant__
#define __managed__
// One copy per OS thread, and one OS thread runs one block at a time: per-block shared memory.
#define __shared__ static thread_local

// ---- runtime types --------------------------------------------------------------------------------
struct uint3 { unsigned int x, y, z; };
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};
struct float2 { float x, y; };
struct float4 { float x, y, z, w; };
struct int2 { int x, y; };
struct int4 { int x, y, z, w; };
struct uint2 { unsigned int x, y; };
struct uint4 { unsigned int x, y, z, w; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

// Values of the real runtime, so that messages and numbers read the same.
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorInvalidDevice = 101,
  cudaErrorIllegalAddress = 700,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorLaunchFailure = 719,
  cudaErrorNotSupported = 801,
};
using cudaError = cudaError_t;
struct CUstream_st;
using cudaStream_t = CUstream_st*;
enum cudaMemcpyKind : int {
  cudaMemcpyHostToHost = 0, cudaMemcpyHostToDevice = 1, cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3, cudaMemcpyDefault = 4,
};
enum cudaFuncAttribute : int {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributePreferredSharedMemoryCarveout = 9,
};
enum cudaDeviceAttr : int {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrWarpSize = 10,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrL2CacheSize = 38,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};

constexpr int warpSize = 32;

// ---- the emulator's interface (emu_runtime.cpp) -------------------------------------------------------
namespace lp_emu {

struct Site {  // where in the kernel source a synchronisation point is
  const char* file;
  int line;
};
#define LP_EMU_SITE (::lp_emu::Site{__FILE__, __LINE__})

const uint3& thread_idx();
const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();
void* dynamic_smem();

// Block barrier. op 0: returns how many threads passed a non-zero predicate (__syncthreads_count);
// 1: whether all did (_and); 2: whether any did (_or). Exited threads do not take part, as on
// the hardware.
int syncthreads(Site site, int predicate, int op);
void syncwarp(Site site, unsigned mask);
unsigned activemask();
unsigned ballot(Site site, unsigned mask, int predicate);
// Generic warp collective: every lane of `mask` passes a pointer to its own buffer; when the last
// one arrives, `complete(ctx, bufs, mask)` runs once with bufs[lane] for each lane of the mask
// (null for the others) and may read and write every buffer. `what` names the operation for
// error messages; lanes meeting with different `what` or `mask` are an error.
using CollectiveFn = void (*)(void* ctx, void* const* bufs, unsigned mask);
void warp_collective(Site site, const char* what, unsigned mask, void* buf, CollectiveFn complete,
                     void* ctx);
// Raises a launch failure from kernel code (a trap, a violated emulator check); does not return.
[[noreturn]] void fail(Site site, const char* fmt, ...);

// shfl.sync with the PTX ISA's semantics: mode 0 idx, 1 up, 2 down, 3 bfly; c = clamp | (segmask
// << 8) as CUDA's __shfl*_sync build it from `width`.
enum class ShflMode : int { kIdx = 0, kUp = 1, kDown = 2, kBfly = 3 };
uint64_t shfl(Site site, unsigned mask, uint64_t value, unsigned b, unsigned c, ShflMode mode);

template <typename T>
T shfl_typed(Site site, unsigned mask, T var, int b, int width, ShflMode mode) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "__shfl_sync: 1-8 byte values");
  uint64_t bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  const unsigned seg = static_cast<unsigned>(warpSize - width) << 8;
  const unsigned c = mode == ShflMode::kUp ? seg : (seg | 0x1fu);
  bits = shfl(site, mask, bits, static_cast<unsigned>(b), c, mode);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

// Tensor-core and copy instructions, exactly as the PTX ISA lays out the fragments.
void ldmatrix(Site site, int num, bool trans, uint32_t* regs, const void* row_addr);
void mma_m16n8k16(Site site, bool bf16, float* d, const uint32_t* a, const uint32_t* b, const float* c);
void cp_async(Site site, void* dst, const void* src, int bytes, int src_bytes);
void cp_async_commit();
void cp_async_wait(Site site, int n);

// lop3.b32: bit i of the result is bit (a_i << 2 | b_i << 1 | c_i) of the look-up table.
inline uint32_t lop3(uint32_t a, uint32_t b, uint32_t c, uint32_t lut) {
  uint32_t r = 0;
  for (int idx = 0; idx < 8; ++idx) {
    if (!(lut >> idx & 1u)) continue;
    r |= ((idx & 4) ? a : ~a) & ((idx & 2) ? b : ~b) & ((idx & 1) ? c : ~c);
  }
  return r;
}
// prmt.b32 (default mode): result byte i is byte (sel >> 4i) & 7 of {b, a} (a = bytes 0-3), or that
// byte's sign replicated when bit 3 of the selector nibble is set.
inline uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  const uint64_t src = (static_cast<uint64_t>(b) << 32) | a;
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) {
    const uint32_t nib = (sel >> (4 * i)) & 0xfu;
    uint32_t byte = static_cast<uint32_t>(src >> (8 * (nib & 7u))) & 0xffu;
    if (nib & 8u) byte = (byte & 0x80u) ? 0xffu : 0u;
    r |= byte << (8 * i);
  }
  return r;
}

// Atomics on any memory (blocks may run on different OS threads).
template <typename T, typename F>
T atomic_update(T* p, F f) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8 || sizeof(T) == 2, "atomics on 2, 4 or 8 bytes");
  using U = typename std::conditional<sizeof(T) == 8, uint64_t,
            typename std::conditional<sizeof(T) == 4, uint32_t, uint16_t>::type>::type;
  U* u = reinterpret_cast<U*>(p);
  U old = __atomic_load_n(u, __ATOMIC_RELAXED);
  for (;;) {
    T oldv;
    std::memcpy(&oldv, &old, sizeof(T));
    const T newv = f(oldv);
    U nu;
    std::memcpy(&nu, &newv, sizeof(T));
    if (__atomic_compare_exchange_n(u, &old, nu, false, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) return oldv;
  }
}

// ---- kernel launch ---------------------------------------------------------------------------------
struct LaunchConfig {
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
  const void* kernel;  // identifies the kernel for cudaFuncSetAttribute
  Site site;
};
// Runs every thread of every block of the grid through `body` and returns the launch status
// (also recorded for cudaGetLastError).
cudaError_t launch(const LaunchConfig& cfg, const std::function<void()>& body);

template <typename... P>
struct BoundKernel {
  void (*kernel)(P...);
  LaunchConfig cfg;
  template <typename... A>
  void operator()(A&&... args) const {
    static_assert(sizeof...(A) == sizeof...(P), "kernel launched with the wrong number of arguments");
    // Arguments are copied once at launch, like the real runtime's parameter buffer; each thread
    // then gets its own by-value copies.
    std::tuple<typename std::decay<P>::type...> params(static_cast<P>(std::forward<A>(args))...);
    void (*k)(P...) = kernel;
    launch(cfg, [&]() { std::apply(k, params); });
  }
};
struct Launcher {
  LaunchConfig cfg;
  Launcher(dim3 grid, dim3 block, size_t smem, cudaStream_t stream, Site site)
      : cfg{grid, block, smem, stream, nullptr, site} {}
  template <typename... P>
  BoundKernel<P...> bind(void (*kernel)(P...)) const {
    LaunchConfig c = cfg;
    c.kernel = reinterpret_cast<const void*>(kernel);
    return BoundKernel<P...>{kernel, c};
  }
};

// Emulator settings (also reachable from C: lp_emu_configure in emu_capi.cpp).
struct Settings {
  int threads = 0;        // OS threads running blocks; 0: hardware concurrency
  int schedule = 0;       // 0 forward, 1 reverse, 2 random (order in which ready fibres resume)
  uint64_t seed = 1;      // for the random schedule
  int sm_count = 132;     // what cudaDevAttrMultiProcessorCount reports (an H100/H200 has 132)
  size_t stack_bytes = 256 * 1024;  // per emulated thread
};
Settings& settings();
const char* last_error_message();  // detail of the last failed launch ("" if none)

}  // namespace lp_emu

#define LP_EMU_LAUNCH(grid, block, smem, stream, ...) \
  ::lp_emu::Launcher((grid), (block), (smem), (stream), LP_EMU_SITE).bind(__VA_ARGS__)

// ---- built-in variables -------------------------------------------------------------------------------
#define threadIdx (::lp_emu::thread_idx())
#define blockIdx (::lp_emu::block_idx())
#define blockDim (::lp_emu::block_dim())
#define gridDim (::lp_emu::grid_dim())

// ---- synchronisation and warp intrinsics ----------------------------------------------------------------
#define __syncthreads() ((void)::lp_emu::syncthreads(LP_EMU_SITE, 0, 0))
#define __syncthreads_count(p) (::lp_emu::syncthreads(LP_EMU_SITE, (p) != 0, 0))
#define __syncthreads_and(p) (::lp_emu::syncthreads(LP_EMU_SITE, (p) != 0, 1))
#define __syncthreads_or(p) (::lp_emu::syncthreads(LP_EMU_SITE, (p) != 0, 2))
#define __syncwarp(...) ::lp_emu::syncwarp(LP_EMU_SITE, ::lp_emu::mask_or_full(__VA_ARGS__))
#define __activemask() (::lp_emu::activemask())
#define __ballot_sync(mask, p) (::lp_emu::ballot(LP_EMU_SITE, (mask), (p) != 0))
#define __any_sync(mask, p) (::lp_emu::ballot(LP_EMU_SITE, (mask), (p) != 0) != 0u)
#define __all_sync(mask, p) (::lp_emu::ballot(LP_EMU_SITE, (mask), (p) != 0) == (mask))
#define __uni_sync(mask, p) (::lp_emu::uni(LP_EMU_SITE, (mask), (p) != 0))
#define __shfl_sync(mask, var, src, ...) \
  ::lp_emu::shfl_typed(LP_EMU_SITE, (mask), (var), (src), ::lp_emu::width_or_full(__VA_ARGS__), ::lp_emu::ShflMode::kIdx)
#define __shfl_up_sync(mask, var, delta, ...) \
  ::lp_emu::shfl_typed(LP_EMU_SITE, (mask), (var), (delta), ::lp_emu::width_or_full(__VA_ARGS__), ::lp_emu::ShflMode::kUp)
#define __shfl_down_sync(mask, var, delta, ...) \
  ::lp_emu::shfl_typed(LP_EMU_SITE, (mask), (var), (delta), ::lp_emu::width_or_full(__VA_ARGS__), ::lp_emu::ShflMode::kDown)
#define __shfl_xor_sync(mask, var, lane_mask, ...) \
  ::lp_emu::shfl_typed(LP_EMU_SITE, (mask), (var), (lane_mask), ::lp_emu::width_or_full(__VA_ARGS__), ::lp_emu::ShflMode::kBfly)
#define __reduce_add_sync(mask, v) (::lp_emu::reduce_sync(LP_EMU_SITE, (mask), (v), 0))
#define __reduce_min_sync(mask, v) (::lp_emu::reduce_sync(LP_EMU_SITE, (mask), (v), 1))
#define __reduce_max_sync(mask, v) (::lp_emu::reduce_sync(LP_EMU_SITE, (mask), (v), 2))
#define __trap() ::lp_emu::fail(LP_EMU_SITE, "__trap()")
#define __threadfence() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define __threadfence_block() __atomic_thread_fence(__ATOMIC_SEQ_CST)

namespace lp_emu {
inline unsigned mask_or_full() { return 0xffffffffu; }
inline unsigned mask_or_full(unsigned m) { return m; }
inline int width_or_full() { return warpSize; }
inline int width_or_full(int w) { return w; }
bool uni(Site site, unsigned mask, int predicate);
template <typename T>
T reduce_sync(Site site, unsigned mask, T v, int op) {
  static_assert(std::is_integral<T>::value && sizeof(T) == 4, "__reduce_*_sync: 32-bit integers");
  struct Buf { T v; };
  Buf b{v};
  static const CollectiveFn fns[3] = {
      [](void*, void* const* bufs, unsigned m) {
        T s = 0;
        for (int l = 0; l < 32; ++l) if (m >> l & 1u) s += static_cast<Buf*>(bufs[l])->v;
        for (int l = 0; l < 32; ++l) if (m >> l & 1u) static_cast<Buf*>(bufs[l])->v = s;
      },
      [](void*, void* const* bufs, unsigned m) {
        bool first = true;
        T s = 0;
        for (int l = 0; l < 32; ++l)
          if (m >> l & 1u) { const T x = static_cast<Buf*>(bufs[l])->v; s = first || x < s ? x : s; first = false; }
        for (int l = 0; l < 32; ++l) if (m >> l & 1u) static_cast<Buf*>(bufs[l])->v = s;
      },
      [](void*, void* const* bufs, unsigned m) {
        bool first = true;
        T s = 0;
        for (int l = 0; l < 32; ++l)
          if (m >> l & 1u) { const T x = static_cast<Buf*>(bufs[l])->v; s = first || x > s ? x : s; first = false; }
        for (int l = 0; l < 32; ++l) if (m >> l & 1u) static_cast<Buf*>(bufs[l])->v = s;
      }};
  static const char* names[3] = {"__reduce_add_sync", "__reduce_min_sync", "__reduce_max_sync"};
  warp_collective(site, names[op], mask, &b, fns[op], nullptr);
  return b.v;
}
}  // namespace lp_emu

// ---- atomics ------------------------------------------------------------------------------------------
#define LP_EMU_ATOMIC(name, expr)                                                               \
  template <typename T, typename V>                                                             \
  inline T name(T* p, V val) {                                                                  \
    const T v = static_cast<T>(val);                                                            \
    return ::lp_emu::atomic_update(p, [v](T old) -> T { return expr; });                        \
  }
LP_EMU_ATOMIC(atomicAdd, static_cast<T>(old + v))
LP_EMU_ATOMIC(atomicSub, static_cast<T>(old - v))
LP_EMU_ATOMIC(atomicExch, v)
LP_EMU_ATOMIC(atomicMin, v < old ? v : old)
LP_EMU_ATOMIC(atomicMax, v > old ? v : old)
LP_EMU_ATOMIC(atomicAnd, static_cast<T>(old & v))
LP_EMU_ATOMIC(atomicOr, static_cast<T>(old | v))
LP_EMU_ATOMIC(atomicXor, static_cast<T>(old ^ v))
#undef LP_EMU_ATOMIC
inline unsigned atomicInc(unsigned* p, unsigned limit) {
  return ::lp_emu::atomic_update(p, [limit](unsigned old) { return old >= limit ? 0u : old + 1u; });
}
inline unsigned atomicDec(unsigned* p, unsigned limit) {
  return ::lp_emu::atomic_update(p, [limit](unsigned old) { return (old == 0u || old > limit) ? limit : old - 1u; });
}
template <typename T, typename V>
inline T atomicCAS(T* p, V compare, V val) {
  T expected = static_cast<T>(compare);
  __atomic_compare_exchange_n(p, &expected, static_cast<T>(val), false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return expected;
}
// The _block and _system scoped forms behave alike here.
#define atomicAdd_block atomicAdd
#define atomicAdd_system atomicAdd

// ---- math: what device code calls unqualified -------------------------------------------------------
using std::abs;
using std::isfinite;
using std::isinf;
using std::isnan;
using std::signbit;
using std::sqrt;
using std::exp;
using std::log;
using std::fabs;
using std::floor;
using std::ceil;
// CUDA's integer and floating min/max overloads (host and device).
template <typename A, typename B,
          typename = typename std::enable_if<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value>::type>
inline typename std::common_type<A, B>::type min(A a, B b) {
  using C = typename std::common_type<A, B>::type;
  return static_cast<C>(b) < static_cast<C>(a) ? static_cast<C>(b) : static_cast<C>(a);
}
template <typename A, typename B,
          typename = typename std::enable_if<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value>::type>
inline typename std::common_type<A, B>::type max(A a, B b) {
  using C = typename std::common_type<A, B>::type;
  return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(b) : static_cast<C>(a);
}
// The _rn intrinsics are IEEE round-to-nearest operations; the emulator is compiled with
// -ffp-contract=off, so a * b is one rounded product here too.
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
// Approximate on a GPU (a few ulp); exact here.
inline float rsqrtf(float a) { return 1.0f / std::sqrt(a); }
inline double rsqrt(double a) { return 1.0 / std::sqrt(a); }
inline float __expf(float a) { return std::exp(a); }
inline float __logf(float a) { return std::log(a); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float a) { return a < 0.0f ? 0.0f : (a > 1.0f ? 1.0f : (a == a ? a : 0.0f)); }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline unsigned __float_as_uint(float f) { unsigned i; std::memcpy(&i, &f, 4); return i; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __uint_as_float(unsigned i) { float f; std::memcpy(&f, &i, 4); return f; }
inline long long __double_as_longlong(double d) { long long i; std::memcpy(&i, &d, 8); return i; }
inline double __longlong_as_double(long long i) { double d; std::memcpy(&d, &i, 8); return d; }
inline int __float2int_rn(float f) { return static_cast<int>(std::nearbyint(f)); }
inline int __float2int_rz(float f) { return static_cast<int>(f); }
inline unsigned __float2uint_rn(float f) { return static_cast<unsigned>(std::nearbyint(f)); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
  x = ((x >> 8) & 0x00ff00ffu) | ((x & 0x00ff00ffu) << 8);
  return (x >> 16) | (x << 16);
}
// CUDA's __byte_perm: 3 selector bits per byte (no sign replication; that is prmt's msb mode).
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t src = (static_cast<uint64_t>(y) << 32) | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= static_cast<unsigned>((src >> (8 * ((s >> (4 * i)) & 7u))) & 0xffu) << (8 * i);
  return r;
}
inline unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned shift) {
  const uint64_t v = (static_cast<uint64_t>(hi) << 32) | lo;
  return static_cast<unsigned>((v << (shift & 31u)) >> 32);
}
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned shift) {
  const uint64_t v = (static_cast<uint64_t>(hi) << 32) | lo;
  return static_cast<unsigned>(v >> (shift & 31u));
}
inline unsigned __umulhi(unsigned a, unsigned b) { return static_cast<unsigned>((static_cast<uint64_t>(a) * b) >> 32); }
inline int __mul24(int a, int b) { return ((a << 8) >> 8) * ((b << 8) >> 8); }
template <typename T> inline T __ldg(const T* p) { return *p; }
template <typename T> inline T __ldcs(const T* p) { return *p; }
template <typename T> inline T __ldcg(const T* p) { return *p; }
template <typename T> inline void __stcs(T* p, T v) { *p = v; }
template <typename T> inline void __stcg(T* p, T v) { *p = v; }
// Shared-window address of a pointer (what cvta.to.shared gives): the emulator has one flat
// address space, so the pointer itself, truncated as the real intrinsic's users expect.
inline size_t __cvta_generic_to_shared(const void* p) { return reinterpret_cast<size_t>(p); }

// ---- runtime API (host side of a standalone emulated program) ---------------------------------------
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t e);
const char* cudaGetErrorName(cudaError_t e);
cudaError_t cudaMalloc(void** p, size_t bytes);
template <typename T> inline cudaError_t cudaMalloc(T** p, size_t bytes) {
  return cudaMalloc(reinterpret_cast<void**>(p), bytes);
}
cudaError_t cudaFree(void* p);
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t s = nullptr);
cudaError_t cudaMemset(void* p, int value, size_t bytes);
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t s = nullptr);
cudaError_t cudaDeviceSynchronize();
cudaError_t cudaStreamSynchronize(cudaStream_t s);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaGetDeviceCount(int* count);  // one emulated device
cudaError_t cudaSetDevice(int device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaRuntimeGetVersion(int* version);
cudaError_t lp_emu_func_set_attribute(const void* kernel, cudaFuncAttribute attr, int value);
template <typename F>
inline cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  return lp_emu_func_set_attribute(reinterpret_cast<const void*>(kernel), attr, value);
}

#include "lp_cuda_emu_fp16.h"
