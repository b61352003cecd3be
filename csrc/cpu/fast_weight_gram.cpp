// The Gram-space path of fast_weight_unroll on the CPU (the maths: metakernels/fast_weight.h):
// mse with the same support set every step, the bias folded in as a column of ones. Instead of T
// steps of n × d_in × d_out products, one task costs two such products each way plus T products
// of n × n matrices (and, with a readout, the readout's own products).
//
// Accuracy: A_t and S_{t+1} = Σ_{s≤t} η_s A_s are built by the same recurrence the steps run
// (A_{t+1} = A_t − η_t K A_t), so rounding behaves like the step loop's, with no
// eigendecomposition and no division: stable for η_t‖K‖ < 2, the condition for the inner loop
// itself not to diverge. The backward is reverse mode through that recurrence, products only.
//
// Backward in Gram space. Every output adjoint reaches R_0 = X̃ W̃_0 − Y and S through
// "pushed" n × d_out matrices: Ŵ̃_T gives U = X̃ Ŵ̃_T, and the readout after step t gives
// V_t = X̃ Q̃_tᵀ Ô_t (both through W̃_{t+1} = W̃_0 − (1/n) X̃ᵀ S_{t+1} R_0). With
// Vc_s = U + Σ_{t≥s} V_t, the adjoint of A_s is η_s C_s with C_s = −(1/n) Vc_s R_0ᵀ, and
// R̂_0 = −(1/n) Σ_s η_s A_s Vc_s; then, for s = T−1 … 0,
//   η̂_s = ⟨C_s, A_s⟩ − ⟨Â_{s+1}, K A_s⟩,   K̂ −= η_s Â_{s+1} A_sᵀ,
//   Â_s = η_s C_s + (I − η_s K) Â_{s+1}.
// Without a readout Vc_s = U, C_s = Ŝ = −(1/n) U R_0ᵀ and R̂_0 = −(1/n) S U. First order keeps
// η̂_s = ⟨C_s, A_s⟩ (= −⟨Vc_s, E_s⟩) and the readout's direct terms.
#include <algorithm>
#include <cstring>
#include <vector>

#include "metakernels/fast_weight.h"
#include "small_gemm.h"
#include "unroll_helpers.h"

namespace metakernels {

namespace {

// One task's Gram-space matrices: Xᵀ, K, and for t < T: A_t, K A_t, S_{t+1} (stacked [T, n, n]).
template <typename T>
struct GramSpace {
  int64_t n, d_in, steps;
  std::vector<T> x_transposed, gram, powers, gram_powers, partial_sums;

  GramSpace(int64_t n_, int64_t d_in_, int64_t steps_)
      : n(n_), d_in(d_in_), steps(steps_), x_transposed(d_in_ * n_), gram(n_ * n_),
        powers(steps_ * n_ * n_), gram_powers(steps_ * n_ * n_), partial_sums(steps_ * n_ * n_) {}

  const T* power(int64_t t) const { return powers.data() + t * n * n; }
  const T* gram_power(int64_t t) const { return gram_powers.data() + t * n * n; }
  const T* partial_sum(int64_t t) const { return partial_sums.data() + t * n * n; }  // S_{t+1}
  const T* sum() const { return partial_sum(steps - 1); }                               // S

  // K = (X Xᵀ + [bias] 1 1ᵀ) / n, then A_0 = I, K A_t, A_{t+1} = A_t − η_t K A_t,
  // S_{t+1} = S_t + η_t A_t.
  void build(const T* x, bool has_bias, const T* lr) {
    const int64_t nn = n * n;
    cpu::transpose(n, d_in, x, d_in, x_transposed.data());
    cpu::gemm<T>(n, d_in, n, T(1) / T(n), x, d_in, x_transposed.data(), n, false, gram.data(), n);
    if (has_bias)
      for (T& k : gram) k += T(1) / T(n);
    std::fill(powers.begin(), powers.begin() + nn, T(0));
    for (int64_t i = 0; i < n; ++i) powers[i * n + i] = T(1);
    std::copy(gram.begin(), gram.end(), gram_powers.begin());
    for (int64_t t = 0; t < steps; ++t) {
      const T* a = power(t);
      T* ka = gram_powers.data() + t * nn;
      if (t > 0) cpu::gemm<T>(n, n, n, T(1), gram.data(), n, a, n, false, ka, n);
      T* s = partial_sums.data() + t * nn;
      for (int64_t k = 0; k < nn; ++k) s[k] = (t > 0 ? s[k - nn] : T(0)) + lr[t] * a[k];
      if (t + 1 < steps) {
        T* next = powers.data() + (t + 1) * nn;
        for (int64_t k = 0; k < nn; ++k) next[k] = a[k] - lr[t] * ka[k];
      }
    }
  }
};

// P̃ = Q̃ X̃ᵀ for all T·m query rows of a task: Q Xᵀ, plus 1 with a bias.
template <typename T>
void query_gram(int64_t rows, int64_t d_in, int64_t n, const T* queries, const T* x_transposed,
                bool has_bias, T* out) {
  cpu::gemm<T>(rows, d_in, n, T(1), queries, d_in, x_transposed, n, false, out, n);
  if (has_bias)
    for (int64_t k = 0; k < rows * n; ++k) out[k] += T(1);
}

}  // namespace

template <typename T>
void fast_weight_unroll_gram_forward(const UnrollDims& dims, const UnrollInputs<T>& in,
                                     const UnrollForwardOutputs<T>& out, int64_t task_begin,
                                     int64_t task_end) {
  const int64_t T_ = dims.steps, n = dims.support, d_in = dims.d_in, d_out = dims.d_out;
  const int64_t m = in.queries ? dims.queries : 0;
  const int64_t w_size = d_in * d_out;
  const bool has_bias = in.bias != nullptr;
  const T inv_n = T(1) / T(n);
  GramSpace<T> space(n, d_in, T_);
  // M_{t+1} = S_{t+1} R_0: every step's with a readout, else only M_T.
  std::vector<T> r0(n * d_out), sums_r0((m ? T_ : 1) * n * d_out), query_grams(T_ * m * n);

  for (int64_t b = task_begin; b < task_end; ++b) {
    const T* x = cpu::at_step(in.x, in.x_task_stride, int64_t(0), b, int64_t(0));
    const T* y = cpu::at_step(in.y, in.y_task_stride, int64_t(0), b, int64_t(0));
    const T* lr = in.lr + b * T_;
    const T* weight0 = in.weight + b * in.weight_task_stride;
    const T* bias0 = has_bias ? in.bias + b * in.bias_task_stride : nullptr;

    // R_0 = X W_0 + 1 b_0ᵀ − Y.
    cpu::gemm<T>(n, d_in, d_out, T(1), x, d_in, weight0, d_out, false, r0.data(), d_out);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < d_out; ++j)
        r0[i * d_out + j] += (has_bias ? bias0[j] : T(0)) - y[i * d_out + j];
    space.build(x, has_bias, lr);

    // E_t = A_t R_0 / n, as one product: A_1 … A_{T−1} stacked are [(T − 1) n, n], and E_1 …
    // E_{T−1} stacked [(T − 1) n, d_out]. Then ℓ_t = ½‖R_t‖² / n = n‖E_t‖² / 2.
    T* residual = out.residual + b * T_ * n * d_out;
    for (int64_t k = 0; k < n * d_out; ++k) residual[k] = r0[k] * inv_n;
    if (out.first_residual_only) {
      std::fill(residual + n * d_out, residual + T_ * n * d_out, T(0));
    } else {
      cpu::gemm<T>((T_ - 1) * n, n, d_out, inv_n, space.power(1), n, r0.data(), d_out, false,
                   residual + n * d_out, d_out);
      for (int64_t t = 0; t < T_; ++t) {
        const T* e = residual + t * n * d_out;
        out.losses[b * T_ + t] = T(0.5) * T(n) * cpu::dot(n * d_out, e, e);
      }
    }

    // M_{t+1} = S_{t+1} R_0, and W̃_T = W̃_0 − (1/n) X̃ᵀ M_T.
    cpu::gemm<T>((m ? T_ : 1) * n, n, d_out, T(1), m ? space.partial_sum(0) : space.sum(), n,
                 r0.data(), d_out, false, sums_r0.data(), d_out);
    const T* m_last = sums_r0.data() + (m ? (T_ - 1) * n * d_out : 0);
    if (out.sum_residual) {
      std::memcpy(out.sum_residual + b * n * d_out, m_last, sizeof(T) * n * d_out);
    } else {
      T* weight = out.weight + b * w_size;
      cpu::gemm_tn_add<T>(d_in, n, d_out, -inv_n, x, d_in, space.x_transposed.data(), m_last,
                          d_out, weight0, d_out, weight, d_out);
      if (has_bias) {
        T* bias = out.bias + b * d_out;
        std::memcpy(bias, bias0, sizeof(T) * d_out);
        cpu::add_column_sums(n, d_out, m_last, -inv_n, bias);
      }
    }

    // O_t = Q̃_t W̃_{t+1} = Q_t W_0 + 1 b_0ᵀ − (1/n) (Q̃_t X̃ᵀ) M_{t+1}.
    if (m) {
      const T* queries = in.queries + b * T_ * m * d_in;
      T* readout = out.readout + b * T_ * m * d_out;
      cpu::gemm<T>(T_ * m, d_in, d_out, T(1), queries, d_in, weight0, d_out, false, readout,
                   d_out);
      if (has_bias)
        for (int64_t i = 0; i < T_ * m; ++i)
          for (int64_t j = 0; j < d_out; ++j) readout[i * d_out + j] += bias0[j];
      query_gram(T_ * m, d_in, n, queries, space.x_transposed.data(), has_bias,
                 query_grams.data());
      for (int64_t t = 0; t < T_; ++t)
        cpu::gemm<T>(m, n, d_out, -inv_n, query_grams.data() + t * m * n, n,
                     sums_r0.data() + t * n * d_out, d_out, true, readout + t * m * d_out, d_out);
    }
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
  const bool readout = in.queries != nullptr && args.grad_readout != nullptr;
  const int64_t m = readout ? dims.queries : 0;
  const T inv_n = T(1) / T(n);
  GramSpace<T> space(n, d_in, T_);
  std::vector<T> r0(n * d_out), r0_transposed(d_out * n), pushed(n * d_out), s_adj(nn);
  std::vector<T> a_adj(nn), k_adj(nn), scratch(nn), r0_adj(n * d_out);
  std::vector<T> b_adj(d_out), transposed_w(w_size);
  // With a readout: Q̃_t X̃ᵀ, V_t = X̃ Q̃_tᵀ Ô_t, M_{t+1} = S_{t+1} R_0, N_t = M_{t+1} Ô_tᵀ, Ô_tᵀ.
  const bool want_n = m && ((args.grad_x && second_order) || args.grad_queries);
  std::vector<T> query_grams(T_ * m * n), readout_pushed(T_ * n * d_out);
  std::vector<T> sums_r0(want_n ? T_ * n * d_out : 0), cross(want_n ? n * m : 0);
  std::vector<T> readout_adj_t(want_n ? d_out * m : 0);
  std::vector<T> m_last(second_order && args.grad_x ? n * d_out : 0);

  for (int64_t b = task_begin; b < task_end; ++b) {
    const T* x = cpu::at_step(in.x, in.x_task_stride, int64_t(0), b, int64_t(0));
    const T* lr = in.lr + b * T_;
    const T* weight0 = in.weight + b * in.weight_task_stride;
    const T* w_adj = args.grad_weight_final + b * w_size;  // Ŵ_T
    const T* queries = m ? in.queries + b * T_ * m * d_in : nullptr;
    const T* readout_adj = m ? args.grad_readout + b * T_ * m * d_out : nullptr;
    if (has_bias && args.grad_bias_final)
      std::memcpy(b_adj.data(), args.grad_bias_final + b * d_out, sizeof(T) * d_out);
    else
      std::fill(b_adj.begin(), b_adj.end(), T(0));
    const T* e0 = args.residual + b * T_ * n * d_out;
    for (int64_t k = 0; k < n * d_out; ++k) r0[k] = T(n) * e0[k];
    space.build(x, has_bias, lr);
    // The reverse loop, for η̂, K̂ (x's gradient) and, with a readout, R̂_0; without them (a
    // meta-gradient of the init alone) the backward needs only S.
    const bool want_k_adj = second_order && args.grad_x;
    const bool reverse_loop = args.grad_lr || want_k_adj || m;
    if (reverse_loop) cpu::transpose(n, d_out, r0.data(), d_out, r0_transposed.data());

    // U = X̃ Ŵ̃_T (kept in `pushed`, which becomes Vc_s below) and V_t = X̃ Q̃_tᵀ Ô_t.
    if (args.pushed_final) {
      std::memcpy(pushed.data(), args.pushed_final + b * n * d_out, sizeof(T) * n * d_out);
    } else {
      cpu::gemm<T>(n, d_in, d_out, T(1), x, d_in, w_adj, d_out, false, pushed.data(), d_out);
      if (has_bias)
        for (int64_t i = 0; i < n; ++i)
          for (int64_t j = 0; j < d_out; ++j) pushed[i * d_out + j] += b_adj[j];
    }
    if (m) {
      query_gram(T_ * m, d_in, n, queries, space.x_transposed.data(), has_bias,
                 query_grams.data());
      for (int64_t t = 0; t < T_; ++t)
        cpu::gemm_tn<T>(n, m, d_out, T(1), query_grams.data() + t * m * n, n, nullptr,
                        readout_adj + t * m * d_out, d_out, false,
                        readout_pushed.data() + t * n * d_out, d_out);
    }

    // The reverse loop: η̂, K̂, and (with a readout) R̂_0; C_s = Ŝ throughout without one.
    if (!m && reverse_loop)
      cpu::gemm<T>(n, d_out, n, -inv_n, pushed.data(), d_out, r0_transposed.data(), n, false,
                   s_adj.data(), n);
    std::fill(r0_adj.begin(), r0_adj.end(), T(0));
    if (reverse_loop) {
      std::fill(a_adj.begin(), a_adj.end(), T(0));  // Â_T = 0: A_T is not used
      std::fill(k_adj.begin(), k_adj.end(), T(0));
      for (int64_t t = T_ - 1; t >= 0; --t) {
        if (m) {  // Vc_t = Vc_{t+1} + V_t, C_t = −(1/n) Vc_t R_0ᵀ, R̂_0 −= (η_t/n) A_t Vc_t
          const T* v = readout_pushed.data() + t * n * d_out;
          for (int64_t k = 0; k < n * d_out; ++k) pushed[k] += v[k];
          cpu::gemm<T>(n, d_out, n, -inv_n, pushed.data(), d_out, r0_transposed.data(), n, false,
                       s_adj.data(), n);
          if (second_order)
            cpu::gemm<T>(n, n, d_out, -lr[t] * inv_n, space.power(t), n, pushed.data(), d_out,
                         true, r0_adj.data(), d_out);
        }
        T lr_adj = cpu::dot(nn, s_adj.data(), space.power(t));
        if (!second_order) {
          if (args.grad_lr) args.grad_lr[b * T_ + t] = lr_adj;
          continue;
        }
        lr_adj -= cpu::dot(nn, a_adj.data(), space.gram_power(t));
        if (args.grad_lr) args.grad_lr[b * T_ + t] = lr_adj;
        if (want_k_adj && t + 1 < T_)
          cpu::gemm<T>(n, n, n, -lr[t], a_adj.data(), n, space.power(t), n, true, k_adj.data(), n);
        if (t > 0) {  // Â_t = η_t C_t + Â_{t+1} − η_t K Â_{t+1}
          cpu::gemm<T>(n, n, n, T(1), space.gram.data(), n, a_adj.data(), n, false,
                       scratch.data(), n);
          for (int64_t k = 0; k < nn; ++k) a_adj[k] += lr[t] * (s_adj[k] - scratch[k]);
        }
      }
    }

    // The readout's direct terms: Ŵ_0 += Σ_t Q_tᵀ Ô_t, b̂_0 += Σ_t 1ᵀ Ô_t (first order too).
    T* grad_weight =
        args.grad_weight ? args.grad_weight + (args.sum_grad_weight ? 0 : b * w_size) : nullptr;
    T* grad_bias = args.grad_bias ? args.grad_bias + b * d_out : nullptr;
    if (grad_weight) {
      if (args.sum_grad_weight)
        for (int64_t k = 0; k < w_size; ++k) grad_weight[k] += w_adj[k];
      else
        std::memcpy(grad_weight, w_adj, sizeof(T) * w_size);
      if (m)
        cpu::gemm_tn<T>(d_in, T_ * m, d_out, T(1), queries, d_in, nullptr, readout_adj, d_out,
                        true, grad_weight, d_out);
    }
    if (grad_bias) {
      std::memcpy(grad_bias, b_adj.data(), sizeof(T) * d_out);
      if (m) cpu::add_column_sums(T_ * m, d_out, readout_adj, T(1), grad_bias);
    }

    // Q̂_t = Ô_t W_{t+1}ᵀ = Ô_t W_0ᵀ − (1/n) N_tᵀ X, N_t = M_{t+1} Ô_tᵀ (first order too).
    if (want_n)
      cpu::gemm<T>(T_ * n, n, d_out, T(1), space.partial_sum(0), n, r0.data(), d_out, false,
                   sums_r0.data(), d_out);
    if (args.grad_queries) {
      T* grad_queries = args.grad_queries + b * T_ * dims.queries * d_in;
      if (!m) {
        std::fill(grad_queries, grad_queries + T_ * dims.queries * d_in, T(0));
      } else {
        cpu::transpose(d_in, d_out, weight0, d_out, transposed_w.data());
        cpu::gemm<T>(T_ * m, d_out, d_in, T(1), readout_adj, d_out, transposed_w.data(), d_in,
                     false, grad_queries, d_in);
      }
    }
    T* grad_x = args.grad_x ? args.grad_x + b * n * d_in : nullptr;
    if (grad_x && !second_order) std::fill(grad_x, grad_x + n * d_in, T(0));
    if (grad_x && second_order) {
      // X̂ = −(1/n) M_T Ŵ_Tᵀ + R̂_0 W_0ᵀ + (1/n)(K̂ + K̂ᵀ) X − (1/n) Σ_t N_t Q_t (below).
      cpu::gemm<T>(n, n, d_out, T(1), space.sum(), n, r0.data(), d_out, false, m_last.data(),
                   d_out);
      cpu::transpose(d_in, d_out, w_adj, d_out, transposed_w.data());
      cpu::gemm<T>(n, d_out, d_in, -inv_n, m_last.data(), d_out, transposed_w.data(), d_in,
                   false, grad_x, d_in);
    }
    if (want_n) {
      for (int64_t t = 0; t < T_; ++t) {
        const T* adj = readout_adj + t * m * d_out;
        cpu::transpose(m, d_out, adj, d_out, readout_adj_t.data());
        cpu::gemm<T>(n, d_out, m, T(1), sums_r0.data() + t * n * d_out, d_out,
                     readout_adj_t.data(), m, false, cross.data(), m);
        if (args.grad_queries)
          cpu::gemm_tn<T>(m, n, d_in, -inv_n, cross.data(), m, nullptr, x, d_in, true,
                          args.grad_queries + (b * T_ + t) * m * d_in, d_in);
        if (grad_x && second_order)
          cpu::gemm<T>(n, m, d_in, -inv_n, cross.data(), m, queries + t * m * d_in, d_in, true,
                       grad_x, d_in);
      }
    }

    if (!second_order) {  // FOMAML: nothing flows through E_t into W_0, b_0, x or y.
      if (args.grad_y)
        std::fill(args.grad_y + b * n * d_out, args.grad_y + (b + 1) * n * d_out, T(0));
      continue;
    }

    // R̂_0 (= −(1/n) S U without a readout); Ŵ_0 += Xᵀ R̂_0, b̂_0 += 1ᵀ R̂_0, Ŷ = −R̂_0.
    if (!m)
      cpu::gemm<T>(n, n, d_out, -inv_n, space.sum(), n, pushed.data(), d_out, false,
                   r0_adj.data(), d_out);
    if (grad_weight)
      cpu::gemm_tn<T>(d_in, n, d_out, T(1), x, d_in, space.x_transposed.data(), r0_adj.data(),
                      d_out, true, grad_weight, d_out);
    if (grad_bias) cpu::add_column_sums(n, d_out, r0_adj.data(), T(1), grad_bias);
    if (args.grad_y) {
      T* grad_y = args.grad_y + b * n * d_out;
      for (int64_t k = 0; k < n * d_out; ++k) grad_y[k] = -r0_adj[k];
    }
    if (grad_x) {
      cpu::transpose(d_in, d_out, weight0, d_out, transposed_w.data());
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
