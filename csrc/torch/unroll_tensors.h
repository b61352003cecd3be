// What the CPU binding (binding.cpp) and the CUDA binding (binding_cuda.cpp) share: output
// allocation (NaN-poisoned for tests), and the tensors of a fast_weight_unroll call turned into
// the kernels' sizes, pointers and strides (metakernels/fast_weight.h). metakernels/ops/ checked
// every argument; nothing here checks again. Each extension module compiles its own copy.
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <limits>
#include <type_traits>

#include "metakernels/fast_weight.h"

namespace metakernels_torch {

using at::Tensor;
using c10::optional;

// Tests set this (set_poison_outputs) so every output starts as NaN: an element a kernel forgets
// to write shows up.
inline bool& poison_outputs() {
  static bool poison = false;
  return poison;
}

inline Tensor new_output(at::IntArrayRef shape, const at::TensorOptions& options) {
  return poison_outputs() ? at::full(shape, std::numeric_limits<double>::quiet_NaN(), options)
                          : at::empty(shape, options);
}

inline Tensor no_output(const Tensor& like) { return at::empty({0}, like.options()); }

// A typed data pointer, or the untyped one for T = void (the CUDA kernels take every dtype
// through void pointers).
template <typename T>
T* data(const Tensor& t) {
  if constexpr (std::is_void_v<T>) {
    return t.data_ptr();
  } else {
    return t.data_ptr<T>();
  }
}

template <typename T>
const T* ptr_or_null(const optional<Tensor>& t) {
  return t.has_value() ? data<T>(*t) : nullptr;
}

template <typename T>
T* out_ptr_or_null(const Tensor& t) {
  return t.defined() && t.numel() > 0 ? data<T>(t) : nullptr;
}

inline optional<Tensor> contiguous_or_none(const optional<Tensor>& t) {
  if (!t.has_value()) return c10::nullopt;
  return t->contiguous();
}

// x and y as the kernels read them: each task's block dense, the tasks at any stride (their
// stride is passed on), so that a slice of steps x[:, start:stop] (checkpointed segments) is
// read in place instead of copied.
inline Tensor tasks_strided(const Tensor& t) {
  if (t.dim() >= 2 && t.size(0) > 0 && t.select(0, 0).is_contiguous()) return t;
  return t.contiguous();
}

// A shared [d_in, d_out] / [d_out] tensor has task stride 0; a per-task one, its matrix size.
inline int64_t task_stride(const Tensor& t, int64_t per_task_dim) {
  return t.dim() == per_task_dim ? t.stride(0) : 0;
}

// The tensors of one fast_weight_unroll call, laid out for the kernels. x and y keep their task
// stride where strided_tasks is set (see tasks_strided); every other input is made contiguous.
struct Unroll {
  metakernels::UnrollDims dims;
  Tensor weight, x, targets, lr;
  optional<Tensor> bias, lr_scale, bias_lr_scale, queries;
  bool x_per_step = false;

  Unroll(const Tensor& weight_, const Tensor& x_, const Tensor& targets_, const Tensor& lr_,
         const optional<Tensor>& bias_, const optional<Tensor>& lr_scale_,
         const optional<Tensor>& bias_lr_scale_, const optional<Tensor>& queries_, int64_t loss,
         bool strided_tasks)
      : weight(weight_.contiguous()),
        x(strided_tasks ? tasks_strided(x_) : x_.contiguous()),
        targets(strided_tasks ? tasks_strided(targets_) : targets_.contiguous()),
        lr(lr_.contiguous()),
        bias(contiguous_or_none(bias_)),
        lr_scale(contiguous_or_none(lr_scale_)),
        bias_lr_scale(contiguous_or_none(bias_lr_scale_)),
        queries(contiguous_or_none(queries_)) {
    x_per_step = x.dim() == 4;
    dims.tasks = x.size(0);
    dims.steps = lr.size(1);
    dims.support = x.size(-2);
    dims.d_in = weight.size(-2);
    dims.d_out = weight.size(-1);
    dims.queries = queries.has_value() ? queries->size(2) : 0;
    dims.loss = loss == 1 ? metakernels::Loss::kCrossEntropy : metakernels::Loss::kMse;
  }

  // T: the element type of the floating inputs, or void for untyped pointers.
  template <typename T>
  metakernels::UnrollInputs<T> inputs() const {
    metakernels::UnrollInputs<T> in;
    in.weight = data<T>(weight);
    in.weight_task_stride = task_stride(weight, 3);
    in.bias = ptr_or_null<T>(bias);
    in.bias_task_stride = bias.has_value() ? task_stride(*bias, 2) : 0;
    in.x = data<T>(x);
    in.x_task_stride = x.stride(0);
    // A 4-D x of one step may have step stride 0 (a size-1 dimension sliced from an expanded
    // one, e.g. a checkpointed segment): the kernels read step stride 0 as 3-D x, so it gets
    // a nonzero one (only step 0 is read). Likewise for y.
    in.x_step_stride = x_per_step ? std::max<int64_t>(x.stride(1), 1) : 0;
    if (dims.loss == metakernels::Loss::kMse) {
      in.y = data<T>(targets);
      in.y_task_stride = targets.stride(0);
      in.y_step_stride = x_per_step ? std::max<int64_t>(targets.stride(1), 1) : 0;
    } else {
      in.labels = targets.data_ptr<int64_t>();
      in.labels_task_stride = targets.stride(0);
      in.labels_step_stride = x_per_step ? std::max<int64_t>(targets.stride(1), 1) : 0;
    }
    in.lr = data<T>(lr);
    in.lr_scale = ptr_or_null<T>(lr_scale);
    in.bias_lr_scale = ptr_or_null<T>(bias_lr_scale);
    in.queries = ptr_or_null<T>(queries);
    return in;
  }
};

}  // namespace metakernels_torch
