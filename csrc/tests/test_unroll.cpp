// fast_weight_unroll_forward / _backward (csrc/cpu/fast_weight_unroll.cpp):
//   (a) the forward against a naive re-implementation of docs/ops/fast_weight_unroll.md, written
//   here; (b) the second-order backward against central finite differences of the scalar objective
//       J = <A, W_T> + <a, b_T> + Σ_t <C_t, O_t>, whose adjoints are grad_weight_final = A,
//       grad_bias_final = a, grad_readout = C;
//   (c) first_order = true against the FOMAML recurrences of docs/ops/fast_weight_unroll.md,
//   written here; (d) the float instantiation against the double one, calls without states /
//   without optional
//       adjoints against the full calls, and task ranges split across calls.
// Every output buffer starts as NaN (with a sentinel guard after it), and the padding of the
// strided inputs holds NaN, so an unwritten output or a read outside an input shows up.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "check.h"
#include "metakernels/fast_weight.h"

namespace {

using metakernels::Loss;
using metakernels::UnrollBackwardArgs;
using metakernels::UnrollDims;
using metakernels::UnrollForwardOutputs;
using metakernels::UnrollInputs;
using Vec = std::vector<double>;

struct Config {
  const char* name;
  Loss loss;
  int64_t B, T, n, d_in, d_out, m;  // m = 0: no queries
  bool x4d;                         // x [B, T, n, d_in] (else [B, n, d_in], x_step_stride = 0)
  bool shared_weight, has_bias, shared_bias, has_lr_scale, has_bias_lr_scale;
  int64_t pad;  // extra (NaN) elements in the task and step strides of the strided inputs
};

// The inputs in their logical dense shapes (docs/ops/fast_weight_unroll.md), in double.
struct Problem {
  Config c;
  Vec weight;                   // [d_in, d_out] shared, or [B, d_in, d_out]
  Vec bias;                     // [d_out] shared, [B, d_out], or empty
  Vec x;                        // [B, S, n, d_in], S = T for 4-D x, 1 for 3-D x
  Vec y;                        // [B, S, n, d_out] (mse)
  std::vector<int64_t> labels;  // [B, S, n] (ce)
  Vec lr;                       // [B, T]
  Vec lr_scale;                 // [d_in, d_out] or empty
  Vec bias_lr_scale;            // [d_out] or empty
  Vec queries;                  // [B, T, m, d_in] or empty

  int64_t x_steps() const { return c.x4d ? c.T : 1; }
  int64_t w_size() const { return c.d_in * c.d_out; }
  const double* x_at(int64_t b, int64_t t) const {
    return x.data() + (b * x_steps() + (c.x4d ? t : 0)) * c.n * c.d_in;
  }
  const double* y_at(int64_t b, int64_t t) const {
    return y.data() + (b * x_steps() + (c.x4d ? t : 0)) * c.n * c.d_out;
  }
  const int64_t* labels_at(int64_t b, int64_t t) const {
    return labels.data() + (b * x_steps() + (c.x4d ? t : 0)) * c.n;
  }
};

Problem make_problem(const Config& c) {
  Problem p;
  p.c = c;
  const int64_t w = c.d_in * c.d_out, S = c.x4d ? c.T : 1;
  // Rows of x and queries have norm about 1, so that a learning rate of 0.1-0.3 is stable.
  const double x_scale = 1.0 / std::sqrt(double(c.d_in));
  p.weight = mk_test::randn<double>((c.shared_weight ? 1 : c.B) * w, x_scale * 2.0);
  if (c.has_bias) p.bias = mk_test::randn<double>((c.shared_bias ? 1 : c.B) * c.d_out, 0.5);
  p.x = mk_test::randn<double>(c.B * S * c.n * c.d_in, x_scale);
  if (c.loss == Loss::kMse)
    p.y = mk_test::randn<double>(c.B * S * c.n * c.d_out);
  else
    p.labels = mk_test::randint(c.B * S * c.n, c.d_out);
  p.lr = mk_test::uniform<double>(c.B * c.T, 0.1, 0.3);
  if (c.has_lr_scale) p.lr_scale = mk_test::uniform<double>(w, 0.5, 1.5);
  if (c.has_bias_lr_scale) p.bias_lr_scale = mk_test::uniform<double>(c.d_out, 0.5, 1.5);
  if (c.m > 0) p.queries = mk_test::randn<double>(c.B * c.T * c.m * c.d_in, x_scale);
  return p;
}

// ---- the naive reference, straight from docs/ops/fast_weight_unroll.md
// -------------------------------------

struct Trajectory {
  Vec weight_final;     // [B, d_in, d_out]
  Vec bias_final;       // [B, d_out] (with bias)
  Vec losses;           // [B, T]
  Vec readout;          // [B, T, m, d_out]
  Vec residual;         // [B, T, n, d_out]  E_t
  Vec states;           // [B, T, d_in, d_out]  W_t before step t
  Vec inner_grad;       // [B, T, d_in, d_out]  G_t
  Vec bias_inner_grad;  // [B, T, d_out]  g_t
};

Trajectory naive_forward(const Problem& p) {
  const Config& c = p.c;
  const int64_t B = c.B, T = c.T, n = c.n, d_in = c.d_in, d_out = c.d_out, m = c.m;
  const int64_t w = d_in * d_out;
  Trajectory r;
  r.weight_final.assign(B * w, 0.0);
  if (c.has_bias) r.bias_final.assign(B * d_out, 0.0);
  r.losses.assign(B * T, 0.0);
  r.readout.assign(B * T * m * d_out, 0.0);
  r.residual.assign(B * T * n * d_out, 0.0);
  r.states.assign(B * T * w, 0.0);
  r.inner_grad.assign(B * T * w, 0.0);
  r.bias_inner_grad.assign(B * T * d_out, 0.0);
  for (int64_t b = 0; b < B; ++b) {
    Vec W(p.weight.begin() + (c.shared_weight ? 0 : b * w),
          p.weight.begin() + (c.shared_weight ? 0 : b * w) + w);
    Vec bb(d_out, 0.0);
    if (c.has_bias)
      for (int64_t j = 0; j < d_out; ++j) bb[j] = p.bias[(c.shared_bias ? 0 : b * d_out) + j];
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t k = 0; k < w; ++k) r.states[(b * T + t) * w + k] = W[k];
      const double* X = p.x_at(b, t);
      Vec Z(n * d_out, 0.0);
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < d_out; ++j) {
          double z = bb[j];
          for (int64_t k = 0; k < d_in; ++k) z += X[i * d_in + k] * W[k * d_out + j];
          Z[i * d_out + j] = z;
        }
      double* E = r.residual.data() + (b * T + t) * n * d_out;
      double loss = 0.0;
      for (int64_t i = 0; i < n; ++i) {
        const double* z = Z.data() + i * d_out;
        if (c.loss == Loss::kMse) {
          const double* y = p.y_at(b, t) + i * d_out;
          for (int64_t j = 0; j < d_out; ++j) {
            loss += 0.5 * (z[j] - y[j]) * (z[j] - y[j]) / double(n);
            E[i * d_out + j] = (z[j] - y[j]) / double(n);
          }
        } else {
          const int64_t label = p.labels_at(b, t)[i];
          double z_max = z[0];
          for (int64_t j = 1; j < d_out; ++j) z_max = std::fmax(z_max, z[j]);
          double sum = 0.0;
          for (int64_t j = 0; j < d_out; ++j) sum += std::exp(z[j] - z_max);
          const double lse = std::log(sum) + z_max;
          loss += (lse - z[label]) / double(n);
          for (int64_t j = 0; j < d_out; ++j)
            E[i * d_out + j] = (std::exp(z[j] - lse) - (j == label ? 1.0 : 0.0)) / double(n);
        }
      }
      r.losses[b * T + t] = loss;
      double* G = r.inner_grad.data() + (b * T + t) * w;
      double* g = r.bias_inner_grad.data() + (b * T + t) * d_out;
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < d_out; ++j) {
          g[j] += E[i * d_out + j];
          for (int64_t k = 0; k < d_in; ++k) G[k * d_out + j] += X[i * d_in + k] * E[i * d_out + j];
        }
      const double lr = p.lr[b * T + t];
      for (int64_t k = 0; k < w; ++k) W[k] -= lr * (c.has_lr_scale ? p.lr_scale[k] : 1.0) * G[k];
      if (c.has_bias)
        for (int64_t j = 0; j < d_out; ++j)
          bb[j] -= lr * (c.has_bias_lr_scale ? p.bias_lr_scale[j] : 1.0) * g[j];
      if (m > 0) {
        const double* Q = p.queries.data() + (b * T + t) * m * d_in;
        double* O = r.readout.data() + (b * T + t) * m * d_out;
        for (int64_t i = 0; i < m; ++i)
          for (int64_t j = 0; j < d_out; ++j) {
            double o = c.has_bias ? bb[j] : 0.0;
            for (int64_t k = 0; k < d_in; ++k) o += Q[i * d_in + k] * W[k * d_out + j];
            O[i * d_out + j] = o;
          }
      }
    }
    for (int64_t k = 0; k < w; ++k) r.weight_final[b * w + k] = W[k];
    if (c.has_bias)
      for (int64_t j = 0; j < d_out; ++j) r.bias_final[b * d_out + j] = bb[j];
  }
  return r;
}

double dot(const Vec& a, const Vec& b) {
  double sum = 0.0;
  for (size_t i = 0; i < a.size(); ++i) sum += a[i] * b[i];
  return sum;
}

// The objective's fixed random adjoints.
struct Adjoints {
  Vec A;  // [B, d_in, d_out]
  Vec a;  // [B, d_out] (with bias)
  Vec C;  // [B, T, m, d_out] (with queries)
};

double objective(const Problem& p, const Adjoints& adj) {
  const Trajectory r = naive_forward(p);
  double J = dot(adj.A, r.weight_final);
  if (p.c.has_bias) J += dot(adj.a, r.bias_final);
  if (p.c.m > 0) J += dot(adj.C, r.readout);
  return J;
}

// ---- calling the kernels ----------------------------------------------------------------------

// The kernel's view of a Problem, in T, with padded strides on the strided inputs.
template <typename T>
struct KernelProblem {
  UnrollDims dims;
  UnrollInputs<T> in;
  std::vector<T> weight, bias, x, y, lr, lr_scale, bias_lr_scale, queries;
  std::vector<int64_t> labels;

  // Copies B·S matrices of `rows` elements each into a buffer with the given strides; the gaps
  // hold `fill`.
  template <typename S, typename D>
  static void strided_copy(const std::vector<S>& src, int64_t B, int64_t S_steps, int64_t size,
                           int64_t task_stride, int64_t step_stride, D fill, std::vector<D>& dst) {
    dst.assign(static_cast<size_t>(B * task_stride + (B == 0 ? 0 : size)), fill);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t s = 0; s < S_steps; ++s)
        for (int64_t k = 0; k < size; ++k)
          dst[b * task_stride + s * step_stride + k] = static_cast<D>(src[(b * S_steps + s) * size + k]);
  }

  explicit KernelProblem(const Problem& p) {
    const Config& c = p.c;
    dims.tasks = c.B;
    dims.steps = c.T;
    dims.support = c.n;
    dims.d_in = c.d_in;
    dims.d_out = c.d_out;
    dims.queries = c.m;
    dims.loss = c.loss;
    const T nan = mk_test::nan_value<T>();
    const int64_t w = c.d_in * c.d_out, S = p.x_steps();

    const int64_t w_stride = c.shared_weight ? 0 : w + c.pad;
    strided_copy(p.weight, c.shared_weight ? 1 : c.B, 1, w, w_stride, 0, nan, weight);
    in.weight = weight.data();
    in.weight_task_stride = w_stride;
    if (c.has_bias) {
      const int64_t b_stride = c.shared_bias ? 0 : c.d_out + c.pad;
      strided_copy(p.bias, c.shared_bias ? 1 : c.B, 1, c.d_out, b_stride, 0, nan, bias);
      in.bias = bias.data();
      in.bias_task_stride = b_stride;
    }
    // x, y, labels: 4-D with a padded step stride, or 3-D with step stride 0.
    const int64_t x_step = c.x4d ? c.n * c.d_in + c.pad : 0;
    const int64_t x_task = c.x4d ? c.T * x_step + c.pad : c.n * c.d_in + c.pad;
    strided_copy(p.x, c.B, S, c.n * c.d_in, x_task, x_step, nan, x);
    in.x = x.data();
    in.x_task_stride = x_task;
    in.x_step_stride = x_step;
    if (c.loss == Loss::kMse) {
      const int64_t y_step = c.x4d ? c.n * c.d_out + c.pad : 0;
      const int64_t y_task = c.x4d ? c.T * y_step + c.pad : c.n * c.d_out + c.pad;
      strided_copy(p.y, c.B, S, c.n * c.d_out, y_task, y_step, nan, y);
      in.y = y.data();
      in.y_task_stride = y_task;
      in.y_step_stride = y_step;
    } else {
      const int64_t l_step = c.x4d ? c.n + c.pad : 0;
      const int64_t l_task = c.x4d ? c.T * l_step + c.pad : c.n + c.pad;
      strided_copy(p.labels, c.B, S, c.n, l_task, l_step, int64_t(0), labels);
      in.labels = labels.data();
      in.labels_task_stride = l_task;
      in.labels_step_stride = l_step;
    }
    lr.assign(p.lr.begin(), p.lr.end());
    in.lr = lr.data();
    if (c.has_lr_scale) {
      lr_scale.assign(p.lr_scale.begin(), p.lr_scale.end());
      in.lr_scale = lr_scale.data();
    }
    if (c.has_bias_lr_scale) {
      bias_lr_scale.assign(p.bias_lr_scale.begin(), p.bias_lr_scale.end());
      in.bias_lr_scale = bias_lr_scale.data();
    }
    if (c.m > 0) {
      queries.assign(p.queries.begin(), p.queries.end());
      in.queries = queries.data();
    }
  }
  KernelProblem(const KernelProblem&) = delete;
};

template <typename T>
struct ForwardResult {
  mk_test::OutBuffer<T> weight, bias, losses, readout, residual, states;
};

// Runs the forward over tasks [0, split) and [split, B) in two calls.
template <typename T>
void run_forward(const Config& c, const KernelProblem<T>& kp, bool with_states, ForwardResult<T>& r) {
  const int64_t w = c.d_in * c.d_out;
  r.weight.reset(c.B * w);
  r.bias.reset(c.has_bias ? c.B * c.d_out : 0);
  r.losses.reset(c.B * c.T);
  r.readout.reset(c.B * c.T * c.m * c.d_out);
  r.residual.reset(c.B * c.T * c.n * c.d_out);
  r.states.reset(with_states ? c.B * c.T * w : 0);
  UnrollForwardOutputs<T> out;
  out.weight = r.weight.data();
  out.bias = c.has_bias ? r.bias.data() : nullptr;
  out.losses = r.losses.data();
  out.readout = c.m > 0 ? r.readout.data() : nullptr;
  out.residual = r.residual.data();
  out.states = with_states ? r.states.data() : nullptr;
  const int64_t split = c.B / 2;
  metakernels::fast_weight_unroll_forward<T>(kp.dims, kp.in, out, 0, split);
  metakernels::fast_weight_unroll_forward<T>(kp.dims, kp.in, out, split, c.B);
}

template <typename T>
struct BackwardResult {
  mk_test::OutBuffer<T> weight, bias, x, y, lr, lr_scale, bias_lr_scale, queries;
};

struct BackwardRequest {
  bool first_order = false;
  bool grad_x = true, grad_queries = true;  // these need states
  bool readout_adjoint = true, bias_adjoint = true;
};

template <typename T>
void run_backward(const Config& c, const KernelProblem<T>& kp, const ForwardResult<T>& fwd,
                  const std::vector<T>& A, const std::vector<T>& a, const std::vector<T>& C,
                  const BackwardRequest& req, BackwardResult<T>& r) {
  const int64_t w = c.d_in * c.d_out, S = c.x4d ? c.T : 1;
  const bool mse = c.loss == Loss::kMse;
  r.weight.reset(c.B * w);
  r.bias.reset(c.has_bias ? c.B * c.d_out : 0);
  r.x.reset(req.grad_x ? c.B * S * c.n * c.d_in : 0);
  r.y.reset(mse ? c.B * S * c.n * c.d_out : 0);
  r.lr.reset(c.B * c.T);
  r.lr_scale.reset(c.has_lr_scale ? c.B * w : 0);
  r.bias_lr_scale.reset(c.has_bias_lr_scale ? c.B * c.d_out : 0);
  r.queries.reset(c.m > 0 && req.grad_queries ? c.B * c.T * c.m * c.d_in : 0);
  UnrollBackwardArgs<T> args;
  args.residual = fwd.residual.data();
  args.states = fwd.states.size > 0 ? fwd.states.data() : nullptr;
  args.weight_final = fwd.weight.data();
  args.grad_weight_final = A.data();
  args.grad_bias_final = c.has_bias && req.bias_adjoint ? a.data() : nullptr;
  args.grad_readout = c.m > 0 && req.readout_adjoint ? C.data() : nullptr;
  args.first_order = req.first_order;
  args.grad_weight = r.weight.data();
  args.grad_bias = c.has_bias ? r.bias.data() : nullptr;
  args.grad_x = req.grad_x ? r.x.data() : nullptr;
  args.grad_y = mse ? r.y.data() : nullptr;
  args.grad_lr = r.lr.data();
  args.grad_lr_scale = c.has_lr_scale ? r.lr_scale.data() : nullptr;
  args.grad_bias_lr_scale = c.has_bias_lr_scale ? r.bias_lr_scale.data() : nullptr;
  args.grad_queries = c.m > 0 && req.grad_queries ? r.queries.data() : nullptr;
  const int64_t split = (c.B + 1) / 2;
  metakernels::fast_weight_unroll_backward<T>(kp.dims, kp.in, args, 0, split);
  metakernels::fast_weight_unroll_backward<T>(kp.dims, kp.in, args, split, c.B);
}

template <typename T>
void check_written(const char* what, const mk_test::OutBuffer<T>& buffer) {
  CHECK_MSG(buffer.all_finite(), std::string(what) + " has NaN (unwritten) elements");
  CHECK_MSG(buffer.guards_intact(), std::string(what) + " written past its end");
}

template <typename T>
void check_forward_written(const ForwardResult<T>& r) {
  check_written("weight", r.weight);
  check_written("bias", r.bias);
  check_written("losses", r.losses);
  check_written("readout", r.readout);
  check_written("residual", r.residual);
  check_written("states", r.states);
}

template <typename T>
void check_backward_written(const BackwardResult<T>& r) {
  check_written("grad_weight", r.weight);
  check_written("grad_bias", r.bias);
  check_written("grad_x", r.x);
  check_written("grad_y", r.y);
  check_written("grad_lr", r.lr);
  check_written("grad_lr_scale", r.lr_scale);
  check_written("grad_bias_lr_scale", r.bias_lr_scale);
  check_written("grad_queries", r.queries);
}

// Σ over tasks of a per-task gradient [B, size] (for a shared input).
template <typename T>
Vec sum_tasks(const std::vector<T>& per_task, int64_t B, int64_t size) {
  Vec out(size, 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t k = 0; k < size; ++k) out[k] += per_task[b * size + k];
  return out;
}

template <typename T>
Vec to_double(const std::vector<T>& v) {
  return Vec(v.begin(), v.end());
}

template <typename T>
std::vector<T> cast(const Vec& v) {
  return std::vector<T>(v.begin(), v.end());
}

// ---- the checks -------------------------------------------------------------------------------

void check_forward(const Problem& p, const Trajectory& ref, const ForwardResult<double>& r) {
  const double tol = 1e-12;
  check_forward_written(r);
  CHECK_ALLCLOSE(r.weight.values(), ref.weight_final, tol);
  if (p.c.has_bias) CHECK_ALLCLOSE(r.bias.values(), ref.bias_final, tol);
  CHECK_ALLCLOSE(r.losses.values(), ref.losses, tol);
  if (p.c.m > 0) CHECK_ALLCLOSE(r.readout.values(), ref.readout, tol);
  CHECK_ALLCLOSE(r.residual.values(), ref.residual, tol);
  CHECK_ALLCLOSE(r.states.values(), ref.states, tol);
  // Inner losses are positive (mse with random targets, ce with more than one class).
  bool positive = true;
  for (double l : r.losses.values()) positive = positive && l > 0.0;
  CHECK(positive);
}

// One input's directional derivative along a random direction: {<gradient, dir>, the central
// difference (J(in + h dir) − J(in − h dir)) / 2h}.
struct Directional {
  double analytic, fd;
  bool close() const {
    return std::fabs(fd - analytic) <= 1e-6 * std::fmax(std::fabs(fd), std::fabs(analytic)) + 1e-9;
  }
};

Directional directional(const Problem& p, const Adjoints& adj, Vec Problem::*field,
                        const Vec& gradient) {
  const Vec& base = p.*field;
  const Vec dir = mk_test::randn<double>(base.size());
  const double h = 1e-5;
  Problem plus = p, minus = p;
  for (size_t k = 0; k < base.size(); ++k) {
    (plus.*field)[k] += h * dir[k];
    (minus.*field)[k] -= h * dir[k];
  }
  return {dot(gradient, dir), (objective(plus, adj) - objective(minus, adj)) / (2 * h)};
}

void check_direction(const char* input, const Problem& p, const Adjoints& adj, Vec Problem::*field,
                     const Vec& gradient) {
  CHECK_MSG(gradient.size() == (p.*field).size(), std::string(input) + ": gradient size mismatch");
  if (gradient.size() != (p.*field).size()) return;
  const Directional d = directional(p, adj, field, gradient);
  CHECK_MSG(d.close(), std::string(input) + mk_test::fmt(": backward %.12g vs finite difference %.12g",
                                                          d.analytic, d.fd));
}

void check_backward_fd(const Problem& p, const Adjoints& adj, const BackwardResult<double>& g) {
  const Config& c = p.c;
  const int64_t w = c.d_in * c.d_out;
  check_backward_written(g);
  check_direction("weight", p, adj, &Problem::weight,
                  c.shared_weight ? sum_tasks(g.weight.values(), c.B, w) : g.weight.values());
  if (c.has_bias)
    check_direction("bias", p, adj, &Problem::bias,
                    c.shared_bias ? sum_tasks(g.bias.values(), c.B, c.d_out) : g.bias.values());
  check_direction("x", p, adj, &Problem::x, g.x.values());
  if (c.loss == Loss::kMse) check_direction("y", p, adj, &Problem::y, g.y.values());
  check_direction("lr", p, adj, &Problem::lr, g.lr.values());
  if (c.has_lr_scale)
    check_direction("lr_scale", p, adj, &Problem::lr_scale, sum_tasks(g.lr_scale.values(), c.B, w));
  if (c.has_bias_lr_scale)
    check_direction("bias_lr_scale", p, adj, &Problem::bias_lr_scale,
                    sum_tasks(g.bias_lr_scale.values(), c.B, c.d_out));
  if (c.m > 0) check_direction("queries", p, adj, &Problem::queries, g.queries.values());
}

// FOMAML (docs/ops/fast_weight_unroll.md): Ŵ_t = Ŵ_{t+1} (+ readout terms), η̂_t, P̂, p̂ from that
// Ŵ; no gradient through E_t (x, y get zero); the queries' gradient is the same as in second order.
void check_first_order(const Problem& p, const Trajectory& ref, const Adjoints& adj,
                       const BackwardResult<double>& fo, const BackwardResult<double>& so) {
  const Config& c = p.c;
  const int64_t B = c.B, T = c.T, m = c.m, d_in = c.d_in, d_out = c.d_out, w = d_in * d_out;
  check_backward_written(fo);
  Vec grad_weight(B * w), grad_bias(B * d_out), grad_lr(B * T), grad_lr_scale(B * w, 0.0),
      grad_bias_lr_scale(B * d_out, 0.0);
  for (int64_t b = 0; b < B; ++b) {
    Vec W_adj(adj.A.begin() + b * w, adj.A.begin() + (b + 1) * w);
    Vec b_adj(d_out, 0.0);
    if (c.has_bias) b_adj.assign(adj.a.begin() + b * d_out, adj.a.begin() + (b + 1) * d_out);
    for (int64_t t = T - 1; t >= 0; --t) {
      if (m > 0) {
        const double* Q = p.queries.data() + (b * T + t) * m * d_in;
        const double* O_adj = adj.C.data() + (b * T + t) * m * d_out;
        for (int64_t i = 0; i < m; ++i)
          for (int64_t j = 0; j < d_out; ++j) {
            if (c.has_bias) b_adj[j] += O_adj[i * d_out + j];
            for (int64_t k = 0; k < d_in; ++k)
              W_adj[k * d_out + j] += Q[i * d_in + k] * O_adj[i * d_out + j];
          }
      }
      const double* G = ref.inner_grad.data() + (b * T + t) * w;
      const double* g = ref.bias_inner_grad.data() + (b * T + t) * d_out;
      const double lr = p.lr[b * T + t];
      double eta_adj = 0.0;
      for (int64_t k = 0; k < w; ++k) {
        const double P = c.has_lr_scale ? p.lr_scale[k] : 1.0;
        eta_adj -= W_adj[k] * P * G[k];
        grad_lr_scale[b * w + k] -= lr * W_adj[k] * G[k];
      }
      if (c.has_bias)
        for (int64_t j = 0; j < d_out; ++j) {
          const double pj = c.has_bias_lr_scale ? p.bias_lr_scale[j] : 1.0;
          eta_adj -= b_adj[j] * pj * g[j];
          grad_bias_lr_scale[b * d_out + j] -= lr * b_adj[j] * g[j];
        }
      grad_lr[b * T + t] = eta_adj;
    }
    for (int64_t k = 0; k < w; ++k) grad_weight[b * w + k] = W_adj[k];
    for (int64_t j = 0; j < d_out; ++j) grad_bias[b * d_out + j] = b_adj[j];
  }
  const double tol = 1e-12;
  CHECK_ALLCLOSE(fo.weight.values(), grad_weight, tol);
  if (c.has_bias) CHECK_ALLCLOSE(fo.bias.values(), grad_bias, tol);
  CHECK_ALLCLOSE(fo.lr.values(), grad_lr, tol);
  if (c.has_lr_scale) CHECK_ALLCLOSE(fo.lr_scale.values(), grad_lr_scale, tol);
  if (c.has_bias_lr_scale && c.has_bias)
    CHECK_ALLCLOSE(fo.bias_lr_scale.values(), grad_bias_lr_scale, tol);
  CHECK(mk_test::max_abs(fo.x.values()) == 0.0);
  CHECK(mk_test::max_abs(fo.y.values()) == 0.0);
  if (m > 0) CHECK_ALLCLOSE(fo.queries.values(), so.queries.values(), 1e-14);
  // Second order differs (the test would notice a backend that ignores first_order).
  CHECK(mk_test::rel_error(fo.weight.values(), so.weight.values()) > 1e-8);
}

template <typename T>
void check_close_to(const char* what, const mk_test::OutBuffer<T>& got,
                    const mk_test::OutBuffer<double>& expected, double tol) {
  const double err = mk_test::rel_error(got.values(), expected.values());
  CHECK_MSG(err <= tol, std::string(what) + mk_test::fmt(": relative error %.3g > %.3g", err, tol));
}

void run_case(const Config& c) {
  mk_test::current_context() = c.name;
  const Problem p = make_problem(c);
  const Trajectory ref = naive_forward(p);
  const int64_t w = c.d_in * c.d_out;

  // (a) forward.
  KernelProblem<double> kp(p);
  ForwardResult<double> fwd;
  run_forward(c, kp, true, fwd);
  check_forward(p, ref, fwd);

  ForwardResult<double> fwd_no_states;
  run_forward(c, kp, false, fwd_no_states);
  check_forward_written(fwd_no_states);
  CHECK_ALLCLOSE(fwd_no_states.weight.values(), fwd.weight.values(), 1e-15);
  CHECK_ALLCLOSE(fwd_no_states.residual.values(), fwd.residual.values(), 1e-15);
  CHECK_ALLCLOSE(fwd_no_states.losses.values(), fwd.losses.values(), 1e-15);

  // (b) second-order backward against finite differences.
  Adjoints adj;
  adj.A = mk_test::randn<double>(c.B * w);
  if (c.has_bias) adj.a = mk_test::randn<double>(c.B * c.d_out);
  if (c.m > 0) adj.C = mk_test::randn<double>(c.B * c.T * c.m * c.d_out);
  BackwardRequest full;
  BackwardResult<double> so;
  run_backward(c, kp, fwd, adj.A, adj.a, adj.C, full, so);
  check_backward_fd(p, adj, so);

  // (c) first order.
  BackwardRequest fo_request;
  fo_request.first_order = true;
  BackwardResult<double> fo;
  run_backward(c, kp, fwd, adj.A, adj.a, adj.C, fo_request, fo);
  check_first_order(p, ref, adj, fo, so);

  // (d) without states (no grad_x, no grad_queries) the other gradients are the same.
  BackwardRequest lean;
  lean.grad_x = false;
  lean.grad_queries = false;
  BackwardResult<double> so_lean;
  run_backward(c, kp, fwd_no_states, adj.A, adj.a, adj.C, lean, so_lean);
  check_backward_written(so_lean);
  CHECK_ALLCLOSE(so_lean.weight.values(), so.weight.values(), 1e-14);
  CHECK_ALLCLOSE(so_lean.bias.values(), so.bias.values(), 1e-14);
  CHECK_ALLCLOSE(so_lean.y.values(), so.y.values(), 1e-14);
  CHECK_ALLCLOSE(so_lean.lr.values(), so.lr.values(), 1e-14);
  CHECK_ALLCLOSE(so_lean.lr_scale.values(), so.lr_scale.values(), 1e-14);
  CHECK_ALLCLOSE(so_lean.bias_lr_scale.values(), so.bias_lr_scale.values(), 1e-14);

  // Null optional adjoints act as zeros.
  if (c.m > 0 || c.has_bias) {
    const Vec zero_a(adj.a.size(), 0.0), zero_C(adj.C.size(), 0.0);
    BackwardResult<double> with_zeros, with_nulls;
    run_backward(c, kp, fwd, adj.A, zero_a, zero_C, full, with_zeros);
    BackwardRequest nulls;
    nulls.readout_adjoint = false;
    nulls.bias_adjoint = false;
    run_backward(c, kp, fwd, adj.A, adj.a, adj.C, nulls, with_nulls);
    check_backward_written(with_nulls);
    CHECK_ALLCLOSE(with_nulls.weight.values(), with_zeros.weight.values(), 1e-14);
    CHECK_ALLCLOSE(with_nulls.bias.values(), with_zeros.bias.values(), 1e-14);
    CHECK_ALLCLOSE(with_nulls.x.values(), with_zeros.x.values(), 1e-14);
    CHECK_ALLCLOSE(with_nulls.lr.values(), with_zeros.lr.values(), 1e-14);
    if (c.m > 0) CHECK(mk_test::max_abs(with_nulls.queries.values()) == 0.0);
  }

  // (e) float against double (docs/conventions.md, accuracy: 1e-4 for T <= 16 and a stable lr).
  {
    KernelProblem<float> kpf(p);
    ForwardResult<float> fwd_f;
    run_forward(c, kpf, true, fwd_f);
    check_forward_written(fwd_f);
    const double tol = 1e-4;
    check_close_to("float weight", fwd_f.weight, fwd.weight, tol);
    check_close_to("float bias", fwd_f.bias, fwd.bias, tol);
    check_close_to("float losses", fwd_f.losses, fwd.losses, tol);
    check_close_to("float readout", fwd_f.readout, fwd.readout, tol);
    BackwardResult<float> so_f;
    run_backward(c, kpf, fwd_f, cast<float>(adj.A), cast<float>(adj.a), cast<float>(adj.C), full,
                 so_f);
    check_backward_written(so_f);
    check_close_to("float grad_weight", so_f.weight, so.weight, tol);
    check_close_to("float grad_bias", so_f.bias, so.bias, tol);
    check_close_to("float grad_x", so_f.x, so.x, tol);
    check_close_to("float grad_y", so_f.y, so.y, tol);
    check_close_to("float grad_lr", so_f.lr, so.lr, tol);
    check_close_to("float grad_lr_scale", so_f.lr_scale, so.lr_scale, tol);
    check_close_to("float grad_bias_lr_scale", so_f.bias_lr_scale, so.bias_lr_scale, tol);
    check_close_to("float grad_queries", so_f.queries, so.queries, tol);
  }
}

// The finite-difference check itself must be able to fail: a wrong gradient is caught.
void self_check() {
  mk_test::current_context() = "self-check";
  const Config c = {"self-check", Loss::kMse, 2, 3, 4, 5, 3, 2, true, false, true, false, false,
                    false, 0};
  const Problem p = make_problem(c);
  Adjoints adj;
  adj.A = mk_test::randn<double>(c.B * c.d_in * c.d_out);
  adj.a = mk_test::randn<double>(c.B * c.d_out);
  adj.C = mk_test::randn<double>(c.B * c.T * c.m * c.d_out);
  KernelProblem<double> kp(p);
  ForwardResult<double> fwd;
  run_forward(c, kp, true, fwd);
  BackwardResult<double> g;
  run_backward(c, kp, fwd, adj.A, adj.a, adj.C, BackwardRequest(), g);
  CHECK(directional(p, adj, &Problem::lr, g.lr.values()).close());
  Vec wrong = g.lr.values();
  wrong[1] *= 1.001;
  CHECK(!directional(p, adj, &Problem::lr, wrong).close());
}

}  // namespace

int main() {
  //                name                         loss            B  T  n  d_in d_out m  x4d   shW    bias   shB    P      p      pad
  const Config configs[] = {
      {"mse 3-D x, shared W, plain", Loss::kMse, 3, 4, 5, 7, 6, 0, false, true, false, false, false, false, 0},
      {"mse 4-D x, per-task W+b, P, p, queries", Loss::kMse, 3, 4, 5, 7, 6, 3, true, false, true, false, true, true, 3},
      {"mse 3-D x, shared W, shared b, p, queries", Loss::kMse, 3, 3, 5, 9, 6, 2, false, true, true, true, false, true, 2},
      {"mse delta rule n=1 d_out=1", Loss::kMse, 3, 5, 1, 7, 1, 1, true, false, false, false, false, false, 1},
      {"mse n=1 d_out=1 bias P p 3-D x", Loss::kMse, 2, 3, 1, 5, 1, 2, false, true, true, false, true, true, 0},
      {"mse wide d_in=71 d_out=70", Loss::kMse, 2, 3, 5, 71, 70, 3, true, false, true, false, true, true, 1},
      {"ce 3-D x, shared W, shared b, p, queries", Loss::kCrossEntropy, 3, 4, 5, 7, 6, 3, false, true, true, true, false, true, 2},
      {"ce 4-D x, per-task W, P, queries", Loss::kCrossEntropy, 3, 4, 5, 7, 6, 2, true, false, false, false, true, false, 1},
      {"ce head d_in=70 d_out=5 n=9", Loss::kCrossEntropy, 2, 3, 9, 70, 5, 0, false, true, true, true, true, true, 0},
      {"ce d_out=70 per-task b", Loss::kCrossEntropy, 2, 3, 3, 9, 70, 2, true, false, true, false, false, false, 3},
      {"ce n=1 d_out=2", Loss::kCrossEntropy, 2, 4, 1, 3, 2, 1, true, false, true, false, true, true, 1},
      {"mse single task B=1 T=1", Loss::kMse, 1, 1, 3, 4, 3, 2, true, false, true, false, true, true, 0},
  };
  for (const Config& c : configs) run_case(c);
  self_check();
  return mk_test::report("test_unroll");
}
