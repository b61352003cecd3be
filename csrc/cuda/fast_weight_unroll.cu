// CUDA kernels of fast_weight_unroll (forward and the exact second-order backward of SPEC.md
// section 1) and linear_hvp (section 2). No torch here: csrc/torch/binding_cuda.cpp passes raw
// pointers through metakernels/cuda_kernels.h.
//
// Design: one CTA (kThreads threads) per task, a grid-stride loop over tasks. The task's float32
// state lives on chip for all T steps:
//   forward   W_t [d_in·d_out], b_t [d_out], Z_t → E_t [n·d_out]
//   backward  Ŵ [d_in·d_out], b̂ [d_out], U → Ẑ [n·d_out], softmax probs [n·d_out] (ce only)
//   hvp       U → Ẑ [n·d_out], logits → probs [n·d_out] (ce only)
// (see *_smem_bytes below: 128×128 with n = 64 takes 98,816 B forward and backward (mse), 2 CTAs
// per SM; ce's backward adds n·d_out floats). Inputs
// are read from global memory (L1/L2-resident: a task's X_t is at most a few tens of KB), widened
// to float32 on load; every product accumulates in float32. The per-row arithmetic (the loss
// gradient, the softmax Jacobian product, the update) is the __host__ __device__ code of
// metakernels/tile_math.h, which csrc/tests/test_tile_math.cpp and test_tile_math_cuda.cpp check
// on the host.
//
// Memory: like the CPU backend, the forward saves E_t for every step and W_t only when asked
// (states), both float32; the backward recomputes everything else from them.
//
// Shapes whose working set does not fit in the GPU's shared memory (opt-in maximum, 227 KB on
// H100/H200) run the same kernels with the state in a global-memory workspace, one slice per CTA
// (cudaMallocAsync on the stream): slower, same arithmetic, same answer.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "metakernels/cuda_kernels.h"
#include "metakernels/tile_math.h"

namespace metakernels {
namespace cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Static shared memory of every kernel (the block reduction's scratch), kept out of the dynamic
// budget.
constexpr size_t kStaticSmemBytes = 64 * sizeof(float);
constexpr size_t kDefaultSmemBytes = 48 * 1024;

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    throw std::runtime_error(std::string("metakernels CUDA backend: ") + what + " failed: " +
                             cudaGetErrorString(status));
}

// ---- loads and stores: float32 state, inputs and outputs in their own dtype -----------------
__device__ __forceinline__ float ld(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float ld(const __half* p, int64_t i) { return __half2float(p[i]); }
__device__ __forceinline__ float ld(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}
__device__ __forceinline__ void st(float* p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void st(__half* p, int64_t i, float v) { p[i] = __float2half_rn(v); }
__device__ __forceinline__ void st(__nv_bfloat16* p, int64_t i, float v) {
  p[i] = __float2bfloat16_rn(v);
}

// A row of targets, widened to float32 element by element (the YRow of mse_row_residual).
template <typename T>
struct RowLoader {
  const T* row;
  __device__ __forceinline__ float operator[](int64_t j) const { return ld(row, j); }
};

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// The sum of every thread's v, returned to every thread, in a fixed order (deterministic). Holds
// two __syncthreads, so shared memory written before it is visible to all after it.
__device__ float block_sum(float v, float* scratch) {
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < kWarps; ++w) total += scratch[w];
  return total;
}

// Rows of the output that one thread computes in gemm_nn and gemm_tn: each operand element read
// from shared memory (or global memory) serves kRowTile multiply-adds.
constexpr int kRowTile = 4;

// out[i, j] = Σ_k a[i, k] · load_b(k, j) + init(j), for the [rows, cols] output, passed to
// store(i * cols + j, value). Each thread takes kRowTile rows of one column j in a block-stride
// loop (consecutive threads: consecutive j, so b's row is read contiguously and a[i, k] is a
// broadcast). Rows past the end are clamped to the last row for loading and never stored.
template <typename TA, typename LoadB, typename Init, typename Store>
__device__ __forceinline__ void gemm_nn(int rows, int inner, int cols, const TA* a, int64_t lda,
                                        LoadB load_b, Init init, Store store) {
  const int row_blocks = (rows + kRowTile - 1) / kRowTile;
  for (int idx = threadIdx.x; idx < row_blocks * cols; idx += blockDim.x) {
    const int block = idx / cols, j = idx - block * cols;
    const TA* a_rows[kRowTile];
    float acc[kRowTile];
    const float start = init(j);
#pragma unroll
    for (int r = 0; r < kRowTile; ++r) {
      a_rows[r] = a + min(block * kRowTile + r, rows - 1) * lda;
      acc[r] = start;
    }
    for (int k = 0; k < inner; ++k) {
      const float b = load_b(k, j);
#pragma unroll
      for (int r = 0; r < kRowTile; ++r) acc[r] = fmaf(ld(a_rows[r], k), b, acc[r]);
    }
#pragma unroll
    for (int r = 0; r < kRowTile; ++r) {
      const int i = block * kRowTile + r;
      if (i < rows) store(i * cols + j, acc[r]);
    }
  }
}

// out[k, j] = Σ_i a[i, k] · b[i, j] (a: [rows, ≥ out_rows] with leading dim lda; b: [rows, cols]
// row-major), the [out_rows, cols] result passed to update(k * cols + j, value). Each thread takes
// kRowTile rows k of one column j; every output element goes to the same thread in every call, so
// update may accumulate in place.
template <typename TA, typename TB, typename Update>
__device__ __forceinline__ void gemm_tn(int rows, int out_rows, int cols, const TA* a,
                                        int64_t lda, const TB* b, Update update) {
  const int row_blocks = (out_rows + kRowTile - 1) / kRowTile;
  for (int idx = threadIdx.x; idx < row_blocks * cols; idx += blockDim.x) {
    const int block = idx / cols, j = idx - block * cols;
    int ks[kRowTile];
    float acc[kRowTile];
#pragma unroll
    for (int r = 0; r < kRowTile; ++r) {
      ks[r] = min(block * kRowTile + r, out_rows - 1);
      acc[r] = 0.f;
    }
    for (int i = 0; i < rows; ++i) {
      const float b_ij = ld(b, int64_t(i) * cols + j);
      const TA* a_row = a + i * lda;
#pragma unroll
      for (int r = 0; r < kRowTile; ++r) acc[r] = fmaf(ld(a_row, ks[r]), b_ij, acc[r]);
    }
#pragma unroll
    for (int r = 0; r < kRowTile; ++r) {
      const int k = block * kRowTile + r;
      if (k < out_rows) update(k * cols + j, acc[r]);
    }
  }
}

// out[i, k] = Σ_j term(i, k, j) for the [rows, out_cols] result, one warp per output element
// with the lanes along j (contiguous rows of both operands, no shared-memory bank conflicts).
// Each output element is owned by the same lane 0 in every call, so `update` may accumulate.
template <typename Term, typename Update>
__device__ __forceinline__ void gemm_nt_warp(int rows, int out_cols, int inner, Term term,
                                             Update update) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int o = warp; o < rows * out_cols; o += kWarps) {
    const int i = o / out_cols, k = o - i * out_cols;
    float acc = 0.f;
    for (int j = lane; j < inner; j += 32) acc += term(i, k, j);
    acc = warp_sum(acc);
    if (lane == 0) update(o, acc);
  }
}

// Column sums of a [rows, cols] float matrix: update(j, Σ_i m[i, j]).
template <typename Update>
__device__ __forceinline__ void column_sums(int rows, int cols, const float* m, Update update) {
  for (int j = threadIdx.x; j < cols; j += blockDim.x) {
    float acc = 0.f;
    for (int i = 0; i < rows; ++i) acc += m[i * cols + j];
    update(j, acc);
  }
}

template <typename T>
__device__ __forceinline__ const T* typed(const void* p) {
  return static_cast<const T*>(p);
}
template <typename T>
__device__ __forceinline__ T* typed_out(void* p) {
  return static_cast<T*>(p);
}

// ---- forward ---------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kThreads)
    unroll_forward_kernel(const UnrollDims dims, const UnrollInputs<void> in,
                          const UnrollForwardOutputs<void> out, float* workspace,
                          int64_t workspace_floats) {
  extern __shared__ float smem[];
  __shared__ float scratch[64];
  const int n = int(dims.support), d_in = int(dims.d_in), d_out = int(dims.d_out);
  const int m = int(dims.queries);
  const int64_t steps = dims.steps;
  const int w_size = d_in * d_out, z_size = n * d_out;
  float* const W = workspace ? workspace + blockIdx.x * workspace_floats : smem;
  float* const bvec = W + w_size;
  float* const Z = bvec + d_out;

  const T* weight = typed<T>(in.weight);
  const T* bias = typed<T>(in.bias);
  const T* x_all = typed<T>(in.x);
  const T* y_all = typed<T>(in.y);
  const T* lr_all = typed<T>(in.lr);
  const T* lr_scale = typed<T>(in.lr_scale);
  const T* bias_lr_scale = typed<T>(in.bias_lr_scale);
  const T* queries = typed<T>(in.queries);
  T* weight_out = typed_out<T>(out.weight);
  T* bias_out = typed_out<T>(out.bias);
  T* losses = typed_out<T>(out.losses);
  T* readout = typed_out<T>(out.readout);
  float* residual_all = static_cast<float*>(out.residual);
  float* states = static_cast<float*>(out.states);
  const bool has_bias = bias != nullptr;
  const float inv_n = 1.f / float(n);

  for (int64_t b = blockIdx.x; b < dims.tasks; b += gridDim.x) {
    const T* w0 = weight + b * in.weight_task_stride;
    for (int k = threadIdx.x; k < w_size; k += blockDim.x) W[k] = ld(w0, k);
    for (int j = threadIdx.x; j < d_out; j += blockDim.x)
      bvec[j] = has_bias ? ld(bias, b * in.bias_task_stride + j) : 0.f;
    __syncthreads();

    for (int64_t t = 0; t < steps; ++t) {
      const T* x = x_all + b * in.x_task_stride + t * in.x_step_stride;
      if (states) {
        float* s = states + (b * steps + t) * w_size;
        for (int k = threadIdx.x; k < w_size; k += blockDim.x) s[k] = W[k];
      }
      // Z_t = X_t W_t + 1 b_tᵀ.
      gemm_nn(n, d_in, d_out, x, d_in, [&](int k, int j) { return W[k * d_out + j]; },
              [&](int j) { return bvec[j]; }, [&](int idx, float v) { Z[idx] = v; });
      __syncthreads();
      // E_t = ∂ℓ_t/∂Z_t row by row, in place, and ℓ_t.
      float loss_part = 0.f;
      for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float* row = Z + i * d_out;
        if (dims.loss == Loss::kMse) {
          const T* y = y_all + b * in.y_task_stride + t * in.y_step_stride + int64_t(i) * d_out;
          loss_part += mse_row_residual(row, RowLoader<T>{y}, int64_t(d_out), inv_n);
        } else {
          const int64_t label =
              in.labels[b * in.labels_task_stride + t * in.labels_step_stride + i];
          loss_part += ce_row_residual(row, label, int64_t(d_out), inv_n);
        }
      }
      const float loss = block_sum(loss_part, scratch);  // also publishes E_t
      if (threadIdx.x == 0) st(losses, b * steps + t, loss * inv_n);
      float* residual = residual_all + (b * steps + t) * z_size;
      for (int idx = threadIdx.x; idx < z_size; idx += blockDim.x) residual[idx] = Z[idx];

      // W_{t+1} = W_t − η_t (P ∘ X_tᵀ E_t),  b_{t+1} = b_t − η_t (p ∘ 1ᵀ E_t).
      const float lr = ld(lr_all, b * steps + t);
      gemm_tn(n, d_in, d_out, x, d_in, Z, [&](int idx, float g) {
        W[idx] = sgd_step(W[idx], lr, lr_scale ? ld(lr_scale, idx) : 1.f, g);
      });
      if (has_bias)
        column_sums(n, d_out, Z, [&](int j, float g) {
          bvec[j] = sgd_step(bvec[j], lr, bias_lr_scale ? ld(bias_lr_scale, j) : 1.f, g);
        });
      __syncthreads();

      // O_t = Q_t W_{t+1} + 1 b_{t+1}ᵀ.
      if (queries && readout) {
        const T* q = queries + (b * steps + t) * m * d_in;
        T* o = readout + (b * steps + t) * m * d_out;
        gemm_nn(m, d_in, d_out, q, d_in, [&](int k, int j) { return W[k * d_out + j]; },
                [&](int j) { return bvec[j]; }, [&](int idx, float v) { st(o, idx, v); });
      }
      // The next writes of W, b and Z come after the next step's __syncthreads.
    }
    for (int k = threadIdx.x; k < w_size; k += blockDim.x) st(weight_out, b * w_size + k, W[k]);
    if (has_bias)
      for (int j = threadIdx.x; j < d_out; j += blockDim.x) st(bias_out, b * d_out + j, bvec[j]);
    __syncthreads();  // before the next task overwrites W and b
  }
}

// ---- backward --------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kThreads)
    unroll_backward_kernel(const UnrollDims dims, const UnrollInputs<void> in,
                           const UnrollBackwardArgs<void> args, float* workspace,
                           int64_t workspace_floats) {
  extern __shared__ float smem[];
  __shared__ float scratch[64];
  const int n = int(dims.support), d_in = int(dims.d_in), d_out = int(dims.d_out);
  const int m = int(dims.queries);
  const int64_t steps = dims.steps;
  const int w_size = d_in * d_out, z_size = n * d_out;
  const bool ce = dims.loss == Loss::kCrossEntropy;
  float* const Wa = workspace ? workspace + blockIdx.x * workspace_floats : smem;  // Ŵ
  float* const ba = Wa + w_size;                                                   // b̂
  float* const U = ba + d_out;  // U = X D + 1 dᵀ, then Ẑ in place
  float* const probs = U + z_size;  // ce only

  const T* x_all = typed<T>(in.x);
  const T* lr_all = typed<T>(in.lr);
  const T* lr_scale = typed<T>(in.lr_scale);
  const T* bias_lr_scale = typed<T>(in.bias_lr_scale);
  const T* queries = typed<T>(in.queries);
  const float* residual_all = static_cast<const float*>(args.residual);
  const float* states = static_cast<const float*>(args.states);
  const T* weight_final = typed<T>(args.weight_final);
  const T* grad_weight_final = typed<T>(args.grad_weight_final);
  const T* grad_bias_final = typed<T>(args.grad_bias_final);
  const T* grad_readout = typed<T>(args.grad_readout);
  float* grad_weight = static_cast<float*>(args.grad_weight);
  float* grad_bias = static_cast<float*>(args.grad_bias);
  float* grad_x = static_cast<float*>(args.grad_x);
  float* grad_y = static_cast<float*>(args.grad_y);
  float* grad_lr = static_cast<float*>(args.grad_lr);
  float* grad_lr_scale_all = static_cast<float*>(args.grad_lr_scale);
  float* grad_bias_lr_scale_all = static_cast<float*>(args.grad_bias_lr_scale);
  float* grad_queries = static_cast<float*>(args.grad_queries);
  const bool has_bias = in.bias != nullptr;
  const bool x_per_step = in.x_step_stride != 0;  // unroll_x_per_step, in device code
  const bool second_order = !args.first_order;
  const float n_rows = float(n);
  // Dense layouts of x's and y's gradients: one matrix per step (4-D x) or one summed (3-D x).
  const int64_t grad_x_task = (x_per_step ? steps : 1) * n * d_in;
  const int64_t grad_x_step = x_per_step ? int64_t(n) * d_in : 0;
  const int64_t grad_y_task = (x_per_step ? steps : 1) * n * d_out;
  const int64_t grad_y_step = x_per_step ? int64_t(n) * d_out : 0;

  for (int64_t b = blockIdx.x; b < dims.tasks; b += gridDim.x) {
    for (int k = threadIdx.x; k < w_size; k += blockDim.x)
      Wa[k] = ld(grad_weight_final, b * w_size + k);
    for (int j = threadIdx.x; j < d_out; j += blockDim.x)
      ba[j] = has_bias && grad_bias_final ? ld(grad_bias_final, b * d_out + j) : 0.f;
    float* grad_lr_scale = grad_lr_scale_all ? grad_lr_scale_all + b * w_size : nullptr;
    float* grad_bias_lr_scale =
        grad_bias_lr_scale_all ? grad_bias_lr_scale_all + b * d_out : nullptr;
    if (grad_lr_scale)
      for (int k = threadIdx.x; k < w_size; k += blockDim.x) grad_lr_scale[k] = 0.f;
    if (grad_bias_lr_scale)
      for (int j = threadIdx.x; j < d_out; j += blockDim.x) grad_bias_lr_scale[j] = 0.f;
    if (grad_x)
      for (int64_t k = threadIdx.x; k < grad_x_task; k += blockDim.x) grad_x[b * grad_x_task + k] = 0.f;
    if (grad_y)
      for (int64_t k = threadIdx.x; k < grad_y_task; k += blockDim.x) grad_y[b * grad_y_task + k] = 0.f;
    __syncthreads();

    for (int64_t t = steps - 1; t >= 0; --t) {
      const T* x = x_all + b * in.x_task_stride + t * in.x_step_stride;
      const float* residual = residual_all + (b * steps + t) * z_size;
      const float lr = ld(lr_all, b * steps + t);

      // The readout after step t: Ŵ_{t+1} += Q_tᵀ Ô_t, b̂_{t+1} += 1ᵀ Ô_t, Q̂_t = Ô_t W_{t+1}ᵀ.
      if (queries && grad_readout) {
        const T* q = queries + (b * steps + t) * m * d_in;
        const T* o_adj = grad_readout + (b * steps + t) * m * d_out;
        if (grad_queries) {
          float* gq = grad_queries + (b * steps + t) * m * d_in;
          if (t + 1 < steps) {
            const float* w_next = states + (b * steps + t + 1) * w_size;
            gemm_nt_warp(m, d_in, d_out,
                         [&](int i, int k, int j) {
                           return ld(o_adj, int64_t(i) * d_out + j) * w_next[k * d_out + j];
                         },
                         [&](int o, float v) { gq[o] = v; });
          } else {
            const T* w_next = weight_final + b * w_size;
            gemm_nt_warp(m, d_in, d_out,
                         [&](int i, int k, int j) {
                           return ld(o_adj, int64_t(i) * d_out + j) * ld(w_next, k * d_out + j);
                         },
                         [&](int o, float v) { gq[o] = v; });
          }
        }
        gemm_tn(m, d_in, d_out, q, d_in, o_adj, [&](int idx, float v) { Wa[idx] += v; });
        if (has_bias)
          for (int j = threadIdx.x; j < d_out; j += blockDim.x) {
            float acc = 0.f;
            for (int i = 0; i < m; ++i) acc += ld(o_adj, int64_t(i) * d_out + j);
            ba[j] += acc;
          }
        __syncthreads();
      } else if (grad_queries) {
        float* gq = grad_queries + (b * steps + t) * m * d_in;
        for (int k = threadIdx.x; k < m * d_in; k += blockDim.x) gq[k] = 0.f;
      }

      // D = P ∘ Ŵ_{t+1}, d = p ∘ b̂_{t+1}, and U = X_t D + 1 dᵀ.
      gemm_nn(
          n, d_in, d_out, x, d_in,
          [&](int k, int j) {
            const int idx = k * d_out + j;
            return lr_scale ? ld(lr_scale, idx) * Wa[idx] : Wa[idx];
          },
          [&](int j) {
            return has_bias ? (bias_lr_scale ? ld(bias_lr_scale, j) : 1.f) * ba[j] : 0.f;
          },
          [&](int idx, float v) { U[idx] = v; });
      __syncthreads();

      // η̂_t = −⟨Ŵ_{t+1}, P ∘ G_t⟩ − ⟨b̂_{t+1}, p ∘ g_t⟩ = −⟨U, E_t⟩.
      if (grad_lr) {
        float part = 0.f;
        for (int idx = threadIdx.x; idx < z_size; idx += blockDim.x) part += U[idx] * residual[idx];
        const float total = block_sum(part, scratch);
        if (threadIdx.x == 0) grad_lr[b * steps + t] = -total;
      }
      // P̂ += −η Ŵ_{t+1} ∘ G_t,  p̂ += −η b̂_{t+1} ∘ g_t.
      if (grad_lr_scale)
        gemm_tn(n, d_in, d_out, x, d_in, residual,
                [&](int idx, float g) { grad_lr_scale[idx] -= lr * Wa[idx] * g; });
      if (grad_bias_lr_scale && has_bias)
        column_sums(n, d_out, residual,
                    [&](int j, float g) { grad_bias_lr_scale[j] -= lr * ba[j] * g; });

      if (!second_order) {  // FOMAML: Ŵ_t = Ŵ_{t+1}, nothing flows through E_t.
        __syncthreads();    // the next step's readout updates Ŵ, read above
        continue;
      }

      // Ê = −η U;  Ẑ = Ê / n (mse) or the softmax Jacobian of Ê over n (ce), in place of U.
      // (U was last read by the reduction above, whose __syncthreads separate it from this.)
      const float scale = -lr / n_rows;
      if (ce) {
        const int64_t* labels = in.labels + b * in.labels_task_stride + t * in.labels_step_stride;
        for (int i = threadIdx.x; i < n; i += blockDim.x) {
          float* p = probs + i * d_out;
          ce_probs_from_residual(residual + i * d_out, labels[i], int64_t(d_out), n_rows, p);
          softmax_jacobian_row(p, U + i * d_out, int64_t(d_out), scale, U + i * d_out);
        }
      } else {
        float* gy = grad_y ? grad_y + b * grad_y_task + t * grad_y_step : nullptr;
        for (int i = threadIdx.x; i < n; i += blockDim.x) {
          float* row = U + i * d_out;
          for (int j = 0; j < d_out; ++j) {
            row[j] *= scale;
            if (gy) gy[i * d_out + j] -= row[j];
          }
        }
      }
      __syncthreads();

      // X̂_t += −η E_t Dᵀ + Ẑ W_tᵀ.
      if (grad_x) {
        float* gx = grad_x + b * grad_x_task + t * grad_x_step;
        const float* w_t = states + (b * steps + t) * w_size;
        gemm_nt_warp(n, d_in, d_out,
                     [&](int i, int k, int j) {
                       const int idx = k * d_out + j;
                       const float dir = lr_scale ? ld(lr_scale, idx) * Wa[idx] : Wa[idx];
                       return -lr * residual[i * d_out + j] * dir + U[i * d_out + j] * w_t[idx];
                     },
                     [&](int o, float v) { gx[o] += v; });
        __syncthreads();  // Ŵ_{t+1} is read above and overwritten below
      }

      // Ŵ_t = Ŵ_{t+1} + X_tᵀ Ẑ,  b̂_t = b̂_{t+1} + 1ᵀ Ẑ.
      gemm_tn(n, d_in, d_out, x, d_in, U, [&](int idx, float v) { Wa[idx] += v; });
      if (has_bias) column_sums(n, d_out, U, [&](int j, float v) { ba[j] += v; });
      __syncthreads();
    }

    if (grad_weight)
      for (int k = threadIdx.x; k < w_size; k += blockDim.x) grad_weight[b * w_size + k] = Wa[k];
    if (grad_bias)
      for (int j = threadIdx.x; j < d_out; j += blockDim.x) grad_bias[b * d_out + j] = ba[j];
    __syncthreads();  // before the next task overwrites Ŵ and b̂
  }
}

// ---- linear_hvp ------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kThreads)
    linear_hvp_kernel(const HvpArgs<void> args, float* workspace, int64_t workspace_floats) {
  extern __shared__ float smem[];
  const int n = int(args.support), d_in = int(args.d_in), d_out = int(args.d_out);
  const int w_size = d_in * d_out, z_size = n * d_out;
  const bool ce = args.loss == Loss::kCrossEntropy;
  float* const U = workspace ? workspace + blockIdx.x * workspace_floats : smem;
  float* const logits = U + z_size;  // ce only

  const T* weight = typed<T>(args.weight);
  const T* bias = typed<T>(args.bias);
  const T* x_all = typed<T>(args.x);
  const T* v_all = typed<T>(args.v);
  const T* v_bias = typed<T>(args.v_bias);
  T* hv_weight = typed_out<T>(args.hv_weight);
  T* hv_bias = typed_out<T>(args.hv_bias);
  const float inv_n = 1.f / float(n);

  for (int64_t b = blockIdx.x; b < args.tasks; b += gridDim.x) {
    const T* x = x_all + b * n * d_in;
    const T* v = v_all + b * w_size;
    // U = X V + 1 v_bᵀ.
    gemm_nn(n, d_in, d_out, x, d_in, [&](int k, int j) { return ld(v, k * d_out + j); },
            [&](int j) { return v_bias ? ld(v_bias, b * args.v_bias_task_stride + j) : 0.f; },
            [&](int idx, float val) { U[idx] = val; });
    if (ce) {
      const T* w = weight + b * args.weight_task_stride;
      gemm_nn(n, d_in, d_out, x, d_in, [&](int k, int j) { return ld(w, k * d_out + j); },
              [&](int j) { return bias ? ld(bias, b * args.bias_task_stride + j) : 0.f; },
              [&](int idx, float val) { logits[idx] = val; });
    }
    __syncthreads();
    // Ẑ = H_E U row by row.
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      float* row = U + i * d_out;
      if (ce) {
        float* p = logits + i * d_out;
        softmax_row(p, int64_t(d_out));
        softmax_jacobian_row(p, row, int64_t(d_out), inv_n, row);
      } else {
        for (int j = 0; j < d_out; ++j) row[j] *= inv_n;
      }
    }
    __syncthreads();
    // Hv = Xᵀ Ẑ, Hv_b = 1ᵀ Ẑ.
    gemm_tn(n, d_in, d_out, x, d_in, U,
            [&](int idx, float val) { st(hv_weight, b * w_size + idx, val); });
    if (hv_bias) column_sums(n, d_out, U, [&](int j, float val) { st(hv_bias, b * d_out + j, val); });
    __syncthreads();  // before the next task overwrites U
  }
}

// ---- launch ----------------------------------------------------------------------------------
struct Device {
  int sms = 0;
  size_t max_smem = 0;  // opt-in maximum of dynamic + static shared memory per block
};

Device current_device() {
  int device = 0, sms = 0, optin = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device),
        "cudaDeviceGetAttribute(multiProcessorCount)");
  check(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
        "cudaDeviceGetAttribute(maxSharedMemoryPerBlockOptin)");
  return {sms, static_cast<size_t>(optin)};
}

void require_int32(int64_t value, const char* what) {
  if (value < 0 || value > INT_MAX)
    throw std::runtime_error(std::string("metakernels CUDA backend: ") + what + " = " +
                             std::to_string(value) +
                             " exceeds 32-bit per-task indexing; this shape is unsupported by "
                             "backend='cuda' (use backend='triton' or 'reference')");
}

// Launches `kernel(args..., workspace, workspace_floats)` over `tasks` tasks with `bytes` of
// dynamic shared memory per CTA, or, when that does not fit on chip, with a global workspace.
template <typename Kernel, typename... Args>
void launch(Kernel kernel, int64_t tasks, size_t bytes, cudaStream_t stream, const char* name,
            const Args&... args) {
  if (tasks <= 0) return;
  const Device device = current_device();
  if (bytes + kStaticSmemBytes <= device.max_smem) {
    if (bytes > kDefaultSmemBytes)
      check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 static_cast<int>(bytes)),
            "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
    const int64_t grid = std::min<int64_t>(tasks, int64_t(1) << 30);
    kernel<<<static_cast<unsigned>(grid), kThreads, bytes, stream>>>(args..., nullptr, 0);
    check(cudaGetLastError(), name);
    return;
  }
  // Global-memory path: one workspace slice per CTA, a grid-stride loop over the tasks.
  const int64_t grid = std::min<int64_t>(tasks, int64_t(device.sms) * 4);
  const int64_t floats = static_cast<int64_t>((bytes + sizeof(float) - 1) / sizeof(float));
  void* workspace = nullptr;
  check(cudaMallocAsync(&workspace, static_cast<size_t>(grid * floats) * sizeof(float), stream),
        "cudaMallocAsync(workspace)");
  kernel<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
      args..., static_cast<float*>(workspace), floats);
  const cudaError_t launched = cudaGetLastError();
  check(cudaFreeAsync(workspace, stream), "cudaFreeAsync(workspace)");
  check(launched, name);
}

void check_unroll_dims(const UnrollDims& d) {
  require_int32(d.d_in * d.d_out, "d_in * d_out");
  require_int32(d.support * d.d_out, "n * d_out");
  require_int32(d.support * d.d_in, "n * d_in");
  require_int32(d.queries * d.d_in, "m * d_in");
  require_int32(d.queries * d.d_out, "m * d_out");
}

}  // namespace

size_t unroll_forward_smem_bytes(const UnrollDims& d, bool /*has_bias*/) {
  // W [d_in·d_out], b [d_out] (always reserved), Z/E [n·d_out].
  return sizeof(float) * static_cast<size_t>(d.d_in * d.d_out + d.d_out + d.support * d.d_out);
}

size_t unroll_backward_smem_bytes(const UnrollDims& d, bool /*has_bias*/) {
  // Ŵ [d_in·d_out], b̂ [d_out], U/Ẑ [n·d_out], and the softmax probabilities [n·d_out] for ce.
  const int64_t rows = d.loss == Loss::kCrossEntropy ? 2 * d.support : d.support;
  return sizeof(float) * static_cast<size_t>(d.d_in * d.d_out + d.d_out + rows * d.d_out);
}

size_t linear_hvp_smem_bytes(int64_t support, int64_t d_out, Loss loss) {
  // U/Ẑ [n·d_out], and the logits/probabilities [n·d_out] for ce.
  const int64_t rows = loss == Loss::kCrossEntropy ? 2 * support : support;
  return sizeof(float) * static_cast<size_t>(rows * d_out);
}

#define MK_DISPATCH_DTYPE(dtype, ...)                                        \
  switch (dtype) {                                                           \
    case DType::kFloat32: { using scalar_t = float; __VA_ARGS__; break; }    \
    case DType::kBFloat16: { using scalar_t = __nv_bfloat16; __VA_ARGS__; break; } \
    case DType::kFloat16: { using scalar_t = __half; __VA_ARGS__; break; }   \
    default: throw std::runtime_error("metakernels CUDA backend: unsupported dtype"); \
  }

void unroll_forward(DType dtype, const UnrollDims& dims, const UnrollInputs<void>& in,
                    const UnrollForwardOutputs<void>& out, cudaStream_t stream) {
  if (dims.tasks <= 0) return;
  check_unroll_dims(dims);
  const size_t bytes = unroll_forward_smem_bytes(dims, in.bias != nullptr);
  MK_DISPATCH_DTYPE(dtype, launch(unroll_forward_kernel<scalar_t>, dims.tasks, bytes, stream,
                                  "unroll_forward_kernel launch", dims, in, out))
}

void unroll_backward(DType dtype, const UnrollDims& dims, const UnrollInputs<void>& in,
                     const UnrollBackwardArgs<void>& args, cudaStream_t stream) {
  if (dims.tasks <= 0) return;
  check_unroll_dims(dims);
  const size_t bytes = unroll_backward_smem_bytes(dims, in.bias != nullptr);
  MK_DISPATCH_DTYPE(dtype, launch(unroll_backward_kernel<scalar_t>, dims.tasks, bytes, stream,
                                  "unroll_backward_kernel launch", dims, in, args))
}

void linear_hvp(DType dtype, const HvpArgs<void>& args, cudaStream_t stream) {
  if (args.tasks <= 0) return;
  require_int32(args.d_in * args.d_out, "d_in * d_out");
  require_int32(args.support * args.d_out, "n * d_out");
  require_int32(args.support * args.d_in, "n * d_in");
  const size_t bytes = linear_hvp_smem_bytes(args.support, args.d_out, args.loss);
  MK_DISPATCH_DTYPE(dtype, launch(linear_hvp_kernel<scalar_t>, args.tasks, bytes, stream,
                                  "linear_hvp_kernel launch", args))
}

}  // namespace cuda
}  // namespace metakernels
