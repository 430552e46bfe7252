// bench_util.h: small helpers shared by the benchmarks.
#ifndef ZEROQ_BENCH_BENCH_UTIL_H_
#define ZEROQ_BENCH_BENCH_UTIL_H_

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"

namespace zeroq::bench {

inline double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  if (n == 0) return 0;
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// "3,32,32" -> {3, 32, 32}; nullopt unless every part is a positive integer.
inline std::optional<std::vector<int64_t>> ParseShape(const std::string& text) {
  std::vector<int64_t> shape;
  for (absl::string_view p : absl::StrSplit(text, ',')) {
    int64_t v = 0;
    if (!absl::SimpleAtoi(p, &v) || v <= 0) return std::nullopt;
    shape.push_back(v);
  }
  return shape;
}

}  // namespace zeroq::bench

#endif  // ZEROQ_BENCH_BENCH_UTIL_H_
