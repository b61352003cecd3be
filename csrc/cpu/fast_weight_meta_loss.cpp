// The outer (query) loss of fast_weight_meta_loss on the CPU (docs/ops/fast_weight_meta_loss.md),
// fused beside the unroll kernels: the logits become the residual in place, and the backward hands
// the unroll backward its adjoints (Ŵ_T, b̂_T or Ô_t) directly, with no autograd graph in between.
#include <algorithm>
#include <vector>

#include "metakernels/meta_loss.h"
#include "metakernels/tile_math.h"
#include "small_gemm.h"
#include "unroll_helpers.h"

namespace metakernels {

template <typename T>
void meta_loss_logits(const QueryLoss<T>& q, const T* weight_t, const T* bias_t, T* logits,
                      int64_t task_begin, int64_t task_end) {
  const int64_t m = q.rows, d_in = q.d_in, d_out = q.d_out;
  for (int64_t b = task_begin; b < task_end; ++b) {
    T* z = logits + b * m * d_out;
    cpu::gemm<T>(m, d_in, d_out, T(1), q.query_x + b * m * d_in, d_in, weight_t + b * d_in * d_out,
                 d_out, false, z, d_out);
    if (bias_t)
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < d_out; ++j) z[i * d_out + j] += bias_t[b * d_out + j];
  }
}

template <typename T>
void meta_loss_forward(const QueryLoss<T>& q, T* logits_to_residual, T* task_loss,
                       int64_t task_begin, int64_t task_end) {
  const int64_t m = q.rows, d_out = q.d_out, block = m * d_out;
  const T inv_m = T(1) / T(m);
  for (int64_t b = task_begin; b < task_end; ++b) {
    T total = T(0);
    for (int64_t s = 0; s < q.blocks; ++s) {
      const int64_t index = b * q.blocks + s;
      T* z = logits_to_residual + index * block;
      T sum = T(0);
      if (q.loss == Loss::kMse) {
        sum = cpu::mse_residual(block, z, q.query_y + index * block, inv_m);
      } else {
        const int64_t* labels = q.query_labels + index * m;
        for (int64_t i = 0; i < m; ++i) sum += ce_row_residual(z + i * d_out, labels[i], d_out, inv_m);
      }
      total += sum * inv_m;
    }
    task_loss[b] = total;
  }
}

template <typename T>
void meta_loss_backward(const QueryLoss<T>& q, const QueryLossBackward<T>& args,
                        int64_t task_begin, int64_t task_end) {
  const int64_t m = q.rows, d_in = q.d_in, d_out = q.d_out;
  const int64_t block = q.blocks * m * d_out, w_size = d_in * d_out;
  std::vector<T> transposed_w(args.grad_query_x ? w_size : 0);
  for (int64_t b = task_begin; b < task_end; ++b) {
    const T c = args.grad_loss[b];
    const T* residual = args.residual + b * block;
    if (args.grad_readout)
      for (int64_t k = 0; k < block; ++k) args.grad_readout[b * block + k] = c * residual[k];
    if (args.grad_query_y)
      for (int64_t k = 0; k < block; ++k) args.grad_query_y[b * block + k] = -c * residual[k];
    const bool form_a = q.blocks == 1 && args.grad_readout == nullptr;
    const T* weight_in = args.grad_weight_in ? args.grad_weight_in + b * w_size : nullptr;
    T* grad_weight = args.grad_weight_t + b * w_size;
    if (form_a)  // Ŵ_T = c Qᵀ Ê (+ the incoming adjoint)
      cpu::gemm_tn_add<T>(d_in, m, d_out, c, q.query_x + b * m * d_in, d_in, nullptr, residual,
                          d_out, weight_in, d_out, grad_weight, d_out);
    else if (weight_in)
      std::copy(weight_in, weight_in + w_size, grad_weight);
    else
      std::fill(grad_weight, grad_weight + w_size, T(0));
    if (args.grad_bias_t) {
      T* grad_bias = args.grad_bias_t + b * d_out;
      if (args.grad_bias_in)
        std::copy(args.grad_bias_in + b * d_out, args.grad_bias_in + (b + 1) * d_out, grad_bias);
      else
        std::fill(grad_bias, grad_bias + d_out, T(0));
      if (form_a) cpu::add_column_sums(m, d_out, residual, c, grad_bias);
    }
    if (args.grad_query_x) {  // Q̂ = c Ê W_Tᵀ
      cpu::transpose(d_in, d_out, args.weight_t + b * w_size, d_out, transposed_w.data());
      cpu::gemm<T>(m, d_out, d_in, c, residual, d_out, transposed_w.data(), d_in, false,
                   args.grad_query_x + b * m * d_in, d_in);
    }
  }
}

namespace {

// P̃ = Q̃ X̃ᵀ [m, n] of task b: Q Xᵀ, plus 1 with a bias.
template <typename T>
void query_support_gram(const UnrollDims& dims, const UnrollInputs<T>& in, const QueryLoss<T>& q,
                        int64_t b, std::vector<T>& x_transposed, T* out) {
  const int64_t n = dims.support, d_in = dims.d_in, m = q.rows;
  cpu::transpose(n, d_in, cpu::at_step(in.x, in.x_task_stride, int64_t(0), b, int64_t(0)), d_in,
                 x_transposed.data());
  cpu::gemm<T>(m, d_in, n, T(1), q.query_x + b * m * d_in, d_in, x_transposed.data(), n, false,
               out, n);
  if (in.bias)
    for (int64_t k = 0; k < m * n; ++k) out[k] += T(1);
}

}  // namespace

template <typename T>
void meta_loss_gram_logits(const UnrollDims& dims, const UnrollInputs<T>& in,
                           const QueryLoss<T>& q, const T* sum_residual, T* logits,
                           int64_t task_begin, int64_t task_end) {
  const int64_t n = dims.support, d_in = dims.d_in, d_out = dims.d_out, m = q.rows;
  std::vector<T> x_transposed(d_in * n), cross(m * n);
  for (int64_t b = task_begin; b < task_end; ++b) {
    T* z = logits + b * m * d_out;
    cpu::gemm<T>(m, d_in, d_out, T(1), q.query_x + b * m * d_in, d_in,
                 in.weight + b * in.weight_task_stride, d_out, false, z, d_out);
    if (in.bias) {
      const T* bias0 = in.bias + b * in.bias_task_stride;
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < d_out; ++j) z[i * d_out + j] += bias0[j];
    }
    query_support_gram(dims, in, q, b, x_transposed, cross.data());
    cpu::gemm<T>(m, n, d_out, -T(1) / T(n), cross.data(), n, sum_residual + b * n * d_out, d_out,
                 true, z, d_out);
  }
}

template <typename T>
void meta_loss_gram_pushed(const UnrollDims& dims, const UnrollInputs<T>& in,
                           const QueryLoss<T>& q, const T* residual, const T* grad_loss,
                           T* pushed, int64_t task_begin, int64_t task_end) {
  const int64_t n = dims.support, d_in = dims.d_in, d_out = dims.d_out, m = q.rows;
  std::vector<T> x_transposed(d_in * n), cross(m * n);
  for (int64_t b = task_begin; b < task_end; ++b) {
    query_support_gram(dims, in, q, b, x_transposed, cross.data());
    cpu::gemm_tn<T>(n, m, d_out, grad_loss[b], cross.data(), n, nullptr,
                    residual + b * m * d_out, d_out, false, pushed + b * n * d_out, d_out);
  }
}

#define MK_INSTANTIATE(T)                                                                      \
  template void meta_loss_logits<T>(const QueryLoss<T>&, const T*, const T*, T*, int64_t,      \
                                    int64_t);                                                  \
  template void meta_loss_forward<T>(const QueryLoss<T>&, T*, T*, int64_t, int64_t);           \
  template void meta_loss_backward<T>(const QueryLoss<T>&, const QueryLossBackward<T>&,        \
                                      int64_t, int64_t);                                       \
  template void meta_loss_gram_logits<T>(const UnrollDims&, const UnrollInputs<T>&,            \
                                         const QueryLoss<T>&, const T*, T*, int64_t, int64_t); \
  template void meta_loss_gram_pushed<T>(const UnrollDims&, const UnrollInputs<T>&,            \
                                         const QueryLoss<T>&, const T*, const T*, T*, int64_t, \
                                         int64_t);

MK_INSTANTIATE(float)
MK_INSTANTIATE(double)

}  // namespace metakernels
