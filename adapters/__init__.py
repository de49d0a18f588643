"""Adapters: one small module per model family (installed as ``tokcompress.adapters``).

``adapter_for(model)`` picks the adapter by the model's type, never by class-name strings.
"""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from .base import (
    Adapter,
    CallContext,
    Capture,
    VideoSpan,
    counts_from_inputs,
    encoded_offsets,
    encoded_offsets_or_none,
    runs,
    split_videos,
)
from .internvl import InternVLAdapter
from .llava_next_video import LlavaNextVideoAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .qwen2_vl import Qwen2_5_VLAdapter, Qwen2VLAdapter
from .qwen3_vl import Qwen3VLAdapter
from .smolvlm import SmolVLMAdapter
from .video_llava import VideoLlavaAdapter

ADAPTERS: tuple[type[Adapter], ...] = (
    LlavaOnevisionAdapter,
    LlavaNextVideoAdapter,
    VideoLlavaAdapter,
    Qwen2VLAdapter,
    Qwen2_5_VLAdapter,
    Qwen3VLAdapter,
    InternVLAdapter,
    SmolVLMAdapter,
)


def supported_models() -> list[str]:
    """Names of the model classes some adapter handles."""
    return sorted({cls.__name__ for a in ADAPTERS for cls in a.model_classes})


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter for ``model``'s family, or an error naming the supported classes."""
    for adapter in ADAPTERS:
        if isinstance(model, adapter.model_classes):
            return adapter()
    raise UnsupportedModelError(
        f"{type(model).__name__} is not supported; supported model classes: {', '.join(supported_models())}. "
        "Add an adapter module in adapters/ (see adapters/llava_onevision.py) and list it in adapters/__init__.py."
    )


__all__ = [
    "ADAPTERS",
    "Adapter",
    "CallContext",
    "Capture",
    "VideoSpan",
    "adapter_for",
    "counts_from_inputs",
    "encoded_offsets",
    "encoded_offsets_or_none",
    "runs",
    "split_videos",
    "supported_models",
]
