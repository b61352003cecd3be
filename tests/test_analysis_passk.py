"""pass@k, G-Pass@k_τ and mG-Pass@k against brute-force enumeration of every k-subset of n
samples of which c are correct."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest

from metakernels.analysis import g_pass_at_k, mg_pass_at_k, pass_at_k


def subsets_with_at_least(n, c, k, m) -> Fraction:
    """The share of k-subsets of n samples (the first c correct) holding ≥ m correct ones."""
    hits = total = 0
    for subset in itertools.combinations(range(n), k):
        total += 1
        hits += sum(i < c for i in subset) >= m
    return Fraction(hits, total)


def all_cases(max_n=7):
    return [(n, c, k) for n in range(1, max_n + 1) for c in range(n + 1) for k in range(1, n + 1)]


@pytest.mark.parametrize("n, c, k", all_cases())
def test_against_enumeration(n, c, k):
    assert pass_at_k(n, c, k, exact=True) == subsets_with_at_least(n, c, k, 1)
    assert pass_at_k(n, c, k) == float(subsets_with_at_least(n, c, k, 1))
    for i in range(1, k + 1):
        share = subsets_with_at_least(n, c, k, i)
        assert g_pass_at_k(n, c, k, Fraction(i, k), exact=True) == share
        # τ = i/k in floating point still selects ⌈τk⌉ = i
        assert g_pass_at_k(n, c, k, i / k) == float(share)
    for tau in (Fraction(1, 3), Fraction(1, 2), Fraction(2, 3), Fraction(9, 10)):
        threshold = -(-tau.numerator * k // tau.denominator)   # ⌈τk⌉ in integers
        assert g_pass_at_k(n, c, k, tau, exact=True) == subsets_with_at_least(n, c, k, threshold)
    expected = Fraction(2, k) * sum((subsets_with_at_least(n, c, k, i)
                                     for i in range((k + 1) // 2 + 1, k + 1)), Fraction(0))
    assert mg_pass_at_k(n, c, k, exact=True) == expected
    assert mg_pass_at_k(n, c, k) == pytest.approx(float(expected), rel=1e-15, abs=0)


def test_known_values():
    assert pass_at_k(10, 0, 3) == 0.0 and pass_at_k(10, 10, 3) == 1.0
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)
    # G-Pass@k_1 with all correct is 1; mG-Pass@k of a perfect model is (2/k)·⌊k/2⌋
    assert g_pass_at_k(8, 8, 4, 1.0) == 1.0
    assert mg_pass_at_k(8, 8, 4) == pytest.approx(2 / 4 * 2)
    assert mg_pass_at_k(8, 8, 1) == 0.0  # the empty sum for k = 1
    # large n stays exact: the miss probability 1/C(400, 100) ≈ 1e-96 survives
    assert pass_at_k(200, 1, 1, exact=True) == Fraction(1, 200)
    assert 1 - pass_at_k(400, 300, 100, exact=True) == Fraction(1, math.comb(400, 100))


def test_bad_arguments():
    with pytest.raises(ValueError, match="c must"):
        pass_at_k(5, 6, 2)
    with pytest.raises(ValueError, match="c must"):
        mg_pass_at_k(5, -1, 2)
    with pytest.raises(ValueError, match="k must"):
        pass_at_k(5, 2, 0)
    with pytest.raises(ValueError, match="k must"):
        g_pass_at_k(5, 2, 6, 0.5)
    with pytest.raises(ValueError, match="n must"):
        pass_at_k(0, 0, 1)
    with pytest.raises(ValueError, match="tau"):
        g_pass_at_k(5, 2, 3, 0.0)
    with pytest.raises(ValueError, match="tau"):
        g_pass_at_k(5, 2, 3, 1.5)
    with pytest.raises(ValueError, match="tau"):
        g_pass_at_k(5, 2, 3, float("nan"))
    with pytest.raises(TypeError, match="tau"):
        g_pass_at_k(5, 2, 3, "0.5")
    with pytest.raises(TypeError, match="k must"):
        pass_at_k(5, 2, 2.0)
    with pytest.raises(TypeError, match="n must"):
        pass_at_k(True, 0, 1)
