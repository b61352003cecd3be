// The tile arithmetic of the CUDA kernels (csrc/cuda/fast_weight_unroll.cu), run on the host: the
// same __host__ __device__ functions of metakernels/tile_math.h, composed the way the kernels
// compose them, against naive loops in double.
//   - the forward's mse residual reads bfloat16/float16 targets through a widening row loader;
//   - the update element w − η (s ∘ g);
//   - the backward's ce step: probabilities recovered from the stored residual, then the softmax
//     Jacobian applied in place to U (Ẑ = −η/n · J U), as the kernel does in shared memory.
#include <cmath>
#include <cstdint>
#include <vector>

#include "check.h"
#include "metakernels/tile_math.h"

namespace {

using namespace metakernels;

// Like the kernels' RowLoader: y[j] widens a stored bfloat16 value to float32.
struct Bfloat16Row {
  const uint16_t* row;
  float operator[](int64_t j) const { return mk_test::bfloat16_bits_to_float(row[j]); }
};

void test_mse_row_widening_loader() {
  mk_test::current_context() = "mse_row_residual with a bfloat16 row loader";
  for (int64_t d_out : {1, 5, 37, 128}) {
    const std::vector<float> z = mk_test::randn<float>(d_out, 2.0);
    const std::vector<float> y_full = mk_test::randn<float>(d_out);
    std::vector<uint16_t> y_bits(d_out);
    std::vector<float> y_rounded(d_out);
    for (int64_t j = 0; j < d_out; ++j) {
      y_bits[j] = mk_test::bfloat16_bits_rn(y_full[j]);
      y_rounded[j] = mk_test::bfloat16_bits_to_float(y_bits[j]);
    }
    const float inv_n = 1.f / 7.f;
    std::vector<float> e = z;
    const float half_sq = mse_row_residual(e.data(), Bfloat16Row{y_bits.data()}, d_out, inv_n);
    std::vector<double> expected_e;
    const double expected_half_sq = mk_test::naive_mse_row(z, y_rounded, d_out, 7.0, expected_e);
    CHECK_NEAR(half_sq, expected_half_sq, 2e-6, 0.0);
    CHECK_ALLCLOSE(e, expected_e, 2e-6);
    // The same targets through a plain pointer give the same bits.
    std::vector<float> e_ptr = z;
    const float half_sq_ptr = mse_row_residual(e_ptr.data(), y_rounded.data(), d_out, inv_n);
    CHECK(half_sq_ptr == half_sq);
    CHECK(e_ptr == e);
  }
}

void test_sgd_step() {
  mk_test::current_context() = "sgd_step";
  const std::vector<float> w = mk_test::randn<float>(64), g = mk_test::randn<float>(64),
                           s = mk_test::randn<float>(64);
  for (int64_t k = 0; k < 64; ++k) {
    const double expected = double(w[k]) - 0.37 * (double(s[k]) * double(g[k]));
    CHECK_NEAR(sgd_step(w[k], 0.37f, s[k], g[k]), expected, 1e-6, 0.0);
    CHECK(sgd_step(w[k], 0.37f, 1.f, g[k]) == w[k] - 0.37f * g[k]);
  }
  CHECK(std::isnan(sgd_step(1.f, 0.5f, 1.f, NAN)));  // non-finite values propagate
}

// The backward kernel's ce step for an [n, d_out] tile: from the forward's residual E (with
// labels), Ẑ = (−η/n) · J_i U_i row by row, written over U.
void test_ce_backward_tile() {
  mk_test::current_context() = "ce backward tile (probs from residual, Jacobian in place)";
  for (int64_t d_out : {1, 2, 5, 37}) {
    const int64_t n = 9;
    const float lr = 0.45f;
    const std::vector<float> logits = mk_test::randn<float>(n * d_out, 3.0);
    std::vector<int64_t> labels(n);
    for (int64_t i = 0; i < n; ++i) labels[i] = (i * 7 + 3) % d_out;
    // Forward: E in place of the logits, as the forward kernel stores it.
    std::vector<float> residual = logits;
    for (int64_t i = 0; i < n; ++i)
      ce_row_residual(residual.data() + i * d_out, labels[i], d_out, 1.f / float(n));
    std::vector<float> u = mk_test::randn<float>(n * d_out);
    std::vector<double> expected(n * d_out, 0.0);
    for (int64_t i = 0; i < n; ++i) {
      double z_max = logits[i * d_out];
      for (int64_t j = 0; j < d_out; ++j) z_max = std::fmax(z_max, double(logits[i * d_out + j]));
      std::vector<double> p(d_out);
      double sum = 0.0;
      for (int64_t j = 0; j < d_out; ++j) sum += p[j] = std::exp(double(logits[i * d_out + j]) - z_max);
      for (double& v : p) v /= sum;
      double p_dot_u = 0.0;
      for (int64_t j = 0; j < d_out; ++j) p_dot_u += p[j] * double(u[i * d_out + j]);
      for (int64_t j = 0; j < d_out; ++j)
        expected[i * d_out + j] = -double(lr) / double(n) * p[j] * (double(u[i * d_out + j]) - p_dot_u);
    }
    std::vector<float> probs(n * d_out, mk_test::nan_value<float>());
    const float scale = -lr / float(n);
    for (int64_t i = 0; i < n; ++i) {
      ce_probs_from_residual(residual.data() + i * d_out, labels[i], d_out, float(n),
                             probs.data() + i * d_out);
      softmax_jacobian_row(probs.data() + i * d_out, u.data() + i * d_out, d_out, scale,
                           u.data() + i * d_out);
    }
    if (d_out == 1) {
      CHECK(mk_test::max_abs(u) <= 1e-7);  // one class: J = 0
    } else {
      CHECK_ALLCLOSE(u, expected, 1e-5);
    }
  }
}

}  // namespace

int main() {
  test_mse_row_widening_loader();
  test_sgd_step();
  test_ce_backward_tile();
  return mk_test::report("test_tile_math_cuda");
}
