"""Shared rule for families whose processors turn video frames into images (InternVL, SmolVLM).

The model sees only ``image_token_id``: each frame is one run of ``tokens_per_image`` placeholders
between image delimiters. In each batch row, every run of exactly that length is taken as a frame of
one video, in order; other runs (multi-tile still images) pass through untouched. A prompt that mixes
single-tile still images with a video cannot be told apart and is compressed as one video.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import Adapter, CallContext, VideoSpan, runs


class FramesAsImagesAdapter(Adapter):
    def placeholder_ids(self, model: nn.Module) -> list[int]:
        return [model.config.image_token_id]

    def tokens_per_image(self, model: nn.Module) -> int:
        raise NotImplementedError

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
        return spans
