// __half / __nv_bfloat16 for the CUDA emulator (see lp_cuda_emu.h): storage types with the
// conversions and arithmetic intrinsics of cuda_fp16.h / cuda_bf16.h. Every conversion rounds to
// nearest even with IEEE subnormals and overflow to infinity, as the hardware's cvt.rn does; a
// NaN becomes the canonical 0x7fff. Arithmetic is done in fp32 (exact for one f16/bf16 add or
// product) or fp64 (fma) and rounded once.
#pragma once
#include <cstdint>
#include <cstring>

namespace lp_emu {
inline uint32_t f32_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float bits_f32(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

inline uint16_t f32_to_bf16_rn(float f) {
  uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fff;
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float bf16_to_f32(uint16_t h) { return bits_f32(static_cast<uint32_t>(h) << 16); }

inline uint16_t f32_to_f16_rn(float f) {
  const uint32_t u = f32_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return 0x7fff;                        // NaN
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (a < 0x38800000u) {                                      // below 2^-14: subnormal or zero
    // value = a_float; subnormal unit 2^-24: q = round(value * 2^24) with ties to even.
    const int e = static_cast<int>(a >> 23);                  // biased exponent (0 for f32 subnormals)
    if (e < 102) return sign;                                 // < 2^-25: rounds to zero
    const uint32_t m = (a & 0x7fffffu) | 0x800000u;           // 24-bit significand
    const int shift = 126 - e;                                // m * 2^(e-150) * 2^24 = m >> (126 - e)
    uint32_t q = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1u))) ++q;
    return static_cast<uint16_t>(sign | q);
  }
  // normal: rebias the exponent (127 -> 15) and round the 23-bit mantissa to 10 bits
  uint32_t h = ((a >> 13) - (112u << 10));
  const uint32_t rem = a & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;    // may carry into the exponent: fine
  return static_cast<uint16_t>(sign | h);
}
inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0) {
    const float v = static_cast<float>(m) * 5.9604644775390625e-8f;  // m * 2^-24, exact
    return sign ? -v : v;
  }
  if (e == 31) return bits_f32(sign | 0x7f800000u | (m << 13));
  return bits_f32(sign | ((e + 112u) << 23) | (m << 13));
}
}  // namespace lp_emu

struct __half_raw { unsigned short x; };
struct __nv_bfloat16_raw { unsigned short x; };

struct __half {
  unsigned short __x;
  __half() = default;
  __half(float f) : __x(lp_emu::f32_to_f16_rn(f)) {}
  __half(__half_raw r) : __x(r.x) {}
  operator float() const { return lp_emu::f16_to_f32(__x); }
  operator __half_raw() const { return __half_raw{__x}; }
};
struct __nv_bfloat16 {
  unsigned short __x;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) : __x(lp_emu::f32_to_bf16_rn(f)) {}
  __nv_bfloat16(__nv_bfloat16_raw r) : __x(r.x) {}
  operator float() const { return lp_emu::bf16_to_f32(__x); }
  operator __nv_bfloat16_raw() const { return __nv_bfloat16_raw{__x}; }
};
struct __half2 { __half x, y; };
struct __nv_bfloat162 { __nv_bfloat16 x, y; };
using half = __half;
using half2 = __half2;
using nv_bfloat16 = __nv_bfloat16;
using nv_bfloat162 = __nv_bfloat162;
static_assert(sizeof(__half) == 2 && sizeof(__half2) == 4 && sizeof(__nv_bfloat162) == 4, "fp16 storage");

inline __half __ushort_as_half(unsigned short u) { __half h; h.__x = u; return h; }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { __nv_bfloat16 h; h.__x = u; return h; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }

inline __half __float2half_rn(float f) { return __ushort_as_half(lp_emu::f32_to_f16_rn(f)); }
inline __half __float2half(float f) { return __float2half_rn(f); }
inline float __half2float(__half h) { return lp_emu::f16_to_f32(h.__x); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __ushort_as_bfloat16(lp_emu::f32_to_bf16_rn(f)); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return lp_emu::bf16_to_f32(h.__x); }

inline __half2 __floats2half2_rn(float a, float b) { return {__float2half_rn(a), __float2half_rn(b)}; }
inline __half2 __float2half2_rn(float a) { return {__float2half_rn(a), __float2half_rn(a)}; }
inline __half2 __halves2half2(__half a, __half b) { return {a, b}; }
inline __half2 __half2half2(__half a) { return {a, a}; }
inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }
inline float __low2float(__half2 h) { return __half2float(h.x); }
inline float __high2float(__half2 h) { return __half2float(h.y); }
inline __half __low2half(__half2 h) { return h.x; }
inline __half __high2half(__half2 h) { return h.y; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__float2bfloat16_rn(a), __float2bfloat16_rn(b)}; }
inline __nv_bfloat162 __float2bfloat162_rn(float a) { return {__float2bfloat16_rn(a), __float2bfloat16_rn(a)}; }
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) { return {a, b}; }
inline __nv_bfloat162 __bfloat162bfloat162(__nv_bfloat16 a) { return {a, a}; }
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return {__bfloat162float(h.x), __bfloat162float(h.y)}; }
inline float __low2float(__nv_bfloat162 h) { return __bfloat162float(h.x); }
inline float __high2float(__nv_bfloat162 h) { return __bfloat162float(h.y); }

// One rounding per operation, as the hardware's f16/bf16 add, mul and fma do.
#define LP_EMU_HALF_OPS(T, TO, FROM, T2)                                                            \
  inline T __hadd(T a, T b) { return FROM(TO(a) + TO(b)); }                                     \
  inline T __hsub(T a, T b) { return FROM(TO(a) - TO(b)); }                                     \
  inline T __hmul(T a, T b) { return FROM(TO(a) * TO(b)); }                                     \
  inline T __hneg(T a) { T r = a; r.__x ^= 0x8000u; return r; }                                 \
  inline T __hfma(T a, T b, T c) {                                                              \
    return FROM(static_cast<float>(static_cast<double>(TO(a)) * TO(b) + TO(c)));                \
  }                                                                                             \
  inline T2 __hadd2(T2 a, T2 b) { return {__hadd(a.x, b.x), __hadd(a.y, b.y)}; }                \
  inline T2 __hsub2(T2 a, T2 b) { return {__hsub(a.x, b.x), __hsub(a.y, b.y)}; }                \
  inline T2 __hmul2(T2 a, T2 b) { return {__hmul(a.x, b.x), __hmul(a.y, b.y)}; }                \
  inline T2 __hfma2(T2 a, T2 b, T2 c) { return {__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y)}; } \
  inline bool __heq(T a, T b) { return TO(a) == TO(b); }                                        \
  inline bool __hlt(T a, T b) { return TO(a) < TO(b); }                                         \
  inline bool __hgt(T a, T b) { return TO(a) > TO(b); }
LP_EMU_HALF_OPS(__half, __half2float, __float2half_rn, __half2)
LP_EMU_HALF_OPS(__nv_bfloat16, __bfloat162float, __float2bfloat16_rn, __nv_bfloat162)
#undef LP_EMU_HALF_OPS
