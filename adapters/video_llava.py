"""Video-LLaVA.

Videos go through a separate ``video_tower`` (CLIP) and the projector WITHOUT dropping CLS, so each
frame contributes ``1 + g * g`` tokens: its CLS token first, then the ``g x g`` patch grid
(``g = image_size // patch_size``, 16 for CLIP-L/14 at 224). The CLS tokens are specials: the engine
keeps them and policies see only the patch grids. Positions are 1-D. Signals: TS-LLaVA thumbnails
(``adapters/thumbnail.py``; the thumbnail's own CLS token is dropped) and VisionZip's CLS-row attention
and keys of the feature layer (``adapters/visionzip_signals.py``).

Signal ``"pixels"``: a pre-hook on ``video_tower`` records the ``(videos * F, C, H, W)`` frames;
token ``(y, x)`` is patch ``(y, x)``, the ``p``-pixel square at ``(y*p, x*p)`` of the frame cropped
to ``g*p`` pixels.
Signals ``"vision_attention"`` (attention each patch receives, mean over heads and queries) and
``"frame_query_attention"`` (the CLS query's attention over the patches, mean over heads) of the
feature layer (``adapters/vision_signals.py``), on the patch grid itself.
"""

from __future__ import annotations

from torch import nn
from transformers import VideoLlavaForConditionalGeneration, VideoLlavaModel

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
from .vision_signals import ATTENTION_SIGNALS, attach_frame_signals, feature_layer, layer_attention_capture
from .visionzip_signals import VISIONZIP_SIGNALS, attach_visionzip_signals, encoder_layers, feature_layer_index, visionzip_capture


class VideoLlavaAdapter(ThumbnailSupport, Adapter):
    name = "video_llava"
    model_classes = (VideoLlavaForConditionalGeneration, VideoLlavaModel)
    signals = THUMBNAIL_SIGNALS | VISIONZIP_SIGNALS | {"pixels", *ATTENTION_SIGNALS}
    video_tower_attr = "video_tower"

    def placeholder_ids(self, model: nn.Module) -> list[int]:
        return [model.config.video_token_id]

    def frame_grid(self, model: nn.Module) -> tuple[int, int]:
        vision = model.config.vision_config
        side = vision.image_size // vision.patch_size
        return side, side

    def captures(self, model: nn.Module, signals: frozenset[str]) -> list[Capture]:
        out = self.thumbnail_captures(model, signals)
        if VISIONZIP_SIGNALS & signals:  # CLIP: the CLS row of the feature layer, as the reference
            inner = self.inner(model)
            layers = encoder_layers(inner.video_tower)
            layer = layers[feature_layer_index(len(layers), inner.config.vision_feature_layer)]
            out.append(visionzip_capture(layer, has_cls=True))
        if "pixels" in signals:  # evs_pixel: the frames as the tower receives them
            out.append(Capture("pixels", self.inner(model).video_tower, tower_pixels))
        wanted = [s for s in ATTENTION_SIGNALS if s in signals]
        if wanted:
            inner = self.inner(model)
            layer = feature_layer(encoder_layers(inner.video_tower), inner.config.vision_feature_layer)
            if layer is not None:
                out.append(Capture("vision_attention_maps", layer, layer_attention_capture(wanted, cls_token=True)))
        return out

    def thumbnail_tokens(self, pooled: Tensor) -> Tensor:
        return pooled[:, 1:]  # the thumbnail's patch grid, without its CLS token

    def spans(self, model: nn.Module, call: CallContext) -> list[VideoSpan]:
        h, w = self.frame_grid(model)
        per_frame = h * w + 1
        counts = counts_from_inputs(call, per_frame, pooled=False)  # pooler_output is per frame here
        spans = []
        for row, pos in split_videos(call.target, counts):
            frames, rest = divmod(pos.numel(), per_frame)
            if rest or frames < 1:
                raise RuntimeError(f"a Video-LLaVA span of {pos.numel()} tokens is not F*(1+{h}*{w})")
            by_frame = pos.reshape(frames, per_frame)
            spans.append(
                VideoSpan(row=row, positions=by_frame[:, 1:].reshape(-1), grid=(frames, h, w), specials=by_frame[:, 0])
            )
        attach_frames(spans, call, model.config.vision_config.patch_size)
        attach_visionzip_signals(call, spans, [s.grid[0] for s in spans])
        self.attach_thumbnails(model, call, spans, [s.grid[0] for s in spans])
        attach_frame_signals(spans, call, lambda v: v)
        return spans


__all__ = ["VideoLlavaAdapter"]
