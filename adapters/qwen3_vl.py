"""Qwen3-VL.

As Qwen2.5-VL, but each frame of a video is its own placeholder run (a timestamp and
``<vision_start>``/``<vision_end>`` sit between frames), and the language model receives
``visual_pos_masks`` ``(B, L)`` and ``deepstack_visual_embeds`` (per deepstack layer, one row per
visual position in row-major order), which are added to the hidden states of the first layers.
Both must follow the pruning.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import Qwen3VLForConditionalGeneration, Qwen3VLModel

from .qwen2_vl import Qwen2VLAdapter


class Qwen3VLAdapter(Qwen2VLAdapter):
    name = "qwen3_vl"
    model_classes = (Qwen3VLForConditionalGeneration, Qwen3VLModel)
    lm_extra_kwargs = ("visual_pos_masks", "deepstack_visual_embeds")

    def first_prunable_layer(self, model: nn.Module) -> int:
        """Deepstack features are added after layers ``0 .. n - 1``, indexed by the full-length visual mask."""
        return max(1, len(model.config.vision_config.deepstack_visual_indexes))

    def gather_extra(self, kwargs: dict[str, Any], index: torch.Tensor, slot_valid: torch.Tensor) -> dict[str, Any]:
        visual = kwargs.get("visual_pos_masks")
        if visual is None:
            return {}
        # Row of each visual position in the deepstack tensors (row-major over the batch).
        row_of = (visual.reshape(-1).long().cumsum(0) - 1).reshape(visual.shape)
        new_visual = visual.gather(1, index) & slot_valid
        out: dict[str, Any] = {"visual_pos_masks": new_visual}
        deep = kwargs.get("deepstack_visual_embeds")
        if deep is not None:
            rows = row_of.gather(1, index)[new_visual]
            out["deepstack_visual_embeds"] = [d[rows] for d in deep]
        return out


__all__ = ["Qwen3VLAdapter"]
