"""DyCoke: temporal token merging before the LLM and dynamic KV-cache pruning during decoding.

Tao et al., "DyCoke: Dynamic Compression of Tokens for Fast Video Large Language Models", CVPR 2025.
Reference: KD-TAO/DyCoke @ dd746349: ``llava/model/llava_arch.py::dycole_ttm`` (stage 1) and
``llava/model/language_model/modeling_qwen2.py::PrunableDynamicCache.{update_cache, dycoke_pruning}``
with the DyCoke branch of ``Qwen2Model.forward`` (stage 2).

Stage 1, temporal token merging (TTM), is pure dropping: frames are paired ``(0, 1), (2, 3), ...``
and the second frame of a pair keeps only its ``keep_n = int((1 - dycoke_k) * n)`` tokens least
cosine-similar to the same position in the first; then in windows of four frames, frame ``i + 2``
is pruned the same way against frame ``i``. Frames ``0, 4, 8, ...`` (and the last even frames that
no window reaches) stay whole; with an odd number of frames the last one is dropped entirely.

Stage 2, at every decode step: the current token's attention at layer ``L - 1`` (mean over heads)
over the visual cache entries is compared (cosine) with the previous step's; below 0.9 the layers
``>= L`` read only the ``int(N * (1 - dycoke_p))`` most attended visual entries (plus every other
entry), otherwise the step prunes nothing. The previous attention is updated at every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..policy import DecodePolicy, Policy, check_layer, check_positions, check_retain, scaled_layer
from ..registry import register
from ..tokens import Compression, DecodeChoice, DecodeTokens, TokenSet, selection


def _least_similar(sim: Tensor, count: int) -> Tensor:
    """Indices of the ``count`` smallest ``sim``, in ascending-similarity order (ties: lower index first)."""
    return torch.sort(sim, stable=True).indices[:count]


def dycoke_ttm(features: Tensor, keep_n: int) -> Tensor:
    """DyCoke's temporal token merging core.

    Args:
        features: ``(T, n, D)`` tokens of one video, frame-major.
        keep_n: tokens kept in each pruned frame (``0 <= keep_n <= n``).

    Returns:
        ``(K,)`` int64 flat indices ``t * n + i`` of the kept tokens in the order the reference emits
        them: frame by frame, a pruned frame's tokens in ascending similarity.

    For ``T >= 5`` this is the reference exactly. The reference raises for ``T < 5``; here pass 1
    runs alone there (pass 2 has no window of four frames), and an unpaired last frame (``T = 1``
    or ``3``) is kept whole instead of dropped.
    """
    t, n, _ = features.shape
    if not 0 <= keep_n <= n:
        raise ValueError(f"keep_n must be in [0, {n}]; got {keep_n}")
    x = features.float()
    full = torch.arange(n, device=features.device)
    blocks: dict[int, Tensor] = {}
    for i in range(0, t - 1, 2):  # pass 1: frame i + 1 against frame i (tokens normalised first)
        sim = F.cosine_similarity(F.normalize(x[i], dim=-1), F.normalize(x[i + 1], dim=-1), dim=-1)
        blocks[i] = full + i * n
        blocks[i + 1] = _least_similar(sim, keep_n) + (i + 1) * n
    for i in range(0, t - 4, 4):  # pass 2: frame i + 2 against frame i (no normalisation, as written)
        sim = F.cosine_similarity(x[i], x[i + 2], dim=-1)
        blocks[i] = full + i * n
        blocks[i + 2] = _least_similar(sim, keep_n) + (i + 2) * n
    if t < 5 and t % 2 == 1:  # no reference behaviour here: keep the unpaired last frame
        blocks[t - 1] = full + (t - 1) * n
    return torch.cat([blocks[f] for f in sorted(blocks)])


def ttm_keep(n: int, merging_ratio: float) -> int:
    """``int((1 - merging_ratio) * n)`` in double precision: ``(1 - 0.9) * 30`` gives 2."""
    return int((1.0 - merging_ratio) * n)


def kv_keep(n: int, prune_rate: float) -> int:
    """``int(n * (1 - prune_rate))`` in double precision: ``300 * (1 - 0.8)`` gives 59."""
    return int(n * (1.0 - prune_rate))


def dycoke_kv_step(
    attention: Tensor,
    previous: Tensor | None,
    count: int,
    threshold: float = 0.9,
    available: Tensor | None = None,
) -> tuple[Tensor | None, float]:
    """One decode step of DyCoke's KV pruning.

    Args:
        attention: ``(N,)`` current token's attention at layer ``L - 1`` over the visual entries
            (mean over heads).
        previous: the previous step's ``attention`` (same length), or ``None`` (first step: similarity 0).
        count: entries kept when the step prunes.
        threshold: the step prunes when the cosine similarity is strictly below it (0.9 upstream).
        available: ``(N,)`` bool, entries that can still be chosen (evicting mode); ``None`` = all.

    Returns:
        ``(keep, similarity)``: ``keep`` = sorted indices of the ``min(count, available)`` most
        attended available entries, or ``None`` when the step prunes nothing.
    """
    x = attention.float()
    if previous is None or previous.shape != x.shape:
        similarity = 0.0
    else:
        similarity = float(F.cosine_similarity(x, previous.float().to(x.device), dim=0))
    if not similarity < threshold:
        return None, similarity
    if available is None:
        return torch.sort(x, descending=True, stable=True).indices[:count].sort().values, similarity
    cand = available.nonzero().squeeze(1)
    pick = torch.sort(x[cand], descending=True, stable=True).indices[: min(count, cand.numel())]
    return cand[pick].sort().values, similarity


@register("dycoke_ttm")
@dataclass
class DyCokeTTM(Policy):
    """DyCoke stage 1: temporal token merging (pure dropping), before the LLM.

    Args:
        retain: fraction of the tokens kept in each *pruned* frame, ``1 - dycoke_k`` (reference
            default ``dycoke_k = 0.7``, so 0.3). Per pruned frame ``int((1 - dycoke_k) * n)``. About
            three quarters of the frames are pruned, so the whole video keeps roughly
            ``1/4 + 3/4 * retain`` of its tokens (T = 32, retain 0.3: 49.4%).
        positions: ``"kept"`` (survivors keep their position ids) or ``"compacted"`` (renumbered
            consecutively as in the reference; 1-D positions only).

    The kept tokens stay in their original order (the reference emits a pruned frame's tokens in
    ascending similarity); ``info["order"]`` gives the reference order.
    """

    retain: float = 0.3
    positions: str = "kept"

    accepts_partial: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self.retain = check_retain(self.retain)
        check_positions(self.positions)

    def keep_per_pruned_frame(self, n: int) -> int:
        return ttm_keep(n, 1.0 - self.retain)

    def compress(self, tokens: TokenSet) -> Compression:
        tokens.require_full(self.name)
        order = dycoke_ttm(tokens.features, self.keep_per_pruned_frame(tokens.tokens_per_frame))
        return selection(order, info={"order": order})


@register("dycoke_kv")
@dataclass
class DyCokeKV(DecodePolicy):
    """DyCoke stage 2: dynamic KV-cache pruning at every decode step.

    Args:
        retain: fraction of the visual entries layers ``>= layer`` read on a pruning step,
            ``1 - dycoke_p`` (reference default ``dycoke_p = 0.8`` in its lmms-eval scripts, so 0.2).
            Count ``int(N * (1 - dycoke_p))``.
        layer: ``L`` (``dycoke_l``): layers ``>= L`` read the pruned entries; the scores come from
            layer ``L - 1``. ``None``: the reference's 3 for a 28-layer model, scaled to the depth
            (:func:`tokcompress.policy.scaled_layer`; at least 1).
        evict: ``False`` (reference behaviour): each step masks the unchosen visual entries for layers
            ``>= L`` in that step only; the cache keeps every entry, a later step may choose others,
            and a step whose attention is stable reads them all. ``True``: the unchosen entries are
            removed from the cache of layers ``>= L`` for good, which frees their memory; later steps
            can only choose among the survivors, so with a fixed budget the first pruning step decides.
            The two modes agree on the first decode step and whenever later steps pick a subset of
            the survivors, but not in general (see the project README).
        threshold: a step prunes when the cosine similarity to the previous step is below it (0.9).

    State is kept per generation and batch row (the reference keeps one vector on the model for its
    whole life, so the first step of a new video compares with the last step of the previous one).
    """

    retain: float = 0.2
    layer: int | None = None
    evict: bool = False
    threshold: float = 0.9

    #: (L, depth) of the reference setting: LLaVA-OneVision-7B (28 layers), L = 3.
    reference_layer: ClassVar[tuple[int, int]] = (3, 28)

    def __post_init__(self) -> None:
        self.retain = check_retain(self.retain)
        self.layer = check_layer(self.layer)
        if not isinstance(self.evict, bool):
            raise ValueError(f"evict must be True or False; got {self.evict!r}")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)):
            raise ValueError(f"threshold must be a number (cosine similarity, 0.9 upstream); got {self.threshold!r}")

    @property
    def label(self) -> str:
        layer = self.layer if self.layer is not None else "auto"
        return f"dycoke_kv(retain={self.retain:g}, layer={layer}{', evict' if self.evict else ''})"

    @property
    def evicts(self) -> bool:
        return self.evict

    def resolve_layer(self, depth: int) -> int:
        return self.layer if self.layer is not None else scaled_layer(*self.reference_layer, depth)

    def step(self, tokens: DecodeTokens, memory: object) -> DecodeChoice:
        scores = tokens.attention.float().mean(dim=0)  # (N,)
        count = kv_keep(tokens.num_tokens, 1.0 - self.retain)
        previous = memory if isinstance(memory, Tensor) else None
        available = None if bool(tokens.available.all()) else tokens.available
        keep, similarity = dycoke_kv_step(scores, previous, count, self.threshold, available)
        return DecodeChoice(keep=keep, memory=scores, info={"similarity": similarity})


@register("dycoke")
@dataclass
class DyCoke(Policy):
    """DyCoke (CVPR 2025): :class:`DyCokeTTM` before the LLM, then :class:`DyCokeKV` during decoding.

    Args:
        retain: TTM's kept fraction of each pruned frame (``1 - dycoke_k``; 0.3).
        kv_retain: KV pruning's kept fraction of the visual entries (``1 - dycoke_p``; 0.2).
        layer: ``dycoke_l`` (see :class:`DyCokeKV`).
        evict: physical eviction instead of the reference's per-step masking (see :class:`DyCokeKV`).
        positions: TTM's (see :class:`DyCokeTTM`).
    """

    retain: float = 0.3
    kv_retain: float = 0.2
    layer: int | None = None
    evict: bool = False
    positions: str = "kept"

    accepts_partial: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self.kv_retain = check_retain(self.kv_retain, "kv_retain")
        self._parts = (DyCokeTTM(retain=self.retain, positions=self.positions), DyCokeKV(retain=self.kv_retain, layer=self.layer, evict=self.evict))
        self.retain = self._parts[0].retain
        self.kv_retain = self._parts[1].retain

    @property
    def label(self) -> str:
        return " -> ".join(p.label for p in self._parts)

    def stages(self) -> list[Policy]:
        return list(self._parts)

    def compress(self, tokens: TokenSet) -> Compression:
        return self._parts[0](tokens)
