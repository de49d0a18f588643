"""VidCom2: per-frame budgets from how distinct each frame is, then the most distinct tokens of each frame.

Paper: Liu et al., "Video Compression Commander: Plug-and-Play Inference Acceleration for Video Large
Language Models", 2025. Reference: ``xuyang-liu16/VidCom2`` @ ``944a17d14f4848ad080a65eab2b0711a760fa154``,
``token_compressor/vidcom2/vidcom2.py::{vidcom2_compression, select_low_var_channels,
compute_gaussian_scores, _multi_scale_gaussian, compute_scales, select_outlier_indices}``.

Algorithm (``X`` = the video's ``(T, n, D)`` projector tokens, ``r`` = ``retain``):

1. keep the ``int(D / 2)`` channels of lowest population variance over all ``T * n`` tokens;
2. ``F`` = unit-normalised tokens on those channels; ``g`` = mean of all ``F`` (video centre),
   ``c_t`` = mean of frame ``t``; ``K(a, b) = sum over alpha in {1/8, 1/4, 1/2, 1, 2} of
   exp(-|a - b|^2 / (2 alpha))``; ``v = K(F, g)``, ``f = K(F, c_t)``;
3. ``u_t = -mean_i v[t, i]``, ``p = softmax((u - max u) / 0.01)``,
   ``s_t = min(1, r * (1 + p_t - mean(p)))``;
4. frame ``t`` keeps the ``k_t`` tokens with the smallest ``v + f``.

Budgets. The reference rounds each frame on its own, ``k_t = max(1, round(s_t * n))`` (half to even,
float32), so the total is only about ``r * T * n`` (``exact_budget=False``, what the golden cases
check). By default tokcompress keeps exactly ``keep_count(retain, T * n)`` tokens: the frame shares
``r * (1 + p_t - mean(p))`` are scaled by a common factor, clamped to ``[1, n]``, and rounded by largest
remainder (ties to the earlier frame), so ``retain=1.0`` keeps everything.

Selection only (positions: kept). Works on every family; Qwen-VL temporal grids count as frames, as
in the reference's Qwen paths. The reference's LLaVA paths hard-code the frame size (196 or 169);
tokcompress reads it from the grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..policy import Policy, check_positions, keep_count
from ..registry import register
from ..tokens import Compression, TokenSet

#: Kernel widths of the multi-scale Gaussian.
ALPHAS = (0.125, 0.25, 0.5, 1.0, 2.0)
#: Softmax temperature of the frame distinctiveness.
TEMPERATURE = 0.01
#: Fraction of channels kept (lowest variance).
CHANNEL_RATIO = 0.5


@dataclass
class VidCom2Scores:
    """Intermediate values of VidCom2 for one video (all float32).

    Attributes:
        channels: ``(C,)`` int64 selected channels, ascending.
        vid_score: ``(T, n)`` kernel of each token to the video centre.
        frame_score: ``(T, n)`` kernel of each token to its frame centre.
        frame_prob: ``(T,)`` softmax of frame distinctiveness.
        shares: ``(T,)`` ``r * (1 + p_t - mean(p))`` before clamping.
    """

    channels: Tensor
    vid_score: Tensor
    frame_score: Tensor
    frame_prob: Tensor
    shares: Tensor


def _kernel(a: Tensor, b: Tensor) -> Tensor:
    dist = (a - b).pow(2).sum(-1)
    return sum(torch.exp(-dist / (2 * alpha)) for alpha in ALPHAS)


def vidcom2_scores(features: Tensor, retain: float) -> VidCom2Scores:
    """Steps 1-3 of VidCom2 on ``(T, n, D)`` features (computed in float32)."""
    t, n, d = features.shape
    x = features.float().reshape(t * n, d)
    var = x.var(dim=0, unbiased=False)
    channels = torch.topk(var, int(d * CHANNEL_RATIO), largest=False).indices.sort().values
    f = x[:, channels]
    f = (f / f.norm(dim=-1, keepdim=True)).reshape(t, n, -1)
    video_centre = f.reshape(t * n, -1).mean(0)
    frame_centre = f.mean(1, keepdim=True)
    vid = _kernel(f, video_centre)
    frame = _kernel(f, frame_centre)
    u = -vid.mean(1)
    prob = torch.softmax((u - u.max()) / TEMPERATURE, dim=0)
    shares = retain * (1 + prob - prob.mean())
    return VidCom2Scores(channels, vid, frame, prob, shares)


def reference_counts(shares: Tensor, n: int) -> Tensor:
    """The reference's per-frame counts: ``max(1, round(min(share, 1) * n))`` in float32, halves to even."""
    return (shares.float().clamp(max=1.0) * n).round().clamp(min=1).long().cpu()


def exact_counts(shares: Tensor, n: int, budget: int) -> Tensor:
    """Per-frame counts in ``[1, n]`` summing to ``budget``, proportional to ``shares`` where possible.

    With ``budget < T`` the ``budget`` frames of largest share keep one token each (others none).
    """
    t = shares.numel()
    if not 0 < budget <= t * n:
        raise ValueError(f"budget must be in [1, {t * n}]; got {budget}")
    w = shares.detach().cpu().double().clamp(min=0)  # T numbers: bookkeeping on the CPU
    if budget < t:
        counts = torch.zeros(t, dtype=torch.long)
        counts[torch.sort(-w, stable=True).indices[:budget]] = 1
        return counts
    if float(w.sum()) <= 0:
        w = torch.ones(t, dtype=torch.float64)

    def filled(c: float) -> Tensor:
        return (c * w * n).clamp(1, n)

    lo, hi = 0.0, 1.0
    while float(filled(hi).sum()) < budget:
        hi *= 2
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if float(filled(mid).sum()) < budget:
            lo = mid
        else:
            hi = mid
    target = filled(hi)
    counts = target.floor().long().clamp(1, n)
    short = budget - int(counts.sum())
    if short > 0:  # largest remainders first, earlier frame on ties, only frames below n
        frac = (target - counts.double()).masked_fill(counts >= n, -1.0)
        order = torch.sort(-frac, stable=True).indices[:short]
        counts[order] += 1
    elif short < 0:  # floating-point overshoot: take back from the smallest remainders
        frac = (target - counts.double()).masked_fill(counts <= 1, 2.0)
        order = torch.sort(frac, stable=True).indices[: -short]
        counts[order] -= 1
    return counts


def vidcom2_select(scores: VidCom2Scores, counts: Tensor) -> Tensor:
    """Sorted flat indices ``t * n + i`` of the ``counts[t]`` tokens of smallest ``v + f`` per frame."""
    total = scores.vid_score + scores.frame_score
    t, n = total.shape
    keep = []
    for f in range(t):
        k = int(counts[f])
        if k:
            keep.append(torch.topk(total[f], k, largest=False).indices.sort().values + f * n)
    return torch.cat(keep)


@register("vidcom2")
@dataclass
class VidCom2(Policy):
    """VidCom2 (frame-adaptive token selection).

    Args:
        retain: ``r`` [``R_RATIO``, ``base_scale``], the fraction of visual tokens kept.
        exact_budget: keep exactly ``keep_count(retain, T * n)`` tokens (default); ``False`` uses the
            reference's per-frame rounding (total close to, not equal to, the budget).
        positions: ``"kept"`` (default: survivors keep their original position ids) or ``"compacted"``
            (renumbered consecutively, as the reference does; 1-D positions only).
    """

    retain: float = 0.25
    exact_budget: bool = True
    positions: str = "kept"

    accepts_partial: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_positions(self.positions)
        super().__post_init__()
        if not isinstance(self.exact_budget, bool):
            raise ValueError(f"exact_budget must be True or False; got {self.exact_budget!r}")

    def compress(self, tokens: TokenSet) -> Compression:
        tokens.require_full(self.name)
        t, n = tokens.num_frames, tokens.tokens_per_frame
        scores = vidcom2_scores(tokens.features, self.retain)
        if self.exact_budget:
            counts = exact_counts(scores.shares, n, keep_count(self.retain, t * n))
        else:
            counts = reference_counts(scores.shares, n)
        keep = vidcom2_select(scores, counts).to(tokens.features.device)
        return Compression(keep=keep, info={"k_per_frame": counts.tolist(), "frame_prob": scores.frame_prob.tolist()})


__all__ = ["VidCom2", "exact_counts", "reference_counts", "vidcom2_scores", "vidcom2_select"]
