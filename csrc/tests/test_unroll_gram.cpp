// fast_weight_unroll_gram_forward / _backward (csrc/cpu/fast_weight_gram.cpp) against the step
// loop (fast_weight_unroll_forward / _backward, itself checked against SPEC.md in
// test_unroll.cpp), in double and float: every output and gradient, second and first order,
// every weight and bias form, task ranges split across calls, NaN-filled outputs with guards; and
// the conditions of unroll_gram_applies on both sides.
#include <cmath>
#include <cstdint>
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
using mk_test::OutBuffer;

struct Config {
  const char* name;
  int64_t B, T, n, d_in, d_out, m;  // m = 0: no readout
  bool shared_weight;
  int bias;  // 0 none, 1 shared, 2 per task
  bool bias_lr_scale_ones;
};

template <typename T>
struct Problem {
  Config c;
  UnrollDims dims;
  std::vector<T> weight, bias, x, y, lr, bias_lr_scale, queries;
  UnrollInputs<T> in;

  // The values of another problem, cast (the float run sees the double run's inputs, rounded).
  template <typename U>
  explicit Problem(const Problem<U>& other) : c(other.c) {
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
    weight = mk_test::randn<T>((c.shared_weight ? 1 : c.B) * c.d_in * c.d_out, x_scale);
    if (c.bias) bias = mk_test::randn<T>((c.bias == 1 ? 1 : c.B) * c.d_out);
    x = mk_test::randn<T>(c.B * c.n * c.d_in, x_scale);
    y = mk_test::randn<T>(c.B * c.n * c.d_out);
    lr = mk_test::uniform<T>(c.B * c.T, 0.2, 0.6);
    if (c.bias_lr_scale_ones) bias_lr_scale.assign(c.d_out, T(1));
    if (c.m) queries = mk_test::randn<T>(c.B * c.T * c.m * c.d_in);
    wire();
  }

  void wire() {
    dims.tasks = c.B;
    dims.steps = c.T;
    dims.support = c.n;
    dims.d_in = c.d_in;
    dims.d_out = c.d_out;
    dims.queries = c.m;
    dims.loss = Loss::kMse;
    in.queries = c.m ? queries.data() : nullptr;
    in.weight = weight.data();
    in.weight_task_stride = c.shared_weight ? 0 : c.d_in * c.d_out;
    in.bias = c.bias ? bias.data() : nullptr;
    in.bias_task_stride = c.bias == 2 ? c.d_out : 0;
    in.x = x.data();
    in.x_task_stride = c.n * c.d_in;
    in.x_step_stride = 0;
    in.y = y.data();
    in.y_task_stride = c.n * c.d_out;
    in.y_step_stride = 0;
    in.lr = lr.data();
    in.bias_lr_scale = c.bias_lr_scale_ones ? bias_lr_scale.data() : nullptr;
  }
};

template <typename T>
struct Forward {
  OutBuffer<T> weight, bias, losses, residual, states, readout;
  UnrollForwardOutputs<T> out;
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
  UnrollBackwardArgs<T> args;
  Backward(const Config& c, const Forward<T>& fwd, bool first_order, bool use_states)
      : weight(c.B * c.d_in * c.d_out), bias(c.bias ? c.B * c.d_out : 0), x(c.B * c.n * c.d_in),
        y(c.B * c.n * c.d_out), lr(c.B * c.T), queries(c.B * c.T * c.m * c.d_in) {
    grad_weight_final = mk_test::randn<T>(c.B * c.d_in * c.d_out);
    grad_bias_final = mk_test::randn<T>(c.B * c.d_out);
    grad_readout = mk_test::randn<T>(c.B * c.T * c.m * c.d_out);
    args.grad_readout = c.m ? grad_readout.data() : nullptr;
    args.grad_queries = c.m ? queries.data() : nullptr;
    args.residual = fwd.residual.data();
    args.states = use_states ? fwd.states.data() : nullptr;
    args.weight_final = fwd.weight.data();
    args.grad_weight_final = grad_weight_final.data();
    args.grad_bias_final = c.bias ? grad_bias_final.data() : nullptr;
    args.first_order = first_order;
    args.grad_weight = weight.data();
    args.grad_bias = c.bias ? bias.data() : nullptr;
    args.grad_x = first_order ? nullptr : x.data();
    args.grad_y = first_order ? nullptr : y.data();
    args.grad_lr = lr.data();
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
    const double err = mk_test::rel_error(got[i]->values(), want[i]->values());
    CHECK_MSG(err <= tol,
              std::string(what) + mk_test::fmt(" output %g: rel. error %g", double(i), err));
  }
}

// The Gram kernels in T against the step loop in double on the same (rounded) inputs.
template <typename T>
void run_case(const Config& c, const Problem<double>& truth_problem, double tol) {
  mk_test::current_context() = std::string(c.name) + (sizeof(T) == 4 ? " float" : " double");
  const Problem<double>& pd = truth_problem;
  Problem<T> p(pd);
  CHECK(metakernels::unroll_gram_applies(p.dims, p.in));

  Forward<double> loop(c, true);
  Forward<T> gram(c, false), halves(c, false);
  metakernels::fast_weight_unroll_forward<double>(pd.dims, pd.in, loop.out, 0, c.B);
  metakernels::fast_weight_unroll_gram_forward<T>(p.dims, p.in, gram.out, 0, c.B);
  check_same(gram.buffers(), loop.buffers(), tol, "forward");
  // Task ranges split across calls write the same values.
  metakernels::fast_weight_unroll_gram_forward<T>(p.dims, p.in, halves.out, 0, 1);
  metakernels::fast_weight_unroll_gram_forward<T>(p.dims, p.in, halves.out, 1, c.B);
  check_same(halves.buffers(), gram.buffers(), 0.0, "forward in two calls");

  for (bool first_order : {false, true}) {
    Backward<double> want(c, loop, first_order, true);
    Backward<T> got(c, gram, first_order, false);
    got.grad_weight_final.assign(want.grad_weight_final.begin(), want.grad_weight_final.end());
    got.grad_bias_final.assign(want.grad_bias_final.begin(), want.grad_bias_final.end());
    want.grad_weight_final.assign(got.grad_weight_final.begin(), got.grad_weight_final.end());
    want.grad_bias_final.assign(got.grad_bias_final.begin(), got.grad_bias_final.end());
    got.grad_readout.assign(want.grad_readout.begin(), want.grad_readout.end());
    want.grad_readout.assign(got.grad_readout.begin(), got.grad_readout.end());
    got.args.grad_readout = c.m ? got.grad_readout.data() : nullptr;
    want.args.grad_readout = c.m ? want.grad_readout.data() : nullptr;
    metakernels::fast_weight_unroll_backward<double>(pd.dims, pd.in, want.args, 0, c.B);
    metakernels::fast_weight_unroll_gram_backward<T>(p.dims, p.in, got.args, 0, c.B);
    check_same(got.buffers(first_order), want.buffers(first_order), tol,
               first_order ? "first-order backward" : "backward");
  }
}

void check_conditions() {
  mk_test::current_context() = "conditions";
  const Config c{"", 2, 4, 5, 33, 9, 0, true, 1, true};
  Problem<double> p(c);
  CHECK(metakernels::unroll_gram_applies(p.dims, p.in));
  {
    auto q = p;
    q.bias_lr_scale[3] = 1.0 + 1e-12;
    q.wire();
    CHECK(!metakernels::unroll_gram_applies(q.dims, q.in));
  }
  std::vector<double> ones(c.d_in * c.d_out, 1.0);
  auto with = [&](auto change) {
    auto dims = p.dims;
    auto in = p.in;
    change(dims, in);
    return metakernels::unroll_gram_applies(dims, in);
  };
  CHECK(!with([&](UnrollDims&, UnrollInputs<double>& in) { in.lr_scale = ones.data(); }));
  CHECK(with([&](UnrollDims& d, UnrollInputs<double>& in) {  // a readout is inside
    d.queries = 1;
    in.queries = ones.data();
  }));
  CHECK(!with([&](UnrollDims& d, UnrollInputs<double>&) { d.loss = Loss::kCrossEntropy; }));
  CHECK(!with([&](UnrollDims&, UnrollInputs<double>& in) { in.x_step_stride = 5 * 33; }));
  CHECK(!with([&](UnrollDims& d, UnrollInputs<double>&) { d.steps = 1; }));
  CHECK(!with([&](UnrollDims& d, UnrollInputs<double>&) { d.support = 33; }));
  // The cost model: cheaper for a few rows next to wide tiles, never for one step.
  CHECK(metakernels::unroll_gram_cheaper(5, 16, 64, 64));
  CHECK(!metakernels::unroll_gram_cheaper(1, 1, 1000, 1000));
  CHECK(!metakernels::unroll_gram_cheaper(5, 64, 64, 64));
  CHECK(metakernels::unroll_gram_cheaper(50, 16, 128, 128));
}

}  // namespace

int main() {
  //                name                              B  T   n  d_in d_out m  shW   bias p=1
  const Config configs[] = {
      {"shared W, no bias", 3, 4, 5, 33, 9, 0, true, 0, false},
      {"per-task W, shared b", 3, 5, 7, 63, 65, 0, false, 1, false},
      {"shared W, per-task b, p = 1", 2, 3, 16, 64, 64, 0, true, 2, true},
      {"n = 1, d_out = 1", 2, 6, 1, 17, 1, 0, false, 2, false},
      {"long T = 30", 2, 30, 4, 40, 7, 0, false, 1, false},
      {"readout m = 3, shared b", 3, 5, 4, 40, 20, 3, false, 1, false},
      {"readout m = 1, shared W, no bias", 2, 4, 3, 50, 30, 1, true, 0, false},
  };
  for (const Config& c : configs) {
    const Problem<double> problem(c);
    run_case<double>(c, problem, 1e-11);
    run_case<float>(c, problem, 1e-4);  // SPEC.md section 5's float32 tolerance
  }
  check_conditions();
  return mk_test::report("test_unroll_gram");
}
