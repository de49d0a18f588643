"""LLaVA-OneVision (and LLaVA-Video checkpoints, which use the same class).

Per video the span holds ``F * h * w`` pooled SigLIP tokens (bilinear 2x pooling of the patch grid,
e.g. 27x27 -> 14x14) followed by ONE ``image_newline`` token; positions are 1-D.

Signals (captured on the SigLIP layer whose output the projector reads, see ``vision_feature_layer``):
``"vision_attention"`` ``(F, h*w)`` attention each patch receives (mean over heads and queries) and
``"frame_query_attention"`` ``(F, h*w)`` attention of the frame's mean query, both recomputed from the
layer's q/k and pooled bilinearly like the features; ``"vision_features"`` ``(F, P, C)`` the layer's
output (pre-projector), for policies that run SigLIP's pooling head themselves.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor, nn
from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel

from .base import Adapter, CallContext, Capture, VideoSpan, split_videos
from .vision_signals import ATTENTION_SIGNALS, attach_frame_signals, encoded_order, encoder_layers, feature_layer
from .vision_signals import layer_attention_capture


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


class LlavaOnevisionAdapter(Adapter):
    name = "llava_onevision"
    model_classes = (LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel)
    signals = frozenset({"vision_attention", "frame_query_attention", "vision_features"})

    def placeholder_ids(self, model: nn.Module) -> list[int]:
        return [model.config.video_token_id]

    def frame_grid(self, model: nn.Module) -> tuple[int, int]:
        """Pooled grid per frame: ``ceil(g / 2)`` square, ``g = image_size // patch_size``."""
        vision = model.config.vision_config
        side = math.ceil((vision.image_size // vision.patch_size) / 2)
        return side, side

    def captures(self, model: nn.Module, signals: frozenset[str]) -> list[Capture]:
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
        self.attach_signals(spans, call, (h, w))
        return spans

    def attach_signals(self, spans: list[VideoSpan], call: CallContext, grid: tuple[int, int]) -> None:
        """Per video, the signals captured in the last tower call (videos are encoded after images).

        The tower sees every frame of every encoded video in one batch, so its rows split into videos
        of ``F`` frames (all videos of a call have the same ``F``).
        """
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


__all__ = ["LlavaOnevisionAdapter", "pool_patches"]
