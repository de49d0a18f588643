"""Free Video-LLM: question-matched frames and regions plus a pooled view of every frame.

Paper: "Free Video-LLM: Prompt-guided Visual Perception for Efficient Training-free Video LLMs"
(Han et al., 2024); reference contrastive/FreeVideoLLM 1d623943 (``llava_arch.py``), 7B config
``slow_3frms_spatial_1d_max_pool_roi8-middle_5frms_spatial_1d_max_pool_24x12-fast_50frms_4x4``.

The question enters through a CLIP model (:class:`tokcompress.scorers.CLIPScorer`), which the engine
runs and whose outputs reach this policy as signals: ``"frame_scores"`` ``(F,)``, the cosine between
the question's CLIP text embedding and each frame's image embedding, and ``"patch_scores"``
``(F, gh, gw2)``, the cosine between the text embedding and the frame's projected CLIP patch features
max-pooled over horizontal pairs. Three pathways, on the ``(T, h, w)`` video tokens:

* slow: the ``slow_frames`` frames with the highest frame score (in time order), pair-max-pooled and
  cropped to the ROI below;
* middle: ``middle_frames`` frames at ``int(linspace(0, T, middle_frames + 1))[:-1]``, pooled and cropped
  the same way;
* fast: every frame (or the ``fast_frames`` best ones) average-pooled to ``fast_pool`` (4x4).

Pair pooling: tokens ``(y, 2c)`` and ``(y, 2c+1)`` of a row become one token, their maximum (for an
even width this is the reference's ``MaxPool1d(2, 2)`` over the flat tokens). ROI: the ``int(m * roi)``
pooled tokens (of ``m``) with the highest patch score; the reference reads the pooled tokens, flat, as
a grid of ``h // 2`` rows of ``2 * ceil(w / 2)`` (24x12 read as 12x24, a quirk kept when ``h`` is even,
the pooled grid otherwise); the box of ``round(rows * sqrt(roi)) x round(cols * sqrt(roi))`` cells is
centred on the mean row and column of those tokens (``int`` of the means), shifted inside the grid.
When the scorer's patch grid differs from the pooled token grid, the patch scores are resized
bilinearly to it.

Positions (the reference concatenates the pathways and renumbers): here every output token takes an
original position in its frame, so the language model sees them in time order. A pooled pair takes the
position of its left token, a fast token that of the token under its bin centre, or the nearest free
one in the frame after that. A frame in both the slow and the middle set (the reference repeats it) is
kept once. ``retain=None`` is the reference's fixed pathway sizes; ``retain=1.0`` keeps every token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..cluster import top_scores
from ..policy import Policy, check_retain
from ..registry import register
from ..tokens import Compression, TokenSet, selection
from .fastv import top_indices
from .quota import per_step, scores_or_raise


def text_guided(scores: Tensor, k: int) -> list[int]:
    """The ``k`` frames with the highest scores, in time order (all frames if ``k >= T``)."""
    return top_indices(scores.float(), min(k, scores.numel())).tolist()


def middle_frames(t: int, k: int) -> list[int]:
    """``int(linspace(0, T, k + 1))[:-1]``, deduplicated (the reference's evenly spaced frames)."""
    return sorted({int(i) for i in np.linspace(0, t, k + 1).astype(int)[:-1] if i < t})


def pair_pool(frame: Tensor) -> Tensor:
    """``(..., h, w, D)`` -> ``(..., h, ceil(w / 2), D)``: maximum of horizontal token pairs (a lone last
    column stays). The reference pools its LLM tokens and, in its CLIP scorer, the patch features this way."""
    *lead, h, w, dim = frame.shape
    if w % 2:
        frame = torch.cat([frame, frame[..., -1:, :]], dim=-2)
    return frame.reshape(*lead, h, (w + 1) // 2, 2, dim).amax(-2)


def roi_view(h: int, w2: int) -> tuple[int, int]:
    """Grid the reference reads the ``h * w2`` pooled tokens as: ``(h // 2, 2 * w2)`` for even ``h``."""
    return (h // 2, 2 * w2) if h % 2 == 0 else (h, w2)


def roi_box(scores: Tensor, rows: int, cols: int, roi: float) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` of the ROI box on a ``rows x cols`` view of flat ``scores``."""
    m = scores.numel()
    k = max(1, int(m * roi))
    idx = top_scores(scores.float(), k)
    cx = int((idx % cols).double().mean())
    cy = int((idx // cols).double().mean())
    bh = max(1, min(rows, round(rows * math.sqrt(roi))))
    bw = max(1, min(cols, round(cols * math.sqrt(roi))))

    def span(centre: int, size: int, limit: int) -> tuple[int, int]:
        start = centre - size // 2
        start = max(0, min(start, limit - size))
        return start, start + size

    top, bottom = span(cy, bh, rows)
    left, right = span(cx, bw, cols)
    return top, bottom, left, right


def roi_tokens(frame: Tensor, patch_scores: Tensor, roi: float) -> tuple[Tensor, Tensor]:
    """``(h, w, D)`` frame, ``(gh, gw2)`` patch scores -> ROI tokens ``(K, D)`` and their grid anchors ``(K,)``."""
    h, w, dim = frame.shape
    pooled = pair_pool(frame)  # (h, w2, D)
    w2 = pooled.shape[1]
    if tuple(patch_scores.shape) != (h, w2):
        patch_scores = F.interpolate(
            patch_scores.float()[None, None], size=(h, w2), mode="bilinear", align_corners=False
        )[0, 0]
    rows, cols = roi_view(h, w2)
    top, bottom, left, right = roi_box(patch_scores.reshape(-1), rows, cols, roi)
    flat = (torch.arange(top, bottom)[:, None] * cols + torch.arange(left, right)[None, :]).reshape(-1)
    r, c = flat // w2, flat % w2  # back to the pooled grid
    anchors = r * w + 2 * c
    return pooled.reshape(-1, dim)[flat.to(frame.device)], anchors


def fast_tokens(frame: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """``(h, w, D)`` -> adaptive average pool to ``size`` (clamped to the grid): ``(K, D)`` and bin-centre anchors."""
    h, w, dim = frame.shape
    oh, ow = min(size[0], h), min(size[1], w)
    pooled = F.adaptive_avg_pool2d(frame.permute(2, 0, 1)[None].float(), (oh, ow))[0]
    values = pooled.permute(1, 2, 0).reshape(-1, dim).to(frame.dtype)

    def centres(n: int, o: int) -> Tensor:
        i = torch.arange(o)
        start, end = (i * n) // o, -((-(i + 1) * n) // o)  # adaptive pooling's bins
        return (start + end - 1) // 2

    anchors = (centres(h, oh)[:, None] * w + centres(w, ow)[None, :]).reshape(-1)
    return values, anchors


def place(anchors: Tensor, taken: set[int], n: int) -> list[int | None]:
    """Each anchor, or the nearest free index of the frame (later first); None when the frame is full."""
    out: list[int | None] = []
    for a in anchors.tolist():
        spot = None
        for step in range(n):
            for cand in (a + step, a - step):
                if 0 <= cand < n and cand not in taken:
                    spot = cand
                    break
            if spot is not None:
                break
        if spot is not None:
            taken.add(spot)
        out.append(spot)
    return out


def free_video_select(
    features: Tensor,
    frame_scores: Tensor,
    patch_scores: Tensor,
    slow_frames: int,
    middle: int,
    fast_frames: int | None,
    fast_pool: tuple[int, int],
    roi: float,
) -> Compression:
    """The three pathways on ``(T, h, w, D)`` tokens; see the module docstring."""
    t, h, w, dim = features.shape
    n = h * w
    slow = text_guided(frame_scores, slow_frames)
    mid = middle_frames(t, middle)
    fast = text_guided(frame_scores, t if fast_frames is None else fast_frames)
    keep: list[Tensor] = []
    values: list[Tensor] = []
    for frame in range(t):
        tokens: dict[int, Tensor] = {}
        if frame in slow or frame in mid:
            v, a = roi_tokens(features[frame], patch_scores[frame], roi)
            for value, anchor in zip(v, a.tolist()):
                tokens[anchor] = value
        if frame in fast:
            v, a = fast_tokens(features[frame], fast_pool)
            for value, spot in zip(v, place(a, set(tokens), n)):
                if spot is not None:
                    tokens[spot] = value
        if tokens:
            order = sorted(tokens)
            keep.append(frame * n + torch.tensor(order, dtype=torch.long))
            values.append(torch.stack([tokens[i] for i in order]))
    info = {"slow": slow, "middle": mid, "fast": fast}
    return Compression(keep=torch.cat(keep).to(features.device), values=torch.cat(values), info=info)


@register("free_video_llm")
@dataclass
class FreeVideoLLM(Policy):
    """Free Video-LLM's slow / middle / fast pathways (7B config), given CLIP question scores.

    Args:
        retain: ``None`` (default) for the reference's fixed pathway sizes, or ``1.0`` to keep every token.
        scorer: a :class:`tokcompress.scorers.CLIPScorer`; the engine runs it and passes its
            ``"frame_scores"`` ``(F,)`` and ``"patch_scores"`` ``(F, gh, gw2)``. The policy reads only the tensors.
        slow_frames: frames of the slow path (3), chosen by frame score.
        middle_frames: evenly spaced frames of the middle path (5).
        fast_frames: frames of the fast path, ``None`` = all (the reference's 50 of 50).
        fast_pool: pooled grid of the fast path (4, 4).
        roi: fraction of a slow/middle frame's pooled tokens kept by the ROI crop (0.8).
    """

    retain: float | None = None  # type: ignore[assignment]
    scorer: Any = field(default=None, repr=False, compare=False)
    slow_frames: int = 3
    middle_frames: int = 5
    fast_frames: int | None = None
    fast_pool: tuple[int, int] = (4, 4)
    roi: float = 0.8

    needs = frozenset({"frame_scores", "patch_scores"})
    accepts_partial = False

    def __post_init__(self) -> None:
        if self.retain is not None and check_retain(self.retain) != 1.0:
            raise ValueError(
                "free_video_llm's token count is set by its pathways (slow_frames, middle_frames, fast_frames, "
                f"fast_pool, roi); retain must be None (the reference's sizes) or 1.0 (keep everything), got {self.retain!r}"
            )
        for name in ("slow_frames", "middle_frames"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0; got {value!r}")
        if self.fast_frames is not None and (not isinstance(self.fast_frames, int) or self.fast_frames < 0):
            raise ValueError(f"fast_frames must be None (every frame) or an int >= 0; got {self.fast_frames!r}")
        pool = tuple(self.fast_pool)
        if len(pool) != 2 or not all(isinstance(v, int) and v >= 1 for v in pool):
            raise ValueError(f"fast_pool must be two ints >= 1, e.g. (4, 4); got {self.fast_pool!r}")
        self.fast_pool = pool  # type: ignore[assignment]
        if not 0.0 < float(self.roi) <= 1.0:
            raise ValueError(f"roi must be a fraction in (0, 1]; got {self.roi!r}")

    @property
    def label(self) -> str:
        if self.retain is None:
            return f"{self.name}(slow={self.slow_frames}, middle={self.middle_frames}, roi={self.roi:g})"
        return f"{self.name}(retain={self.retain:g})"

    def compress(self, tokens: TokenSet) -> Compression:
        tokens.require_full(self.name)
        if self.retain == 1.0:
            return selection(tokens.available_index())
        t = tokens.num_frames
        frame = per_step(
            scores_or_raise(tokens, "frame_scores", self.name, "CLIPScorer").reshape(-1), t, "frame_scores"
        )
        patch = per_step(scores_or_raise(tokens, "patch_scores", self.name, "CLIPScorer"), t, "patch_scores")
        if patch.dim() != 3:
            raise ValueError(f"signal 'patch_scores' must be (F, gh, gw2); got shape {tuple(patch.shape)}")
        if self.slow_frames + self.middle_frames == 0 and self.fast_frames == 0:
            raise ValueError("free_video_llm with no slow, middle or fast frames keeps nothing")
        return free_video_select(
            tokens.grid_features(),
            frame.cpu(),
            patch.cpu(),
            self.slow_frames,
            self.middle_frames,
            self.fast_frames,
            self.fast_pool,
            float(self.roi),
        )


__all__ = ["FreeVideoLLM", "free_video_select", "middle_frames", "pair_pool", "roi_box", "text_guided"]
