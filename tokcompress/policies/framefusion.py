"""FrameFusion: merge temporally similar visual tokens layer after layer, then prune by attention.

Fu et al., "FrameFusion: Combining Similarity and Importance for Video Token Reduction on Large
Visual Language Models", ICCV 2025. Reference: thu-nics/FrameFusion @ fbec1d2
(``framefusion/main.py::FrameFusion``, driven by the per-model decoder-layer patches).

During prefill the reference makes a sequence of calls: one at layer 0 before attention, then one
after the attention sub-block of every layer (``residual + attn_out``, before the MLP) while
merging is not finished, then one prune call, then nothing. Each merge call

1. computes ``ub = pruning_ratio_needed(sparsity_list, cost)``, the fraction still to remove so
   that the per-call visual-token fractions average to ``cost`` over ``num_layers`` calls;
2. chains the visual tokens still present by spatial slot (frame order within a slot) and takes
   the cosine similarity of each token to the previous survivor of its slot;
3. candidates are the tokens with similarity ``>= similarity_lower_bound``; with ``frac`` their
   share of the visual tokens present: if ``frac < ub`` the step records ``frac`` and merging
   finishes once ``frac < ratio_lower_bound`` (the step still merges); otherwise only the top
   ``int(ub * N)`` similarities merge and both merging and pruning finish;
4. averages each maximal run of consecutive candidates in a chain, uniformly, together with the
   token just before the run (the anchor) into the anchor, and removes the candidates.

The prune call keeps the ``round(N * (1 - pruning_ratio_needed(...)))`` visual tokens the last
query token attends to most (mean over heads). Survivors always keep their original positions.

This module holds the pure steps (:func:`framefusion_merge`, :func:`framefusion_prune`) and the
policy object; ``tokcompress/framefusion_sites.py`` drives them inside a model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from ..policy import LayerPolicy, check_retain
from ..registry import register
from ..tokens import LayerTokens
from .fastv import top_indices

#: Kinds of step, as the golden cases name them.
MERGE, MERGE_LAST, MERGE_TOPK, PRUNE = 0, 1, 2, 3

#: ``num_layers`` of the reference's ``_compute_pruning_ratio`` (Qwen2-7B), hard-coded upstream for every model.
REFERENCE_NUM_LAYERS = 28


class FrameFusionBudgetError(ValueError):
    """The merges so far already used more than ``cost`` allows (the reference's "The cost is too small")."""


def pruning_ratio_needed(sparsity: Sequence[float], cost: float, num_layers: int = REFERENCE_NUM_LAYERS) -> float:
    """Fraction of the visual tokens still present that the next call must remove to meet ``cost``.

    ``sparsity[i]`` is the fraction removed by merge call ``i``; the token count relative to the
    original after call ``i`` is ``s_i = prod_{j <= i} (1 - sparsity[j])``. The calls to come, one
    per remaining "layer" of ``num_layers``, may still process ``num_layers * cost - sum_i s_i``
    relative tokens; spread evenly over them that is a fraction ``r`` of the current ``s``, so
    ``1 - r`` must go (0 when ``r > 1``).

    Raises:
        FrameFusionBudgetError: when the calls so far already exceed the budget (``remain < 0``) or
            no call is left (``len(sparsity) >= num_layers``).
    """
    s, used = 1.0, 0.0
    for x in sparsity:
        s *= 1.0 - x
        used += s
    remain = num_layers * cost - used
    left = num_layers - len(sparsity)
    if remain < 0 or left <= 0:
        raise FrameFusionBudgetError(
            f"FrameFusion: cost={cost:g} is too small for the merges already made (the visual-token fractions of "
            f"{len(sparsity)} calls sum to {used:.4g} of num_layers * cost = {num_layers * cost:.4g}); raise cost, "
            "raise similarity_lower_bound or ratio_lower_bound (fewer merge calls), or raise num_layers"
        )
    r = remain / (left * s)
    return 0.0 if r > 1 else 1.0 - r


def slot_chains(slot: Tensor) -> tuple[Tensor, Tensor]:
    """Order the tokens by slot, sequence order within a slot.

    Returns ``order`` ``(N,)`` (token index at each chain position) and ``first`` ``(N,)`` bool,
    True where a chain starts (no predecessor).
    """
    order = torch.sort(slot, stable=True).indices
    chained = slot[order]
    first = torch.ones_like(chained, dtype=torch.bool)
    first[1:] = chained[1:] != chained[:-1]
    return order, first


def chain_similarity(hidden: Tensor, order: Tensor, first: Tensor) -> Tensor:
    """Cosine similarity (``dot / (|a| |b|)``, no eps, float32) of each chain entry to its predecessor; -2 at chain starts."""
    h = hidden.float()[order]
    sim = torch.full((h.shape[0],), -2.0, dtype=torch.float32, device=h.device)
    if h.shape[0] > 1:
        a, b = h[:-1], h[1:]
        cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
        sim[1:] = torch.where(first[1:], sim[1:], cos)
    return sim


@dataclass
class MergeStep:
    """Result of one FrameFusion merge call over the ``N`` visual tokens present.

    Attributes:
        keep: ``(M,)`` sorted indices of the surviving tokens.
        values: ``(M, D)`` their hidden states after the merge (anchors hold their run means).
        target: ``(N,)`` index of the token each token ends in (itself when kept).
        kind: ``MERGE``, ``MERGE_LAST`` (merging finishes) or ``MERGE_TOPK`` (merging and pruning finish).
        fraction: candidates (similarity ``>=`` bound) over ``N``.
        upper_bound: ``pruning_ratio_needed`` at this call.
    """

    keep: Tensor
    values: Tensor
    target: Tensor
    kind: int
    fraction: float
    upper_bound: float


def run_anchors(candidate: Tensor, first: Tensor) -> Tensor:
    """Chain position of the anchor of every chain entry: the nearest earlier non-candidate (itself when not a candidate).

    A chain start is never a candidate, so every run has an anchor in its own chain.
    """
    n = candidate.shape[0]
    pos = torch.arange(n, device=candidate.device)
    marks = torch.where(candidate & ~first, torch.zeros_like(pos), pos)
    return torch.cummax(marks, dim=0).values


def framefusion_merge(
    hidden: Tensor,
    slot: Tensor,
    sparsity: Sequence[float],
    cost: float,
    similarity_lower_bound: float,
    ratio_lower_bound: float,
    num_layers: int = REFERENCE_NUM_LAYERS,
) -> MergeStep:
    """One FrameFusion merge call.

    Args:
        hidden: ``(N, D)`` hidden states of the visual tokens present, in sequence order.
        slot: ``(N,)`` int64 chain key of each token (spatial slot within its frame; distinct videos
            need distinct keys).
        sparsity: the fractions recorded by the earlier merge calls of this prefill.
        cost, similarity_lower_bound, ratio_lower_bound, num_layers: see :class:`FrameFusion`.

    The top-k branch takes at most as many tokens as have a predecessor in their chain (the
    reference's ``topk`` could also pick chain starts, whose similarity is -2, when ``int(ub * N)``
    exceeds that; it then merges across slots).
    """
    n = hidden.shape[0]
    ub = pruning_ratio_needed(sparsity, cost, num_layers)
    order, first = slot_chains(slot)
    sim = chain_similarity(hidden, order, first)
    above = sim >= similarity_lower_bound
    fraction = int(above.sum()) / n if n else 0.0
    if fraction < ub:
        candidate = above
        kind = MERGE_LAST if fraction < ratio_lower_bound else MERGE
    else:
        count = min(int(ub * n), int((~first).sum()))
        candidate = torch.zeros_like(above)
        candidate[top_indices(sim, count)] = True
        kind = MERGE_TOPK
    anchor = order[run_anchors(candidate, first)]  # per chain position: token index of its anchor
    target = torch.empty_like(order)
    target[order] = anchor
    h = hidden.float()
    sums = torch.zeros_like(h).index_add_(0, target, h)
    counts = torch.bincount(target, minlength=n).to(h.dtype)
    is_kept = target == torch.arange(n, device=target.device)
    keep = is_kept.nonzero().squeeze(1)
    values = (sums[keep] / counts[keep, None]).to(hidden.dtype)
    return MergeStep(keep, values, target, kind, fraction, ub)


@dataclass
class PruneStep:
    """Result of the FrameFusion prune call: ``keep`` ``(M,)`` sorted indices, ``ratio`` the pruning ratio used."""

    keep: Tensor
    ratio: float


def framefusion_prune(attention: Tensor, sparsity: Sequence[float], cost: float, num_layers: int = REFERENCE_NUM_LAYERS) -> PruneStep:
    """The FrameFusion prune call: keep the ``round(N * (1 - ratio))`` most attended visual tokens.

    Args:
        attention: ``(N,)`` the last query token's attention to the visual tokens present, mean over heads.
        sparsity: every fraction the merge calls recorded (the last, ``< ratio_lower_bound``, included).
    """
    ratio = pruning_ratio_needed(sparsity, cost, num_layers)
    n = attention.shape[0]
    count = min(n, round(n * (1 - ratio)))  # Python round: half to even
    return PruneStep(top_indices(attention.float(), count), ratio)


@dataclass
class FrameFusionState:
    """Per batch row, what the calls of one prefill share (the reference's ``prepare`` fields)."""

    sparsity: list[float] = field(default_factory=list)
    merging_done: bool = False
    pruning_done: bool = False
    calls: list[dict] = field(default_factory=list)  # per effective call: kind, site, counts (diagnostics)

    @property
    def wants_merge(self) -> bool:
        return not self.merging_done

    @property
    def wants_prune(self) -> bool:
        return self.merging_done and not self.pruning_done


def _check_fraction(value: float, name: str, low: float, high: float, closed_low: bool = True) -> float:
    ok_type = not isinstance(value, bool) and isinstance(value, (int, float))
    ok = ok_type and (low <= value if closed_low else low < value) and value <= high
    if not ok:
        bracket = "[" if closed_low else "("
        raise ValueError(f"{name} must be a number in {bracket}{low:g}, {high:g}]; got {value!r}")
    return float(value)


@register("framefusion")
@dataclass
class FrameFusion(LayerPolicy):
    """FrameFusion (ICCV 2025) inside the language model, prefill only.

    Args:
        cost: target mean fraction of visual tokens per call, over ``num_layers`` calls (0.3 in the
            reference: its "70% reduction"; the FLOPs budget). In ``(0, 1]``.
        similarity_lower_bound: a token merges into its slot predecessor when their cosine is
            ``>=`` this (0.6). Values above 1 disable merging.
        ratio_lower_bound: merging stops once a call's candidate fraction is below this (0.1), in ``[0, 1]``.
        num_layers: the depth the budget is spread over. 28 (default) is the reference's hard-coded
            value, used upstream whatever the model's depth; ``None`` takes the wrapped model's depth
            (the two agree on 28-layer models such as Qwen2-7B).
        retain: another name for ``cost`` (the fraction of visual tokens kept, averaged over the
            layers), so that ``tc.wrap(model, "framefusion", retain=0.3)`` works like every policy;
            give one of the two.

    How many tokens remain at the end is data-dependent.
    """

    retain: float | None = None  # type: ignore[assignment]
    cost: float | None = None
    similarity_lower_bound: float = 0.6
    ratio_lower_bound: float = 0.1
    num_layers: int | None = REFERENCE_NUM_LAYERS

    #: The engine drives this policy through :mod:`tokcompress.framefusion_sites`, not at one fixed layer.
    stepped: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.retain is not None:
            retain = check_retain(self.retain)
            if self.cost is not None and self.cost != retain:
                raise ValueError(
                    f"framefusion: retain is another name for cost; got retain={self.retain!r} and cost={self.cost!r}, give one"
                )
            self.cost = self.retain = retain
        self.cost = _check_fraction(0.3 if self.cost is None else self.cost, "cost", 0.0, 1.0, closed_low=False)
        self.retain = self.cost
        sim = self.similarity_lower_bound
        if isinstance(sim, bool) or not isinstance(sim, (int, float)) or not math.isfinite(sim) or sim < -1.0:
            raise ValueError(f"similarity_lower_bound must be a finite number >= -1 (a cosine bound); got {sim!r}")
        self.similarity_lower_bound = float(sim)
        self.ratio_lower_bound = _check_fraction(self.ratio_lower_bound, "ratio_lower_bound", 0.0, 1.0)
        n = self.num_layers
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"num_layers must be None (the model's depth) or an int >= 1; got {n!r}")

    @property
    def label(self) -> str:
        return (
            f"framefusion(cost={self.cost:g}, similarity_lower_bound={self.similarity_lower_bound:g}, "
            f"ratio_lower_bound={self.ratio_lower_bound:g})"
        )

    def resolve_layer(self, depth: int) -> int:
        return 0  # acts from layer 0 on; the sites are data-dependent

    def layer_explicit(self) -> bool:
        return False

    def budget_layers(self, depth: int) -> int:
        """``num_layers`` of the budget for a model of ``depth`` decoder layers."""
        return depth if self.num_layers is None else self.num_layers

    def merge(self, state: FrameFusionState, hidden: Tensor, slot: Tensor, depth: int) -> MergeStep:
        """Run one merge call for a row and advance its ``state``."""
        step = framefusion_merge(
            hidden, slot, state.sparsity, self.cost, self.similarity_lower_bound, self.ratio_lower_bound, self.budget_layers(depth)
        )
        if step.kind == MERGE_TOPK:
            state.merging_done = state.pruning_done = True
        else:
            state.sparsity.append(step.fraction)
            state.merging_done = step.kind == MERGE_LAST
        return step

    def prune(self, state: FrameFusionState, attention: Tensor, depth: int) -> PruneStep:
        """Run the prune call for a row (``attention`` ``(N,)``, mean over heads) and advance its ``state``."""
        step = framefusion_prune(attention, state.sparsity, self.cost, self.budget_layers(depth))
        state.pruning_done = True
        return step

    def select(self, tokens: LayerTokens):  # pragma: no cover - the sites driver calls merge/prune
        raise TypeError("framefusion acts at data-dependent sites; the engine calls FrameFusion.merge / .prune")
