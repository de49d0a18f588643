"""LLaVA-NeXT-Video.

Per frame the CLIP patch grid (CLS dropped by the "default" feature strategy) is pooled by the
``vision_resampler`` with stride ``spatial_pool_stride`` and projected; the span holds ``F * h * w``
tokens, no newline for videos. Positions are 1-D. Signals: TS-LLaVA thumbnails (``adapters/thumbnail.py``)
and VisionZip's CLS-row attention and keys (``adapters/visionzip_signals.py``, average-pooled like the
features, whatever ``spatial_pool_mode`` the resampler uses).

Signal ``"pixels"``: a pre-hook on the vision tower (shared with images, which are encoded first)
records the ``(videos * F, C, H, W)`` frames. Token ``(y, x)`` pools patches ``y*s .. y*s + s - 1``
(``s`` = stride), i.e. the ``s*p``-pixel square at ``(y*s*p, x*s*p)``; the frames are cropped to the
``h*s*p`` square the tokens cover, so the bins ``evs_pixel`` uses are exactly those squares.
Signals ``"vision_attention"`` (attention each patch receives, mean over heads and queries) and
``"frame_query_attention"`` (the CLS query's attention over the patches, mean over heads) of the
feature layer (``adapters/vision_signals.py``), pooled with the resampler's window (average; max for ``"max"``;
average for ``"conv"``, whose learned kernel has no attention analogue).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import LlavaNextVideoForConditionalGeneration, LlavaNextVideoModel

from .base import (
    Adapter,
    CallContext,
    Capture,
    VideoSpan,
    attach_frames,
    counts_from_inputs,
    split_videos,
    tower_pixels,
)
from .thumbnail import THUMBNAIL_SIGNALS, ThumbnailSupport
from .vision_signals import ATTENTION_SIGNALS, attach_frame_signals, feature_layer, layer_attention_capture
from .visionzip_signals import VISIONZIP_SIGNALS, attach_visionzip_signals, encoder_layers, feature_layer_index, visionzip_capture


class LlavaNextVideoAdapter(ThumbnailSupport, Adapter):
    name = "llava_next_video"
    model_classes = (LlavaNextVideoForConditionalGeneration, LlavaNextVideoModel)
    signals = THUMBNAIL_SIGNALS | VISIONZIP_SIGNALS | {"pixels", *ATTENTION_SIGNALS}

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
        if "pixels" in signals:  # evs_pixel: the frames as the tower receives them
            out.append(Capture("pixels", self.inner(model).vision_tower, tower_pixels))
        wanted = [s for s in ATTENTION_SIGNALS if s in signals]
        if wanted:
            inner = self.inner(model)
            layer = feature_layer(encoder_layers(inner.vision_tower), inner.config.vision_feature_layer)
            cls = inner.config.vision_feature_select_strategy == "default"
            if layer is not None:
                out.append(Capture("vision_attention_maps", layer, layer_attention_capture(wanted, cls_token=cls)))
        return out

    def pool(self, model: nn.Module, values: Tensor) -> Tensor:
        """``(F, g*g)`` per-patch values -> ``(F, h*w)`` with the resampler's window."""
        stride = model.config.spatial_pool_stride
        side = int(round(values.shape[1] ** 0.5))
        grid = values.reshape(-1, 1, side, side).float()
        op = F.max_pool2d if model.config.spatial_pool_mode == "max" else F.avg_pool2d
        return op(grid, kernel_size=stride, stride=stride).reshape(values.shape[0], -1)

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
        attach_frames(spans, call, model.config.vision_config.patch_size * model.config.spatial_pool_stride)
        attach_visionzip_signals(call, spans, [s.grid[0] for s in spans])
        self.attach_thumbnails(model, call, spans, [s.grid[0] for s in spans])
        attach_frame_signals(spans, call, lambda v: self.pool(model, v))
        return spans


__all__ = ["LlavaNextVideoAdapter"]
