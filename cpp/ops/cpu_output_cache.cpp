// See cpu_output_cache.h.
#include "cpu_output_cache.h"

#include <sys/mman.h>

#include <cstdlib>
#include <mutex>
#include <new>
#include <utility>
#include <vector>

namespace layerpress {
namespace {

constexpr size_t kHugePage = size_t{2} << 20;
constexpr size_t kMinCachedBytes = size_t{8} << 20;

struct OutputCache {
  std::mutex mu;
  std::vector<std::pair<size_t, void*>> free_blocks;  // (bytes, block)
  size_t held = 0;
  size_t cap = 0;
};

// Never destroyed: tensors can outlive static destruction at process exit.
OutputCache& output_cache() {
  static OutputCache* cache = [] {
    auto* c = new OutputCache();
    size_t mb = 256;
    if (const char* e = std::getenv("LAYERPRESS_CPU_OUTPUT_CACHE_MB")) {
      char* end = nullptr;
      const long v = std::strtol(e, &end, 10);
      if (end != e && v >= 0) mb = static_cast<size_t>(v);
    }
    c->cap = mb << 20;
    return c;
  }();
  return *cache;
}

void* take_block(size_t bytes) {
  OutputCache& c = output_cache();
  std::lock_guard<std::mutex> lock(c.mu);
  for (size_t i = 0; i < c.free_blocks.size(); ++i) {
    if (c.free_blocks[i].first == bytes) {
      void* p = c.free_blocks[i].second;
      c.free_blocks[i] = c.free_blocks.back();
      c.free_blocks.pop_back();
      c.held -= bytes;
      return p;
    }
  }
  return nullptr;
}

void give_back_block(void* p, size_t bytes) {
  OutputCache& c = output_cache();
  {
    std::lock_guard<std::mutex> lock(c.mu);
    if (c.held + bytes <= c.cap) {
      c.free_blocks.emplace_back(bytes, p);
      c.held += bytes;
      return;
    }
  }
  std::free(p);
}

void* new_block(size_t bytes) {
  void* p = std::aligned_alloc(kHugePage, bytes);
  if (p == nullptr) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
  (void)madvise(p, bytes, MADV_HUGEPAGE);  // fewer faults on first touch where THP is possible
#endif
  return p;
}

}  // namespace

at::Tensor empty_cpu_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  const size_t bytes = static_cast<size_t>(numel) * c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  if (bytes < kMinCachedBytes || output_cache().cap == 0) return at::empty(sizes, options);
  const size_t block = (bytes + kHugePage - 1) / kHugePage * kHugePage;
  void* p = take_block(block);
  if (p == nullptr) p = new_block(block);
  return at::from_blob(p, sizes, [block](void* q) { give_back_block(q, block); },
                       options.device(at::kCPU));
}

size_t cpu_output_cache_held_bytes() {
  OutputCache& c = output_cache();
  std::lock_guard<std::mutex> lock(c.mu);
  return c.held;
}

}  // namespace layerpress
