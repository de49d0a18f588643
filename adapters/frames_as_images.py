"""Shared rule for families whose processors turn video frames into images (InternVL, SmolVLM).

The model sees only ``image_token_id``: each frame is one run of ``tokens_per_image`` placeholders
between image delimiters. In each batch row, every run of exactly that length is taken as a frame of
one video, in order; other runs (multi-tile still images) pass through untouched. A prompt that mixes
single-tile still images with a video cannot be told apart and is compressed as one video.

Signal ``"pixels"``: a pre-hook on the vision tower records the ``(tiles, C, H, W)`` images it
encodes (all images of the call, in batch-row then sequence order; a run of ``k * tokens_per_image``
placeholders is an image of ``k`` tiles). Each frame run gets its tile, cropped to the area the
token grid covers; token ``(y, x)`` is the ``u``-pixel square at ``(y*u, x*u)``, ``u`` = patch size
times the pixel-shuffle factor (:meth:`FramesAsImagesAdapter.pixels_per_token`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import Adapter, CallContext, Capture, VideoSpan, crop_to_patches, encoded_offsets, last_capture, runs, tower_pixels


class FramesAsImagesAdapter(Adapter):
    signals = frozenset({"pixels"})

    def placeholder_ids(self, model: nn.Module) -> list[int]:
        return [model.config.image_token_id]

    def tokens_per_image(self, model: nn.Module) -> int:
        raise NotImplementedError

    def vision_tower(self, model: nn.Module) -> nn.Module:
        """The module whose forward receives ``pixel_values`` ``(tiles, C, H, W)``."""
        raise NotImplementedError

    def pixels_per_token(self, model: nn.Module) -> int:
        """Side in pixels of the square one token covers."""
        raise NotImplementedError

    def captures(self, model: nn.Module, signals: frozenset[str]) -> list[Capture]:
        if "pixels" not in signals:
            return []
        return [Capture("pixels", self.vision_tower(model), tower_pixels)]

    def attach_pixels(self, model: nn.Module, call: CallContext, spans: list[VideoSpan], n: int) -> None:
        tiles = last_capture(call, "pixels")
        if tiles is None or not spans:
            return
        images = [(row, s, (e - s) // n) for row in range(call.target.shape[0]) for s, e in runs(call.target[row])]
        starts = encoded_offsets([(row, k) for row, _, k in images], call.target.shape[0], tiles.shape[0])
        tile_at = {(row, s): start for (row, s, _), start in zip(images, starts)}
        unit = self.pixels_per_token(model)
        for span in spans:
            firsts = span.positions.reshape(span.grid[0], -1)[:, 0].tolist()
            index = torch.tensor([tile_at[(span.row, p)] for p in firsts], device=tiles.device)
            span.signals["pixels"] = crop_to_patches(tiles[index], unit)

    def spans(self, model: nn.Module, call: CallContext) -> list[VideoSpan]:
        n = self.tokens_per_image(model)
        side = math.isqrt(n)
        if side * side != n:
            raise RuntimeError(f"{self.name}: {n} tokens per image is not a square grid")
        spans = []
        empty = torch.zeros(0, dtype=torch.long, device=call.target.device)
        for row in range(call.target.shape[0]):
            frames = [torch.arange(s, e, device=call.target.device) for s, e in runs(call.target[row]) if e - s == n]
            if frames:
                spans.append(
                    VideoSpan(row=row, positions=torch.cat(frames), grid=(len(frames), side, side), specials=empty)
                )
        self.attach_pixels(model, call, spans, n)
        return spans
