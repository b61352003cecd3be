// metakernels._C_cuda: the CUDA bodies of the metakernels:: custom ops (backend="cuda"). The only
// torch-aware file of the CUDA backend: tensors in, raw device pointers to csrc/cuda/ (through
// metakernels/cuda_kernels.h), tensors out. The functions, arguments and returns are those of
// csrc/torch/binding.cpp (see metakernels/_C.pyi); metakernels/ops/ checked every argument.
//
// Dtypes: float32, bfloat16, float16 inputs. Outputs take weight's dtype, except the saved
// residual E_t and states W_t, which are float32 (the state dtype, docs/conventions.md, dtypes).
// The backward's gradients are accumulated in float32 by the kernels and cast to weight's dtype
// here. Every kernel runs on the current CUDA stream of the inputs' device.
#include <torch/extension.h>

// c10's stream and guard only: ATen/cuda/CUDAContext.h pulls in cuSPARSE/cuBLAS headers, which a
// minimal CUDA toolkit lacks.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <stdexcept>
#include <vector>

#include "metakernels/cuda_kernels.h"
#include "metakernels/fast_weight.h"
#include "unroll_tensors.h"

namespace {

using at::Tensor;
using c10::optional;
using metakernels::Loss;
using metakernels::cuda::DType;
using namespace metakernels_torch;

DType dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kHalf:
      return DType::kFloat16;
    default:
      TORCH_CHECK(false, "metakernels CUDA backend: unsupported dtype ", t.scalar_type(),
                  " (float32, bfloat16 and float16 run on CUDA)");
  }
  return DType::kFloat32;  // not reached
}

void check_cuda(const Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "metakernels CUDA backend: ", name, " is on ", t.device(),
              ", expected a CUDA tensor");
}

// Runs kernel(stream) on the current stream of on's device, turning its std::runtime_error into a
// torch RuntimeError.
template <typename F>
void run_kernel(const Tensor& on, F&& kernel) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(on.device().index()).stream();
  try {
    kernel(stream);
  } catch (const std::runtime_error& error) {
    TORCH_CHECK(false, error.what());
  }
}

// The shared Unroll (unroll_tensors.h), with x and y made contiguous and the CUDA backend's own
// device and dtype checks.
struct CudaUnroll : Unroll {
  CudaUnroll(const Tensor& weight_, const Tensor& x_, const Tensor& targets_, const Tensor& lr_,
             const optional<Tensor>& bias_, const optional<Tensor>& lr_scale_,
             const optional<Tensor>& bias_lr_scale_, const optional<Tensor>& queries_,
             int64_t loss)
      : Unroll(weight_, x_, targets_, lr_, bias_, lr_scale_, bias_lr_scale_, queries_, loss,
               /*strided_tasks=*/false) {
    check_cuda(weight, "weight");
    check_cuda(x, "x");
    check_cuda(targets, "y");
    check_cuda(lr, "lr");
    if (dims.loss == Loss::kCrossEntropy) {
      TORCH_CHECK(targets.scalar_type() == at::kLong,
                  "metakernels CUDA backend: ce labels must be int64");
    } else {
      TORCH_CHECK(targets.scalar_type() == weight.scalar_type(),
                  "metakernels CUDA backend: y must have weight's dtype");
    }
    TORCH_CHECK(lr.scalar_type() == weight.scalar_type(),
                "metakernels CUDA backend: lr must have weight's dtype");
  }
};

// The dtype of the saved residual and states: float32 (state_dtype in
// metakernels/ops/fast_weight_unroll.py gives float32 for every dtype this backend runs).
at::TensorOptions state_options(const Tensor& weight) {
  return weight.options().dtype(at::kFloat);
}

std::vector<Tensor> unroll_forward(const Tensor& weight, const Tensor& x, const Tensor& targets,
                                   const Tensor& lr, const optional<Tensor>& bias,
                                   const optional<Tensor>& lr_scale,
                                   const optional<Tensor>& bias_lr_scale,
                                   const optional<Tensor>& queries, int64_t loss,
                                   bool store_states) {
  check_cuda(weight, "weight");
  const c10::cuda::CUDAGuard guard(weight.device());
  const CudaUnroll u(weight, x, targets, lr, bias, lr_scale, bias_lr_scale, queries, loss);
  const auto& d = u.dims;
  const auto opts = u.weight.options();
  const auto state = state_options(u.weight);
  Tensor weight_out = new_output({d.tasks, d.d_in, d.d_out}, opts);
  Tensor bias_out = bias.has_value() ? new_output({d.tasks, d.d_out}, opts) : no_output(u.weight);
  Tensor losses = new_output({d.tasks, d.steps}, opts);
  Tensor readout = queries.has_value() ? new_output({d.tasks, d.steps, d.queries, d.d_out}, opts)
                                       : no_output(u.weight);
  Tensor residual = new_output({d.tasks, d.steps, d.support, d.d_out}, state);
  Tensor states = store_states ? new_output({d.tasks, d.steps, d.d_in, d.d_out}, state)
                               : at::empty({0}, state);
  metakernels::UnrollForwardOutputs<void> out;
  out.weight = out_ptr_or_null<void>(weight_out);
  out.bias = out_ptr_or_null<void>(bias_out);
  out.losses = out_ptr_or_null<void>(losses);
  out.readout = out_ptr_or_null<void>(readout);
  out.residual = out_ptr_or_null<void>(residual);
  out.states = out_ptr_or_null<void>(states);
  const auto in = u.inputs<void>();
  run_kernel(weight, [&](cudaStream_t stream) {
    metakernels::cuda::unroll_forward(dtype_of(u.weight), d, in, out, stream);
  });
  return {weight_out, bias_out, losses, readout, residual, states};
}

// wanted: which gradients to compute, in the order weight, x, y, lr, bias, lr_scale,
// bias_lr_scale, queries (see csrc/torch/binding.cpp). Returns them in that order, each empty
// where not wanted, shared inputs summed over tasks, in weight's dtype.
std::vector<Tensor> unroll_backward(const Tensor& weight, const Tensor& x, const Tensor& targets,
                                    const Tensor& lr, const optional<Tensor>& bias,
                                    const optional<Tensor>& lr_scale,
                                    const optional<Tensor>& bias_lr_scale,
                                    const optional<Tensor>& queries, const Tensor& residual,
                                    const Tensor& states, const Tensor& weight_final,
                                    const Tensor& grad_weight_final,
                                    const optional<Tensor>& grad_bias_final,
                                    const optional<Tensor>& grad_readout, int64_t loss,
                                    bool first_order, std::vector<bool> wanted) {
  TORCH_CHECK(wanted.size() == 8, "metakernels internal error: unroll_backward takes 8 flags");
  check_cuda(weight, "weight");
  const c10::cuda::CUDAGuard guard(weight.device());
  const CudaUnroll u(weight, x, targets, lr, bias, lr_scale, bias_lr_scale, queries, loss);
  const auto& d = u.dims;
  const auto acc = state_options(u.weight);  // float32 accumulators, cast at the end
  TORCH_CHECK(!((wanted[1] && !first_order) || wanted[7]) || states.dim() == 4,
              "metakernels internal error: the backward needs the stored fast weights");
  auto maybe = [&](bool need, at::IntArrayRef shape) {
    return need ? new_output(shape, acc) : at::empty({0}, acc);
  };
  Tensor grad_weight = maybe(wanted[0], {d.tasks, d.d_in, d.d_out});
  Tensor grad_x = maybe(wanted[1], u.x.sizes());
  Tensor grad_y = maybe(wanted[2] && d.loss == Loss::kMse, u.targets.sizes());
  Tensor grad_lr = maybe(wanted[3], {d.tasks, d.steps});
  Tensor grad_bias = maybe(wanted[4], {d.tasks, d.d_out});
  Tensor grad_lr_scale = maybe(wanted[5], {d.tasks, d.d_in, d.d_out});
  Tensor grad_bias_lr_scale = maybe(wanted[6], {d.tasks, d.d_out});
  Tensor grad_queries = maybe(wanted[7], {d.tasks, d.steps, d.queries, d.d_in});
  // The saved tensors are float32 already; .to() is a no-op then (and makes any caller's other
  // dtype safe).
  const Tensor residual_c = residual.to(at::kFloat).contiguous();
  const Tensor states_c = states.to(at::kFloat).contiguous();
  const Tensor weight_final_c = weight_final.to(u.weight.scalar_type()).contiguous();
  const Tensor grad_weight_final_c = grad_weight_final.to(u.weight.scalar_type()).contiguous();
  optional<Tensor> grad_bias_final_c, grad_readout_c;
  if (bias.has_value() && grad_bias_final.has_value())
    grad_bias_final_c = grad_bias_final->to(u.weight.scalar_type()).contiguous();
  if (queries.has_value() && grad_readout.has_value())
    grad_readout_c = grad_readout->to(u.weight.scalar_type()).contiguous();

  metakernels::UnrollBackwardArgs<void> args;
  args.residual = residual_c.data_ptr();
  args.states = states_c.dim() == 4 ? states_c.data_ptr() : nullptr;
  args.weight_final = weight_final_c.data_ptr();
  args.grad_weight_final = grad_weight_final_c.data_ptr();
  args.grad_bias_final = ptr_or_null<void>(grad_bias_final_c);
  args.grad_readout = ptr_or_null<void>(grad_readout_c);
  args.first_order = first_order;
  args.grad_weight = out_ptr_or_null<void>(grad_weight);
  args.grad_bias = out_ptr_or_null<void>(grad_bias);
  args.grad_x = out_ptr_or_null<void>(grad_x);
  args.grad_y = out_ptr_or_null<void>(grad_y);
  args.grad_lr = out_ptr_or_null<void>(grad_lr);
  args.grad_lr_scale = out_ptr_or_null<void>(grad_lr_scale);
  args.grad_bias_lr_scale = out_ptr_or_null<void>(grad_bias_lr_scale);
  args.grad_queries = out_ptr_or_null<void>(grad_queries);
  const auto in = u.inputs<void>();
  run_kernel(weight, [&](cudaStream_t stream) {
    metakernels::cuda::unroll_backward(dtype_of(u.weight), d, in, args, stream);
  });

  // Shared inputs get the sum over tasks of their per-task gradients (in float32), then every
  // gradient takes weight's dtype.
  if (wanted[0] && weight.dim() == 2) grad_weight = grad_weight.sum(0);
  if (wanted[4] && bias->dim() == 1) grad_bias = grad_bias.sum(0);
  if (wanted[5]) grad_lr_scale = grad_lr_scale.sum(0);
  if (wanted[6]) grad_bias_lr_scale = grad_bias_lr_scale.sum(0);
  std::vector<Tensor> grads = {grad_weight, grad_x, grad_y, grad_lr, grad_bias, grad_lr_scale,
                               grad_bias_lr_scale, grad_queries};
  for (Tensor& g : grads) g = g.to(u.weight.scalar_type());
  return grads;
}

std::vector<Tensor> linear_hvp(const Tensor& weight_, const Tensor& x_, const Tensor& v_,
                               const optional<Tensor>& bias_, const optional<Tensor>& v_bias_,
                               int64_t loss, bool with_bias) {
  check_cuda(weight_, "weight");
  const c10::cuda::CUDAGuard guard(weight_.device());
  const Tensor weight = weight_.contiguous(), x = x_.contiguous(), v = v_.contiguous();
  check_cuda(weight, "weight");
  check_cuda(x, "x");
  check_cuda(v, "v");
  const optional<Tensor> bias = contiguous_or_none(bias_), v_bias = contiguous_or_none(v_bias_);
  const int64_t tasks = x.size(0), d_in = weight.size(-2), d_out = weight.size(-1);
  const auto opts = weight.options();
  Tensor hv_weight = new_output({tasks, d_in, d_out}, opts);
  Tensor hv_bias = with_bias ? new_output({tasks, d_out}, opts) : no_output(weight);
  metakernels::HvpArgs<void> args;
  args.tasks = tasks;
  args.support = x.size(1);
  args.d_in = d_in;
  args.d_out = d_out;
  args.loss = loss == 1 ? Loss::kCrossEntropy : Loss::kMse;
  args.weight = weight.data_ptr();
  args.weight_task_stride = task_stride(weight, 3);
  args.bias = ptr_or_null<void>(bias);
  args.bias_task_stride = bias.has_value() ? task_stride(*bias, 2) : 0;
  args.x = x.data_ptr();
  args.v = v.data_ptr();
  args.v_bias = ptr_or_null<void>(v_bias);
  args.v_bias_task_stride = v_bias.has_value() ? task_stride(*v_bias, 2) : 0;
  args.hv_weight = out_ptr_or_null<void>(hv_weight);
  args.hv_bias = out_ptr_or_null<void>(hv_bias);
  run_kernel(weight, [&](cudaStream_t stream) {
    metakernels::cuda::linear_hvp(dtype_of(weight), args, stream);
  });
  return {hv_weight, hv_bias};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "metakernels CUDA kernels (eager bodies of the metakernels:: custom ops, backend='cuda')";
  // As in binding.cpp: no Python object is touched, so other Python threads run meanwhile.
  const auto without_gil = pybind11::call_guard<pybind11::gil_scoped_release>();
  m.def("unroll_forward", &unroll_forward, without_gil);
  m.def("unroll_backward", &unroll_backward, without_gil);
  m.def("linear_hvp", &linear_hvp, without_gil);
  m.def("set_mma_enabled", &metakernels::cuda::set_mma_enabled,
        "Use the tensor-core kernels where the shape allows (True, the default unless "
        "METAKERNELS_CUDA_MMA=0) or always the FMA kernels (False).");
  m.def("mma_enabled", &metakernels::cuda::mma_enabled);
  m.def("set_mma_splits", &metakernels::cuda::set_mma_splits,
        "CTAs per task over d_out on the tensor-core path (0: automatic); for tuning.");
  m.def("mma_launches", &metakernels::cuda::mma_launches,
        "How many tensor-core kernels this process has launched (tests check the path taken).");
  m.def("set_poison_outputs", [](bool poison) { poison_outputs() = poison; },
        "Fill every output with NaN before the kernels write it (for tests).");
}
