// WTA-CRS helpers shared by the CPU kernels and the CUDA kernels (host and device): the
// counter-based uniform draw and the residual search. Torch-free, header-only.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define LP_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LP_HOST_DEVICE inline
#endif

namespace layerpress {

// splitmix64 finaliser: a bijective 64-bit mix.
LP_HOST_DEVICE uint64_t wtacrs_mix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Uniform double in [0, 1) for draw j of a selection seeded with `seed` (53 random bits).
LP_HOST_DEVICE double wtacrs_uniform(uint64_t seed, int64_t j) {
  const uint64_t h = wtacrs_mix64(wtacrs_mix64(seed) ^ (static_cast<uint64_t>(j) * 0xD1B54A32D192ED03ull));
  return static_cast<double>(h >> 11) * (1.0 / 9007199254740992.0);
}

// One draw of the sampled part: given the descending weights `sorted`, their inclusive prefix
// sums `cum` (length M), c winners and the uniform u, returns the sorted position r >= c with
// cum[r] > cum[c-1] + u·(cum[M-1] − cum[c-1]) (the inverse CDF of the residual distribution),
// and its scale (1 − P_C)/(s·p_r) = (T − T_C)/(s·w_r); scale 0 when no residual mass is left.
LP_HOST_DEVICE void wtacrs_draw(const double* sorted, const double* cum, int64_t M, int64_t c,
                                int64_t s, double u, int64_t* pos, float* scale) {
  const double before = c > 0 ? cum[c - 1] : 0.0;
  const double rest = cum[M - 1] - before;
  const double target = before + u * rest;
  int64_t lo = c, hi = M - 1;  // first r in [c, M-1] with cum[r] > target (M-1 if none)
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (cum[mid] > target) hi = mid; else lo = mid + 1;
  }
  while (lo > c && !(sorted[lo] > 0.0)) --lo;  // rounding pushed the target past the last weight
  *pos = lo;
  const double w = sorted[lo];
  *scale = (rest > 0.0 && w > 0.0) ? static_cast<float>(rest / (static_cast<double>(s) * w)) : 0.0f;
}

}  // namespace layerpress
