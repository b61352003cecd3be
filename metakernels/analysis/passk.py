"""pass@k, G-Pass@k_τ and mG-Pass@k: unbiased estimators from n samples of which c are correct.

With k of the n samples drawn without replacement, the number j of correct ones among them is
hypergeometric, ``P(j) = C(c, j)·C(n−c, k−j) / C(n, k)``, and::

    pass@k        = P(j ≥ 1) = 1 − C(n−c, k) / C(n, k)
    G-Pass@k_τ    = P(j ≥ ⌈τ·k⌉) = Σ_{j ≥ ⌈τk⌉} C(c, j)·C(n−c, k−j) / C(n, k)
    mG-Pass@k     = (2/k) · Σ_{i = ⌈k/2⌉+1}^{k} G-Pass@k_{i/k}

(G-Pass@k_τ and mG-Pass@k: Liu et al. 2024, "Are Your LLMs Capable of Stable Reasoning?").
Every value is computed exactly in rationals (``math.comb``, ``fractions.Fraction``) and returned
as a float, or as the exact ``Fraction`` with ``exact=True``. With k = 1 the sum of mG-Pass@k is
empty (⌈1/2⌉ + 1 = 2 > 1), so mG-Pass@1 is 0 by this definition.
"""

from __future__ import annotations

import math
from fractions import Fraction
from numbers import Rational

# A float τ is read as the nearest fraction with at most this denominator, so that τ = i/k
# written in floating point selects ⌈τk⌉ = i exactly.
TAU_DENOMINATOR = 10**6


def pass_at_k(n: int, c: int, k: int, *, exact: bool = False) -> float | Fraction:
    """The probability that at least one of k samples drawn from the n is correct."""
    _check(n, c, k)
    value = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    return value if exact else float(value)


def g_pass_at_k(n: int, c: int, k: int, tau, *, exact: bool = False) -> float | Fraction:
    """The probability that at least ⌈τ·k⌉ of k samples drawn from the n are correct;
    ``0 < tau <= 1`` (a float, or an exact ``Fraction``)."""
    _check(n, c, k)
    return _g_pass(n, c, k, _tau(tau), exact)


def mg_pass_at_k(n: int, c: int, k: int, *, exact: bool = False) -> float | Fraction:
    """``(2/k) · Σ_{i=⌈k/2⌉+1}^{k} G-Pass@k_{i/k}``: G-Pass@k averaged over the thresholds
    above one half."""
    _check(n, c, k)
    total = sum((_g_pass(n, c, k, Fraction(i, k), True)
                 for i in range((k + 1) // 2 + 1, k + 1)), Fraction(0))
    value = Fraction(2, k) * total
    return value if exact else float(value)


def _g_pass(n: int, c: int, k: int, tau: Fraction, exact: bool):
    threshold = math.ceil(tau * k)
    numerator = sum(math.comb(c, j) * math.comb(n - c, k - j)
                    for j in range(threshold, min(c, k) + 1))
    value = Fraction(numerator, math.comb(n, k))
    return value if exact else float(value)


def _check(n, c, k) -> None:
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if n < 1:
        raise ValueError(f"n must be at least 1 (the number of samples), got n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"c must satisfy 0 <= c <= n = {n} (correct samples), got c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"k must satisfy 1 <= k <= n = {n}, got k={k}")


def _tau(tau) -> Fraction:
    if isinstance(tau, bool) or not isinstance(tau, (Rational, float)):
        raise TypeError(f"tau must be a float or a Fraction, got {type(tau).__name__}")
    if isinstance(tau, float):
        if not math.isfinite(tau):
            raise ValueError(f"tau must satisfy 0 < tau <= 1, got tau={tau}")
        tau = Fraction(tau).limit_denominator(TAU_DENOMINATOR)
    tau = Fraction(tau)
    if not 0 < tau <= 1:
        raise ValueError(f"tau must satisfy 0 < tau <= 1, got tau={float(tau)}")
    return tau
