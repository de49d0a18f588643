"""PruneVid: static/dynamic token merging before the LLM, then question-guided pruning inside it.

Huang, Zhou, Han, "PruneVid: Visual Token Pruning for Efficient Video Large Language Models",
ACL 2025 Findings. Reference: Visual-AI/PruneVid @ b12600c6 (PLLaVA only):
``models/pllava/modeling_pllava.py`` (``cluster_dpc_knn``, ``refine_clusters``, ``segment_lengths``,
``PllavaForConditionalGeneration.{merge_frames_dynamic, spatial_merge_tokens,
compute_cluster_vectors}``) for the outer stage, ``models/pllava/elastic_cache.py::VTPWindowCache``
with ``models/pllava/llama.py::LlamaModelVTP.forward`` for the inner one.

Outer stage (query-independent, before the LLM): frames are clustered in time (DPC-kNN on the
frame means, then runs made contiguous); inside each temporal window a position whose mean pairwise
cosine over the window's frames exceeds ``tau`` is static and becomes one token (the mean over the
window); each group (a window's static tokens, each frame's dynamic tokens) of more than 14 tokens
is merged by DPC-kNN into ``int(size * cluster_ratio)`` cluster means.

Inner stage: after layer ``selected_layer`` of the prefill, every video token is scored by its
largest attention from any token after the video (max over heads, then over those query rows);
each group of the outer stage's layout (a window's static tokens, each frame's dynamic tokens)
keeps its ``int(size * alpha)`` best; the KV caches of layers ``0 .. selected_layer`` are cut to the
survivors too and the later layers run on them, original positions kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..cluster import dpc_knn, nearest_center
from ..policy import LayerPolicy, Policy, check_layer, check_positions, check_retain, scaled_layer
from ..registry import register
from ..tokens import Compression, LayerTokens, TokenSet, selection
from .fastv import top_indices

#: Groups of at most this many tokens are not merged (hard-coded in the reference).
MERGE_ABOVE = 14
#: k of the spatial DPC-kNN merges (hard-coded in the reference).
SPATIAL_K = 7


def runs(labels: list[int]) -> list[tuple[int, int, int]]:
    """Maximal runs of equal labels as ``(start, end, label)``, ``end`` exclusive."""
    out, start = [], 0
    for i in range(1, len(labels) + 1):
        if i == len(labels) or labels[i] != labels[start]:
            out.append((start, i, labels[start]))
            start = i
    return out


def refine_segments(labels: list[int]) -> list[int]:
    """PruneVid's ``refine_clusters``: make every cluster of frames one contiguous run.

    Per label, the runs as long as its longest run are kept (all of them on a tie) unless that
    length is 1; every other run is dissolved. Left to right, each dissolved stretch then takes the
    label of the longer neighbouring run (lengths on the labels as relabelled so far; tie: the left
    one if it exists; no neighbour: 0).
    """
    longest: dict[int, int] = {}
    for s, e, label in runs(labels):
        longest[label] = max(longest.get(label, 0), e - s)
    out = list(labels)
    for s, e, label in runs(labels):
        if e - s != longest[label] or longest[label] == 1:
            out[s:e] = [-1] * (e - s)
    i, n = 0, len(out)
    while i < n:
        if out[i] != -1:
            i += 1
            continue
        j = i
        while j < n and out[j] == -1:
            j += 1
        left_len = right_len = 0
        while i - left_len - 1 >= 0 and out[i - left_len - 1] == out[i - 1]:
            left_len += 1
        while j < n and j + right_len < n and out[j + right_len] == out[j]:
            right_len += 1
        if i == 0 and j == n:
            new = 0
        elif j == n or (i > 0 and left_len >= right_len):
            new = out[i - 1]
        else:
            new = out[j]
        out[i:j] = [new] * (j - i)
        i = j
    return out


def temporal_segments(frame_means: Tensor, k: int, ratio: float) -> tuple[list[int], list[int]]:
    """DPC-kNN clusters of the frames (``int(T * ratio)`` of them, at least 1) and their refinement.

    Returns ``(raw labels, refined labels)``, one per frame; a label is its centre's score rank. ``k``
    is capped at ``T`` (the reference fails when ``T < k``).
    """
    t = frame_means.shape[0]
    count = max(1, min(t, int(t * ratio)))
    dpc = dpc_knn(frame_means.float(), min(k, t), count)
    labels = nearest_center(frame_means.float(), dpc.index, dpc.dist)
    labels[dpc.index] = torch.arange(count, device=labels.device)
    raw = labels.tolist()
    return raw, refine_segments(raw)


def static_positions(window: Tensor, tau: float) -> Tensor:
    """``(W, n, D) -> (n,)`` bool: mean off-diagonal pairwise cosine over the window's frames ``> tau``.

    A single frame gives 0/0 (NaN), hence no static position.
    """
    w = window.shape[0]
    x = F.normalize(window.float(), dim=-1)
    total = torch.einsum("apd,bpd->p", x, x)
    return (total - w) / (w * (w - 1)) > tau


def dpc_merge(x: Tensor, count: int, k: int = SPATIAL_K) -> tuple[Tensor, Tensor, Tensor]:
    """Merge ``x`` ``(M, D)`` into ``count`` DPC-kNN clusters.

    Returns ``(centres (count,) in score-rank order, labels (M,) cluster of each token, means (count, D))``:
    each token goes to its nearest centre (ties: the higher-ranked), a centre to itself; a cluster's
    value is the plain mean of its members, centre included.
    """
    dpc = dpc_knn(x.float(), min(k, x.shape[0]), count)
    labels = nearest_center(x.float(), dpc.index, dpc.dist)
    labels[dpc.index] = torch.arange(count, device=labels.device)
    sums = torch.zeros(count, x.shape[1], dtype=torch.float32, device=x.device).index_add_(0, labels, x.float())
    sizes = torch.bincount(labels, minlength=count).clamp(min=1).to(sums.dtype)
    return dpc.index, labels, (sums / sizes[:, None]).to(x.dtype)


@dataclass
class OuterMerge:
    """Result of :func:`prunevid_merge` for one video of ``T`` frames of ``n`` tokens.

    Attributes:
        order: ``(M,)`` flat index ``t * n + i`` of the token carrying each output token, in the
            reference's emitted order (a static token is carried by its window's first frame, a
            cluster by its centre).
        values: ``(M, D)`` the output tokens in that order.
        assign: ``(T * n,)`` output token (index into ``order``) each input token went into.
        groups: ``(M,)`` group of each output token: one per window's static tokens, one per frame's
            dynamic tokens, numbered in emitted order.
        window_sizes, static_sizes, dynamic_sizes: per temporal window.
        static_mask: ``(W, n)`` bool.
        segment_labels_raw, segment_labels: ``(T,)`` temporal cluster of each frame before/after refinement.
    """

    order: Tensor
    values: Tensor
    assign: Tensor
    groups: Tensor
    window_sizes: list[int] = field(default_factory=list)
    static_sizes: list[int] = field(default_factory=list)
    dynamic_sizes: list[int] = field(default_factory=list)
    static_mask: Tensor | None = None
    segment_labels_raw: list[int] = field(default_factory=list)
    segment_labels: list[int] = field(default_factory=list)


def prunevid_merge(features: Tensor, tau: float, temporal_segment_ratio: float, cluster_ratio: float, k: int) -> OuterMerge:
    """PruneVid's outer stage on one video ``(T, n, D)`` (see the module docstring)."""
    t, n, d = features.shape
    device = features.device
    raw, labels = temporal_segments(features.float().mean(dim=1), k, temporal_segment_ratio)
    result = OuterMerge(
        order=torch.zeros(0, dtype=torch.long, device=device),
        values=features.new_zeros(0, d),
        assign=torch.full((t * n,), -1, dtype=torch.long, device=device),
        groups=torch.zeros(0, dtype=torch.long, device=device),
        segment_labels_raw=raw,
        segment_labels=labels,
    )
    orders, values, groups, masks = [], [], [], []
    emitted = 0
    positions = torch.arange(n, device=device)

    def emit(carriers: Tensor, members: Tensor, vals: Tensor, token_slot: Tensor) -> None:
        """``carriers`` (m,) flat carriers; ``members`` (r,) flat inputs with ``token_slot`` (r,) output index in 0..m-1."""
        nonlocal emitted
        orders.append(carriers)
        values.append(vals)
        groups.append(torch.full((carriers.numel(),), len(groups), dtype=torch.long, device=device))
        result.assign[members] = token_slot + emitted
        emitted += carriers.numel()

    for start, stop, _ in runs(labels):
        window = features[start:stop]
        static = static_positions(window, tau)
        masks.append(static)
        result.window_sizes.append(stop - start)
        sp, dp = positions[static], positions[~static]
        # static tokens: the window mean at each static position, carried by the window's first frame
        members = (torch.arange(start, stop, device=device)[:, None] * n + sp[None]).reshape(-1)
        slot = torch.arange(sp.numel(), device=device).repeat(stop - start)
        means = window[:, static].float().mean(dim=0).to(features.dtype)
        if sp.numel() > MERGE_ABOVE:
            centres, lab, means = dpc_merge(means, max(1, int(sp.numel() * cluster_ratio)))
            emit(start * n + sp[centres], members, means, lab.repeat(stop - start))
        else:
            emit(start * n + sp, members, means, slot)
        result.static_sizes.append(orders[-1].numel())
        dynamic = 0
        for f in range(start, stop):
            tokens = features[f, ~static]
            members = f * n + dp
            if dp.numel() > MERGE_ABOVE:
                centres, lab, means = dpc_merge(tokens, max(1, int(dp.numel() * cluster_ratio)))
                emit(f * n + dp[centres], members, means, lab)
            else:
                emit(members, members, tokens, torch.arange(dp.numel(), device=device))
            dynamic += orders[-1].numel()
        result.dynamic_sizes.append(dynamic)
    result.order = torch.cat(orders)
    result.values = torch.cat(values)
    result.groups = torch.cat(groups)
    result.static_mask = torch.stack(masks)
    return result


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


@register("prunevid_outer")
@dataclass
class PruneVidOuter(Policy):
    """PruneVid's outer stage: temporal windows, static-token merging and spatial DPC-kNN merging.

    Args:
        retain: ``cluster_ratio``, the fraction of a group's tokens its DPC-kNN clusters number
            (``int(size * cluster_ratio)``; groups of at most 14 tokens are not merged). The whole
            video keeps less than this: static positions also collapse over time.
        tau: a position is static in a window when its mean pairwise cosine is above it (0.8).
        temporal_segment_ratio: temporal clusters per frame (0.25: ``int(T / 4)`` clusters).
        k: neighbours of the temporal DPC-kNN density (7; capped at ``T``, where the reference fails).
        positions: ``"kept"`` (each output token takes the position of the token carrying it: the
            window's first frame for a static token, the centre for a cluster) or ``"compacted"``
            (renumbered consecutively as in the reference; 1-D positions only).

    Output tokens sit in position order, not in the reference's score-ranked order;
    ``info["order"]`` gives the reference order and ``info["token_groups"]`` the groups the inner stage prunes.
    """

    retain: float = 0.5
    tau: float = 0.8
    temporal_segment_ratio: float = 0.25
    k: int = 7
    positions: str = "kept"

    accepts_partial: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self.retain = check_retain(self.retain)
        check_positions(self.positions)
        self.temporal_segment_ratio = check_retain(self.temporal_segment_ratio, "temporal_segment_ratio")
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)):
            raise ValueError(f"tau must be a number (cosine threshold, 0.8 upstream); got {self.tau!r}")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be an int >= 1 (DPC-kNN neighbours, 7 upstream); got {self.k!r}")

    @property
    def label(self) -> str:
        return f"prunevid_outer(retain={self.retain:g}, tau={self.tau:g})"

    def compress(self, tokens: TokenSet) -> Compression:
        tokens.require_full(self.name)
        merged = prunevid_merge(tokens.features, self.tau, self.temporal_segment_ratio, self.retain, self.k)
        keep, slot = torch.sort(merged.order)
        back = torch.empty_like(slot)
        back[slot] = torch.arange(slot.numel(), device=slot.device)  # emitted index -> slot in keep
        info = {
            "order": merged.order,
            "token_groups": merged.groups[slot],
            "window_sizes": merged.window_sizes,
            "static_sizes": merged.static_sizes,
            "dynamic_sizes": merged.dynamic_sizes,
            "static_mask": merged.static_mask,
            "segment_labels_raw": merged.segment_labels_raw,
            "segment_labels": merged.segment_labels,
        }
        return Compression(keep=keep, values=merged.values[slot], assign=back[merged.assign], info=info)


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


@register("prunevid")
@dataclass
class PruneVid(Policy):
    """PruneVid (ACL 2025 Findings): :class:`PruneVidOuter` before the LLM, :class:`PruneVidInner` inside it.

    Args:
        retain: ``alpha``, the fraction of each group the inner stage keeps (0.4).
        cluster_ratio, tau, temporal_segment_ratio, k, positions: the outer stage's (0.5, 0.8, 0.25, 7, "kept").
        selected_layer: the inner stage's (10 of 32 layers, scaled to the depth when None).

    With the reference defaults PLLaVA-7B keeps about 16% of its video tokens.
    """

    retain: float = 0.4
    cluster_ratio: float = 0.5
    tau: float = 0.8
    temporal_segment_ratio: float = 0.25
    k: int = 7
    selected_layer: int | None = None
    positions: str = "kept"

    accepts_partial: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self.cluster_ratio = check_retain(self.cluster_ratio, "cluster_ratio")
        self._parts = (
            PruneVidOuter(self.cluster_ratio, self.tau, self.temporal_segment_ratio, self.k, self.positions),
            PruneVidInner(self.retain, self.selected_layer),
        )
        self.retain = self._parts[1].retain

    @property
    def label(self) -> str:
        return " -> ".join(p.label for p in self._parts)

    def stages(self) -> list[Policy]:
        return list(self._parts)

    def compress(self, tokens: TokenSet) -> Compression:
        return self._parts[0](tokens)
