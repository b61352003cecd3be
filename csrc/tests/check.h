// A tiny test harness for the C++ kernel tests: CHECK macros that print file:line and count
// failures, random inputs from a fixed seed, NaN-filled outputs, and norm-wise comparisons.
// Each test executable ends with `return mk_test::report("name");` which prints
// "N passed, M failed" and returns non-zero when anything failed.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

namespace mk_test {

// float32 ↔ bfloat16 bit patterns on the host, like __float2bfloat16_rn (round to nearest even;
// a NaN stays a quiet NaN) and __bfloat162float: shared by the emulation layer
// (cuda_emulation.h) and the tile-math tests.
inline uint16_t bfloat16_bits_rn(float v) {
  uint32_t b;
  std::memcpy(&b, &v, sizeof(b));
  if ((b & 0x7fffffffu) > 0x7f800000u) return uint16_t((b >> 16) | 0x40u);  // quiet NaN
  return uint16_t((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}
inline float bfloat16_bits_to_float(uint16_t h) {
  const uint32_t b = uint32_t(h) << 16;
  float v;
  std::memcpy(&v, &b, sizeof(v));
  return v;
}

// The mse row naively in double: expected_e[j] = (z[j] − y[j]) / n, returns Σ_j ½ (z[j] − y[j])².
template <typename Z, typename Y>
double naive_mse_row(const Z& z, const Y& y, int64_t d_out, double n,
                     std::vector<double>& expected_e) {
  double half_sq = 0.0;
  expected_e.assign(static_cast<size_t>(d_out), 0.0);
  for (int64_t j = 0; j < d_out; ++j) {
    const double diff = double(z[j]) - double(y[j]);
    half_sq += 0.5 * diff * diff;
    expected_e[j] = diff / n;
  }
  return half_sq;
}

inline int& passed_count() {
  static int count = 0;
  return count;
}
inline int& failed_count() {
  static int count = 0;
  return count;
}

// The case being checked, printed with every failure.
inline std::string& current_context() {
  static std::string context;
  return context;
}

inline void record(bool ok, const char* file, int line, const std::string& what) {
  if (ok) {
    ++passed_count();
    return;
  }
  ++failed_count();
  std::fprintf(stderr, "%s:%d: CHECK failed: %s", file, line, what.c_str());
  if (!current_context().empty()) std::fprintf(stderr, "  [in %s]", current_context().c_str());
  std::fprintf(stderr, "\n");
}

inline int report(const char* name) {
  std::printf("%s: %d passed, %d failed\n", name, passed_count(), failed_count());
  return failed_count() == 0 ? 0 : 1;
}

inline std::string fmt(const char* format, double a, double b, double c = 0.0) {
  char buffer[256];
  std::snprintf(buffer, sizeof(buffer), format, a, b, c);
  return buffer;
}

// ---- inputs -----------------------------------------------------------------------------------

inline std::mt19937& rng() {
  static std::mt19937 engine(20240607u);
  return engine;
}

template <typename T>
std::vector<T> randn(size_t size, double scale = 1.0) {
  std::normal_distribution<double> normal(0.0, scale);
  std::vector<T> out(size);
  for (auto& v : out) v = static_cast<T>(normal(rng()));
  return out;
}

template <typename T>
std::vector<T> uniform(size_t size, double low, double high) {
  std::uniform_real_distribution<double> dist(low, high);
  std::vector<T> out(size);
  for (auto& v : out) v = static_cast<T>(dist(rng()));
  return out;
}

inline std::vector<int64_t> randint(size_t size, int64_t high) {
  std::uniform_int_distribution<int64_t> dist(0, high - 1);
  std::vector<int64_t> out(size);
  for (auto& v : out) v = dist(rng());
  return out;
}

template <typename T>
T nan_value() {
  return std::numeric_limits<T>::quiet_NaN();
}

// An output buffer of `size` elements filled with NaN, followed by guard elements holding a
// sentinel: a kernel that leaves an element unwritten leaves a NaN; one that writes past the end
// changes a guard.
constexpr int64_t kGuard = 8;
constexpr double kSentinel = 1234.5;

template <typename T>
struct OutBuffer {
  std::vector<T> storage;
  int64_t size = 0;
  explicit OutBuffer(int64_t n = 0) { reset(n); }
  void reset(int64_t n) {
    size = n;
    storage.assign(static_cast<size_t>(n + kGuard), nan_value<T>());
    for (int64_t i = n; i < n + kGuard; ++i) storage[i] = static_cast<T>(kSentinel);
  }
  T* data() { return storage.data(); }
  const T* data() const { return storage.data(); }
  T& operator[](int64_t i) { return storage[i]; }
  const T& operator[](int64_t i) const { return storage[i]; }
  std::vector<T> values() const { return std::vector<T>(storage.begin(), storage.begin() + size); }
  bool all_finite() const {
    for (int64_t i = 0; i < size; ++i)
      if (!std::isfinite(static_cast<double>(storage[i]))) return false;
    return true;
  }
  bool guards_intact() const {
    for (int64_t i = size; i < size + kGuard; ++i)
      if (storage[i] != static_cast<T>(kSentinel)) return false;
    return true;
  }
};

// ---- comparisons --------------------------------------------------------------------------------

// ‖a − b‖ / ‖b‖ (‖a − b‖ when b is zero); infinite if sizes differ or anything is not finite.
template <typename A, typename B>
double rel_error(const std::vector<A>& a, const std::vector<B>& b) {
  if (a.size() != b.size()) return std::numeric_limits<double>::infinity();
  double diff = 0.0, norm = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double x = static_cast<double>(a[i]), y = static_cast<double>(b[i]);
    if (!std::isfinite(x) || !std::isfinite(y)) return std::numeric_limits<double>::infinity();
    diff += (x - y) * (x - y);
    norm += y * y;
  }
  return norm > 0.0 ? std::sqrt(diff / norm) : std::sqrt(diff);
}

template <typename T>
double max_abs(const std::vector<T>& a) {
  double out = 0.0;
  for (const auto& v : a) out = std::fmax(out, std::fabs(static_cast<double>(v)));
  return out;
}

}  // namespace mk_test

#define CHECK(cond) ::mk_test::record(static_cast<bool>(cond), __FILE__, __LINE__, #cond)

// A boolean with a formatted explanation printed on failure.
#define CHECK_MSG(cond, message) \
  ::mk_test::record(static_cast<bool>(cond), __FILE__, __LINE__, std::string(#cond) + ": " + (message))

// Scalars: |a − b| ≤ atol + rtol · max(|a|, |b|).
#define CHECK_NEAR(a, b, rtol, atol)                                                          \
  do {                                                                                        \
    const double mk_a_ = static_cast<double>(a), mk_b_ = static_cast<double>(b);              \
    const double mk_tol_ = (atol) + (rtol) * std::fmax(std::fabs(mk_a_), std::fabs(mk_b_));   \
    ::mk_test::record(std::fabs(mk_a_ - mk_b_) <= mk_tol_, __FILE__, __LINE__,                \
                      std::string(#a " ~ " #b) +                                              \
                          ::mk_test::fmt(": %.17g vs %.17g (tol %.3g)", mk_a_, mk_b_, mk_tol_)); \
  } while (0)

// Vectors, norm-wise: ‖a − b‖ / ‖b‖ ≤ tol.
#define CHECK_ALLCLOSE(a, b, tol)                                                             \
  do {                                                                                        \
    const double mk_err_ = ::mk_test::rel_error((a), (b));                                    \
    ::mk_test::record(mk_err_ <= (tol), __FILE__, __LINE__,                                   \
                      std::string(#a " ~ " #b) +                                              \
                          ::mk_test::fmt(": relative error %.3g > %.3g", mk_err_, (tol)));    \
  } while (0)
