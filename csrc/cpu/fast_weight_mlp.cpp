// The MLP fast-weight kernels on the CPU (metakernels/fast_weight_mlp.h;
// docs/ops/fast_weight_mlp.md has the maths, README "MLP fast weights" the derivation).
//
// One task at a time, all its state in a per-call workspace: θ packed into P numbers, the
// activations of one step (n or m rows). Forward, per step: A_l = H_l W_l + 1 b_lᵀ,
// H_{l+1} = σ(A_l); E = ∂ℓ/∂Z; Δ_{L−1} = E, Δ_{l−1} = (Δ_l W_lᵀ) ∘ σ'(A_{l−1}); G_l = H_lᵀ Δ_l,
// g_l = 1ᵀ Δ_l; θ ← θ − η (P ∘ G). Backward, per step from the last, with the adjoint θ̂' of
// θ_{t+1} and the direction V = (D_l = P_l ∘ Ŵ'_l, d_l = b̂'_l): the tangent of the forward in
// V (Ȧ_l = Ḣ_l W_l + H_l D_l + 1 d_lᵀ, Ḣ_{l+1} = σ'(A_l) ∘ Ȧ_l) and the reverse of ψ = ⟨E, Ż⟩
// (Ā_{L−1} = H_E Ż; W̄_l = Ḣ_lᵀ Δ_l + H_lᵀ Ā_l, b̄_l = 1ᵀ Ā_l; H̄_l = Ā_l W_lᵀ + Δ_l D_lᵀ;
// Ā_{l−1} = H̄_l ∘ σ'(A_{l−1}) + (Δ_l W_lᵀ) ∘ σ''(A_{l−1}) ∘ Ȧ_{l−1}; X̄ = Ā_0 W_0ᵀ + Δ_0 D_0ᵀ),
// so θ̂_t = θ̂' − η θ̄ (the Hessian-vector product), X̂_t −= η X̄, Ŷ_t += η Ż / n (mse),
// η̂_t = −⟨V, ∇ℓ⟩, P̂_l −= η Ŵ'_l ∘ G_l. No torch here.
#include "metakernels/fast_weight_mlp.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "metakernels/tile_math.h"
#include "small_gemm.h"
#include "unroll_helpers.h"

namespace metakernels {

namespace {

using cpu::add_column_sums;
using cpu::dot;
using cpu::gemm;
using cpu::gemm_add;
using cpu::gemm_tn;

// C[rows, cols] (+)= alpha · A[rows, inner] · Bt[cols, inner]ᵀ: the products with a weight's
// transpose (Δ_l W_lᵀ, Ā_l W_lᵀ, Δ_l D_lᵀ), on a transposed copy of the weight in a per-thread
// buffer. (Dot products along `inner` on the weight in place measured ~1.4× slower on
// maml-sinusoid: their horizontal sums cost as much as the products at these widths.)
template <typename T>
void gemm_nt(int64_t rows, int64_t inner, int64_t cols, T alpha, const T* a, int64_t lda,
             const T* bt, int64_t ldbt, bool accumulate, T* c, int64_t ldc) {
  thread_local std::vector<T> b;
  b.resize(static_cast<size_t>(inner * cols));
  cpu::transpose(cols, inner, bt, ldbt, b.data());
  gemm<T>(rows, inner, cols, alpha, a, lda, b.data(), cols, accumulate, c, ldc);
}

// out[i] = f(pre[i]) for i < size, with the activation chosen once outside the loop (so that the
// loop vectorises where f does).
template <typename T, typename F>
void for_activation(Activation act, int64_t size, F&& body) {
  switch (act) {
    case Activation::kRelu:
      for (int64_t i = 0; i < size; ++i) body(i, std::integral_constant<int, 0>());
      return;
    case Activation::kTanh:
      for (int64_t i = 0; i < size; ++i) body(i, std::integral_constant<int, 1>());
      return;
    case Activation::kGelu:
      for (int64_t i = 0; i < size; ++i) body(i, std::integral_constant<int, 2>());
      return;
    default:
      for (int64_t i = 0; i < size; ++i) body(i, std::integral_constant<int, 3>());
      return;
  }
}

// Offsets of the packed parameters and of the per-row activation buffers.
struct Layout {
  int64_t layers = 0;
  const int64_t* w = nullptr;      // widths d_0 … d_L
  std::vector<int64_t> w_off, b_off;  // into θ
  int64_t weights_total = 0, params = 0;
  std::vector<int64_t> out_off, in_off;  // per row: Σ_{j<l} d_{j+1}, Σ_{j<l} d_j
  int64_t out_total = 0, in_total = 0;

  explicit Layout(const MlpDims& d) : layers(d.layers), w(d.widths) {
    for (int64_t l = 0; l < layers; ++l) {
      w_off.push_back(weights_total);
      weights_total += w[l] * w[l + 1];
      out_off.push_back(out_total);
      out_total += w[l + 1];
      in_off.push_back(in_total);
      in_total += w[l];
    }
    params = weights_total;
    for (int64_t l = 0; l < layers; ++l) {
      b_off.push_back(params);
      if (d.bias) params += w[l + 1];
    }
  }
};

// Φ(a) and φ(a), the standard normal's distribution and density (gelu's parts). In double,
// std::erf; in float, Abramowitz & Stegun 7.1.26 (|erf error| ≤ 1.5e-7, below float32's
// resolution of gelu's terms) on the e^{−a²/2} that φ needs anyway: one exp per element instead
// of an erf and an exp (erf was a sixth of ttt-mlp's time).
inline void normal_cdf_pdf(double a, double& cdf, double& pdf) {
  cdf = 0.5 * (1.0 + std::erf(a * M_SQRT1_2));
  pdf = std::exp(-0.5 * a * a) * (0.5 * M_2_SQRTPI * M_SQRT1_2);
}

inline void normal_cdf_pdf(float a, float& cdf, float& pdf) {
  const float z = std::fabs(a) * float(M_SQRT1_2);
  const float t = 1.0f / (1.0f + 0.3275911f * z);
  const float gauss = std::exp(-z * z);
  const float poly =
      t * (0.254829592f +
           t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
  const float erf_abs = 1.0f - poly * gauss;
  cdf = 0.5f * (1.0f + (a < 0.0f ? -erf_abs : erf_abs));
  pdf = gauss * float(0.5 * M_2_SQRTPI * M_SQRT1_2);
}

template <typename T>
struct ActivationMath {
  // gelu in its erf form, as torch's F.gelu.
  // σ''(a): relu 0; tanh −2 s (1 − s²); gelu φ(a)(2 − a²); silu s(1 − s)(2 + a(1 − 2s)).
  static T second(Activation f, T a) {
    switch (f) {
      case Activation::kRelu: return T(0);
      case Activation::kTanh: {
        const T s = std::tanh(a);
        return T(-2) * s * (T(1) - s * s);
      }
      case Activation::kGelu:
        return std::exp(T(-0.5) * a * a) * T(0.5 * M_2_SQRTPI * M_SQRT1_2) * (T(2) - a * a);
      default: {
        const T s = T(1) / (T(1) + std::exp(-a));
        return s * (T(1) - s) * (T(2) + a * (T(1) - T(2) * s));
      }
    }
  }
  // σ(a) and σ'(a) together (gelu and silu share their erf / exp).
  static void value_and_first(Activation f, T a, T& value, T& first) {
    switch (f) {
      case Activation::kRelu:
        value = a > T(0) ? a : T(0);
        first = a > T(0) ? T(1) : T(0);
        return;
      case Activation::kTanh: {
        const T s = std::tanh(a);
        value = s;
        first = T(1) - s * s;
        return;
      }
      case Activation::kGelu: {
        T cdf, pdf;
        normal_cdf_pdf(a, cdf, pdf);
        value = a * cdf;
        first = cdf + a * pdf;
        return;
      }
      default: {
        const T s = T(1) / (T(1) + std::exp(-a));
        value = a * s;
        first = s * (T(1) + a * (T(1) - s));
        return;
      }
    }
  }
};

// One thread's workspace: θ and its adjoint, and the activations of up to `rows` rows.
template <typename T>
struct Work {
  const MlpDims& d;
  const Layout& lay;
  int64_t cap;  // rows
  std::vector<T> theta, next_theta, adj, grad, dir;
  std::vector<T> a, h, slope, delta, back, adot, hdot, abar, hbar, probs, segment;

  Work(const MlpDims& dims, const Layout& layout, int64_t rows, int64_t segment_states)
      : d(dims), lay(layout), cap(std::max<int64_t>(rows, 1)) {
    const auto p = static_cast<size_t>(lay.params);
    theta.resize(p);
    next_theta.resize(p);
    adj.resize(p);
    grad.resize(p);
    dir.resize(p);
    const auto outs = static_cast<size_t>(cap * lay.out_total);
    const auto ins = static_cast<size_t>(cap * lay.in_total);
    a.resize(outs);
    delta.resize(outs);
    adot.resize(outs);
    abar.resize(outs);
    h.resize(ins);
    slope.resize(ins);
    back.resize(ins);
    hdot.resize(ins);
    hbar.resize(ins);
    probs.resize(static_cast<size_t>(lay.w[lay.layers]));
    segment.resize(static_cast<size_t>(segment_states * lay.params));
  }
  int64_t width(int64_t l) const { return lay.w[l]; }
  T* A(int64_t l) { return a.data() + cap * lay.out_off[l]; }
  T* Delta(int64_t l) { return delta.data() + cap * lay.out_off[l]; }
  T* Adot(int64_t l) { return adot.data() + cap * lay.out_off[l]; }
  T* Abar(int64_t l) { return abar.data() + cap * lay.out_off[l]; }
  // H_l, l ≥ 1 (H_0 is the input itself); Back_l = Δ_l W_lᵀ, l ≥ 1.
  T* H(int64_t l) { return h.data() + cap * lay.in_off[l]; }
  T* Slope(int64_t l) { return slope.data() + cap * lay.in_off[l]; }  // σ'(A_{l−1})
  T* Back(int64_t l) { return back.data() + cap * lay.in_off[l]; }
  T* Hdot(int64_t l) { return hdot.data() + cap * lay.in_off[l]; }
  T* Hbar(int64_t l) { return hbar.data() + cap * lay.in_off[l]; }
};

template <typename T>
const T* layer_input(Work<T>& ws, const T* input, int64_t l) {
  return l == 0 ? input : ws.H(l);
}

// A_l and H_l of `rows` rows of input at θ; returns Z = A_{L−1} (rows × d_L).
template <typename T>
T* forward_rows(Work<T>& ws, const T* theta, const T* input, int64_t rows) {
  const Layout& lay = ws.lay;
  for (int64_t l = 0; l < lay.layers; ++l) {
    const int64_t din = lay.w[l], dout = lay.w[l + 1];
    const T* bias = ws.d.bias ? theta + lay.b_off[l] : nullptr;
    gemm_add<T>(rows, din, dout, T(1), layer_input(ws, input, l), din, theta + lay.w_off[l], dout,
                bias, 0, ws.A(l), dout);
    if (l + 1 < lay.layers) {
      const T* pre = ws.A(l);
      T* post = ws.H(l + 1);
      T* slope = ws.Slope(l + 1);
      for_activation<T>(ws.d.activation, rows * dout, [&](int64_t i, auto kind) {
        ActivationMath<T>::value_and_first(static_cast<Activation>(decltype(kind)::value),
                                           pre[i], post[i], slope[i]);
      });
    }
  }
  return ws.A(lay.layers - 1);
}

// Backpropagation from Δ_{L−1} (in ws.Delta(L−1)) after forward_rows at θ: Δ_l and Back_l
// for every layer; grad (+)= alpha · (H_lᵀ Δ_l, 1ᵀ Δ_l) packed (grad null: not formed);
// grad_input (+)= alpha · Δ_0 W_0ᵀ where not null.
template <typename T>
void backprop_rows(Work<T>& ws, const T* theta, const T* input, int64_t rows, T* grad,
                   bool accumulate, T alpha, T* grad_input) {
  const Layout& lay = ws.lay;
  for (int64_t l = lay.layers - 1; l >= 0; --l) {
    const int64_t din = lay.w[l], dout = lay.w[l + 1];
    const T* delta = ws.Delta(l);
    if (grad != nullptr)
      gemm_tn<T>(din, rows, dout, alpha, layer_input(ws, input, l), din, nullptr, delta, dout,
                 accumulate, grad + lay.w_off[l], dout);
    if (grad != nullptr && ws.d.bias) {
      T* gb = grad + lay.b_off[l];
      if (!accumulate) std::fill(gb, gb + dout, T(0));
      add_column_sums(rows, dout, delta, alpha, gb);
    }
    if (l > 0) {
      T* back = ws.Back(l);
      gemm_nt<T>(rows, dout, din, T(1), delta, dout, theta + lay.w_off[l], dout, false,
                 back, din);
      const T* slope = ws.Slope(l);
      T* below = ws.Delta(l - 1);
      for (int64_t i = 0; i < rows * din; ++i) below[i] = back[i] * slope[i];
    } else if (grad_input != nullptr) {
      gemm_nt<T>(rows, dout, din, alpha, delta, dout, theta, dout, true, grad_input, din);
    }
  }
}

// ℓ of Z (rows × d_L) against mse targets or ce labels, Z turned in place into E = ∂ℓ/∂Z;
// returns ℓ (the mean over the rows).
template <typename T>
T loss_residual(Loss loss, T* z_to_e, int64_t rows, int64_t width, const T* y,
                const int64_t* labels) {
  const T inv = T(1) / static_cast<T>(rows);
  T total = T(0);
  if (loss == Loss::kMse) {
    total = cpu::mse_residual(rows * width, z_to_e, y, inv);
  } else {
    for (int64_t i = 0; i < rows; ++i)
      total += ce_row_residual(z_to_e + i * width, labels[i], width, inv);
  }
  return total * inv;
}

template <typename T>
struct StepData {
  const T* x;            // [n, d_0]
  const T* y;            // [n, d_L] (mse)
  const int64_t* labels; // [n] (ce)
};

template <typename T>
StepData<T> step_data(const MlpDims& d, const MlpInputs<T>& in, int64_t task, int64_t t) {
  const int64_t n = d.support, d0 = d.widths[0], dl = d.widths[d.layers];
  const int64_t index = d.x_per_step ? task * d.steps + t : task;
  StepData<T> s;
  s.x = in.x + index * n * d0;
  s.y = d.loss == Loss::kMse ? in.y + index * n * dl : nullptr;
  s.labels = d.loss == Loss::kMse ? nullptr : in.labels + index * n;
  return s;
}

// The inner gradient at θ on one step's support set into ws.grad (not formed without
// `with_grad`), with every activation of the step left in ws; returns ℓ_t.
template <typename T>
T inner_gradient(Work<T>& ws, const T* theta, const StepData<T>& s, bool with_grad = true) {
  const int64_t n = ws.d.support, dl = ws.lay.w[ws.lay.layers];
  T* z = forward_rows(ws, theta, s.x, n);
  const T loss = loss_residual(ws.d.loss, z, n, dl, s.y, s.labels);
  std::memcpy(ws.Delta(ws.lay.layers - 1), z, sizeof(T) * static_cast<size_t>(n * dl));
  backprop_rows(ws, theta, s.x, n, with_grad ? ws.grad.data() : nullptr, false, T(1),
                static_cast<T*>(nullptr));
  return loss;
}

// θ ← θ − η (P ∘ G) (biases unscaled).
template <typename T>
void sgd_update(Work<T>& ws, const MlpInputs<T>& in, T* theta, T lr) {
  const Layout& lay = ws.lay;
  const T* g = ws.grad.data();
  for (int64_t l = 0; l < lay.layers; ++l) {
    const int64_t size = lay.w[l] * lay.w[l + 1], off = lay.w_off[l];
    if (in.lr_scale != nullptr) {
      const T* scale = in.lr_scale[l];
      for (int64_t i = 0; i < size; ++i) theta[off + i] -= lr * (scale[i] * g[off + i]);
    } else {
      for (int64_t i = 0; i < size; ++i) theta[off + i] -= lr * g[off + i];
    }
  }
  for (int64_t i = lay.weights_total; i < lay.params; ++i) theta[i] -= lr * g[i];
}

template <typename T>
void pack_theta(const Layout& lay, const MlpDims& d, const T* const* weights,
                const T* const* biases, int64_t task, T* theta) {
  for (int64_t l = 0; l < lay.layers; ++l) {
    const int64_t size = lay.w[l] * lay.w[l + 1];
    if (weights != nullptr)
      std::memcpy(theta + lay.w_off[l], weights[l] + task * size, sizeof(T) * size);
    if (d.bias && biases != nullptr)
      std::memcpy(theta + lay.b_off[l], biases[l] + task * lay.w[l + 1], sizeof(T) * lay.w[l + 1]);
  }
}

template <typename T>
void unpack_theta(const Layout& lay, const MlpDims& d, const T* theta, int64_t task,
                  T* const* weights, T* const* biases) {
  for (int64_t l = 0; l < lay.layers; ++l) {
    const int64_t size = lay.w[l] * lay.w[l + 1];
    if (weights != nullptr)
      std::memcpy(weights[l] + task * size, theta + lay.w_off[l], sizeof(T) * size);
    if (d.bias && biases != nullptr)
      std::memcpy(biases[l] + task * lay.w[l + 1], theta + lay.b_off[l], sizeof(T) * lay.w[l + 1]);
  }
}

// The query block of step t (readout, form B) or the one block (form A).
template <typename T>
struct QueryBlock {
  const T* q;
  const T* y;
  const int64_t* labels;
  int64_t index;  // block index into [B, blocks, m, ·]
};

template <typename T>
QueryBlock<T> query_block(const MlpDims& d, const MlpInputs<T>& in, int64_t task, int64_t t) {
  const int64_t m = d.query_rows, d0 = d.widths[0], dl = d.widths[d.layers];
  const int64_t index = d.query_per_step ? task * d.steps + t : task;
  QueryBlock<T> b;
  b.index = index;
  b.q = in.queries + index * m * d0;
  b.y = in.query_y != nullptr ? in.query_y + index * m * dl : nullptr;
  b.labels = in.query_labels != nullptr ? in.query_labels + index * m : nullptr;
  return b;
}

}  // namespace

int64_t mlp_param_count(const MlpDims& d) { return Layout(d).params; }

template <typename T>
void fast_weight_mlp_forward(const MlpDims& d, const MlpInputs<T>& in,
                             const MlpForwardOutputs<T>& out, int64_t task_begin,
                             int64_t task_end) {
  if (task_begin >= task_end) return;
  const Layout lay(d);
  Work<T> ws(d, lay, std::max(d.support, d.query_rows), 0);
  const int64_t m = d.query_rows, dl = lay.w[lay.layers];
  const int64_t kept = d.stride > 0 ? (d.steps + d.stride - 1) / d.stride : 0;
  for (int64_t task = task_begin; task < task_end; ++task) {
    T* theta = ws.theta.data();
    pack_theta(lay, d, in.weights, in.biases, task, theta);
    T task_loss = T(0);
    for (int64_t t = 0; t < d.steps; ++t) {
      if (d.stride > 0 && t % d.stride == 0)
        std::memcpy(out.states + (task * kept + t / d.stride) * lay.params, theta,
                    sizeof(T) * lay.params);
      out.losses[task * d.steps + t] = inner_gradient(ws, theta, step_data(d, in, task, t));
      sgd_update(ws, in, theta, in.lr[task * d.steps + t]);
      if (m > 0 && d.query_per_step) {
        const auto qb = query_block(d, in, task, t);
        T* o = forward_rows(ws, theta, qb.q, m);
        if (d.meta_loss)
          task_loss += loss_residual(d.loss, o, m, dl, qb.y, qb.labels);
        else
          std::memcpy(out.readout + qb.index * m * dl, o, sizeof(T) * m * dl);
      }
    }
    if (m > 0 && d.meta_loss && !d.query_per_step) {
      const auto qb = query_block(d, in, task, 0);
      T* o = forward_rows(ws, theta, qb.q, m);
      task_loss = loss_residual(d.loss, o, m, dl, qb.y, qb.labels);
    }
    if (d.meta_loss) out.task_loss[task] = task_loss;
    unpack_theta(lay, d, theta, task, out.weights_final, out.biases_final);
  }
}

namespace {

// The adjoints of one query block at θ: top is the adjoint of the
// network's output, Ô (readout mode: given; meta-loss: c · E_q computed here). Adds into
// ws.adj; writes grad_queries and grad_query_y of the block where wanted.
template <typename T>
void query_backward(Work<T>& ws, const MlpInputs<T>& in, const MlpBackwardArgs<T>& args,
                    const T* theta, int64_t task, int64_t t) {
  const MlpDims& d = ws.d;
  const int64_t m = d.query_rows, d0 = ws.lay.w[0], dl = ws.lay.w[ws.lay.layers];
  const auto qb = query_block(d, in, task, t);
  T* top = ws.Delta(ws.lay.layers - 1);
  T* o = forward_rows(ws, theta, qb.q, m);
  if (d.meta_loss) {
    const T c = args.grad_out[task];
    loss_residual(d.loss, o, m, dl, qb.y, qb.labels);
    for (int64_t i = 0; i < m * dl; ++i) top[i] = c * o[i];
    if (args.grad_query_y != nullptr)
      for (int64_t i = 0; i < m * dl; ++i) args.grad_query_y[qb.index * m * dl + i] = -top[i];
  } else {
    std::memcpy(top, args.grad_out + qb.index * m * dl, sizeof(T) * m * dl);
  }
  T* grad_q = args.grad_queries != nullptr ? args.grad_queries + qb.index * m * d0 : nullptr;
  if (grad_q != nullptr) std::fill(grad_q, grad_q + m * d0, T(0));
  backprop_rows(ws, theta, qb.q, m, ws.adj.data(), true, T(1), grad_q);
}

// Step t's reverse at θ_t, ws.adj holding θ̂_{t+1} on entry and θ̂_t on return.
template <typename T>
void step_backward(Work<T>& ws, const MlpInputs<T>& in, const MlpBackwardArgs<T>& args,
                   const T* theta, int64_t task, int64_t t, int64_t x_index) {
  const MlpDims& d = ws.d;
  const Layout& lay = ws.lay;
  const int64_t n = d.support, L = lay.layers, d0 = lay.w[0], dl = lay.w[L];
  const auto s = step_data(d, in, task, t);
  // Second order, η̂ = −⟨V, ∇ℓ⟩ = −⟨E, Ż⟩ comes from the tangent; G itself only for first order
  // and for lr_scale's gradient.
  const bool with_grad = args.first_order || args.grad_lr_scale != nullptr;
  inner_gradient(ws, theta, s, with_grad);  // activations, E (= Δ_{L−1}), Δ_l, Back_l (, G)
  const T lr = in.lr[task * d.steps + t];
  T* adj = ws.adj.data();
  T* dir = ws.dir.data();
  const T* g = ws.grad.data();
  // V = (P ∘ Ŵ', b̂'), from θ̂_{t+1} before it changes.
  for (int64_t l = 0; l < L; ++l) {
    const int64_t size = lay.w[l] * lay.w[l + 1], off = lay.w_off[l];
    if (in.lr_scale != nullptr) {
      const T* scale = in.lr_scale[l];
      for (int64_t i = 0; i < size; ++i) dir[off + i] = scale[i] * adj[off + i];
      if (args.grad_lr_scale != nullptr) {
        T* gs = args.grad_lr_scale[l] + task * size;
        for (int64_t i = 0; i < size; ++i) gs[i] -= lr * adj[off + i] * g[off + i];
      }
    } else {
      std::memcpy(dir + off, adj + off, sizeof(T) * size);
    }
  }
  std::memcpy(dir + lay.weights_total, adj + lay.weights_total,
              sizeof(T) * (lay.params - lay.weights_total));
  if (args.first_order) {
    if (args.grad_lr != nullptr) args.grad_lr[task * d.steps + t] = -dot(lay.params, dir, g);
    return;
  }

  // The tangent of the step's forward in direction V.
  for (int64_t l = 0; l < L; ++l) {
    const int64_t din = lay.w[l], dout = lay.w[l + 1];
    const T* bias_dir = d.bias ? dir + lay.b_off[l] : nullptr;
    T* adot = ws.Adot(l);
    gemm_add<T>(n, din, dout, T(1), layer_input(ws, s.x, l), din, dir + lay.w_off[l], dout,
                bias_dir, 0, adot, dout);
    if (l > 0)
      gemm<T>(n, din, dout, T(1), ws.Hdot(l), din, theta + lay.w_off[l], dout, true, adot, dout);
    if (l + 1 < L) {
      const T* slope = ws.Slope(l + 1);
      T* hdot = ws.Hdot(l + 1);
      for (int64_t i = 0; i < n * dout; ++i) hdot[i] = slope[i] * adot[i];
    }
  }
  // Ā_{L−1} = H_E Ż.
  const T* zdot = ws.Adot(L - 1);
  if (args.grad_lr != nullptr)
    args.grad_lr[task * d.steps + t] = -dot(n * dl, ws.Delta(L - 1), zdot);
  T* abar_top = ws.Abar(L - 1);
  const T inv_n = T(1) / static_cast<T>(n);
  if (d.loss == Loss::kMse) {
    for (int64_t i = 0; i < n * dl; ++i) abar_top[i] = zdot[i] * inv_n;
    if (args.grad_y != nullptr) {
      T* gy = args.grad_y + x_index * n * dl;
      for (int64_t i = 0; i < n * dl; ++i) gy[i] += lr * abar_top[i];
    }
  } else {
    const T* e = ws.Delta(L - 1);
    for (int64_t i = 0; i < n; ++i) {
      ce_probs_from_residual(e + i * dl, s.labels[i], dl, static_cast<T>(n), ws.probs.data());
      softmax_jacobian_row(ws.probs.data(), zdot + i * dl, dl, inv_n, abar_top + i * dl);
    }
  }
  T* grad_x = args.grad_x != nullptr ? args.grad_x + x_index * n * d0 : nullptr;
  for (int64_t l = L - 1; l >= 0; --l) {
    const int64_t din = lay.w[l], dout = lay.w[l + 1];
    const T* abar = ws.Abar(l);
    const T* delta = ws.Delta(l);
    T* adj_w = adj + lay.w_off[l];
    gemm_tn<T>(din, n, dout, -lr, layer_input(ws, s.x, l), din, nullptr, abar, dout, true, adj_w,
               dout);
    if (l > 0)
      gemm_tn<T>(din, n, dout, -lr, ws.Hdot(l), din, nullptr, delta, dout, true, adj_w, dout);
    if (d.bias) add_column_sums(n, dout, abar, -lr, adj + lay.b_off[l]);
    if (l > 0) {
      T* hbar = ws.Hbar(l);
      gemm_nt<T>(n, dout, din, T(1), abar, dout, theta + lay.w_off[l], dout, false, hbar, din);
      gemm_nt<T>(n, dout, din, T(1), delta, dout, dir + lay.w_off[l], dout, true, hbar, din);
      const T* pre = ws.A(l - 1);
      const T* back = ws.Back(l);
      const T* adot_below = ws.Adot(l - 1);
      T* abar_below = ws.Abar(l - 1);
      const T* slope = ws.Slope(l);
      if (d.activation == Activation::kRelu) {
        for (int64_t i = 0; i < n * din; ++i) abar_below[i] = hbar[i] * slope[i];
      } else {
        for (int64_t i = 0; i < n * din; ++i)
          abar_below[i] = hbar[i] * slope[i] +
                          back[i] * ActivationMath<T>::second(d.activation, pre[i]) * adot_below[i];
      }
    } else if (grad_x != nullptr) {
      gemm_nt<T>(n, dout, din, -lr, abar, dout, theta, dout, true, grad_x, din);
      gemm_nt<T>(n, dout, din, -lr, delta, dout, dir, dout, true, grad_x, din);
    }
  }
}

}  // namespace

template <typename T>
void fast_weight_mlp_backward(const MlpDims& d, const MlpInputs<T>& in,
                              const MlpBackwardArgs<T>& args, int64_t task_begin,
                              int64_t task_end) {
  if (task_begin >= task_end) return;
  const Layout lay(d);
  const int64_t stride = std::max<int64_t>(d.stride, 1);
  Work<T> ws(d, lay, std::max(d.support, d.query_rows), stride > 1 ? stride : 0);
  const int64_t L = lay.layers, n = d.support, m = d.query_rows, d0 = lay.w[0], dl = lay.w[L];
  const int64_t kept = (d.steps + stride - 1) / stride;
  const int64_t x_blocks = d.x_per_step ? d.steps : 1;
  const int64_t q_blocks = d.query_per_step ? d.steps : 1;
  for (int64_t task = task_begin; task < task_end; ++task) {
    // Outputs accumulated over steps start at zero.
    if (args.grad_x != nullptr)
      std::fill_n(args.grad_x + task * x_blocks * n * d0, x_blocks * n * d0, T(0));
    if (args.grad_y != nullptr)
      std::fill_n(args.grad_y + task * x_blocks * n * dl, x_blocks * n * dl, T(0));
    if (args.grad_lr_scale != nullptr)
      for (int64_t l = 0; l < L; ++l) {
        const int64_t size = lay.w[l] * lay.w[l + 1];
        std::fill_n(args.grad_lr_scale[l] + task * size, size, T(0));
      }
    if (m > 0 && args.grad_queries != nullptr && !(d.meta_loss || args.grad_out != nullptr))
      std::fill_n(args.grad_queries + task * q_blocks * m * d0, q_blocks * m * d0, T(0));
    if (m > 0 && args.grad_query_y != nullptr && !d.meta_loss)
      std::fill_n(args.grad_query_y + task * q_blocks * m * dl, q_blocks * m * dl, T(0));

    T* adj = ws.adj.data();
    std::fill(ws.adj.begin(), ws.adj.end(), T(0));
    pack_theta(lay, d, args.grad_weights_final, args.grad_biases_final, task, adj);
    T* theta_next = ws.next_theta.data();
    pack_theta(lay, d, args.weights_final, args.biases_final, task, theta_next);
    const bool queried = m > 0 && (d.meta_loss || args.grad_out != nullptr);
    if (queried && !d.query_per_step) {
      query_backward(ws, in, args, theta_next, task, 0);
    }
    for (int64_t seg = kept - 1; seg >= 0; --seg) {
      const int64_t start = seg * stride, stop = std::min(start + stride, d.steps);
      const T* kept_state = args.states + (task * kept + seg) * lay.params;
      // θ_t of the segment's steps: the kept one, then recomputed.
      T* states = ws.segment.data();
      if (stride > 1) {
        std::memcpy(states, kept_state, sizeof(T) * lay.params);
        for (int64_t t = start + 1; t < stop; ++t) {
          T* theta = states + (t - start) * lay.params;
          std::memcpy(theta, theta - lay.params, sizeof(T) * lay.params);
          inner_gradient(ws, theta, step_data(d, in, task, t - 1));
          sgd_update(ws, in, theta, in.lr[task * d.steps + t - 1]);
        }
      }
      for (int64_t t = stop - 1; t >= start; --t) {
        const T* theta = stride > 1 ? states + (t - start) * lay.params : kept_state;
        if (queried && d.query_per_step) {
          query_backward(ws, in, args, theta_next, task, t);
        }
        step_backward(ws, in, args, theta, task, t, d.x_per_step ? task * d.steps + t : task);
        std::memcpy(theta_next, theta, sizeof(T) * lay.params);
      }
    }
    unpack_theta(lay, d, adj, task, args.grad_weights, args.grad_biases);
  }
}

template void fast_weight_mlp_forward<float>(const MlpDims&, const MlpInputs<float>&,
                                             const MlpForwardOutputs<float>&, int64_t, int64_t);
template void fast_weight_mlp_forward<double>(const MlpDims&, const MlpInputs<double>&,
                                              const MlpForwardOutputs<double>&, int64_t, int64_t);
template void fast_weight_mlp_backward<float>(const MlpDims&, const MlpInputs<float>&,
                                              const MlpBackwardArgs<float>&, int64_t, int64_t);
template void fast_weight_mlp_backward<double>(const MlpDims&, const MlpInputs<double>&,
                                               const MlpBackwardArgs<double>&, int64_t, int64_t);

}  // namespace metakernels
