"""PruneVid: static/dynamic token merging before the LLM, then question-guided pruning inside it.

Huang, Zhou, Han, "PruneVid: Visual Token Pruning for Efficient Video Large Language Models",
ACL 2025 Findings. Reference: Visual-AI/PruneVid @ b12600c6 (PLLaVA only):
``models/pllava/modeling_pllava.py`` (``cluster_dpc_knn``, ``refine_clusters``, ``segment_lengths``,
``PllavaForConditionalGeneration.{merge_frames_dynamic, spatial_merge_tokens,
compute_cluster_vectors}``) for the outer stage, ``models/pllava/elastic_cache.py::VTPWindowCache``
with ``models/pllava/llama.py::LlamaModelVTP.forward`` for the inner one.

Inner stage: after layer ``selected_layer`` of the prefill, every video token is scored by its
largest attention from any token after the video (max over heads, then over those query rows);
each group of the outer stage's layout (a window's static tokens, each frame's dynamic tokens)
keeps its ``int(size * alpha)`` best; the KV caches of layers ``0 .. selected_layer`` are cut to the
survivors too and the later layers run on them, original positions kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..policy import LayerPolicy, check_layer, check_retain, scaled_layer
from ..registry import register
from ..tokens import Compression, LayerTokens, selection
from .fastv import top_indices


def prunevid_scores(attention: Tensor) -> Tensor:
    """``(H, Q, N) -> (N,)``: max over heads, then max over the query rows (the reference's reduction)."""
    return attention.float().amax(dim=0).amax(dim=0)


def prunevid_select(scores: Tensor, groups: Tensor, alpha: float) -> Tensor:
    """PruneVid's question-guided selection core.

    Args:
        scores: ``(N,)`` per-token score (:func:`prunevid_scores`).
        groups: ``(N,)`` int64 group label of each token; every group keeps ``int(size * alpha)``
            (truncated: 13 tokens at 0.4 keep 5; a group can keep none).
        alpha: fraction kept per group.

    Returns:
        ``(M,)`` int64 sorted indices of the kept tokens.
    """
    keep = []
    for label in torch.unique(groups):
        members = (groups == label).nonzero().squeeze(1)
        count = int(members.numel() * alpha)
        if count:
            keep.append(members[top_indices(scores[members], count)])
    if not keep:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    return torch.cat(keep).sort().values


def frame_groups(video: Tensor, frame: Tensor) -> Tensor:
    """One group per (video, frame): the grouping when no outer stage defined one."""
    return video * (int(frame.max()) + 1 if frame.numel() else 1) + frame


@register("prunevid_inner")
@dataclass
class PruneVidInner(LayerPolicy):
    """PruneVid's question-guided pruning inside the LLM (prefill).

    Args:
        retain: ``alpha``, the fraction of each group kept (0.4 in the reference scripts).
        selected_layer: the 0-based layer after which the pruning runs (10 for the 32-layer PLLaVA-7B);
            the layers ``> selected_layer`` run on the survivors and the caches of layers
            ``<= selected_layer`` are cut to them. ``None`` scales 10-of-32 to the model's depth
            (:func:`tokcompress.policy.scaled_layer`, at most ``depth - 2``; 4 layers -> 1).

    Groups come from the outer stage of the chain when it set them (:class:`PruneVid`); otherwise
    each frame of each video is one group.
    """

    retain: float = 0.4
    selected_layer: int | None = None

    queries: ClassVar[str] = "after_video"
    prune_earlier: ClassVar[bool] = True
    #: (selected_layer, depth) of the reference setting: PLLaVA-7B (32 layers), layer 10.
    reference_layer: ClassVar[tuple[int, int]] = (10, 32)

    def __post_init__(self) -> None:
        self.retain = check_retain(self.retain)
        self.selected_layer = check_layer(self.selected_layer, "selected_layer", lowest=0)

    @property
    def label(self) -> str:
        layer = self.selected_layer if self.selected_layer is not None else "auto"
        return f"prunevid_inner(retain={self.retain:g}, selected_layer={layer})"

    def resolve_layer(self, depth: int) -> int:
        selected = self.selected_layer
        if selected is None:
            selected = min(depth - 2, scaled_layer(*self.reference_layer, depth, lowest=0))
        return selected + 1

    def layer_explicit(self) -> bool:
        return self.selected_layer is not None

    def select(self, tokens: LayerTokens) -> Compression:
        groups = tokens.group if tokens.group is not None else frame_groups(tokens.video, tokens.frame)
        return selection(prunevid_select(prunevid_scores(tokens.attention), groups, self.retain))
