"""Video-LLaVA.

Videos go through a separate ``video_tower`` (CLIP) and the projector WITHOUT dropping CLS, so each
frame contributes ``1 + g * g`` tokens: its CLS token first, then the ``g x g`` patch grid
(``g = image_size // patch_size``, 16 for CLIP-L/14 at 224). The CLS tokens are specials: the engine
keeps them and policies see only the patch grids. Positions are 1-D. Signals: TS-LLaVA thumbnails
(``adapters/thumbnail.py``; the thumbnail's own CLS token is dropped) and VisionZip's CLS-row attention
and keys of the feature layer (``adapters/visionzip_signals.py``).
"""

from __future__ import annotations

from torch import nn
from transformers import VideoLlavaForConditionalGeneration, VideoLlavaModel

from torch import Tensor

from .base import Adapter, CallContext, Capture, VideoSpan, counts_from_inputs, split_videos
from .thumbnail import THUMBNAIL_SIGNALS, ThumbnailSupport
from .visionzip_signals import VISIONZIP_SIGNALS, attach_visionzip_signals, encoder_layers, feature_layer_index, visionzip_capture


class VideoLlavaAdapter(ThumbnailSupport, Adapter):
    name = "video_llava"
    model_classes = (VideoLlavaForConditionalGeneration, VideoLlavaModel)
    signals = THUMBNAIL_SIGNALS | VISIONZIP_SIGNALS
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
        attach_visionzip_signals(call, spans, [s.grid[0] for s in spans])
        self.attach_thumbnails(model, call, spans, [s.grid[0] for s in spans])
        return spans


__all__ = ["VideoLlavaAdapter"]
