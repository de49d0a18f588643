"""Real checkpoints: load any supported family, read videos with PyAV, build chat-template inputs.

One code path for everything that starts from a model id or a saved folder: ``tokcompress demo
--model``, ``benchmarks/ttft.py --model`` and the lmms-eval plugin (``tokcompress.lmms_eval``).

    model, processor = load_pretrained("llava-hf/llava-onevision-qwen2-7b-ov-hf", device="cuda")
    inputs = prepare_inputs(processor, ["clip.mp4"], ["What happens?"], max_frames=32)
    model.generate(**inputs.to(model.device), max_new_tokens=32)

Frames are sampled the way lmms-eval's video models sample them (:func:`tokcompress.video.sample_frame_indices`):
``max_frames`` evenly spaced frames over the whole clip, or every ``video_fps / fps``-th frame
capped at ``max_frames``. The frames are decoded here and handed to the processor with their real
timestamps (``video_metadata``), so the processor does not resample them and families that print
or encode time (Qwen2.5-VL, Qwen3-VL, SmolVLM) see the true frame times.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

__all__ = ["Clip", "chat_inputs", "load_pretrained", "prepare_inputs", "read_clip", "resolve_dtype"]


@dataclass
class Clip:
    """Frames sampled from one video and where they came from.

    Attributes:
        frames: ``(F, H, W, 3)`` uint8 RGB.
        indices: ``(F,)`` frame numbers in the source video.
        fps: frame rate of the source video.
        total_frames: frames in the source video.
    """

    frames: np.ndarray
    indices: np.ndarray
    fps: float
    total_frames: int
    path: str | None = field(default=None, repr=False)

    def metadata(self) -> dict[str, Any]:
        """``video_metadata`` for a transformers video processor (timestamps = indices / fps)."""
        return {
            "total_num_frames": int(self.total_frames),
            "fps": float(self.fps),
            "duration": self.total_frames / self.fps if self.fps else None,
            "frames_indices": [int(i) for i in self.indices],
            "height": int(self.frames.shape[1]),
            "width": int(self.frames.shape[2]),
        }

    @classmethod
    def from_array(cls, frames: np.ndarray, fps: float = 1.0) -> "Clip":
        """Frames that are already sampled, taken to be consecutive at ``fps``."""
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"a video array must be uint8 (F, H, W, 3); got {frames.dtype} {frames.shape}")
        return cls(frames, np.arange(len(frames)), float(fps), len(frames))


def read_clip(
    path: str | os.PathLike, *, max_frames: int | None = 32, fps: float | None = None, num_frames: int | None = None
) -> Clip:
    """Decode ``path`` with PyAV and sample frames (see the module docstring).

    ``num_frames`` asks for exactly that many evenly spaced frames; ``fps`` keeps every
    ``round(video_fps / fps)``-th frame; ``max_frames`` caps either (and alone means "at most
    ``max_frames`` evenly spaced frames").
    """
    from .video import read_video, sample_frame_indices, video_info

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"video file not found: {path}")
    info = video_info(path)
    indices = sample_frame_indices(
        int(info["num_frames"]), num_frames=num_frames, max_frames=max_frames, fps=fps, video_fps=info["fps"] or None
    )
    frames = read_video(path, num_frames=num_frames, max_frames=max_frames, fps=fps)
    video_fps = float(info["fps"]) or 1.0
    return Clip(frames, indices, video_fps, int(info["num_frames"]), path)


def _as_clip(video: Any, max_frames: int | None, fps: float | None, num_frames: int | None) -> Clip:
    if isinstance(video, Clip):
        return video
    if isinstance(video, (str, os.PathLike)):
        return read_clip(video, max_frames=max_frames, fps=fps, num_frames=num_frames)
    if isinstance(video, np.ndarray):
        return Clip.from_array(video)
    raise TypeError(f"a video must be a file path, a Clip or a uint8 (F, H, W, 3) array; got {type(video).__name__}")


def chat_inputs(
    processor: Any, conversations: Sequence[list[dict]], clips: Sequence[Sequence[Clip]], *, padding_side: str = "left"
) -> Any:
    """Processor inputs for one chat conversation per batch row.

    ``conversations[i]`` is a list of ``{"role", "content": [{"type": "video"}, {"type": "text", "text": ...}]}``
    messages in the transformers chat format; ``clips[i]`` holds that row's videos in the order
    their ``{"type": "video"}`` items appear. The processor's own chat template renders the prompt.
    """
    if len(conversations) != len(clips):
        raise ValueError(f"{len(conversations)} conversations but {len(clips)} lists of videos")
    texts, videos, metadata = [], [], []
    for conversation, row in zip(conversations, clips):
        wanted = sum(
            1
            for message in conversation
            if not isinstance(message.get("content"), str)
            for item in message["content"]
            if item.get("type") == "video"
        )
        if wanted != len(row):
            raise ValueError(f"a conversation has {wanted} video items but {len(row)} videos were given for it")
        texts.append(processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True))
        videos += [clip.frames for clip in row]
        metadata += [clip.metadata() for clip in row]
    kwargs: dict[str, Any] = dict(padding=True, padding_side=padding_side, return_tensors="pt")
    if videos:
        kwargs.update(videos=videos, video_metadata=metadata, do_sample_frames=False)
    return processor(text=texts, **kwargs)


def prepare_inputs(
    processor: Any,
    videos: Sequence[Any],
    questions: Sequence[str],
    *,
    max_frames: int | None = 32,
    fps: float | None = None,
    num_frames: int | None = None,
    padding_side: str = "left",
) -> Any:
    """Inputs for ``video + question`` per batch row (videos: paths, :class:`Clip` or uint8 arrays).

    A single video or question is broadcast over the other list. Returns the processor's
    ``BatchFeature`` of CPU tensors; move it with ``.to(model.device)``.
    """
    videos, questions = list(videos), list(questions)
    if len(videos) == 1 and len(questions) > 1:
        videos = videos * len(questions)
    if len(questions) == 1 and len(videos) > 1:
        questions = questions * len(videos)
    if len(videos) != len(questions):
        raise ValueError(f"{len(videos)} videos but {len(questions)} questions")
    clips = [[_as_clip(v, max_frames, fps, num_frames)] for v in videos]
    conversations = [[{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": q}]}] for q in questions]
    return chat_inputs(processor, conversations, clips, padding_side=padding_side)


def resolve_dtype(dtype: str | torch.dtype | None) -> str | torch.dtype:
    """``"auto"`` (the checkpoint's dtype), a ``torch.dtype``, or its name (``"bfloat16"``, ``"float32"``, ...)."""
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return "auto" if dtype is None else dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"dtype must be 'auto' or a torch dtype name such as 'bfloat16' or 'float32'; got {dtype!r}")
    return value


def load_pretrained(
    model_id: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = "auto",
    device_map: str | dict | None = None,
    attn_implementation: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """``(model, processor)`` of a Hugging Face video LLM that tokcompress supports, in eval mode.

    ``model_id`` is a hub id or a folder written by ``save_pretrained``. The model class comes from
    ``AutoModelForImageTextToText`` (every supported family is registered there), the processor from
    ``AutoProcessor``, with left padding for batched generation. ``device_map`` (e.g. ``"auto"``)
    is passed to ``from_pretrained``; otherwise the model is moved to ``device`` (if given).
    Unsupported families raise before any weights are read.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    from .adapters import adapter_for, supported_models

    model_id = os.fspath(model_id)
    config = AutoConfig.from_pretrained(model_id, revision=revision, trust_remote_code=trust_remote_code)
    model_type = getattr(config, "model_type", None)
    if MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(model_type) not in supported_models():
        raise ValueError(
            f"{model_id} is a {model_type!r} model, which tokcompress does not support; supported model classes: "
            f"{', '.join(supported_models())}"
        )
    kwargs: dict[str, Any] = dict(dtype=resolve_dtype(dtype), revision=revision, trust_remote_code=trust_remote_code)
    if device_map is not None:
        kwargs["device_map"] = device_map
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForImageTextToText.from_pretrained(model_id, **kwargs)
    if device_map is None and device is not None:
        model.to(device)
    model.eval()
    adapter_for(model)  # a clear error if the loaded class has no adapter
    processor = AutoProcessor.from_pretrained(model_id, revision=revision, trust_remote_code=trust_remote_code)
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.padding_side = "left"
    return model, processor
