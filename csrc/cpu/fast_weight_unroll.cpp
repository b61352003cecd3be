// Fused CPU kernels of fast_weight_unroll: the forward and the exact second-order backward of
// docs/ops/fast_weight_unroll.md, one task at a time, every step's matrices in cache.
//
// Memory: the forward saves E_t ([B, T, n, d_out], small) for every step, and W_t for every step
// ([B, T, d_in, d_out]) only when the backward needs it: for x's gradient in second order, and for
// the queries' gradient. Everything else the backward needs is recomputed from E_t.
#include <algorithm>
#include <cstring>
#include <vector>

#include "metakernels/fast_weight.h"
#include "metakernels/tile_math.h"
#include "small_gemm.h"
#include "unroll_helpers.h"

namespace metakernels {

using cpu::add_column_sums;
using cpu::at_step;
using cpu::dot;

template <typename T>
void fast_weight_unroll_forward(const UnrollDims& dims, const UnrollInputs<T>& in,
                                const UnrollForwardOutputs<T>& out, int64_t task_begin,
                                int64_t task_end) {
  const int64_t T_ = dims.steps, n = dims.support, d_in = dims.d_in, d_out = dims.d_out;
  const int64_t m = dims.queries;
  const int64_t w_size = d_in * d_out;
  const bool has_bias = in.bias != nullptr;
  const bool x_per_step = unroll_x_per_step(in.x_step_stride);
  const T inv_n = T(1) / T(n);

  // Xᵀ, kept for the inner-gradient products when they read it (gemm_tn ignores it otherwise)
  // and x is the same every step (3-D); 4-D x is read in place (x_t_transposed is then null).
  const bool keep_x_transposed = !x_per_step && cpu::gemm_tn_reads_transposed<T>(d_in, d_out);
  std::vector<T> x_transposed(keep_x_transposed ? static_cast<size_t>(d_in * n) : 0);
  const T* x_t_transposed = keep_x_transposed ? x_transposed.data() : nullptr;
  std::vector<T> inner_grad(in.lr_scale ? static_cast<size_t>(w_size) : 0);
  std::vector<T> bias_grad(has_bias ? static_cast<size_t>(d_out) : 0);

  for (int64_t b = task_begin; b < task_end; ++b) {
    T* weight = out.weight + b * w_size;  // W_t, updated in place
    std::memcpy(weight, in.weight + b * in.weight_task_stride, sizeof(T) * w_size);
    T* bias = has_bias ? out.bias + b * d_out : nullptr;
    if (has_bias) std::memcpy(bias, in.bias + b * in.bias_task_stride, sizeof(T) * d_out);

    for (int64_t t = 0; t < T_; ++t) {
      const T* x = at_step(in.x, in.x_task_stride, in.x_step_stride, b, t);
      if (keep_x_transposed && t == 0) cpu::transpose(n, d_in, x, d_in, x_transposed.data());
      if (out.states) std::memcpy(out.states + (b * T_ + t) * w_size, weight, sizeof(T) * w_size);

      // Z_t = X_t W_t + 1 b_tᵀ, turned in place into the residual E_t = ∂ℓ_t/∂Z_t.
      T* residual = out.residual + (b * T_ + t) * n * d_out;
      cpu::gemm<T>(n, d_in, d_out, T(1), x, d_in, weight, d_out, false, residual, d_out);
      T loss_sum = T(0);
      if (has_bias)
        for (int64_t i = 0; i < n; ++i)
          for (int64_t j = 0; j < d_out; ++j) residual[i * d_out + j] += bias[j];
      if (dims.loss == Loss::kMse) {
        loss_sum = cpu::mse_residual(n * d_out, residual,
                                     at_step(in.y, in.y_task_stride, in.y_step_stride, b, t), inv_n);
      } else {
        for (int64_t i = 0; i < n; ++i) {
          const int64_t label =
              at_step(in.labels, in.labels_task_stride, in.labels_step_stride, b, t)[i];
          loss_sum += ce_row_residual(residual + i * d_out, label, d_out, inv_n);
        }
      }
      out.losses[b * T_ + t] = loss_sum * inv_n;

      // W_{t+1} = W_t − η_t (P ∘ X_tᵀ E_t),  b_{t+1} = b_t − η_t (p ∘ 1ᵀ E_t).
      const T lr = in.lr[b * T_ + t];
      if (in.lr_scale) {
        cpu::gemm_tn<T>(d_in, n, d_out, T(1), x, d_in, x_t_transposed, residual, d_out, false,
                        inner_grad.data(), d_out);
        for (int64_t k = 0; k < w_size; ++k) weight[k] -= lr * in.lr_scale[k] * inner_grad[k];
      } else {
        cpu::gemm_tn<T>(d_in, n, d_out, -lr, x, d_in, x_t_transposed, residual, d_out, true,
                        weight, d_out);
      }
      if (has_bias) {
        std::fill(bias_grad.begin(), bias_grad.end(), T(0));
        add_column_sums(n, d_out, residual, T(1), bias_grad.data());
        for (int64_t j = 0; j < d_out; ++j)
          bias[j] -= lr * (in.bias_lr_scale ? in.bias_lr_scale[j] : T(1)) * bias_grad[j];
      }

      // O_t = Q_t W_{t+1} + 1 b_{t+1}ᵀ.
      if (in.queries) {
        const T* queries = in.queries + (b * T_ + t) * m * d_in;
        T* readout = out.readout + (b * T_ + t) * m * d_out;
        cpu::gemm<T>(m, d_in, d_out, T(1), queries, d_in, weight, d_out, false, readout, d_out);
        if (has_bias)
          for (int64_t i = 0; i < m; ++i)
            for (int64_t j = 0; j < d_out; ++j) readout[i * d_out + j] += bias[j];
      }
    }
  }
}

template <typename T>
void fast_weight_unroll_backward(const UnrollDims& dims, const UnrollInputs<T>& in,
                                 const UnrollBackwardArgs<T>& args, int64_t task_begin,
                                 int64_t task_end) {
  const int64_t T_ = dims.steps, n = dims.support, d_in = dims.d_in, d_out = dims.d_out;
  const int64_t m = dims.queries;
  const int64_t w_size = d_in * d_out;
  const bool has_bias = in.bias != nullptr;
  const bool x_per_step = unroll_x_per_step(in.x_step_stride);
  const bool second_order = !args.first_order;
  const bool ce = dims.loss == Loss::kCrossEntropy;
  const T n_rows = T(n);
  // Dense layouts of x's and y's gradients: one matrix per step (4-D x) or one summed (3-D x).
  const int64_t grad_x_task = (x_per_step ? T_ : 1) * n * d_in;
  const int64_t grad_x_step = x_per_step ? n * d_in : 0;
  const int64_t grad_y_task = (x_per_step ? T_ : 1) * n * d_out;
  const int64_t grad_y_step = x_per_step ? n * d_out : 0;

  const bool keep_x_transposed = !x_per_step && cpu::gemm_tn_reads_transposed<T>(d_in, d_out);
  std::vector<T> w_adj(w_size), direction(in.lr_scale ? w_size : 0);
  std::vector<T> x_transposed(keep_x_transposed ? d_in * n : 0);
  const T* x_t_transposed = keep_x_transposed ? x_transposed.data() : nullptr;
  std::vector<T> b_adj(d_out), b_direction(d_out), pushed(n * d_out), z_adj(n * d_out);
  std::vector<T> probs(ce ? d_out : 0), inner_grad(args.grad_lr_scale ? w_size : 0);
  std::vector<T> transposed_w(args.grad_queries || (args.grad_x && second_order) ? w_size : 0);
  std::vector<T> transposed_dir(args.grad_x && second_order ? w_size : 0);

  for (int64_t b = task_begin; b < task_end; ++b) {
    std::memcpy(w_adj.data(), args.grad_weight_final + b * w_size, sizeof(T) * w_size);
    if (has_bias && args.grad_bias_final)
      std::memcpy(b_adj.data(), args.grad_bias_final + b * d_out, sizeof(T) * d_out);
    else
      std::fill(b_adj.begin(), b_adj.end(), T(0));
    T* grad_lr_scale = args.grad_lr_scale ? args.grad_lr_scale + b * w_size : nullptr;
    T* grad_bias_lr_scale = args.grad_bias_lr_scale ? args.grad_bias_lr_scale + b * d_out : nullptr;
    if (grad_lr_scale) std::fill(grad_lr_scale, grad_lr_scale + w_size, T(0));
    if (grad_bias_lr_scale) std::fill(grad_bias_lr_scale, grad_bias_lr_scale + d_out, T(0));
    if (args.grad_x) std::fill(args.grad_x + b * grad_x_task, args.grad_x + (b + 1) * grad_x_task, T(0));
    if (args.grad_y) std::fill(args.grad_y + b * grad_y_task, args.grad_y + (b + 1) * grad_y_task, T(0));

    for (int64_t t = T_ - 1; t >= 0; --t) {
      const T* x = at_step(in.x, in.x_task_stride, in.x_step_stride, b, t);
      if (keep_x_transposed && t == T_ - 1) cpu::transpose(n, d_in, x, d_in, x_transposed.data());
      const T* residual = args.residual + (b * T_ + t) * n * d_out;
      const T lr = in.lr[b * T_ + t];

      // The readout after step t: Ŵ_{t+1} += Q_tᵀ Ô_t, b̂_{t+1} += 1ᵀ Ô_t, Q̂_t = Ô_t W_{t+1}ᵀ.
      if (in.queries && args.grad_readout) {
        const T* queries = in.queries + (b * T_ + t) * m * d_in;
        const T* readout_adj = args.grad_readout + (b * T_ + t) * m * d_out;
        cpu::gemm_tn<T>(d_in, m, d_out, T(1), queries, d_in, nullptr, readout_adj, d_out, true,
                        w_adj.data(), d_out);
        if (has_bias) add_column_sums(m, d_out, readout_adj, T(1), b_adj.data());
        if (args.grad_queries) {
          const T* w_next = t + 1 < T_ ? args.states + (b * T_ + t + 1) * w_size
                                       : args.weight_final + b * w_size;
          cpu::transpose(d_in, d_out, w_next, d_out, transposed_w.data());
          cpu::gemm<T>(m, d_out, d_in, T(1), readout_adj, d_out, transposed_w.data(), d_in, false,
                       args.grad_queries + (b * T_ + t) * m * d_in, d_in);
        }
      } else if (args.grad_queries) {
        std::fill(args.grad_queries + (b * T_ + t) * m * d_in,
                  args.grad_queries + (b * T_ + t + 1) * m * d_in, T(0));
      }

      // D = P ∘ Ŵ_{t+1}, d = p ∘ b̂_{t+1}, and U = X_t D + 1 dᵀ.
      const T* dir = w_adj.data();
      if (in.lr_scale) {
        for (int64_t k = 0; k < w_size; ++k) direction[k] = in.lr_scale[k] * w_adj[k];
        dir = direction.data();
      }
      for (int64_t j = 0; j < d_out; ++j)
        b_direction[j] = has_bias ? (in.bias_lr_scale ? in.bias_lr_scale[j] : T(1)) * b_adj[j] : T(0);
      cpu::gemm<T>(n, d_in, d_out, T(1), x, d_in, dir, d_out, false, pushed.data(), d_out);
      if (has_bias)
        for (int64_t i = 0; i < n; ++i)
          for (int64_t j = 0; j < d_out; ++j) pushed[i * d_out + j] += b_direction[j];

      // η̂_t = −⟨Ŵ_{t+1}, P ∘ G_t⟩ − ⟨b̂_{t+1}, p ∘ g_t⟩ = −⟨U, E_t⟩.
      if (args.grad_lr) args.grad_lr[b * T_ + t] = -dot(n * d_out, pushed.data(), residual);
      if (grad_lr_scale) {
        cpu::gemm_tn<T>(d_in, n, d_out, T(1), x, d_in, x_t_transposed, residual, d_out,
                        false, inner_grad.data(), d_out);
        for (int64_t k = 0; k < w_size; ++k) grad_lr_scale[k] -= lr * w_adj[k] * inner_grad[k];
      }
      if (grad_bias_lr_scale && has_bias)
        for (int64_t i = 0; i < n; ++i)
          for (int64_t j = 0; j < d_out; ++j)
            grad_bias_lr_scale[j] -= lr * b_adj[j] * residual[i * d_out + j];

      if (!second_order) continue;  // FOMAML: Ŵ_t = Ŵ_{t+1}, nothing flows through E_t.

      // Ê = −η U;  Ẑ = Ê / n (mse) or the softmax Jacobian of Ê over n (ce).
      if (ce) {
        const int64_t* labels = at_step(in.labels, in.labels_task_stride, in.labels_step_stride, b, t);
        for (int64_t i = 0; i < n; ++i) {
          ce_probs_from_residual(residual + i * d_out, labels[i], d_out, n_rows, probs.data());
          softmax_jacobian_row(probs.data(), pushed.data() + i * d_out, d_out, -lr / n_rows,
                               z_adj.data() + i * d_out);
        }
      } else {
        for (int64_t k = 0; k < n * d_out; ++k) z_adj[k] = -lr / n_rows * pushed[k];
        if (args.grad_y) {
          T* grad_y = args.grad_y + b * grad_y_task + t * grad_y_step;
          for (int64_t k = 0; k < n * d_out; ++k) grad_y[k] -= z_adj[k];
        }
      }

      // X̂_t += −η E_t Dᵀ + Ẑ W_tᵀ.
      if (args.grad_x) {
        T* grad_x = args.grad_x + b * grad_x_task + t * grad_x_step;
        cpu::transpose(d_in, d_out, dir, d_out, transposed_dir.data());
        cpu::gemm<T>(n, d_out, d_in, -lr, residual, d_out, transposed_dir.data(), d_in, true,
                     grad_x, d_in);
        cpu::transpose(d_in, d_out, args.states + (b * T_ + t) * w_size, d_out,
                       transposed_w.data());
        cpu::gemm<T>(n, d_out, d_in, T(1), z_adj.data(), d_out, transposed_w.data(), d_in, true,
                     grad_x, d_in);
      }

      // Ŵ_t = Ŵ_{t+1} + X_tᵀ Ẑ,  b̂_t = b̂_{t+1} + 1ᵀ Ẑ.
      cpu::gemm_tn<T>(d_in, n, d_out, T(1), x, d_in, x_t_transposed, z_adj.data(), d_out,
                      true, w_adj.data(), d_out);
      if (has_bias) add_column_sums(n, d_out, z_adj.data(), T(1), b_adj.data());
    }

    if (args.grad_weight) std::memcpy(args.grad_weight + b * w_size, w_adj.data(), sizeof(T) * w_size);
    if (args.grad_bias) std::memcpy(args.grad_bias + b * d_out, b_adj.data(), sizeof(T) * d_out);
  }
}

template <typename T>
void linear_hvp_forward(const HvpArgs<T>& args, int64_t task_begin, int64_t task_end) {
  const int64_t n = args.support, d_in = args.d_in, d_out = args.d_out;
  const int64_t w_size = d_in * d_out;
  const T n_rows = T(n);
  std::vector<T> pushed(n * d_out), logits(args.loss == Loss::kCrossEntropy ? n * d_out : 0);
  for (int64_t b = task_begin; b < task_end; ++b) {
    const T* x = args.x + b * n * d_in;
    // U = X V + 1 v_bᵀ, then Ẑ = H_E U row by row.
    cpu::gemm<T>(n, d_in, d_out, T(1), x, d_in, args.v + b * w_size, d_out, false, pushed.data(),
                 d_out);
    if (args.v_bias)
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < d_out; ++j)
          pushed[i * d_out + j] += args.v_bias[b * args.v_bias_task_stride + j];
    if (args.loss == Loss::kMse) {
      for (T& u : pushed) u /= n_rows;
    } else {
      cpu::gemm<T>(n, d_in, d_out, T(1), x, d_in, args.weight + b * args.weight_task_stride, d_out,
                   false, logits.data(), d_out);
      for (int64_t i = 0; i < n; ++i) {
        T* row = logits.data() + i * d_out;
        if (args.bias)
          for (int64_t j = 0; j < d_out; ++j) row[j] += args.bias[b * args.bias_task_stride + j];
        softmax_row(row, d_out);
        softmax_jacobian_row(row, pushed.data() + i * d_out, d_out, T(1) / n_rows,
                             pushed.data() + i * d_out);
      }
    }
    cpu::gemm_tn<T>(d_in, n, d_out, T(1), x, d_in, nullptr, pushed.data(), d_out, false,
                    args.hv_weight + b * w_size, d_out);
    if (args.hv_bias) {
      T* hv_bias = args.hv_bias + b * d_out;
      std::fill(hv_bias, hv_bias + d_out, T(0));
      add_column_sums(n, d_out, pushed.data(), T(1), hv_bias);
    }
  }
}

#define MK_INSTANTIATE(T)                                                                      \
  template void fast_weight_unroll_forward<T>(const UnrollDims&, const UnrollInputs<T>&,       \
                                              const UnrollForwardOutputs<T>&, int64_t, int64_t); \
  template void fast_weight_unroll_backward<T>(const UnrollDims&, const UnrollInputs<T>&,      \
                                               const UnrollBackwardArgs<T>&, int64_t, int64_t); \
  template void linear_hvp_forward<T>(const HvpArgs<T>&, int64_t, int64_t);

MK_INSTANTIATE(float)
MK_INSTANTIATE(double)

}  // namespace metakernels
