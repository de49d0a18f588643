"""LLaVA-OneVision (and LLaVA-Video checkpoints, which use the same class).

Signals: ``"thumbnail4"``/``"thumbnail6"``/``"thumbnail8"`` (TS-LLaVA, see ``adapters/thumbnail.py``).

Per video the span holds ``F * h * w`` pooled SigLIP tokens (bilinear 2x pooling of the patch grid,
e.g. 27x27 -> 14x14) followed by ONE ``image_newline`` token; positions are 1-D.
"""

from __future__ import annotations

import math

from torch import nn
from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel

from torch import Tensor

from .base import Adapter, CallContext, Capture, VideoSpan, split_videos
from .thumbnail import THUMBNAIL_SIGNALS, ThumbnailSupport


class LlavaOnevisionAdapter(ThumbnailSupport, Adapter):
    name = "llava_onevision"
    model_classes = (LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel)
    signals = THUMBNAIL_SIGNALS

    def placeholder_ids(self, model: nn.Module) -> list[int]:
        return [model.config.video_token_id]

    def frame_grid(self, model: nn.Module) -> tuple[int, int]:
        """Pooled grid per frame: ``ceil(g / 2)`` square, ``g = image_size // patch_size``."""
        vision = model.config.vision_config
        side = math.ceil((vision.image_size // vision.patch_size) / 2)
        return side, side

    def captures(self, model: nn.Module, signals: frozenset[str]) -> list[Capture]:
        return self.thumbnail_captures(model, signals)

    def thumbnail_tokens(self, pooled: Tensor) -> Tensor:
        return pooled[:, :-1]  # drop the image_newline get_video_features appends

    def spans(self, model: nn.Module, call: CallContext) -> list[VideoSpan]:
        h, w = self.frame_grid(model)
        counts = None
        pixels = call.inner_kwargs.get("pixel_values_videos")
        encoded = (call.inner_kwargs.get("mm_encoder_outputs") or {}).get("video")
        if pixels is not None:  # (videos, frames, C, H, W)
            counts = [pixels.shape[1] * h * w + 1] * pixels.shape[0]
        elif encoded is not None:  # pre-encoded by generate: pooler_output (videos, F*h*w + 1, D)
            counts = [encoded.pooler_output.shape[1]] * encoded.pooler_output.shape[0]
        spans = []
        for row, pos in split_videos(call.target, counts):
            frames, rest = divmod(pos.numel() - 1, h * w)
            if rest or frames < 1:
                raise RuntimeError(f"a LLaVA-OneVision video span of {pos.numel()} tokens is not F*{h}*{w}+1")
            spans.append(VideoSpan(row=row, positions=pos[:-1], grid=(frames, h, w), specials=pos[-1:]))
        self.attach_thumbnails(model, call, spans, [s.grid[0] for s in spans])
        return spans


__all__ = ["LlavaOnevisionAdapter"]
