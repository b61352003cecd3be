"""The answer's loss after every prefix of a reasoning trajectory, for any Hugging Face causal
LM: the "pseudo-gradient descent" curve, in one batched forward pass.

For a prompt P, a trajectory S and an answer A (token ids), the curve's value at cut k is the mean
negative log-likelihood per answer token of A after ``P + S[:k]``: ``−1/|A| Σ_i log p(A_i |
P, S[:k], A_{<i})``. The loop computes it with one forward per cut point. The one-pass version
lays out a single sequence::

    P S | X A[:-1] (cut k_1) | X A[:-1] (cut k_2) | ...          X: answer_prefix_ids

P and S run once, causally. Each cut's copy of the answer attends only to ``P + S[:k]`` and to
itself, through a custom 4-D attention mask, and takes the positions ``len(P) + k ...`` it would
have after that prefix (``position_ids``), so it computes exactly what the loop computes. A copy
omits the answer's last token (its logits predict nothing that is scored), and the first answer
token of a cut without ``answer_prefix_ids`` is predicted from the logits at the prefix's last
position, which the main sequence already has.

transformers 5.x passes a 4-D ``attention_mask`` ``[batch, 1, query, key]`` through its mask
creation unchanged (``masking_utils._preprocess_mask_arguments``); the eager attention of GPT-2 and
Llama adds it to the scores and SDPA takes it as ``attn_mask``, so an additive float mask (0 where
a query may look, the dtype's minimum elsewhere) in the model's dtype works for both. flash-attn
reads no such mask: :func:`answer_loss_curve` runs the model with the implementation
``metakernels._attention.choose`` picks for a custom mask (SDPA, or eager for a model class
without SDPA), whatever the model was loaded with, and puts the model's own back afterwards.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from torch import Tensor

from metakernels import _attention

# The attention implementations that read a custom additive 4-D mask (see the module docstring).
MASKED_ATTENTION = (_attention.EAGER, _attention.SDPA)


def answer_loss_curve(model, prompt_ids: Tensor, trajectory_ids: Tensor, answer_ids: Tensor,
                      cut_points: Sequence[int] | Tensor | None = None, *,
                      answer_prefix_ids: Tensor | None = None) -> Tensor:
    """The answer's mean NLL per answer token after each trajectory prefix, in one forward pass.

    Args:
        model: a Hugging Face causal LM (``model(input_ids=, attention_mask=, position_ids=)``
            returning ``.logits``). It runs with SDPA attention (eager where its class has no
            SDPA path) for this call, whatever it was loaded with (flash-attn reads no 4-D
            mask); the choice is printed once. A model whose implementation cannot be set
            (``set_attn_implementation``) must already use eager or SDPA attention.
        prompt_ids: ``[P]`` int64, P ≥ 1: the question.
        trajectory_ids: ``[S]`` int64 (S may be 0): the reasoning trajectory.
        answer_ids: ``[N]`` int64, N ≥ 1: the tokens whose loss is measured.
        cut_points: prefix lengths k in ``[0, S]``; default every k = 0 ... S.
        answer_prefix_ids: ``[X]`` int64 tokens placed between the prefix and the answer in every
            copy (e.g. an "A:" marker), which condition the answer but are not scored.

    Returns:
        ``[len(cut_points)]`` float32 (float64 for a float64 model). Gradients flow unless called
        under ``torch.no_grad()``; the model's own mode (train/eval) is used as it is.
    """
    prompt_ids, trajectory_ids, answer_ids, prefix_ids, cuts = _check(
        model, prompt_ids, trajectory_ids, answer_ids, cut_points, answer_prefix_ids)
    device = _model_device(model)
    prompt_ids, trajectory_ids, answer_ids, prefix_ids = (
        t.to(device) for t in (prompt_ids, trajectory_ids, answer_ids, prefix_ids))
    cuts = cuts.to(device)
    n_prompt, n_main = prompt_ids.numel(), prompt_ids.numel() + trajectory_ids.numel()
    copy = torch.cat([prefix_ids, answer_ids[:-1]])
    n_copy, n_cuts = copy.numel(), cuts.numel()
    total = n_main + n_cuts * n_copy

    input_ids = torch.cat([prompt_ids, trajectory_ids, copy.repeat(n_cuts)])
    offset = torch.arange(n_copy, device=device)
    position_ids = torch.cat([torch.arange(n_main, device=device),
                              (n_prompt + cuts[:, None] + offset).reshape(-1)])

    # Which key each query may attend to: the main part causally; copy j its prefix
    # (keys < n_prompt + cuts[j]) and its own earlier tokens.
    query = torch.arange(total, device=device)
    copy_of = torch.where(query >= n_main, (query - n_main).div(n_copy, rounding_mode="floor")
                          if n_copy else query, -1)
    visible_main = torch.where(copy_of >= 0, n_prompt + cuts[copy_of.clamp(min=0)], query + 1)
    key = query
    allowed = ((key[None, :] < n_main) & (key[None, :] < visible_main[:, None])) | (
        (copy_of[:, None] == copy_of[None, :]) & (copy_of[:, None] >= 0)
        & (key[None, :] <= query[:, None]))
    dtype = _model_dtype(model)
    mask = torch.zeros(total, total, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)

    with _mask_reading_attention(model):
        logits = model(input_ids=input_ids[None], attention_mask=mask[None, None],
                       position_ids=position_ids[None]).logits[0]

    # The position whose logits predict answer token i of cut j.
    n_prefix, n_answer = prefix_ids.numel(), answer_ids.numel()
    within = n_prefix + torch.arange(n_answer, device=device) - 1              # [N]
    copy_pos = n_main + torch.arange(n_cuts, device=device)[:, None] * n_copy + within
    main_pos = (n_prompt + cuts - 1)[:, None].expand(-1, n_answer)
    predictor = torch.where(within >= 0, copy_pos, main_pos)                    # [C, N]
    log_probs = torch.log_softmax(logits[predictor].to(_result_dtype(dtype)), dim=-1)
    picked = log_probs.gather(-1, answer_ids.expand(n_cuts, -1)[..., None])[..., 0]
    return -picked.mean(-1)


def answer_loss_curve_loop(model, prompt_ids: Tensor, trajectory_ids: Tensor, answer_ids: Tensor,
                           cut_points: Sequence[int] | Tensor | None = None, *,
                           answer_prefix_ids: Tensor | None = None) -> Tensor:
    """The same curve as :func:`answer_loss_curve`, one forward pass per cut point with the plain
    causal mask: the baseline its tests and benchmark compare with."""
    prompt_ids, trajectory_ids, answer_ids, prefix_ids, cuts = _check(
        model, prompt_ids, trajectory_ids, answer_ids, cut_points, answer_prefix_ids,
        need_mask=False)
    device = _model_device(model)
    values = []
    for cut in cuts.tolist():
        ids = torch.cat([prompt_ids, trajectory_ids[:cut], prefix_ids, answer_ids]).to(device)
        logits = model(input_ids=ids[None]).logits[0]
        scored = logits[ids.numel() - answer_ids.numel() - 1:-1]
        log_probs = torch.log_softmax(scored.to(_result_dtype(_model_dtype(model))), dim=-1)
        values.append(-log_probs.gather(-1, answer_ids.to(device)[:, None]).mean())
    return torch.stack(values)


def _check(model, prompt_ids, trajectory_ids, answer_ids, cut_points, answer_prefix_ids,
           need_mask=True):
    if not callable(model):
        raise TypeError(f"model must be a callable causal LM, got {type(model).__name__}")
    if need_mask and not hasattr(model, "set_attn_implementation"):
        implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
        if implementation not in MASKED_ATTENTION:
            raise ValueError(f"model uses attention implementation {implementation!r}; "
                             f"answer_loss_curve needs one that reads a custom 4-D mask: "
                             f"{MASKED_ATTENTION} (load it with attn_implementation='sdpa')")
    ids = {"prompt_ids": prompt_ids, "trajectory_ids": trajectory_ids, "answer_ids": answer_ids,
           "answer_prefix_ids": answer_prefix_ids}
    if answer_prefix_ids is None:
        ids["answer_prefix_ids"] = torch.zeros(0, dtype=torch.int64)
    for name, value in ids.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if value.dim() != 1:
            raise ValueError(f"{name} has shape {list(value.shape)}, expected 1-D token ids")
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer token ids, got {value.dtype}")
        ids[name] = value.to(torch.int64)
    if ids["prompt_ids"].numel() == 0:
        raise ValueError("prompt_ids is empty; the first answer token needs a token before it")
    if ids["answer_ids"].numel() == 0:
        raise ValueError("answer_ids is empty; there is no answer to score")
    steps = ids["trajectory_ids"].numel()
    if cut_points is None:
        cuts = torch.arange(steps + 1)
    else:
        if isinstance(cut_points, Tensor):
            if cut_points.dim() != 1 or cut_points.dtype.is_floating_point:
                raise ValueError(f"cut_points must be a 1-D integer tensor, got shape "
                                 f"{list(cut_points.shape)} and dtype {cut_points.dtype}")
            cuts = cut_points.to(torch.int64).cpu()
        else:
            cut_points = list(cut_points)
            if not all(isinstance(k, int) and not isinstance(k, bool) for k in cut_points):
                raise TypeError(f"cut_points must hold ints, got {cut_points!r}")
            cuts = torch.tensor(cut_points, dtype=torch.int64)
        if cuts.numel() == 0:
            raise ValueError("cut_points is empty")
        if bool(((cuts < 0) | (cuts > steps)).any()):
            raise ValueError(f"cut_points must lie in [0, len(trajectory_ids)] = [0, {steps}], "
                             f"got {cuts.tolist()}")
    return (ids["prompt_ids"], ids["trajectory_ids"], ids["answer_ids"],
            ids["answer_prefix_ids"], cuts)


@contextlib.contextmanager
def _mask_reading_attention(model):
    """Runs ``model`` with the attention implementation :func:`metakernels._attention.choose`
    picks for a custom 4-D mask, then puts the model's own back as it was (each config's value
    itself: ``set_attn_implementation`` would check again that the old one can load)."""
    if not hasattr(model, "set_attn_implementation"):   # checked by _check: eager or SDPA
        yield
        return
    chosen, why = _attention.choose(type(model), _model_device(model), _model_dtype(model),
                                    custom_mask=True)
    own = model.config._attn_implementation
    saved = [(config, config._attn_implementation_internal) for config in _configs(model)]
    if own != chosen:
        model.set_attn_implementation(chosen)
        if model.config._attn_implementation != chosen:
            raise ValueError(f"{type(model).__name__} runs attention {own!r} and cannot be "
                             f"switched to {chosen!r}, which reads the custom 4-D mask that "
                             "answer_loss_curve passes; load it with "
                             f"attn_implementation={chosen!r}")
        why += f"; the model's own {own} is put back after the call"
    _attention.say_once("answer_loss_curve", chosen, why)
    try:
        yield
    finally:
        for config, implementation in saved:
            config._attn_implementation_internal = implementation


def _configs(model) -> list:
    """Every transformers config that ``model``'s modules hold, their sub-configs included."""
    found: dict[int, object] = {}
    pending = [module.config for module in model.modules()
               if hasattr(getattr(module, "config", None), "_attn_implementation_internal")]
    while pending:
        config = pending.pop()
        if id(config) in found:
            continue
        found[id(config)] = config
        pending += [getattr(config, key) for key in getattr(config, "sub_configs", {})
                    if getattr(config, key, None) is not None]
    return list(found.values())


def _model_device(model) -> torch.device:
    parameter = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return parameter.device if parameter is not None else torch.device("cpu")


def _model_dtype(model) -> torch.dtype:
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    parameter = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return parameter.dtype if parameter is not None else torch.float32


def _result_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32
