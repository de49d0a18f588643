"""LLaVA-OneVision (and LLaVA-Video checkpoints, which use the same class).

Per video the span holds ``F * h * w`` pooled SigLIP tokens (bilinear 2x pooling of the patch grid,
e.g. 27x27 -> 14x14) followed by ONE ``image_newline`` token; positions are 1-D.
"""

from __future__ import annotations

import math

from torch import nn
from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel

from .base import Adapter, CallContext, VideoSpan, counts_from_inputs, split_videos


class LlavaOnevisionAdapter(Adapter):
    name = "llava_onevision"
    model_classes = (LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel)

    def placeholder_ids(self, model: nn.Module) -> list[int]:
        return [model.config.video_token_id]

    def frame_grid(self, model: nn.Module) -> tuple[int, int]:
        """Pooled grid per frame: ``ceil(g / 2)`` square, ``g = image_size // patch_size``."""
        vision = model.config.vision_config
        side = math.ceil((vision.image_size // vision.patch_size) / 2)
        return side, side

    def spans(self, model: nn.Module, call: CallContext) -> list[VideoSpan]:
        h, w = self.frame_grid(model)
        counts = counts_from_inputs(call, h * w, 1)
        spans = []
        for row, pos in split_videos(call.target, counts):
            frames, rest = divmod(pos.numel() - 1, h * w)
            if rest or frames < 1:
                raise RuntimeError(f"a LLaVA-OneVision video span of {pos.numel()} tokens is not F*{h}*{w}+1")
            spans.append(VideoSpan(row=row, positions=pos[:-1], grid=(frames, h, w), specials=pos[-1:]))
        return spans


__all__ = ["LlavaOnevisionAdapter"]
