"""Shared fixtures: tiny random-weight models of every family with their real processors."""

from __future__ import annotations

import functools
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny models gain nothing from intra-op threads, and spinning OpenMP threads slow everything down
# badly on a busy 2-core machine; parallelism comes from pytest-xdist workers instead.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

from tokcompress.tiny import FAMILIES, build, make_inputs  # noqa: E402
from tokcompress.video import synthetic_video  # noqa: E402

QUESTIONS = ("What is moving in this video, and where does it go next?", "Why?")


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
