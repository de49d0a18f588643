"""LLaVA-OneVision (and LLaVA-Video checkpoints, which use the same class).

Per video the span holds ``F * h * w`` pooled SigLIP tokens (bilinear 2x pooling of the patch grid,
e.g. 27x27 -> 14x14) followed by ONE ``image_newline`` token; positions are 1-D.

Signal ``"pixels"``: a pre-hook on the vision tower records the ``(videos * F, C, H, W)`` normalised
frames it receives (``generate`` encodes the video before the first forward, so the model kwargs no
longer hold them). Each video gets its ``(F, C, g*p, g*p)`` frames, cropped to the area the
``g x g`` patch grid covers (``g = H // p``, 378 of 384 pixels at patch size 14). Bilinear 2x
pooling centres token ``(y, x)`` of the ``ceil(g/2)``-square grid on pixel
``((y + 0.5) * g*p / h, (x + 0.5) * g*p / w)``, so a token stands for a ``g*p/h``-pixel square
(27 pixels, about 2x2 patches): the bins ``evs_pixel`` uses.
"""

from __future__ import annotations

import math

from torch import nn
from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel

from .base import Adapter, CallContext, Capture, VideoSpan, attach_frames, split_videos, tower_pixels


class LlavaOnevisionAdapter(Adapter):
    name = "llava_onevision"
    model_classes = (LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel)
    signals = frozenset({"pixels"})

    def placeholder_ids(self, model: nn.Module) -> list[int]:
        return [model.config.video_token_id]

    def frame_grid(self, model: nn.Module) -> tuple[int, int]:
        """Pooled grid per frame: ``ceil(g / 2)`` square, ``g = image_size // patch_size``."""
        vision = model.config.vision_config
        side = math.ceil((vision.image_size // vision.patch_size) / 2)
        return side, side

    def captures(self, model: nn.Module, signals: frozenset[str]) -> list[Capture]:
        if "pixels" not in signals:
            return []
        return [Capture("pixels", self.inner(model).vision_tower, tower_pixels)]

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
        attach_frames(spans, call, model.config.vision_config.patch_size)
        return spans


__all__ = ["LlavaOnevisionAdapter"]
