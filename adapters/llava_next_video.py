"""LLaVA-NeXT-Video.

Per frame the CLIP patch grid (CLS dropped by the "default" feature strategy) is pooled by the
``vision_resampler`` with stride ``spatial_pool_stride`` and projected; the span holds ``F * h * w``
tokens, no newline for videos. Positions are 1-D. Signals (``adapters/frame_tower.py``): TS-LLaVA thumbnails
(``adapters/thumbnail.py``) and VisionZip's CLS-row attention and keys (``adapters/vision_signals.py``,
average-pooled, whatever ``spatial_pool_mode`` the resampler uses).

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

from .base import CallContext, VideoSpan, counts_from_inputs, split_videos
from .frame_tower import FrameTowerAdapter
from .vision_signals import VISIONZIP_SIGNALS


class LlavaNextVideoAdapter(FrameTowerAdapter):
    name = "llava_next_video"
    model_classes = (LlavaNextVideoForConditionalGeneration, LlavaNextVideoModel)

    def frame_grid(self, model: nn.Module) -> tuple[int, int]:
        """``g // stride`` square, ``g = image_size // patch_size`` (AvgPool/MaxPool/Conv with kernel = stride)."""
        vision = model.config.vision_config
        side = (vision.image_size // vision.patch_size) // model.config.spatial_pool_stride
        return side, side

    def crop_unit(self, model: nn.Module) -> int:
        return model.config.vision_config.patch_size * model.config.spatial_pool_stride

    def tower_has_cls(self, model: nn.Module) -> bool:
        return self.inner(model).config.vision_feature_select_strategy == "default"

    def pool(self, model: nn.Module, values: Tensor, signal: str) -> Tensor:
        """``(F, g*g)`` per-patch values -> ``(F, h*w)`` with the resampler's window (VisionZip's: average)."""
        stride = model.config.spatial_pool_stride
        side = int(round(values.shape[1] ** 0.5))
        grid = values.reshape(-1, 1, side, side).float()
        use_max = model.config.spatial_pool_mode == "max" and signal not in VISIONZIP_SIGNALS
        op = F.max_pool2d if use_max else F.avg_pool2d
        return op(grid, kernel_size=stride, stride=stride).reshape(values.shape[0], -1)

    def locate(self, model: nn.Module, call: CallContext) -> list[VideoSpan]:
        h, w = self.frame_grid(model)
        counts = counts_from_inputs(call, h * w, 0)
        spans = []
        empty = torch.zeros(0, dtype=torch.long, device=call.target.device)
        for row, pos in split_videos(call.target, counts):
            frames, rest = divmod(pos.numel(), h * w)
            if rest or frames < 1:
                raise RuntimeError(f"a LLaVA-NeXT-Video span of {pos.numel()} tokens is not F*{h}*{w}")
            spans.append(VideoSpan(row=row, positions=pos, grid=(frames, h, w), specials=empty))
        return spans


__all__ = ["LlavaNextVideoAdapter"]
