"""LLaVA-OneVision (and LLaVA-Video checkpoints, which use the same class).

Signals: ``"thumbnail4"``/``"thumbnail6"``/``"thumbnail8"`` (TS-LLaVA, see ``adapters/thumbnail.py``);
``"vision_saliency"``/``"vision_keys"`` (VisionZip, ``adapters/visionzip_signals.py``: attention received
per patch and keys of the feature layer, pooled bilinearly like the features).

Per video the span holds ``F * h * w`` pooled SigLIP tokens (bilinear 2x pooling of the patch grid,
e.g. 27x27 -> 14x14) followed by ONE ``image_newline`` token; positions are 1-D.
"""

from __future__ import annotations

import math

from torch import nn
from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel

from torch import Tensor

from .base import Adapter, CallContext, Capture, VideoSpan, counts_from_inputs, split_videos
from .thumbnail import THUMBNAIL_SIGNALS, ThumbnailSupport
from .visionzip_signals import (
    VISIONZIP_SIGNALS,
    attach_visionzip_signals,
    bilinear_half,
    encoder_layers,
    feature_layer_index,
    visionzip_capture,
)


class LlavaOnevisionAdapter(ThumbnailSupport, Adapter):
    name = "llava_onevision"
    model_classes = (LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel)
    signals = THUMBNAIL_SIGNALS | VISIONZIP_SIGNALS

    def placeholder_ids(self, model: nn.Module) -> list[int]:
        return [model.config.video_token_id]

    def frame_grid(self, model: nn.Module) -> tuple[int, int]:
        """Pooled grid per frame: ``ceil(g / 2)`` square, ``g = image_size // patch_size``."""
        vision = model.config.vision_config
        side = math.ceil((vision.image_size // vision.patch_size) / 2)
        return side, side

    def captures(self, model: nn.Module, signals: frozenset[str]) -> list[Capture]:
        out = self.thumbnail_captures(model, signals)
        if VISIONZIP_SIGNALS & signals:  # SigLIP: no CLS; pooled to the token grid like the features
            inner = self.inner(model)
            layers = encoder_layers(inner.vision_tower)
            layer = layers[feature_layer_index(len(layers), inner.config.vision_feature_layer)]
            out.append(visionzip_capture(layer, has_cls=False, pool=bilinear_half))
        return out

    def thumbnail_tokens(self, pooled: Tensor) -> Tensor:
        return pooled[:, :-1]  # drop the image_newline get_video_features appends

    def spans(self, model: nn.Module, call: CallContext) -> list[VideoSpan]:
        h, w = self.frame_grid(model)
        counts = counts_from_inputs(call, h * w, 1)
        spans = []
        for row, pos in split_videos(call.target, counts):
            frames, rest = divmod(pos.numel() - 1, h * w)
            if rest or frames < 1:
                raise RuntimeError(f"a LLaVA-OneVision video span of {pos.numel()} tokens is not F*{h}*{w}+1")
            spans.append(VideoSpan(row=row, positions=pos[:-1], grid=(frames, h, w), specials=pos[-1:]))
        attach_visionzip_signals(call, spans, [s.grid[0] for s in spans])
        self.attach_thumbnails(model, call, spans, [s.grid[0] for s in spans])
        return spans


__all__ = ["LlavaOnevisionAdapter"]
