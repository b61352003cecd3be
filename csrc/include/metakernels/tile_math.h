// Per-row arithmetic of the inner loss, shared by every compiled backend
// (docs/ops/fast_weight_unroll.md). Plain C++ with no torch; MK_HOST_DEVICE marks the functions
// __host__ __device__ under nvcc so the CUDA kernels use the same code that the C++ tests check on
// the host.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define MK_HOST_DEVICE __host__ __device__
#else
#define MK_HOST_DEVICE
#endif

namespace metakernels {

// mse row: residual e = (z - y) / n in place of z; returns ½‖z − y‖² (the caller divides by n).
// y is anything indexable whose y[j] converts to T: a `const T*`, or (in the CUDA kernels) a
// loader that widens bfloat16/float16 targets to the float32 state.
template <typename T, typename YRow>
MK_HOST_DEVICE inline T mse_row_residual(T* z_to_e, YRow y, int64_t d_out, T inv_n) {
  T half_sq = T(0);
  for (int64_t j = 0; j < d_out; ++j) {
    const T diff = z_to_e[j] - static_cast<T>(y[j]);
    half_sq += diff * diff;
    z_to_e[j] = diff * inv_n;
  }
  return T(0.5) * half_sq;
}

// Softmax of a row in place; returns log Σ exp(z − max) + max, the log-sum-exp. The max is
// subtracted first, so huge logits stay finite; a row holding NaN gives NaN.
template <typename T>
MK_HOST_DEVICE inline T softmax_row(T* z_to_p, int64_t d_out) {
  T z_max = z_to_p[0];
  for (int64_t j = 1; j < d_out; ++j) z_max = z_to_p[j] > z_max ? z_to_p[j] : z_max;
  for (int64_t j = 0; j < d_out; ++j)
    if (z_to_p[j] != z_to_p[j]) z_max = z_to_p[j];
  T sum_exp = T(0);
  for (int64_t j = 0; j < d_out; ++j) {
    z_to_p[j] = std::exp(z_to_p[j] - z_max);
    sum_exp += z_to_p[j];
  }
  const T inv_sum = T(1) / sum_exp;
  for (int64_t j = 0; j < d_out; ++j) z_to_p[j] *= inv_sum;
  return std::log(sum_exp) + z_max;
}

template <typename T>
MK_HOST_DEVICE inline T quiet_nan() {
  return T(NAN);
}

// Labels are checked before any kernel runs; a label outside [0, d_out) that reaches a kernel
// anyway (a caller that skipped the checks) makes its row NaN instead of a read out of bounds.
MK_HOST_DEVICE inline bool label_in_range(int64_t label, int64_t d_out) {
  return label >= 0 && label < d_out;
}

// ce row: residual e = (softmax(z) − onehot(label)) / n in place of z; returns −log softmax(z)[label]
// (the caller divides by n).
template <typename T>
MK_HOST_DEVICE inline T ce_row_residual(T* z_to_e, int64_t label, int64_t d_out, T inv_n) {
  if (!label_in_range(label, d_out)) {
    for (int64_t j = 0; j < d_out; ++j) z_to_e[j] = quiet_nan<T>();
    return quiet_nan<T>();
  }
  const T label_logit = z_to_e[label];
  const T log_sum_exp = softmax_row(z_to_e, d_out);
  for (int64_t j = 0; j < d_out; ++j) z_to_e[j] *= inv_n;
  z_to_e[label] -= inv_n;
  return log_sum_exp - label_logit;
}

// The softmax probabilities of a ce row, recovered from its stored residual: p = n·e + onehot.
template <typename T>
MK_HOST_DEVICE inline void ce_probs_from_residual(const T* e, int64_t label, int64_t d_out, T n,
                                                  T* probs) {
  for (int64_t j = 0; j < d_out; ++j) probs[j] = e[j] * n;
  if (label_in_range(label, d_out)) probs[label] += T(1);
}

// The softmax Jacobian applied to a row, scaled: out = scale · (p ∘ u − p (pᵀ u)).
// out may alias u.
template <typename T>
MK_HOST_DEVICE inline void softmax_jacobian_row(const T* probs, const T* u, int64_t d_out, T scale,
                                                T* out) {
  T p_dot_u = T(0);
  for (int64_t j = 0; j < d_out; ++j) p_dot_u += probs[j] * u[j];
  for (int64_t j = 0; j < d_out; ++j) out[j] = scale * probs[j] * (u[j] - p_dot_u);
}

// One element of the inner SGD step: w − η (s ∘ g), with s the Meta-SGD scale (1 without one).
template <typename T>
MK_HOST_DEVICE inline T sgd_step(T w, T lr, T scale, T grad) {
  return w - lr * (scale * grad);
}

}  // namespace metakernels
