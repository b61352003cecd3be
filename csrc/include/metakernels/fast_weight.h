// Kernel interface of the two fused ops (docs/ops/fast_weight_unroll.md and
// docs/ops/linear_hvp.md): raw pointers, sizes and strides, no torch. The caller (csrc/torch/ or a
// C++ test) has checked every argument; kernels do not check again.
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
  // The Gram forward only (fast_weight_meta_loss's query loss in Gram space): when set, it gets
  // M_T = S R_0 [B, n, d_out], and W_T, b_T are not formed (weight and bias may be null).
  T* sum_residual = nullptr;
  // The Gram forward only: write E_0 alone (E_1 … E_{T−1} zero) and no losses (may be null),
  // for a caller whose backward is the Gram backward, which reads E_0 only.
  bool first_residual_only = false;
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
  // The Gram backward only: grad_weight is one [d_in, d_out] sum that every task of the call
  // adds its gradient to (a shared init: no [B, d_in, d_out] buffer to write and reduce).
  bool sum_grad_weight = false;
  // The Gram backward only: X̃ Ŵ̃_T [B, n, d_out] given (fast_weight_meta_loss's form A has it
  // as (Q̃ X̃ᵀ)ᵀ Ô, cheaper), instead of its product from grad_weight_final and grad_bias_final.
  const T* pushed_final = nullptr;
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

// --- The Gram-space path (mse, the same support set every step) ---------------------------------
//
// With mse, 3-D x, no lr_scale and bias_lr_scale absent or all ones, the bias folds into W as a
// row (X̃ = [X 1], W̃ = [W; bᵀ]) and the residual R_t = X̃ W̃_t − Y obeys
//   R_{t+1} = (I − η_t K) R_t,   K = X̃ X̃ᵀ / n  (n × n),
// so with A_t = Π_{s<t} (I − η_s K) and S = Σ_t η_t A_t (polynomials in K, built by the
// recurrence A_{t+1} = A_t − η_t K A_t, which is stable for η‖K‖ < 2 like the steps themselves):
//   E_t = A_t R_0 / n,   W̃_T = W̃_0 − (1/n) X̃ᵀ S R_0.
// The whole unroll costs two n × d_in × d_out products plus T n × n products; the backward
// (second order: reverse mode through the n × n recurrence) likewise. The forward writes the
// same outputs as fast_weight_unroll_forward, E_t for every step included, but never states.

// Whether the Gram path does less arithmetic than the step loop for these sizes: per task,
// forward plus backward, the loop costs 4T·n·d_in·d_out multiply-adds and the Gram path about
// 4·n·d_in·d_out + 2n²·d_in + 4T·n³ + (T+3)·n²·d_out, plus, with a readout of m rows per step,
// 4T·m·n·(d_in + d_out) + 3T·n²·d_out (the m·d_in·d_out products of the readout cost both the
// same). Never for T = 1.
inline bool unroll_gram_cheaper(int64_t steps, int64_t n, int64_t d_in, int64_t d_out,
                                int64_t m = 0) {
  const double T_ = double(steps), n_ = double(n), di = double(d_in), dout = double(d_out);
  double gram = 4 * n_ * di * dout + 2 * n_ * n_ * di + 4 * T_ * n_ * n_ * n_ +
                (T_ + 3) * n_ * n_ * dout;
  if (m > 0) gram += 4 * T_ * double(m) * n_ * (di + dout) + 3 * T_ * n_ * n_ * dout;
  return steps >= 2 && gram < 4 * T_ * n_ * di * dout;
}

// Whether the Gram path computes this call exactly and is cheaper: mse, 3-D x, no lr_scale,
// bias_lr_scale absent or all ones (read here: the caller has the values, the Python layer does
// not look at them), and unroll_gram_cheaper. Every lr [B, T] is a scalar per task and step, so
// any lr qualifies; a readout (queries) is covered: O_t = Q̃_t W̃_0 − (1/n) Q̃_t X̃ᵀ S_{t+1} R_0.
template <typename T>
bool unroll_gram_applies(const UnrollDims& dims, const UnrollInputs<T>& in) {
  if (dims.loss != Loss::kMse || unroll_x_per_step(in.x_step_stride) || in.lr_scale != nullptr)
    return false;
  if (in.bias_lr_scale != nullptr)
    for (int64_t j = 0; j < dims.d_out; ++j)
      if (!(in.bias_lr_scale[j] == T(1))) return false;
  return unroll_gram_cheaper(dims.steps, dims.support, dims.d_in, dims.d_out,
                             in.queries ? dims.queries : 0);
}

// The Gram-space forward: the outputs of fast_weight_unroll_forward (out.states must be null).
template <typename T>
void fast_weight_unroll_gram_forward(const UnrollDims& dims, const UnrollInputs<T>& in,
                                     const UnrollForwardOutputs<T>& out, int64_t task_begin,
                                     int64_t task_end);

// The Gram-space backward: the gradients of fast_weight_unroll_backward for a call where
// unroll_gram_applies holds; reads only E_0 of args.residual, never args.states. grad_lr_scale
// and grad_bias_lr_scale must be null (the caller runs the loop when the last is wanted).
template <typename T>
void fast_weight_unroll_gram_backward(const UnrollDims& dims, const UnrollInputs<T>& in,
                                      const UnrollBackwardArgs<T>& args, int64_t task_begin,
                                      int64_t task_end);

// linear_hvp: Hv = Xᵀ H_E (X V + 1 v_bᵀ) for every task (docs/ops/linear_hvp.md).
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
