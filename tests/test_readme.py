"""The README's "call it from your own trainer" example runs as written."""

from __future__ import annotations

import pathlib
import re

import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def trainer_example() -> str:
    text = README.read_text()
    section = text.split("## Call it from your own trainer", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_maml_example_trains():
    gen = torch.Generator().manual_seed(0)
    tasks, shots, queries = 8, 25, 15
    loader = [(torch.randn(tasks, shots, 64, generator=gen), torch.randint(0, 5, (tasks, shots), generator=gen),
               torch.randn(tasks, queries, 64, generator=gen), torch.randint(0, 5, (tasks, queries), generator=gen))
              for _ in range(3)]
    namespace = {"loader": loader}
    exec(compile(trainer_example(), str(README), "exec"), namespace)
    head, bias = namespace["head"], namespace["bias"]
    assert head.abs().sum() > 0 and bias.abs().sum() > 0, "the meta-optimizer moved the init"
    assert torch.isfinite(namespace["meta_loss"])
    assert len(trainer_example().strip().splitlines()) <= 10
