// fast_weight_meta_loss on the CPU (docs/ops/fast_weight_meta_loss.md): tensors -> the unroll
// kernels and the query-loss kernels (metakernels/meta_loss.h), in one parallel pass over tasks
// each way. metakernels/ops/fast_weight_meta_loss.py checked every argument and owns autograd; this
// is the eager body of its custom ops. Registered into metakernels._C by binding.cpp.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <vector>

#include "metakernels/fast_weight.h"
#include "metakernels/meta_loss.h"
#include "unroll_tensors.h"

namespace {

using at::Tensor;
using c10::optional;
using namespace metakernels_torch;

// Form B (a readout loss after every step) when query_x is [B, T, m, d_in].
bool readout_form(const Tensor& query_x) { return query_x.dim() == 4; }

// The unroll call of a meta-loss: the readout's queries are query_x in form B, none in form A.
Unroll meta_unroll(const Tensor& weight, const Tensor& x, const Tensor& targets, const Tensor& lr,
                   const optional<Tensor>& bias, const optional<Tensor>& lr_scale,
                   const optional<Tensor>& bias_lr_scale, const Tensor& query_x, int64_t loss) {
  return Unroll(weight, x, targets, lr, bias, lr_scale, bias_lr_scale,
                readout_form(query_x) ? optional<Tensor>(query_x) : c10::nullopt, loss,
                /*strided_tasks=*/true);
}

template <typename T>
metakernels::QueryLoss<T> query_loss(const metakernels::UnrollDims& d, const Tensor& query_x,
                                     const Tensor& query_y) {
  metakernels::QueryLoss<T> q;
  q.tasks = d.tasks;
  q.blocks = readout_form(query_x) ? d.steps : 1;
  q.rows = query_x.size(-2);
  q.d_in = d.d_in;
  q.d_out = d.d_out;
  q.loss = d.loss;
  q.query_x = query_x.data_ptr<T>();
  if (d.loss == metakernels::Loss::kMse)
    q.query_y = query_y.data_ptr<T>();
  else
    q.query_labels = query_y.data_ptr<int64_t>();
  return q;
}

// The Gram-space path runs where fast_weight_unroll's would (binding.cpp): the forward when no
// W_t is stored, the backward unless bias_lr_scale's gradient is wanted.
template <typename T>
bool runs_gram(const metakernels::UnrollDims& d, const metakernels::UnrollInputs<T>& in,
               bool store_states) {
  return !store_states && d.tasks > 0 && metakernels::unroll_gram_applies(d, in);
}

// Returns (per-task loss [B], W_T or [0], b_T or [0], residual E_t, states W_t or [0], the query
// residual Ê [B, m, d_out] (form A) or [B, T, m, d_out] (form B)). W_T and b_T are returned
// where keep_weight says (query_x's gradient needs W_T; a checkpoint segment's end is the next
// one's start); without it, form A on the Gram path never forms them (the query loss in Gram
// space: Z = Q W_0 + 1 b_0ᵀ − (1/n) (Q̃ X̃ᵀ) S R_0). On the Gram path, unless bias_lr_scale's
// gradient is wanted (its backward is the step loop, which reads every E_t), only E_0 is written
// (the Gram backward reads nothing else; E_1 … E_{T−1} are zero).
std::vector<Tensor> meta_loss_forward(const Tensor& weight, const Tensor& x, const Tensor& targets,
                                      const Tensor& lr, const optional<Tensor>& bias,
                                      const optional<Tensor>& lr_scale,
                                      const optional<Tensor>& bias_lr_scale,
                                      const Tensor& query_x_, const Tensor& query_y_,
                                      int64_t loss, bool store_states, bool keep_weight,
                                      bool grad_bias_lr_scale) {
  const Tensor query_x = query_x_.contiguous(), query_y = query_y_.contiguous();
  const Unroll u = meta_unroll(weight, x, targets, lr, bias, lr_scale, bias_lr_scale, query_x, loss);
  const auto& d = u.dims;
  const auto opts = u.weight.options();
  const bool form_b = readout_form(query_x);
  const int64_t m = query_x.size(-2);
  Tensor task_loss = new_output({d.tasks}, opts);
  Tensor weight_out, bias_out;
  Tensor losses = new_output({d.tasks, d.steps}, opts);
  Tensor residual = new_output({d.tasks, d.steps, d.support, d.d_out}, opts);
  Tensor states = store_states ? new_output({d.tasks, d.steps, d.d_in, d.d_out}, opts)
                               : no_output(u.weight);
  // Form B: the readout, turned into its residual in place (never returned as a readout).
  Tensor query_residual = form_b ? new_output({d.tasks, d.steps, m, d.d_out}, opts)
                                 : new_output({d.tasks, m, d.d_out}, opts);
  Tensor sum_residual;  // M_T = S R_0 of the Gram-space form A
  bool gram_space = false;
  AT_DISPATCH_FLOATING_TYPES(u.weight.scalar_type(), "fast_weight_meta_loss_forward", [&] {
    const auto in = u.inputs<scalar_t>();
    const auto q = query_loss<scalar_t>(d, query_x, query_y);
    const bool gram = runs_gram(d, in, store_states);
    gram_space = gram && !form_b && !keep_weight;
    metakernels::UnrollForwardOutputs<scalar_t> out;
    if (gram_space) {
      sum_residual = at::empty({d.tasks, d.support, d.d_out}, opts);
      out.sum_residual = sum_residual.data_ptr<scalar_t>();
    } else {
      weight_out = new_output({d.tasks, d.d_in, d.d_out}, opts);
      bias_out = bias.has_value() ? new_output({d.tasks, d.d_out}, opts) : no_output(u.weight);
      out.weight = weight_out.data_ptr<scalar_t>();
      out.bias = out_ptr_or_null<scalar_t>(bias_out);
    }
    out.first_residual_only = gram && !grad_bias_lr_scale;
    out.losses = losses.data_ptr<scalar_t>();
    out.readout = form_b ? out_ptr_or_null<scalar_t>(query_residual) : nullptr;
    out.residual = residual.data_ptr<scalar_t>();
    out.states = out_ptr_or_null<scalar_t>(states);
    scalar_t* qres = out_ptr_or_null<scalar_t>(query_residual);
    scalar_t* task_loss_ptr = out_ptr_or_null<scalar_t>(task_loss);
    // Task by task, so that each task's matrices are still in cache for its query loss.
    at::parallel_for(0, d.tasks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        if (gram)
          metakernels::fast_weight_unroll_gram_forward<scalar_t>(d, in, out, b, b + 1);
        else
          metakernels::fast_weight_unroll_forward<scalar_t>(d, in, out, b, b + 1);
        if (gram_space)
          metakernels::meta_loss_gram_logits<scalar_t>(d, in, q, out.sum_residual, qres, b, b + 1);
        else if (!form_b)
          metakernels::meta_loss_logits<scalar_t>(q, out.weight, out.bias, qres, b, b + 1);
        metakernels::meta_loss_forward<scalar_t>(q, qres, task_loss_ptr, b, b + 1);
      }
    });
  });
  if (!keep_weight || gram_space) {  // the running state of the step loop (or none): not returned
    weight_out = no_output(u.weight);
    bias_out = no_output(u.weight);
  }
  return {task_loss, weight_out, bias_out, residual, states, query_residual};
}

// wanted: weight, x, y, lr, bias, lr_scale, bias_lr_scale, query_x, query_y. Returns their
// gradients in that order, each empty where not wanted, shared inputs summed over tasks.
std::vector<Tensor> meta_loss_backward(
    const Tensor& weight, const Tensor& x, const Tensor& targets, const Tensor& lr,
    const optional<Tensor>& bias, const optional<Tensor>& lr_scale,
    const optional<Tensor>& bias_lr_scale, const Tensor& query_x_, const Tensor& query_y_,
    const Tensor& residual_, const Tensor& states_, const Tensor& weight_final_,
    const Tensor& query_residual_, const Tensor& grad_loss_, int64_t loss, bool first_order,
    std::vector<bool> wanted, const optional<Tensor>& grad_weight_in_,
    const optional<Tensor>& grad_bias_in_) {
  TORCH_CHECK(wanted.size() == 9, "metakernels internal error: meta_loss_backward takes 9 flags");
  const Tensor query_x = query_x_.contiguous(), query_y = query_y_.contiguous();
  const Unroll u = meta_unroll(weight, x, targets, lr, bias, lr_scale, bias_lr_scale, query_x, loss);
  const auto& d = u.dims;
  const auto opts = u.weight.options();
  const bool form_b = readout_form(query_x);
  const int64_t m = query_x.size(-2);
  TORCH_CHECK(!((wanted[1] && !first_order) || (form_b && wanted[7])) || states_.dim() == 4,
              "metakernels internal error: the backward needs the stored fast weights");
  auto maybe = [&](bool need, at::IntArrayRef shape) {
    return need ? new_output(shape, opts) : no_output(u.weight);
  };
  Tensor grad_weight;  // below: per task, or (Gram path, shared init) one sum per thread
  Tensor grad_x = maybe(wanted[1], u.x.sizes());
  Tensor grad_y = maybe(wanted[2], u.targets.sizes());
  Tensor grad_lr = maybe(wanted[3], {d.tasks, d.steps});
  Tensor grad_bias = maybe(wanted[4], {d.tasks, d.d_out});
  Tensor grad_lr_scale = maybe(wanted[5], {d.tasks, d.d_in, d.d_out});
  Tensor grad_bias_lr_scale = maybe(wanted[6], {d.tasks, d.d_out});
  Tensor grad_query_x = maybe(wanted[7], query_x.sizes());
  Tensor grad_query_y = maybe(wanted[8], query_y.sizes());
  // The unroll backward's incoming adjoints Ŵ_T and b̂_T (the query loss's in form A, plus a
  // later checkpoint segment's where given), and Ô_t (form B).
  Tensor grad_weight_final = at::empty({d.tasks, d.d_in, d.d_out}, opts);
  Tensor grad_bias_final = bias.has_value() ? at::empty({d.tasks, d.d_out}, opts)
                                            : no_output(u.weight);
  const optional<Tensor> grad_weight_in = contiguous_or_none(grad_weight_in_);
  const optional<Tensor> grad_bias_in = contiguous_or_none(grad_bias_in_);
  Tensor grad_readout = form_b ? at::empty({d.tasks, d.steps, m, d.d_out}, opts)
                               : no_output(u.weight);
  const Tensor residual = residual_.contiguous(), states = states_.contiguous();
  const Tensor weight_final = weight_final_.contiguous();
  const Tensor query_residual = query_residual_.contiguous(), grad_loss = grad_loss_.contiguous();
  bool sum_per_thread = false;
  AT_DISPATCH_FLOATING_TYPES(u.weight.scalar_type(), "fast_weight_meta_loss_backward", [&] {
    const auto in = u.inputs<scalar_t>();
    const auto q = query_loss<scalar_t>(d, query_x, query_y);
    metakernels::QueryLossBackward<scalar_t> qargs;
    qargs.residual = query_residual.data_ptr<scalar_t>();
    qargs.grad_loss = grad_loss.data_ptr<scalar_t>();
    qargs.weight_t = out_ptr_or_null<scalar_t>(weight_final);
    qargs.grad_weight_in = ptr_or_null<scalar_t>(grad_weight_in);
    qargs.grad_bias_in = bias.has_value() ? ptr_or_null<scalar_t>(grad_bias_in) : nullptr;
    qargs.grad_weight_t = grad_weight_final.data_ptr<scalar_t>();
    qargs.grad_bias_t = out_ptr_or_null<scalar_t>(grad_bias_final);
    qargs.grad_readout = out_ptr_or_null<scalar_t>(grad_readout);
    qargs.grad_query_x = form_b ? nullptr : out_ptr_or_null<scalar_t>(grad_query_x);
    qargs.grad_query_y = out_ptr_or_null<scalar_t>(grad_query_y);

    metakernels::UnrollBackwardArgs<scalar_t> args;
    args.residual = residual.data_ptr<scalar_t>();
    args.states = out_ptr_or_null<scalar_t>(states);
    args.weight_final = out_ptr_or_null<scalar_t>(weight_final);
    args.grad_weight_final = grad_weight_final.data_ptr<scalar_t>();
    args.grad_bias_final = out_ptr_or_null<scalar_t>(grad_bias_final);
    args.grad_readout = out_ptr_or_null<scalar_t>(grad_readout);
    args.first_order = first_order;
    args.grad_bias = out_ptr_or_null<scalar_t>(grad_bias);
    args.grad_x = out_ptr_or_null<scalar_t>(grad_x);
    args.grad_y = out_ptr_or_null<scalar_t>(grad_y);
    args.grad_lr = out_ptr_or_null<scalar_t>(grad_lr);
    args.grad_lr_scale = out_ptr_or_null<scalar_t>(grad_lr_scale);
    args.grad_bias_lr_scale = out_ptr_or_null<scalar_t>(grad_bias_lr_scale);
    args.grad_queries = form_b ? out_ptr_or_null<scalar_t>(grad_query_x) : nullptr;
    const bool gram = runs_gram(d, in, wanted[6]);
    // Form A on the Gram path, without a later segment's adjoints: X̃ Ŵ̃_T from the n × m Gram
    // matrix of the query set.
    const bool gram_space = gram && !form_b && !grad_weight_in.has_value() &&
                            !grad_bias_in.has_value();
    Tensor pushed = gram_space ? at::empty({d.tasks, d.support, d.d_out}, opts) : Tensor();
    args.pushed_final = pushed.defined() ? pushed.data_ptr<scalar_t>() : nullptr;
    scalar_t* pushed_ptr = pushed.defined() ? pushed.data_ptr<scalar_t>() : nullptr;
    // A shared init on the Gram path: each thread sums its tasks' gradients into its own
    // [d_in, d_out] slot (as fast_weight_unroll's backward does).
    sum_per_thread = gram && wanted[0] && weight.dim() == 2;
    grad_weight = sum_per_thread ? at::zeros({at::get_num_threads(), d.d_in, d.d_out}, opts)
                                 : maybe(wanted[0], {d.tasks, d.d_in, d.d_out});
    args.grad_weight = out_ptr_or_null<scalar_t>(grad_weight);
    // Task by task, so that each task's Ŵ_T is still in cache for its unroll backward.
    at::parallel_for(0, d.tasks, 1, [&](int64_t begin, int64_t end) {
      auto mine = args;
      if (sum_per_thread) {
        mine.grad_weight = grad_weight.data_ptr<scalar_t>() +
                           at::get_thread_num() * d.d_in * d.d_out;
        mine.sum_grad_weight = true;
      }
      for (int64_t b = begin; b < end; ++b) {
        metakernels::meta_loss_backward<scalar_t>(q, qargs, b, b + 1);
        if (pushed_ptr)
          metakernels::meta_loss_gram_pushed<scalar_t>(d, in, q, qargs.residual, qargs.grad_loss,
                                                       pushed_ptr, b, b + 1);
        if (gram)
          metakernels::fast_weight_unroll_gram_backward<scalar_t>(d, in, mine, b, b + 1);
        else
          metakernels::fast_weight_unroll_backward<scalar_t>(d, in, mine, b, b + 1);
      }
    });
  });
  if (wanted[0] && weight.dim() == 2) grad_weight = grad_weight.sum(0);
  if (wanted[4] && bias->dim() == 1) grad_bias = grad_bias.sum(0);
  if (wanted[5]) grad_lr_scale = grad_lr_scale.sum(0);
  if (wanted[6]) grad_bias_lr_scale = grad_bias_lr_scale.sum(0);
  return {grad_weight, grad_x, grad_y, grad_lr, grad_bias, grad_lr_scale, grad_bias_lr_scale,
          grad_query_x, grad_query_y};
}

// The algorithm of the forward and the backward, as "forward/backward" where they differ:
// "steps" (the step loop), "gram" (the Gram-space unroll, W_T formed), or "gram-space" (form A
// with the query loss in Gram space too: W_T never formed in the forward, X̃ Ŵ̃_T from the
// query set's Gram matrix in the backward).
std::string meta_loss_path(const Tensor& weight, const Tensor& x, const Tensor& targets,
                           const Tensor& lr, const optional<Tensor>& bias,
                           const optional<Tensor>& lr_scale,
                           const optional<Tensor>& bias_lr_scale, const Tensor& query_x,
                           int64_t loss, bool store_states, bool keep_weight,
                           bool grad_bias_lr_scale) {
  const Unroll u = meta_unroll(weight, x, targets, lr, bias, lr_scale, bias_lr_scale, query_x, loss);
  const bool form_a = !readout_form(query_x);
  std::string forward, backward;
  AT_DISPATCH_FLOATING_TYPES(u.weight.scalar_type(), "meta_loss_path", [&] {
    const auto in = u.inputs<scalar_t>();
    forward = !runs_gram(u.dims, in, store_states) ? "steps"
              : form_a && !keep_weight             ? "gram-space"
                                                   : "gram";
    backward = !runs_gram(u.dims, in, grad_bias_lr_scale) ? "steps"
               : form_a                                  ? "gram-space"
                                                         : "gram";
  });
  return forward == backward ? forward : forward + "/" + backward;
}

}  // namespace

void register_meta_loss(pybind11::module& m) {
  const auto without_gil = pybind11::call_guard<pybind11::gil_scoped_release>();
  m.def("meta_loss_forward", &meta_loss_forward, without_gil);
  m.def("meta_loss_backward", &meta_loss_backward, without_gil);
  m.def("meta_loss_path", &meta_loss_path,
        "Which algorithm meta_loss_forward/_backward run for the unroll: 'gram', 'steps' or "
        "'steps/gram' (forward/backward), as unroll_path.");
}
