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

void release_block(void* p, void* ctx) { give_back_block(p, reinterpret_cast<size_t>(ctx)); }

size_t element_size(ScalarType t) {
  switch (t) {
    case ScalarType::Double: case ScalarType::Long: return 8;
    case ScalarType::Float: case ScalarType::Int: return 4;
    case ScalarType::BFloat16: case ScalarType::Half: return 2;
    default: return 1;
  }
}

}  // namespace

// torch >= 2.11 (torch/csrc/stable/c/shim.h); null when the running torch lacks it.
extern "C" __attribute__((weak)) AOTITorchError torch_from_blob(
    void* data, int64_t ndim, const int64_t* sizes_ptr, const int64_t* strides_ptr, int64_t storage_offset,
    int32_t dtype, int32_t device_type, int32_t device_index, AtenTensorHandle* ret, int32_t layout,
    const uint8_t* opaque_metadata, int64_t opaque_metadata_size, void (*deleter)(void* data, void* ctx),
    void* deleter_ctx);

Tensor empty_cpu_output(const Shape& sizes, ScalarType dtype) {
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  const size_t bytes = static_cast<size_t>(numel) * element_size(dtype);
  const torch::stable::Device cpu(torch::headeronly::DeviceType::CPU);
  if (bytes < kMinCachedBytes || output_cache().cap == 0 || torch_from_blob == nullptr)
    return torch::stable::empty(sizes, dtype, std::nullopt, cpu);
  const size_t block = (bytes + kHugePage - 1) / kHugePage * kHugePage;
  void* p = take_block(block);
  if (p == nullptr) p = new_block(block);
  Shape strides(sizes.size());
  int64_t stride = 1;
  for (size_t i = sizes.size(); i-- > 0;) {
    strides[i] = stride;
    stride *= sizes[i];
  }
  AtenTensorHandle handle = nullptr;
  const AOTITorchError err = torch_from_blob(
      p, static_cast<int64_t>(sizes.size()), sizes.data(), strides.data(), 0, from_ivalue<int32_t>(to_ivalue(dtype)),
      from_ivalue<int32_t>(to_ivalue(torch::headeronly::DeviceType::CPU)), -1, &handle,
      from_ivalue<int32_t>(to_ivalue(torch::headeronly::Layout::Strided)), nullptr, 0, &release_block,
      reinterpret_cast<void*>(block));
  if (err != AOTI_TORCH_SUCCESS) {
    give_back_block(p, block);
    return torch::stable::empty(sizes, dtype, std::nullopt, cpu);
  }
  return Tensor(handle);
}

size_t cpu_output_cache_held_bytes() {
  OutputCache& c = output_cache();
  std::lock_guard<std::mutex> lock(c.mu);
  return c.held;
}

}  // namespace layerpress
