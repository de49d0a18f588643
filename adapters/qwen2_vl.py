"""Qwen2-VL and Qwen2.5-VL.

Each video is one contiguous run of ``video_token_id`` tokens: ``t * (H/m) * (W/m)`` merged patches
in raster order over (temporal patch, row, column), ``m`` = spatial merge size, one temporal patch =
``temporal_patch_size`` (2) frames. Positions are M-RoPE ``[4, B, L]`` (text row + t/h/w rows).

The grid comes from ``video_grid_thw`` when the forward receives it. ``generate`` instead encodes the
videos before the first forward, drops ``video_grid_thw`` and may repeat videos for beams, so there
the per-video token counts come from the pre-encoded features and ``(h, w)`` from the height/width
M-RoPE rows, which number each frame's tokens ``y`` and ``x`` from a common start.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import (
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLModel,
    Qwen2VLForConditionalGeneration,
    Qwen2VLModel,
)

from .base import Adapter, CallContext, VideoSpan, split_videos


def grid_from_positions(position_ids: Tensor, row: int, pos: Tensor) -> tuple[int, int, int]:
    """``(t, h, w)`` of one video from its M-RoPE height/width rows (first frame run gives h and w)."""
    rows = position_ids[-3:, row, pos] if position_ids.dim() == 3 else None
    if rows is None:
        raise RuntimeError("M-RoPE position ids are needed to read a Qwen-VL video grid")
    hs, ws = rows[1], rows[2]
    gaps = torch.zeros(pos.numel(), dtype=torch.bool, device=pos.device)
    gaps[1:] = pos[1:] != pos[:-1] + 1
    first = pos.numel() if not bool(gaps.any()) else int(gaps.nonzero()[0])
    h = int(hs[:first].max() - hs[:first].min()) + 1
    w = int(ws[:first].max() - ws[:first].min()) + 1
    t, rest = divmod(pos.numel(), h * w)
    y = torch.arange(h, device=hs.device).repeat_interleave(w)
    x = torch.arange(w, device=ws.device).repeat(h)
    if rest == 0:
        hs_f, ws_f = hs.reshape(t, h * w), ws.reshape(t, h * w)
        if bool(((hs_f - hs_f.min(1, keepdim=True).values) == y).all()) and bool(
            ((ws_f - ws_f.min(1, keepdim=True).values) == x).all()
        ):
            return t, h, w
    raise RuntimeError(f"the M-RoPE positions of a {pos.numel()}-token video do not form a raster grid")


class Qwen2VLAdapter(Adapter):
    name = "qwen2_vl"
    model_classes = (Qwen2VLForConditionalGeneration, Qwen2VLModel)
    positions = "mrope"

    def placeholder_ids(self, model: nn.Module) -> list[int]:
        return [model.config.video_token_id]

    def spans(self, model: nn.Module, call: CallContext) -> list[VideoSpan]:
        merge = model.config.vision_config.spatial_merge_size
        step = model.config.vision_config.temporal_patch_size
        given = call.inner_kwargs.get("video_grid_thw")
        encoded = (call.inner_kwargs.get("mm_encoder_outputs") or {}).get("video")
        grids: list[tuple[int, int, int]] | None = None
        counts: list[int] | None = None
        if given is not None:
            grids = [(t, h // merge, w // merge) for t, h, w in given.tolist()]
            counts = [t * h * w for t, h, w in grids]
        elif encoded is not None and not isinstance(encoded.pooler_output, Tensor):
            counts = [len(out) for out in encoded.pooler_output]
        located = split_videos(call.target, counts)
        if grids is None:
            if call.position_ids is None:
                raise RuntimeError(f"{self.name}: no video_grid_thw and no M-RoPE positions to read the grid from")
            grids = [grid_from_positions(call.position_ids, row, pos) for row, pos in located]
        empty = torch.zeros(0, dtype=torch.long, device=call.target.device)
        return [
            VideoSpan(row=row, positions=pos, grid=grid, specials=empty, frames_per_step=step)
            for (row, pos), grid in zip(located, grids)
        ]


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    name = "qwen2_5_vl"
    model_classes = (Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLModel)


__all__ = ["Qwen2VLAdapter", "Qwen2_5_VLAdapter"]
