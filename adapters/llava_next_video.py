"""LLaVA-NeXT-Video.

Per frame the CLIP patch grid (CLS dropped by the "default" feature strategy) is pooled by the
``vision_resampler`` with stride ``spatial_pool_stride`` and projected; the span holds ``F * h * w``
tokens, no newline for videos. Positions are 1-D. Signals: TS-LLaVA thumbnails (``adapters/thumbnail.py``)
and VisionZip's CLS-row attention and keys (``adapters/visionzip_signals.py``, average-pooled like the
features, whatever ``spatial_pool_mode`` the resampler uses).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlavaNextVideoForConditionalGeneration, LlavaNextVideoModel

from .base import Adapter, CallContext, Capture, VideoSpan, counts_from_inputs, split_videos
from .thumbnail import THUMBNAIL_SIGNALS, ThumbnailSupport
from .visionzip_signals import VISIONZIP_SIGNALS, attach_visionzip_signals, encoder_layers, feature_layer_index, visionzip_capture


class LlavaNextVideoAdapter(ThumbnailSupport, Adapter):
    name = "llava_next_video"
    model_classes = (LlavaNextVideoForConditionalGeneration, LlavaNextVideoModel)
    signals = THUMBNAIL_SIGNALS | VISIONZIP_SIGNALS

    def placeholder_ids(self, model: nn.Module) -> list[int]:
        return [model.config.video_token_id]

    def frame_grid(self, model: nn.Module) -> tuple[int, int]:
        """``g // stride`` square, ``g = image_size // patch_size`` (AvgPool/MaxPool/Conv with kernel = stride)."""
        vision = model.config.vision_config
        side = (vision.image_size // vision.patch_size) // model.config.spatial_pool_stride
        return side, side

    def captures(self, model: nn.Module, signals: frozenset[str]) -> list[Capture]:
        out = self.thumbnail_captures(model, signals)
        if VISIONZIP_SIGNALS & signals:  # CLIP: the CLS row; average-pooled to the token grid
            inner = self.inner(model)
            layers = encoder_layers(inner.vision_tower)
            layer = layers[feature_layer_index(len(layers), inner.config.vision_feature_layer)]
            stride = model.config.spatial_pool_stride
            out.append(visionzip_capture(layer, has_cls=True, pool=lambda g: F.avg_pool2d(g, stride)))
        return out

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
        attach_visionzip_signals(call, spans, [s.grid[0] for s in spans])
        self.attach_thumbnails(model, call, spans, [s.grid[0] for s in spans])
        return spans


__all__ = ["LlavaNextVideoAdapter"]
