// Host entry points of the CUDA kernels (csrc/cuda/): raw device pointers, sizes, strides and a
// stream, no torch. The layouts are those of fast_weight.h (UnrollInputs, UnrollForwardOutputs,
// UnrollBackwardArgs, HvpArgs), instantiated with T = void: the element type of every floating
// input and forward output is `dtype`, with three exceptions that are always float32 (the state
// and accumulation type of docs/conventions.md, dtypes):
//   - UnrollForwardOutputs::residual and ::states, and UnrollBackwardArgs::residual and ::states;
//   - every gradient output of UnrollBackwardArgs (grad_weight … grad_queries): the caller casts
//     them to dtype (they are accumulated over steps, so they are kept in float32 until the end).
// Everything else (weight_final, grad_weight_final, grad_bias_final, grad_readout, lr, …) is dtype.
//
// Every launch goes on `stream` and is checked; an error throws std::runtime_error. Shapes whose
// per-task working set exceeds the GPU's shared memory run the same kernels on a global-memory
// workspace (stream-ordered cudaMallocAsync), slower but exact; sizes beyond 32-bit per-task
// indexing throw std::runtime_error("... unsupported ...").
#pragma once

#include <cuda_runtime_api.h>

#include "metakernels/fast_weight.h"

namespace metakernels {
namespace cuda {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

void unroll_forward(DType dtype, const UnrollDims& dims, const UnrollInputs<void>& in,
                    const UnrollForwardOutputs<void>& out, cudaStream_t stream);

void unroll_backward(DType dtype, const UnrollDims& dims, const UnrollInputs<void>& in,
                     const UnrollBackwardArgs<void>& args, cudaStream_t stream);

// HvpArgs<void>: hv_weight and hv_bias are dtype (no accumulation over steps).
void linear_hvp(DType dtype, const HvpArgs<void>& args, cudaStream_t stream);

// The tensor-core path of unroll_forward/unroll_backward (TF32 WMMA, float32 accumulation: the
// 3xTF32 split for float32 inputs, one TF32 product for bfloat16/float16), taken where n, d_in,
// d_out and m are multiples of 16, the working set fits in shared memory, the GPU is sm_80 or
// later and (backward) there is no lr_scale; every other call runs the FMA kernels. On by default;
// METAKERNELS_CUDA_MMA=0 in the environment (read once) turns it off, and set_mma_enabled changes
// it for later calls (each call reads the setting once). mma_launches counts the tensor-core
// kernel launches so far (tests check which path was taken).
void set_mma_enabled(bool enabled);
bool mma_enabled();
int64_t mma_launches();
// CTAs per task over d_out on the tensor-core path, for tuning: 0 (the default) lets the kernels
// choose; n > 0 is used wherever the columns are independent (mse without grad_x, grad_lr or
// grad_queries) and n divides d_out / 16, else ignored. Same answer either way.
void set_mma_splits(int splits);

// Bytes of dynamic shared memory one CTA of each kernel asks for (the working set of one task);
// exposed for tests and the documentation of limits.
size_t unroll_forward_smem_bytes(const UnrollDims& dims, bool has_bias);
size_t unroll_backward_smem_bytes(const UnrollDims& dims, bool has_bias);
size_t linear_hvp_smem_bytes(int64_t support, int64_t d_out, Loss loss);

}  // namespace cuda
}  // namespace metakernels
