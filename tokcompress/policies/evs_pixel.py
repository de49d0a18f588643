"""EVS in pixel space: prune the patches whose pixels did not change since the previous frame.

Paper: "Efficient Video Sampling: Pruning Temporally Redundant Tokens for Faster VLM Inference"
(NVIDIA, arXiv 2510.14624): per patch ``D = ||p_t - p_{t-1}||_1`` between consecutive frames, a
global cut-off at the ``q``-th percentile of ``D``, the first frame kept whole. There is no public
reference for this variant (vLLM implements the embedding-space one, see :mod:`.evs`), and the
paper's text was not available in full, so the details below are this library's reading of it.

Token -> pixels: the adapter hands over the frames as the vision tower sees them (normalised,
cropped to the area its patch grid covers), ``(F, C, H, W)`` with ``F = T * frames_per_step``.
Token ``(t, y, x)`` of the ``(T, h, w)`` grid covers the pixel bin ``y`` of ``h`` near-equal rows
and ``x`` of ``w`` columns (``torch.nn.functional.adaptive_avg_pool2d`` bins) of the frames of
its temporal step. That is exactly the ``m x m`` patches (``m * 14`` or ``m * 16`` pixels) of a
Qwen-VL merged token, and the ``27 x 27``-pixel area of a LLaVA-OneVision token (the 27x27 SigLIP
patch grid is pooled 2x bilinearly to 14x14, so each token is centred on one such bin).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import MissingSignalError
from ..registry import register
from ..tokens import Compression, TokenSet
from .evs import EVS, evs_count, evs_keep

#: Frames differenced at once (bounds the float32 temporaries to a few frames).
FRAME_CHUNK = 16


def pixel_dissimilarity(pixels: Tensor, grid: tuple[int, int, int], frames_per_step: int = 1) -> Tensor:
    """Mean absolute pixel change of every token since the previous frame.

    Args:
        pixels: ``(F, C, H, W)`` frames, ``F = T * frames_per_step``.
        grid: ``(T, h, w)`` token grid.
        frames_per_step: input frames per temporal step of ``grid``.

    Returns:
        ``(T, h * w)`` float32. For ``t >= 1``: the mean, over the step's frames ``f`` and over the
        channels and pixels of the token's bin, of ``|p_f - p_{f-1}|`` (consecutive input frames;
        the step's first frame is compared with the previous step's last). Step 0 is ``+inf`` (kept).
        The mean is the L1 norm divided by the bin size, so bins of unequal size stay comparable.
    """
    t, h, w = grid
    s = frames_per_step
    if pixels.dim() != 4:
        raise ValueError(f"pixels must be (F, C, H, W); got shape {tuple(pixels.shape)}")
    frames, _, height, width = pixels.shape
    if frames != t * s:
        raise ValueError(
            f"pixels hold {frames} frames but the token grid {grid} needs T * frames_per_step = {t * s}"
        )
    if height < h or width < w:
        raise ValueError(f"pixels of {height}x{width} cannot cover a {h}x{w} token grid")
    scores = torch.full((t, h * w), float("inf"), dtype=torch.float32, device=pixels.device)
    if t == 1:
        return scores
    channels = pixels.shape[1]
    tiled = height % h == 0 and width % w == 0  # equal bins: a reshape instead of adaptive pooling
    # diffs[f - s] = per-token mean |p_f - p_{f-1}|, for the frames f >= s of steps 1..T-1.
    diffs = torch.empty(frames - s, h, w, dtype=torch.float32, device=pixels.device)
    buf = torch.empty(min(FRAME_CHUNK, frames - s), channels, height, width, dtype=torch.float32, device=pixels.device)
    for f0 in range(s, frames, FRAME_CHUNK):
        f1 = min(frames, f0 + FRAME_CHUNK)
        change = buf[: f1 - f0]
        torch.sub(pixels[f0:f1], pixels[f0 - 1 : f1 - 1], out=change)
        if tiled:
            bins = change.view(f1 - f0, channels, h, height // h, w, width // w)
            l1 = torch.linalg.vector_norm(bins, ord=1, dim=(1, 3, 5))
            diffs[f0 - s : f1 - s] = l1 / (channels * (height // h) * (width // w))
        else:
            diffs[f0 - s : f1 - s] = F.adaptive_avg_pool2d(change.abs_().mean(1, keepdim=True), (h, w))[:, 0]
    scores[1:] = diffs.reshape(t - 1, s, h * w).mean(1)
    return scores


@register("evs_pixel")
@dataclass
class EVSPixel(EVS):
    """EVS with the paper's pixel-space score: keep the patches that changed most between frames.

    ``retain`` maps to ``q = 1 - retain`` and the budget is the same as ``evs``:
    ``K = max(h*w, int(T*h*w*(1 - q)))``. The paper's percentile cut-off ("keep patches above the
    ``q``-th percentile of ``D``, first frame whole") is applied as a global top-``K`` over the
    later frames' scores, ties to the earlier token, so the kept count is exact and deterministic
    even where many patches tie (a perfectly static background). ``info["threshold"]`` is the
    cut-off that resulted: the smallest score kept outside frame 0 (``None`` if only frame 0 is kept).

    Needs the ``"pixels"`` signal (every adapter provides it); the features
    are not read. For Qwen-VL a token spans ``frames_per_step = 2`` frames, so its score averages
    the changes over both. Needs the full grid, so it must come first in a chain.

    Shapes: ``signals["pixels"]`` ``(T * frames_per_step, C, H, W)`` -> ``keep`` ``(K,)``.
    """

    needs = frozenset({"pixels"})

    def compress(self, tokens: TokenSet) -> Compression:
        tokens.require_full(self.name)
        pixels = tokens.signals.get("pixels")
        if pixels is None:
            raise MissingSignalError(
                "evs_pixel needs the video frames (signal 'pixels'), but none reached the policy; pass the video as "
                "pixel values (not pre-computed embeddings) to a model whose adapter provides 'pixels'"
            )
        scores = pixel_dissimilarity(pixels, tokens.grid, tokens.frames_per_step)
        n = tokens.tokens_per_frame
        keep = evs_keep(scores, evs_count(tokens.num_frames, n, self.q))
        later = keep[n:]
        threshold = float(scores.reshape(-1)[later].min()) if later.numel() else None
        return Compression(keep=keep, info={"threshold": threshold})


__all__ = ["EVSPixel", "pixel_dissimilarity"]
