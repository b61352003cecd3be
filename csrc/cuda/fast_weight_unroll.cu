// CUDA kernels of fast_weight_unroll (forward and the exact second-order backward of
// docs/ops/fast_weight_unroll.md) and linear_hvp (docs/ops/linear_hvp.md). No torch here:
// csrc/torch/binding_cuda.cpp passes raw pointers through metakernels/cuda_kernels.h.
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
// Shapes whose n, d_in, d_out (and m) are multiples of 16 run the tensor-core kernels of the
// "tensor-core path" section instead (3xTF32 WMMA, same recurrences, same float32 state), see there.
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
#include <mma.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "metakernels/cuda_kernels.h"
#include "metakernels/tile_math.h"

// Kernel launches and dynamic shared memory through macros, so that csrc/tests/cuda_emulation.h
// (which defines its own) can run this file on the host; under nvcc they are the plain syntax.
#ifndef MK_LAUNCH
#define MK_LAUNCH(kernel, grid, block, smem, stream) kernel<<<grid, block, smem, stream>>>
#define MK_DYNAMIC_SMEM(type, name) extern __shared__ type name[]
#define MK_DYNAMIC_SMEM_ALIGNED(type, name, alignment) \
  extern __shared__ __align__(alignment) type name[]
#endif

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

// The kernels' pointers in their element types, shared by the FMA and tensor-core kernels:
// inputs and outputs in T; the saved E_t and W_t, and (backward) every gradient, in float32.
template <typename T>
struct ForwardPointers {
  const T *weight, *bias, *x_all, *y_all, *lr_all, *lr_scale, *bias_lr_scale, *queries;
  T *weight_out, *bias_out, *losses, *readout;
  float *residual_all, *states;
  __device__ ForwardPointers(const UnrollInputs<void>& in, const UnrollForwardOutputs<void>& out)
      : weight(typed<T>(in.weight)),
        bias(typed<T>(in.bias)),
        x_all(typed<T>(in.x)),
        y_all(typed<T>(in.y)),
        lr_all(typed<T>(in.lr)),
        lr_scale(typed<T>(in.lr_scale)),
        bias_lr_scale(typed<T>(in.bias_lr_scale)),
        queries(typed<T>(in.queries)),
        weight_out(typed_out<T>(out.weight)),
        bias_out(typed_out<T>(out.bias)),
        losses(typed_out<T>(out.losses)),
        readout(typed_out<T>(out.readout)),
        residual_all(static_cast<float*>(out.residual)),
        states(static_cast<float*>(out.states)) {}
};

template <typename T>
struct BackwardPointers {
  const T *x_all, *lr_all, *lr_scale, *bias_lr_scale, *queries;
  const float *residual_all, *states;
  const T *weight_final, *grad_weight_final, *grad_bias_final, *grad_readout;
  float *grad_weight, *grad_bias, *grad_x, *grad_y, *grad_lr, *grad_lr_scale_all,
      *grad_bias_lr_scale_all, *grad_queries;
  __device__ BackwardPointers(const UnrollInputs<void>& in, const UnrollBackwardArgs<void>& args)
      : x_all(typed<T>(in.x)),
        lr_all(typed<T>(in.lr)),
        lr_scale(typed<T>(in.lr_scale)),
        bias_lr_scale(typed<T>(in.bias_lr_scale)),
        queries(typed<T>(in.queries)),
        residual_all(static_cast<const float*>(args.residual)),
        states(static_cast<const float*>(args.states)),
        weight_final(typed<T>(args.weight_final)),
        grad_weight_final(typed<T>(args.grad_weight_final)),
        grad_bias_final(typed<T>(args.grad_bias_final)),
        grad_readout(typed<T>(args.grad_readout)),
        grad_weight(static_cast<float*>(args.grad_weight)),
        grad_bias(static_cast<float*>(args.grad_bias)),
        grad_x(static_cast<float*>(args.grad_x)),
        grad_y(static_cast<float*>(args.grad_y)),
        grad_lr(static_cast<float*>(args.grad_lr)),
        grad_lr_scale_all(static_cast<float*>(args.grad_lr_scale)),
        grad_bias_lr_scale_all(static_cast<float*>(args.grad_bias_lr_scale)),
        grad_queries(static_cast<float*>(args.grad_queries)) {}
};

// Q̂_t = Ô_t W_{t+1}ᵀ into gq, from global memory: W_{t+1} is the saved state w_saved (float32)
// before the last step, null after it, where it is w_final (T).
template <typename T>
__device__ __forceinline__ void readout_query_grad(int m, int d_in, int d_out, const T* o_adj,
                                                   const float* w_saved, const T* w_final,
                                                   float* gq) {
  if (w_saved)
    gemm_nt_warp(m, d_in, d_out,
                 [&](int i, int k, int j) {
                   return ld(o_adj, int64_t(i) * d_out + j) * w_saved[k * d_out + j];
                 },
                 [&](int o, float v) { gq[o] = v; });
  else
    gemm_nt_warp(m, d_in, d_out,
                 [&](int i, int k, int j) {
                   return ld(o_adj, int64_t(i) * d_out + j) * ld(w_final, k * d_out + j);
                 },
                 [&](int o, float v) { gq[o] = v; });
}

// ---- forward ---------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kThreads)
    unroll_forward_kernel(const UnrollDims dims, const UnrollInputs<void> in,
                          const UnrollForwardOutputs<void> out, float* workspace,
                          int64_t workspace_floats) {
  MK_DYNAMIC_SMEM(float, smem);
  __shared__ float scratch[64];
  const int n = int(dims.support), d_in = int(dims.d_in), d_out = int(dims.d_out);
  const int m = int(dims.queries);
  const int64_t steps = dims.steps;
  const int w_size = d_in * d_out, z_size = n * d_out;
  float* const W = workspace ? workspace + blockIdx.x * workspace_floats : smem;
  float* const bvec = W + w_size;
  float* const Z = bvec + d_out;

  const ForwardPointers<T> io(in, out);
  const bool has_bias = io.bias != nullptr;
  const float inv_n = 1.f / float(n);

  for (int64_t b = blockIdx.x; b < dims.tasks; b += gridDim.x) {
    const T* w0 = io.weight + b * in.weight_task_stride;
    for (int k = threadIdx.x; k < w_size; k += blockDim.x) W[k] = ld(w0, k);
    for (int j = threadIdx.x; j < d_out; j += blockDim.x)
      bvec[j] = has_bias ? ld(io.bias, b * in.bias_task_stride + j) : 0.f;
    __syncthreads();

    for (int64_t t = 0; t < steps; ++t) {
      const T* x = io.x_all + b * in.x_task_stride + t * in.x_step_stride;
      if (io.states) {
        float* s = io.states + (b * steps + t) * w_size;
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
          const T* y = io.y_all + b * in.y_task_stride + t * in.y_step_stride + int64_t(i) * d_out;
          loss_part += mse_row_residual(row, RowLoader<T>{y}, int64_t(d_out), inv_n);
        } else {
          const int64_t label =
              in.labels[b * in.labels_task_stride + t * in.labels_step_stride + i];
          loss_part += ce_row_residual(row, label, int64_t(d_out), inv_n);
        }
      }
      const float loss = block_sum(loss_part, scratch);  // also publishes E_t
      if (threadIdx.x == 0) st(io.losses, b * steps + t, loss * inv_n);
      float* residual = io.residual_all + (b * steps + t) * z_size;
      for (int idx = threadIdx.x; idx < z_size; idx += blockDim.x) residual[idx] = Z[idx];

      // W_{t+1} = W_t − η_t (P ∘ X_tᵀ E_t),  b_{t+1} = b_t − η_t (p ∘ 1ᵀ E_t).
      const float lr = ld(io.lr_all, b * steps + t);
      gemm_tn(n, d_in, d_out, x, d_in, Z, [&](int idx, float g) {
        W[idx] = sgd_step(W[idx], lr, io.lr_scale ? ld(io.lr_scale, idx) : 1.f, g);
      });
      if (has_bias)
        column_sums(n, d_out, Z, [&](int j, float g) {
          bvec[j] = sgd_step(bvec[j], lr, io.bias_lr_scale ? ld(io.bias_lr_scale, j) : 1.f, g);
        });
      __syncthreads();

      // O_t = Q_t W_{t+1} + 1 b_{t+1}ᵀ.
      if (io.queries && io.readout) {
        const T* q = io.queries + (b * steps + t) * m * d_in;
        T* o = io.readout + (b * steps + t) * m * d_out;
        gemm_nn(m, d_in, d_out, q, d_in, [&](int k, int j) { return W[k * d_out + j]; },
                [&](int j) { return bvec[j]; }, [&](int idx, float v) { st(o, idx, v); });
      }
      // The next writes of W, b and Z come after the next step's __syncthreads.
    }
    for (int k = threadIdx.x; k < w_size; k += blockDim.x) st(io.weight_out, b * w_size + k, W[k]);
    if (has_bias)
      for (int j = threadIdx.x; j < d_out; j += blockDim.x) st(io.bias_out, b * d_out + j, bvec[j]);
    __syncthreads();  // before the next task overwrites W and b
  }
}

// ---- backward --------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kThreads)
    unroll_backward_kernel(const UnrollDims dims, const UnrollInputs<void> in,
                           const UnrollBackwardArgs<void> args, float* workspace,
                           int64_t workspace_floats) {
  MK_DYNAMIC_SMEM(float, smem);
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

  const BackwardPointers<T> io(in, args);
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
      Wa[k] = ld(io.grad_weight_final, b * w_size + k);
    for (int j = threadIdx.x; j < d_out; j += blockDim.x)
      ba[j] = has_bias && io.grad_bias_final ? ld(io.grad_bias_final, b * d_out + j) : 0.f;
    float* grad_lr_scale = io.grad_lr_scale_all ? io.grad_lr_scale_all + b * w_size : nullptr;
    float* grad_bias_lr_scale =
        io.grad_bias_lr_scale_all ? io.grad_bias_lr_scale_all + b * d_out : nullptr;
    if (grad_lr_scale)
      for (int k = threadIdx.x; k < w_size; k += blockDim.x) grad_lr_scale[k] = 0.f;
    if (grad_bias_lr_scale)
      for (int j = threadIdx.x; j < d_out; j += blockDim.x) grad_bias_lr_scale[j] = 0.f;
    if (io.grad_x)
      for (int64_t k = threadIdx.x; k < grad_x_task; k += blockDim.x)
        io.grad_x[b * grad_x_task + k] = 0.f;
    if (io.grad_y)
      for (int64_t k = threadIdx.x; k < grad_y_task; k += blockDim.x)
        io.grad_y[b * grad_y_task + k] = 0.f;
    __syncthreads();

    for (int64_t t = steps - 1; t >= 0; --t) {
      const T* x = io.x_all + b * in.x_task_stride + t * in.x_step_stride;
      const float* residual = io.residual_all + (b * steps + t) * z_size;
      const float lr = ld(io.lr_all, b * steps + t);

      // The readout after step t: Ŵ_{t+1} += Q_tᵀ Ô_t, b̂_{t+1} += 1ᵀ Ô_t, Q̂_t = Ô_t W_{t+1}ᵀ.
      if (io.queries && io.grad_readout) {
        const T* q = io.queries + (b * steps + t) * m * d_in;
        const T* o_adj = io.grad_readout + (b * steps + t) * m * d_out;
        if (io.grad_queries)
          readout_query_grad(m, d_in, d_out, o_adj,
                             t + 1 < steps ? io.states + (b * steps + t + 1) * w_size : nullptr,
                             io.weight_final + b * w_size,
                             io.grad_queries + (b * steps + t) * m * d_in);
        gemm_tn(m, d_in, d_out, q, d_in, o_adj, [&](int idx, float v) { Wa[idx] += v; });
        if (has_bias)
          for (int j = threadIdx.x; j < d_out; j += blockDim.x) {
            float acc = 0.f;
            for (int i = 0; i < m; ++i) acc += ld(o_adj, int64_t(i) * d_out + j);
            ba[j] += acc;
          }
        __syncthreads();
      } else if (io.grad_queries) {
        float* gq = io.grad_queries + (b * steps + t) * m * d_in;
        for (int k = threadIdx.x; k < m * d_in; k += blockDim.x) gq[k] = 0.f;
      }

      // D = P ∘ Ŵ_{t+1}, d = p ∘ b̂_{t+1}, and U = X_t D + 1 dᵀ.
      gemm_nn(
          n, d_in, d_out, x, d_in,
          [&](int k, int j) {
            const int idx = k * d_out + j;
            return io.lr_scale ? ld(io.lr_scale, idx) * Wa[idx] : Wa[idx];
          },
          [&](int j) {
            return has_bias ? (io.bias_lr_scale ? ld(io.bias_lr_scale, j) : 1.f) * ba[j] : 0.f;
          },
          [&](int idx, float v) { U[idx] = v; });
      __syncthreads();

      // η̂_t = −⟨Ŵ_{t+1}, P ∘ G_t⟩ − ⟨b̂_{t+1}, p ∘ g_t⟩ = −⟨U, E_t⟩.
      if (io.grad_lr) {
        float part = 0.f;
        for (int idx = threadIdx.x; idx < z_size; idx += blockDim.x) part += U[idx] * residual[idx];
        const float total = block_sum(part, scratch);
        if (threadIdx.x == 0) io.grad_lr[b * steps + t] = -total;
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
        float* gy = io.grad_y ? io.grad_y + b * grad_y_task + t * grad_y_step : nullptr;
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
      if (io.grad_x) {
        float* gx = io.grad_x + b * grad_x_task + t * grad_x_step;
        const float* w_t = io.states + (b * steps + t) * w_size;
        gemm_nt_warp(n, d_in, d_out,
                     [&](int i, int k, int j) {
                       const int idx = k * d_out + j;
                       const float dir = io.lr_scale ? ld(io.lr_scale, idx) * Wa[idx] : Wa[idx];
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

    if (io.grad_weight)
      for (int k = threadIdx.x; k < w_size; k += blockDim.x) io.grad_weight[b * w_size + k] = Wa[k];
    if (io.grad_bias)
      for (int j = threadIdx.x; j < d_out; j += blockDim.x) io.grad_bias[b * d_out + j] = ba[j];
    __syncthreads();  // before the next task overwrites Ŵ and b̂
  }
}

// ---- linear_hvp ------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kThreads)
    linear_hvp_kernel(const HvpArgs<void> args, float* workspace, int64_t workspace_floats) {
  MK_DYNAMIC_SMEM(float, smem);
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

// ---- tensor-core path ------------------------------------------------------------------------
// The same recurrences as the kernels above, for shapes whose every dimension (n, d_in, d_out and
// the readout's m) is a multiple of 16 and whose working set fits in shared memory. The products
// run on tensor cores through WMMA m16n16k8 TF32 fragments, float32 accumulation: for float32
// inputs with the 3xTF32 split (a = a_hi + a_lo, a·b ≈ a_hi·b_hi + a_hi·b_lo + a_lo·b_hi),
// accurate to about float32's rounding (tolerance 1e-4); for bfloat16/float16 inputs one TF32
// product (about 5e-4 relative error against a 2e-2 tolerance; the state stays float32 and is
// rounded to TF32 per fragment). Operands are staged in shared memory as float32 with
// rows padded by 4 floats (bank conflicts); the per-element epilogues (bias, loss gradient,
// update) go through a per-warp 16×16 tile, so each output element's index is known.
//
// mse's columns are independent except through the loss (forward), η̂_t, X̂_t and Q̂_t (backward):
// when none of those couples them (the loss is summed from per-split partials by a second
// kernel), a task's d_out columns are split over gridDim.y CTAs, which fills the GPU when B is
// small (trajectory: B = 16) and keeps a CTA's state at most 128 × 64 (large: two CTAs of 95 KB
// per SM; the kernels are held to 128 registers for that). A product with fewer 16×16 tiles than
// warps splits K over the warps instead (trajectory's 16 × 16 × 128 per-CTA products), one with
// many tiles gives each warp strips of two (one A fragment for two B fragments).
//
// Selection (unroll_forward / unroll_backward below): this path wherever the shape allows, the
// GPU is sm_80+, the working set fits and (backward) there is no lr_scale; otherwise the FMA
// kernels above, which METAKERNELS_CUDA_MMA=0 (or set_mma_enabled(false)) forces everywhere.

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define MK_TF32_MMA 1
#endif

constexpr int kMmaTile = 16;                    // output tiles are 16×16
[[maybe_unused]] constexpr int kMmaK = 8;       // k-step of the TF32 fragments
constexpr int kMmaTileFloats = kMmaTile * kMmaTile;
constexpr int kMmaPad = 4;                      // floats of padding per staged row

// Float offsets of the tensor-core kernels' dynamic shared memory, computed on the host (each
// region starts on a 32-byte boundary, as WMMA loads and stores require).
struct MmaLayout {
  int dc = 0;                      // columns of d_out per CTA (d_out / gridDim.y)
  int ldw = 0, ldx = 0, ldz = 0;   // row strides: W/Ŵ [d_in][dc], X/Q [·][d_in], Z/U/Ô [·][dc]
  int w = 0, bias = 0, x = 0, z = 0, q = 0, o = 0, probs = 0, tiles = 0, red = 0;
  int total = 0;                   // floats
};

#ifdef MK_TF32_MMA
namespace wmma = nvcuda::wmma;
template <bool kATransposed>
using MmaFragA = wmma::fragment<
    wmma::matrix_a, kMmaTile, kMmaTile, kMmaK, wmma::precision::tf32,
    typename std::conditional<kATransposed, wmma::col_major, wmma::row_major>::type>;
using MmaFragB = wmma::fragment<wmma::matrix_b, kMmaTile, kMmaTile, kMmaK, wmma::precision::tf32,
                                wmma::row_major>;
using MmaAcc = wmma::fragment<wmma::accumulator, kMmaTile, kMmaTile, kMmaK, float>;

// The 3xTF32 split of a loaded fragment: hi = tf32(v) in place, lo = tf32(v − hi). Both
// fragments have the same type, so element e of each is the same matrix element.
template <typename Frag>
__device__ __forceinline__ void split_tf32(Frag& hi, Frag& lo) {
#pragma unroll
  for (int e = 0; e < hi.num_elements; ++e) {
    const float v = hi.x[e], rounded = wmma::__float_to_tf32(v);
    hi.x[e] = rounded;
    lo.x[e] = wmma::__float_to_tf32(v - rounded);
  }
}

// The TF32 rounding of a loaded fragment in place.
template <typename Frag>
__device__ __forceinline__ void round_tf32(Frag& frag) {
#pragma unroll
  for (int e = 0; e < frag.num_elements; ++e) frag.x[e] = wmma::__float_to_tf32(frag.x[e]);
}

// acc[j] += A[row0 : row0+16, k_begin : k_end] · B[k_begin : k_end, col0+16j : col0+16j+16] for
// j < kNB (one A fragment serves kNB B fragments). kSplit: 3xTF32 (float32 inputs); otherwise one
// TF32 product (bfloat16/float16 inputs, whose tolerance is 2e-2: about 5e-4 relative error).
template <bool kATransposed, bool kSplit, int kNB>
__device__ __forceinline__ void mma_accumulate(MmaAcc (&acc)[kNB], int row0, int col0,
                                               int k_begin, int k_end, const float* a, int lda,
                                               const float* b, int ldb) {
  for (int k0 = k_begin; k0 < k_end; k0 += kMmaK) {
    MmaFragA<kATransposed> a_hi, a_lo;
    wmma::load_matrix_sync(a_hi, kATransposed ? a + k0 * lda + row0 : a + row0 * lda + k0, lda);
    if (kSplit)
      split_tf32(a_hi, a_lo);
    else
      round_tf32(a_hi);
#pragma unroll
    for (int j = 0; j < kNB; ++j) {
      MmaFragB b_hi, b_lo;
      wmma::load_matrix_sync(b_hi, b + k0 * ldb + col0 + j * kMmaTile, ldb);
      if (kSplit) {
        split_tf32(b_hi, b_lo);
        wmma::mma_sync(acc[j], a_lo, b_hi, acc[j]);
        wmma::mma_sync(acc[j], a_hi, b_lo, acc[j]);
      } else {
        round_tf32(b_hi);
      }
      wmma::mma_sync(acc[j], a_hi, b_hi, acc[j]);
    }
  }
}

// Many tiles: each warp takes strips of kNB adjacent 16×16 tiles in turn.
template <bool kATransposed, bool kSplit, int kNB, typename Epilogue>
__device__ __forceinline__ void mma_gemm_strips(int M, int N, int K, const float* a, int lda,
                                                const float* b, int ldb, float* tile,
                                                Epilogue& epilogue) {
  const int warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int strips_n = N / (kMmaTile * kNB), items = (M / kMmaTile) * strips_n;
  for (int item = warp; item < items; item += warps) {
    const int row0 = (item / strips_n) * kMmaTile, col0 = (item % strips_n) * (kMmaTile * kNB);
    MmaAcc acc[kNB];
#pragma unroll
    for (int j = 0; j < kNB; ++j) wmma::fill_fragment(acc[j], 0.f);
    mma_accumulate<kATransposed, kSplit, kNB>(acc, row0, col0, 0, K, a, lda, b, ldb);
#pragma unroll
    for (int j = 0; j < kNB; ++j) {
      wmma::store_matrix_sync(tile, acc[j], kMmaTile, wmma::mem_row_major);
      __syncwarp();
      epilogue(row0, col0 + j * kMmaTile, static_cast<const float*>(tile));
      __syncwarp();  // the next store overwrites `tile`
    }
  }
}

// Fewer tiles than warps and a long K: `slices` warps per tile each take a slice of K; the tile's
// first warp sums the partial tiles (each warp's scratch) in a fixed order and runs the epilogue.
// Holds two __syncthreads: every thread of the block calls it.
template <bool kATransposed, bool kSplit, typename Epilogue>
__device__ __forceinline__ void mma_gemm_ksplit(int M, int N, int K, int slices, const float* a,
                                                int lda, const float* b, int ldb, float* tiles,
                                                Epilogue& epilogue) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int tiles_n = N / kMmaTile, items = (M / kMmaTile) * tiles_n, k_slice = K / slices;
  float* const own = tiles + warp * kMmaTileFloats;
  if (warp < items * slices) {
    const int item = warp % items, slice = warp / items;
    MmaAcc acc[1];
    wmma::fill_fragment(acc[0], 0.f);
    mma_accumulate<kATransposed, kSplit, 1>(acc, (item / tiles_n) * kMmaTile,
                                            (item % tiles_n) * kMmaTile, slice * k_slice,
                                            (slice + 1) * k_slice, a, lda, b, ldb);
    wmma::store_matrix_sync(own, acc[0], kMmaTile, wmma::mem_row_major);
  }
  __syncthreads();
  if (warp < items) {
    for (int e = lane; e < kMmaTileFloats; e += 32) {
      float sum = own[e];
      for (int s = 1; s < slices; ++s) sum += tiles[(warp + s * items) * kMmaTileFloats + e];
      own[e] = sum;
    }
    __syncwarp();
    epilogue((warp / tiles_n) * kMmaTile, (warp % tiles_n) * kMmaTile,
             static_cast<const float*>(own));
  }
  __syncthreads();  // the partial tiles are read above and overwritten by the next call
}
#endif  // MK_TF32_MMA

// C = A·B for a [M×N] C, with M and N multiples of 16 and K a multiple of 8, every operand float
// in shared memory: A row-major (a[i·lda + k]) or, with kATransposed, stored as its transpose
// (a[k·lda + i]); B row-major (b[k·ldb + j]); 3xTF32 products with kSplit, else 1xTF32.
// lda and ldb are multiples of 4 and the operands
// start on 32-byte boundaries. `tiles` is the block's scratch, one 256-float (32-byte aligned)
// tile per warp. For every 16×16 output tile, exactly one warp calls epilogue(row0, col0, tile)
// from all 32 lanes with the tile row-major in its scratch; the epilogue visits the elements
// lane-strided (for_tile). Every output element goes to one warp, so the epilogue may update it in
// place (when no other warp reads it during the call). Every thread of the block calls mma_gemm
// with the same sizes (it may hold __syncthreads).
template <bool kATransposed, bool kSplit, typename Epilogue>
__device__ __forceinline__ void mma_gemm(int M, int N, int K, const float* a, int lda,
                                         const float* b, int ldb, float* tiles,
                                         Epilogue epilogue) {
#ifdef MK_TF32_MMA
  const int warps = blockDim.x >> 5;
  const int tiles_count = (M / kMmaTile) * (N / kMmaTile);
  if (tiles_count == 0) return;
  int slices = 1;  // split K over warps while tiles are fewer than warps
  while (tiles_count * slices * 2 <= warps && (K / kMmaK) % (slices * 2) == 0 && K > 0)
    slices *= 2;
  if (slices > 1) {
    mma_gemm_ksplit<kATransposed, kSplit>(M, N, K, slices, a, lda, b, ldb, tiles, epilogue);
    return;
  }
  float* const tile = tiles + (threadIdx.x >> 5) * kMmaTileFloats;
  // Strips of 2 tiles where that still leaves every warp at least one strip (4 would spill at
  // the 128 registers that let two CTAs share an SM).
  if (N % (2 * kMmaTile) == 0 && tiles_count / 2 >= warps)
    mma_gemm_strips<kATransposed, kSplit, 2>(M, N, K, a, lda, b, ldb, tile, epilogue);
  else
    mma_gemm_strips<kATransposed, kSplit, 1>(M, N, K, a, lda, b, ldb, tile, epilogue);
#else
  // Compiled for an architecture without TF32 tensor cores: the host never selects this path
  // there (see mma_shape), so this is unreachable.
  (void)M, (void)N, (void)K, (void)a, (void)lda, (void)b, (void)ldb, (void)tiles, (void)epilogue;
  __trap();
#endif
}

// Visits the 256 elements of a 16×16 epilogue tile lane-strided: f(r, c, value) with r, c the
// element's row and column inside the tile.
template <typename F>
__device__ __forceinline__ void for_tile(const float* tile, F f) {
  for (int e = threadIdx.x & 31; e < kMmaTileFloats; e += 32)
    f(e / kMmaTile, e % kMmaTile, tile[e]);
}

// dst[i·ld_dst + k] = src[i·ld_src + k] widened to float32, for a [rows, cols] block.
template <typename T>
__device__ __forceinline__ void stage_rows(float* dst, int ld_dst, const T* src, int64_t ld_src,
                                           int rows, int cols) {
  for (int idx = threadIdx.x; idx < rows * cols; idx += blockDim.x) {
    const int i = idx / cols, k = idx - i * cols;
    dst[i * ld_dst + k] = ld(src, int64_t(i) * ld_src + k);
  }
}

// dst[i·ld_dst + k] = src[i·ld_src + k] in dst's dtype, for a [rows, cols] block.
template <typename T>
__device__ __forceinline__ void unstage_rows(T* dst, int64_t ld_dst, const float* src, int ld_src,
                                             int rows, int cols) {
  for (int idx = threadIdx.x; idx < rows * cols; idx += blockDim.x) {
    const int i = idx / cols, k = idx - i * cols;
    st(dst, int64_t(i) * ld_dst + k, src[i * ld_src + k]);
  }
}

// update(c, Σ_i m[i·ld + c]) for the columns c < cols of a [rows, cols] block.
template <typename Update>
__device__ __forceinline__ void strided_column_sums(int rows, int cols, const float* m, int64_t ld,
                                                    Update update) {
  for (int c = threadIdx.x; c < cols; c += blockDim.x) {
    float acc = 0.f;
    for (int i = 0; i < rows; ++i) acc += m[i * ld + c];
    update(c, acc);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    unroll_forward_mma_kernel(const UnrollDims dims, const UnrollInputs<void> in,
                              const UnrollForwardOutputs<void> out, const MmaLayout L,
                              float* loss_partials) {
  MK_DYNAMIC_SMEM_ALIGNED(float, mma_smem, 128);
  constexpr bool kSplit = std::is_same<T, float>::value;  // 3xTF32 for float32 inputs
  const int n = int(dims.support), d_in = int(dims.d_in), d_out = int(dims.d_out);
  const int m = int(dims.queries);
  const int64_t steps = dims.steps;
  const int64_t w_size = int64_t(d_in) * d_out, z_size = int64_t(n) * d_out;
  const int splits = int(gridDim.y), split = int(blockIdx.y), dc = L.dc, c0 = split * dc;
  float* const W = mma_smem + L.w;
  float* const bvec = mma_smem + L.bias;
  float* const X = mma_smem + L.x;
  float* const Z = mma_smem + L.z;
  float* const Q = mma_smem + L.q;
  float* const tiles = mma_smem + L.tiles;  // one 16×16 scratch tile per warp
  float* const red = mma_smem + L.red;

  const ForwardPointers<T> io(in, out);
  const bool has_bias = io.bias != nullptr;
  const bool x_per_step = in.x_step_stride != 0;
  const bool with_readout = io.queries && io.readout;
  const float inv_n = 1.f / float(n);

  for (int64_t b = blockIdx.x; b < dims.tasks; b += gridDim.x) {
    stage_rows(W, L.ldw, io.weight + b * in.weight_task_stride + c0, d_out, d_in, dc);
    for (int c = threadIdx.x; c < dc; c += blockDim.x)
      bvec[c] = has_bias ? ld(io.bias, b * in.bias_task_stride + c0 + c) : 0.f;
    if (!x_per_step) stage_rows(X, L.ldx, io.x_all + b * in.x_task_stride, d_in, n, d_in);

    for (int64_t t = 0; t < steps; ++t) {
      const int64_t bt = b * steps + t;
      if (x_per_step)
        stage_rows(X, L.ldx, io.x_all + b * in.x_task_stride + t * in.x_step_stride, d_in, n, d_in);
      if (with_readout) stage_rows(Q, L.ldx, io.queries + bt * m * d_in, d_in, m, d_in);
      __syncthreads();  // W_t, b_t, X_t and Q_t are in place
      if (io.states) unstage_rows(io.states + bt * w_size + c0, d_out, W, L.ldw, d_in, dc);

      // Z_t = X_t W_t + 1 b_tᵀ.
      mma_gemm<false, kSplit>(n, dc, d_in, X, L.ldx, W, L.ldw, tiles,
                      [&](int row0, int col0, const float* acc) {
                        for_tile(acc, [&](int r, int c, float v) {
                          Z[(row0 + r) * L.ldz + col0 + c] = v + bvec[col0 + c];
                        });
                      });
      __syncthreads();
      // E_t = ∂ℓ_t/∂Z_t in place, and this CTA's part of ℓ_t.
      float loss_part = 0.f;
      if (dims.loss == Loss::kMse) {
        const T* y = io.y_all + b * in.y_task_stride + t * in.y_step_stride + c0;
        for (int idx = threadIdx.x; idx < n * dc; idx += blockDim.x) {
          const int i = idx / dc, c = idx - i * dc;
          loss_part += mse_row_residual(Z + i * L.ldz + c, RowLoader<T>{y + int64_t(i) * d_out + c},
                                        int64_t(1), inv_n);
        }
      } else {  // one split: whole rows
        const int64_t* labels = in.labels + b * in.labels_task_stride + t * in.labels_step_stride;
        for (int i = threadIdx.x; i < n; i += blockDim.x)
          loss_part += ce_row_residual(Z + i * L.ldz, labels[i], int64_t(d_out), inv_n);
      }
      const float loss = block_sum(loss_part, red);  // also publishes E_t
      if (threadIdx.x == 0) {
        if (splits == 1)
          st(io.losses, bt, loss * inv_n);
        else
          loss_partials[bt * splits + split] = loss;
      }
      unstage_rows(io.residual_all + bt * z_size + c0, d_out, Z, L.ldz, n, dc);

      // W_{t+1} = W_t − η_t (P ∘ X_tᵀ E_t),  b_{t+1} = b_t − η_t (p ∘ 1ᵀ E_t).
      const float lr = ld(io.lr_all, bt);
      mma_gemm<true, kSplit>(d_in, dc, n, X, L.ldx, Z, L.ldz, tiles,
                     [&](int row0, int col0, const float* acc) {
                       for_tile(acc, [&](int r, int c, float g) {
                         const int k = row0 + r, j = col0 + c;
                         const float p = io.lr_scale ? ld(io.lr_scale, int64_t(k) * d_out + c0 + j)
                                                  : 1.f;
                         float& w = W[k * L.ldw + j];
                         w = sgd_step(w, lr, p, g);
                       });
                     });
      if (has_bias)
        strided_column_sums(n, dc, Z, L.ldz, [&](int c, float g) {
          bvec[c] = sgd_step(bvec[c], lr, io.bias_lr_scale ? ld(io.bias_lr_scale, c0 + c) : 1.f, g);
        });
      __syncthreads();

      // O_t = Q_t W_{t+1} + 1 b_{t+1}ᵀ.
      if (with_readout) {
        T* o = io.readout + bt * m * d_out + c0;
        mma_gemm<false, kSplit>(m, dc, d_in, Q, L.ldx, W, L.ldw, tiles,
                        [&](int row0, int col0, const float* acc) {
                          for_tile(acc, [&](int r, int c, float v) {
                            st(o, int64_t(row0 + r) * d_out + col0 + c, v + bvec[col0 + c]);
                          });
                        });
      }
      __syncthreads();  // X, Q and Z are overwritten by the next step
    }
    unstage_rows(io.weight_out + b * w_size + c0, d_out, W, L.ldw, d_in, dc);
    if (has_bias)
      for (int c = threadIdx.x; c < dc; c += blockDim.x)
        st(io.bias_out, b * d_out + c0 + c, bvec[c]);
    __syncthreads();  // before the next task overwrites W, b and X
  }
}

// losses[i] = (Σ_s partials[i·splits + s]) / n, in a fixed order.
template <typename T>
__global__ void sum_loss_partials_kernel(const float* partials, int64_t count, int splits,
                                         float inv_n, void* losses) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count;
       i += int64_t(gridDim.x) * blockDim.x) {
    float total = 0.f;
    for (int s = 0; s < splits; ++s) total += partials[i * splits + s];
    st(static_cast<T*>(losses), i, total * inv_n);
  }
}

// The backward on tensor cores. The host sends here only calls without lr_scale (D = Ŵ), and
// splits the columns only when grad_x, grad_lr and grad_queries are not wanted and the loss is
// mse.
template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    unroll_backward_mma_kernel(const UnrollDims dims, const UnrollInputs<void> in,
                               const UnrollBackwardArgs<void> args, const MmaLayout L) {
  MK_DYNAMIC_SMEM_ALIGNED(float, mma_smem, 128);
  constexpr bool kSplit = std::is_same<T, float>::value;  // 3xTF32 for float32 inputs
  const int n = int(dims.support), d_in = int(dims.d_in), d_out = int(dims.d_out);
  const int m = int(dims.queries);
  const int64_t steps = dims.steps;
  const int64_t w_size = int64_t(d_in) * d_out, z_size = int64_t(n) * d_out;
  const bool ce = dims.loss == Loss::kCrossEntropy;
  const int dc = L.dc, c0 = int(blockIdx.y) * dc;
  float* const Wa = mma_smem + L.w;     // Ŵ
  float* const ba = mma_smem + L.bias;  // b̂
  float* const X = mma_smem + L.x;
  float* const U = mma_smem + L.z;      // U = X D + 1 dᵀ, then Ẑ in place
  float* const Q = mma_smem + L.q;
  float* const O = mma_smem + L.o;      // Ô_t
  float* const probs = mma_smem + L.probs;  // ce only
  float* const tiles = mma_smem + L.tiles;  // one 16×16 scratch tile per warp
  float* const red = mma_smem + L.red;

  const BackwardPointers<T> io(in, args);
  const bool has_bias = in.bias != nullptr;
  const bool x_per_step = in.x_step_stride != 0;
  const bool with_readout = io.queries && io.grad_readout;
  const bool second_order = !args.first_order;
  const float n_rows = float(n);
  const int64_t grad_x_task = (x_per_step ? steps : 1) * n * d_in;
  const int64_t grad_x_step = x_per_step ? int64_t(n) * d_in : 0;
  const int64_t grad_y_rows = (x_per_step ? steps : 1) * n;  // rows of d_out per task
  const int64_t grad_y_step = x_per_step ? int64_t(n) * d_out : 0;

  for (int64_t b = blockIdx.x; b < dims.tasks; b += gridDim.x) {
    stage_rows(Wa, L.ldw, io.grad_weight_final + b * w_size + c0, d_out, d_in, dc);
    for (int c = threadIdx.x; c < dc; c += blockDim.x)
      ba[c] = has_bias && io.grad_bias_final ? ld(io.grad_bias_final, b * d_out + c0 + c) : 0.f;
    float* grad_bias_lr_scale =
        io.grad_bias_lr_scale_all ? io.grad_bias_lr_scale_all + b * d_out + c0 : nullptr;
    if (grad_bias_lr_scale)
      for (int c = threadIdx.x; c < dc; c += blockDim.x) grad_bias_lr_scale[c] = 0.f;
    if (io.grad_x)  // one split
      for (int64_t k = threadIdx.x; k < grad_x_task; k += blockDim.x)
        io.grad_x[b * grad_x_task + k] = 0.f;
    if (io.grad_y)  // this CTA's columns of every row
      for (int64_t k = threadIdx.x; k < grad_y_rows * dc; k += blockDim.x)
        io.grad_y[(b * grad_y_rows + k / dc) * d_out + c0 + k % dc] = 0.f;
    if (!x_per_step) stage_rows(X, L.ldx, io.x_all + b * in.x_task_stride, d_in, n, d_in);

    for (int64_t t = steps - 1; t >= 0; --t) {
      const int64_t bt = b * steps + t;
      const float* residual = io.residual_all + bt * z_size;
      const float lr = ld(io.lr_all, bt);
      if (x_per_step)
        stage_rows(X, L.ldx, io.x_all + b * in.x_task_stride + t * in.x_step_stride, d_in, n, d_in);

      // The readout after step t: Ŵ_{t+1} += Q_tᵀ Ô_t, b̂_{t+1} += 1ᵀ Ô_t, Q̂_t = Ô_t W_{t+1}ᵀ.
      if (with_readout) {
        const T* o_adj = io.grad_readout + bt * m * d_out;
        stage_rows(Q, L.ldx, io.queries + bt * m * d_in, d_in, m, d_in);
        stage_rows(O, L.ldz, o_adj + c0, d_out, m, dc);
        if (io.grad_queries)  // one split; global memory only
          readout_query_grad(m, d_in, d_out, o_adj,
                             t + 1 < steps ? io.states + (bt + 1) * w_size : nullptr,
                             io.weight_final + b * w_size, io.grad_queries + bt * m * d_in);
        __syncthreads();  // Q_t and Ô_t are in place
        mma_gemm<true, kSplit>(d_in, dc, m, Q, L.ldx, O, L.ldz, tiles,
                       [&](int row0, int col0, const float* acc) {
                         for_tile(acc, [&](int r, int c, float v) {
                           Wa[(row0 + r) * L.ldw + col0 + c] += v;
                         });
                       });
        if (has_bias) strided_column_sums(m, dc, O, L.ldz, [&](int c, float v) { ba[c] += v; });
      } else if (io.grad_queries) {
        float* gq = io.grad_queries + bt * m * d_in;
        for (int k = threadIdx.x; k < m * d_in; k += blockDim.x) gq[k] = 0.f;
      }
      __syncthreads();  // Ŵ_{t+1}, b̂_{t+1} and X_t are in place

      // D = Ŵ_{t+1} (no lr_scale on this path), d = p ∘ b̂_{t+1}, and U = X_t D + 1 dᵀ.
      mma_gemm<false, kSplit>(n, dc, d_in, X, L.ldx, Wa, L.ldw, tiles,
                      [&](int row0, int col0, const float* acc) {
                        for_tile(acc, [&](int r, int c, float v) {
                          const int j = col0 + c;
                          const float scale_j =
                              io.bias_lr_scale ? ld(io.bias_lr_scale, c0 + j) : 1.f;
                          const float d = has_bias ? scale_j * ba[j] : 0.f;
                          U[(row0 + r) * L.ldz + j] = v + d;
                        });
                      });
      __syncthreads();

      // η̂_t = −⟨U, E_t⟩ (one split).
      if (io.grad_lr) {
        float part = 0.f;
        for (int idx = threadIdx.x; idx < n * d_out; idx += blockDim.x) {
          const int i = idx / d_out, j = idx - i * d_out;
          part += U[i * L.ldz + j] * residual[idx];
        }
        const float total = block_sum(part, red);
        if (threadIdx.x == 0) io.grad_lr[bt] = -total;
      }
      // p̂ += −η b̂_{t+1} ∘ g_t.
      if (grad_bias_lr_scale && has_bias)
        strided_column_sums(n, dc, residual + c0, d_out,
                            [&](int c, float g) { grad_bias_lr_scale[c] -= lr * ba[c] * g; });

      if (!second_order) {  // FOMAML: Ŵ_t = Ŵ_{t+1}, nothing flows through E_t.
        __syncthreads();    // X, Q, Ô and U are overwritten by the next step
        continue;
      }

      // Ê = −η U;  Ẑ = Ê / n (mse) or the softmax Jacobian of Ê over n (ce), in place of U.
      const float scale = -lr / n_rows;
      if (ce) {  // one split: whole rows
        const int64_t* labels = in.labels + b * in.labels_task_stride + t * in.labels_step_stride;
        for (int i = threadIdx.x; i < n; i += blockDim.x) {
          float* p = probs + i * d_out;
          ce_probs_from_residual(residual + int64_t(i) * d_out, labels[i], int64_t(d_out), n_rows,
                                 p);
          softmax_jacobian_row(p, U + i * L.ldz, int64_t(d_out), scale, U + i * L.ldz);
        }
      } else {
        float* gy =
            io.grad_y ? io.grad_y + b * grad_y_rows * d_out + t * grad_y_step + c0 : nullptr;
        for (int idx = threadIdx.x; idx < n * dc; idx += blockDim.x) {
          const int i = idx / dc, c = idx - i * dc;
          const float z_adj = U[i * L.ldz + c] * scale;
          U[i * L.ldz + c] = z_adj;
          if (gy) gy[int64_t(i) * d_out + c] -= z_adj;
        }
      }
      __syncthreads();

      // X̂_t += −η E_t Dᵀ + Ẑ W_tᵀ (one split).
      if (io.grad_x) {
        float* gx = io.grad_x + b * grad_x_task + t * grad_x_step;
        const float* w_t = io.states + bt * w_size;
        gemm_nt_warp(n, d_in, d_out,
                     [&](int i, int k, int j) {
                       return -lr * residual[i * d_out + j] * Wa[k * L.ldw + j] +
                              U[i * L.ldz + j] * w_t[k * d_out + j];
                     },
                     [&](int o, float v) { gx[o] += v; });
        __syncthreads();  // Ŵ_{t+1} is read above and overwritten below
      }

      // Ŵ_t = Ŵ_{t+1} + X_tᵀ Ẑ,  b̂_t = b̂_{t+1} + 1ᵀ Ẑ.
      mma_gemm<true, kSplit>(d_in, dc, n, X, L.ldx, U, L.ldz, tiles,
                     [&](int row0, int col0, const float* acc) {
                       for_tile(acc, [&](int r, int c, float v) {
                         Wa[(row0 + r) * L.ldw + col0 + c] += v;
                       });
                     });
      if (has_bias) strided_column_sums(n, dc, U, L.ldz, [&](int c, float v) { ba[c] += v; });
      __syncthreads();
    }

    if (io.grad_weight) unstage_rows(io.grad_weight + b * w_size + c0, d_out, Wa, L.ldw, d_in, dc);
    if (io.grad_bias)
      for (int c = threadIdx.x; c < dc; c += blockDim.x) io.grad_bias[b * d_out + c0 + c] = ba[c];
    __syncthreads();  // before the next task overwrites Ŵ, b̂ and X
  }
}

// ---- launch ----------------------------------------------------------------------------------
struct Device {
  int sms = 0;
  size_t max_smem = 0;  // opt-in maximum of dynamic + static shared memory per block
  int major = 0;        // compute capability
};

Device current_device() {
  int device = 0, sms = 0, optin = 0, major = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device),
        "cudaDeviceGetAttribute(multiProcessorCount)");
  check(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
        "cudaDeviceGetAttribute(maxSharedMemoryPerBlockOptin)");
  check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device),
        "cudaDeviceGetAttribute(computeCapabilityMajor)");
  return {sms, static_cast<size_t>(optin), major};
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
    MK_LAUNCH(kernel, static_cast<unsigned>(grid), kThreads, bytes, stream)(args..., nullptr, 0);
    check(cudaGetLastError(), name);
    return;
  }
  // Global-memory path: one workspace slice per CTA, a grid-stride loop over the tasks.
  const int64_t grid = std::min<int64_t>(tasks, int64_t(device.sms) * 4);
  const int64_t floats = static_cast<int64_t>((bytes + sizeof(float) - 1) / sizeof(float));
  void* workspace = nullptr;
  check(cudaMallocAsync(&workspace, static_cast<size_t>(grid * floats) * sizeof(float), stream),
        "cudaMallocAsync(workspace)");
  MK_LAUNCH(kernel, static_cast<unsigned>(grid), kThreads, 0, stream)(
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


// ---- tensor-core path: selection and launch ---------------------------------------------------
// METAKERNELS_CUDA_MMA=0 in the environment (read once) turns the tensor-core path off;
// set_mma_enabled changes it at run time (tests compare both paths in one process).
std::atomic<bool>& mma_flag() {
  static std::atomic<bool> flag{[] {
    const char* value = std::getenv("METAKERNELS_CUDA_MMA");
    return value == nullptr || std::string(value) != "0";
  }()};
  return flag;
}

std::atomic<int64_t> g_mma_launches{0};
std::atomic<int> g_mma_splits{0};  // 0: choose_splits decides

// Shapes the fragments tile exactly, on a GPU with TF32 tensor cores (sm_80 and later).
bool mma_shape(const UnrollDims& d, const Device& device) {
  const auto tiles = [](int64_t v) { return v > 0 && v % kMmaTile == 0; };
  return mma_flag().load() && device.major >= 8 && tiles(d.support) && tiles(d.d_in) &&
         tiles(d.d_out) && d.queries % kMmaTile == 0;
}

// CTAs per task over d_out: 1 when the columns are coupled, else the smallest power of two that
// gives at least one CTA per SM and at most 64 columns per CTA (a 128 × 64 state: two CTAs share
// an SM), each CTA keeping a multiple of 16 columns. set_mma_splits overrides it where the
// override divides d_out into multiples of 16 and the columns are not coupled.
int choose_splits(int64_t tasks, int64_t d_out, int sms, bool coupled) {
  if (coupled) return 1;
  const int64_t col_tiles = d_out / kMmaTile;
  const int forced = g_mma_splits.load();
  if (forced > 0 && col_tiles % forced == 0) return forced;
  int splits = 1;
  while ((tasks * splits < sms || d_out / splits > 64) && col_tiles % (2 * splits) == 0)
    splits *= 2;
  return splits;
}

// The shared-memory layout of a tensor-core kernel with `splits` CTAs per task, q_rows staged
// rows of Q, o_rows of Ô and probs_floats of softmax probabilities; false when it does not fit.
bool plan_mma(const UnrollDims& d, int splits, int64_t q_rows, int64_t o_rows,
              int64_t probs_floats, const Device& device, MmaLayout* layout, size_t* bytes) {
  const int64_t dc = d.d_out / splits;
  const int64_t ldw = dc + kMmaPad, ldx = d.d_in + kMmaPad, ldz = dc + kMmaPad;
  int64_t offset = 0;
  const auto take = [&](int64_t floats) {  // 8 floats: 32-byte aligned regions
    const int64_t at = offset;
    offset += (floats + 7) / 8 * 8;
    return at;
  };
  const int64_t w = take(d.d_in * ldw), bias = take(dc), x = take(d.support * ldx);
  const int64_t z = take(d.support * ldz), q = take(q_rows * ldx), o = take(o_rows * ldz);
  const int64_t probs = take(probs_floats), tiles = take(int64_t(kWarps) * kMmaTileFloats);
  const int64_t red = take(32);
  const size_t total = static_cast<size_t>(offset) * sizeof(float);
  if (total > device.max_smem) return false;
  layout->dc = int(dc);
  layout->ldw = int(ldw);
  layout->ldx = int(ldx);
  layout->ldz = int(ldz);
  layout->w = int(w);
  layout->bias = int(bias);
  layout->x = int(x);
  layout->z = int(z);
  layout->q = int(q);
  layout->o = int(o);
  layout->probs = int(probs);
  layout->tiles = int(tiles);
  layout->red = int(red);
  layout->total = int(offset);
  *bytes = total;
  return true;
}

template <typename Kernel, typename... Args>
void launch_mma(Kernel kernel, int64_t tasks, int splits, size_t bytes, cudaStream_t stream,
                const char* name, const Args&... args) {
  if (bytes > kDefaultSmemBytes)
    check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(bytes)),
          "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(tasks, int64_t(1) << 30)),
                  static_cast<unsigned>(splits));
  MK_LAUNCH(kernel, grid, kThreads, bytes, stream)(args...);
  check(cudaGetLastError(), name);
  g_mma_launches.fetch_add(1);
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
  const Device device = current_device();
  if (mma_shape(dims, device)) {
    const bool with_readout = in.queries != nullptr && out.readout != nullptr;
    const bool coupled = dims.loss == Loss::kCrossEntropy || dims.steps == 0;
    const int splits = choose_splits(dims.tasks, dims.d_out, device.sms, coupled);
    MmaLayout layout;
    size_t mma_bytes = 0;
    if (plan_mma(dims, splits, with_readout ? dims.queries : 0, 0, 0, device, &layout,
                 &mma_bytes)) {
      // With split columns each CTA writes its part of ℓ_t; a second kernel sums them in order.
      const int64_t count = dims.tasks * dims.steps;
      float* partials = nullptr;
      if (splits > 1)
        check(cudaMallocAsync(reinterpret_cast<void**>(&partials),
                              static_cast<size_t>(count * splits) * sizeof(float), stream),
              "cudaMallocAsync(loss partials)");
      try {
        MK_DISPATCH_DTYPE(dtype, {
          launch_mma(unroll_forward_mma_kernel<scalar_t>, dims.tasks, splits, mma_bytes, stream,
                     "unroll_forward_mma_kernel launch", dims, in, out, layout, partials);
          if (splits > 1) {
            const int64_t blocks = std::min<int64_t>((count + kThreads - 1) / kThreads, 4096);
            MK_LAUNCH(sum_loss_partials_kernel<scalar_t>, static_cast<unsigned>(blocks), kThreads,
                      0, stream)(partials, count, splits, 1.f / float(dims.support), out.losses);
            check(cudaGetLastError(), "sum_loss_partials_kernel launch");
          }
        })
      } catch (...) {
        if (partials) cudaFreeAsync(partials, stream);
        throw;
      }
      if (partials) check(cudaFreeAsync(partials, stream), "cudaFreeAsync(loss partials)");
      return;
    }
  }
  const size_t bytes = unroll_forward_smem_bytes(dims, in.bias != nullptr);
  MK_DISPATCH_DTYPE(dtype, launch(unroll_forward_kernel<scalar_t>, dims.tasks, bytes, stream,
                                  "unroll_forward_kernel launch", dims, in, out))
}

void unroll_backward(DType dtype, const UnrollDims& dims, const UnrollInputs<void>& in,
                     const UnrollBackwardArgs<void>& args, cudaStream_t stream) {
  if (dims.tasks <= 0) return;
  check_unroll_dims(dims);
  const Device device = current_device();
  // The tensor-core backward has no lr_scale (its D = P ∘ Ŵ would need a second d_in × d_out
  // buffer); those calls take the FMA kernel.
  if (mma_shape(dims, device) && in.lr_scale == nullptr && args.grad_lr_scale == nullptr) {
    const bool with_readout = in.queries != nullptr && args.grad_readout != nullptr;
    const bool ce = dims.loss == Loss::kCrossEntropy;
    const bool coupled = ce || args.grad_x != nullptr || args.grad_lr != nullptr ||
                         args.grad_queries != nullptr;
    const int splits = choose_splits(dims.tasks, dims.d_out, device.sms, coupled);
    const int64_t staged = with_readout ? dims.queries : 0;
    MmaLayout layout;
    size_t mma_bytes = 0;
    if (plan_mma(dims, splits, staged, staged, ce ? dims.support * dims.d_out : 0, device,
                 &layout, &mma_bytes)) {
      MK_DISPATCH_DTYPE(dtype, launch_mma(unroll_backward_mma_kernel<scalar_t>, dims.tasks,
                                          splits, mma_bytes, stream,
                                          "unroll_backward_mma_kernel launch", dims, in, args,
                                          layout))
      return;
    }
  }
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

void set_mma_enabled(bool enabled) { mma_flag().store(enabled); }

bool mma_enabled() { return mma_flag().load(); }

int64_t mma_launches() { return g_mma_launches.load(); }

void set_mma_splits(int splits) { g_mma_splits.store(splits > 0 ? splits : 0); }

}  // namespace cuda
}  // namespace metakernels
