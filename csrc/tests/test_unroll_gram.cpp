// fast_weight_unroll_gram_forward / _backward (csrc/cpu/fast_weight_gram.cpp) against the step
// loop (fast_weight_unroll_forward / _backward, itself checked against
// docs/ops/fast_weight_unroll.md in test_unroll.cpp), in double and float: every output and
// gradient, second and first order, every weight and bias form, task ranges split across calls,
// NaN-filled outputs with guards; and the conditions of unroll_gram_applies on both sides.
#include <cstdint>
#include <string>
#include <vector>

#include "check.h"
#include "metakernels/fast_weight.h"
#include "unroll_harness.h"

namespace {

using metakernels::Loss;
using metakernels::UnrollDims;
using metakernels::UnrollInputs;
using mk_test::unroll::Backward;
using mk_test::unroll::check_same;
using mk_test::unroll::Forward;

struct Config {
  const char* name;
  int64_t B, T, n, d_in, d_out, m;  // m = 0: no readout
  bool shared_weight;
  int bias;  // 0 none, 1 shared, 2 per task
  bool bias_lr_scale_ones;
  static constexpr bool x4d = false;  // x [B, n, d_in], the same support set every step
};

template <typename T>
using Problem = mk_test::unroll::Problem<T, Config>;

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
    // The incoming adjoints, drawn in T so that both runs see the same values. A second set is
    // drawn and not used, so that the later cases' random inputs stay the ones they always were.
    const auto w_adj = mk_test::randn<T>(c.B * c.d_in * c.d_out);
    const auto b_adj = mk_test::randn<T>(c.B * c.d_out);
    const auto o_adj = mk_test::randn<T>(c.B * c.T * c.m * c.d_out);
    mk_test::randn<T>(c.B * c.d_in * c.d_out);
    mk_test::randn<T>(c.B * c.d_out);
    mk_test::randn<T>(c.B * c.T * c.m * c.d_out);
    want.set_adjoints(c, w_adj, b_adj, o_adj);
    got.set_adjoints(c, w_adj, b_adj, o_adj);
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
    run_case<float>(c, problem, 1e-4);  // the float32 tolerance of docs/conventions.md
  }
  check_conditions();
  return mk_test::report("test_unroll_gram");
}
