// Kernel interface of the two fused ops (SPEC.md sections 1 and 2): raw pointers, sizes and
// strides, no torch. The caller (csrc/torch/ or a C++ test) has checked every argument; kernels
// do not check again.
//
// Layouts. Every per-task, per-step matrix is row-major and contiguous; where it sits is given by
// a task stride and a step stride in elements. A stride of 0 means "shared": a shared weight or
// bias has task stride 0, and 3-D x (the same support set every step) has step stride 0.
// Outputs are dense in the shapes written beside them, and kernels write every element of them.
//
// Work is split by task: a call handles tasks [task_begin, task_end) and touches no memory of
// other tasks, so the caller may run disjoint ranges on different threads.
#pragma once

#include <cstdint>

namespace metakernels {

enum class Loss : int { kMse = 0, kCrossEntropy = 1 };

struct UnrollDims {
  int64_t tasks = 0;       // B
  int64_t steps = 0;       // T
  int64_t support = 0;     // n, rows per step
  int64_t d_in = 0;
  int64_t d_out = 0;
  int64_t queries = 0;     // m, readout rows per step (0 without a readout)
  Loss loss = Loss::kMse;
};

template <typename T>
struct UnrollInputs {
  const T* weight = nullptr;  // [d_in, d_out] per task
  int64_t weight_task_stride = 0;
  const T* bias = nullptr;  // [d_out] per task, or null
  int64_t bias_task_stride = 0;
  const T* x = nullptr;  // [n, d_in] per task and step
  int64_t x_task_stride = 0, x_step_stride = 0;
  const T* y = nullptr;  // mse targets [n, d_out] per task and step (null for ce)
  int64_t y_task_stride = 0, y_step_stride = 0;
  const int64_t* labels = nullptr;  // ce labels [n] per task and step (null for mse)
  int64_t labels_task_stride = 0, labels_step_stride = 0;
  const T* lr = nullptr;             // [B, T] dense
  const T* lr_scale = nullptr;       // [d_in, d_out], or null (all ones)
  const T* bias_lr_scale = nullptr;  // [d_out], or null (all ones)
  const T* queries = nullptr;        // [B, T, m, d_in] dense, or null
};

template <typename T>
struct UnrollForwardOutputs {
  T* weight = nullptr;    // [B, d_in, d_out]       W_T
  T* bias = nullptr;      // [B, d_out]             b_T (null without bias)
  T* losses = nullptr;    // [B, T]                 ℓ_t
  T* readout = nullptr;   // [B, T, m, d_out]       (null without queries)
  T* residual = nullptr;  // [B, T, n, d_out]       E_t, saved for the backward
  T* states = nullptr;    // [B, T, d_in, d_out]    W_0 … W_{T−1}, or null when the backward
                          //                        needs no W_t (see UnrollBackwardArgs)
};

// The backward's saved tensors, incoming adjoints and outgoing gradients. A null gradient output
// is not computed. states must be non-null when grad_x is wanted in second order, or grad_queries.
template <typename T>
struct UnrollBackwardArgs {
  const T* residual = nullptr;       // [B, T, n, d_out]
  const T* states = nullptr;         // [B, T, d_in, d_out] or null
  const T* weight_final = nullptr;   // [B, d_in, d_out]  W_T
  const T* grad_weight_final = nullptr;  // [B, d_in, d_out]
  const T* grad_bias_final = nullptr;    // [B, d_out], or null
  const T* grad_readout = nullptr;       // [B, T, m, d_out], or null
  bool first_order = false;

  T* grad_weight = nullptr;         // [B, d_in, d_out], per task (a shared init sums them)
  T* grad_bias = nullptr;           // [B, d_out], per task
  T* grad_x = nullptr;              // the layout of x, dense: [B, n, d_in] (3-D x, summed over
                                    // steps) or [B, T, n, d_in]
  T* grad_y = nullptr;              // the layout of y, dense, likewise (mse only)
  T* grad_lr = nullptr;             // [B, T]
  T* grad_lr_scale = nullptr;       // [B, d_in, d_out], per task
  T* grad_bias_lr_scale = nullptr;  // [B, d_out], per task
  T* grad_queries = nullptr;        // [B, T, m, d_in]
};

// x given per step (4-D) or once for all steps (3-D): decides the dense layout of grad_x/grad_y.
inline bool unroll_x_per_step(int64_t x_step_stride) { return x_step_stride != 0; }

template <typename T>
void fast_weight_unroll_forward(const UnrollDims& dims, const UnrollInputs<T>& in,
                                const UnrollForwardOutputs<T>& out, int64_t task_begin,
                                int64_t task_end);

template <typename T>
void fast_weight_unroll_backward(const UnrollDims& dims, const UnrollInputs<T>& in,
                                 const UnrollBackwardArgs<T>& args, int64_t task_begin,
                                 int64_t task_end);

// linear_hvp: Hv = Xᵀ H_E (X V + 1 v_bᵀ) for every task (SPEC.md section 2).
template <typename T>
struct HvpArgs {
  int64_t tasks = 0, support = 0, d_in = 0, d_out = 0;
  Loss loss = Loss::kMse;
  const T* weight = nullptr;  // [d_in, d_out] per task (read for ce only)
  int64_t weight_task_stride = 0;
  const T* bias = nullptr;  // [d_out] per task, or null
  int64_t bias_task_stride = 0;
  const T* x = nullptr;  // [B, n, d_in] dense
  const T* v = nullptr;  // [B, d_in, d_out] dense
  const T* v_bias = nullptr;  // [d_out] per task, or null
  int64_t v_bias_task_stride = 0;
  T* hv_weight = nullptr;  // [B, d_in, d_out]
  T* hv_bias = nullptr;    // [B, d_out], or null
};

template <typename T>
void linear_hvp_forward(const HvpArgs<T>& args, int64_t task_begin, int64_t task_end);

}  // namespace metakernels
