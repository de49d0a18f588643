"""InternVL. Its processor writes each frame as ``Frame{i}: <img>`` + image tokens + ``</img>``;
tokens per frame = ``(image_size // patch_size * downsample_ratio) ** 2`` after pixel shuffle."""

from __future__ import annotations

from torch import nn
from transformers import InternVLForConditionalGeneration, InternVLModel

from .frames_as_images import FramesAsImagesAdapter


class InternVLAdapter(FramesAsImagesAdapter):
    name = "internvl"
    model_classes = (InternVLForConditionalGeneration, InternVLModel)

    def tokens_per_image(self, model: nn.Module) -> int:
        vision = model.config.vision_config
        side = vision.image_size[0] // vision.patch_size[0] if isinstance(vision.image_size, (list, tuple)) else (
            vision.image_size // vision.patch_size
        )
        return int(side * model.config.downsample_ratio) ** 2


__all__ = ["InternVLAdapter"]
