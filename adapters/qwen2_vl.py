"""Qwen2-VL and Qwen2.5-VL.

Each video is one contiguous run of ``video_token_id`` tokens: ``t * (H/m) * (W/m)`` merged patches
in raster order over (temporal patch, row, column), ``m`` = spatial merge size, one temporal patch =
``temporal_patch_size`` (2) frames. Positions are M-RoPE ``[4, B, L]`` (text row + t/h/w rows).

The grid comes from ``video_grid_thw`` when the forward receives it. ``generate`` instead encodes the
videos before the first forward, drops ``video_grid_thw`` and may repeat videos for beams, so there
the per-video token counts come from the pre-encoded features and ``(h, w)`` from the height/width
M-RoPE rows, which number each frame's tokens ``y`` and ``x`` from a common start.

Signals (recomputed from the q/k of the LAST vision block on its captured input, per temporal patch,
one value per merged token, in the LLM's raster order; Qwen2.5-VL's window permutation is undone):
``"frame_query_attention"`` ``(t, n)``: the mean query of the temporal patch attends to keys averaged
over each ``m x m`` merge unit (FastVID's Qwen2.5-VL signal); ``"vision_attention"`` ``(t, n)``:
attention each patch receives, mean over heads and queries, averaged over the merge unit.

Signal ``"pixels"``: a pre-hook on the vision tower (``visual``, shared with images, which are
encoded first) records the flattened patches it receives, ``(t*gh*gw, C*tps*p*p)`` in the
processor's order (temporal patch, merged row, merged column, then the ``m x m`` patches of a merged
token), with their ``grid_thw``. :func:`patches_to_frames` undoes that order to ``(t*tps, C, gh*p,
gw*p)`` normalised frames (a video with an odd frame count holds the repeated last frame the
processor padded it with). Merged token ``(t, y, x)`` covers frames ``tps*t .. tps*t + tps - 1``
and the ``m*p``-pixel square at ``(y*m*p, x*m*p)``: exactly the equal bins ``evs_pixel`` uses.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers import (
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLModel,
    Qwen2VLForConditionalGeneration,
    Qwen2VLModel,
)

from .base import Adapter, CallContext, Capture, VideoSpan, encoded_offsets, encoded_offsets_or_none, last_capture, split_videos
from .vision_signals import ATTENTION_SIGNALS, mean_query_attention, mean_received_attention, project_qk


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


def _patches(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> tuple[Tensor, Tensor] | None:
    patches = kwargs.get("hidden_states", args[0] if args else None)
    grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
    return None if patches is None or grid is None else (patches.detach(), grid.detach().cpu())


def patches_to_frames(patches: Tensor, grid: tuple[int, int, int], merge: int, step: int, patch: int) -> Tensor:
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
    signals = frozenset({"pixels", *ATTENTION_SIGNALS})

    def placeholder_ids(self, model: nn.Module) -> list[int]:
        return [model.config.video_token_id]

    def captures(self, model: nn.Module, signals: frozenset[str]) -> list[Capture]:
        out = [Capture("pixels", self.inner(model).visual, _patches)] if "pixels" in signals else []
        return out + self.attention_captures(model, signals)

    def attention_captures(self, model: nn.Module, signals: frozenset[str]) -> list[Capture]:
        """The last vision block's attention maps (see the module docstring)."""
        wanted = [s for s in ATTENTION_SIGNALS if s in signals]
        if not wanted:
            return []
        visual = self.inner(model).visual
        merge = visual.config.spatial_merge_size
        state: dict[str, Tensor | None] = {"grid": None}  # grid_thw of the tower call in progress

        def grid(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            value = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
            state["grid"] = None if value is None else value.detach().cpu()

        def attention(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> list[tuple[tuple, dict]]:
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            rotary = kwargs.get("position_embeddings")
            return self.block_signals(visual, module, hidden, rotary, state["grid"], merge, wanted)

        return [Capture("vision_grid", visual, grid), Capture("vision_attention_maps", visual.blocks[-1], attention)]

    def block_signals(
        self,
        visual: nn.Module,
        block: nn.Module,
        hidden: Tensor,
        rotary: tuple[Tensor, Tensor] | None,
        grid: Tensor | None,
        merge: int,
        wanted: list[str],
    ) -> list[tuple[tuple, dict]]:
        """Per grid row (image or video) of one tower call: ``((t, h, w), {signal: (t, n)})``, raster order."""
        if grid is None or rotary is None:
            return []
        unit = merge * merge
        out, start = [], 0
        for t, h, w in grid.tolist():
            patches = h * w
            stop = start + t * patches
            x = hidden[start:stop].reshape(t, patches, -1)
            cos, sin = (r[start:stop].reshape(t, patches, -1) for r in rotary)
            qk = project_qk(block, x, (cos, sin))
            values: dict[str, Tensor] = {}
            if "frame_query_attention" in wanted:
                values["frame_query_attention"] = mean_query_attention(qk, group=unit)
            if "vision_attention" in wanted:
                values["vision_attention"] = mean_received_attention(qk).reshape(t, patches // unit, unit).mean(-1)
            order = self.unit_order(visual, (t, h, w))
            if order is not None:
                values = {k: v.reshape(-1)[order.to(v.device)].reshape(t, -1) for k, v in values.items()}
            out.append(((t, h // merge, w // merge), values))
            start = stop
        return out

    def unit_order(self, visual: nn.Module, grid: tuple[int, int, int]) -> Tensor | None:
        """Index putting one video's merge units from the tower's order into raster order (None: same)."""
        return None

    def attach_signals(self, spans: list[VideoSpan], call: CallContext) -> None:
        """Give each span the signals captured for its video in the last tower call (videos come last)."""
        maps = call.captured.get("vision_attention_maps") or []
        if not maps or not spans:
            return
        encoded = maps[-1]
        index = encoded_offsets_or_none([(s.row, 1) for s in spans], call.target.shape[0], len(encoded))
        if index is None:
            return
        for span, i in zip(spans, index):
            grid, values = encoded[i]
            if tuple(grid) == tuple(span.grid):
                span.signals = {**span.signals, **values}

    def attach_pixels(self, model: nn.Module, call: CallContext, spans: list[VideoSpan]) -> None:
        """Give each span its frames from the vision tower's last call (the videos'), in place."""
        captured = last_capture(call, "pixels")
        if captured is None or not spans:
            return
        patches, grids = captured
        grids = [tuple(g) for g in grids.tolist()]
        vision = model.config.vision_config
        merge = vision.spatial_merge_size
        starts = encoded_offsets([(span.row, 1) for span in spans], call.target.shape[0], len(grids))
        pieces = patches.split([t * h * w for t, h, w in grids])
        for span, i in zip(spans, starts):
            t, gh, gw = grids[i]
            if (t, gh // merge, gw // merge) != span.grid:
                raise RuntimeError(
                    f"{self.name}: the vision tower encoded a {grids[i]} video where the prompt holds grid {span.grid}"
                )
            span.signals["pixels"] = patches_to_frames(pieces[i], grids[i], merge, vision.temporal_patch_size, vision.patch_size)

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
        spans = [
            VideoSpan(row=row, positions=pos, grid=grid, specials=empty, frames_per_step=step)
            for (row, pos), grid in zip(located, grids)
        ]
        self.attach_pixels(model, call, spans)
        self.attach_signals(spans, call)
        return spans


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    name = "qwen2_5_vl"
    model_classes = (Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLModel)

    def unit_order(self, visual: nn.Module, grid: tuple[int, int, int]) -> Tensor | None:
        from transformers.vision_utils import get_vision_window_index

        index, _ = get_vision_window_index(
            torch.tensor([grid]), visual.spatial_merge_size, visual.window_size, visual.patch_size
        )
        return torch.argsort(index)


__all__ = ["Qwen2VLAdapter", "Qwen2_5_VLAdapter"]
