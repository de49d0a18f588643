"""SmolVLM (SmolVLM2). Its processor writes each frame as a timestamp plus
``<fake_token_around_image><global-img>`` + ``image_seq_len`` image tokens + ``<fake_token_around_image>``;
tokens per frame = ``(image_size // patch_size) ** 2 // scale_factor ** 2``. The LM is ``text_model``.
The connector's pixel shuffle gathers ``scale_factor`` patches square into one token (row blocks stay
rows), so a token covers ``patch_size * scale_factor`` pixels square."""

from __future__ import annotations

from torch import Tensor, nn
from transformers import SmolVLMForConditionalGeneration, SmolVLMModel

from .frames_as_images import FramesAsImagesAdapter
from .vision_signals import encoder_layers


class SmolVLMAdapter(FramesAsImagesAdapter):
    name = "smolvlm"
    model_classes = (SmolVLMForConditionalGeneration, SmolVLMModel)

    def signal_layer(self, model: nn.Module) -> nn.Module | None:
        return encoder_layers(self.inner(model).vision_model)[-1]  # features = the last layer (+ post-norm)

    def pool(self, model: nn.Module, values: Tensor) -> Tensor:
        """The connector's own pixel shuffle on a one-channel map, then the mean of each merged group."""
        connector = self.inner(model).connector
        shuffled = connector.pixel_shuffle(values[:, :, None].float(), connector.scale_factor)
        return shuffled.mean(-1)

    def language_model(self, model: nn.Module) -> nn.Module:
        return self.inner(model).text_model

    def inner(self, model: nn.Module) -> nn.Module:
        return model.model if isinstance(model, SmolVLMForConditionalGeneration) else model

    def tokens_per_image(self, model: nn.Module) -> int:
        vision = model.config.vision_config
        return (vision.image_size // vision.patch_size) ** 2 // model.config.scale_factor**2

    def vision_tower(self, model: nn.Module) -> nn.Module:
        return self.inner(model).vision_model

    def pixels_per_token(self, model: nn.Module) -> int:
        return model.config.vision_config.patch_size * model.config.scale_factor


__all__ = ["SmolVLMAdapter"]
