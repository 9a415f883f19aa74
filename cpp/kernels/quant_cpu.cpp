// Format ops on the CPU: quantise, pack, unpack, dequantise, repack. Portable C++ (these run once
// per weight, not per token), parallel over rows or columns through the caller's ParallelFor.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>

#include "layerpress/cpu_kernels.h"

namespace layerpress {

float f16_to_f32(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);  // inf / nan
  } else if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: renormalise
      int e = -1;
      do { man <<= 1; ++e; } while (!(man & 0x400u));
      u = sign | ((112u - e) << 23) | ((man & 0x3ffu) << 13);
    }
  } else {
    u = sign | ((exp + 112u) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t f32_to_f16(float f) {  // round to nearest even, overflow to inf, like torch
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  u &= 0x7fffffffu;
  if (u > 0x7f800000u) return sign | 0x7e00u;             // nan
  if (u >= 0x477ff000u) return sign | 0x7c00u;            // >= 65520 rounds to inf
  if (u < 0x38800000u) {                                  // result is subnormal or zero
    if (u < 0x33000000u) return sign;                     // < 2^-25 rounds to zero
    const uint32_t e = u >> 23, man = (u & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - e;                       // 14..24
    uint32_t r = man >> shift;
    const uint32_t rem = man & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return sign | static_cast<uint16_t>(r);
  }
  uint32_t r = ((u >> 13) - (112u << 10));
  const uint32_t rem = u & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;
  return sign | static_cast<uint16_t>(r);
}

ParallelFor serial_for() {
  return [](int64_t n, int64_t, const std::function<void(int64_t, int64_t)>& body) {
    if (n > 0) body(0, n);
  };
}

namespace {

// Stores the scale rounded to its storage type and returns the value the codes must use.
// A zero (or underflowed) scale is stored as 1 so that dequantisation stays finite.
float store_rounded_scale(void* scales, int64_t i, FloatType t, float s) {
  store_float(scales, i, t, s);
  float stored = load_float(scales, i, t);
  if (stored == 0.0f) {
    store_float(scales, i, t, 1.0f);
    stored = 1.0f;
  }
  return stored;
}

// Quantises one group: `count` weights at w[base + j*stride]; the scale/zero index is sz.
QuantStatus quantize_group(const void* w, FloatType wt, int64_t base, int64_t stride, int64_t count,
                    const QuantParams& p, uint8_t* codes, int64_t code_base, int64_t code_stride,
                    void* scales, uint8_t* zeros, int64_t sz, bool given) {
  float lo = 0.0f, hi = 0.0f, amax = 0.0f;
  bool finite = true;
  for (int64_t j = 0; j < count; ++j) {
    const float v = load_float(w, base + j * stride, wt);
    if (!std::isfinite(v)) finite = false;
    lo = std::min(lo, v);
    hi = std::max(hi, v);
    amax = std::max(amax, std::fabs(v));
  }
  if (!finite) return QuantStatus::kNonFiniteWeight;
  const int32_t qmax = p.qmax();
  float s;
  int32_t z;
  if (given) {
    s = load_float(scales, sz, p.scale_type);
    z = p.symmetric ? p.sym_zero() : zeros[sz];
  } else if (p.symmetric) {
    s = store_rounded_scale(scales, sz, p.scale_type, amax / static_cast<float>(p.sym_zero() - 1 > 0 ? p.sym_zero() - 1 : 1));
    z = p.sym_zero();
  } else {
    s = store_rounded_scale(scales, sz, p.scale_type, (hi - lo) / static_cast<float>(qmax));
    z = static_cast<int32_t>(std::min(std::max(std::nearbyint(-lo / s), 0.0f), static_cast<float>(qmax)));
    zeros[sz] = static_cast<uint8_t>(z);
  }
  for (int64_t j = 0; j < count; ++j) {
    const float v = load_float(w, base + j * stride, wt);
    float q = std::nearbyint(v / s) + static_cast<float>(z);
    q = std::min(std::max(q, 0.0f), static_cast<float>(qmax));
    codes[code_base + j * code_stride] = static_cast<uint8_t>(q);
  }
  return std::isfinite(s) ? QuantStatus::kOk : QuantStatus::kScaleOverflow;
}

inline uint32_t extract_code(const int32_t* row, int64_t k, int bits) {
  const int64_t bit = k * bits;
  const uint32_t* u = reinterpret_cast<const uint32_t*>(row);
  const int64_t word = bit >> 5;
  const int sh = static_cast<int>(bit & 31);
  uint64_t v = u[word] >> sh;
  if (sh + bits > 32) v |= static_cast<uint64_t>(u[word + 1]) << (32 - sh);
  return static_cast<uint32_t>(v) & ((1u << bits) - 1u);
}

}  // namespace

QuantStatus quantize_rtn(const void* w, FloatType wt, const QuantParams& p, uint8_t* codes, void* scales,
                         uint8_t* zeros, bool given, const ParallelFor& pf) {
  std::atomic<int> status{0};  // the most severe status seen
  auto note = [&](QuantStatus st) {
    int cur = status.load();
    while (static_cast<int>(st) > cur && !status.compare_exchange_weak(cur, static_cast<int>(st))) {}
  };
  const int64_t G = p.groups_per_line();
  if (p.axis == GroupAxis::kPerOC) {
    pf(p.N, 1, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n)
        for (int64_t g = 0; g < G; ++g)
          note(quantize_group(w, wt, n * p.K + g * p.group, 1, p.group, p, codes, n * p.K + g * p.group, 1,
                              scales, zeros, n * G + g, given));
    });
  } else {
    pf(p.K, 16, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k)
        for (int64_t g = 0; g < G; ++g)
          note(quantize_group(w, wt, g * p.group * p.K + k, p.K, p.group, p, codes, g * p.group * p.K + k,
                              p.K, scales, zeros, k * G + g, given));
    });
  }
  return static_cast<QuantStatus>(status.load());
}

void pack_codes(const uint8_t* codes, int64_t rows, int64_t K, int bits, int32_t* packed,
                const ParallelFor& pf) {
  const int64_t wpr = K * bits / 32;
  pf(rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      uint32_t* out = reinterpret_cast<uint32_t*>(packed + r * wpr);
      std::memset(out, 0, wpr * 4);
      const uint8_t* c = codes + r * K;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t bit = k * bits;
        const int sh = static_cast<int>(bit & 31);
        out[bit >> 5] |= static_cast<uint32_t>(c[k]) << sh;
        if (sh + bits > 32) out[(bit >> 5) + 1] |= static_cast<uint32_t>(c[k]) >> (32 - sh);
      }
    }
  });
}

void unpack_codes(const int32_t* packed, int64_t rows, int64_t K, int bits, uint8_t* codes,
                  const ParallelFor& pf) {
  const int64_t wpr = K * bits / 32;
  pf(rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t k = 0; k < K; ++k)
        codes[r * K + k] = static_cast<uint8_t>(extract_code(packed + r * wpr, k, bits));
  });
}

void dequantize(const int32_t* q, const void* s, const uint8_t* z, const QuantParams& p, void* out,
                FloatType ot, const ParallelFor& pf) {
  const int64_t wpr = p.words_per_row(), G = p.groups_per_line();
  pf(p.N, 1, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t k = 0; k < p.K; ++k) {
        const int64_t sz = p.axis == GroupAxis::kPerOC ? n * G + k / p.group : k * G + n / p.group;
        const int32_t zero = p.symmetric ? p.sym_zero() : z[sz];
        const float v = static_cast<float>(static_cast<int32_t>(extract_code(q + n * wpr, k, p.bits)) - zero) *
                        load_float(s, sz, p.scale_type);
        store_float(out, n * p.K + k, ot, v);
      }
  });
}

int64_t bitplane_qweight_numel(const QuantParams& p) {
  return p.row_tiles() * (p.K / 32) * p.bits * kTileRows;
}
int64_t bitplane_scales_numel(const QuantParams& p) {
  return p.axis == GroupAxis::kPerOC ? p.row_tiles() * (p.K / p.group) * kTileRows
                                     : (p.N / p.group) * p.K;
}

namespace {
// Index of scale (n-tile t, group g, lane l) / (n-group gn, column k) in the canonical layout.
template <typename F>
void for_each_scale_pair(const QuantParams& p, F&& f) {  // f(native_index, canonical_index or -1)
  const int64_t G = p.groups_per_line();
  if (p.axis == GroupAxis::kPerOC) {
    for (int64_t t = 0; t < p.row_tiles(); ++t)
      for (int64_t g = 0; g < G; ++g)
        for (int64_t l = 0; l < kTileRows; ++l) {
          const int64_t n = t * kTileRows + l;
          f((t * G + g) * kTileRows + l, n < p.N ? n * G + g : -1);
        }
  } else {
    for (int64_t gn = 0; gn < G; ++gn)
      for (int64_t k = 0; k < p.K; ++k) f(gn * p.K + k, k * G + gn);
  }
}
}  // namespace

void repack_canonical_to_bitplane(const int32_t* q, const void* s, const uint8_t* z,
                                  const QuantParams& p, int32_t* qo, void* so, uint8_t* zo,
                                  const ParallelFor& pf) {
  const int64_t KB = p.K / 32, wpr = p.words_per_row();
  pf(p.row_tiles(), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      uint32_t* out = reinterpret_cast<uint32_t*>(qo + t * KB * p.bits * kTileRows);
      std::memset(out, 0, KB * p.bits * kTileRows * 4);
      for (int64_t l = 0; l < kTileRows; ++l) {
        const int64_t n = t * kTileRows + l;
        if (n >= p.N) break;
        for (int64_t k = 0; k < p.K; ++k) {
          const uint32_t c = extract_code(q + n * wpr, k, p.bits);
          const int64_t kb = k >> 5;
          const int i = static_cast<int>(k & 31);
          for (int b = 0; b < p.bits; ++b)
            out[(kb * p.bits + b) * kTileRows + l] |= ((c >> b) & 1u) << i;
        }
      }
    }
  });
  const size_t es = float_type_size(p.scale_type);
  for_each_scale_pair(p, [&](int64_t ni, int64_t ci) {
    if (ci < 0) {
      std::memset(static_cast<char*>(so) + ni * es, 0, es);
      if (zo) zo[ni] = 0;
    } else {
      std::memcpy(static_cast<char*>(so) + ni * es, static_cast<const char*>(s) + ci * es, es);
      if (zo) zo[ni] = z[ci];
    }
  });
}

void repack_bitplane_to_canonical(const int32_t* q, const void* s, const uint8_t* z,
                                  const QuantParams& p, int32_t* qo, void* so, uint8_t* zo,
                                  const ParallelFor& pf) {
  const int64_t KB = p.K / 32, wpr = p.words_per_row();
  pf(p.N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      uint32_t* out = reinterpret_cast<uint32_t*>(qo + n * wpr);
      std::memset(out, 0, wpr * 4);
      const int64_t t = n / kTileRows, l = n % kTileRows;
      const uint32_t* tile = reinterpret_cast<const uint32_t*>(q + t * KB * p.bits * kTileRows);
      for (int64_t k = 0; k < p.K; ++k) {
        const int64_t kb = k >> 5;
        const int i = static_cast<int>(k & 31);
        uint32_t c = 0;
        for (int b = 0; b < p.bits; ++b) c |= ((tile[(kb * p.bits + b) * kTileRows + l] >> i) & 1u) << b;
        const int64_t bit = k * p.bits;
        const int sh = static_cast<int>(bit & 31);
        out[bit >> 5] |= c << sh;
        if (sh + p.bits > 32) out[(bit >> 5) + 1] |= c >> (32 - sh);
      }
    }
  });
  const size_t es = float_type_size(p.scale_type);
  for_each_scale_pair(p, [&](int64_t ni, int64_t ci) {
    if (ci < 0) return;
    std::memcpy(static_cast<char*>(so) + ci * es, static_cast<const char*>(s) + ni * es, es);
    if (zo) zo[ci] = z[ni];
  });
}

}  // namespace layerpress
