// The Gram-space path of fast_weight_unroll on the CPU (the maths: metakernels/fast_weight.h):
// mse with the same support set every step, the bias folded in as a column of ones. Instead of T
// steps of n × d_in × d_out products, one task costs two such products each way plus T products
// of n × n matrices.
//
// Accuracy: A_t and S are built by the same recurrence the steps run (A_{t+1} = A_t − η_t K A_t),
// so rounding behaves like the step loop's, with no eigendecomposition and no division: stable for
// η_t‖K‖ < 2, the condition for the inner loop itself not to diverge. The backward is reverse mode
// through that recurrence (Â_t = η_t Ŝ + (I − η_t K) Â_{t+1}, K̂ −= η_t Â_{t+1} A_tᵀ,
// η̂_t = ⟨Ŝ, A_t⟩ − ⟨Â_{t+1}, K A_t⟩), again products only.
#include <algorithm>
#include <cstring>
#include <vector>

#include "metakernels/fast_weight.h"
#include "small_gemm.h"
#include "unroll_helpers.h"

namespace metakernels {

namespace {

// One task's Gram-space matrices: Xᵀ, K, A_t and K A_t for t < T, and S.
template <typename T>
struct GramSpace {
  int64_t n, d_in, steps;
  std::vector<T> x_transposed, gram, powers, gram_powers, sum;

  GramSpace(int64_t n_, int64_t d_in_, int64_t steps_)
      : n(n_), d_in(d_in_), steps(steps_), x_transposed(d_in_ * n_), gram(n_ * n_),
        powers(steps_ * n_ * n_), gram_powers(steps_ * n_ * n_), sum(n_ * n_) {}

  const T* power(int64_t t) const { return powers.data() + t * n * n; }
  const T* gram_power(int64_t t) const { return gram_powers.data() + t * n * n; }

  // K = (X Xᵀ + [bias] 1 1ᵀ) / n, then A_0 = I, K A_t, A_{t+1} = A_t − η_t K A_t, S = Σ η_t A_t.
  void build(const T* x, bool has_bias, const T* lr) {
    const int64_t nn = n * n;
    cpu::transpose(n, d_in, x, d_in, x_transposed.data());
    cpu::gemm<T>(n, d_in, n, T(1) / T(n), x, d_in, x_transposed.data(), n, false, gram.data(), n);
    if (has_bias)
      for (T& k : gram) k += T(1) / T(n);
    std::fill(powers.begin(), powers.begin() + nn, T(0));
    for (int64_t i = 0; i < n; ++i) powers[i * n + i] = T(1);
    std::copy(gram.begin(), gram.end(), gram_powers.begin());
    std::fill(sum.begin(), sum.end(), T(0));
    for (int64_t t = 0; t < steps; ++t) {
      const T* a = power(t);
      T* ka = gram_powers.data() + t * nn;
      if (t > 0) cpu::gemm<T>(n, n, n, T(1), gram.data(), n, a, n, false, ka, n);
      for (int64_t k = 0; k < nn; ++k) sum[k] += lr[t] * a[k];
      if (t + 1 < steps) {
        T* next = powers.data() + (t + 1) * nn;
        for (int64_t k = 0; k < nn; ++k) next[k] = a[k] - lr[t] * ka[k];
      }
    }
  }
};

}  // namespace

template <typename T>
void fast_weight_unroll_gram_forward(const UnrollDims& dims, const UnrollInputs<T>& in,
                                     const UnrollForwardOutputs<T>& out, int64_t task_begin,
                                     int64_t task_end) {
  const int64_t T_ = dims.steps, n = dims.support, d_in = dims.d_in, d_out = dims.d_out;
  const int64_t w_size = d_in * d_out;
  const bool has_bias = in.bias != nullptr;
  const T inv_n = T(1) / T(n);
  GramSpace<T> space(n, d_in, T_);
  std::vector<T> r0(n * d_out), m(n * d_out);

  for (int64_t b = task_begin; b < task_end; ++b) {
    const T* x = cpu::at_step(in.x, in.x_task_stride, int64_t(0), b, int64_t(0));
    const T* y = cpu::at_step(in.y, in.y_task_stride, int64_t(0), b, int64_t(0));
    const T* lr = in.lr + b * T_;
    T* weight = out.weight + b * w_size;
    std::memcpy(weight, in.weight + b * in.weight_task_stride, sizeof(T) * w_size);
    T* bias = has_bias ? out.bias + b * d_out : nullptr;
    if (has_bias) std::memcpy(bias, in.bias + b * in.bias_task_stride, sizeof(T) * d_out);

    // R_0 = X W_0 + 1 b_0ᵀ − Y.
    cpu::gemm<T>(n, d_in, d_out, T(1), x, d_in, weight, d_out, false, r0.data(), d_out);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < d_out; ++j)
        r0[i * d_out + j] += (has_bias ? bias[j] : T(0)) - y[i * d_out + j];
    space.build(x, has_bias, lr);

    // E_t = A_t R_0 / n, as one product: A_1 … A_{T−1} stacked are [(T − 1) n, n], and E_1 …
    // E_{T−1} stacked [(T − 1) n, d_out]. Then ℓ_t = ½‖R_t‖² / n = n‖E_t‖² / 2.
    T* residual = out.residual + b * T_ * n * d_out;
    for (int64_t k = 0; k < n * d_out; ++k) residual[k] = r0[k] * inv_n;
    cpu::gemm<T>((T_ - 1) * n, n, d_out, inv_n, space.power(1), n, r0.data(), d_out, false,
                 residual + n * d_out, d_out);
    for (int64_t t = 0; t < T_; ++t) {
      const T* e = residual + t * n * d_out;
      out.losses[b * T_ + t] = T(0.5) * T(n) * cpu::dot(n * d_out, e, e);
    }

    // W̃_T = W̃_0 − (1/n) X̃ᵀ S R_0.
    cpu::gemm<T>(n, n, d_out, T(1), space.sum.data(), n, r0.data(), d_out, false, m.data(), d_out);
    cpu::gemm_tn<T>(d_in, n, d_out, -inv_n, x, d_in, space.x_transposed.data(), m.data(), d_out,
                    true, weight, d_out);
    if (has_bias) cpu::add_column_sums(n, d_out, m.data(), -inv_n, bias);
  }
}

template <typename T>
void fast_weight_unroll_gram_backward(const UnrollDims& dims, const UnrollInputs<T>& in,
                                      const UnrollBackwardArgs<T>& args, int64_t task_begin,
                                      int64_t task_end) {
  const int64_t T_ = dims.steps, n = dims.support, d_in = dims.d_in, d_out = dims.d_out;
  const int64_t w_size = d_in * d_out, nn = n * n;
  const bool has_bias = in.bias != nullptr;
  const bool second_order = !args.first_order;
  const T inv_n = T(1) / T(n);
  GramSpace<T> space(n, d_in, T_);
  std::vector<T> r0(n * d_out), r0_transposed(d_out * n), pushed(n * d_out), s_adj(nn);
  std::vector<T> a_adj(nn), k_adj(nn), scratch(nn), r0_adj(n * d_out), m(n * d_out);
  std::vector<T> b_adj(d_out), transposed_w(args.grad_x && second_order ? w_size : 0);

  for (int64_t b = task_begin; b < task_end; ++b) {
    const T* x = cpu::at_step(in.x, in.x_task_stride, int64_t(0), b, int64_t(0));
    const T* lr = in.lr + b * T_;
    const T* w_adj = args.grad_weight_final + b * w_size;  // Ŵ_T
    if (has_bias && args.grad_bias_final)
      std::memcpy(b_adj.data(), args.grad_bias_final + b * d_out, sizeof(T) * d_out);
    else
      std::fill(b_adj.begin(), b_adj.end(), T(0));
    const T* e0 = args.residual + b * T_ * n * d_out;
    for (int64_t k = 0; k < n * d_out; ++k) r0[k] = T(n) * e0[k];
    space.build(x, has_bias, lr);

    // U = X̃ Ŵ̃_T and Ŝ = −(1/n) U R_0ᵀ, the adjoint of S.
    cpu::gemm<T>(n, d_in, d_out, T(1), x, d_in, w_adj, d_out, false, pushed.data(), d_out);
    if (has_bias)
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < d_out; ++j) pushed[i * d_out + j] += b_adj[j];
    cpu::transpose(n, d_out, r0.data(), d_out, r0_transposed.data());
    cpu::gemm<T>(n, d_out, n, -inv_n, pushed.data(), d_out, r0_transposed.data(), n, false,
                 s_adj.data(), n);

    // η̂ and K̂, reverse mode through the recurrence. First order keeps only ⟨Ŝ, A_t⟩
    // (= −⟨U, E_t⟩ with the constant direction Ŵ_T of FOMAML).
    const bool want_k_adj = second_order && args.grad_x;
    if (args.grad_lr || want_k_adj) {
      std::fill(a_adj.begin(), a_adj.end(), T(0));  // Â_T = 0: A_T is not used
      std::fill(k_adj.begin(), k_adj.end(), T(0));
      for (int64_t t = T_ - 1; t >= 0; --t) {
        T lr_adj = cpu::dot(nn, s_adj.data(), space.power(t));
        if (!second_order) {
          if (args.grad_lr) args.grad_lr[b * T_ + t] = lr_adj;
          continue;
        }
        lr_adj -= cpu::dot(nn, a_adj.data(), space.gram_power(t));
        if (args.grad_lr) args.grad_lr[b * T_ + t] = lr_adj;
        if (want_k_adj && t + 1 < T_)
          cpu::gemm<T>(n, n, n, -lr[t], a_adj.data(), n, space.power(t), n, true, k_adj.data(), n);
        if (t > 0) {  // Â_t = η_t Ŝ + Â_{t+1} − η_t K Â_{t+1}
          cpu::gemm<T>(n, n, n, T(1), space.gram.data(), n, a_adj.data(), n, false,
                       scratch.data(), n);
          for (int64_t k = 0; k < nn; ++k) a_adj[k] += lr[t] * (s_adj[k] - scratch[k]);
        }
      }
    }

    T* grad_weight = args.grad_weight ? args.grad_weight + b * w_size : nullptr;
    T* grad_bias = args.grad_bias ? args.grad_bias + b * d_out : nullptr;
    if (grad_weight) std::memcpy(grad_weight, w_adj, sizeof(T) * w_size);
    if (grad_bias) std::memcpy(grad_bias, b_adj.data(), sizeof(T) * d_out);
    if (!second_order) {  // FOMAML: nothing flows through E_t into W_0, b_0, x or y.
      if (args.grad_x) std::fill(args.grad_x + b * n * d_in, args.grad_x + (b + 1) * n * d_in, T(0));
      if (args.grad_y)
        std::fill(args.grad_y + b * n * d_out, args.grad_y + (b + 1) * n * d_out, T(0));
      continue;
    }

    // R̂_0 = −(1/n) S U; then Ŵ_0 = Ŵ_T + Xᵀ R̂_0, b̂_0 = b̂_T + 1ᵀ R̂_0, Ŷ = −R̂_0.
    cpu::gemm<T>(n, n, d_out, -inv_n, space.sum.data(), n, pushed.data(), d_out, false,
                 r0_adj.data(), d_out);
    if (grad_weight)
      cpu::gemm_tn<T>(d_in, n, d_out, T(1), x, d_in, space.x_transposed.data(), r0_adj.data(),
                      d_out, true, grad_weight, d_out);
    if (grad_bias) cpu::add_column_sums(n, d_out, r0_adj.data(), T(1), grad_bias);
    if (args.grad_y) {
      T* grad_y = args.grad_y + b * n * d_out;
      for (int64_t k = 0; k < n * d_out; ++k) grad_y[k] = -r0_adj[k];
    }

    // X̂ = −(1/n) S R_0 Ŵ_Tᵀ + R̂_0 W_0ᵀ + (1/n)(K̂ + K̂ᵀ) X.
    if (args.grad_x) {
      T* grad_x = args.grad_x + b * n * d_in;
      cpu::gemm<T>(n, n, d_out, T(1), space.sum.data(), n, r0.data(), d_out, false, m.data(),
                   d_out);
      cpu::transpose(d_in, d_out, w_adj, d_out, transposed_w.data());
      cpu::gemm<T>(n, d_out, d_in, -inv_n, m.data(), d_out, transposed_w.data(), d_in, false,
                   grad_x, d_in);
      cpu::transpose(d_in, d_out, in.weight + b * in.weight_task_stride, d_out,
                     transposed_w.data());
      cpu::gemm<T>(n, d_out, d_in, T(1), r0_adj.data(), d_out, transposed_w.data(), d_in, true,
                   grad_x, d_in);
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < n; ++j)
          scratch[i * n + j] = (k_adj[i * n + j] + k_adj[j * n + i]) * inv_n;
      cpu::gemm<T>(n, n, d_in, T(1), scratch.data(), n, x, d_in, true, grad_x, d_in);
    }
  }
}

#define MK_INSTANTIATE_GRAM(T)                                                                 \
  template void fast_weight_unroll_gram_forward<T>(const UnrollDims&, const UnrollInputs<T>&,  \
                                                   const UnrollForwardOutputs<T>&, int64_t,    \
                                                   int64_t);                                   \
  template void fast_weight_unroll_gram_backward<T>(const UnrollDims&, const UnrollInputs<T>&, \
                                                    const UnrollBackwardArgs<T>&, int64_t,     \
                                                    int64_t);

MK_INSTANTIATE_GRAM(float)
MK_INSTANTIATE_GRAM(double)

}  // namespace metakernels
