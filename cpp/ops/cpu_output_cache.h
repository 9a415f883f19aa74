// Large CPU outputs from a small cache of blocks that earlier outputs gave back.
//
// Why: glibc serves allocations of 32 MB and more with a fresh mmap, and the kernel's first write
// then faults in every page. On virtual machines a 4 KB fault costs microseconds, so a
// 4096 x 2048 fp32 norm output (32 MB, 8192 faults) took 20-40 ms to fault in against a 4 ms
// kernel; transparent huge pages help only when the kernel can find free 2 MB pages, which
// varied from run to run. Reusing the memory of outputs that have been freed removes the faults
// on every call after the first (the common case: a model calls its norms with the same shapes
// again and again).
//
// Blocks are 2 MB aligned (and asked for as huge pages); a freed output's block goes back to the
// cache while the cache holds less than LAYERPRESS_CPU_OUTPUT_CACHE_MB (default 256; 0 turns
// the cache off and every output comes from torch's allocator), else it is freed.
//
// The cache hands out blocks through the stable shim torch_from_blob (a tensor with our deleter),
// which exists from torch 2.11 on. The library targets 2.10, so that symbol is looked up weakly:
// under torch 2.10 the cache is off and outputs come from torch's allocator.
#pragma once
#include "launch_utils.h"

namespace layerpress {

// A new uninitialised contiguous CPU tensor. Small outputs come from torch's allocator; outputs
// of at least 8 MB from the cache.
Tensor empty_cpu_output(const Shape& sizes, ScalarType dtype);

// Bytes the cache holds now (blocks not in use), for tests.
size_t cpu_output_cache_held_bytes();

}  // namespace layerpress
