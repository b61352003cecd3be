"""Measurements of the reasoning-as-meta-learning view: the answer's loss along a trajectory, and
the stability metrics pass@k, G-Pass@k and mG-Pass@k."""

from metakernels.analysis.passk import g_pass_at_k, mg_pass_at_k, pass_at_k
from metakernels.analysis.trajectory import answer_loss_curve, answer_loss_curve_loop

__all__ = ["answer_loss_curve", "answer_loss_curve_loop", "g_pass_at_k", "mg_pass_at_k",
           "pass_at_k"]
