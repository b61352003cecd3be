"""Which attention implementation a ``transformers`` model runs, chosen explicitly: the reasoning
task's transformer (metakernels/train/tasks/reasoning.py) and ``answer_loss_curve``
(metakernels/analysis/trajectory.py) ask :func:`choose`, and say the choice once.

- ``flash_attention_2`` where flash-attn is installed (and transformers finds it usable), the
  device is CUDA, the dtype float16 or bfloat16, the model class has a flash path, and no custom
  4-D attention mask is needed: flash-attn reads padding masks only.
- ``sdpa`` otherwise, masks included. In transformers 5 (checked in 5.24.0) a 4-D mask goes
  through mask creation unchanged (``masking_utils._preprocess_mask_arguments`` returns a 4-D
  mask as it is) and ``integrations/sdpa_attention.py`` hands it to
  ``torch.nn.functional.scaled_dot_product_attention`` as ``attn_mask``, an additive float mask as
  eager attention adds it; tests/test_attention.py checks the two agree on such a mask.
- ``eager`` where a 4-D mask is needed and the model class has no SDPA path.

Imports torch and, inside :func:`flash_attn_usable`, transformers (the ``train`` extra).
"""

from __future__ import annotations

import sys

import torch

from metakernels import _extras

FLASH, SDPA, EAGER = "flash_attention_2", "sdpa", "eager"
FLASH_DTYPES = (torch.float16, torch.bfloat16)
_said: set[str] = set()


def flash_attn_usable() -> bool:
    """flash-attn is installed, and transformers can run it here (a CUDA build, version ≥ 2.3.3)."""
    if not _extras.installed("flash_attn"):
        return False
    from transformers.utils import is_flash_attn_2_available
    return bool(is_flash_attn_2_available())


def choose(model_class: type, device: str | torch.device, dtype: torch.dtype, *,
           custom_mask: bool) -> tuple[str, str]:
    """``(implementation, why)`` for a model of ``model_class`` (a transformers
    ``PreTrainedModel`` class) run on ``device`` in ``dtype``; ``custom_mask``: its forward passes
    a 4-D attention mask of its own."""
    device = torch.device(device)
    name = model_class.__name__
    if custom_mask:
        why = "a custom 4-D attention mask, which flash-attn does not read"
    elif not getattr(model_class, "_supports_flash_attn", False):
        why = f"{name} has no flash-attn path"
    elif device.type != "cuda":
        why = f"flash-attn runs on CUDA, this model on {device.type}"
    elif dtype not in FLASH_DTYPES:
        why = f"flash-attn runs float16 and bfloat16, this model {str(dtype).replace('torch.', '')}"
    elif not flash_attn_usable():
        why = "flash-attn is not installed"
    else:
        return FLASH, "flash-attn installed, CUDA, " + str(dtype).replace("torch.", "")
    if getattr(model_class, "_supports_sdpa", False):
        return SDPA, why
    return EAGER, f"{why}; {name} has no SDPA path"


def say_once(who: str, implementation: str, why: str) -> None:
    """One line on stderr, the first time ``who`` makes this choice in this process."""
    line = f"{who}: attention {implementation} ({why})"
    if line not in _said:
        _said.add(line)
        print(line, file=sys.stderr, flush=True)
