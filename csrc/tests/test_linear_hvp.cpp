// linear_hvp_forward (docs/ops/linear_hvp.md) against a central finite difference of the inner-loss
// gradient, H·v ≈ (∇ℓ(W + hV, b + h v_b) − ∇ℓ(W − hV, b − h v_b)) / 2h, with ∇ℓ computed naively
// here, and against the closed form Xᵀ H_E (X V + 1 v_bᵀ) written with an explicit Jacobian.
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "check.h"
#include "metakernels/fast_weight.h"

namespace {

using metakernels::HvpArgs;
using metakernels::Loss;
using Vec = std::vector<double>;

struct Config {
  const char* name;
  Loss loss;
  int64_t B, n, d_in, d_out;
  bool shared_weight;
  int bias;           // 0: none, 1: shared bias and v_bias, 2: per task, 3: per-task bias, null v_bias
  bool null_weight;   // mse reads no weight: pass null
  int64_t pad;        // extra elements in the weight / bias task strides
};

struct Problem {
  Config c;
  Vec weight;  // [B, d_in, d_out] (logical, per task even when shared in the kernel call)
  Vec bias;    // [B, d_out] or empty
  Vec x;       // [B, n, d_in]
  Vec y;       // [B, n, d_out] (mse)
  std::vector<int64_t> labels;  // [B, n] (ce)
  Vec v;       // [B, d_in, d_out]
  Vec v_bias;  // [B, d_out] (zero when the kernel gets none)
};

// ∇ℓ at (W, b) for task b: (G = Xᵀ E, g = 1ᵀ E), E from docs/ops/fast_weight_unroll.md.
void inner_gradient(const Problem& p, int64_t task, const double* W, const double* bias, double* G,
                    double* g) {
  const Config& c = p.c;
  const int64_t n = c.n, d_in = c.d_in, d_out = c.d_out;
  const double* X = p.x.data() + task * n * d_in;
  for (int64_t k = 0; k < d_in * d_out; ++k) G[k] = 0.0;
  for (int64_t j = 0; j < d_out; ++j) g[j] = 0.0;
  Vec e(d_out);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < d_out; ++j) {
      double z = bias ? bias[j] : 0.0;
      for (int64_t k = 0; k < d_in; ++k) z += X[i * d_in + k] * W[k * d_out + j];
      e[j] = z;
    }
    if (c.loss == Loss::kMse) {
      const double* y = p.y.data() + (task * n + i) * d_out;
      for (int64_t j = 0; j < d_out; ++j) e[j] = (e[j] - y[j]) / double(n);
    } else {
      const int64_t label = p.labels[task * n + i];
      double z_max = e[0];
      for (int64_t j = 1; j < d_out; ++j) z_max = std::fmax(z_max, e[j]);
      double sum = 0.0;
      for (int64_t j = 0; j < d_out; ++j) sum += std::exp(e[j] - z_max);
      for (int64_t j = 0; j < d_out; ++j)
        e[j] = (std::exp(e[j] - z_max) / sum - (j == label ? 1.0 : 0.0)) / double(n);
    }
    for (int64_t j = 0; j < d_out; ++j) {
      g[j] += e[j];
      for (int64_t k = 0; k < d_in; ++k) G[k * d_out + j] += X[i * d_in + k] * e[j];
    }
  }
}

// Xᵀ H_E (X V + 1 v_bᵀ) with H_E = I/n (mse) or diag(p) − p pᵀ over n per row (ce).
void closed_form(const Problem& p, int64_t task, double* hv, double* hv_b) {
  const Config& c = p.c;
  const int64_t n = c.n, d_in = c.d_in, d_out = c.d_out, w = d_in * d_out;
  const double* X = p.x.data() + task * n * d_in;
  const double* W = p.weight.data() + task * w;
  const double* V = p.v.data() + task * w;
  const double* vb = p.v_bias.data() + task * d_out;
  for (int64_t k = 0; k < w; ++k) hv[k] = 0.0;
  for (int64_t j = 0; j < d_out; ++j) hv_b[j] = 0.0;
  Vec u(d_out), z(d_out), ze(d_out);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < d_out; ++j) {
      u[j] = vb[j];
      z[j] = c.bias ? p.bias[task * d_out + j] : 0.0;
      for (int64_t k = 0; k < d_in; ++k) {
        u[j] += X[i * d_in + k] * V[k * d_out + j];
        z[j] += X[i * d_in + k] * W[k * d_out + j];
      }
    }
    if (c.loss == Loss::kMse) {
      for (int64_t j = 0; j < d_out; ++j) ze[j] = u[j] / double(n);
    } else {
      double z_max = z[0], sum = 0.0;
      for (int64_t j = 1; j < d_out; ++j) z_max = std::fmax(z_max, z[j]);
      Vec prob(d_out);
      for (int64_t j = 0; j < d_out; ++j) sum += (prob[j] = std::exp(z[j] - z_max));
      for (double& q : prob) q /= sum;
      for (int64_t a = 0; a < d_out; ++a) {
        ze[a] = 0.0;
        for (int64_t b = 0; b < d_out; ++b)
          ze[a] += ((a == b ? prob[a] : 0.0) - prob[a] * prob[b]) * u[b] / double(n);
      }
    }
    for (int64_t j = 0; j < d_out; ++j) {
      hv_b[j] += ze[j];
      for (int64_t k = 0; k < d_in; ++k) hv[k * d_out + j] += X[i * d_in + k] * ze[j];
    }
  }
}

template <typename T>
struct Result {
  mk_test::OutBuffer<T> hv_weight, hv_bias;
};

// Calls the kernel in T over tasks [0, 1) and [1, B); a shared weight / bias / v_bias is taken
// from task 0 of the logical arrays (make_problem makes them equal across tasks).
template <typename T>
void run_kernel(const Problem& p, Result<T>& r) {
  const Config& c = p.c;
  const int64_t w = c.d_in * c.d_out;
  const T nan = mk_test::nan_value<T>();
  std::vector<T> weight, bias, v_bias;
  const int64_t w_stride = c.shared_weight ? 0 : w + c.pad;
  const int64_t b_stride = c.bias == 1 ? 0 : c.d_out + c.pad;
  const int64_t copies_w = c.shared_weight ? 1 : c.B, copies_b = c.bias == 1 ? 1 : c.B;
  weight.assign(copies_w * (w + c.pad), nan);
  for (int64_t b = 0; b < copies_w; ++b)
    for (int64_t k = 0; k < w; ++k) weight[b * w_stride + k] = static_cast<T>(p.weight[b * w + k]);
  if (c.bias) {
    bias.assign(copies_b * (c.d_out + c.pad), nan);
    v_bias.assign(copies_b * (c.d_out + c.pad), nan);
    for (int64_t b = 0; b < copies_b; ++b)
      for (int64_t j = 0; j < c.d_out; ++j) {
        bias[b * b_stride + j] = static_cast<T>(p.bias[b * c.d_out + j]);
        v_bias[b * b_stride + j] = static_cast<T>(p.v_bias[b * c.d_out + j]);
      }
  }
  const std::vector<T> x(p.x.begin(), p.x.end()), v(p.v.begin(), p.v.end());
  r.hv_weight.reset(c.B * w);
  r.hv_bias.reset(c.bias ? c.B * c.d_out : 0);
  HvpArgs<T> args;
  args.tasks = c.B;
  args.support = c.n;
  args.d_in = c.d_in;
  args.d_out = c.d_out;
  args.loss = c.loss;
  args.weight = c.null_weight ? nullptr : weight.data();
  args.weight_task_stride = w_stride;
  args.bias = c.bias ? bias.data() : nullptr;
  args.bias_task_stride = b_stride;
  args.x = x.data();
  args.v = v.data();
  args.v_bias = c.bias && c.bias != 3 ? v_bias.data() : nullptr;
  args.v_bias_task_stride = b_stride;
  args.hv_weight = r.hv_weight.data();
  args.hv_bias = c.bias ? r.hv_bias.data() : nullptr;
  metakernels::linear_hvp_forward<T>(args, 0, 1);
  metakernels::linear_hvp_forward<T>(args, 1, c.B);
}

Problem make_problem(const Config& c) {
  Problem p;
  p.c = c;
  const int64_t w = c.d_in * c.d_out;
  const double x_scale = 1.0 / std::sqrt(double(c.d_in));
  p.weight = mk_test::randn<double>(c.B * w, 2.0 * x_scale);
  if (c.shared_weight)
    for (int64_t b = 1; b < c.B; ++b)
      for (int64_t k = 0; k < w; ++k) p.weight[b * w + k] = p.weight[k];
  p.x = mk_test::randn<double>(c.B * c.n * c.d_in, x_scale);
  if (c.loss == Loss::kMse)
    p.y = mk_test::randn<double>(c.B * c.n * c.d_out);
  else
    p.labels = mk_test::randint(c.B * c.n, c.d_out);
  p.v = mk_test::randn<double>(c.B * w);
  p.v_bias.assign(c.B * c.d_out, 0.0);
  if (c.bias) {
    p.bias = mk_test::randn<double>(c.B * c.d_out, 0.5);
    if (c.bias != 3) p.v_bias = mk_test::randn<double>(c.B * c.d_out);
    if (c.bias == 1)
      for (int64_t b = 1; b < c.B; ++b)
        for (int64_t j = 0; j < c.d_out; ++j) {
          p.bias[b * c.d_out + j] = p.bias[j];
          p.v_bias[b * c.d_out + j] = p.v_bias[j];
        }
  }
  return p;
}

void run_case(const Config& c) {
  mk_test::current_context() = c.name;
  const Problem p = make_problem(c);
  const int64_t w = c.d_in * c.d_out;
  Result<double> r;
  run_kernel(p, r);
  CHECK_MSG(r.hv_weight.all_finite(), "hv_weight has NaN (unwritten) elements");
  CHECK_MSG(r.hv_bias.all_finite(), "hv_bias has NaN (unwritten) elements");
  CHECK(r.hv_weight.guards_intact() && r.hv_bias.guards_intact());

  // Finite difference of the naive gradient, and the closed form.
  const double h = 1e-5;
  Vec fd_w(c.B * w), fd_b(c.bias ? c.B * c.d_out : 0), cf_w(c.B * w), cf_b(c.B * c.d_out);
  for (int64_t b = 0; b < c.B; ++b) {
    Vec w_plus(w), w_minus(w), b_plus(c.d_out), b_minus(c.d_out);
    for (int64_t k = 0; k < w; ++k) {
      w_plus[k] = p.weight[b * w + k] + h * p.v[b * w + k];
      w_minus[k] = p.weight[b * w + k] - h * p.v[b * w + k];
    }
    for (int64_t j = 0; j < c.d_out && c.bias; ++j) {
      b_plus[j] = p.bias[b * c.d_out + j] + h * p.v_bias[b * c.d_out + j];
      b_minus[j] = p.bias[b * c.d_out + j] - h * p.v_bias[b * c.d_out + j];
    }
    Vec G_plus(w), G_minus(w), g_plus(c.d_out), g_minus(c.d_out);
    inner_gradient(p, b, w_plus.data(), c.bias ? b_plus.data() : nullptr, G_plus.data(),
                   g_plus.data());
    inner_gradient(p, b, w_minus.data(), c.bias ? b_minus.data() : nullptr, G_minus.data(),
                   g_minus.data());
    for (int64_t k = 0; k < w; ++k) fd_w[b * w + k] = (G_plus[k] - G_minus[k]) / (2 * h);
    for (int64_t j = 0; j < c.d_out && c.bias; ++j)
      fd_b[b * c.d_out + j] = (g_plus[j] - g_minus[j]) / (2 * h);
    closed_form(p, b, cf_w.data() + b * w, cf_b.data() + b * c.d_out);
  }
  const double fd_tol = c.loss == Loss::kMse ? 1e-8 : 1e-7;
  CHECK_ALLCLOSE(r.hv_weight.values(), fd_w, fd_tol);
  CHECK_ALLCLOSE(r.hv_weight.values(), cf_w, 1e-12);
  if (c.bias) {
    CHECK_ALLCLOSE(r.hv_bias.values(), fd_b, fd_tol);
    CHECK_ALLCLOSE(r.hv_bias.values(), cf_b, 1e-12);
  }

  // float against double.
  Result<float> rf;
  run_kernel(p, rf);
  CHECK(rf.hv_weight.all_finite() && rf.hv_bias.all_finite());
  CHECK(rf.hv_weight.guards_intact() && rf.hv_bias.guards_intact());
  CHECK_ALLCLOSE(rf.hv_weight.values(), r.hv_weight.values(), 1e-5);
  CHECK_ALLCLOSE(rf.hv_bias.values(), r.hv_bias.values(), 1e-5);
}

}  // namespace

int main() {
  //      name                                     loss                B  n  d_in d_out shW  bias nullW pad
  const Config configs[] = {
      {"mse no bias", Loss::kMse, 3, 5, 7, 6, false, 0, false, 2},
      {"mse shared W, shared b", Loss::kMse, 3, 5, 7, 6, true, 1, false, 0},
      {"mse per-task b, weight not read", Loss::kMse, 3, 5, 7, 6, false, 2, true, 1},
      {"mse d_out=1, b without v_bias", Loss::kMse, 3, 4, 5, 1, false, 3, false, 1},
      {"mse n=1 d_in=70 d_out=71", Loss::kMse, 2, 1, 70, 71, false, 2, false, 0},
      {"ce no bias", Loss::kCrossEntropy, 3, 5, 7, 6, false, 0, false, 1},
      {"ce shared W, shared b", Loss::kCrossEntropy, 3, 5, 7, 6, true, 1, false, 0},
      {"ce per-task b", Loss::kCrossEntropy, 3, 5, 7, 6, false, 2, false, 3},
      {"ce b without v_bias", Loss::kCrossEntropy, 2, 5, 7, 6, true, 3, false, 0},
      {"ce head d_in=70 d_out=5 n=9", Loss::kCrossEntropy, 2, 9, 70, 5, true, 2, false, 0},
      {"ce d_out=70 n=1", Loss::kCrossEntropy, 2, 1, 9, 70, false, 1, false, 2},
  };
  for (const Config& c : configs) run_case(c);
  return mk_test::report("test_linear_hvp");
}
