// The MLP fast-weight kernels (csrc/cpu/fast_weight_mlp.cpp) in double: the backward's gradients
// of the meta-loss (both query forms, 3-D and 4-D x, mse and ce, every activation) against
// central finite differences of the forward's loss; a checkpointed backward (states every 2
// steps) equal to the stride-1 one; task ranges split across calls; outputs NaN-filled before
// the kernels write them. The Python tests hold every output to the autograd reference.
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "check.h"
#include "metakernels/fast_weight_mlp.h"

namespace {

using metakernels::Activation;
using metakernels::Loss;

struct Problem {
  metakernels::MlpDims d;
  std::vector<int64_t> widths;
  std::vector<std::vector<double>> weights, biases;
  std::vector<double> x, y, lr, q, qy;
  std::vector<int64_t> labels, qlabels;
};

Problem make_problem(Activation act, Loss loss, bool per_step, bool form_b, uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  Problem p;
  p.widths = {3, 5, 4, 3};
  auto& d = p.d;
  d.tasks = 2;
  d.steps = 3;
  d.support = 4;
  d.layers = 3;
  d.bias = true;
  d.x_per_step = per_step;
  d.query_rows = 2;
  d.query_per_step = form_b;
  d.meta_loss = true;
  d.loss = loss;
  d.activation = act;
  for (int64_t l = 0; l < 3; ++l) {
    std::vector<double> w(d.tasks * p.widths[l] * p.widths[l + 1]), b(d.tasks * p.widths[l + 1]);
    for (auto& v : w) v = normal(gen) / std::sqrt(double(p.widths[l]));
    for (auto& v : b) v = 0.3 * normal(gen);
    p.weights.push_back(w);
    p.biases.push_back(b);
  }
  const int64_t xb = per_step ? d.tasks * d.steps : d.tasks;
  const int64_t qb = form_b ? d.tasks * d.steps : d.tasks;
  p.x.resize(xb * d.support * 3);
  for (auto& v : p.x) v = normal(gen);
  p.q.resize(qb * d.query_rows * 3);
  for (auto& v : p.q) v = normal(gen);
  p.y.resize(xb * d.support * 3);
  for (auto& v : p.y) v = normal(gen);
  p.qy.resize(qb * d.query_rows * 3);
  for (auto& v : p.qy) v = normal(gen);
  for (int64_t i = 0; i < xb * d.support; ++i) p.labels.push_back(int64_t(gen() % 3));
  for (int64_t i = 0; i < qb * d.query_rows; ++i) p.qlabels.push_back(int64_t(gen() % 3));
  p.lr.assign(d.tasks * d.steps, 0.2);
  p.lr[1] = 0.35;
  return p;
}

struct Pointers {
  std::vector<const double*> w, b;
  metakernels::MlpInputs<double> in;
};

void fill(const Problem& p, Pointers& ptr) {
  for (int64_t l = 0; l < 3; ++l) {
    ptr.w.push_back(p.weights[l].data());
    ptr.b.push_back(p.biases[l].data());
  }
  auto& in = ptr.in;
  in.weights = ptr.w.data();
  in.biases = ptr.b.data();
  in.x = p.x.data();
  in.lr = p.lr.data();
  in.queries = p.q.data();
  if (p.d.loss == Loss::kMse) {
    in.y = p.y.data();
    in.query_y = p.qy.data();
  } else {
    in.labels = p.labels.data();
    in.query_labels = p.qlabels.data();
  }
}

struct Forward {
  std::vector<double> losses, task_loss, states;
  std::vector<std::vector<double>> wf, bf;
};

Forward forward(Problem& p, int64_t stride) {
  p.d.widths = p.widths.data();
  p.d.stride = stride;
  Pointers ptr;
  fill(p, ptr);
  const double nan = std::numeric_limits<double>::quiet_NaN();
  Forward f;
  const int64_t params = metakernels::mlp_param_count(p.d);
  const int64_t kept = stride > 0 ? (p.d.steps + stride - 1) / stride : 0;
  f.losses.assign(p.d.tasks * p.d.steps, nan);
  f.task_loss.assign(p.d.tasks, nan);
  f.states.assign(p.d.tasks * kept * params, nan);
  std::vector<double*> wf, bf;
  for (int64_t l = 0; l < 3; ++l) {
    f.wf.emplace_back(p.weights[l].size(), nan);
    f.bf.emplace_back(p.biases[l].size(), nan);
  }
  for (int64_t l = 0; l < 3; ++l) {
    wf.push_back(f.wf[l].data());
    bf.push_back(f.bf[l].data());
  }
  metakernels::MlpForwardOutputs<double> out;
  out.losses = f.losses.data();
  out.task_loss = f.task_loss.data();
  out.states = stride > 0 ? f.states.data() : nullptr;
  out.weights_final = wf.data();
  out.biases_final = bf.data();
  // Two calls on disjoint task ranges, as two threads would.
  metakernels::fast_weight_mlp_forward<double>(p.d, ptr.in, out, 0, 1);
  metakernels::fast_weight_mlp_forward<double>(p.d, ptr.in, out, 1, p.d.tasks);
  return f;
}

double total_loss(Problem& p) {
  const Forward f = forward(p, 0);
  return f.task_loss[0] + f.task_loss[1];
}

struct Grads {
  std::vector<std::vector<double>> w, b;
  std::vector<double> x, lr, q;
};

Grads backward(Problem& p, int64_t stride) {
  Forward f = forward(p, stride);
  Pointers ptr;
  fill(p, ptr);
  const double nan = std::numeric_limits<double>::quiet_NaN();
  Grads g;
  std::vector<double*> gw, gb;
  std::vector<const double*> wf, bf;
  for (int64_t l = 0; l < 3; ++l) {
    g.w.emplace_back(p.weights[l].size(), nan);
    g.b.emplace_back(p.biases[l].size(), nan);
  }
  for (int64_t l = 0; l < 3; ++l) {
    gw.push_back(g.w[l].data());
    gb.push_back(g.b[l].data());
    wf.push_back(f.wf[l].data());
    bf.push_back(f.bf[l].data());
  }
  g.x.assign(p.x.size(), nan);
  g.lr.assign(p.lr.size(), nan);
  g.q.assign(p.q.size(), nan);
  std::vector<double> upstream(p.d.tasks, 1.0);
  metakernels::MlpBackwardArgs<double> a;
  a.states = f.states.data();
  a.weights_final = wf.data();
  a.biases_final = bf.data();
  a.grad_out = upstream.data();
  a.grad_x = g.x.data();
  a.grad_lr = g.lr.data();
  a.grad_queries = g.q.data();
  a.grad_weights = gw.data();
  a.grad_biases = gb.data();
  metakernels::fast_weight_mlp_backward<double>(p.d, ptr.in, a, 0, 1);
  metakernels::fast_weight_mlp_backward<double>(p.d, ptr.in, a, 1, p.d.tasks);
  return g;
}

// The central difference of the total loss in one element of `values`.
double numeric(Problem& p, std::vector<double>& values, size_t index) {
  const double h = 1e-5, keep = values[index];
  values[index] = keep + h;
  const double up = total_loss(p);
  values[index] = keep - h;
  const double down = total_loss(p);
  values[index] = keep;
  return (up - down) / (2 * h);
}

void check_case(Activation act, Loss loss, bool per_step, bool form_b, uint32_t seed) {
  Problem p = make_problem(act, loss, per_step, form_b, seed);
  const Grads g = backward(p, 1);
  auto compare = [&](std::vector<double>& values, const std::vector<double>& grad) {
    for (size_t i = 0; i < values.size(); ++i)
      CHECK_NEAR(grad[i], numeric(p, values, i), 1e-6, 1e-7);
  };
  for (int64_t l = 0; l < 3; ++l) {
    compare(p.weights[l], g.w[l]);
    compare(p.biases[l], g.b[l]);
  }
  compare(p.x, g.x);
  compare(p.lr, g.lr);
  compare(p.q, g.q);
  // States every 2 steps, the steps between recomputed: the same gradients.
  const Grads c = backward(p, 2);
  for (int64_t l = 0; l < 3; ++l) CHECK_ALLCLOSE(c.w[l], g.w[l], 1e-12);
  CHECK_ALLCLOSE(c.x, g.x, 1e-12);
  CHECK_ALLCLOSE(c.lr, g.lr, 1e-12);
}

}  // namespace

int main() {
  uint32_t seed = 1;
  for (Activation act : {Activation::kTanh, Activation::kGelu, Activation::kSilu,
                         Activation::kRelu})
    for (Loss loss : {Loss::kMse, Loss::kCrossEntropy})
      for (bool per_step : {false, true}) check_case(act, loss, per_step, seed % 2 == 0, seed++);
  return mk_test::report("test_mlp");
}
