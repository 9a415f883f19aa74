// The CUDA tensor-core layout (Layout::kCudaMma, cuda_mma_layout.h) on the CPU: repack from and
// to the canonical layout with the same per-lane functions the CUDA repack kernels call.
#include "layerpress/cuda_mma_layout.h"

#include <cstring>

#include "layerpress/cpu_kernels.h"

namespace layerpress {

namespace {
void copy_scales(const void* s, const uint8_t* z, const QuantParams& p, void* so, uint8_t* zo, bool to_layout) {
  namespace ml = mma_layout;
  const bool per_oc = p.axis == GroupAxis::kPerOC;
  const size_t es = float_type_size(p.scale_type);
  const char* src = static_cast<const char*>(s);
  char* dst = static_cast<char*>(so);
  if (to_layout) {
    const int64_t n = ml::scale_entries(per_oc, p.N, p.K, p.group);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t c = ml::scale_source(per_oc, p.N, p.K, p.group, i);
      if (c < 0) {
        std::memset(dst + i * es, 0, es);
        if (zo) zo[i] = 0;
      } else {
        std::memcpy(dst + i * es, src + c * es, es);
        if (zo) zo[i] = z[c];
      }
    }
  } else {
    const int64_t n = p.axis == GroupAxis::kPerOC ? p.N * (p.K / p.group) : p.K * (p.N / p.group);
    for (int64_t c = 0; c < n; ++c) {
      const int64_t i = ml::scale_target(per_oc, p.N, p.K, p.group, c);
      std::memcpy(dst + c * es, src + i * es, es);
      if (zo) zo[c] = z[i];
    }
  }
}
}  // namespace

void repack_canonical_to_cuda_mma(const int32_t* q, const void* s, const uint8_t* z, const QuantParams& p,
                                  int32_t* qo, void* so, uint8_t* zo, const ParallelFor& pf) {
  namespace ml = mma_layout;
  const int64_t kt_count = p.K / ml::kTileK;
  const auto* canonical = reinterpret_cast<const uint32_t*>(q);
  pf(ml::n_tiles(p.N), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t nt = t0; nt < t1; ++nt)
      for (int64_t kt = 0; kt < kt_count; ++kt) {
        uint32_t* tile = reinterpret_cast<uint32_t*>(qo) + (nt * kt_count + kt) * ml::words_per_tile(p.bits);
        for (int lane = 0; lane < 32; ++lane) ml::pack_lane(canonical, p.N, p.K, p.bits, nt, kt, lane, tile);
      }
  });
  copy_scales(s, z, p, so, zo, true);
}

void repack_cuda_mma_to_canonical(const int32_t* q, const void* s, const uint8_t* z, const QuantParams& p,
                                  int32_t* qo, void* so, uint8_t* zo, const ParallelFor& pf) {
  namespace ml = mma_layout;
  const auto* mma = reinterpret_cast<const uint32_t*>(q);
  pf(p.N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t kb = 0; kb < p.K / 32; ++kb) ml::unpack_block(mma, p.K, p.bits, n, kb, reinterpret_cast<uint32_t*>(qo));
  });
  copy_scales(s, z, p, so, zo, false);
}

}  // namespace layerpress
