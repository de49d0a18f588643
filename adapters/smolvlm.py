"""SmolVLM (SmolVLM2). Its processor writes each frame as a timestamp plus
``<fake_token_around_image><global-img>`` + ``image_seq_len`` image tokens + ``<fake_token_around_image>``;
tokens per frame = ``(image_size // patch_size) ** 2 // scale_factor ** 2``. The LM is ``text_model``."""

from __future__ import annotations

from torch import nn
from transformers import SmolVLMForConditionalGeneration, SmolVLMModel

from .frames_as_images import FramesAsImagesAdapter


class SmolVLMAdapter(FramesAsImagesAdapter):
    name = "smolvlm"
    model_classes = (SmolVLMForConditionalGeneration, SmolVLMModel)

    def language_model(self, model: nn.Module) -> nn.Module:
        return self.inner(model).text_model

    def inner(self, model: nn.Module) -> nn.Module:
        return model.model if isinstance(model, SmolVLMForConditionalGeneration) else model

    def tokens_per_image(self, model: nn.Module) -> int:
        vision = model.config.vision_config
        return (vision.image_size // vision.patch_size) ** 2 // model.config.scale_factor**2


__all__ = ["SmolVLMAdapter"]
