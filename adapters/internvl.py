"""InternVL. Its processor writes each frame as ``Frame{i}: <img>`` + image tokens + ``</img>``;
tokens per frame = ``(image_size // patch_size * downsample_ratio) ** 2`` after pixel shuffle, which
gathers ``1 / downsample_ratio`` patches square into one token (row blocks stay rows), so a token
covers ``patch_size / downsample_ratio`` pixels square (28 at 14 / 0.5)."""

from __future__ import annotations

from torch import Tensor, nn
from transformers import InternVLForConditionalGeneration, InternVLModel

from .frames_as_images import FramesAsImagesAdapter
from .vision_signals import encoder_layers, feature_layer


class InternVLAdapter(FramesAsImagesAdapter):
    name = "internvl"
    model_classes = (InternVLForConditionalGeneration, InternVLModel)
    cls_token = True  # InternViT prepends a CLS token; the "default" strategy drops it

    def signal_layer(self, model: nn.Module) -> nn.Module | None:
        inner = self.inner(model)
        return feature_layer(encoder_layers(inner.vision_tower), inner.config.vision_feature_layer)

    def pool(self, model: nn.Module, values: Tensor) -> Tensor:
        """The model's own pixel shuffle on a one-channel map, then the mean of each merged group."""
        inner = self.inner(model)
        side = int(round(values.shape[1] ** 0.5))
        shuffled = inner.pixel_shuffle(values.reshape(-1, side, side, 1).float(), scale_factor=inner.config.downsample_ratio)
        return shuffled.reshape(values.shape[0], -1, shuffled.shape[-1]).mean(-1)

    def tokens_per_image(self, model: nn.Module) -> int:
        vision = model.config.vision_config
        side = vision.image_size[0] // vision.patch_size[0] if isinstance(vision.image_size, (list, tuple)) else (
            vision.image_size // vision.patch_size
        )
        return int(side * model.config.downsample_ratio) ** 2

    def vision_tower(self, model: nn.Module) -> nn.Module:
        return self.inner(model).vision_tower

    def pixels_per_token(self, model: nn.Module) -> int:
        vision = model.config.vision_config
        patch = vision.patch_size[0] if isinstance(vision.patch_size, (list, tuple)) else vision.patch_size
        return round(patch / model.config.downsample_ratio)


__all__ = ["InternVLAdapter"]
