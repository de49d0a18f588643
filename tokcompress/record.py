"""What the last compressed forward did, per batch row: the explicit per-call record users read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor


@dataclass
class VideoRecord:
    """One video of one row.

    Attributes:
        positions: ``(T*h*w,)`` indices into the original LM input sequence of the video's grid tokens
            (frame-major raster order), so ``positions[keep]`` are the survivors' positions.
        grid: ``(T, h, w)``.
        keep: ``(K,)`` flat grid indices that survive or carry a merged value (``Compression.keep``).
        assign: ``(T*h*w,)`` output slot each grid token went into, ``-1`` dropped (merging policies), or None.
        info: the policy's diagnostics (segments, clusters, ...).
        seconds: time the policy took on this video.
        frames_per_step: input frames per temporal step of ``grid`` (2 for Qwen-VL, else 1), to map
            grid steps back onto the video's frames.
        scorer_seconds: time the policy's scorer model took on this video (0.0 without a scorer).
    """

    positions: Tensor
    grid: tuple[int, int, int]
    keep: Tensor
    assign: Tensor | None
    info: dict[str, Any]
    seconds: float
    frames_per_step: int = 1
    scorer_seconds: float = 0.0


@dataclass
class RowRecord:
    """One batch row of the last compressed prefill.

    Attributes:
        kept: sorted ``(K,)`` indices into the original LM input sequence of the video tokens that
            survive (grid tokens and the special tokens the engine keeps).
        values: ``(K, D)`` embeddings the LM received at ``kept`` when a policy merged tokens, else None.
        video_tokens_before / video_tokens_after: placeholder tokens of this row before and after.
        policy: label of the policy that ran.
        seconds: time the policy itself took on this row's videos.
        scorer_seconds: time the policy's scorer model took on this row's videos (part of TTFT; not in ``seconds``).
        slots: ``(Lk,)`` for each position of the compacted sequence, the original index it came
            from, ``-1`` for padding slots the engine added (outputs of a plain forward follow it).
        position_ids: the position ids the LM received for the compacted row (``(Lk,)``, or
            ``(3, Lk)`` for M-RoPE: the temporal/height/width rows).
        videos: per-video details.
        stages: per-stage records of in-layer policies (filled by layer stages), by stage label.
        clock: ``time.perf_counter()`` stamps of this prefill, each read after a device sync:
            ``"inner_start"`` when the multimodal model's forward began (under ``generate`` the media
            are already encoded by then), ``"lm_hook_start"`` when the language model's pre-hook began,
            ``"lm_start"`` when the compacted inputs were handed to the language model. The same for
            every row; benchmarks split time-to-first-token with them.
    """

    kept: Tensor
    values: Tensor | None
    video_tokens_before: int
    video_tokens_after: int
    policy: str
    seconds: float
    slots: Tensor
    position_ids: Tensor | None
    videos: list[VideoRecord] = field(default_factory=list)
    scorer_seconds: float = 0.0
    stages: dict[str, Any] = field(default_factory=dict)
    clock: dict[str, float] = field(default_factory=dict)
