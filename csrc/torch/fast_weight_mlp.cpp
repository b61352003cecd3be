// fast_weight_mlp_unroll / fast_weight_mlp_meta_loss on the CPU: tensors -> the kernels of
// metakernels/fast_weight_mlp.h, one parallel pass over tasks each way. The functions and their
// arguments are the backend interface declared in metakernels/_C.pyi (mlp_forward,
// mlp_backward); metakernels/ops/fast_weight_mlp.py checked and normalised every argument and
// owns autograd. Registered into metakernels._C by binding.cpp.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <vector>

#include "metakernels/fast_weight_mlp.h"
#include "unroll_tensors.h"

namespace {

using at::Tensor;
using c10::optional;
using namespace metakernels_torch;

constexpr int64_t kGrainTasks = 1;

std::vector<Tensor> dense(const std::vector<Tensor>& tensors) {
  std::vector<Tensor> out;
  for (const auto& t : tensors) out.push_back(t.contiguous());
  return out;
}

template <typename T>
std::vector<const T*> const_ptrs(const std::vector<Tensor>& tensors) {
  std::vector<const T*> out;
  for (const auto& t : tensors) out.push_back(t.data_ptr<T>());
  return out;
}

template <typename T>
std::vector<T*> mut_ptrs(const std::vector<Tensor>& tensors) {
  std::vector<T*> out;
  for (const auto& t : tensors) out.push_back(t.numel() > 0 ? t.data_ptr<T>() : nullptr);
  return out;
}

// The tensors of one call, dense, and the kernels' sizes.
struct Mlp {
  std::vector<Tensor> weights, biases, lr_scale;
  Tensor x, targets, lr;
  optional<Tensor> queries, query_y;
  std::vector<int64_t> widths;
  metakernels::MlpDims dims;

  Mlp(const std::vector<Tensor>& weights_, const std::vector<Tensor>& biases_, const Tensor& x_,
      const Tensor& targets_, const Tensor& lr_, const std::vector<Tensor>& lr_scale_,
      const optional<Tensor>& queries_, const optional<Tensor>& query_y_, int64_t activation,
      int64_t loss, int64_t stride)
      : weights(dense(weights_)),
        biases(dense(biases_)),
        lr_scale(dense(lr_scale_)),
        x(x_.contiguous()),
        targets(targets_.contiguous()),
        lr(lr_.contiguous()),
        queries(contiguous_or_none(queries_)),
        query_y(contiguous_or_none(query_y_)) {
    widths.push_back(weights[0].size(-2));
    for (const auto& w : weights) widths.push_back(w.size(-1));
    dims.tasks = x.size(0);
    dims.steps = lr.size(1);
    dims.support = x.size(-2);
    dims.layers = static_cast<int64_t>(weights.size());
    dims.widths = widths.data();
    dims.bias = !biases.empty();
    dims.x_per_step = x.dim() == 4;
    dims.query_rows = queries.has_value() ? queries->size(-2) : 0;
    dims.query_per_step = queries.has_value() && queries->dim() == 4;
    dims.meta_loss = query_y.has_value();
    dims.loss = loss == 1 ? metakernels::Loss::kCrossEntropy : metakernels::Loss::kMse;
    dims.activation = static_cast<metakernels::Activation>(activation);
    dims.stride = stride;
  }

  template <typename T>
  struct Pointers {
    std::vector<const T*> weights, biases, lr_scale;
    metakernels::MlpInputs<T> in;
  };

  // The input pointers (the vectors own the pointer arrays `in` points into).
  template <typename T>
  void fill(Pointers<T>& p) const {
    p.weights = const_ptrs<T>(weights);
    p.biases = const_ptrs<T>(biases);
    p.lr_scale = const_ptrs<T>(lr_scale);
    auto& in = p.in;
    in.weights = p.weights.data();
    in.biases = biases.empty() ? nullptr : p.biases.data();
    in.lr_scale = lr_scale.empty() ? nullptr : p.lr_scale.data();
    in.x = x.data_ptr<T>();
    if (dims.loss == metakernels::Loss::kMse)
      in.y = targets.data_ptr<T>();
    else
      in.labels = targets.data_ptr<int64_t>();
    in.lr = lr.data_ptr<T>();
    in.queries = ptr_or_null<T>(queries);
    if (query_y.has_value()) {
      if (dims.loss == metakernels::Loss::kMse)
        in.query_y = query_y->data_ptr<T>();
      else
        in.query_labels = query_y->data_ptr<int64_t>();
    }
  }
};

std::vector<Tensor> mlp_forward(const std::vector<Tensor>& weights_,
                                const std::vector<Tensor>& biases_, const Tensor& x,
                                const Tensor& targets, const Tensor& lr,
                                const std::vector<Tensor>& lr_scale_,
                                const optional<Tensor>& queries, const optional<Tensor>& query_y,
                                int64_t activation, int64_t loss, int64_t stride) {
  const Mlp u(weights_, biases_, x, targets, lr, lr_scale_, queries, query_y, activation, loss,
              stride);
  const auto& d = u.dims;
  const auto opts = u.weights[0].options();
  const int64_t L = d.layers, dl = u.widths[L];
  Tensor losses = new_output({d.tasks, d.steps}, opts);
  Tensor out = no_output(u.weights[0]);
  if (d.meta_loss)
    out = new_output({d.tasks}, opts);
  else if (d.query_rows > 0)
    out = new_output({d.tasks, d.steps, d.query_rows, dl}, opts);
  const int64_t kept = stride > 0 ? (d.steps + stride - 1) / stride : 0;
  Tensor states = stride > 0 ? new_output({d.tasks, kept, metakernels::mlp_param_count(d)}, opts)
                             : no_output(u.weights[0]);
  std::vector<Tensor> weights_t, biases_t;
  for (int64_t l = 0; l < L; ++l) {
    weights_t.push_back(new_output({d.tasks, u.widths[l], u.widths[l + 1]}, opts));
    if (d.bias) biases_t.push_back(new_output({d.tasks, u.widths[l + 1]}, opts));
  }
  AT_DISPATCH_FLOATING_TYPES(u.weights[0].scalar_type(), "fast_weight_mlp_forward", [&] {
    Mlp::Pointers<scalar_t> p;
    u.fill(p);
    auto w_out = mut_ptrs<scalar_t>(weights_t);
    auto b_out = mut_ptrs<scalar_t>(biases_t);
    metakernels::MlpForwardOutputs<scalar_t> o;
    o.losses = losses.data_ptr<scalar_t>();
    o.readout = d.meta_loss ? nullptr : out_ptr_or_null<scalar_t>(out);
    o.task_loss = d.meta_loss ? out.data_ptr<scalar_t>() : nullptr;
    o.states = out_ptr_or_null<scalar_t>(states);
    o.weights_final = w_out.data();
    o.biases_final = d.bias ? b_out.data() : nullptr;
    at::parallel_for(0, d.tasks, kGrainTasks, [&](int64_t begin, int64_t end) {
      metakernels::fast_weight_mlp_forward<scalar_t>(d, p.in, o, begin, end);
    });
  });
  std::vector<Tensor> result{losses, out, states};
  result.insert(result.end(), weights_t.begin(), weights_t.end());
  result.insert(result.end(), biases_t.begin(), biases_t.end());
  return result;
}

std::vector<Tensor> mlp_backward(
    const std::vector<Tensor>& weights_, const std::vector<Tensor>& biases_, const Tensor& x,
    const Tensor& targets, const Tensor& lr, const std::vector<Tensor>& lr_scale_,
    const optional<Tensor>& queries, const optional<Tensor>& query_y, const Tensor& states_,
    const std::vector<Tensor>& weights_final_, const std::vector<Tensor>& biases_final_,
    const std::vector<Tensor>& grad_weights_final_, const std::vector<Tensor>& grad_biases_final_,
    const optional<Tensor>& grad_out_, int64_t activation, int64_t loss, int64_t stride,
    bool first_order, std::vector<bool> wanted) {
  TORCH_CHECK(wanted.size() == 8, "metakernels internal error: mlp_backward takes 8 flags");
  TORCH_CHECK(stride > 0, "metakernels internal error: mlp_backward needs the kept states");
  const Mlp u(weights_, biases_, x, targets, lr, lr_scale_, queries, query_y, activation, loss,
              stride);
  const auto& d = u.dims;
  const auto opts = u.weights[0].options();
  const int64_t L = d.layers;
  const Tensor states = states_.contiguous();
  const auto weights_final = dense(weights_final_), biases_final = dense(biases_final_);
  const auto grad_weights_final = dense(grad_weights_final_);
  const auto grad_biases_final = dense(grad_biases_final_);
  const optional<Tensor> grad_out = contiguous_or_none(grad_out_);
  auto maybe = [&](bool need, at::IntArrayRef shape) {
    return need ? new_output(shape, opts) : no_output(u.weights[0]);
  };
  const bool has_queries = queries.has_value(), has_query_y = query_y.has_value();
  Tensor grad_x = maybe(wanted[2], u.x.sizes());
  Tensor grad_y = maybe(wanted[3] && d.loss == metakernels::Loss::kMse, u.targets.sizes());
  Tensor grad_lr = maybe(wanted[4], {d.tasks, d.steps});
  Tensor grad_queries = wanted[6] && has_queries ? new_output(u.queries->sizes(), opts)
                                                 : no_output(u.weights[0]);
  Tensor grad_query_y = wanted[7] && has_query_y && d.loss == metakernels::Loss::kMse
                            ? new_output(u.query_y->sizes(), opts)
                            : no_output(u.weights[0]);
  std::vector<Tensor> grad_weights, grad_biases, grad_lr_scale;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t din = u.widths[l], dout = u.widths[l + 1];
    grad_weights.push_back(maybe(wanted[0], {d.tasks, din, dout}));
    grad_biases.push_back(maybe(wanted[1] && d.bias, {d.tasks, dout}));
    grad_lr_scale.push_back(maybe(wanted[5] && !u.lr_scale.empty(), {d.tasks, din, dout}));
  }
  AT_DISPATCH_FLOATING_TYPES(u.weights[0].scalar_type(), "fast_weight_mlp_backward", [&] {
    Mlp::Pointers<scalar_t> p;
    u.fill(p);
    auto wf = const_ptrs<scalar_t>(weights_final), bf = const_ptrs<scalar_t>(biases_final);
    auto gwf = const_ptrs<scalar_t>(grad_weights_final);
    auto gbf = const_ptrs<scalar_t>(grad_biases_final);
    auto gw = mut_ptrs<scalar_t>(grad_weights), gb = mut_ptrs<scalar_t>(grad_biases);
    auto gs = mut_ptrs<scalar_t>(grad_lr_scale);
    metakernels::MlpBackwardArgs<scalar_t> a;
    a.states = states.data_ptr<scalar_t>();
    a.weights_final = wf.data();
    a.biases_final = d.bias ? bf.data() : nullptr;
    a.grad_weights_final = grad_weights_final.empty() ? nullptr : gwf.data();
    a.grad_biases_final = d.bias && !grad_biases_final.empty() ? gbf.data() : nullptr;
    a.grad_out = ptr_or_null<scalar_t>(grad_out);
    a.first_order = first_order;
    a.grad_x = out_ptr_or_null<scalar_t>(grad_x);
    a.grad_y = out_ptr_or_null<scalar_t>(grad_y);
    a.grad_lr = out_ptr_or_null<scalar_t>(grad_lr);
    a.grad_queries = out_ptr_or_null<scalar_t>(grad_queries);
    a.grad_query_y = out_ptr_or_null<scalar_t>(grad_query_y);
    a.grad_weights = wanted[0] ? gw.data() : nullptr;
    a.grad_biases = wanted[1] && d.bias ? gb.data() : nullptr;
    a.grad_lr_scale = wanted[5] && !u.lr_scale.empty() ? gs.data() : nullptr;
    at::parallel_for(0, d.tasks, kGrainTasks, [&](int64_t begin, int64_t end) {
      metakernels::fast_weight_mlp_backward<scalar_t>(d, p.in, a, begin, end);
    });
  });
  // Meta-SGD's scales are shared: the sum over tasks.
  for (auto& g : grad_lr_scale)
    if (g.dim() == 3) g = g.sum(0);
  std::vector<Tensor> result{grad_x, grad_y, grad_lr, grad_queries, grad_query_y};
  result.insert(result.end(), grad_weights.begin(), grad_weights.end());
  result.insert(result.end(), grad_biases.begin(), grad_biases.end());
  result.insert(result.end(), grad_lr_scale.begin(), grad_lr_scale.end());
  return result;
}

}  // namespace

void register_fast_weight_mlp(pybind11::module& m) {
  const auto without_gil = pybind11::call_guard<pybind11::gil_scoped_release>();
  m.def("mlp_forward", &mlp_forward, without_gil,
        "fast_weight_mlp_unroll / _meta_loss forward (metakernels/_C.pyi)");
  m.def("mlp_backward", &mlp_backward, without_gil,
        "fast_weight_mlp_unroll / _meta_loss backward (metakernels/_C.pyi)");
}
