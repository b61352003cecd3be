// The one file that knows torch: tensors in, raw pointers to the kernels, tensors out.
//
// metakernels/ops/ checked every argument against SPEC.md before calling here, and the Python
// custom ops (torch.library) own autograd and the fake (meta) implementations; this module is the
// eager CPU body of those ops. Work is split over tasks with at::parallel_for, so it follows
// torch.set_num_threads.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <string>
#include <vector>

#include "metakernels/fast_weight.h"
#include "metakernels/fast_weight_chunked.h"
#include "unroll_tensors.h"

namespace {

using at::Tensor;
using c10::optional;
using metakernels::Loss;
using namespace metakernels_torch;

constexpr int64_t kGrainTasks = 1;

// Which algorithm runs (the decision is here, not in Python: the Gram path's condition on
// bias_lr_scale reads its values, which metakernels/ops does not do so that torch.compile traces
// it without a graph break). The forward takes the Gram path only when no W_t is to be stored
// (storing them costs the step loop's work anyway); the backward whenever it applies, since it
// needs no W_t, except for bias_lr_scale's gradient, which the step loop computes.
template <typename T>
bool forward_runs_gram(const metakernels::UnrollDims& d, const metakernels::UnrollInputs<T>& in,
                       bool store_states) {
  return !store_states && d.tasks > 0 && metakernels::unroll_gram_applies(d, in);
}

template <typename T>
bool backward_runs_gram(const metakernels::UnrollDims& d, const metakernels::UnrollInputs<T>& in,
                        bool grad_bias_lr_scale) {
  return !grad_bias_lr_scale && d.tasks > 0 && metakernels::unroll_gram_applies(d, in);
}

// The chunked path (mse, 4-D x; metakernels/fast_weight_chunked.h) likewise: the forward where
// no W_t is to be stored, the backward (which never reads W_t) unless bias_lr_scale's gradient
// is wanted. Chunks of chunked_chunk_steps(n) steps. The knobs (set_chunked_knobs): force the
// path on (1) or off (0) instead of unroll_chunked_cheaper (-1), and the rows of a chunk.
struct ChunkedKnobs {
  int64_t force = -1, rows = 32;
};
ChunkedKnobs& chunked_knobs() {
  static ChunkedKnobs knobs;
  return knobs;
}

bool chunked_expected(int64_t steps, int64_t n, int64_t d_in, int64_t d_out, int64_t m,
                      bool wants_states) {
  const auto& k = chunked_knobs();
  return k.force >= 0 ? k.force == 1
                      : metakernels::unroll_chunked_cheaper(steps, n, d_in, d_out, m, wants_states);
}

template <typename T>
bool runs_chunked(const metakernels::UnrollDims& d, const metakernels::UnrollInputs<T>& in,
                  bool wants_states) {
  return d.tasks > 0 && metakernels::unroll_chunked_exact(d, in) &&
         chunked_expected(d.steps, d.support, d.d_in, d.d_out, in.queries ? d.queries : 0,
                          wants_states);
}

int64_t chunk_steps(int64_t n) { return metakernels::chunked_chunk_steps(n, chunked_knobs().rows); }

template <typename T>
bool forward_runs_chunked(const metakernels::UnrollDims& d,
                          const metakernels::UnrollInputs<T>& in, bool store_states) {
  return !store_states && runs_chunked(d, in, false);
}

template <typename T>
bool backward_runs_chunked(const metakernels::UnrollDims& d,
                           const metakernels::UnrollInputs<T>& in, bool grad_bias_lr_scale,
                           bool wants_states) {
  return !grad_bias_lr_scale && runs_chunked(d, in, wants_states);
}

// "gram" or "steps" for the forward and the backward of a call with these arguments, as
// "forward/backward" when they differ ("steps/gram").
std::string unroll_path(const Tensor& weight, const Tensor& x, const Tensor& targets,
                        const Tensor& lr, const optional<Tensor>& bias,
                        const optional<Tensor>& lr_scale, const optional<Tensor>& bias_lr_scale,
                        const optional<Tensor>& queries, int64_t loss, bool store_states,
                        bool grad_bias_lr_scale, bool wants_states) {
  const Unroll u(weight, x, targets, lr, bias, lr_scale, bias_lr_scale, queries, loss,
                 /*strided_tasks=*/true);
  std::string forward, backward;
  AT_DISPATCH_FLOATING_TYPES(u.weight.scalar_type(), "unroll_path", [&] {
    const auto in = u.inputs<scalar_t>();
    forward = forward_runs_gram(u.dims, in, store_states)      ? "gram"
              : forward_runs_chunked(u.dims, in, store_states) ? "chunked"
                                                               : "steps";
    backward = backward_runs_gram(u.dims, in, grad_bias_lr_scale)      ? "gram"
               : backward_runs_chunked(u.dims, in, grad_bias_lr_scale, wants_states) ? "chunked"
                                                                       : "steps";
  });
  return forward == backward ? forward : forward + "/" + backward;
}

std::vector<Tensor> unroll_forward(const Tensor& weight, const Tensor& x, const Tensor& targets,
                                   const Tensor& lr, const optional<Tensor>& bias,
                                   const optional<Tensor>& lr_scale,
                                   const optional<Tensor>& bias_lr_scale,
                                   const optional<Tensor>& queries, int64_t loss,
                                   bool store_states) {
  const Unroll u(weight, x, targets, lr, bias, lr_scale, bias_lr_scale, queries, loss,
                 /*strided_tasks=*/true);
  const auto& d = u.dims;
  const auto opts = u.weight.options();
  Tensor weight_out = new_output({d.tasks, d.d_in, d.d_out}, opts);
  Tensor bias_out = bias.has_value() ? new_output({d.tasks, d.d_out}, opts) : no_output(u.weight);
  Tensor losses = new_output({d.tasks, d.steps}, opts);
  Tensor readout = queries.has_value() ? new_output({d.tasks, d.steps, d.queries, d.d_out}, opts)
                                       : no_output(u.weight);
  Tensor residual = new_output({d.tasks, d.steps, d.support, d.d_out}, opts);
  Tensor states = store_states ? new_output({d.tasks, d.steps, d.d_in, d.d_out}, opts)
                               : no_output(u.weight);
  AT_DISPATCH_FLOATING_TYPES(u.weight.scalar_type(), "fast_weight_unroll_forward", [&] {
    const auto in = u.inputs<scalar_t>();
    metakernels::UnrollForwardOutputs<scalar_t> out;
    out.weight = weight_out.data_ptr<scalar_t>();
    out.bias = out_ptr_or_null<scalar_t>(bias_out);
    out.losses = losses.data_ptr<scalar_t>();
    out.readout = out_ptr_or_null<scalar_t>(readout);
    out.residual = residual.data_ptr<scalar_t>();
    out.states = out_ptr_or_null<scalar_t>(states);
    const bool gram = forward_runs_gram(d, in, store_states);
    const bool chunked = !gram && forward_runs_chunked(d, in, store_states);
    at::parallel_for(0, d.tasks, kGrainTasks, [&](int64_t begin, int64_t end) {
      if (gram)
        metakernels::fast_weight_unroll_gram_forward<scalar_t>(d, in, out, begin, end);
      else if (chunked)
        metakernels::fast_weight_unroll_chunked_forward<scalar_t>(
            d, in, out, chunk_steps(d.support), begin, end);
      else
        metakernels::fast_weight_unroll_forward<scalar_t>(d, in, out, begin, end);
    });
  });
  return {weight_out, bias_out, losses, readout, residual, states};
}

// wanted: which gradients to compute, in the order weight, x, y, lr, bias, lr_scale,
// bias_lr_scale, queries; metakernels/ops decided them (inputs that are absent or get no gradient
// in first order are never wanted). Returns them in that order, each empty where not wanted,
// shared inputs summed over tasks.
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
  const Unroll u(weight, x, targets, lr, bias, lr_scale, bias_lr_scale, queries, loss,
                 /*strided_tasks=*/true);
  const auto& d = u.dims;
  const auto opts = u.weight.options();
  const bool wants_states = (wanted[1] && !first_order) || wanted[7];
  bool states_needed = wants_states;
  AT_DISPATCH_FLOATING_TYPES(u.weight.scalar_type(), "unroll_backward_path", [&] {
    if (backward_runs_chunked(d, u.inputs<scalar_t>(), wanted[6], wants_states))
      states_needed = false;
  });
  TORCH_CHECK(!states_needed || states.dim() == 4,
              "metakernels internal error: the backward needs the stored fast weights");
  auto maybe = [&](bool need, at::IntArrayRef shape) {
    return need ? new_output(shape, opts) : no_output(u.weight);
  };
  Tensor grad_weight = maybe(wanted[0] && weight.dim() == 3, {d.tasks, d.d_in, d.d_out});
  Tensor grad_x = maybe(wanted[1], u.x.sizes());
  Tensor grad_y = maybe(wanted[2], u.targets.sizes());
  Tensor grad_lr = maybe(wanted[3], {d.tasks, d.steps});
  Tensor grad_bias = maybe(wanted[4], {d.tasks, d.d_out});
  Tensor grad_lr_scale = maybe(wanted[5], {d.tasks, d.d_in, d.d_out});
  Tensor grad_bias_lr_scale = maybe(wanted[6], {d.tasks, d.d_out});
  Tensor grad_queries = maybe(wanted[7], {d.tasks, d.steps, d.queries, d.d_in});
  const Tensor residual_c = residual.contiguous();
  const Tensor states_c = states.contiguous();
  const Tensor weight_final_c = weight_final.contiguous();
  const Tensor grad_weight_final_c = grad_weight_final.contiguous();
  const optional<Tensor> grad_bias_final_c = contiguous_or_none(grad_bias_final);
  const optional<Tensor> grad_readout_c = contiguous_or_none(grad_readout);
  bool sum_per_thread = false;
  AT_DISPATCH_FLOATING_TYPES(u.weight.scalar_type(), "fast_weight_unroll_backward", [&] {
    const auto in = u.inputs<scalar_t>();
    metakernels::UnrollBackwardArgs<scalar_t> args;
    args.residual = residual_c.data_ptr<scalar_t>();
    args.states = out_ptr_or_null<scalar_t>(states_c);
    args.weight_final = weight_final_c.data_ptr<scalar_t>();
    args.grad_weight_final = grad_weight_final_c.data_ptr<scalar_t>();
    args.grad_bias_final = bias.has_value() ? ptr_or_null<scalar_t>(grad_bias_final_c) : nullptr;
    args.grad_readout = queries.has_value() ? ptr_or_null<scalar_t>(grad_readout_c) : nullptr;
    args.first_order = first_order;
    args.grad_weight = out_ptr_or_null<scalar_t>(grad_weight);
    args.grad_bias = out_ptr_or_null<scalar_t>(grad_bias);
    args.grad_x = out_ptr_or_null<scalar_t>(grad_x);
    args.grad_y = out_ptr_or_null<scalar_t>(grad_y);
    args.grad_lr = out_ptr_or_null<scalar_t>(grad_lr);
    args.grad_lr_scale = out_ptr_or_null<scalar_t>(grad_lr_scale);
    args.grad_bias_lr_scale = out_ptr_or_null<scalar_t>(grad_bias_lr_scale);
    args.grad_queries = out_ptr_or_null<scalar_t>(grad_queries);
    const bool gram = backward_runs_gram(d, in, wanted[6]);
    const bool chunked = !gram && backward_runs_chunked(d, in, wanted[6], wants_states);
    // A shared init on the Gram path: each thread sums its tasks' gradients into its own
    // [d_in, d_out] slot, instead of every task writing [d_in, d_out] to be reduced after.
    sum_per_thread = gram && wanted[0] && weight.dim() == 2;
    if (sum_per_thread) {
      grad_weight = at::zeros({at::get_num_threads(), d.d_in, d.d_out}, opts);
    } else if (wanted[0] && weight.dim() == 2) {
      grad_weight = new_output({d.tasks, d.d_in, d.d_out}, opts);
      args.grad_weight = grad_weight.data_ptr<scalar_t>();
    }
    at::parallel_for(0, d.tasks, kGrainTasks, [&](int64_t begin, int64_t end) {
      if (gram && sum_per_thread) {
        auto mine = args;
        mine.grad_weight =
            grad_weight.data_ptr<scalar_t>() + at::get_thread_num() * d.d_in * d.d_out;
        mine.sum_grad_weight = true;
        metakernels::fast_weight_unroll_gram_backward<scalar_t>(d, in, mine, begin, end);
      } else if (gram)
        metakernels::fast_weight_unroll_gram_backward<scalar_t>(d, in, args, begin, end);
      else if (chunked)
        metakernels::fast_weight_unroll_chunked_backward<scalar_t>(
            d, in, args, chunk_steps(d.support), begin, end);
      else
        metakernels::fast_weight_unroll_backward<scalar_t>(d, in, args, begin, end);
    });
  });
  // Shared inputs get the sum over tasks of their per-task gradients.
  if (wanted[0] && weight.dim() == 2) grad_weight = grad_weight.sum(0);
  if (wanted[4] && bias->dim() == 1) grad_bias = grad_bias.sum(0);
  if (wanted[5]) grad_lr_scale = grad_lr_scale.sum(0);
  if (wanted[6]) grad_bias_lr_scale = grad_bias_lr_scale.sum(0);
  return {grad_weight, grad_x, grad_y, grad_lr, grad_bias, grad_lr_scale, grad_bias_lr_scale,
          grad_queries};
}

std::vector<Tensor> linear_hvp(const Tensor& weight_, const Tensor& x_, const Tensor& v_,
                               const optional<Tensor>& bias_, const optional<Tensor>& v_bias_,
                               int64_t loss, bool with_bias) {
  const Tensor weight = weight_.contiguous(), x = x_.contiguous(), v = v_.contiguous();
  const optional<Tensor> bias = contiguous_or_none(bias_), v_bias = contiguous_or_none(v_bias_);
  const int64_t tasks = x.size(0), d_in = weight.size(-2), d_out = weight.size(-1);
  const auto opts = weight.options();
  Tensor hv_weight = new_output({tasks, d_in, d_out}, opts);
  Tensor hv_bias = with_bias ? new_output({tasks, d_out}, opts) : no_output(weight);
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "linear_hvp", [&] {
    metakernels::HvpArgs<scalar_t> args;
    args.tasks = tasks;
    args.support = x.size(1);
    args.d_in = d_in;
    args.d_out = d_out;
    args.loss = loss == 1 ? Loss::kCrossEntropy : Loss::kMse;
    args.weight = weight.data_ptr<scalar_t>();
    args.weight_task_stride = task_stride(weight, 3);
    args.bias = ptr_or_null<scalar_t>(bias);
    args.bias_task_stride = bias.has_value() ? task_stride(*bias, 2) : 0;
    args.x = x.data_ptr<scalar_t>();
    args.v = v.data_ptr<scalar_t>();
    args.v_bias = ptr_or_null<scalar_t>(v_bias);
    args.v_bias_task_stride = v_bias.has_value() ? task_stride(*v_bias, 2) : 0;
    args.hv_weight = hv_weight.data_ptr<scalar_t>();
    args.hv_bias = out_ptr_or_null<scalar_t>(hv_bias);
    at::parallel_for(0, tasks, kGrainTasks, [&](int64_t begin, int64_t end) {
      metakernels::linear_hvp_forward<scalar_t>(args, begin, end);
    });
  });
  return {hv_weight, hv_bias};
}

}  // namespace

// fast_weight_meta_loss's kernels (meta_loss.cpp).
void register_meta_loss(pybind11::module& m);
// The MLP fast-weight kernels (fast_weight_mlp.cpp).
void register_fast_weight_mlp(pybind11::module& m);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "metakernels fused CPU kernels (eager bodies of the metakernels:: custom ops)";
  // The kernels touch no Python object: they run without the GIL, so that calls from several
  // Python threads run at once (tests/test_concurrency.py) instead of one after another.
  const auto without_gil = pybind11::call_guard<pybind11::gil_scoped_release>();
  m.def("unroll_forward", &unroll_forward, without_gil);
  m.def("unroll_backward", &unroll_backward, without_gil);
  m.def("linear_hvp", &linear_hvp, without_gil);
  m.def("unroll_path", &unroll_path,
        "Which algorithm unroll_forward/_backward run for these arguments: 'gram' (the Gram-space "
        "path of mse with 3-D x), 'chunked' (mse with 4-D x), 'steps' (the step loop), or "
        "'forward/backward' where they differ.");
  m.def("chunked_expected", &chunked_expected,
        "Whether the chunked path (mse, 4-D x) runs at these sizes (steps, n, d_in, d_out, m, "
        "wants_states: x's or the queries' gradient wanted) when it applies: metakernels/ops "
        "keeps no W_t for a call whose backward takes it.");
  m.def(
      "set_chunked_knobs",
      [](int64_t force, int64_t rows) {
        chunked_knobs().force = force;
        chunked_knobs().rows = rows;
      },
      "The chunked path's knobs, for tests and measurements: force it on (1), off (0) or leave "
      "it to the size rule (-1), and the stacked rows of a chunk (chunk = max(1, rows // n) "
      "steps; default 32).");
  m.def("set_poison_outputs", [](bool poison) { poison_outputs() = poison; },
        "Fill every output with NaN before the kernels write it (for tests).");
  register_meta_loss(m);
  register_fast_weight_mlp(m);
}
