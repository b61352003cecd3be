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
def chunked_expected(steps: int, n: int, d_in: int, d_out: int, m: int,
                     wants_states: bool) -> bool: ...
def set_chunked_knobs(force: int, rows: int) -> None: ...
