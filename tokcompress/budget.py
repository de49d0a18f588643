"""Meeting a token budget with a threshold-controlled policy.

LLaVA-Scissor and STTM have no count parameter: a similarity threshold decides how much merges. When
the user asks for a ``retain`` fraction instead, :func:`fit_threshold` bisects the threshold so that
the policy keeps at most the budget, as many tokens as it can.
"""

from __future__ import annotations

from typing import Callable

#: Bisection steps: the threshold is found to ``(hi - lo) / 2**STEPS``.
STEPS = 20


def fit_threshold(count: Callable[[float], int], budget: int, lo: float, hi: float, steps: int = STEPS) -> float:
    """A threshold ``x`` in ``[lo, hi]`` with ``count(x) <= budget``, as large as bisection finds.

    ``count`` is expected to grow with ``x`` (a higher threshold merges less). It need not be strictly
    monotone: the result always satisfies the budget when ``count(lo)`` does, and ``count`` exceeds the
    budget at a threshold less than ``(hi - lo) / 2**steps`` above it. When even ``lo`` exceeds the
    budget, ``lo`` is returned (the caller reports the count it achieved).
    """
    if count(hi) <= budget:
        return hi
    if count(lo) > budget:
        return lo
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        if count(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return lo
