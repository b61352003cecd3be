// Small helpers of the CPU unroll kernels (fast_weight_unroll.cpp, fast_weight_gram.cpp).
// Internal to the CPU backend: no torch, no argument checks.
#pragma once

#include <cstdint>

namespace metakernels {
namespace cpu {

// out[j] += scale * Σ_i m[i, j] for a dense [rows, cols] matrix.
template <typename T>
inline void add_column_sums(int64_t rows, int64_t cols, const T* m, T scale, T* out) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) out[j] += scale * m[i * cols + j];
}

template <typename T>
inline T dot(int64_t size, const T* a, const T* b) {
  T sum = T(0);
  for (int64_t i = 0; i < size; ++i) sum += a[i] * b[i];
  return sum;
}

// Where a per-task, per-step input matrix sits.
template <typename T>
inline const T* at_step(const T* base, int64_t task_stride, int64_t step_stride, int64_t task,
                        int64_t step) {
  return base + task * task_stride + step * step_stride;
}

}  // namespace cpu
}  // namespace metakernels
