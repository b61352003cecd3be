// The per-row helpers of csrc/include/metakernels/tile_math.h against naive formulas.
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "check.h"
#include "metakernels/tile_math.h"

namespace {

using namespace metakernels;

// log Σ exp(z) in long double, with the max subtracted.
template <typename T>
long double naive_logsumexp(const std::vector<T>& z) {
  long double z_max = z[0];
  for (T v : z) z_max = v > z_max ? v : z_max;
  long double sum = 0;
  for (T v : z) sum += std::exp(static_cast<long double>(v) - z_max);
  return std::log(sum) + z_max;
}

template <typename T>
std::vector<double> naive_softmax(const std::vector<T>& z) {
  const long double lse = naive_logsumexp(z);
  std::vector<double> p(z.size());
  for (size_t j = 0; j < z.size(); ++j)
    p[j] = static_cast<double>(std::exp(static_cast<long double>(z[j]) - lse));
  return p;
}

template <typename T>
double tol() {
  return sizeof(T) == 4 ? 2e-6 : 1e-14;
}

template <typename T>
void test_mse_row() {
  mk_test::current_context() = "mse_row_residual";
  for (int64_t d_out : {1, 5, 70}) {
    const std::vector<T> z = mk_test::randn<T>(d_out, 2.0), y = mk_test::randn<T>(d_out);
    const T inv_n = T(1) / T(3);
    std::vector<T> e = z;
    const T half_sq = mse_row_residual(e.data(), y.data(), d_out, inv_n);
    std::vector<double> expected_e;
    const double expected_half_sq = mk_test::naive_mse_row(z, y, d_out, 3.0, expected_e);
    CHECK_NEAR(half_sq, expected_half_sq, tol<T>(), 0.0);
    CHECK_ALLCLOSE(e, expected_e, tol<T>());
  }
}

template <typename T>
void test_softmax_row() {
  mk_test::current_context() = "softmax_row";
  for (int64_t d_out : {1, 2, 5, 70}) {
    const std::vector<T> z = mk_test::randn<T>(d_out, 3.0);
    std::vector<T> p = z;
    const T lse = softmax_row(p.data(), d_out);
    CHECK_NEAR(lse, static_cast<double>(naive_logsumexp(z)), tol<T>(), tol<T>());
    CHECK_ALLCLOSE(p, naive_softmax(z), tol<T>());
    double sum = 0.0;
    for (T v : p) sum += v;
    CHECK_NEAR(sum, 1.0, 0.0, 4 * tol<T>());
  }
  // d_out = 1: p = 1, lse = z.
  {
    std::vector<T> p = {T(-3.25)};
    const T lse = softmax_row(p.data(), 1);
    CHECK(p[0] == T(1));
    CHECK_NEAR(lse, -3.25, tol<T>(), 0.0);
  }
  // A NaN anywhere in the row gives NaN everywhere (documented).
  for (int64_t where : {0, 2, 4}) {
    std::vector<T> p = mk_test::randn<T>(5);
    p[where] = mk_test::nan_value<T>();
    const T lse = softmax_row(p.data(), 5);
    CHECK(std::isnan(lse));
    bool all_nan = true;
    for (T v : p) all_nan = all_nan && std::isnan(v);
    CHECK(all_nan);
  }
}

// Huge logits: the max is subtracted first, so everything stays finite (double only; 1e4 is
// also representable in float, so check float too).
template <typename T>
void test_softmax_huge_logits() {
  mk_test::current_context() = "softmax_row huge logits";
  const std::vector<T> z = {T(1e4), T(-1e4), T(1e4 - 1), T(-1e4 + 3)};
  std::vector<T> p = z;
  const T lse = softmax_row(p.data(), 4);
  bool finite = std::isfinite(lse);
  for (T v : p) finite = finite && std::isfinite(v);
  CHECK(finite);
  const double e1 = std::exp(-1.0);
  CHECK_NEAR(lse, 1e4 + std::log1p(e1), tol<T>(), 0.0);
  CHECK_NEAR(p[0], 1.0 / (1.0 + e1), 0.0, tol<T>());
  CHECK_NEAR(p[2], e1 / (1.0 + e1), 0.0, tol<T>());
  CHECK(p[1] == T(0) && p[3] == T(0));
  // And ce loss at huge logits: −log softmax(z)[label] = lse − z[label].
  std::vector<T> e = z;
  const T loss = ce_row_residual(e.data(), 2, 4, T(1));
  CHECK(std::isfinite(loss));
  CHECK_NEAR(loss, 1.0 + std::log1p(e1), sizeof(T) == 4 ? 1e-3 : 1e-12, 0.0);
}

template <typename T>
void test_ce_row() {
  mk_test::current_context() = "ce_row_residual";
  for (int64_t d_out : {1, 2, 5, 70}) {
    for (int rep = 0; rep < 3; ++rep) {
      const std::vector<T> z = mk_test::randn<T>(d_out, 2.0);
      const int64_t label = mk_test::randint(1, d_out)[0];
      const T n = T(4), inv_n = T(1) / n;
      std::vector<T> e = z;
      const T loss = ce_row_residual(e.data(), label, d_out, inv_n);
      const double expected_loss = static_cast<double>(naive_logsumexp(z)) - double(z[label]);
      CHECK_NEAR(loss, expected_loss, tol<T>(), tol<T>());
      std::vector<double> expected_e = naive_softmax(z);
      expected_e[label] -= 1.0;
      for (double& v : expected_e) v /= 4.0;
      CHECK_ALLCLOSE(e, expected_e, sizeof(T) == 4 ? 1e-5 : 1e-13);
      if (d_out == 1) CHECK(std::fabs(double(e[0])) <= 1e-7);  // p = 1 = onehot

      // The probabilities come back from the residual.
      std::vector<T> probs(d_out, mk_test::nan_value<T>());
      ce_probs_from_residual(e.data(), label, d_out, n, probs.data());
      CHECK_ALLCLOSE(probs, naive_softmax(z), sizeof(T) == 4 ? 1e-5 : 1e-13);
    }
  }
}

template <typename T>
void test_softmax_jacobian() {
  mk_test::current_context() = "softmax_jacobian_row";
  for (int64_t d_out : {1, 3, 6, 70}) {
    const std::vector<T> z = mk_test::randn<T>(d_out, 2.0);
    std::vector<T> p = z;
    softmax_row(p.data(), d_out);
    const std::vector<T> u = mk_test::randn<T>(d_out);
    const T scale = T(-0.3);
    // Explicit Jacobian J = diag(p) − p pᵀ, out = scale · J u.
    std::vector<double> expected(d_out, 0.0);
    for (int64_t i = 0; i < d_out; ++i)
      for (int64_t j = 0; j < d_out; ++j) {
        const double jac = (i == j ? double(p[i]) : 0.0) - double(p[i]) * double(p[j]);
        expected[i] += double(scale) * jac * double(u[j]);
      }
    std::vector<T> out(d_out, mk_test::nan_value<T>());
    softmax_jacobian_row(p.data(), u.data(), d_out, scale, out.data());
    if (d_out == 1) {
      CHECK(std::fabs(double(out[0])) <= 1e-7);  // J = 0 for one class
    } else {
      CHECK_ALLCLOSE(out, expected, sizeof(T) == 4 ? 1e-5 : 1e-13);
    }
    // In place: out aliases u.
    std::vector<T> in_place = u;
    softmax_jacobian_row(p.data(), in_place.data(), d_out, scale, in_place.data());
    CHECK(in_place == out);
    // The Jacobian annihilates constant shifts: J 1 = 0.
    std::vector<T> ones(d_out, T(1)), shifted(d_out);
    softmax_jacobian_row(p.data(), ones.data(), d_out, T(1), shifted.data());
    CHECK(mk_test::max_abs(shifted) <= (sizeof(T) == 4 ? 1e-6 : 1e-15));
  }
}

}  // namespace

int main() {
  test_mse_row<double>();
  test_mse_row<float>();
  test_softmax_row<double>();
  test_softmax_row<float>();
  test_softmax_huge_logits<double>();
  test_softmax_huge_logits<float>();
  test_ce_row<double>();
  test_ce_row<float>();
  test_softmax_jacobian<double>();
  test_softmax_jacobian<float>();
  return mk_test::report("test_tile_math");
}
