"""HoliTom's inner-LLM merge: at layer ``K``, merge the least attended visual tokens into their most similar kept ones.

Shao et al., "HoliTom: Holistic Token Merging for Fast Video Large Language Models", NeurIPS 2025.
Reference: cokeshao/HoliTom @ e9b2972f, ``holitom/modeling_qwen2.py::Qwen2Model_holitom.forward``
(branch ``layer_idx == HOLITOM_k``, prefill only).

The last prompt token's attention at layer ``K - 1`` (mean over heads) picks the
``round(N * (1 - r))`` kept visual tokens (Python ``round``, half to even). Every other visual token
is averaged into the kept token of highest cosine similarity (computed once, on the hidden states
entering layer ``K``, ``dot / (|x| |y|)`` without eps), visiting dropped tokens in ascending position
with the running update ``h[target] = (h[target] + h[dropped]) / 2``. So a kept token with ``m``
merges ``d_1 < ... < d_m`` ends as ``h0 / 2^m + sum_j h[d_j] / 2^(m - j + 1)``: not a cluster mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..policy import LayerPolicy, check_layer, check_retain, scaled_layer
from ..registry import register
from ..tokens import Compression, LayerTokens
from .fastv import ratio_round, top_indices


@dataclass
class InnerMerge:
    """Result of :func:`holitom_inner_merge`.

    Attributes:
        keep: ``(M,)`` sorted indices of the kept tokens.
        values: ``(M, D)`` their hidden states after the merge.
        dropped: ``(N - M,)`` ascending indices of the merged-away tokens.
        target: ``(N - M,)`` index (into the input) of the kept token each dropped token went into.
    """

    keep: Tensor
    values: Tensor
    dropped: Tensor
    target: Tensor


def holitom_inner_merge(hidden: Tensor, scores: Tensor, count: int) -> InnerMerge:
    """HoliTom's in-LLM merge core.

    Args:
        hidden: ``(N, D)`` hidden states of the visual tokens entering layer ``K``.
        scores: ``(N,)`` attention of the last prompt token at layer ``K - 1`` (mean over heads).
        count: visual tokens kept (``0 <= count <= N``); with 0 every token is dropped and nothing merged.

    The sequential running average of the reference is computed in closed form: with its targets
    fixed up front, the update order only decides each token's weight, which is a power of two.
    """
    n = hidden.shape[0]
    if not 0 <= count <= n:
        raise ValueError(f"count must be in [0, {n}]; got {count}")
    keep = top_indices(scores.float(), count)
    is_kept = torch.zeros(n, dtype=torch.bool, device=hidden.device)
    is_kept[keep] = True
    dropped = (~is_kept).nonzero().squeeze(1)
    if count == 0 or dropped.numel() == 0:  # nothing to merge into, or nothing to merge
        return InnerMerge(keep, hidden[keep], dropped, dropped.new_full((dropped.numel(),), -1))
    h = hidden.float()
    kept_h, drop_h = h[keep], h[dropped]
    sim = (drop_h @ kept_h.T) / (drop_h.norm(dim=-1)[:, None] * kept_h.norm(dim=-1)[None, :])
    slot = sim.argmax(dim=-1)  # (n_drop,) slot in keep; ties -> first (lowest index)
    # Rank of each dropped token among those merged into the same slot (ascending position).
    order = torch.argsort(slot * n + dropped)  # group by slot, then by position
    counts = torch.bincount(slot, minlength=count)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(slot)
    rank[order] = torch.arange(slot.numel(), device=slot.device) - starts[slot[order]]
    m = counts[slot]  # merges into this token's target
    weight_drop = torch.pow(2.0, -(m - rank).double()).to(h.dtype)  # last merged weighs 1/2
    weight_keep = torch.pow(2.0, -counts.double()).to(h.dtype)
    values = kept_h * weight_keep[:, None]
    values = values.index_add(0, slot, drop_h * weight_drop[:, None])
    return InnerMerge(keep, values.to(hidden.dtype), dropped, keep[slot])


@register("holitom_inner")
@dataclass
class HoliTomInner(LayerPolicy):
    """HoliTom's inner-LLM merge (NeurIPS 2025) as an in-layer policy.

    Args:
        retain: fraction of the visual tokens that layers ``>= layer`` keep, ``1 - HOLITOM_r``
            (reference default ``HOLITOM_r = 0.5``). Budget: ``round(N * (1 - r))``, half to even.
        layer: ``K`` (``HOLITOM_k``). ``None`` takes the reference's 18 for a 28-layer model (Qwen2-7B),
            scaled to the model's depth (:func:`tokcompress.policy.scaled_layer`: 4 layers -> 3).

    The candidates are the video grid tokens reaching the language model; special tokens in a video
    span (LLaVA-OneVision's newline, which the reference counts in its span) are always kept.
    Merged hidden states are computed in float32 (the reference updates in the model's dtype).
    """

    retain: float = 0.5
    layer: int | None = None

    #: (K, depth) of the reference setting: LLaVA-OneVision-7B (Qwen2-7B, 28 layers), K = 18.
    reference_layer = (18, 28)

    def __post_init__(self) -> None:
        self.retain = check_retain(self.retain)
        self.layer = check_layer(self.layer)

    @property
    def label(self) -> str:
        return f"holitom_inner(retain={self.retain:g}, layer={self.layer if self.layer is not None else 'auto'})"

    def resolve_layer(self, depth: int) -> int:
        return self.layer if self.layer is not None else scaled_layer(*self.reference_layer, depth)

    def budget(self, n: int) -> int:
        return min(n, ratio_round(n, 1.0 - self.retain))

    def select(self, tokens: LayerTokens) -> Compression:
        scores = tokens.attention.float().mean(dim=0)[-1]
        merged = holitom_inner_merge(tokens.hidden, scores, self.budget(tokens.num_tokens))
        assign = torch.full((tokens.num_tokens,), -1, dtype=torch.long, device=tokens.hidden.device)
        assign[merged.keep] = torch.arange(merged.keep.numel(), device=assign.device)
        if merged.dropped.numel():
            slot_of = torch.full_like(assign, -1)
            slot_of[merged.keep] = torch.arange(merged.keep.numel(), device=assign.device)
            assign[merged.dropped] = slot_of[merged.target]
        values = merged.values if merged.dropped.numel() and merged.keep.numel() else None
        return Compression(keep=merged.keep, values=values, assign=assign, info={"merged": int(merged.dropped.numel())})
