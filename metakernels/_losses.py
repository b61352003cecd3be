"""The two inner losses of docs/ops/fast_weight_unroll.md, below every layer that names them: the
code each has in the compiled kernels' interface (the dispatch layer and the Triton compile check
pass it), and the loss itself in plain torch (the benchmark contestants and the trainer's
full-network inner loop compute it). Imports torch only."""

from __future__ import annotations

import torch
from torch import Tensor

# The ``loss`` argument of the kernels (csrc/include/metakernels, metakernels/triton).
LOSS_CODES = {"mse": 0, "ce": 1}


def mean_loss(logits: Tensor, targets: Tensor, loss: str) -> Tensor:
    """The loss of docs/ops/fast_weight_unroll.md, summed over every leading index (tasks, steps).

    logits ``[..., rows, d_out]``; targets float ``[..., rows, d_out]`` (mse) or int64 labels
    ``[..., rows]`` (ce). mse: ½‖z − y‖² / rows; ce: the cross-entropy averaged over the rows.
    Inside ``vmap`` the leading task index is hidden, so this is one task's loss.
    """
    rows = logits.shape[-2]
    if loss == "mse":
        # One fused op forward (and mse_loss_backward backward) instead of sub, pow, sum and two
        # scalings with their five backward nodes: the same sum, ~0.1 ms less per maml-small
        # meta-step and two fewer [B, T, m, d_out] temporaries on trajectory, for every
        # contestant alike (torch.func's inner loss and the outer loss of each are this function).
        return torch.nn.functional.mse_loss(logits, targets, reduction="sum") * (0.5 / rows)
    log_probs = torch.log_softmax(logits, dim=-1)
    return -log_probs.gather(-1, targets.unsqueeze(-1)).sum() / rows
