"""Shared rule for families whose processors turn video frames into images (InternVL, SmolVLM).

The model sees only ``image_token_id``: each frame is one run of ``tokens_per_image`` placeholders
between image delimiters. In each batch row, every run of exactly that length is taken as a frame of
one video, in order; other runs (multi-tile still images) pass through untouched. A prompt that mixes
single-tile still images with a video cannot be told apart and is compressed as one video.

Signals: subclasses name the vision layer the features come from (``signal_layer``) and how a
per-patch map becomes a per-token map (``pool``); the last tower call must then hold exactly the
frames of the videos (in generate, possibly repeated for beams), else the signals are left out.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import Adapter, CallContext, Capture, VideoSpan, runs
from .vision_signals import ATTENTION_SIGNALS, attach_frame_signals, layer_attention_capture


class FramesAsImagesAdapter(Adapter):
    signals = frozenset(ATTENTION_SIGNALS)
    #: Whether the tower puts a CLS token first (its column is dropped from the maps).
    cls_token = False

    def signal_layer(self, model: nn.Module) -> nn.Module | None:
        """The vision encoder layer whose output the features are made of (None: no signals)."""
        return None

    def pool(self, model: nn.Module, values: Tensor) -> Tensor:
        """``(images, patches)`` -> ``(images, tokens)`` the way the model merges patches."""
        raise NotImplementedError

    def captures(self, model: nn.Module, signals: frozenset[str]) -> list[Capture]:
        wanted = [s for s in ATTENTION_SIGNALS if s in signals]
        layer = self.signal_layer(model) if wanted else None
        if layer is None:
            return []
        return [Capture("vision_attention_maps", layer, layer_attention_capture(wanted, cls_token=self.cls_token))]

    def placeholder_ids(self, model: nn.Module) -> list[int]:
        return [model.config.image_token_id]

    def tokens_per_image(self, model: nn.Module) -> int:
        raise NotImplementedError

    def spans(self, model: nn.Module, call: CallContext) -> list[VideoSpan]:
        n = self.tokens_per_image(model)
        side = math.isqrt(n)
        if side * side != n:
            raise RuntimeError(f"{self.name}: {n} tokens per image is not a square grid")
        spans = []
        empty = torch.zeros(0, dtype=torch.long, device=call.target.device)
        for row in range(call.target.shape[0]):
            frames = [torch.arange(s, e, device=call.target.device) for s, e in runs(call.target[row]) if e - s == n]
            if frames:
                spans.append(
                    VideoSpan(row=row, positions=torch.cat(frames), grid=(len(frames), side, side), specials=empty)
                )
        attach_frame_signals(spans, call, lambda v: self.pool(model, v))
        return spans
