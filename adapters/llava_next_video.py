"""LLaVA-NeXT-Video.

Per frame the CLIP patch grid (CLS dropped by the "default" feature strategy) is pooled by the
``vision_resampler`` with stride ``spatial_pool_stride`` and projected; the span holds ``F * h * w``
tokens, no newline for videos. Positions are 1-D.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlavaNextVideoForConditionalGeneration, LlavaNextVideoModel

from .base import Adapter, CallContext, VideoSpan, counts_from_inputs, split_videos


class LlavaNextVideoAdapter(Adapter):
    name = "llava_next_video"
    model_classes = (LlavaNextVideoForConditionalGeneration, LlavaNextVideoModel)

    def placeholder_ids(self, model: nn.Module) -> list[int]:
        return [model.config.video_token_id]

    def frame_grid(self, model: nn.Module) -> tuple[int, int]:
        """``g // stride`` square, ``g = image_size // patch_size`` (AvgPool/MaxPool/Conv with kernel = stride)."""
        vision = model.config.vision_config
        side = (vision.image_size // vision.patch_size) // model.config.spatial_pool_stride
        return side, side

    def spans(self, model: nn.Module, call: CallContext) -> list[VideoSpan]:
        h, w = self.frame_grid(model)
        counts = counts_from_inputs(call, h * w, 0)
        spans = []
        empty = torch.zeros(0, dtype=torch.long, device=call.target.device)
        for row, pos in split_videos(call.target, counts):
            frames, rest = divmod(pos.numel(), h * w)
            if rest or frames < 1:
                raise RuntimeError(f"a LLaVA-NeXT-Video span of {pos.numel()} tokens is not F*{h}*{w}")
            spans.append(VideoSpan(row=row, positions=pos, grid=(frames, h, w), specials=empty))
        return spans


__all__ = ["LlavaNextVideoAdapter"]
