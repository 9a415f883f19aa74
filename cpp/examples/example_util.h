// Small helpers shared by the standalone C++ examples (dispatcher_caller, aoti_runner).
#pragma once

#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

namespace lp_example {

// <dir of this executable>/../_C.abi3.so: the installed layout (layerpress/bin/<program>).
inline std::string default_library() {
  char buf[4096];
  const ssize_t n = readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  if (n <= 0) return "_C.abi3.so";
  std::string exe(buf, static_cast<size_t>(n));
  const std::string dir = exe.substr(0, exe.find_last_of('/'));
  return dir + "/../_C.abi3.so";
}

// "1,32,64" -> {1, 32, 64}
inline std::vector<int64_t> parse_list(const char* text) {
  std::vector<int64_t> out;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) out.push_back(std::atoll(item.c_str()));
  return out;
}

}  // namespace lp_example
