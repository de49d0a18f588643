"""Shared rule for families whose processors turn video frames into images (InternVL, SmolVLM).

The model sees only ``image_token_id``: each frame is one run of ``tokens_per_image`` placeholders
between image delimiters. In each batch row, every run of exactly that length is taken as a frame of
one video, in order; other runs (multi-tile still images) pass through untouched. A prompt that mixes
single-tile still images with a video cannot be told apart and is compressed as one video.

Signal ``"pixels"``: a pre-hook on the vision tower records the ``(tiles, C, H, W)`` images it
encodes (all images of the call, in batch-row then sequence order; a run of ``k * tokens_per_image``
placeholders is an image of ``k`` tiles). Each frame run gets its tile, cropped to the area the
token grid covers; token ``(y, x)`` is the ``u``-pixel square at ``(y*u, x*u)``, ``u`` = patch size
times the pixel-shuffle factor (:meth:`FramesAsImagesAdapter.pixels_per_token`).

Signals ``"vision_attention"`` / ``"frame_query_attention"`` (``adapters/vision_signals.py``): the
attention maps of the vision layer the features come from (``signal_layer``), recomputed from its
q/k, one row per encoded tile, matched to the frame runs like the pixels, and merged onto the token
grid the way the model merges patches (``pool``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import (
    Adapter,
    CallContext,
    Capture,
    VideoSpan,
    crop_to_patches,
    encoded_offsets,
    encoded_offsets_or_none,
    last_capture,
    runs,
    tower_pixels,
)
from .vision_signals import ATTENTION_SIGNALS, layer_attention_capture


class FramesAsImagesAdapter(Adapter):
    signals = frozenset({"pixels", *ATTENTION_SIGNALS})
    #: Whether the tower puts a CLS token first (its column is dropped from the attention maps).
    cls_token = False

    def placeholder_ids(self, model: nn.Module) -> list[int]:
        return [model.config.image_token_id]

    def tokens_per_image(self, model: nn.Module) -> int:
        raise NotImplementedError

    def vision_tower(self, model: nn.Module) -> nn.Module:
        """The module whose forward receives ``pixel_values`` ``(tiles, C, H, W)``."""
        raise NotImplementedError

    def pixels_per_token(self, model: nn.Module) -> int:
        """Side in pixels of the square one token covers."""
        raise NotImplementedError

    def signal_layer(self, model: nn.Module) -> nn.Module | None:
        """The vision encoder layer whose output the features are made of (None: no attention signals)."""
        return None

    def pool(self, model: nn.Module, values: Tensor) -> Tensor:
        """``(tiles, patches)`` per-patch values -> ``(tiles, tokens)``, merged as the model merges patches."""
        raise NotImplementedError

    def captures(self, model: nn.Module, signals: frozenset[str]) -> list[Capture]:
        out = [Capture("pixels", self.vision_tower(model), tower_pixels)] if "pixels" in signals else []
        wanted = [s for s in ATTENTION_SIGNALS if s in signals]
        layer = self.signal_layer(model) if wanted else None
        if layer is not None:
            out.append(Capture("vision_attention_maps", layer, layer_attention_capture(wanted, cls_token=self.cls_token)))
        return out

    def tile_index(self, call: CallContext, spans: list[VideoSpan], n: int, encoded: int, *, strict: bool = False) -> list[Tensor] | None:
        """Per span, the rows of the tower's last call that encoded its frames.

        None when that cannot be told, or with ``strict`` a ``RuntimeError``.
        """
        images = [(row, s, (e - s) // n) for row in range(call.target.shape[0]) for s, e in runs(call.target[row])]
        items = [(row, k) for row, _, k in images]
        find = encoded_offsets if strict else encoded_offsets_or_none
        starts = find(items, call.target.shape[0], encoded)
        if starts is None:
            return None
        tile_at = {(row, s): start for (row, s, _), start in zip(images, starts)}
        out = []
        for span in spans:
            firsts = span.positions.reshape(span.grid[0], -1)[:, 0].tolist()
            out.append(torch.tensor([tile_at[(span.row, p)] for p in firsts]))
        return out

    def attach_attention(self, model: nn.Module, call: CallContext, spans: list[VideoSpan], n: int) -> None:
        maps = last_capture(call, "vision_attention_maps")
        if not maps or not spans:
            return
        encoded = next(iter(maps.values())).shape[0]
        index = self.tile_index(call, spans, n, encoded)
        if index is None:
            return
        for name, value in maps.items():
            pooled = self.pool(model, value)
            for span, rows in zip(spans, index):
                span.signals[name] = pooled[rows.to(pooled.device)]

    def attach_pixels(self, model: nn.Module, call: CallContext, spans: list[VideoSpan], n: int) -> None:
        tiles = last_capture(call, "pixels")
        if tiles is None or not spans:
            return
        unit = self.pixels_per_token(model)
        for span, rows in zip(spans, self.tile_index(call, spans, n, tiles.shape[0], strict=True)):
            span.signals["pixels"] = crop_to_patches(tiles[rows.to(tiles.device)], unit)

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
        self.attach_pixels(model, call, spans, n)
        self.attach_attention(model, call, spans, n)
        return spans
