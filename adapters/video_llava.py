"""Video-LLaVA.

Videos go through a separate ``video_tower`` (CLIP) and the projector WITHOUT dropping CLS, so each
frame contributes ``1 + g * g`` tokens: its CLS token first, then the ``g x g`` patch grid
(``g = image_size // patch_size``, 16 for CLIP-L/14 at 224). The CLS tokens are specials: the engine
keeps them and policies see only the patch grids. Positions are 1-D. Signals (``adapters/frame_tower.py``):
TS-LLaVA thumbnails (``adapters/thumbnail.py``; the thumbnail's own CLS token is dropped) and VisionZip's
CLS-row attention and keys of the feature layer (``adapters/vision_signals.py``).

Signal ``"pixels"``: a pre-hook on ``video_tower`` records the ``(videos * F, C, H, W)`` frames;
token ``(y, x)`` is patch ``(y, x)``, the ``p``-pixel square at ``(y*p, x*p)`` of the frame cropped
to ``g*p`` pixels.
Signals ``"vision_attention"`` (attention each patch receives, mean over heads and queries) and
``"frame_query_attention"`` (the CLS query's attention over the patches, mean over heads) of the
feature layer (``adapters/vision_signals.py``), on the patch grid itself.
"""

from __future__ import annotations

from torch import Tensor, nn
from transformers import VideoLlavaForConditionalGeneration, VideoLlavaModel

from .base import CallContext, VideoSpan, counts_from_inputs, split_videos
from .frame_tower import FrameTowerAdapter


class VideoLlavaAdapter(FrameTowerAdapter):
    name = "video_llava"
    model_classes = (VideoLlavaForConditionalGeneration, VideoLlavaModel)
    video_tower_attr = "video_tower"

    def frame_grid(self, model: nn.Module) -> tuple[int, int]:
        vision = model.config.vision_config
        side = vision.image_size // vision.patch_size
        return side, side

    def crop_unit(self, model: nn.Module) -> int:
        return model.config.vision_config.patch_size

    def tower_has_cls(self, model: nn.Module) -> bool:
        return True  # CLIP

    def pool(self, model: nn.Module, values: Tensor, signal: str) -> Tensor:
        return values  # the tokens are the patches

    def thumbnail_tokens(self, pooled: Tensor) -> Tensor:
        return pooled[:, 1:]  # the thumbnail's patch grid, without its CLS token

    def locate(self, model: nn.Module, call: CallContext) -> list[VideoSpan]:
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
        return spans


__all__ = ["VideoLlavaAdapter"]
