// Command-line helpers shared by the C++ benchmark binaries (bench_gemm_cpu, bench_gemm_cuda).
#pragma once
#include <cstdint>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

namespace layerpress_bench {

// "a,b,c" -> {"a", "b", "c"}
inline std::vector<std::string> split_list(const char* s) {
  std::vector<std::string> v;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) v.push_back(item);
  return v;
}

// "1,16,128" -> {1, 16, 128}
inline std::vector<int64_t> parse_list(const char* s) {
  std::vector<int64_t> v;
  for (const std::string& item : split_list(s)) v.push_back(std::atoll(item.c_str()));
  return v;
}

}  // namespace layerpress_bench
