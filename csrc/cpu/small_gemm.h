// Small dense matrix products for one task's tiles (row-major, contiguous rows).
//
// The fast-weight tiles are small (tens to a few hundred rows and columns) and stay in L1/L2 for
// the whole unroll, so a register-blocked kernel that the compiler vectorises beats a call into a
// BLAS library, whose dispatch and packing cost more than the product itself at these sizes.
// Internal to the CPU backend: no torch, no argument checks (ops/ checked them once).
#pragma once

#include <cstdint>
#include <vector>

namespace metakernels {
namespace cpu {

// The target's vector register and the register block of the wide kernel (ROWS x NV vectors of
// accumulators, plus NV for a row of B): with AVX-512's 32 registers of 64 bytes, 6 x 4; with
// 16 AVX registers of 32 bytes or 16 SSE/NEON registers of 16, 3 x 4. A vector wider than the
// target's registers would be split by the compiler piecewise, element by element, and run ~50x
// slower, so the width follows the target (-march).
#if defined(__AVX512F__)
constexpr int kVectorBytes = 64, kBlockRows = 6, kBlockVectors = 4;
#elif defined(__AVX__)
constexpr int kVectorBytes = 32, kBlockRows = 3, kBlockVectors = 4;
#else
constexpr int kVectorBytes = 16, kBlockRows = 3, kBlockVectors = 4;
#endif

// A vector of T in one register. GCC and Clang lower its arithmetic to the target's instructions.
// Loads and stores go through an unaligned, may_alias twin of the type rather than memcpy: with
// GCC's generic x86-64-v3 tuning (which splits unaligned 256-bit loads), a memcpy'd vector went
// through the stack and ran 20x slower.
template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(kVectorBytes)));
  typedef T unaligned __attribute__((vector_size(kVectorBytes), aligned(sizeof(T)), may_alias));
  static constexpr int64_t lanes = kVectorBytes / static_cast<int64_t>(sizeof(T));
};

template <typename T>
inline typename Vec<T>::type vload(const T* p) {
  return *reinterpret_cast<const typename Vec<T>::unaligned*>(p);
}

template <typename T>
inline void vstore(T* p, typename Vec<T>::type v) {
  *reinterpret_cast<typename Vec<T>::unaligned*>(p) = v;
}

// C[ROWS, NV vectors] = alpha * A[ROWS, K] @ B[K, NV vectors] (+ D): the accumulators stay in
// registers across K. Here and below, A[r, k] = a[r * lda + k * acs] (acs = 1: row-major; a
// transpose read in place: lda = 1, acs = its row stride), and D (null: none) has row stride ldd
// and may be C itself (accumulate); each element of D is read before that of C is written.
template <typename T, int ROWS, int NV>
inline void gemm_block_vec(const T* __restrict a, int64_t lda, int64_t acs,
                           const T* __restrict b, int64_t ldb, const T* d, int64_t ldd, T* c,
                           int64_t ldc, int64_t inner, T alpha) {
  using V = typename Vec<T>::type;
  constexpr int64_t L = Vec<T>::lanes;
  V acc[ROWS][NV];
  for (int r = 0; r < ROWS; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = V{};
  for (int64_t k = 0; k < inner; ++k) {
    const T* b_row = b + k * ldb;
    V b_vec[NV];
    for (int v = 0; v < NV; ++v) b_vec[v] = vload(b_row + v * L);
    for (int r = 0; r < ROWS; ++r) {
      const T a_rk = a[r * lda + k * acs];
      for (int v = 0; v < NV; ++v) acc[r][v] += a_rk * b_vec[v];
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int v = 0; v < NV; ++v) {
      V out = alpha * acc[r][v];
      if (d) out += vload(d + r * ldd + v * L);
      vstore(c + r * ldc + v * L, out);
    }
}

// The last cols < one vector of columns, in scalar code the compiler may vectorise.
template <typename T, int ROWS>
inline void gemm_block_tail(const T* __restrict a, int64_t lda, int64_t acs,
                            const T* __restrict b, int64_t ldb, const T* d, int64_t ldd, T* c,
                            int64_t ldc, int64_t inner, int64_t cols, T alpha) {
  T acc[ROWS][Vec<T>::lanes];
  for (int r = 0; r < ROWS; ++r)
    for (int64_t j = 0; j < cols; ++j) acc[r][j] = T(0);
  for (int64_t k = 0; k < inner; ++k) {
    const T* b_row = b + k * ldb;
    for (int r = 0; r < ROWS; ++r) {
      const T a_rk = a[r * lda + k * acs];
      for (int64_t j = 0; j < cols; ++j) acc[r][j] += a_rk * b_row[j];
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    T* c_row = c + r * ldc;
    for (int64_t j = 0; j < cols; ++j)
      c_row[j] = d ? d[r * ldd + j] + alpha * acc[r][j] : alpha * acc[r][j];
  }
}

template <typename T, int ROWS>
inline void gemm_rows(const T* a, int64_t lda, int64_t acs, const T* b, int64_t ldb, const T* d,
                      int64_t ldd, T* c, int64_t ldc, int64_t inner, int64_t cols, T alpha) {
  constexpr int64_t L = Vec<T>::lanes;
  int64_t j = 0;
  for (; j + kBlockVectors * L <= cols; j += kBlockVectors * L)
    gemm_block_vec<T, ROWS, kBlockVectors>(a, lda, acs, b + j, ldb, d ? d + j : d, ldd, c + j,
                                           ldc, inner, alpha);
  for (; j + L <= cols; j += L)
    gemm_block_vec<T, ROWS, 1>(a, lda, acs, b + j, ldb, d ? d + j : d, ldd, c + j, ldc, inner,
                               alpha);
  if (j < cols)
    gemm_block_tail<T, ROWS>(a, lda, acs, b + j, ldb, d ? d + j : d, ldd, c + j, ldc, inner,
                             cols - j, alpha);
}

// The last rows < kBlockRows, as one block of exactly that many rows (B's rows are loaded once
// for all of them, not once per row).
template <typename T, int ROWS>
inline void gemm_rows_tail(int64_t rows, const T* a, int64_t lda, int64_t acs, const T* b,
                           int64_t ldb, const T* d, int64_t ldd, T* c, int64_t ldc, int64_t inner,
                           int64_t cols, T alpha) {
  if constexpr (ROWS >= 1) {
    if (rows == ROWS) {
      gemm_rows<T, ROWS>(a, lda, acs, b, ldb, d, ldd, c, ldc, inner, cols, alpha);
      return;
    }
    gemm_rows_tail<T, ROWS - 1>(rows, a, lda, acs, b, ldb, d, ldd, c, ldc, inner, cols, alpha);
  }
}

// C[ROWS, COLS] = alpha * A[ROWS, K] @ Bt[COLS, K]ᵀ (+ D) as dot products along K: the layout
// for products with few output columns (a 5-way classifier head), where vectors run along K.
template <typename T, int ROWS, int COLS>
inline void gemm_block_dot(const T* __restrict a, int64_t lda, const T* __restrict bt,
                           int64_t ldbt, const T* d, int64_t ldd, T* c, int64_t ldc,
                           int64_t inner, T alpha) {
  using V = typename Vec<T>::type;
  constexpr int64_t L = Vec<T>::lanes;
  V acc[ROWS][COLS];
  for (int r = 0; r < ROWS; ++r)
    for (int q = 0; q < COLS; ++q) acc[r][q] = V{};
  int64_t k = 0;
  for (; k + L <= inner; k += L) {
    V a_vec[ROWS];
    for (int r = 0; r < ROWS; ++r) a_vec[r] = vload(a + r * lda + k);
    for (int q = 0; q < COLS; ++q) {
      const V b_vec = vload(bt + q * ldbt + k);
      for (int r = 0; r < ROWS; ++r) acc[r][q] += a_vec[r] * b_vec;
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int q = 0; q < COLS; ++q) {
      T sum = T(0);
      for (int64_t l = 0; l < L; ++l) sum += acc[r][q][l];
      for (int64_t kk = k; kk < inner; ++kk) sum += a[r * lda + kk] * bt[q * ldbt + kk];
      c[r * ldc + q] = d ? d[r * ldd + q] + alpha * sum : alpha * sum;
    }
}

template <typename T, int ROWS>
inline void gemm_rows_dot(const T* a, int64_t lda, const T* bt, int64_t ldbt, const T* d,
                          int64_t ldd, T* c, int64_t ldc, int64_t inner, int64_t cols, T alpha) {
  int64_t q = 0;
  for (; q + 2 <= cols; q += 2)
    gemm_block_dot<T, ROWS, 2>(a, lda, bt + q * ldbt, ldbt, d ? d + q : d, ldd, c + q, ldc, inner,
                               alpha);
  if (q < cols)
    gemm_block_dot<T, ROWS, 1>(a, lda, bt + q * ldbt, ldbt, d ? d + q : d, ldd, c + q, ldc, inner,
                               alpha);
}

// dst[cols, rows] = src[rows, cols]ᵀ (src rows have stride lds).
template <typename T>
inline void transpose(int64_t rows, int64_t cols, const T* src, int64_t lds, T* dst) {
  constexpr int64_t kTile = 16;
  for (int64_t i0 = 0; i0 < rows; i0 += kTile)
    for (int64_t j0 = 0; j0 < cols; j0 += kTile) {
      const int64_t i1 = i0 + kTile < rows ? i0 + kTile : rows;
      const int64_t j1 = j0 + kTile < cols ? j0 + kTile : cols;
      for (int64_t j = j0; j < j1; ++j)
        for (int64_t i = i0; i < i1; ++i) dst[j * rows + i] = src[i * lds + j];
    }
}

// C[M, N] = alpha * A[M, K] @ B[K, N] + D[M, N]   (D null: without it; D = C: accumulate)
// Leading dimensions are row strides in elements; with K = 0 the product is zero. Narrow products
// (N under one vector, K at least one vector) run as dot products along K on a transposed copy
// of B. D is added in the store of each block of C, so C = D + product costs no pass of its own.
// The register-blocked product for an A read with any strides (A[r, k] = a[r * lda + k * acs]).
template <typename T>
inline void gemm_blocked(int64_t rows, int64_t inner, int64_t cols, T alpha, const T* a,
                         int64_t lda, int64_t acs, const T* b, int64_t ldb, const T* d,
                         int64_t ldd, T* c, int64_t ldc) {
  int64_t i = 0;
  for (; i + kBlockRows <= rows; i += kBlockRows)
    gemm_rows<T, kBlockRows>(a + i * lda, lda, acs, b, ldb, d ? d + i * ldd : d, ldd, c + i * ldc,
                             ldc, inner, cols, alpha);
  gemm_rows_tail<T, kBlockRows - 1>(rows - i, a + i * lda, lda, acs, b, ldb,
                                    d ? d + i * ldd : d, ldd, c + i * ldc, ldc, inner, cols,
                                    alpha);
}

template <typename T>
inline void gemm_add(int64_t rows, int64_t inner, int64_t cols, T alpha, const T* a, int64_t lda,
                     const T* b, int64_t ldb, const T* d, int64_t ldd, T* c, int64_t ldc) {
  constexpr int64_t L = Vec<T>::lanes;
  if (cols < L && inner >= L) {
    constexpr int kRows = 4;  // 4 x 2 dot accumulators
    thread_local std::vector<T> b_transposed;
    b_transposed.resize(static_cast<size_t>(inner * cols));
    transpose(inner, cols, b, ldb, b_transposed.data());
    const T* bt = b_transposed.data();
    int64_t i = 0;
    for (; i + kRows <= rows; i += kRows)
      gemm_rows_dot<T, kRows>(a + i * lda, lda, bt, inner, d ? d + i * ldd : d, ldd, c + i * ldc,
                              ldc, inner, cols, alpha);
    for (; i < rows; ++i)
      gemm_rows_dot<T, 1>(a + i * lda, lda, bt, inner, d ? d + i * ldd : d, ldd, c + i * ldc, ldc,
                          inner, cols, alpha);
    return;
  }
  gemm_blocked<T>(rows, inner, cols, alpha, a, lda, 1, b, ldb, d, ldd, c, ldc);
}

// C[M, N] = alpha * A[M, K] @ B[K, N]          (accumulate = false)
// C[M, N] += alpha * A[M, K] @ B[K, N]         (accumulate = true)
template <typename T>
inline void gemm(int64_t rows, int64_t inner, int64_t cols, T alpha, const T* a, int64_t lda,
                 const T* b, int64_t ldb, bool accumulate, T* c, int64_t ldc) {
  gemm_add<T>(rows, inner, cols, alpha, a, lda, b, ldb, accumulate ? c : nullptr, ldc, c, ldc);
}

// Whether gemm_tn below reads A's transpose for a C of this shape: not for a narrow C, which it
// computes from A itself. Callers that keep Aᵀ for reuse skip making it when this is false.
template <typename T>
inline bool gemm_tn_reads_transposed(int64_t rows, int64_t cols) {
  return !(cols < Vec<T>::lanes && rows >= Vec<T>::lanes);
}

// C[rows, cols] = alpha * A[inner, rows]ᵀ @ B[inner, cols] + D (D as in gemm_add): the products
// Xᵀ E of the inner gradient. a_transposed is Aᵀ [rows, inner] dense when the caller already has
// it (3-D x reuses it every step), else null: then A is read in place, column by column (no
// transposed copy). A narrow C (a classifier head with few columns) is computed as (Bᵀ A)ᵀ, so
// that the vectors run along the long side.
template <typename T>
inline void gemm_tn_add(int64_t rows, int64_t inner, int64_t cols, T alpha, const T* a,
                        int64_t lda, const T* a_transposed, const T* b, int64_t ldb, const T* d,
                        int64_t ldd, T* c, int64_t ldc) {
  thread_local std::vector<T> scratch, product;
  if (!gemm_tn_reads_transposed<T>(rows, cols)) {
    scratch.resize(static_cast<size_t>(cols * inner));
    product.resize(static_cast<size_t>(cols * rows));
    transpose(inner, cols, b, ldb, scratch.data());
    gemm<T>(cols, inner, rows, alpha, scratch.data(), inner, a, lda, false, product.data(), rows);
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j)
        c[i * ldc + j] = d ? d[i * ldd + j] + product[j * rows + i] : product[j * rows + i];
    return;
  }
  if (a_transposed == nullptr)
    gemm_blocked<T>(rows, inner, cols, alpha, a, 1, lda, b, ldb, d, ldd, c, ldc);
  else
    gemm_add<T>(rows, inner, cols, alpha, a_transposed, inner, b, ldb, d, ldd, c, ldc);
}

// C[rows, cols] (+)= alpha * A[inner, rows]ᵀ @ B[inner, cols], as gemm_tn_add.
template <typename T>
inline void gemm_tn(int64_t rows, int64_t inner, int64_t cols, T alpha, const T* a, int64_t lda,
                    const T* a_transposed, const T* b, int64_t ldb, bool accumulate, T* c,
                    int64_t ldc) {
  gemm_tn_add<T>(rows, inner, cols, alpha, a, lda, a_transposed, b, ldb, accumulate ? c : nullptr,
                 ldc, c, ldc);
}

}  // namespace cpu
}  // namespace metakernels
