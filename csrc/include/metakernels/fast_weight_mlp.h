// Kernel interface of the MLP fast-weight ops (docs/ops/fast_weight_mlp.md): T SGD steps on
// every layer of an L-layer perceptron for B tasks, and the exact reverse mode through them.
// Raw pointers and sizes, no torch; the caller (csrc/torch/fast_weight_mlp.cpp or a C++ test)
// checked every argument and laid every tensor out dense, per task.
//
// θ of one task is packed into P numbers: W_0 … W_{L−1} (row-major [d_l, d_{l+1}]), then
// b_0 … b_{L−1} with biases. The forward keeps θ_t at t = 0, stride, 2·stride, … ("states",
// [B, ⌈T/stride⌉, P]); the backward recomputes the steps between two kept states from the first
// (stride 1: none recomputed, B·T·P numbers kept; stride ⌈√T⌉: checkpointing, about √T·P per
// task kept and one more forward of the inner loop in the backward).
//
// Work is split by task: a call handles tasks [task_begin, task_end) and touches no memory of
// other tasks, so the caller may run disjoint ranges on different threads.
#pragma once

#include <cstdint>

#include "metakernels/fast_weight.h"

namespace metakernels {

enum class Activation : int { kRelu = 0, kTanh = 1, kGelu = 2, kSilu = 3 };

struct MlpDims {
  int64_t tasks = 0;          // B
  int64_t steps = 0;          // T
  int64_t support = 0;        // n, rows per step
  int64_t layers = 0;         // L
  const int64_t* widths = nullptr;  // [L + 1]: d_0 … d_L
  bool bias = false;
  bool x_per_step = false;    // x [B, T, n, d_0] (else [B, n, d_0], every step)
  int64_t query_rows = 0;     // m (0: no queries)
  bool query_per_step = false;  // queries [B, T, m, d_0] (readout / form B), else [B, m, d_0]
  bool meta_loss = false;     // the outer loss of the queries (query_y given), else a readout
  Loss loss = Loss::kMse;
  Activation activation = Activation::kRelu;
  int64_t stride = 0;         // states kept every `stride` steps (0: none)
};

// P, the packed parameters of one task.
int64_t mlp_param_count(const MlpDims& d);

template <typename T>
struct MlpInputs {
  const T* const* weights = nullptr;   // L pointers, [B, d_l, d_{l+1}] dense
  const T* const* biases = nullptr;    // L pointers, [B, d_{l+1}] dense (null without biases)
  const T* x = nullptr;                // [B, n, d_0] or [B, T, n, d_0]
  const T* y = nullptr;                // mse: x's leading shape + [d_L] (null for ce)
  const int64_t* labels = nullptr;     // ce: [B, n] or [B, T, n] (null for mse)
  const T* lr = nullptr;               // [B, T]
  const T* const* lr_scale = nullptr;  // L pointers [d_l, d_{l+1}], or null (ones)
  const T* queries = nullptr;          // [B, T, m, d_0] or (form A) [B, m, d_0], or null
  const T* query_y = nullptr;          // mse meta-loss: queries' leading shape + [d_L]
  const int64_t* query_labels = nullptr;  // ce meta-loss: queries' leading shape
};

template <typename T>
struct MlpForwardOutputs {
  T* losses = nullptr;           // [B, T]
  T* readout = nullptr;          // [B, T, m, d_L] (readout mode with queries), or null
  T* task_loss = nullptr;        // [B] (meta-loss mode), or null
  T* states = nullptr;           // [B, ⌈T/stride⌉, P] (stride > 0), or null
  T* const* weights_final = nullptr;  // L pointers [B, d_l, d_{l+1}]
  T* const* biases_final = nullptr;   // L pointers [B, d_{l+1}] (null without biases)
};

template <typename T>
struct MlpBackwardArgs {
  const T* states = nullptr;                   // the forward's, same stride
  const T* const* weights_final = nullptr;     // θ_T
  const T* const* biases_final = nullptr;
  const T* const* grad_weights_final = nullptr;  // L pointers, or null (zero)
  const T* const* grad_biases_final = nullptr;   // L pointers, or null (zero)
  const T* grad_out = nullptr;  // readout mode: [B, T, m, d_L] or null; meta-loss mode: c [B]
  bool first_order = false;
  // Outputs, null where not wanted; dense, every element written.
  T* grad_x = nullptr;           // x's shape (3-D x: summed over steps)
  T* grad_y = nullptr;           // y's shape (mse)
  T* grad_lr = nullptr;          // [B, T]
  T* grad_queries = nullptr;     // queries' shape
  T* grad_query_y = nullptr;     // query_y's shape (mse meta-loss)
  T* const* grad_weights = nullptr;   // L pointers [B, d_l, d_{l+1}], per task
  T* const* grad_biases = nullptr;    // L pointers [B, d_{l+1}]
  T* const* grad_lr_scale = nullptr;  // L pointers [B, d_l, d_{l+1}], per task (caller sums)
};

template <typename T>
void fast_weight_mlp_forward(const MlpDims& d, const MlpInputs<T>& in,
                             const MlpForwardOutputs<T>& out, int64_t task_begin,
                             int64_t task_end);

template <typename T>
void fast_weight_mlp_backward(const MlpDims& d, const MlpInputs<T>& in,
                              const MlpBackwardArgs<T>& args, int64_t task_begin,
                              int64_t task_end);

}  // namespace metakernels
