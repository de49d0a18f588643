"""Synthetic test videos and PyAV-based video I/O.

Token-compression policies that prune *static* patches (or merge temporally
redundant ones) only show their effect on videos that have a static
background and a few moving things. :func:`synthetic_video` makes such clips
deterministically so tests and benchmarks need no downloaded media.

:func:`read_video` samples frames the way lmms-eval's video models do
(evenly spaced indices over the whole clip, optional fps cap, optional
max-frames cap), so numbers measured here line up with that harness.
"""

from __future__ import annotations

import os
from fractions import Fraction

import numpy as np

__all__ = [
    "synthetic_video",
    "write_video",
    "read_video",
    "video_info",
    "sample_frame_indices",
]


def synthetic_video(
    num_frames: int = 16,
    height: int = 64,
    width: int = 64,
    *,
    seed: int = 0,
    num_objects: int = 2,
) -> np.ndarray:
    """Make a clip with a static textured background and moving coloured boxes.

    The background is identical in every frame (a smooth sinusoidal texture plus
    fixed per-pixel noise) so patch-level "static token" detectors have real
    work to do; each object is a solid, saturated rectangle that moves along a
    straight line and bounces off the borders. Same arguments -> same array.

    Returns a ``uint8`` array of shape ``(num_frames, height, width, 3)``.
    """
    if num_frames < 1 or height < 1 or width < 1:
        raise ValueError("num_frames, height and width must be positive")
    rng = np.random.default_rng(seed)

    # Static background: low-frequency colour gradients + fixed fine-grained noise.
    yy, xx = np.meshgrid(np.linspace(0.0, 1.0, height), np.linspace(0.0, 1.0, width), indexing="ij")
    background = np.empty((height, width, 3), dtype=np.float32)
    for c in range(3):
        fy, fx = rng.uniform(1.0, 4.0, size=2)
        phase = rng.uniform(0.0, 2 * np.pi)
        background[..., c] = 0.5 + 0.25 * np.sin(2 * np.pi * (fy * yy + fx * xx) + phase)
    # Blocky noise (4x4-pixel cells) gives texture that survives yuv420 chroma subsampling.
    cells = rng.normal(0.0, 0.06, size=(-(-height // 4), -(-width // 4), 3)).astype(np.float32)
    background += np.repeat(np.repeat(cells, 4, axis=0), 4, axis=1)[:height, :width]
    # Keep the background in a muted range so objects stand out.
    background = np.clip(background, 0.0, 1.0) * 0.6 + 0.2

    frames = np.repeat(background[None], num_frames, axis=0)

    box_h = max(2, height // 5)
    box_w = max(2, width // 5)
    palette = np.array(
        [[1.0, 0.1, 0.1], [0.1, 0.9, 0.1], [0.1, 0.2, 1.0], [1.0, 0.9, 0.1], [0.9, 0.1, 0.9], [0.1, 0.9, 0.9]],
        dtype=np.float32,
    )
    for k in range(num_objects):
        color = palette[k % len(palette)]
        y0 = rng.uniform(0, max(1, height - box_h))
        x0 = rng.uniform(0, max(1, width - box_w))
        # Speed in pixels per frame, big enough to leave each patch within a few frames.
        speed = rng.uniform(0.6, 1.4) * max(1.0, min(height, width) / 16)
        angle = rng.uniform(0, 2 * np.pi)
        vy, vx = speed * np.sin(angle), speed * np.cos(angle)
        for t in range(num_frames):
            y = _bounce(y0 + vy * t, height - box_h)
            x = _bounce(x0 + vx * t, width - box_w)
            yi, xi = int(round(y)), int(round(x))
            frames[t, yi : yi + box_h, xi : xi + box_w] = color

    return (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _bounce(pos: float, limit: int) -> float:
    """Reflect ``pos`` into ``[0, limit]`` (a ball bouncing between two walls)."""
    if limit <= 0:
        return 0.0
    period = 2 * limit
    p = pos % period
    return p if p <= limit else period - p


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float = 8) -> None:
    """Encode ``frames`` (F, H, W, 3) uint8 RGB to ``path`` with MPEG-4 Part 2 / yuv420p.

    ``mpeg4`` ships with every FFmpeg build PyAV wheels bundle, so the files can
    be written and read anywhere. yuv420p subsamples chroma by 2, hence H and W
    must be even. A low quantiser keeps the round trip close to the input.
    """
    import av

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must have shape (F, H, W, 3), got {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {frames.dtype}")
    num_frames, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise ValueError(f"yuv420p needs even frame sizes, got {height}x{width}")
    if num_frames == 0:
        raise ValueError("cannot write a video with zero frames")

    rate = Fraction(fps).limit_denominator(1001)
    with av.open(os.fspath(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width = width
        stream.height = height
        stream.pix_fmt = "yuv420p"
        # Fixed low quantiser: near-lossless for small synthetic clips.
        # Near-lossless: clamp the quantiser low and give rate control plenty of bits.
        stream.codec_context.qmin = 1
        stream.codec_context.qmax = 3
        stream.bit_rate = max(2_000_000, int(width * height * float(rate) * 8))
        for frame in frames:
            av_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            for packet in stream.encode(av_frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def video_info(path: str | os.PathLike) -> dict[str, float | int]:
    """Return ``{"fps", "num_frames", "duration"}`` of the first video stream.

    ``num_frames`` comes from the container header when present and is counted
    by demuxing otherwise (some containers leave it 0).
    """
    import av

    with av.open(os.fspath(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0.0)
        num_frames = int(stream.frames or 0)
        if num_frames <= 0:
            num_frames = sum(1 for packet in container.demux(stream) if packet.size > 0)
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif fps > 0:
            duration = num_frames / fps
        else:
            duration = 0.0
    return {"fps": fps, "num_frames": num_frames, "duration": duration}


def sample_frame_indices(
    total_frames: int,
    *,
    num_frames: int | None = None,
    max_frames: int | None = None,
    fps: float | None = None,
    video_fps: float | None = None,
) -> np.ndarray:
    """Evenly spaced frame indices over the whole clip (lmms-eval style).

    * ``num_frames``: exactly that many indices ``linspace(0, total-1, n)``.
    * ``fps``: keep every ``round(video_fps / fps)``-th frame (needs ``video_fps``).
    * ``max_frames``: if more indices than this survive, resample uniformly over
      the whole clip down to ``max_frames``.

    ``num_frames`` and ``fps`` are mutually exclusive. With none given, all
    frames are kept (subject to ``max_frames``).
    """
    if total_frames <= 0:
        raise ValueError("video has no frames")
    if num_frames is not None and fps is not None:
        raise ValueError("num_frames and fps are mutually exclusive")
    if num_frames is not None:
        if num_frames < 1:
            raise ValueError("num_frames must be >= 1")
        return np.linspace(0, total_frames - 1, num_frames).round().astype(np.int64)
    indices = np.arange(total_frames, dtype=np.int64)
    if fps is not None:
        if fps <= 0:
            raise ValueError("fps must be positive")
        if not video_fps:
            raise ValueError("fps sampling needs the video's own frame rate")
        step = max(1, round(video_fps / fps))
        indices = indices[::step]
    if max_frames is not None and len(indices) > max_frames:
        indices = np.linspace(0, total_frames - 1, max_frames).round().astype(np.int64)
    return indices


def read_video(
    path: str | os.PathLike,
    num_frames: int | None = None,
    max_frames: int | None = None,
    fps: float | None = None,
) -> np.ndarray:
    """Decode ``path`` with PyAV and return uniformly sampled RGB frames (F, H, W, 3) uint8.

    Sampling follows :func:`sample_frame_indices`. The clip is decoded once
    and only the selected frames are converted to RGB, so long videos do not
    have to fit in memory.
    """
    import av

    info = video_info(path)
    total = info["num_frames"]
    wanted = sample_frame_indices(
        int(total), num_frames=num_frames, max_frames=max_frames, fps=fps, video_fps=info["fps"] or None
    )
    # An index may repeat when num_frames > total; decode once, then gather.
    wanted_set = set(int(i) for i in wanted)
    decoded: dict[int, np.ndarray] = {}
    with av.open(os.fspath(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for idx, frame in enumerate(container.decode(stream)):
            if idx in wanted_set:
                decoded[idx] = frame.to_ndarray(format="rgb24")
            if len(decoded) == len(wanted_set):
                break
    if not decoded:
        raise ValueError(f"could not decode any frame from {path}")
    # Header frame counts can overshoot what actually decodes: clamp to the last decoded frame.
    last = max(decoded)
    return np.stack([decoded[min(int(i), last)] if int(i) in decoded else decoded[last] for i in wanted])
