"""The minimal meta-learning trainer: algorithms, tasks, models, the loop and its command line
(``metakernels train``, ``python -m metakernels.train``)."""

from metakernels.train.config import TrainConfig
from metakernels.train.loop import NonFiniteLoss, train

__all__ = ["NonFiniteLoss", "TrainConfig", "train"]
