"""Typed stub of the compiled module (csrc/torch/binding.cpp): the eager CPU bodies of the
metakernels:: custom ops. Call the ops through metakernels.fast_weight_unroll / linear_hvp."""

from torch import Tensor

def unroll_forward(weight: Tensor, x: Tensor, targets: Tensor, lr: Tensor, bias: Tensor | None,
                   lr_scale: Tensor | None, bias_lr_scale: Tensor | None, queries: Tensor | None,
                   loss: int, store_states: bool) -> list[Tensor]: ...
def unroll_backward(weight: Tensor, x: Tensor, targets: Tensor, lr: Tensor, bias: Tensor | None,
                    lr_scale: Tensor | None, bias_lr_scale: Tensor | None,
                    queries: Tensor | None, residual: Tensor, states: Tensor,
                    weight_final: Tensor, grad_weight_final: Tensor,
                    grad_bias_final: Tensor | None, grad_readout: Tensor | None, loss: int,
                    first_order: bool, wanted: list[bool]) -> list[Tensor]: ...
def linear_hvp(weight: Tensor, x: Tensor, v: Tensor, bias: Tensor | None, v_bias: Tensor | None,
               loss: int, with_bias: bool) -> list[Tensor]: ...
def unroll_path(weight: Tensor, x: Tensor, targets: Tensor, lr: Tensor, bias: Tensor | None,
                lr_scale: Tensor | None, bias_lr_scale: Tensor | None, queries: Tensor | None,
                loss: int, store_states: bool, grad_bias_lr_scale: bool,
                wants_states: bool) -> str: ...
def set_poison_outputs(poison: bool) -> None: ...
def meta_loss_forward(weight: Tensor, x: Tensor, targets: Tensor, lr: Tensor, bias: Tensor | None,
                      lr_scale: Tensor | None, bias_lr_scale: Tensor | None, query_x: Tensor,
                      query_y: Tensor, loss: int, store_states: bool, keep_weight: bool,
                      grad_bias_lr_scale: bool) -> list[Tensor]: ...
def meta_loss_backward(weight: Tensor, x: Tensor, targets: Tensor, lr: Tensor,
                       bias: Tensor | None, lr_scale: Tensor | None,
                       bias_lr_scale: Tensor | None, query_x: Tensor, query_y: Tensor,
                       residual: Tensor, states: Tensor, weight_final: Tensor,
                       query_residual: Tensor, grad_loss: Tensor, loss: int, first_order: bool,
                       wanted: list[bool], grad_weight_in: Tensor | None,
                       grad_bias_in: Tensor | None) -> list[Tensor]: ...
def meta_loss_path(weight: Tensor, x: Tensor, targets: Tensor, lr: Tensor, bias: Tensor | None,
                   lr_scale: Tensor | None, bias_lr_scale: Tensor | None, query_x: Tensor,
                   loss: int, store_states: bool, keep_weight: bool,
                   grad_bias_lr_scale: bool) -> str: ...
def chunked_expected(steps: int, n: int, d_in: int, d_out: int, m: int,
                     wants_states: bool) -> bool: ...
def set_chunked_knobs(force: int, rows: int) -> None: ...
