// cpu::gemm, cpu::gemm_tn (and their _add forms, C = αAB + D with a separate D) and cpu::transpose
// (csrc/cpu/small_gemm.h) against naive loops, for float and double,
// over shapes on both sides of every vector block (lanes = 8 doubles or 16 floats, 4-vector and
// 4-row register blocks) and of the narrow "dot product" path (cols < lanes <= inner).
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "check.h"
#include "small_gemm.h"

namespace {

using metakernels::cpu::gemm;
using metakernels::cpu::gemm_add;
using metakernels::cpu::gemm_tn;
using metakernels::cpu::gemm_tn_add;
using metakernels::cpu::transpose;

const int64_t kSizes[] = {1, 3, 5, 15, 16, 17, 63, 64, 65, 70, 129};

template <typename T>
double unit_roundoff() {
  return sizeof(T) == 4 ? 6e-8 : 1.2e-16;
}

// C[rows, ldc] for one product: NaN in the product's place unless accumulating (then c0),
// a sentinel in the padding columns and in a guard after the last row.
template <typename T>
std::vector<T> output_buffer(int64_t rows, int64_t cols, int64_t ldc, bool accumulate,
                             const std::vector<T>& c0) {
  std::vector<T> c(static_cast<size_t>(rows * ldc + mk_test::kGuard),
                   static_cast<T>(mk_test::kSentinel));
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j)
      c[i * ldc + j] = accumulate ? c0[i * cols + j] : mk_test::nan_value<T>();
  return c;
}

// Counts the wrong elements of C (+)= alpha A B, with A given by an accessor a_at(i, k): every
// element within a forward-error bound of a long-double sum, the padding and guard unchanged.
template <typename T, typename AAt>
int64_t count_wrong(int64_t rows, int64_t inner, int64_t cols, T alpha, bool accumulate, AAt a_at,
                    const std::vector<T>& b, int64_t ldb, const std::vector<T>& c0,
                    const std::vector<T>& c, int64_t ldc) {
  const T sentinel = static_cast<T>(mk_test::kSentinel);
  const double eps = unit_roundoff<T>();
  int64_t bad = 0;
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) {
      long double sum = 0, abs_sum = 0;
      for (int64_t k = 0; k < inner; ++k) {
        const long double p = static_cast<long double>(a_at(i, k)) * b[k * ldb + j];
        sum += p;
        abs_sum += std::fabs(static_cast<double>(p));
      }
      long double expected = static_cast<long double>(alpha) * sum;
      double bound = std::fabs(static_cast<double>(alpha)) * static_cast<double>(abs_sum);
      if (accumulate) {
        expected += c0[i * cols + j];
        bound += std::fabs(static_cast<double>(c0[i * cols + j]));
      }
      const double got = static_cast<double>(c[i * ldc + j]);
      const double tol = 4.0 * (inner + 2) * eps * bound + 1e-300;
      if (!(std::fabs(got - static_cast<double>(expected)) <= tol)) ++bad;
    }
    for (int64_t j = cols; j < ldc; ++j)
      if (c[i * ldc + j] != sentinel) ++bad;
  }
  for (int64_t g = 0; g < mk_test::kGuard; ++g)
    if (c[rows * ldc + g] != sentinel) ++bad;
  return bad;
}

// How C's old values enter a product: overwritten, accumulated (C += αAB), or an addend D in a
// buffer of its own (C = αAB + D, the _add forms; C NaN-filled before).
enum Mode { kOverwrite = 0, kAccumulate = 1, kAddend = 2 };

// One product C[rows, cols] (+)= alpha A[rows, inner] B[inner, cols] with row strides lda, ldb,
// ldc (>= the widths).
template <typename T>
int64_t check_one(int64_t rows, int64_t inner, int64_t cols, int64_t pad, T alpha, Mode mode) {
  const int64_t lda = inner + pad, ldb = cols + pad, ldc = cols + pad;
  const std::vector<T> a = mk_test::randn<T>(static_cast<size_t>(rows * lda));
  const std::vector<T> b = mk_test::randn<T>(static_cast<size_t>(inner * ldb));
  const std::vector<T> c0 = mk_test::randn<T>(static_cast<size_t>(rows * cols));
  std::vector<T> c = output_buffer<T>(rows, cols, ldc, mode == kAccumulate, c0);
  if (mode == kAddend)
    gemm_add<T>(rows, inner, cols, alpha, a.data(), lda, b.data(), ldb, c0.data(), cols, c.data(),
                ldc);
  else
    gemm<T>(rows, inner, cols, alpha, a.data(), lda, b.data(), ldb, mode == kAccumulate, c.data(),
            ldc);
  return count_wrong<T>(rows, inner, cols, alpha, mode != kOverwrite,
                        [&](int64_t i, int64_t k) { return a[i * lda + k]; }, b, ldb, c0, c, ldc);
}

template <typename T>
void test_gemm_shapes(const char* type_name) {
  int64_t products = 0, bad_products = 0;
  for (int64_t rows : kSizes)
    for (int64_t inner : kSizes)
      for (int64_t cols : kSizes)
        for (int acc = 0; acc < 3; ++acc) {
          // Alternate alpha and padding so every shape sees some of each.
          const int64_t pad = (rows + inner + cols + acc) % 3 == 0 ? 0 : (rows + cols) % 5 + 1;
          const T alpha = acc ? static_cast<T>(-0.75) : ((rows + cols) % 2 ? T(1) : T(2.5));
          const int64_t bad = check_one<T>(rows, inner, cols, pad, alpha, Mode(acc));
          ++products;
          if (bad) {
            ++bad_products;
            std::fprintf(stderr,
                         "gemm<%s> rows=%lld inner=%lld cols=%lld pad=%lld alpha=%g mode=%d: "
                         "%lld bad elements\n",
                         type_name, (long long)rows, (long long)inner, (long long)cols,
                         (long long)pad, (double)alpha, acc, (long long)bad);
          }
        }
  mk_test::current_context() = std::string("gemm<") + type_name + "> shapes";
  CHECK_MSG(bad_products == 0, mk_test::fmt("%g of %g products wrong", bad_products, products));
  CHECK(products == 11 * 11 * 11 * 3);
}

// One product C[rows, cols] (+)= alpha A[inner, rows]ᵀ B[inner, cols] through gemm_tn, with A's
// dense transpose handed over or not; the same checks as check_one.
template <typename T>
int64_t check_one_tn(int64_t rows, int64_t inner, int64_t cols, int64_t pad, T alpha, Mode mode,
                     bool give_transposed) {
  const int64_t lda = rows + pad, ldb = cols + pad, ldc = cols + pad;
  const std::vector<T> a = mk_test::randn<T>(static_cast<size_t>(inner * lda));
  const std::vector<T> b = mk_test::randn<T>(static_cast<size_t>(inner * ldb));
  std::vector<T> a_t(static_cast<size_t>(rows * inner));
  for (int64_t k = 0; k < inner; ++k)
    for (int64_t i = 0; i < rows; ++i) a_t[i * inner + k] = a[k * lda + i];
  const std::vector<T> c0 = mk_test::randn<T>(static_cast<size_t>(rows * cols));
  std::vector<T> c = output_buffer<T>(rows, cols, ldc, mode == kAccumulate, c0);
  if (mode == kAddend)
    gemm_tn_add<T>(rows, inner, cols, alpha, a.data(), lda, give_transposed ? a_t.data() : nullptr,
                   b.data(), ldb, c0.data(), cols, c.data(), ldc);
  else
    gemm_tn<T>(rows, inner, cols, alpha, a.data(), lda, give_transposed ? a_t.data() : nullptr,
               b.data(), ldb, mode == kAccumulate, c.data(), ldc);
  return count_wrong<T>(rows, inner, cols, alpha, mode != kOverwrite,
                        [&](int64_t i, int64_t k) { return a[k * lda + i]; }, b, ldb, c0, c, ldc);
}

template <typename T>
void test_gemm_tn_shapes(const char* type_name) {
  int64_t products = 0, bad_products = 0;
  for (int64_t rows : kSizes)
    for (int64_t inner : kSizes)
      for (int64_t cols : kSizes)
        for (int variant = 0; variant < 3; ++variant) {
          const bool accumulate = variant != kOverwrite;
          const bool give_transposed = (rows + inner + cols + variant) % 2 == 0;
          const int64_t pad = (rows + inner + cols) % 3 == 0 ? 0 : (rows + cols) % 4 + 1;
          const T alpha = accumulate ? static_cast<T>(-0.75) : ((rows + cols) % 2 ? T(1) : T(2.5));
          const int64_t bad =
              check_one_tn<T>(rows, inner, cols, pad, alpha, Mode(variant), give_transposed);
          ++products;
          if (bad) {
            ++bad_products;
            std::fprintf(stderr,
                         "gemm_tn<%s> rows=%lld inner=%lld cols=%lld pad=%lld alpha=%g mode=%d "
                         "a_transposed=%d: %lld bad elements\n",
                         type_name, (long long)rows, (long long)inner, (long long)cols,
                         (long long)pad, (double)alpha, variant, (int)give_transposed,
                         (long long)bad);
          }
        }
  mk_test::current_context() = std::string("gemm_tn<") + type_name + "> shapes";
  CHECK_MSG(bad_products == 0, mk_test::fmt("%g of %g products wrong", bad_products, products));
}

// inner = 0: the product is zero (overwrite) or C is unchanged (accumulate).
template <typename T>
void test_gemm_empty_inner() {
  mk_test::current_context() = "gemm inner=0";
  for (int64_t cols : {1, 5, 17, 70}) {
    const int64_t rows = 5;
    std::vector<T> c(rows * cols, mk_test::nan_value<T>());
    const T dummy = T(0);
    gemm<T>(rows, 0, cols, T(1), &dummy, 1, &dummy, cols, false, c.data(), cols);
    bool zero = true;
    for (T v : c) zero = zero && v == T(0);
    CHECK(zero);
    const std::vector<T> c0 = mk_test::randn<T>(rows * cols);
    c = c0;
    gemm<T>(rows, 0, cols, T(3), &dummy, 1, &dummy, cols, true, c.data(), cols);
    CHECK(c == c0);
  }
}

// The kernels call gemm on transposed copies: C = Aᵀ B through transpose(), checked end to end.
template <typename T>
void test_gemm_with_transpose() {
  mk_test::current_context() = "gemm(transpose(A), B)";
  for (int64_t n : {1, 5, 17}) {
    for (int64_t d_in : {7, 70}) {
      const int64_t d_out = 6;
      const std::vector<T> x = mk_test::randn<T>(n * d_in);
      const std::vector<T> e = mk_test::randn<T>(n * d_out);
      std::vector<T> xt(d_in * n);
      transpose(n, d_in, x.data(), d_in, xt.data());
      std::vector<T> g(d_in * d_out, mk_test::nan_value<T>());
      gemm<T>(d_in, n, d_out, T(1), xt.data(), n, e.data(), d_out, false, g.data(), d_out);
      std::vector<double> expected(d_in * d_out, 0.0);
      for (int64_t i = 0; i < n; ++i)
        for (int64_t k = 0; k < d_in; ++k)
          for (int64_t j = 0; j < d_out; ++j)
            expected[k * d_out + j] += double(x[i * d_in + k]) * double(e[i * d_out + j]);
      CHECK_ALLCLOSE(g, expected, sizeof(T) == 4 ? 1e-5 : 1e-13);
    }
  }
}

template <typename T>
void test_transpose() {
  mk_test::current_context() = "transpose";
  int64_t cases = 0, bad_cases = 0;
  for (int64_t rows : kSizes)
    for (int64_t cols : kSizes)
      for (int64_t pad : {0, 3}) {
        const int64_t lds = cols + pad;
        const std::vector<T> src = mk_test::randn<T>(rows * lds);
        std::vector<T> dst(rows * cols + mk_test::kGuard, static_cast<T>(mk_test::kSentinel));
        transpose(rows, cols, src.data(), lds, dst.data());
        bool ok = true;
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t j = 0; j < cols; ++j) ok = ok && dst[j * rows + i] == src[i * lds + j];
        for (int64_t g = 0; g < mk_test::kGuard; ++g)
          ok = ok && dst[rows * cols + g] == static_cast<T>(mk_test::kSentinel);
        ++cases;
        if (!ok) {
          ++bad_cases;
          std::fprintf(stderr, "transpose rows=%lld cols=%lld lds=%lld wrong\n", (long long)rows,
                       (long long)cols, (long long)lds);
        }
      }
  CHECK_MSG(bad_cases == 0, mk_test::fmt("%g of %g transposes wrong", bad_cases, cases));
}

// A deliberate wrong answer must be caught by check_one's comparison (the test can fail).
void test_checker_detects_errors() {
  mk_test::current_context() = "self-check";
  const int64_t rows = 3, inner = 5, cols = 4;
  const std::vector<double> a = mk_test::randn<double>(rows * inner);
  const std::vector<double> b = mk_test::randn<double>(inner * cols);
  std::vector<double> c(rows * cols);
  gemm<double>(rows, inner, cols, 1.0, a.data(), inner, b.data(), cols, false, c.data(), cols);
  std::vector<double> expected(rows * cols, 0.0);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t k = 0; k < inner; ++k)
      for (int64_t j = 0; j < cols; ++j) expected[i * cols + j] += a[i * inner + k] * b[k * cols + j];
  CHECK(mk_test::rel_error(c, expected) < 1e-14);
  c[5] += 1e-6;
  CHECK(mk_test::rel_error(c, expected) > 1e-9);
}

}  // namespace

int main() {
  test_gemm_shapes<double>("double");
  test_gemm_shapes<float>("float");
  test_gemm_tn_shapes<double>("double");
  test_gemm_tn_shapes<float>("float");
  test_gemm_empty_inner<double>();
  test_gemm_empty_inner<float>();
  test_gemm_with_transpose<double>();
  test_gemm_with_transpose<float>();
  test_transpose<double>();
  test_transpose<float>();
  test_checker_detects_errors();
  return mk_test::report("test_small_gemm");
}
