// Small helpers of the CPU unroll kernels (fast_weight_unroll.cpp, fast_weight_gram.cpp).
// Internal to the CPU backend: no torch, no argument checks.
#pragma once

#include <cstdint>

#include "small_gemm.h"

namespace metakernels {
namespace cpu {

// out[j] += scale * Σ_i m[i, j] for a dense [rows, cols] matrix.
template <typename T>
inline void add_column_sums(int64_t rows, int64_t cols, const T* m, T scale, T* out) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) out[j] += scale * m[i * cols + j];
}

// Σ_i a[i] b[i], in four independent vector accumulators: a single running sum is one chain of
// dependent scalar adds (the compiler may not reorder them without -ffast-math), which cost ~4
// cycles per element and were a third of the Gram forward's time (its losses) on maml-small.
template <typename T>
inline T dot(int64_t size, const T* a, const T* b) {
  using V = typename Vec<T>::type;
  constexpr int64_t L = Vec<T>::lanes;
  V acc[4] = {V{}, V{}, V{}, V{}};
  int64_t i = 0;
  for (; i + 4 * L <= size; i += 4 * L)
    for (int v = 0; v < 4; ++v) acc[v] += vload(a + i + v * L) * vload(b + i + v * L);
  for (; i + L <= size; i += L) acc[0] += vload(a + i) * vload(b + i);
  const V total = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  T sum = T(0);
  for (int64_t l = 0; l < L; ++l) sum += total[l];
  for (; i < size; ++i) sum += a[i] * b[i];
  return sum;
}

// mse_row_residual (metakernels/tile_math.h) over a dense block of size elements at once:
// z_to_e ← (z − y) · inv_n, returning ½ Σ (z − y)². The sum runs in four vector accumulators
// (see dot): the row-by-row scalar sum was one chain of dependent adds, ~5% of the step loop's
// forward on trajectory.
template <typename T>
inline T mse_residual(int64_t size, T* z_to_e, const T* y, T inv_n) {
  using V = typename Vec<T>::type;
  constexpr int64_t L = Vec<T>::lanes;
  V acc[4] = {V{}, V{}, V{}, V{}};
  int64_t i = 0;
  for (; i + 4 * L <= size; i += 4 * L)
    for (int v = 0; v < 4; ++v) {
      const V diff = vload(z_to_e + i + v * L) - vload(y + i + v * L);
      acc[v] += diff * diff;
      vstore(z_to_e + i + v * L, diff * inv_n);
    }
  for (; i + L <= size; i += L) {
    const V diff = vload(z_to_e + i) - vload(y + i);
    acc[0] += diff * diff;
    vstore(z_to_e + i, diff * inv_n);
  }
  const V total = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  T sum = T(0);
  for (int64_t l = 0; l < L; ++l) sum += total[l];
  for (; i < size; ++i) {
    const T diff = z_to_e[i] - y[i];
    sum += diff * diff;
    z_to_e[i] = diff * inv_n;
  }
  return T(0.5) * sum;
}

// Where a per-task, per-step input matrix sits.
template <typename T>
inline const T* at_step(const T* base, int64_t task_stride, int64_t step_stride, int64_t task,
                        int64_t step) {
  return base + task * task_stride + step * step_stride;
}

}  // namespace cpu
}  // namespace metakernels
