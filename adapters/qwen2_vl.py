"""Qwen2-VL and Qwen2.5-VL.

Each video is one contiguous run of ``video_token_id`` tokens: ``t * (H/m) * (W/m)`` merged patches
in raster order over (temporal patch, row, column), ``m`` = spatial merge size, one temporal patch =
``temporal_patch_size`` (2) frames. Positions are M-RoPE ``[4, B, L]`` (text row + t/h/w rows).
``generate`` encodes the video before the first forward and drops ``video_grid_thw``, so the grid is
read by a pre-hook on the vision tower (``grid_thw``).

Signal ``"pixels"``: the same pre-hook point records the flattened patches the tower receives,
``(t*gh*gw, C*tps*p*p)`` in the processor's order (temporal patch, merged row, merged column, then
the ``m x m`` patches of each merged token). :func:`patches_to_frames` undoes that order to
``(t*tps, C, gh*p, gw*p)`` normalised frames (a video with an odd frame count holds the repeated
last frame the processor padded it with). Merged token ``(t, y, x)`` covers frames
``tps*t .. tps*t + tps - 1`` and the ``m*p``-pixel square at ``(y*m*p, x*m*p)``: exactly the
equal bins ``evs_pixel`` uses.
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


def _patches(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    patches = kwargs.get("hidden_states", args[0] if args else None)
    grid = _grid_thw(module, args, kwargs, output)
    return None if patches is None or grid is None else (patches.detach(), grid)


def patches_to_frames(patches: torch.Tensor, grid: tuple[int, int, int], merge: int, step: int, patch: int) -> torch.Tensor:
    """``(t*gh*gw, C*step*patch*patch)`` flattened patches of one video -> ``(t*step, C, gh*patch, gw*patch)``.

    ``grid`` is ``(t, gh, gw)`` in patches (``video_grid_thw``); rows are ordered (t, gh/m, gw/m,
    m, m) and each row (C, step, patch, patch), as the Qwen-VL image and video processors flatten them.
    """
    t, gh, gw = grid
    channels = patches.shape[1] // (step * patch * patch)
    x = patches.reshape(t, gh // merge, gw // merge, merge, merge, channels, step, patch, patch)
    x = x.permute(0, 6, 5, 1, 3, 7, 2, 4, 8)  # t, step, C, gh/m, m, patch, gw/m, m, patch
    return x.reshape(t * step, channels, gh * patch, gw * patch)


class Qwen2VLAdapter(Adapter):
    name = "qwen2_vl"
    model_classes = (Qwen2VLForConditionalGeneration, Qwen2VLModel)
    positions = "mrope"
    signals = frozenset({"pixels"})

    def placeholder_ids(self, model: nn.Module) -> list[int]:
        return [model.config.video_token_id]

    def captures(self, model: nn.Module, signals: frozenset[str]) -> list[Capture]:
        visual = self.inner(model).visual
        caps = [Capture("grid_thw", visual, _grid_thw)]
        if "pixels" in signals:
            caps.append(Capture("pixels", visual, _patches))
        return caps

    def video_pixels(self, model: nn.Module, call: CallContext, spans: list[VideoSpan]) -> list[torch.Tensor] | None:
        """Per span, the frames of the matching item the vision tower encoded (videos come last), or None."""
        items = [item for item in call.captured.get("pixels", []) if item is not None]
        grids = [tuple(r) for _, g in items for r in g.tolist()]
        if len(grids) < len(spans):
            return None
        vision = model.config.vision_config
        merge = vision.spatial_merge_size
        grids = grids[len(grids) - len(spans) :]
        merged = [(t, h // merge, w // merge) for t, h, w in grids]
        if merged != [span.grid for span in spans]:
            raise RuntimeError(
                f"{self.name}: the vision tower's last grids {merged} do not match the video spans "
                f"{[span.grid for span in spans]}; cannot attach their pixels"
            )
        patches = torch.cat([p for p, _ in items]) if len(items) > 1 else items[0][0]
        pieces = patches[patches.shape[0] - sum(t * h * w for t, h, w in grids) :].split([t * h * w for t, h, w in grids])
        return [
            patches_to_frames(p, g, merge, vision.temporal_patch_size, vision.patch_size)
            for p, g in zip(pieces, grids)
        ]

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
        spans = [
            VideoSpan(row=row, positions=pos, grid=grid, specials=empty, frames_per_step=step)
            for (row, pos), grid in zip(located, grids)
        ]
        if "pixels" in call.captured:
            for span, frames in zip(spans, self.video_pixels(model, call, spans) or []):
                span.signals["pixels"] = frames
        return spans


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    name = "qwen2_5_vl"
    model_classes = (Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLModel)


__all__ = ["Qwen2VLAdapter", "Qwen2_5_VLAdapter"]
