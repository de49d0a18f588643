"""Qwen2-VL and Qwen2.5-VL.

Each video is one contiguous run of ``video_token_id`` tokens: ``t * (H/m) * (W/m)`` merged patches
in raster order over (temporal patch, row, column), ``m`` = spatial merge size, one temporal patch =
``temporal_patch_size`` (2) frames. Positions are M-RoPE ``[4, B, L]`` (text row + t/h/w rows).
``generate`` encodes the video before the first forward and drops ``video_grid_thw``, so the grid is
read by a pre-hook on the vision tower (``grid_thw``).

Signals (recomputed from the q/k of the LAST vision block on its captured input, per temporal patch,
one value per merged token, in the LLM's raster order; Qwen2.5-VL's window permutation is undone):
``"frame_query_attention"`` ``(t, n)``: the mean query of the temporal patch attends to keys averaged
over each ``m x m`` merge unit (FastVID's Qwen2.5-VL signal); ``"vision_attention"`` ``(t, n)``:
attention each patch receives, mean over heads and queries, averaged over the merge unit.
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

from .base import Adapter, CallContext, Capture, VideoSpan, split_videos
from .vision_signals import mean_query_attention, mean_received_attention, project_qk

ATTENTION_SIGNALS = ("vision_attention", "frame_query_attention")


def _grid_thw(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> torch.Tensor | None:
    grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
    return None if grid is None else grid.detach().cpu()


class Qwen2VLAdapter(Adapter):
    name = "qwen2_vl"
    model_classes = (Qwen2VLForConditionalGeneration, Qwen2VLModel)
    positions = "mrope"
    signals = frozenset(ATTENTION_SIGNALS)

    def placeholder_ids(self, model: nn.Module) -> list[int]:
        return [model.config.video_token_id]

    def captures(self, model: nn.Module, signals: frozenset[str]) -> list[Capture]:
        visual = self.inner(model).visual
        wanted = [s for s in ATTENTION_SIGNALS if s in signals]
        if not wanted:
            return [Capture("grid_thw", visual, _grid_thw)]
        merge = visual.config.spatial_merge_size
        state: dict[str, Tensor | None] = {"grid": None}  # the grid of the tower call in progress

        def grid(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Tensor | None:
            state["grid"] = _grid_thw(module, args, kwargs, output)
            return state["grid"]

        def attention(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> list[dict[str, Tensor]]:
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            cos, sin = kwargs["position_embeddings"]
            return self._block_signals(visual, module, hidden, (cos, sin), state["grid"], merge, wanted)

        return [Capture("grid_thw", visual, grid), Capture("vision_attention_maps", visual.blocks[-1], attention)]

    def _block_signals(
        self,
        visual: nn.Module,
        block: nn.Module,
        hidden: Tensor,
        rotary: tuple[Tensor, Tensor],
        grid: Tensor | None,
        merge: int,
        wanted: list[str],
    ) -> list[dict[str, Tensor]]:
        """Per grid row (image or video) of one tower call: ``{signal: (t, n)}`` in raster order."""
        if grid is None:
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
            out.append({k: v if order is None else v.reshape(-1)[order.to(v.device)].reshape(t, -1) for k, v in values.items()})
            start = stop
        return out

    def unit_order(self, visual: nn.Module, grid: tuple[int, int, int]) -> Tensor | None:
        """Index that puts one video's merge units from the tower's order into raster order (None: same)."""
        return None

    def video_grids(self, model: nn.Module, call: CallContext) -> list[tuple[tuple[int, int, int], dict[str, Tensor]]]:
        """``((t, h, w) in merged tokens, signals)`` of every video of the call, in order."""
        merge = model.config.vision_config.spatial_merge_size
        given = call.inner_kwargs.get("video_grid_thw")
        # every tower call's grid rows, with the signals captured for them (if any)
        calls = call.captured.get("grid_thw", [])
        maps = call.captured.get("vision_attention_maps", [])
        seen: list[tuple[tuple[int, int, int], dict[str, Tensor]]] = []
        for i, g in enumerate(calls):
            if g is None:
                continue
            sig = maps[i] if i < len(maps) and len(maps[i]) == g.shape[0] else [{}] * g.shape[0]
            seen += [(tuple(r), s) for r, s in zip(g.tolist(), sig)]
        if given is not None:
            rows = [tuple(r) for r in given.tolist()]
            tail = seen[-len(rows) :] if len(seen) >= len(rows) else []
            sigs = [s for r, s in tail] if [r for r, _ in tail] == rows else [{}] * len(rows)
            pairs = list(zip(rows, sigs))
        else:
            # Images and videos share the tower; videos are encoded last, so take grids from the end
            # until they account for every video placeholder.
            need, pairs = int(call.target.sum()), []
            while seen and need > 0:
                (t, h, w), sig = seen.pop()
                pairs.insert(0, ((t, h, w), sig))
                need -= t * h * w // merge**2
            if need != 0:
                raise RuntimeError(
                    f"{self.name}: could not match the vision tower's grids to {int(call.target.sum())} video tokens"
                )
        return [((t, h // merge, w // merge), sig) for (t, h, w), sig in pairs]

    def spans(self, model: nn.Module, call: CallContext) -> list[VideoSpan]:
        videos = self.video_grids(model, call)
        step = model.config.vision_config.temporal_patch_size
        located = split_videos(call.target, [t * h * w for (t, h, w), _ in videos])
        empty = torch.zeros(0, dtype=torch.long, device=call.target.device)
        return [
            VideoSpan(row=row, positions=pos, grid=grid, specials=empty, frames_per_step=step, signals=dict(sig))
            for (row, pos), (grid, sig) in zip(located, videos)
        ]


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
