// The query-loss kernels of fast_weight_meta_loss (csrc/cpu/fast_weight_meta_loss.cpp) against
// naive double loops of docs/ops/fast_weight_meta_loss.md: the loss and residual of both losses and
// both query forms, the adjoints Ŵ_T, b̂_T, Q̂, Ŷ_q, Ô_t (with and without incoming adjoints), and
// the Gram-space form A (logits from M_T = S R_0, X̃ Ŵ̃_T from the query Gram matrix) against the
// same quantities through W_T; NaN-filled outputs with guards, task ranges split across calls.
#include <cmath>
#include <cstdint>
#include <vector>

#include "check.h"
#include "metakernels/fast_weight.h"
#include "metakernels/meta_loss.h"

namespace {

using metakernels::Loss;
using mk_test::OutBuffer;

struct Sizes {
  int64_t B, blocks, m, d_in, d_out;
};

// Naive: per task, L = Σ_blocks (1/m) Σ_rows ℓ(z, y) with z = q W + b (form A) or the given
// readout; returns L [B] and Ê [B, blocks, m, d_out].
void naive_loss(const Sizes& s, Loss loss, const std::vector<double>& logits,
                const std::vector<double>& y, const std::vector<int64_t>& labels,
                std::vector<double>& task_loss, std::vector<double>& residual) {
  task_loss.assign(s.B, 0.0);
  residual.assign(logits.size(), 0.0);
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t k = 0; k < s.blocks; ++k)
      for (int64_t i = 0; i < s.m; ++i) {
        const int64_t row = (b * s.blocks + k) * s.m + i;
        const double* z = logits.data() + row * s.d_out;
        double* e = residual.data() + row * s.d_out;
        if (loss == Loss::kMse) {
          for (int64_t j = 0; j < s.d_out; ++j) {
            const double diff = z[j] - y[row * s.d_out + j];
            task_loss[b] += 0.5 * diff * diff / s.m;
            e[j] = diff / s.m;
          }
        } else {
          double z_max = z[0], sum = 0.0;
          for (int64_t j = 1; j < s.d_out; ++j) z_max = std::fmax(z_max, z[j]);
          for (int64_t j = 0; j < s.d_out; ++j) sum += std::exp(z[j] - z_max);
          task_loss[b] += (std::log(sum) + z_max - z[labels[row]]) / s.m;
          for (int64_t j = 0; j < s.d_out; ++j)
            e[j] = (std::exp(z[j] - z_max) / sum - (j == labels[row] ? 1.0 : 0.0)) / s.m;
        }
      }
}

template <typename T>
std::vector<T> cast(const std::vector<double>& v) {
  return std::vector<T>(v.begin(), v.end());
}

template <typename T>
void check_query_loss(const Sizes& s, Loss loss, bool incoming, double tol) {
  const int64_t w_size = s.d_in * s.d_out;
  const auto query_x = mk_test::randn<double>(s.B * s.blocks * s.m * s.d_in, 0.3);
  const auto weight_t = mk_test::randn<double>(s.B * w_size, 0.3);
  const auto bias_t = mk_test::randn<double>(s.B * s.d_out);
  const auto y = mk_test::randn<double>(s.B * s.blocks * s.m * s.d_out);
  const auto labels = mk_test::randint(s.B * s.blocks * s.m, s.d_out);
  const auto c = mk_test::randn<double>(s.B);
  const auto w_in = mk_test::randn<double>(s.B * w_size), b_in = mk_test::randn<double>(s.B * s.d_out);
  const bool form_a = s.blocks == 1;

  // Naive logits: form A q W_T + b_T; form B a random readout.
  std::vector<double> logits = mk_test::randn<double>(s.B * s.blocks * s.m * s.d_out);
  if (form_a)
    for (int64_t b = 0; b < s.B; ++b)
      for (int64_t i = 0; i < s.m; ++i)
        for (int64_t j = 0; j < s.d_out; ++j) {
          double z = bias_t[b * s.d_out + j];
          for (int64_t k = 0; k < s.d_in; ++k)
            z += query_x[(b * s.m + i) * s.d_in + k] * weight_t[b * w_size + k * s.d_out + j];
          logits[(b * s.m + i) * s.d_out + j] = z;
        }
  std::vector<double> want_loss, want_res;
  naive_loss(s, loss, logits, y, labels, want_loss, want_res);

  const auto qx = cast<T>(query_x), wt = cast<T>(weight_t), bt = cast<T>(bias_t), yt = cast<T>(y);
  const auto ct = cast<T>(c), w_in_t = cast<T>(w_in), b_in_t = cast<T>(b_in);
  metakernels::QueryLoss<T> q;
  q.tasks = s.B;
  q.blocks = s.blocks;
  q.rows = s.m;
  q.d_in = s.d_in;
  q.d_out = s.d_out;
  q.loss = loss;
  q.query_x = qx.data();
  if (loss == Loss::kMse) q.query_y = yt.data(); else q.query_labels = labels.data();

  OutBuffer<T> residual(s.B * s.blocks * s.m * s.d_out), task_loss(s.B);
  if (form_a) {
    metakernels::meta_loss_logits<T>(q, wt.data(), bt.data(), residual.data(), 0, 1);
    metakernels::meta_loss_logits<T>(q, wt.data(), bt.data(), residual.data(), 1, s.B);
  } else {
    for (int64_t k = 0; k < residual.size; ++k) residual[k] = T(logits[k]);
  }
  metakernels::meta_loss_forward<T>(q, residual.data(), task_loss.data(), 0, 1);
  metakernels::meta_loss_forward<T>(q, residual.data(), task_loss.data(), 1, s.B);
  CHECK(residual.guards_intact() && task_loss.guards_intact());
  CHECK_ALLCLOSE(task_loss.values(), want_loss, tol);
  CHECK_ALLCLOSE(residual.values(), want_res, tol);

  // Adjoints.
  OutBuffer<T> grad_w(s.B * w_size), grad_b(s.B * s.d_out), grad_qx(s.B * s.m * s.d_in),
      grad_qy(s.B * s.blocks * s.m * s.d_out), grad_readout(s.B * s.blocks * s.m * s.d_out);
  metakernels::QueryLossBackward<T> args;
  const auto res_values = residual.values();
  args.residual = res_values.data();
  args.grad_loss = ct.data();
  args.weight_t = wt.data();
  args.grad_weight_in = incoming ? w_in_t.data() : nullptr;
  args.grad_bias_in = incoming ? b_in_t.data() : nullptr;
  args.grad_weight_t = grad_w.data();
  args.grad_bias_t = grad_b.data();
  args.grad_readout = form_a ? nullptr : grad_readout.data();
  args.grad_query_x = form_a ? grad_qx.data() : nullptr;
  args.grad_query_y = loss == Loss::kMse ? grad_qy.data() : nullptr;
  metakernels::meta_loss_backward<T>(q, args, 0, s.B);
  std::vector<double> want_w(s.B * w_size, 0.0), want_b(s.B * s.d_out, 0.0),
      want_qx(s.B * s.m * s.d_in, 0.0), want_qy(want_res.size()), want_readout(want_res.size());
  for (int64_t b = 0; b < s.B; ++b) {
    for (int64_t k = 0; k < w_size; ++k) want_w[b * w_size + k] = incoming ? w_in[b * w_size + k] : 0.0;
    for (int64_t j = 0; j < s.d_out; ++j) want_b[b * s.d_out + j] = incoming ? b_in[b * s.d_out + j] : 0.0;
    for (int64_t r = 0; r < s.blocks * s.m; ++r)
      for (int64_t j = 0; j < s.d_out; ++j) {
        const int64_t idx = (b * s.blocks * s.m + r) * s.d_out + j;
        const double o = c[b] * want_res[idx];
        want_qy[idx] = -o;
        want_readout[idx] = o;
        if (!form_a) continue;
        want_b[b * s.d_out + j] += o;
        for (int64_t k = 0; k < s.d_in; ++k) {
          want_w[b * w_size + k * s.d_out + j] += query_x[(b * s.m + r) * s.d_in + k] * o;
          want_qx[(b * s.m + r) * s.d_in + k] += o * weight_t[b * w_size + k * s.d_out + j];
        }
      }
  }
  CHECK_ALLCLOSE(grad_w.values(), want_w, tol);
  CHECK_ALLCLOSE(grad_b.values(), want_b, tol);
  if (form_a) CHECK_ALLCLOSE(grad_qx.values(), want_qx, tol);
  else CHECK_ALLCLOSE(grad_readout.values(), want_readout, tol);
  if (loss == Loss::kMse) CHECK_ALLCLOSE(grad_qy.values(), want_qy, tol);
  CHECK(grad_w.guards_intact() && grad_b.guards_intact() && grad_qx.guards_intact() &&
        grad_qy.guards_intact() && grad_readout.guards_intact());
}

// Form A in Gram space: the logits from M_T (the Gram forward's sum_residual) equal those from
// W_T (the Gram forward's weight), and X̃ Ŵ̃_T from the query Gram matrix equals the product.
template <typename T>
void check_gram_space(bool with_bias, double tol) {
  metakernels::UnrollDims d;
  d.tasks = 3, d.steps = 4, d.support = 5, d.d_in = 33, d.d_out = 7;
  const int64_t m = 6, w_size = d.d_in * d.d_out;
  const auto weight = mk_test::randn<T>(w_size, 0.2), bias = mk_test::randn<T>(d.d_out);
  const auto x = mk_test::randn<T>(d.tasks * d.support * d.d_in, 0.2);
  const auto y = mk_test::randn<T>(d.tasks * d.support * d.d_out);
  const auto lr = mk_test::uniform<T>(d.tasks * d.steps, 0.2, 0.6);
  const auto query_x = mk_test::randn<T>(d.tasks * m * d.d_in, 0.2);
  const auto query_y = mk_test::randn<T>(d.tasks * m * d.d_out);
  const auto residual_q = mk_test::randn<T>(d.tasks * m * d.d_out);
  const auto c = mk_test::randn<T>(d.tasks);
  metakernels::UnrollInputs<T> in;
  in.weight = weight.data();
  in.bias = with_bias ? bias.data() : nullptr;
  in.x = x.data();
  in.x_task_stride = d.support * d.d_in;
  in.y = y.data();
  in.y_task_stride = d.support * d.d_out;
  in.lr = lr.data();
  metakernels::QueryLoss<T> q;
  q.tasks = d.tasks, q.rows = m, q.d_in = d.d_in, q.d_out = d.d_out;
  q.query_x = query_x.data();
  q.query_y = query_y.data();

  std::vector<T> weight_t(d.tasks * w_size), bias_t(d.tasks * d.d_out), losses(d.tasks * d.steps);
  std::vector<T> residual(d.tasks * d.steps * d.support * d.d_out);
  metakernels::UnrollForwardOutputs<T> out;
  out.weight = weight_t.data();
  out.bias = with_bias ? bias_t.data() : nullptr;
  out.losses = losses.data();
  out.residual = residual.data();
  metakernels::fast_weight_unroll_gram_forward<T>(d, in, out, 0, d.tasks);
  std::vector<T> via_weight(d.tasks * m * d.d_out);
  metakernels::meta_loss_logits<T>(q, weight_t.data(), with_bias ? bias_t.data() : nullptr,
                                   via_weight.data(), 0, d.tasks);

  OutBuffer<T> sums(d.tasks * d.support * d.d_out), via_gram(d.tasks * m * d.d_out);
  metakernels::UnrollForwardOutputs<T> gram_out = out;
  gram_out.weight = nullptr;
  gram_out.bias = nullptr;
  gram_out.sum_residual = sums.data();
  metakernels::fast_weight_unroll_gram_forward<T>(d, in, gram_out, 0, d.tasks);
  metakernels::meta_loss_gram_logits<T>(d, in, q, sums.data(), via_gram.data(), 0, 2);
  metakernels::meta_loss_gram_logits<T>(d, in, q, sums.data(), via_gram.data(), 2, d.tasks);
  CHECK(sums.guards_intact() && via_gram.guards_intact());
  CHECK_ALLCLOSE(via_gram.values(), via_weight, tol);

  // X̃ Ŵ̃_T with Ŵ̃_T = [Qᵀ Ô; 1ᵀ Ô], Ô = c Ê, against the pushed matrix.
  OutBuffer<T> pushed(d.tasks * d.support * d.d_out);
  metakernels::meta_loss_gram_pushed<T>(d, in, q, residual_q.data(), c.data(), pushed.data(), 0,
                                        d.tasks);
  std::vector<double> want(d.tasks * d.support * d.d_out, 0.0);
  for (int64_t b = 0; b < d.tasks; ++b)
    for (int64_t i = 0; i < d.support; ++i)
      for (int64_t r = 0; r < m; ++r) {
        double dotp = with_bias ? 1.0 : 0.0;
        for (int64_t k = 0; k < d.d_in; ++k)
          dotp += double(x[(b * d.support + i) * d.d_in + k]) * query_x[(b * m + r) * d.d_in + k];
        for (int64_t j = 0; j < d.d_out; ++j)
          want[(b * d.support + i) * d.d_out + j] +=
              dotp * double(c[b]) * residual_q[(b * m + r) * d.d_out + j];
      }
  CHECK(pushed.guards_intact());
  CHECK_ALLCLOSE(pushed.values(), want, tol);
}

}  // namespace

int main() {
  for (Loss loss : {Loss::kMse, Loss::kCrossEntropy})
    for (bool incoming : {false, true})
      for (const Sizes& s : {Sizes{3, 1, 5, 7, 6}, Sizes{2, 4, 3, 65, 17}, Sizes{1, 1, 1, 1, 1},
                             Sizes{2, 3, 7, 16, 1}}) {
        if (loss == Loss::kCrossEntropy && s.d_out == 1 && s.blocks > 1) continue;
        check_query_loss<double>(s, loss, incoming, 1e-12);
        check_query_loss<float>(s, loss, incoming, 1e-5);
      }
  for (bool with_bias : {false, true}) {
    check_gram_space<double>(with_bias, 1e-12);
    check_gram_space<float>(with_bias, 1e-4);
  }
  return mk_test::report("test_meta_loss");
}
