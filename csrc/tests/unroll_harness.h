// The harness of the tests that check a form of fast_weight_unroll against the step loop
// (test_unroll_gram.cpp, test_unroll_chunked.cpp): a random mse problem wired into UnrollDims /
// UnrollInputs, the NaN-filled forward outputs and backward gradients wired into
// UnrollForwardOutputs / UnrollBackwardArgs, and their buffer-by-buffer comparison.
//
// Config is the test's own case struct. The harness reads its fields
//   B, T, n, d_in, d_out, m (0: no readout), shared_weight, bias (0 none, 1 shared, 2 per task),
//   bias_lr_scale_ones (true: bias_lr_scale an explicit vector of ones; false: none),
// where a static constexpr member will do, and `static constexpr bool x4d`: x and y
// [B, T, n, ·] (a step stride of n·d), or [B, n, ·], the same support set every step (step
// stride 0).
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "check.h"
#include "metakernels/fast_weight.h"

namespace mk_test {
namespace unroll {

template <typename T, typename Config>
struct Problem {
  Config c;
  metakernels::UnrollDims dims;
  std::vector<T> weight, bias, x, y, lr, bias_lr_scale, queries;
  metakernels::UnrollInputs<T> in;

  // The values of another problem, cast (the float run sees the double run's inputs, rounded).
  template <typename U>
  explicit Problem(const Problem<U, Config>& other) : c(other.c) {
    auto cast = [](const std::vector<U>& v) { return std::vector<T>(v.begin(), v.end()); };
    weight = cast(other.weight);
    bias = cast(other.bias);
    x = cast(other.x);
    y = cast(other.y);
    lr = cast(other.lr);
    bias_lr_scale = cast(other.bias_lr_scale);
    queries = cast(other.queries);
    wire();
  }

  explicit Problem(const Config& config) : c(config) {
    const double x_scale = 1.0 / std::sqrt(double(c.d_in));
    weight = randn<T>((c.shared_weight ? 1 : c.B) * c.d_in * c.d_out, x_scale);
    if (c.bias) bias = randn<T>((c.bias == 1 ? 1 : c.B) * c.d_out);
    x = randn<T>(c.B * x_steps() * c.n * c.d_in, x_scale);
    y = randn<T>(c.B * x_steps() * c.n * c.d_out);
    lr = uniform<T>(c.B * c.T, 0.2, 0.6);
    if (c.bias_lr_scale_ones) bias_lr_scale.assign(c.d_out, T(1));
    if (c.m) queries = randn<T>(c.B * c.T * c.m * c.d_in);
    wire();
  }

  // The steps that x and y hold per task.
  int64_t x_steps() const { return Config::x4d ? c.T : 1; }

  void wire() {
    dims.tasks = c.B;
    dims.steps = c.T;
    dims.support = c.n;
    dims.d_in = c.d_in;
    dims.d_out = c.d_out;
    dims.queries = c.m;
    dims.loss = metakernels::Loss::kMse;
    in.queries = c.m ? queries.data() : nullptr;
    in.weight = weight.data();
    in.weight_task_stride = c.shared_weight ? 0 : c.d_in * c.d_out;
    in.bias = c.bias ? bias.data() : nullptr;
    in.bias_task_stride = c.bias == 2 ? c.d_out : 0;
    in.x = x.data();
    in.x_task_stride = x_steps() * c.n * c.d_in;
    in.x_step_stride = Config::x4d ? c.n * c.d_in : 0;
    in.y = y.data();
    in.y_task_stride = x_steps() * c.n * c.d_out;
    in.y_step_stride = Config::x4d ? c.n * c.d_out : 0;
    in.lr = lr.data();
    in.bias_lr_scale = c.bias_lr_scale_ones ? bias_lr_scale.data() : nullptr;
  }
};

template <typename T>
struct Forward {
  OutBuffer<T> weight, bias, losses, residual, states, readout;
  metakernels::UnrollForwardOutputs<T> out;
  template <typename Config>
  Forward(const Config& c, bool with_states)
      : weight(c.B * c.d_in * c.d_out), bias(c.bias ? c.B * c.d_out : 0), losses(c.B * c.T),
        residual(c.B * c.T * c.n * c.d_out), states(with_states ? c.B * c.T * c.d_in * c.d_out : 0),
        readout(c.B * c.T * c.m * c.d_out) {
    out.readout = c.m ? readout.data() : nullptr;
    out.weight = weight.data();
    out.bias = c.bias ? bias.data() : nullptr;
    out.losses = losses.data();
    out.residual = residual.data();
    out.states = with_states ? states.data() : nullptr;
  }
  std::vector<OutBuffer<T>*> buffers() { return {&weight, &bias, &losses, &residual, &readout}; }
};

template <typename T>
struct Backward {
  OutBuffer<T> weight, bias, x, y, lr, queries;
  std::vector<T> grad_weight_final, grad_bias_final, grad_readout;
  metakernels::UnrollBackwardArgs<T> args;
  template <typename Config>
  Backward(const Config& c, const Forward<T>& fwd, bool first_order, bool use_states)
      : weight(c.B * c.d_in * c.d_out), bias(c.bias ? c.B * c.d_out : 0),
        x(c.B * (Config::x4d ? c.T : 1) * c.n * c.d_in),
        y(c.B * (Config::x4d ? c.T : 1) * c.n * c.d_out), lr(c.B * c.T),
        queries(c.B * c.T * c.m * c.d_in) {
    args.grad_queries = c.m ? queries.data() : nullptr;
    args.residual = fwd.residual.data();
    args.states = use_states ? fwd.states.data() : nullptr;
    args.weight_final = fwd.weight.data();
    args.first_order = first_order;
    args.grad_weight = weight.data();
    args.grad_bias = c.bias ? bias.data() : nullptr;
    args.grad_x = first_order ? nullptr : x.data();
    args.grad_y = first_order ? nullptr : y.data();
    args.grad_lr = lr.data();
  }
  // The incoming adjoints, the same values for both runs.
  template <typename Config, typename U>
  void set_adjoints(const Config& c, const std::vector<U>& w, const std::vector<U>& b,
                    const std::vector<U>& o) {
    grad_weight_final.assign(w.begin(), w.end());
    grad_bias_final.assign(b.begin(), b.end());
    grad_readout.assign(o.begin(), o.end());
    args.grad_weight_final = grad_weight_final.data();
    args.grad_bias_final = c.bias ? grad_bias_final.data() : nullptr;
    args.grad_readout = c.m ? grad_readout.data() : nullptr;
  }
  std::vector<OutBuffer<T>*> buffers(bool first_order) {
    if (first_order) return {&weight, &bias, &lr, &queries};
    return {&weight, &bias, &x, &y, &lr, &queries};
  }
};

template <typename A, typename B>
void check_same(std::vector<OutBuffer<A>*> got, std::vector<OutBuffer<B>*> want, double tol,
                const char* what) {
  for (size_t i = 0; i < got.size(); ++i) {
    CHECK(got[i]->guards_intact());
    const double err = rel_error(got[i]->values(), want[i]->values());
    CHECK_MSG(err <= tol, std::string(what) + fmt(" output %g: rel. error %g", double(i), err));
  }
}

}  // namespace unroll
}  // namespace mk_test
