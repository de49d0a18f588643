"""LLaVA-OneVision (and LLaVA-Video checkpoints, which use the same class).

Signals: ``"thumbnail4"``/``"thumbnail6"``/``"thumbnail8"`` (TS-LLaVA, see ``adapters/thumbnail.py``);
``"vision_saliency"``/``"vision_keys"`` (VisionZip, ``adapters/visionzip_signals.py``: attention received
per patch and keys of the feature layer, pooled bilinearly like the features).

Per video the span holds ``F * h * w`` pooled SigLIP tokens (bilinear 2x pooling of the patch grid,
e.g. 27x27 -> 14x14) followed by ONE ``image_newline`` token; positions are 1-D.

Signal ``"pixels"``: a pre-hook on the vision tower records the ``(videos * F, C, H, W)`` normalised
frames it receives (``generate`` encodes the video before the first forward, so the model kwargs no
longer hold them). Each video gets its ``(F, C, g*p, g*p)`` frames, cropped to the area the
``g x g`` patch grid covers (``g = H // p``, 378 of 384 pixels at patch size 14). Bilinear 2x
pooling centres token ``(y, x)`` of the ``ceil(g/2)``-square grid on pixel
``((y + 0.5) * g*p / h, (x + 0.5) * g*p / w)``, so a token stands for a ``g*p/h``-pixel square
(27 pixels, about 2x2 patches): the bins ``evs_pixel`` uses.

Signals ``"vision_attention"`` ``(F, h*w)`` (attention each patch receives, mean over heads and
queries) and ``"frame_query_attention"`` ``(F, h*w)`` (attention of the frame's mean query) of the
feature layer, recomputed from its q/k and pooled bilinearly (``adapters/vision_signals.py``), and
``"vision_features"`` ``(F, P, C)``, that layer's output before the projector, for policies that run
SigLIP's pooling head themselves (FastVID).
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn
from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel

from torch import Tensor

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
from .vision_signals import ATTENTION_SIGNALS, attach_frame_signals, encoded_order, feature_layer
from .vision_signals import layer_attention_capture
from .visionzip_signals import (
    VISIONZIP_SIGNALS,
    attach_visionzip_signals,
    bilinear_half,
    encoder_layers,
    feature_layer_index,
    visionzip_capture,
)


def pool_patches(values: Tensor, grid: tuple[int, int]) -> Tensor:
    """``(F, P)`` per-patch values on a square patch grid -> ``(F, h*w)``: LLaVA-OneVision's bilinear pooling."""
    frames, patches = values.shape
    side = math.isqrt(patches)
    if side * side != patches:
        raise RuntimeError(f"cannot pool {patches} vision patches onto the token grid: not a square")
    if (side, side) == tuple(grid):
        return values
    pooled = nn.functional.interpolate(values.reshape(frames, 1, side, side).float(), size=grid, mode="bilinear")
    return pooled.reshape(frames, -1)


class LlavaOnevisionAdapter(ThumbnailSupport, Adapter):
    name = "llava_onevision"
    model_classes = (LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel)
    signals = THUMBNAIL_SIGNALS | VISIONZIP_SIGNALS | {"pixels", "vision_features", *ATTENTION_SIGNALS}

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
        if "pixels" in signals:  # evs_pixel: the frames as the tower receives them
            out.append(Capture("pixels", self.inner(model).vision_tower, tower_pixels))
        return out + self.attention_captures(model, signals)

    def attention_captures(self, model: nn.Module, signals: frozenset[str]) -> list[Capture]:
        """``vision_attention`` / ``frame_query_attention`` / ``vision_features`` on the feature layer."""
        wanted = [s for s in ATTENTION_SIGNALS if s in signals]
        if not wanted and "vision_features" not in signals:
            return []
        inner = self.inner(model)
        layer = feature_layer(encoder_layers(inner.vision_tower), inner.config.vision_feature_layer)
        if layer is None:
            return []
        out = []
        if wanted:
            out.append(Capture("vision_attention_maps", layer, layer_attention_capture(wanted, cls_token=False)))
        if "vision_features" in signals:

            def features(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Tensor:
                hidden = output[0] if isinstance(output, tuple) else output
                return hidden.detach()

            out.append(Capture("vision_features", layer, features, when="post"))
        return out

    def attach_attention(self, spans: list[VideoSpan], call: CallContext, grid: tuple[int, int]) -> None:
        """Per video, the attention maps and features captured in the last tower call (videos last)."""
        if not spans:
            return
        attach_frame_signals(spans, call, lambda v: pool_patches(v, grid))
        feats = call.captured.get("vision_features") or []
        frames = spans[0].grid[0]
        if feats and feats[-1].shape[0] % frames == 0:
            parts = feats[-1].split(frames)
            index = encoded_order([s.row for s in spans], call.target.shape[0], len(parts))
            for span, i in zip(spans, index or []):
                if span.grid[0] == frames:
                    span.signals = {**span.signals, "vision_features": parts[i]}

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
        attach_frames(spans, call, model.config.vision_config.patch_size)
        attach_visionzip_signals(call, spans, [s.grid[0] for s in spans])
        self.attach_thumbnails(model, call, spans, [s.grid[0] for s in spans])
        self.attach_attention(spans, call, (h, w))
        return spans


__all__ = ["LlavaOnevisionAdapter", "pool_patches"]
