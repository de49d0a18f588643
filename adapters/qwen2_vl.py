"""Qwen2-VL and Qwen2.5-VL.

Each video is one contiguous run of ``video_token_id`` tokens: ``t * (H/m) * (W/m)`` merged patches
in raster order over (temporal patch, row, column), ``m`` = spatial merge size, one temporal patch =
``temporal_patch_size`` (2) frames. Positions are M-RoPE ``[4, B, L]`` (text row + t/h/w rows).
``generate`` encodes the video before the first forward and drops ``video_grid_thw``, so the grid is
read by a pre-hook on the vision tower (``grid_thw``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import (
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLModel,
    Qwen2VLForConditionalGeneration,
    Qwen2VLModel,
)

from .base import Adapter, CallContext, Capture, VideoSpan, split_videos


def _grid_thw(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> torch.Tensor | None:
    grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
    return None if grid is None else grid.detach().cpu()


class Qwen2VLAdapter(Adapter):
    name = "qwen2_vl"
    model_classes = (Qwen2VLForConditionalGeneration, Qwen2VLModel)
    positions = "mrope"

    def placeholder_ids(self, model: nn.Module) -> list[int]:
        return [model.config.video_token_id]

    def captures(self, model: nn.Module, signals: frozenset[str]) -> list[Capture]:
        return [Capture("grid_thw", self.inner(model).visual, _grid_thw)]

    def video_grids(self, model: nn.Module, call: CallContext) -> list[tuple[int, int, int]]:
        """``(t, h, w)`` in merged tokens of every video of the call, in order."""
        merge = model.config.vision_config.spatial_merge_size
        given = call.inner_kwargs.get("video_grid_thw")
        if given is not None:
            rows = [tuple(r) for r in given.tolist()]
        else:
            # Images and videos share the tower; videos are encoded last, so take grids from the end
            # until they account for every video placeholder.
            seen = [tuple(r) for g in call.captured.get("grid_thw", []) if g is not None for r in g.tolist()]
            need, rows = int(call.target.sum()), []
            while seen and need > 0:
                t, h, w = seen.pop()
                rows.insert(0, (t, h, w))
                need -= t * h * w // merge**2
            if need != 0:
                raise RuntimeError(
                    f"{self.name}: could not match the vision tower's grids to {int(call.target.sum())} video tokens"
                )
        return [(t, h // merge, w // merge) for t, h, w in rows]

    def spans(self, model: nn.Module, call: CallContext) -> list[VideoSpan]:
        grids = self.video_grids(model, call)
        step = model.config.vision_config.temporal_patch_size
        located = split_videos(call.target, [t * h * w for t, h, w in grids])
        empty = torch.zeros(0, dtype=torch.long, device=call.target.device)
        return [
            VideoSpan(row=row, positions=pos, grid=grid, specials=empty, frames_per_step=step)
            for (row, pos), grid in zip(located, grids)
        ]


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    name = "qwen2_5_vl"
    model_classes = (Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLModel)


__all__ = ["Qwen2VLAdapter", "Qwen2_5_VLAdapter"]
