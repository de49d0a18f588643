"""Shared rule for families whose vision tower encodes every video frame as one image (LLaVA-OneVision,
LLaVA-NeXT-Video, Video-LLaVA).

The frames of a call's videos reach the tower as one ``(videos * F, C, H, W)`` batch in span order
(beam copies share their video's frames, see ``encoded_offsets_or_none`` in ``adapters/base.py``).
The adapter records them with one pre-hook on the tower: signal ``"pixels"`` (each span's frames,
cropped to the area its token grid covers) and the frames TS-LLaVA's thumbnails tile
(``adapters/thumbnail.py``). One pre-hook on the feature layer recomputes the attention signals and
VisionZip's (``adapters/vision_signals.py``), which each family pools onto its token grid the way it
pools its features (:meth:`FrameTowerAdapter.pool`). ``"vision_features"``, where a family lists it,
is the feature layer's output before the projector, ``(F, P, C)``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .base import Adapter, CallContext, Capture, VideoSpan, attach_frames, last_capture, span_frames, tower_pixels
from .thumbnail import THUMBNAIL_SIGNALS, ThumbnailSupport
from .vision_signals import (
    ATTENTION_SIGNALS,
    LAYER_SIGNALS,
    VISIONZIP_SIGNALS,
    attach_frame_signals,
    encoder_layers,
    feature_layer,
    feature_layer_captures,
)


def _layer_output(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Tensor:
    hidden = output[0] if isinstance(output, tuple) else output
    return hidden.detach()


class FrameTowerAdapter(ThumbnailSupport, Adapter):
    """Base of the LLaVA-style video adapters; subclasses say where the tokens are and how they pool."""

    signals = THUMBNAIL_SIGNALS | VISIONZIP_SIGNALS | {"pixels", *ATTENTION_SIGNALS}
    #: Attribute of the inner model that holds the tower the video frames go through.
    video_tower_attr = "vision_tower"

    def placeholder_ids(self, model: nn.Module) -> list[int]:
        return [model.config.video_token_id]

    def frame_grid(self, model: nn.Module) -> tuple[int, int]:
        """``(h, w)`` tokens per frame."""
        raise NotImplementedError

    def crop_unit(self, model: nn.Module) -> int:
        """The ``"pixels"`` frames are cropped to multiples of this many pixels (the area the tokens cover)."""
        raise NotImplementedError

    def tower_has_cls(self, model: nn.Module) -> bool:
        """Whether the tower puts a CLS token before the patches (its column is dropped from the maps)."""
        raise NotImplementedError

    def pool(self, model: nn.Module, values: Tensor, signal: str) -> Tensor:
        """``(F, P)`` per-patch values of ``signal`` -> ``(F, h*w)``, pooled as the model pools its features."""
        raise NotImplementedError

    def locate(self, model: nn.Module, call: CallContext) -> list[VideoSpan]:
        """The call's videos, without signals."""
        raise NotImplementedError

    def video_tower(self, model: nn.Module) -> nn.Module:
        return getattr(self.inner(model), self.video_tower_attr)

    def captures(self, model: nn.Module, signals: frozenset[str]) -> list[Capture]:
        tower = self.video_tower(model)
        out = []
        if self.use_thumbnails(signals) or "pixels" in signals:
            out.append(Capture("pixels", tower, tower_pixels))
        index = self.inner(model).config.vision_feature_layer
        wanted = [s for s in LAYER_SIGNALS if s in signals]
        out += feature_layer_captures(tower, index, wanted, self.tower_has_cls(model))
        if "vision_features" in signals and "vision_features" in self.signals:
            layer = feature_layer(encoder_layers(tower), index)
            if layer is not None:
                out.append(Capture("vision_features", layer, _layer_output, when="post"))
        return out

    def spans(self, model: nn.Module, call: CallContext) -> list[VideoSpan]:
        spans = self.locate(model, call)
        if not spans:
            return spans
        attach_frames(spans, call, self.crop_unit(model))
        attach_frame_signals(spans, call, lambda values, signal: self.pool(model, values, signal))
        features = last_capture(call, "vision_features")
        parts = None if features is None else span_frames(spans, call, features)
        for span, part in zip(spans, parts or []):
            span.signals = {**span.signals, "vision_features": part}
        self.attach_thumbnails(model, call, spans)  # last: encoding the thumbnails runs the tower again
        return spans


__all__ = ["FrameTowerAdapter"]
