// fast_weight_unroll_chunked_forward / _backward (csrc/cpu/fast_weight_chunked.cpp) against the
// step loop (fast_weight_unroll_forward / _backward, itself checked against
// docs/ops/fast_weight_unroll.md in test_unroll.cpp), in double and float, 4-D x: every output and
// gradient, second and first order, shared and per-task weight and bias, readout, chunk lengths of
// 1 step, several steps (T not a multiple) and more than T, task ranges split across calls,
// NaN-filled outputs with guards; and the conditions of unroll_chunked_exact on both sides.
#include <cstdint>
#include <string>
#include <vector>

#include "check.h"
#include "metakernels/fast_weight.h"
#include "metakernels/fast_weight_chunked.h"
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
  int64_t chunk;
  static constexpr bool bias_lr_scale_ones = false;  // no bias_lr_scale
  static constexpr bool x4d = true;                  // x [B, T, n, d_in]
};

template <typename T>
using Problem = mk_test::unroll::Problem<T, Config>;

// The chunked kernels in T against the step loop in double on the same (rounded) inputs.
template <typename T>
void run_case(const Config& c, const Problem<double>& pd, double tol) {
  mk_test::current_context() = std::string(c.name) + (sizeof(T) == 4 ? " float" : " double");
  Problem<T> p(pd);
  CHECK(metakernels::unroll_chunked_exact(p.dims, p.in));

  Forward<double> loop(c, true);
  Forward<T> chunked(c, false), halves(c, false);
  metakernels::fast_weight_unroll_forward<double>(pd.dims, pd.in, loop.out, 0, c.B);
  metakernels::fast_weight_unroll_chunked_forward<T>(p.dims, p.in, chunked.out, c.chunk, 0, c.B);
  check_same(chunked.buffers(), loop.buffers(), tol, "forward");
  metakernels::fast_weight_unroll_chunked_forward<T>(p.dims, p.in, halves.out, c.chunk, 0, 1);
  metakernels::fast_weight_unroll_chunked_forward<T>(p.dims, p.in, halves.out, c.chunk, 1, c.B);
  check_same(halves.buffers(), chunked.buffers(), 0.0, "forward in two calls");

  const auto w_adj = mk_test::randn<double>(c.B * c.d_in * c.d_out);
  const auto b_adj = mk_test::randn<double>(c.B * c.d_out);
  const auto o_adj = mk_test::randn<double>(c.B * c.T * c.m * c.d_out);
  for (bool first_order : {false, true}) {
    Backward<double> want(c, loop, first_order, true);
    Backward<T> got(c, chunked, first_order, false), split(c, chunked, first_order, false);
    want.set_adjoints(c, w_adj, b_adj, o_adj);
    got.set_adjoints(c, w_adj, b_adj, o_adj);
    split.set_adjoints(c, w_adj, b_adj, o_adj);
    metakernels::fast_weight_unroll_backward<double>(pd.dims, pd.in, want.args, 0, c.B);
    metakernels::fast_weight_unroll_chunked_backward<T>(p.dims, p.in, got.args, c.chunk, 0, c.B);
    check_same(got.buffers(first_order), want.buffers(first_order), tol,
               first_order ? "first-order backward" : "backward");
    metakernels::fast_weight_unroll_chunked_backward<T>(p.dims, p.in, split.args, c.chunk, 0, 1);
    metakernels::fast_weight_unroll_chunked_backward<T>(p.dims, p.in, split.args, c.chunk, 1,
                                                        c.B);
    check_same(split.buffers(first_order), got.buffers(first_order), 0.0,
               "backward in two calls");
  }
}

void check_conditions() {
  mk_test::current_context() = "conditions";
  const Config c{"", 2, 4, 1, 33, 40, 0, true, 1, 2};
  Problem<double> p(c);
  CHECK(metakernels::unroll_chunked_exact(p.dims, p.in));
  std::vector<double> ones(c.d_out, 1.0), scale(c.d_in * c.d_out, 1.0);
  auto with = [&](auto change) {
    auto dims = p.dims;
    auto in = p.in;
    change(dims, in);
    return metakernels::unroll_chunked_exact(dims, in);
  };
  CHECK(with([&](UnrollDims&, UnrollInputs<double>& in) { in.bias_lr_scale = ones.data(); }));
  ones[5] = 1.0 + 1e-12;
  CHECK(!with([&](UnrollDims&, UnrollInputs<double>& in) { in.bias_lr_scale = ones.data(); }));
  CHECK(!with([&](UnrollDims&, UnrollInputs<double>& in) { in.lr_scale = scale.data(); }));
  CHECK(!with([&](UnrollDims&, UnrollInputs<double>& in) { in.x_step_stride = 0; }));
  CHECK(!with([&](UnrollDims& d, UnrollInputs<double>&) { d.loss = Loss::kCrossEntropy; }));
  // With stored states wanted (x's or the queries' gradient), and without.
  CHECK(metakernels::unroll_chunked_cheaper(2, 8, 64, 16, 16, true));
  CHECK(metakernels::unroll_chunked_cheaper(1, 1, 128, 128, 1, true));  // any T
  CHECK(!metakernels::unroll_chunked_cheaper(64, 9, 128, 128, 1, true));
  CHECK(!metakernels::unroll_chunked_cheaper(64, 8, 63, 128, 1, true));
  CHECK(!metakernels::unroll_chunked_cheaper(64, 1, 32, 31, 1, true));
  CHECK(metakernels::unroll_chunked_cheaper(2, 1, 64, 64, 2, false));
  CHECK(!metakernels::unroll_chunked_cheaper(2, 2, 64, 64, 0, false));
  CHECK(!metakernels::unroll_chunked_cheaper(2, 1, 64, 64, 3, false));
  CHECK(!metakernels::unroll_chunked_cheaper(2, 1, 63, 128, 1, false));
  CHECK(!metakernels::unroll_chunked_cheaper(2, 1, 64, 63, 1, false));
  CHECK(!metakernels::unroll_chunked_cheaper(1, 1, 128, 128, 1, false));
  CHECK(metakernels::chunked_chunk_steps(1) == 32 && metakernels::chunked_chunk_steps(33) == 1);
}

}  // namespace

int main() {
  //                name                               B  T   n  d_in d_out m  shW  bias chunk
  const Config configs[] = {
      {"delta rule n = 1, chunk 4", 3, 13, 1, 17, 9, 1, false, 0, 4},
      {"n = 3, shared b, m = 7, chunk > T", 2, 6, 3, 20, 11, 7, true, 1, 16},
      {"n = 16, per-task b, chunk 2", 2, 5, 16, 9, 5, 0, false, 2, 2},
      {"d = 1, chunk 1", 2, 7, 1, 1, 1, 2, true, 2, 1},
      {"odd d 63 x 65, chunk 5", 2, 11, 1, 63, 65, 1, false, 1, 5},
  };
  for (const Config& c : configs) {
    const Problem<double> problem(c);
    run_case<double>(c, problem, 1e-11);
    run_case<float>(c, problem, 1e-4);  // the float32 tolerance of docs/conventions.md
  }
  check_conditions();
  return mk_test::report("test_unroll_chunked");
}
