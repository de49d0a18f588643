"""LLaVA-OneVision (and LLaVA-Video checkpoints, which use the same class).

Signals (``adapters/frame_tower.py``): ``"thumbnail4"``/``"thumbnail6"``/``"thumbnail8"`` (TS-LLaVA, see
``adapters/thumbnail.py``); ``"vision_saliency"``/``"vision_keys"`` (VisionZip, ``adapters/vision_signals.py``:
attention received per patch and keys of the feature layer, pooled bilinearly like the features).

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

from torch import Tensor, nn
from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel

from .base import CallContext, VideoSpan, counts_from_inputs, split_videos
from .frame_tower import FrameTowerAdapter


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


class LlavaOnevisionAdapter(FrameTowerAdapter):
    name = "llava_onevision"
    model_classes = (LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel)
    signals = FrameTowerAdapter.signals | {"vision_features"}

    def frame_grid(self, model: nn.Module) -> tuple[int, int]:
        """Pooled grid per frame: ``ceil(g / 2)`` square, ``g = image_size // patch_size``."""
        vision = model.config.vision_config
        side = math.ceil((vision.image_size // vision.patch_size) / 2)
        return side, side

    def crop_unit(self, model: nn.Module) -> int:
        return model.config.vision_config.patch_size

    def tower_has_cls(self, model: nn.Module) -> bool:
        return False  # SigLIP

    def pool(self, model: nn.Module, values: Tensor, signal: str) -> Tensor:
        return pool_patches(values, self.frame_grid(model))

    def thumbnail_tokens(self, pooled: Tensor) -> Tensor:
        return pooled[:, :-1]  # drop the image_newline get_video_features appends

    def locate(self, model: nn.Module, call: CallContext) -> list[VideoSpan]:
        h, w = self.frame_grid(model)
        counts = counts_from_inputs(call, h * w, 1)
        spans = []
        for row, pos in split_videos(call.target, counts):
            frames, rest = divmod(pos.numel() - 1, h * w)
            if rest or frames < 1:
                raise RuntimeError(f"a LLaVA-OneVision video span of {pos.numel()} tokens is not F*{h}*{w}+1")
            spans.append(VideoSpan(row=row, positions=pos[:-1], grid=(frames, h, w), specials=pos[-1:]))
        return spans


__all__ = ["LlavaOnevisionAdapter", "pool_patches"]
