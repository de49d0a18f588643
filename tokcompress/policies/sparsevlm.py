"""SparseVLM: text raters chosen from the prompt rank the visual tokens at a few decoder layers; pruned
tokens are partly recycled into a few merged ones.

Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model
Inference", ICML 2025. Reference: Gumpest/SparseVLMs, ``USE_VERSION=1_0`` (v1.5, the default):
``modelling_sparse_llama.py::LlamaDynamicvitModel.forward``, ``score.py`` (rater choice, budgets),
``utils.py::cluster_and_merge`` (recycling).

* **Raters** (once, on the language model's input embeddings): ``M = V @ Tᵀ`` (visual tokens ×
  the prompt tokens after the video, raw dot products), ``s = softmax(M, over text).mean(over
  visual)``; the raters are the text tokens with ``s_j > mean(s)``.
* **Ranking** at each pruning layer ``l`` (reference ``l = 2, 6, 15`` of 32): the raters'
  attention of layer ``l`` (mean over heads, then over raters) scores the visual tokens; the top
  ``K_l`` survive and layers ``> l`` run on them (here: stage ``K = l + 1``).
* **Recycling**: of the ``p`` pruned tokens, the ``m = int(0.3 p) + 1`` most attended are
  clustered with DPC-kNN (``c = m // 10 + 1`` centres, ``c`` neighbours) on the hidden states leaving
  layer ``l``; each cluster becomes one token, the plain mean of its members.

Deviations (README footnote): survivors keep their original positions (the reference renumbers the
shortened sequence) and each merged token takes its cluster centre's slot and position (the
reference appends the merged tokens after the kept ones); when a budget covers every remaining
token nothing is pruned (the reference always prunes at least one token and recycles it); retains
between the reference's four settings interpolate its budget table (see :func:`stage_fractions`);
DPC has no random tie noise (``tokcompress.cluster``); if no text token scores above the mean
(a single text token), every text token rates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import ClassVar, Sequence

import torch
from torch import Tensor

from ..cluster import cluster_sums, dpc_knn, nearest_center, top_scores
from ..policy import LayerPolicy, Policy, check_retain, scaled_layer
from ..registry import register
from ..tokens import Compression, LayerTokens, PromptTokens, TokenSet
from .fastv import top_indices

#: Visual tokens of the reference setting (LLaVA-1.5: one 24x24 image).
REFERENCE_TOKENS = 576
#: v1.5 budget table of ``score.py``: RETAIN_TOKN -> tokens kept after layers (2, 6, 15).
REFERENCE_BUDGETS: dict[int, tuple[int, int, int]] = {
    64: (66, 30, 17),
    96: (238, 48, 26),
    128: (303, 110, 36),
    192: (300, 200, 110),
}
#: First layers that run on the pruned sequence in the reference (pruning_loc 2, 6, 15, plus one) and its depth.
REFERENCE_LAYERS: tuple[int, int, int] = (3, 7, 16)
REFERENCE_DEPTH = 32


def choose_raters(visual: Tensor, text: Tensor) -> Tensor:
    """SparseVLM's rater text tokens.

    Args:
        visual: ``(N, D)`` input embeddings of the visual tokens.
        text: ``(T, D)`` input embeddings of the prompt tokens after the video.

    Returns:
        ``(R,)`` sorted int64 indices into ``text`` whose relevance ``softmax(V Tᵀ, over text).mean(over
        visual)`` is above its mean; all of them when none is (e.g. ``T = 1``).
    """
    if visual.dim() != 2 or text.dim() != 2 or visual.shape[1] != text.shape[1] or text.shape[0] == 0:
        raise ValueError(
            f"visual (N, D) and text (T >= 1, D) must share D; got {tuple(visual.shape)} and {tuple(text.shape)}"
        )
    if visual.shape[0] == 0:
        return torch.arange(text.shape[0], device=text.device)
    relevance = (visual.float() @ text.float().T).softmax(dim=1).mean(dim=0)  # (T,)
    raters = (relevance > relevance.mean()).nonzero().squeeze(1)
    return raters if raters.numel() else torch.arange(text.shape[0], device=text.device)


def stage_fractions(retain: float) -> tuple[Fraction, ...]:
    """Kept fraction of the entering visual tokens after each of the three pruning layers.

    At the reference settings (``retain = RETAIN_TOKN / 576`` for RETAIN_TOKN 64, 96, 128, 192) these
    are the v1.5 table divided by 576, exactly; between two settings (or between 192/576 and
    ``retain = 1``, which keeps everything) each stage's fraction is interpolated linearly; below
    64/576 the 64 row is scaled by ``retain / (64/576)``.
    """
    retain = check_retain(retain)
    r = Fraction(retain).limit_denominator(1_000_000)
    anchors = [(Fraction(t, REFERENCE_TOKENS), [Fraction(x, REFERENCE_TOKENS) for x in row]) for t, row in sorted(REFERENCE_BUDGETS.items())]
    anchors.append((Fraction(1), [Fraction(1)] * 3))
    low, low_row = anchors[0]
    if r <= low:
        return tuple(f * r / low for f in low_row)
    for (r0, f0), (r1, f1) in zip(anchors, anchors[1:]):
        if r <= r1:
            t = (r - r0) / (r1 - r0)
            return tuple(a + (b - a) * t for a, b in zip(f0, f1))
    raise AssertionError("unreachable: retain <= 1")


def stage_count(fraction: Fraction, entered: int) -> int:
    """Visual tokens a stage keeps: ``fraction * entered`` rounded half up (exact), at least 1."""
    return max(1, math.floor(fraction * entered + Fraction(1, 2)))


def schedule_layers(depth: int, reference: Sequence[int] = REFERENCE_LAYERS, reference_depth: int = REFERENCE_DEPTH) -> tuple[int, ...]:
    """The stages' ``K`` for a language model of ``depth`` layers: the reference's, scaled, made strictly increasing.

    Each is :func:`~tokcompress.policy.scaled_layer`; a stage that lands on or before the previous one
    moves to the next layer (32 -> 3, 7, 16; 28 -> 3, 6, 14; 4 -> 1, 2, 3).
    """
    out: list[int] = []
    for ref in reference:
        k = scaled_layer(ref, reference_depth, depth)
        out.append(max(k, out[-1] + 1) if out else k)
    if out[-1] > depth - 1:
        raise ValueError(
            f"sparsevlm: a language model of {depth} layers has no room for {len(out)} pruning stages "
            f"(layers 1..{depth - 1}); pass fewer layers= and keep="
        )
    return tuple(out)


@dataclass
class Recycled:
    """Result of :func:`sparsevlm_prune`.

    Attributes:
        keep: ``(M,)`` sorted indices of the tokens that stay: the survivors and the cluster centres,
            which carry the merged tokens.
        values: ``(M, D)`` hidden states at ``keep`` (the centres' replaced by their cluster means), or
            ``None`` when nothing was merged.
        assign: ``(N,)`` slot in ``keep`` of every token (survivors their own, recycled tokens their
            cluster's, others ``-1``).
        survivors: ``(S,)`` sorted indices of the top-scored survivors.
        recycled: ``(m,)`` indices of the recycled candidates, most attended first.
        centres: ``(c,)`` indices of the cluster centres (carriers of the merged tokens).
    """

    keep: Tensor
    values: Tensor | None
    assign: Tensor
    survivors: Tensor
    recycled: Tensor
    centres: Tensor


def sparsevlm_prune(hidden: Tensor, scores: Tensor, count: int, recycle: float = 0.3, cluster_size: int = 10) -> Recycled:
    """One SparseVLM pruning layer over the current visual tokens.

    Args:
        hidden: ``(N, D)`` hidden states of the visual tokens leaving the scored layer.
        scores: ``(N,)`` the raters' attention (mean over heads and raters).
        count: survivors (``>= N``: nothing is pruned).
        recycle: share of the pruned tokens recycled (``int(recycle * p) + 1`` candidates); 0 turns
            recycling off.
        cluster_size: candidates per merged token (``m // cluster_size + 1`` clusters).
    """
    n = scores.numel()
    device = scores.device
    every = torch.arange(n, device=device)
    empty = every[:0]
    if count >= n:
        return Recycled(every, None, every.clone(), every, empty, empty)
    survivors = top_indices(scores.float(), count)
    is_kept = torch.zeros(n, dtype=torch.bool, device=device)
    is_kept[survivors] = True
    pruned = (~is_kept).nonzero().squeeze(1)
    assign = torch.full((n,), -1, dtype=torch.long, device=device)
    if recycle == 0:
        assign[survivors] = torch.arange(survivors.numel(), device=device)
        return Recycled(survivors, None, assign, survivors, empty, empty)
    m = min(pruned.numel(), int(pruned.numel() * recycle) + 1)
    recycled = pruned[top_scores(scores.float()[pruned], m)]
    c = m // cluster_size + 1
    x = hidden[recycled].float()
    dpc = dpc_knn(x, c, c)
    label = nearest_center(x, dpc.index, dpc.dist)
    label[dpc.index] = torch.arange(c, device=device)  # a centre belongs to its own cluster
    sums, sizes = cluster_sums(x, label, c)
    merged = sums / sizes[:, None]
    centres = recycled[dpc.index]
    keep = torch.cat([survivors, centres]).sort().values
    slot = torch.full((n,), -1, dtype=torch.long, device=device)
    slot[keep] = torch.arange(keep.numel(), device=device)
    assign[survivors] = slot[survivors]
    assign[recycled] = slot[centres[label]]
    values = hidden[keep].clone()
    values[slot[centres]] = merged.to(hidden.dtype)
    return Recycled(keep, values, assign, survivors, recycled, centres)


@dataclass
class SparseVLMStage(LayerPolicy):
    """One pruning layer of :class:`SparseVLM` (built by it; not registered on its own)."""

    fraction: Fraction = Fraction(1)
    layer: int | None = None
    index: int = 0
    reference: tuple[int, ...] = REFERENCE_LAYERS
    recycle: float = 0.3
    cluster_size: int = 10
    retain: float = field(init=False, default=1.0)

    name: ClassVar[str] = "sparsevlm"
    queries: ClassVar[str] = "chosen"

    def __post_init__(self) -> None:
        self.fraction = Fraction(self.fraction).limit_denominator(1_000_000)
        self.retain = float(self.fraction)

    @property
    def label(self) -> str:
        return f"sparsevlm[{self.index}](keep={float(self.fraction):.4g}, layer={self.layer if self.layer is not None else 'auto'})"

    def resolve_layer(self, depth: int) -> int:
        return self.layer if self.layer is not None else schedule_layers(depth, self.reference)[self.index]

    def choose_queries(self, prompt: PromptTokens) -> Tensor:
        return choose_raters(prompt.visual, prompt.text)

    def select(self, tokens: LayerTokens) -> Compression:
        scores = tokens.attention.float().mean(dim=0).mean(dim=0)  # heads, then raters
        entered = tokens.entered if tokens.entered is not None else tokens.num_tokens
        count = stage_count(self.fraction, entered)
        out = sparsevlm_prune(tokens.hidden, scores, count, self.recycle, self.cluster_size)
        info = {"count": count, "recycled": int(out.recycled.numel()), "merged": int(out.centres.numel())}
        if tokens.queries is not None:
            info["raters"] = tokens.queries.detach()
        return Compression(keep=out.keep, values=out.values, assign=out.assign, info=info)


def _check_layers(layers: Sequence[int] | None) -> tuple[int, ...] | None:
    if layers is None:
        return None
    ok = isinstance(layers, (tuple, list)) and len(layers) > 0
    ok = ok and all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in layers)
    if not ok or any(b <= a for a, b in zip(layers, layers[1:])):
        raise ValueError(f"layers must be None (the scaled reference schedule) or increasing ints >= 1; got {layers!r}")
    return tuple(layers)


def _check_keep(keep: Sequence[float] | None) -> tuple[float, ...] | None:
    if keep is None:
        return None
    if not isinstance(keep, (tuple, list)) or not keep:
        raise ValueError(f"keep must be None (from retain) or a non-empty sequence of fractions in (0, 1]; got {keep!r}")
    return tuple(check_retain(k, "keep") for k in keep)


@register("sparsevlm")
@dataclass
class SparseVLM(Policy):
    """SparseVLM (ICML 2025, v1.5 with recycling) as a chain of in-layer stages.

    Args:
        retain: the reference's ``RETAIN_TOKN / 576``: 192/576 (default), 128/576, 96/576 and 64/576
            take its hand-tuned budget table (e.g. 64/576 keeps 66, 30 and 17 of 576 tokens), scaled
            to the visual tokens that enter the language model; other values interpolate it
            (:func:`stage_fractions`); 1.0 keeps everything.
        layers: each stage's ``K`` (the first layer running on its survivors; its attention comes from
            layer ``K - 1``). ``None``: the reference's 3, 7, 16 of 32 (pruning after layers 2, 6, 15),
            scaled to the depth (:func:`schedule_layers`).
        keep: per stage, the kept fraction of the entering visual tokens, instead of ``retain``'s table
            (needed when ``layers`` has other than three entries).
        recycle: share of the pruned tokens recycled into merged tokens (0.3; 0 turns recycling off).
        cluster_size: recycled tokens per merged token (10).
    """

    retain: float = 192 / REFERENCE_TOKENS
    layers: tuple[int, ...] | None = None
    keep: tuple[float, ...] | None = None
    recycle: float = 0.3
    cluster_size: int = 10

    stage: ClassVar[str] = "layer"

    def __post_init__(self) -> None:
        self.retain = check_retain(self.retain)
        self.layers = _check_layers(self.layers)
        self.keep = _check_keep(self.keep)
        if isinstance(self.recycle, bool) or not isinstance(self.recycle, (int, float)) or not 0.0 <= self.recycle <= 1.0:
            raise ValueError(f"recycle must be a share in [0, 1] of the pruned tokens (0.3 upstream; 0: off); got {self.recycle!r}")
        if isinstance(self.cluster_size, bool) or not isinstance(self.cluster_size, int) or self.cluster_size < 1:
            raise ValueError(f"cluster_size must be an int >= 1 (recycled tokens per merged token, 10 upstream); got {self.cluster_size!r}")
        fractions: tuple[Fraction | float, ...] = self.keep if self.keep is not None else stage_fractions(self.retain)
        count = len(self.layers) if self.layers is not None else len(REFERENCE_LAYERS)
        if len(fractions) != count:
            raise ValueError(
                f"keep has {len(fractions)} fractions for {count} stages (layers={self.layers!r}); give one per layer"
            )
        self._stages = tuple(
            SparseVLMStage(
                fraction=f,
                layer=None if self.layers is None else self.layers[i],
                index=i,
                recycle=float(self.recycle),
                cluster_size=self.cluster_size,
            )
            for i, f in enumerate(fractions)
        )

    @property
    def label(self) -> str:
        layers = "auto" if self.layers is None else ",".join(map(str, self.layers))
        return f"sparsevlm(retain={self.retain:g}, layers={layers})"

    def stages(self) -> list[Policy]:
        return list(self._stages)

    def compress(self, tokens: TokenSet) -> Compression:
        raise TypeError(
            "policy 'sparsevlm' acts inside the language model; wrap a model with it (tokcompress.wrap) "
            "instead of calling it on input tokens"
        )
