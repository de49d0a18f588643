"""LLaVA-OneVision (and LLaVA-Video checkpoints, which use the same class).

Per video the span holds ``F * h * w`` pooled SigLIP tokens (bilinear 2x pooling of the patch grid,
e.g. 27x27 -> 14x14) followed by ONE ``image_newline`` token; positions are 1-D.

Signal ``"pixels"``: a pre-hook on the vision tower records the ``(videos * F, C, H, W)`` normalised
frames it receives (``generate`` encodes the video before the first forward, so the model kwargs no
longer hold them). Each video gets its ``(F, C, g*p, g*p)`` frames, cropped to the area the
``g x g`` patch grid covers (``g = H // p``, 378 of 384 pixels at patch size 14). Bilinear 2x
pooling centres token ``(y, x)`` of the ``ceil(g/2)``-square grid on pixel
``((y + 0.5) * g*p / h, (x + 0.5) * g*p / w)``, so a token stands for a ``g*p/h``-pixel square
(27 pixels, about 2x2 patches): the bins ``evs_pixel`` uses.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel

from .base import Adapter, CallContext, Capture, VideoSpan, split_videos, tail_frames


def _tower_pixels(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> torch.Tensor | None:
    pixels = kwargs.get("pixel_values", args[0] if args else None)
    return None if pixels is None else pixels.detach()


class LlavaOnevisionAdapter(Adapter):
    name = "llava_onevision"
    model_classes = (LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel)
    signals = frozenset({"pixels"})

    def placeholder_ids(self, model: nn.Module) -> list[int]:
        return [model.config.video_token_id]

    def frame_grid(self, model: nn.Module) -> tuple[int, int]:
        """Pooled grid per frame: ``ceil(g / 2)`` square, ``g = image_size // patch_size``."""
        vision = model.config.vision_config
        side = math.ceil((vision.image_size // vision.patch_size) / 2)
        return side, side

    def captures(self, model: nn.Module, signals: frozenset[str]) -> list[Capture]:
        if "pixels" not in signals:
            return []
        return [Capture("pixels", self.inner(model).vision_tower, _tower_pixels)]

    def video_pixels(self, model: nn.Module, call: CallContext, frames: list[int]) -> list[torch.Tensor] | None:
        """Per video, its ``(F, C, g*p, g*p)`` frames as the vision tower saw them (None if not captured)."""
        pixels = tail_frames(call.captured.get("pixels", []), sum(frames))
        if pixels is None:
            return None
        patch = model.config.vision_config.patch_size
        side_h, side_w = (pixels.shape[-2] // patch) * patch, (pixels.shape[-1] // patch) * patch
        return list(pixels[..., :side_h, :side_w].split(frames))

    def spans(self, model: nn.Module, call: CallContext) -> list[VideoSpan]:
        h, w = self.frame_grid(model)
        counts = None
        pixels = call.inner_kwargs.get("pixel_values_videos")
        encoded = (call.inner_kwargs.get("mm_encoder_outputs") or {}).get("video")
        if pixels is not None:  # (videos, frames, C, H, W)
            counts = [pixels.shape[1] * h * w + 1] * pixels.shape[0]
        elif encoded is not None:  # pre-encoded by generate: pooler_output (videos, F*h*w + 1, D)
            counts = [encoded.pooler_output.shape[1]] * encoded.pooler_output.shape[0]
        spans = []
        for row, pos in split_videos(call.target, counts):
            frames, rest = divmod(pos.numel() - 1, h * w)
            if rest or frames < 1:
                raise RuntimeError(f"a LLaVA-OneVision video span of {pos.numel()} tokens is not F*{h}*{w}+1")
            spans.append(VideoSpan(row=row, positions=pos[:-1], grid=(frames, h, w), specials=pos[-1:]))
        if "pixels" in call.captured:
            pixels = self.video_pixels(model, call, [span.grid[0] for span in spans])
            for span, frames in zip(spans, pixels or []):
                span.signals["pixels"] = frames
        return spans


__all__ = ["LlavaOnevisionAdapter"]
