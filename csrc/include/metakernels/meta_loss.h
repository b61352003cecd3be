// Kernel interface of fast_weight_meta_loss's outer loss (docs/ops/fast_weight_meta_loss.md): the
// query loss of every task and its gradient, computed beside the unroll kernels of fast_weight.h.
// Raw pointers and sizes, no torch; the caller checked every argument. Work is split by task like
// the unroll: a call handles tasks [task_begin, task_end) and touches no memory of other tasks.
//
// Two query forms, one layout: `blocks` logits blocks of m rows per task, 1 for form A (the loss
// at W_T, query_x [B, m, d_in]) and T for form B (the readout after every step, query_x
// [B, T, m, d_in], losses summed over steps).
#pragma once

#include <cstdint>

#include "metakernels/fast_weight.h"

namespace metakernels {

template <typename T>
struct QueryLoss {
  int64_t tasks = 0, blocks = 1, rows = 0, d_in = 0, d_out = 0;  // B, 1 or T, m, d_in, d_out
  Loss loss = Loss::kMse;
  const T* query_x = nullptr;              // [B, blocks, m, d_in] dense
  const T* query_y = nullptr;              // mse: [B, blocks, m, d_out] dense
  const int64_t* query_labels = nullptr;   // ce:  [B, blocks, m] dense
};

// Form A's logits Z = Q W_T + 1 b_Tᵀ into logits [B, m, d_out] (bias_t null: none); weight_t
// [B, d_in, d_out], bias_t [B, d_out] dense.
template <typename T>
void meta_loss_logits(const QueryLoss<T>& q, const T* weight_t, const T* bias_t, T* logits,
                      int64_t task_begin, int64_t task_end);

// The loss of every task, L = Σ_blocks ℓ(Z, Y) (ℓ: the mean over the m rows,
// docs/ops/fast_weight_meta_loss.md), into task_loss [B]; the logits [B, blocks, m, d_out] are
// turned in place into the residual Ê = ∂ℓ/∂Z ((Z − Y)/m or (softmax(Z) − onehot(Y))/m).
template <typename T>
void meta_loss_forward(const QueryLoss<T>& q, T* logits_to_residual, T* task_loss,
                       int64_t task_begin, int64_t task_end);

// The adjoints of the query loss for upstream gradients c [B] (one per task), from the saved
// residual Ê, plus the incoming adjoints of W_T and b_T where given (grad_weight_in,
// grad_bias_in: a later checkpoint segment's; null: none). Form A: Ŵ_T = c Qᵀ Ê (+ in) into
// grad_weight_t [B, d_in, d_out], b̂_T = c 1ᵀ Ê (+ in) into grad_bias_t [B, d_out] (null: no
// bias), Q̂ = c Ê W_Tᵀ into grad_query_x [B, m, d_in] (null: not wanted; reads weight_t).
// Form B: Ô_t = c Ê_t into grad_readout [B, T, m, d_out], and Ŵ_T, b̂_T the incoming ones (or
// zero). Both: Ŷ_q = −c Ê into grad_query_y (mse; null: not wanted).
template <typename T>
struct QueryLossBackward {
  const T* residual = nullptr;   // [B, blocks, m, d_out]
  const T* grad_loss = nullptr;  // [B], c
  const T* weight_t = nullptr;   // [B, d_in, d_out] (form A, for grad_query_x)
  const T* grad_weight_in = nullptr;  // [B, d_in, d_out], or null
  const T* grad_bias_in = nullptr;    // [B, d_out], or null
  T* grad_weight_t = nullptr;    // both forms
  T* grad_bias_t = nullptr;      // both forms (null without a bias)
  T* grad_readout = nullptr;     // form B
  T* grad_query_x = nullptr;     // form A (form B's comes from the unroll backward)
  T* grad_query_y = nullptr;
};

template <typename T>
void meta_loss_backward(const QueryLoss<T>& q, const QueryLossBackward<T>& args,
                        int64_t task_begin, int64_t task_end);

// Form A in Gram space (mse, 3-D x, where the Gram path of fast_weight.h runs): the logits
// Z = Q W_0 + 1 b_0ᵀ − (1/n) (Q̃ X̃ᵀ) M_T from M_T = S R_0 [B, n, d_out]
// (UnrollForwardOutputs::sum_residual), so W_T is never formed.
template <typename T>
void meta_loss_gram_logits(const UnrollDims& dims, const UnrollInputs<T>& in,
                           const QueryLoss<T>& q, const T* sum_residual, T* logits,
                           int64_t task_begin, int64_t task_end);

// ... and the Gram backward's X̃ Ŵ̃_T = (Q̃ X̃ᵀ)ᵀ Ô, Ô = c Ê, into pushed [B, n, d_out]
// (UnrollBackwardArgs::pushed_final): n × m work instead of a d_in × d_out product.
template <typename T>
void meta_loss_gram_pushed(const UnrollDims& dims, const UnrollInputs<T>& in,
                           const QueryLoss<T>& q, const T* residual, const T* grad_loss,
                           T* pushed, int64_t task_begin, int64_t task_end);

}  // namespace metakernels
