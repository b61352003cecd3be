// The chunked (WY/UT) path of fast_weight_unroll on the CPU (the maths: README.md, "The chunked
// form"; the interface: metakernels/fast_weight_chunked.h; the spec in plain PyTorch:
// metakernels/reference/fast_weight_chunked.py). mse with a different support batch every step,
// the bias folded in as a column of ones. A chunk of C steps (C·n stacked rows) costs a few
// C·n × D × d_out products and a block-triangular solve, instead of C rank-n updates of the
// d_in × d_out state, which at small n run at the speed of memory, not of the multipliers.
//
// Only the blocks of the Gram matrix K Kᵀ below the diagonal blocks are formed (M masks the
// rest), step block by step block: the solve L R = K S − Y runs block row by block row (row
// block j needs the rows of steps before j), and its transpose, in the backward, block row by
// block row from the last.
#include <algorithm>
#include <cstring>
#include <vector>

#include "metakernels/fast_weight.h"
#include "metakernels/fast_weight_chunked.h"
#include "small_gemm.h"
#include "unroll_helpers.h"

namespace metakernels {

namespace {

// C (+)= alpha A B for the chunk's K̃ S-shaped products (rows × D by D × d_out), one panel of
// B's columns at a time: a D × panel slice of B (16.5 KB at D = 129 in float32) stays in L1
// while every row block of A passes over it, where the whole of B (66 KB) would be streamed
// from L2 once per row block.
template <typename T>
void gemm_panels(int64_t rows, int64_t inner, int64_t cols, T alpha, const T* a, int64_t lda,
                 const T* b, int64_t ldb, bool accumulate, T* c, int64_t ldc) {
  constexpr int64_t kPanel = cpu::kBlockVectors * cpu::Vec<T>::lanes;
  for (int64_t j = 0; j < cols; j += kPanel)
    cpu::gemm<T>(rows, inner, std::min(kPanel, cols - j), alpha, a, lda, b + j, ldb, accumulate,
                 c + j, ldc);
}

// One task's chunk: the stacked rows and what the forward and backward build from them.
// Sizes: rows = C·n (at most), cols D = d_in + [bias], q = C·m.
template <typename T>
struct Chunk {
  int64_t n, d_in, d_out, m, dim, max_rows, max_queries;
  bool has_bias;
  int64_t steps = 0, rows = 0, queries = 0;  // this chunk's
  std::vector<T> keys, keys_t, gram, beta, residual, residual_t, weighted, work, query_keys,
      cross;

  Chunk(int64_t chunk, int64_t n_, int64_t d_in_, int64_t d_out_, int64_t m_, bool bias)
      : n(n_), d_in(d_in_), d_out(d_out_), m(m_), dim(d_in_ + (bias ? 1 : 0)),
        max_rows(chunk * n_), max_queries(chunk * m_), has_bias(bias),
        keys(max_rows * dim), keys_t(dim * max_rows), gram(max_rows * max_rows), beta(max_rows),
        residual(max_rows * d_out_), residual_t(d_out_ * max_rows), weighted(max_rows * d_out_),
        work(max_rows * d_out_), query_keys(max_queries * dim), cross(max_queries * max_rows) {}

  // K̃ = [X 1] of steps [start, start + steps), its transpose, and β_r = η_t / n.
  void load(const UnrollInputs<T>& in, int64_t task, int64_t total_steps, int64_t start,
            int64_t steps_) {
    steps = steps_;
    rows = steps * n;
    for (int64_t s = 0; s < steps; ++s) {
      const T* x = cpu::at_step(in.x, in.x_task_stride, in.x_step_stride, task, start + s);
      const T lr = in.lr[task * total_steps + start + s] / T(n);
      for (int64_t i = 0; i < n; ++i) {
        T* row = keys.data() + (s * n + i) * dim;
        std::memcpy(row, x + i * d_in, sizeof(T) * d_in);
        if (has_bias) row[d_in] = T(1);
        beta[s * n + i] = lr;
      }
    }
    cpu::transpose(rows, dim, keys.data(), dim, keys_t.data());
  }

  // Q̃ = [Q 1] of the chunk's steps (queries: [B, T, m, d_in] dense).
  void load_queries(const UnrollInputs<T>& in, int64_t task, int64_t total_steps, int64_t start) {
    queries = steps * m;
    const T* q = in.queries + (task * total_steps + start) * m * d_in;
    for (int64_t r = 0; r < queries; ++r) {
      std::memcpy(query_keys.data() + r * dim, q + r * d_in, sizeof(T) * d_in);
      if (has_bias) query_keys[r * dim + d_in] = T(1);
    }
  }

  // G = K̃ K̃ᵀ [rows, rows], of which only the blocks left of the diagonal blocks are read. One
  // product of the whole square (twice the blocks needed) runs faster than a product per row
  // block, whose first blocks are too narrow for the vector kernel.
  void build_gram() {
    cpu::gemm<T>(rows, dim, rows, T(1), keys.data(), dim, keys_t.data(), rows, false,
                 gram.data(), max_rows);
  }

  // Q̃ K̃ᵀ where the query's step s sees the rows of steps ≤ s (N), zero elsewhere: [q, rows].
  void build_cross() {
    cpu::gemm<T>(queries, dim, rows, T(1), query_keys.data(), dim, keys_t.data(), rows, false,
                 cross.data(), max_rows);
    for (int64_t i = 0; i < queries; ++i) {
      T* out = cross.data() + i * max_rows;
      std::fill(out + (i / m + 1) * n, out + rows, T(0));
    }
  }

  // weighted = diag(β) R, rows [begin, end).
  void weigh(int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t j = 0; j < d_out; ++j)
        weighted[r * d_out + j] = beta[r] * residual[r * d_out + j];
  }
};

// S −= K̃ᵀ diag(β) R: the next chunk's start.
template <typename T>
void advance_state(const Chunk<T>& c, T* state) {
  cpu::gemm<T>(c.dim, c.rows, c.d_out, T(-1), c.keys_t.data(), c.rows, c.weighted.data(),
               c.d_out, true, state, c.d_out);
}

// S = [W_0; b_0ᵀ] of a task.
template <typename T>
void initial_state(const UnrollInputs<T>& in, int64_t task, int64_t d_in, int64_t d_out,
                   T* state) {
  std::memcpy(state, in.weight + task * in.weight_task_stride, sizeof(T) * d_in * d_out);
  if (in.bias) std::memcpy(state + d_in * d_out, in.bias + task * in.bias_task_stride,
                           sizeof(T) * d_out);
}

}  // namespace

template <typename T>
void fast_weight_unroll_chunked_forward(const UnrollDims& dims, const UnrollInputs<T>& in,
                                        const UnrollForwardOutputs<T>& out, int64_t chunk,
                                        int64_t task_begin, int64_t task_end) {
  const int64_t T_ = dims.steps, n = dims.support, d_in = dims.d_in, d_out = dims.d_out;
  const int64_t m = in.queries ? dims.queries : 0;
  const bool has_bias = in.bias != nullptr;
  chunk = std::min(chunk, T_);
  Chunk<T> c(chunk, n, d_in, d_out, m, has_bias);
  const int64_t dim = c.dim;
  std::vector<T> state(dim * d_out);
  const T inv_n = T(1) / T(n);

  for (int64_t b = task_begin; b < task_end; ++b) {
    initial_state(in, b, d_in, d_out, state.data());
    for (int64_t start = 0; start < T_; start += chunk) {
      const int64_t steps = std::min(chunk, T_ - start);
      c.load(in, b, T_, start, steps);
      c.build_gram();
      // V = K̃ S − Y, then row block by row block R_j = V_j − G_{j,<j} diag(β) R_{<j}.
      gemm_panels<T>(c.rows, dim, d_out, T(1), c.keys.data(), dim, state.data(), d_out, false,
                     c.residual.data(), d_out);
      for (int64_t s = 0; s < steps; ++s) {
        const T* y = cpu::at_step(in.y, in.y_task_stride, in.y_step_stride, b, start + s);
        T* r = c.residual.data() + s * n * d_out;
        for (int64_t k = 0; k < n * d_out; ++k) r[k] -= y[k];
        if (s > 0)
          cpu::gemm<T>(n, s * n, d_out, T(-1), c.gram.data() + s * n * c.max_rows, c.max_rows,
                       c.weighted.data(), d_out, true, r, d_out);
        c.weigh(s * n, (s + 1) * n);
        // E_t = R_t / n, ℓ_t = ½‖R_t‖² / n.
        T* e = out.residual + (b * T_ + start + s) * n * d_out;
        for (int64_t k = 0; k < n * d_out; ++k) e[k] = r[k] * inv_n;
        out.losses[b * T_ + start + s] = T(0.5) * inv_n * cpu::dot(n * d_out, r, r);
      }
      // O = Q̃ S − (N ∘ Q̃ K̃ᵀ) diag(β) R, before S moves on.
      if (m) {
        c.load_queries(in, b, T_, start);
        c.build_cross();
        T* readout = out.readout + (b * T_ + start) * m * d_out;
        gemm_panels<T>(c.queries, dim, d_out, T(1), c.query_keys.data(), dim, state.data(),
                       d_out, false, readout, d_out);
        cpu::gemm<T>(c.queries, c.rows, d_out, T(-1), c.cross.data(), c.max_rows,
                     c.weighted.data(), d_out, true, readout, d_out);
      }
      advance_state(c, state.data());
    }
    std::memcpy(out.weight + b * d_in * d_out, state.data(), sizeof(T) * d_in * d_out);
    if (has_bias) std::memcpy(out.bias + b * d_out, state.data() + d_in * d_out, sizeof(T) * d_out);
  }
}

template <typename T>
void fast_weight_unroll_chunked_backward(const UnrollDims& dims, const UnrollInputs<T>& in,
                                         const UnrollBackwardArgs<T>& args, int64_t chunk,
                                         int64_t task_begin, int64_t task_end) {
  const int64_t T_ = dims.steps, n = dims.support, d_in = dims.d_in, d_out = dims.d_out;
  const bool has_bias = in.bias != nullptr;
  const bool second_order = !args.first_order;
  const bool readout = in.queries != nullptr && args.grad_readout != nullptr;
  const int64_t m = readout ? dims.queries : 0;
  const bool want_x = args.grad_x != nullptr && second_order;
  chunk = std::min(chunk, T_);
  const int64_t chunks = (T_ + chunk - 1) / chunk;
  Chunk<T> c(chunk, n, d_in, d_out, m, has_bias);
  const int64_t dim = c.dim, state_size = dim * d_out, R = c.max_rows, Q = c.max_queries;
  std::vector<T> starts(chunks * state_size), state_adj(state_size), new_adj(state_size);
  std::vector<T> transposed(state_size), pushed(R * d_out), residual_adj(R * d_out);
  std::vector<T> value_adj(R * d_out), keys_adj(want_x ? R * dim : 0), beta_adj(R);
  std::vector<T> product(R * R), mixing_adj(Q * R), query_adj(Q * dim);

  for (int64_t b = task_begin; b < task_end; ++b) {
    const T* residual_all = args.residual + b * T_ * n * d_out;
    // The chunk starts, from W̃_0 and the saved E: S′ = S − K̃ᵀ diag(β) R.
    initial_state(in, b, d_in, d_out, starts.data());
    for (int64_t index = 0; index + 1 < chunks; ++index) {
      const int64_t start = index * chunk;
      c.load(in, b, T_, start, chunk);
      for (int64_t k = 0; k < c.rows * d_out; ++k)
        c.residual[k] = T(n) * residual_all[start * n * d_out + k];
      c.weigh(0, c.rows);
      std::memcpy(starts.data() + (index + 1) * state_size, starts.data() + index * state_size,
                  sizeof(T) * state_size);
      advance_state(c, starts.data() + (index + 1) * state_size);
    }
    // Ŝ′ of the last chunk: [Ŵ_T; b̂_T].
    std::memcpy(state_adj.data(), args.grad_weight_final + b * d_in * d_out,
                sizeof(T) * d_in * d_out);
    if (has_bias) {
      T* last = state_adj.data() + d_in * d_out;
      if (args.grad_bias_final)
        std::memcpy(last, args.grad_bias_final + b * d_out, sizeof(T) * d_out);
      else
        std::fill(last, last + d_out, T(0));
    }

    for (int64_t index = chunks - 1; index >= 0; --index) {
      const int64_t start = index * chunk, steps = std::min(chunk, T_ - start);
      const T* state = starts.data() + index * state_size;
      c.load(in, b, T_, start, steps);
      const int64_t rows = c.rows;
      for (int64_t k = 0; k < rows * d_out; ++k)
        c.residual[k] = T(n) * residual_all[start * n * d_out + k];
      cpu::transpose(rows, d_out, c.residual.data(), d_out, c.residual_t.data());

      // Through S′ = S − K̃ᵀ diag(β) R: R̂ = −diag(β) K̃ Ŝ′, β̂ = −rowsum(K̃ Ŝ′ ∘ R),
      // K̂ = −diag(β) R Ŝ′ᵀ.
      gemm_panels<T>(rows, dim, d_out, T(1), c.keys.data(), dim, state_adj.data(), d_out, false,
                     pushed.data(), d_out);
      for (int64_t r = 0; r < rows; ++r) {
        beta_adj[r] = -cpu::dot(d_out, pushed.data() + r * d_out, c.residual.data() + r * d_out);
        for (int64_t j = 0; j < d_out; ++j)
          residual_adj[r * d_out + j] = -c.beta[r] * pushed[r * d_out + j];
      }
      if (want_x) {
        cpu::transpose(dim, d_out, state_adj.data(), d_out, transposed.data());
        cpu::gemm<T>(rows, d_out, dim, T(1), c.residual.data(), d_out, transposed.data(), dim,
                     false, keys_adj.data(), dim);
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t k = 0; k < dim; ++k) keys_adj[r * dim + k] *= -c.beta[r];
      }
      std::copy(state_adj.begin(), state_adj.end(), new_adj.begin());
      if (want_x || (readout && args.grad_queries))
        cpu::transpose(dim, d_out, state, d_out, transposed.data());  // Sᵀ from here on

      // Through O = Q̃ S − P R, P = (N ∘ B) diag β, B = Q̃ K̃ᵀ: P̂ = −Ô Rᵀ, B̂ = N ∘ P̂ diag β.
      if (m) {
        c.load_queries(in, b, T_, start);
        c.build_cross();
        const int64_t q = c.queries;
        const T* out_adj = args.grad_readout + (b * T_ + start) * m * d_out;
        cpu::gemm<T>(q, d_out, rows, T(-1), out_adj, d_out, c.residual_t.data(), rows, false,
                     mixing_adj.data(), R);
        for (int64_t i = 0; i < q; ++i) {
          const int64_t seen = (i / m + 1) * n;
          T* p_adj = mixing_adj.data() + i * R;
          T* p = c.cross.data() + i * R;
          for (int64_t r = 0; r < seen; ++r) {
            beta_adj[r] += p_adj[r] * p[r];
            p_adj[r] *= c.beta[r];  // B̂
            p[r] *= c.beta[r];      // P
          }
          std::fill(p_adj + seen, p_adj + rows, T(0));
        }
        cpu::gemm_tn<T>(rows, q, d_out, T(-1), c.cross.data(), R, nullptr, out_adj, d_out, true,
                        residual_adj.data(), d_out);
        cpu::gemm_tn<T>(dim, q, d_out, T(1), c.query_keys.data(), dim, nullptr, out_adj, d_out,
                        true, new_adj.data(), d_out);
        if (args.grad_queries) {  // Q̂̃ = Ô Sᵀ + B̂ K̃
          cpu::gemm<T>(q, d_out, dim, T(1), out_adj, d_out, transposed.data(), dim, false,
                       query_adj.data(), dim);
          cpu::gemm<T>(q, rows, dim, T(1), mixing_adj.data(), R, c.keys.data(), dim, true,
                       query_adj.data(), dim);
          T* grad_q = args.grad_queries + (b * T_ + start) * m * d_in;
          for (int64_t i = 0; i < q; ++i)
            std::memcpy(grad_q + i * d_in, query_adj.data() + i * dim, sizeof(T) * d_in);
        }
        if (want_x)
          cpu::gemm_tn<T>(rows, q, dim, T(1), mixing_adj.data(), R, nullptr, c.query_keys.data(),
                          dim, true, keys_adj.data(), dim);
      } else if (args.grad_queries) {
        T* grad_q = args.grad_queries + (b * T_ + start) * dims.queries * d_in;
        std::fill(grad_q, grad_q + steps * dims.queries * d_in, T(0));
      }

      // Through L R = K̃ S − Y (second order): V̂ = L⁻ᵀ R̂ block row by block row from the last,
      // V̂_j = R̂_j − diag(β_j) Σ_{i>j} G_{i,j}ᵀ V̂_i; then Â = M ∘ (−V̂ Rᵀ), Ĝ = Â diag β.
      if (second_order) {
        c.build_gram();
        for (int64_t s = steps - 1; s >= 0; --s) {
          T* v = value_adj.data() + s * n * d_out;
          const int64_t later = rows - (s + 1) * n;
          if (later > 0) {
            cpu::gemm_tn<T>(n, later, d_out, T(1), c.gram.data() + (s + 1) * n * R + s * n, R,
                            nullptr, value_adj.data() + (s + 1) * n * d_out, d_out, false, v,
                            d_out);
            for (int64_t i = 0; i < n; ++i) {
              const T beta = c.beta[s * n + i];
              for (int64_t j = 0; j < d_out; ++j)
                v[i * d_out + j] = residual_adj[(s * n + i) * d_out + j] - beta * v[i * d_out + j];
            }
          } else {
            std::memcpy(v, residual_adj.data() + s * n * d_out, sizeof(T) * n * d_out);
          }
        }
        // product = Ĝ + Ĝᵀ with Ĝ_{r r'} = −(V̂ Rᵀ)_{r r'} β_{r'} below the diagonal blocks;
        // β̂_{r'} −= Σ_r (V̂ Rᵀ)_{r r'} G_{r r'}. Only for x's or lr's gradient.
        if (want_x || args.grad_lr) {
          cpu::gemm<T>(rows, d_out, rows, T(1), value_adj.data(), d_out, c.residual_t.data(),
                       rows, false, product.data(), R);
          for (int64_t i = 0; i < rows; ++i) {
            T* h = product.data() + i * R;
            const T* g = c.gram.data() + i * R;
            const int64_t earlier = i - i % n;
            for (int64_t r = 0; r < earlier; ++r) {
              beta_adj[r] -= h[r] * g[r];
              h[r] = -h[r] * c.beta[r];
            }
            std::fill(h + earlier, h + rows, T(0));
          }
          for (int64_t i = 0; i < rows; ++i)
            for (int64_t r = 0; r < i - i % n; ++r) product[r * R + i] = product[i * R + r];
        }
        // Ŝ += K̃ᵀ V̂; K̂ += V̂ Sᵀ + (Ĝ + Ĝᵀ) K̃; Ŷ = −V̂.
        cpu::gemm<T>(dim, rows, d_out, T(1), c.keys_t.data(), rows, value_adj.data(), d_out, true,
                     new_adj.data(), d_out);
        if (want_x) {
          cpu::gemm<T>(rows, d_out, dim, T(1), value_adj.data(), d_out, transposed.data(), dim,
                       true, keys_adj.data(), dim);
          cpu::gemm<T>(rows, rows, dim, T(1), product.data(), R, c.keys.data(), dim, true,
                       keys_adj.data(), dim);
        }
        if (args.grad_y) {
          T* grad_y = args.grad_y + (b * T_ + start) * n * d_out;
          for (int64_t k = 0; k < rows * d_out; ++k) grad_y[k] = -value_adj[k];
        }
      } else if (args.grad_y) {
        std::fill(args.grad_y + (b * T_ + start) * n * d_out,
                  args.grad_y + (b * T_ + start + steps) * n * d_out, T(0));
      }
      if (args.grad_x) {
        T* grad_x = args.grad_x + (b * T_ + start) * n * d_in;
        for (int64_t r = 0; r < rows; ++r) {
          if (want_x)
            std::memcpy(grad_x + r * d_in, keys_adj.data() + r * dim, sizeof(T) * d_in);
          else
            std::fill(grad_x + r * d_in, grad_x + (r + 1) * d_in, T(0));
        }
      }
      if (args.grad_lr)
        for (int64_t s = 0; s < steps; ++s) {
          T sum = T(0);
          for (int64_t i = 0; i < n; ++i) sum += beta_adj[s * n + i];
          args.grad_lr[b * T_ + start + s] = sum / T(n);
        }
      std::swap(state_adj, new_adj);
    }

    if (args.grad_weight) {
      T* grad_weight = args.grad_weight + (args.sum_grad_weight ? 0 : b * d_in * d_out);
      if (args.sum_grad_weight)
        for (int64_t k = 0; k < d_in * d_out; ++k) grad_weight[k] += state_adj[k];
      else
        std::memcpy(grad_weight, state_adj.data(), sizeof(T) * d_in * d_out);
    }
    if (args.grad_bias)
      std::memcpy(args.grad_bias + b * d_out, state_adj.data() + d_in * d_out, sizeof(T) * d_out);
  }
}

#define MK_INSTANTIATE_CHUNKED(T)                                                               \
  template void fast_weight_unroll_chunked_forward<T>(                                          \
      const UnrollDims&, const UnrollInputs<T>&, const UnrollForwardOutputs<T>&, int64_t,       \
      int64_t, int64_t);                                                                        \
  template void fast_weight_unroll_chunked_backward<T>(                                         \
      const UnrollDims&, const UnrollInputs<T>&, const UnrollBackwardArgs<T>&, int64_t,         \
      int64_t, int64_t);

MK_INSTANTIATE_CHUNKED(float)
MK_INSTANTIATE_CHUNKED(double)

}  // namespace metakernels
