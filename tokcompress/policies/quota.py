"""QuoTA: per-frame token budgets from the question's relevance to each frame.

Paper: "QuoTA: Query-oriented Token Assignment via CoT Query Decouple for Long Video Comprehension"
(Luo et al., 2025); reference MAC-AutoML/QuoTA ec194d7c (``core/llava_arch.py``, ``quota_pipeline.py``).

The relevance of each frame comes from an external scorer (:class:`tokcompress.scorers.QuoTAScorer`:
a VLM's probability of answering "A. yes" to "does this frame contain ...?"); the engine runs the
scorer and hands its output to this policy as ``signals["frame_scores"]``. This module is only the
assignment (the reference's Stage D), a pure function of the tokens and the scores:

* weights ``w_t = (100 p_t)^2``, normalised to sum 1 (``weight_scale=[100, 2]``);
* budget ``B = round_half_up(retain * N)`` video tokens;
* per-frame cap ``w_t <= n / B`` (the reference's ``scale_weights``: clip, then hand the excess to the
  frames below the cap in proportion to their weights, one pass), then ``c_t = min(n, int(B * w_t))``;
  frames with ``c_t <= 0`` are dropped;
* each kept frame is resized bilinearly (``align_corners=False``) from its ``h x w`` grid to the
  ``h' x w'`` grid of the reference's rule: ``h' = w' = floor(sqrt(c_t))``, then one more row if
  ``(h'+1) w' <= c_t``, else one more column if ``h' (w'+1) <= c_t`` (clamped to the grid for
  non-square grids). Resized token ``(i, j)`` takes the position of the grid token under its centre.

Deviations (documented in the README): the reference acts on the 27x27 SigLIP grid before LLaVA-Video's
2x2 pooling and renumbers positions; here the tokens are the language model's video tokens (after the
model's own pooling) and keep their original positions. The default version ``v1`` has no per-frame
cap and may upsample a frame; tokens here cannot outnumber a frame's grid, so the cap the other
reference versions use always applies. With ``retain=1.0`` the capped budget is every token, and the
video is kept as is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import MissingSignalError
from ..policy import Policy, keep_count
from ..registry import register
from ..tokens import Compression, TokenSet, selection


def quota_weights(scores: Tensor, scale: float = 100.0, power: float = 2.0) -> Tensor:
    """``(T,)`` yes-probabilities -> normalised weights ``(scale * p)^power / sum`` (uniform if all zero)."""
    w = (scores.double() * scale) ** power
    total = w.sum()
    if not bool(total > 0):
        return torch.full_like(w, 1.0 / w.numel())
    return w / total


def cap_weights(weights: Tensor, cap: float) -> Tensor:
    """Clip weights at ``cap`` and give the excess to the frames below it, in proportion to their weights.

    One pass, as the reference's ``scale_weights``: a frame may end above the cap after receiving its
    share (callers clamp the resulting counts).
    """
    over = weights > cap
    if not bool(over.any()):
        return weights
    excess = float((weights[over] - cap).sum())
    out = weights.clone()
    out[over] = cap
    below = ~over
    mass = out[below].sum()
    if bool(below.any()) and bool(mass > 0):
        out[below] += excess * out[below] / mass
    return out


def frame_counts(weights: Tensor, budget: int, tokens_per_frame: int) -> Tensor:
    """``(T,)`` int64 tokens per frame: ``min(n, int(budget * w_t))`` of the capped weights."""
    capped = cap_weights(weights, tokens_per_frame / budget)
    counts = torch.floor(capped * budget).long()
    return counts.clamp(0, tokens_per_frame)


def frame_shape(count: int, h: int, w: int) -> tuple[int, int]:
    """The reference's resized grid for ``count`` tokens, clamped to an ``h x w`` grid."""
    rows = cols = math.isqrt(count)
    if rows * cols < count:
        if (rows + 1) * cols <= count:
            rows += 1
        elif rows * (cols + 1) <= count:
            cols += 1
    if rows > h:
        rows = h
        cols = min(w, count // rows)
    if cols > w:
        cols = w
        rows = min(h, count // cols)
    return max(1, rows), max(1, cols)


def centre_index(size: int, out: int) -> Tensor:
    """``(out,)`` grid index under the centre of each of ``out`` resized cells (``out <= size``)."""
    return torch.floor((torch.arange(out, dtype=torch.float64) + 0.5) * size / out).long()


def quota_assign(features: Tensor, scores: Tensor, retain: float) -> Compression:
    """Stage D on ``(T, h, w, D)`` tokens and ``(T,)`` yes-probabilities: kept positions and resized values."""
    t, h, w, dim = features.shape
    n = h * w
    budget = keep_count(retain, t * n)
    device = features.device
    if budget >= t * n:
        return selection(torch.arange(t * n, device=device), info={"frame_tokens": [n] * t})
    weights = quota_weights(scores)
    counts = frame_counts(weights, budget, n)
    if int(counts.sum()) == 0:  # budget below one token per frame: keep one token of the best frame
        counts[int(torch.argmax(scores))] = 1
    keep, values, shapes = [], [], []
    for frame in range(t):
        count = int(counts[frame])
        if count <= 0:
            shapes.append((0, 0))
            continue
        rows, cols = frame_shape(count, h, w)
        shapes.append((rows, cols))
        grid = features[frame].permute(2, 0, 1)[None].float()  # (1, D, h, w)
        resized = F.interpolate(grid, size=(rows, cols), mode="bilinear", align_corners=False)
        values.append(resized[0].permute(1, 2, 0).reshape(-1, dim).to(features.dtype))
        ys, xs = centre_index(h, rows), centre_index(w, cols)
        keep.append((frame * n + ys[:, None] * w + xs[None, :]).reshape(-1).to(device))
    info = {
        "frame_tokens": [r * c for r, c in shapes],
        "frame_grids": shapes,
        "weights": weights.tolist(),
    }
    return Compression(keep=torch.cat(keep), values=torch.cat(values), info=info)


def per_step(scores: Tensor, steps: int, name: str) -> Tensor:
    """``(F, ...)`` per-frame signal -> ``(T, ...)`` per grid step (mean over a step's frames)."""
    frames = scores.shape[0]
    if frames == steps:
        return scores
    if frames % steps:
        raise ValueError(f"signal {name!r} covers {frames} frames, which do not divide into {steps} grid steps")
    return scores.reshape(steps, frames // steps, *scores.shape[1:]).float().mean(1)


def scores_or_raise(tokens: TokenSet, name: str, policy: str, scorer: str) -> Tensor:
    """The signal ``name`` of ``tokens``, or a MissingSignalError that names the scorer to pass."""
    value = tokens.signals.get(name)
    if value is None:
        raise MissingSignalError(
            f"policy {policy!r} needs signal {name!r} from a scorer, and none reached it: wrap with "
            f"scorer=tokcompress.scorers.{scorer}(model, processor) (and processor= the wrapped model's "
            f"processor), or put the scores into TokenSet.signals[{name!r}]"
        )
    return value


@register("quota")
@dataclass
class QuoTA(Policy):
    """QuoTA's query-oriented per-frame budgets (Stage D), given the scorer's frame scores.

    Args:
        retain: fraction of the video tokens kept (the budget ``B``).
        scorer: a :class:`tokcompress.scorers.QuoTAScorer`; the engine runs it on the video's frames and
            the question and passes its ``"frame_scores"`` (yes-probabilities, ``(F,)``) to
            :meth:`compress`. The policy itself only reads the tensor.

    Shapes: ``signals["frame_scores"]`` ``(T * frames_per_step,)`` -> ``keep`` ``(K,)``, ``values`` ``(K, D)``.
    """

    retain: float = 0.25
    scorer: Any = field(default=None, repr=False, compare=False)

    needs = frozenset({"frame_scores"})
    accepts_partial = False

    def compress(self, tokens: TokenSet) -> Compression:
        tokens.require_full(self.name)
        raw = scores_or_raise(tokens, "frame_scores", self.name, "QuoTAScorer")
        scores = per_step(raw.reshape(-1), tokens.num_frames, "frame_scores")
        return quota_assign(tokens.grid_features(), scores.to(tokens.features.device), self.retain)


__all__ = ["QuoTA", "cap_weights", "frame_counts", "frame_shape", "quota_assign", "quota_weights"]
