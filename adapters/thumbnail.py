"""TS-LLaVA's thumbnail: a few frames tiled into one image and encoded once more by the model.

The tiling follows ``tingyu215/TS-LLaVA`` @ ``03cdeaee`` (``llava/model/llava_arch.py::
{uniformly_sample_frames, find_best_grid, resize_images, create_image_grid}``): ``k`` frames at
``round(linspace(0, F - 1, k))``, a ``rows x cols`` grid (the factor pair of ``k`` closest to square,
``rows >= cols``), each frame resized to ``(H // rows, W // cols)`` (area when shrinking, bilinear
otherwise), placed row-major. Where ``H`` or ``W`` is not a multiple of the grid the tiles leave a
strip at the bottom/right, which is filled with zeros (the reference's 336-pixel frames divide evenly).

:class:`ThumbnailSupport` is mixed into the adapters of families whose ``get_video_features`` can encode
one more image like a video frame (LLaVA-OneVision, LLaVA-NeXT-Video, Video-LLaVA, see
``adapters/frame_tower.py``). From the frames' pixels as the vision tower receives them (the adapter's
``"pixels"`` capture) it encodes each video's thumbnail through ``get_video_features`` (tower, feature
layer, projector and the family's own pooling) when the prefill is located, so the thumbnail tokens
live in the same embedding space as the video's tokens.
"""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import CallContext, VideoSpan, encoded_offsets_or_none, last_capture

#: Signals for thumbnails of 4, 6 and 8 frames (TS-LLaVA's V1/V2/V3).
THUMBNAIL_SIGNALS = frozenset({"thumbnail4", "thumbnail6", "thumbnail8"})


def frame_index(frames: int, k: int) -> Tensor:
    """``round(linspace(0, frames - 1, k))`` (float32, halves to even): the frames a thumbnail shows."""
    if k > frames:
        raise ValueError(f"a thumbnail of {k} frames needs a video of at least {k} frames; this one has {frames}")
    return torch.linspace(0, frames - 1, steps=k).round().long().clamp(0, frames - 1)


def best_grid(k: int) -> tuple[int, int]:
    """``(rows, cols)``: the factor pair of ``k`` with the smallest difference, ``rows >= cols``."""
    pairs = [(i, k // i) for i in range(1, math.isqrt(k) + 1) if k % i == 0]
    a, b = min(pairs, key=lambda p: abs(p[0] - p[1]))
    return max(a, b), min(a, b)


def tile_thumbnail(frames: Tensor, k: int) -> Tensor:
    """``(C, H, W)`` thumbnail of ``frames`` ``(F, C, H, W)`` (processor-normalised pixels)."""
    f, c, h, w = frames.shape
    rows, cols = best_grid(k)
    th, tw = h // rows, w // cols
    picked = frames[frame_index(f, k).to(frames.device)].float()
    mode = {"mode": "area"} if (th < h or tw < w) else {"mode": "bilinear", "align_corners": False}
    tiles = F.interpolate(picked, size=(th, tw), **mode)
    grid = tiles.reshape(rows, cols, c, th, tw).permute(2, 0, 3, 1, 4).reshape(c, rows * th, cols * tw)
    out = frames.new_zeros(c, h, w, dtype=torch.float32)
    out[:, : rows * th, : cols * tw] = grid[:, :h, :w]
    return out.to(frames.dtype)


class ThumbnailSupport:
    """Mixin for adapters that can encode a thumbnail image like one more video frame.

    The adapter records the ``(N, C, H, W)`` frames its tower receives under the ``"pixels"`` capture
    when :meth:`use_thumbnails` says so, and calls :meth:`attach_thumbnails` once everything else has
    read the call's captures (encoding a thumbnail runs the tower again).
    """

    def use_thumbnails(self, signals: frozenset[str]) -> bool:
        """Remember which thumbnails this session builds; True when it builds any."""
        self._thumbnails = sorted(THUMBNAIL_SIGNALS & signals)
        return bool(self._thumbnails)

    def thumbnail_tokens(self, pooled: Tensor) -> Tensor:
        """``(V, m, D)`` thumbnail tokens from ``get_video_features(...).pooler_output`` of 1-frame videos."""
        return pooled

    @torch.no_grad()
    def attach_thumbnails(self, model: nn.Module, call: CallContext, spans: list[VideoSpan]) -> None:
        """Encode the requested thumbnails of every video and put them in ``span.signals``."""
        wanted = getattr(self, "_thumbnails", [])
        pixels = last_capture(call, "pixels")
        if not wanted or not spans or pixels is None:
            return
        starts = encoded_offsets_or_none([(s.row, s.grid[0]) for s in spans], call.target.shape[0], pixels.shape[0])
        if starts is None:
            return  # the frames did not go through the tower in this call: the policy reports the missing signal
        slices = [(a, a + s.grid[0]) for s, a in zip(spans, starts)]
        videos = sorted(set(slices))  # each distinct video once (beams repeat them)
        inner = self.inner(model)  # type: ignore[attr-defined]
        for name in wanted:
            k = int(name.removeprefix("thumbnail"))
            images = torch.stack([tile_thumbnail(pixels[a:b], k) for a, b in videos])  # (V, C, H, W)
            out = inner.get_video_features(pixel_values_videos=images[:, None])
            tokens = self.thumbnail_tokens(out.pooler_output.reshape(len(videos), -1, out.pooler_output.shape[-1]))
            for span, where in zip(spans, slices):
                span.signals[name] = tokens[videos.index(where)]


__all__ = ["THUMBNAIL_SIGNALS", "ThumbnailSupport", "best_grid", "frame_index", "tile_thumbnail"]
