"""LLaVA-NeXT-Video.

Per frame the CLIP patch grid (CLS dropped by the "default" feature strategy) is pooled by the
``vision_resampler`` with stride ``spatial_pool_stride`` and projected; the span holds ``F * h * w``
tokens, no newline for videos. Positions are 1-D.

Signals (captured on the CLIP layer the features come from, ``vision_feature_layer``):
``"vision_attention"`` (attention each patch receives, mean over heads and queries) and
``"frame_query_attention"`` (the CLS query's attention over the patches, mean over heads), both
pooled onto the token grid with the resampler's own window (average; max for ``"max"`` mode;
average for ``"conv"``, whose learned kernel has no attention analogue).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import LlavaNextVideoForConditionalGeneration, LlavaNextVideoModel

from .base import Adapter, CallContext, Capture, VideoSpan, split_videos
from .vision_signals import ATTENTION_SIGNALS, attach_frame_signals, encoder_layers, feature_layer
from .vision_signals import layer_attention_capture


class LlavaNextVideoAdapter(Adapter):
    name = "llava_next_video"
    model_classes = (LlavaNextVideoForConditionalGeneration, LlavaNextVideoModel)
    signals = frozenset(ATTENTION_SIGNALS)

    def captures(self, model: nn.Module, signals: frozenset[str]) -> list[Capture]:
        wanted = [s for s in ATTENTION_SIGNALS if s in signals]
        inner = self.inner(model)
        layer = feature_layer(encoder_layers(inner.vision_tower), inner.config.vision_feature_layer) if wanted else None
        if layer is None:
            return []
        cls = inner.config.vision_feature_select_strategy == "default"
        return [Capture("vision_attention_maps", layer, layer_attention_capture(wanted, cls_token=cls))]

    def pool(self, model: nn.Module, values: Tensor) -> Tensor:
        """``(F, g*g)`` per-patch values -> ``(F, h*w)`` with the resampler's window."""
        stride = model.config.spatial_pool_stride
        side = int(round(values.shape[1] ** 0.5))
        grid = values.reshape(-1, 1, side, side).float()
        op = torch.nn.functional.max_pool2d if model.config.spatial_pool_mode == "max" else torch.nn.functional.avg_pool2d
        return op(grid, kernel_size=stride, stride=stride).reshape(values.shape[0], -1)

    def placeholder_ids(self, model: nn.Module) -> list[int]:
        return [model.config.video_token_id]

    def frame_grid(self, model: nn.Module) -> tuple[int, int]:
        """``g // stride`` square, ``g = image_size // patch_size`` (AvgPool/MaxPool/Conv with kernel = stride)."""
        vision = model.config.vision_config
        side = (vision.image_size // vision.patch_size) // model.config.spatial_pool_stride
        return side, side

    def spans(self, model: nn.Module, call: CallContext) -> list[VideoSpan]:
        h, w = self.frame_grid(model)
        counts = None
        pixels = call.inner_kwargs.get("pixel_values_videos")
        encoded = (call.inner_kwargs.get("mm_encoder_outputs") or {}).get("video")
        if pixels is not None:  # (videos, frames, C, H, W)
            counts = [pixels.shape[1] * h * w] * pixels.shape[0]
        elif encoded is not None:  # pooler_output (videos, F*h*w, D)
            counts = [encoded.pooler_output.shape[1]] * encoded.pooler_output.shape[0]
        spans = []
        empty = torch.zeros(0, dtype=torch.long, device=call.target.device)
        for row, pos in split_videos(call.target, counts):
            frames, rest = divmod(pos.numel(), h * w)
            if rest or frames < 1:
                raise RuntimeError(f"a LLaVA-NeXT-Video span of {pos.numel()} tokens is not F*{h}*{w}")
            spans.append(VideoSpan(row=row, positions=pos, grid=(frames, h, w), specials=empty))
        attach_frame_signals(spans, call, lambda v: self.pool(model, v))
        return spans


__all__ = ["LlavaNextVideoAdapter"]
