// The chunked (WY/UT) path of fast_weight_unroll (mse, 4-D x): the maths is README.md, "The
// chunked form", and its plain-PyTorch spec metakernels/reference/fast_weight_chunked.py.
//
// With mse, x given per step, no lr_scale and bias_lr_scale absent or all ones, the bias folds
// into the weights as a row (X̃ = [X 1], S = W̃ = [W; bᵀ], D = d_in + 1). Per chunk of C steps,
// K the chunk's stacked rows (Cn × D), β_r = η_{t(r)}/n, M block-strictly-lower (a step's n rows
// see the updates of earlier steps only):
//   (I + M ∘ (K Kᵀ) diag β) R = K S − Y,   E = R / n,   S′ = S − Kᵀ diag(β) R,
//   O = Q̃ S − (N ∘ (Q̃ Kᵀ)) diag(β) R.
// The steps of a chunk become C·n × D by D × d_out products instead of T rank-n updates of the
// whole state. Same outputs as fast_weight_unroll_forward (E_t of every step, never states);
// the backward reads E_t and W_0 and rebuilds the chunk starts (one product a chunk), holding
// those of one task at a time.
#pragma once

#include <cstdint>

#include "metakernels/fast_weight.h"

namespace metakernels {

// The chunk length in steps for n rows per step: about rows_target stacked rows (the products'
// inner size), at least one step. rows_target is a knob (set_chunked_knobs); 32 measured best
// on the CPU at n = 1 … 16, d = 128 (README, "The chunked form").
inline int64_t chunked_chunk_steps(int64_t n, int64_t rows_target = 32) {
  const int64_t steps = rows_target / (n > 0 ? n : 1);
  return steps > 1 ? steps : 1;
}

// Whether the chunked path is expected to beat the step loop for these sizes (measured with
// bench/cpu_chunked.py --switch, bench/results/cpu-chunked-2026-12-06.txt; README "The chunked
// path"). Two cases:
//  - wants_states (the backward wants x's gradient in second order, or the queries'): the step
//    loop would store W_t of every step ([B, T, d_in, d_out]) and read them back, the chunked
//    backward needs none: it wins for n ≤ 8 with 8n ≤ d_in (4.2× at n = 1, d = 128; 1.0–1.2×
//    at n = 8), loses at n = 16.
//  - otherwise (the meta-gradient of the init, lr, y): the step loop's rank-1 updates run at the
//    speed of memory, and the chunked path turns them into products: it wins at n = 1 with
//    d_in ≥ 64 (1.1–1.6×), ties at n = 2, loses from n = 4 or with more query rows.
// Both need a state large enough for products to pay; the second T ≥ 2. The first does not
// look at T: checkpointed segments (of any length, down to one step) must take the backward
// the whole call was planned for, which keeps no W_t.
inline bool unroll_chunked_cheaper(int64_t steps, int64_t n, int64_t d_in, int64_t d_out,
                                   int64_t m, bool wants_states) {
  if (wants_states) return n <= 8 && 8 * n <= d_in && d_in * d_out >= 1024;
  return steps >= 2 && n == 1 && m <= 2 && d_in >= 64 && d_in * d_out >= 4096;
}

// Whether the chunked path computes this call exactly: mse, 4-D x, no lr_scale, bias_lr_scale
// absent or all ones (its values are read here, as on the Gram path). Whether it runs is this
// and unroll_chunked_cheaper (the caller may override the second, for tests and measurements):
// the forward by the rule without stored states (it cannot know the backward's wants), the
// backward by the rule of what it computes.
template <typename T>
bool unroll_chunked_exact(const UnrollDims& dims, const UnrollInputs<T>& in) {
  if (dims.loss != Loss::kMse || !unroll_x_per_step(in.x_step_stride) || in.lr_scale != nullptr)
    return false;
  if (in.bias_lr_scale != nullptr)
    for (int64_t j = 0; j < dims.d_out; ++j)
      if (!(in.bias_lr_scale[j] == T(1))) return false;
  return true;
}

// The chunked forward: the outputs of fast_weight_unroll_forward (out.states is not written),
// chunks of `chunk` steps.
template <typename T>
void fast_weight_unroll_chunked_forward(const UnrollDims& dims, const UnrollInputs<T>& in,
                                        const UnrollForwardOutputs<T>& out, int64_t chunk,
                                        int64_t task_begin, int64_t task_end);

// The chunked backward: the gradients of fast_weight_unroll_backward for a call where
// unroll_chunked_exact holds; reads args.residual (E_t of every step) and never args.states.
// grad_lr_scale and grad_bias_lr_scale must be null (the caller runs the loop when the last is
// wanted). `chunk` need not be the forward's: the chunk starts are rebuilt here.
template <typename T>
void fast_weight_unroll_chunked_backward(const UnrollDims& dims, const UnrollInputs<T>& in,
                                         const UnrollBackwardArgs<T>& args, int64_t chunk,
                                         int64_t task_begin, int64_t task_end);

}  // namespace metakernels
