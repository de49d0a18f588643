"""Shared fixtures: tiny random-weight models of every family with their real processors."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny models gain nothing from intra-op threads, and spinning OpenMP threads slow everything down
# badly on a busy 2-core machine; parallelism comes from pytest-xdist workers instead.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

import tokcompress as tc  # noqa: E402
from tokcompress.tiny import FAMILIES, build, make_inputs  # noqa: E402
from tokcompress.tokens import selection  # noqa: E402
from tokcompress.video import synthetic_video  # noqa: E402

QUESTIONS = ("What is moving in this video, and where does it go next?", "Why?")


@pytest.fixture(autouse=True)
def _one_thread():
    """Every test runs with one intra-op thread, even after code that set more (benchmarks take
    ``--threads``): the tiny models only pay sync overhead for threads on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.lru_cache(maxsize=None)
def tiny(family: str, attn: str = "sdpa"):
    """(model, processor), built once per session."""
    return build(family, attn_implementation=attn)


@functools.lru_cache(maxsize=None)
def _videos(frames: int = 8, size: int = 64):
    return synthetic_video(frames, size, size, seed=1), synthetic_video(frames, size, size, seed=2)


def batch_inputs(family: str, batch: int = 2, attn: str = "sdpa", padding_side: str = "left"):
    """Batch 1 or 2 (different question lengths, so batch 2 is padded)."""
    _, processor = tiny(family, attn)
    videos = list(_videos())[:batch]
    return dict(make_inputs(processor, videos, list(QUESTIONS[:batch]), padding_side=padding_side))


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(params=["sdpa", "eager"])
def attn(request) -> str:
    return request.param


def two_video_inputs(family: str, attn: str = "sdpa"):
    """Batch 1: one prompt holding two different videos (8 and 4 frames for Qwen-VL; 8 and 8 for the
    LLaVA families, whose processors stack the videos of a call)."""
    _, processor = tiny(family, attn)
    first, second = _videos()
    if family.startswith("qwen"):
        second = second[:4]
    content = [{"type": "video"}, {"type": "video"}, {"type": "text", "text": QUESTIONS[0]}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    metadata = [
        {"total_num_frames": len(v), "fps": 2.0, "duration": len(v) / 2.0, "frames_indices": list(range(len(v))),
         "height": v.shape[1], "width": v.shape[2]}
        for v in (first, second)
    ]
    out = processor(text=[text], videos=[first, second], video_metadata=metadata, do_sample_frames=False, return_tensors="pt")
    return dict(out)


@dataclass
class Spy(tc.Policy):
    """Test-only: keeps every token and records, per video, ``(signals, grid, frames_per_step)`` as the
    engine handed them over (signals cloned). Subclass it with ``needs`` / ``optional_needs`` to ask
    for signals."""

    retain: float = 1.0
    seen: list = field(default_factory=list)

    def compress(self, tokens):
        signals = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in tokens.signals.items()}
        self.seen.append((signals, tokens.grid, tokens.frames_per_step))
        return selection(tokens.available_index())

    @property
    def signals(self) -> list[dict]:
        """The recorded signals, one dict per video."""
        return [signals for signals, _, _ in self.seen]
