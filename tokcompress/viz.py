"""Pictures of what a policy kept: frames with kept tokens highlighted, the budget over time, segments.

Everything starts from a :class:`KeptTokens`, built by :func:`kept` from any of

* a wrapped model after a forward or ``generate`` (reads :func:`tokcompress.last_record`),
* the ``last_record`` list itself, one :class:`~tokcompress.RowRecord` or one :class:`~tokcompress.VideoRecord`,
* a policy's :class:`~tokcompress.Compression` together with the :class:`~tokcompress.TokenSet` it was
  computed on (``kept(compression, tokens=tokens)`` or ``kept((tokens, compression))``).

How token cells map onto pixels (:func:`step_frames`, :func:`cell_edges`):

* Time. Grid step ``t`` covers input frames ``t * k ... t * k + k - 1`` with ``k = frames_per_step``
  (2 for Qwen-VL, whose vision tower packs two frames into one temporal patch; 1 otherwise). A panel
  shows the first frame of its step. Pass the frames the model saw, after any frame sampling.
* Space. The ``h x w`` token grid covers a rectangle of the frame (``region``, the whole frame by
  default) in equal parts: row ``y`` spans pixel rows ``floor(y * H / h)`` to ``floor((y + 1) * H / h)``.
  That is exact for processors that resize the whole frame (LLaVA-OneVision squashes it to a square,
  Qwen-VL resizes to multiples of 28 keeping the aspect ratio); processors that resize the short side
  and centre-crop (LLaVA-NeXT-Video, Video-LLaVA) see only :func:`center_square` of the frame.

In the pictures, dropped tokens are dimmed; kept tokens keep their pixels and get a thin outline;
tokens merged into one output token share one tint (one colour per merged group, the group's carrier
outlined). Per-step kept counts are bars; segment boundaries (``info["segments"]``, half-open
``(start, end)`` grid-step ranges, as FastVID and HoliTom write them) are vertical lines on the bar
chart and colour the panel borders.

Needs matplotlib (``pip install tokcompress[viz]``). Functions return figures; ``path=`` saves a PNG.
"""

from __future__ import annotations

import colorsys
import os
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .record import RowRecord, VideoRecord
from .tokens import Compression, TokenSet

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "KeptTokens",
    "cell_edges",
    "center_square",
    "group_colors",
    "kept",
    "plot_budget",
    "plot_comparison",
    "plot_frames",
    "plot_policies",
    "render",
    "segments_of",
    "show",
    "step_frames",
]

#: Outline colour of kept tokens and colours of alternating segments.
KEPT_EDGE = "#ffffff"
SEGMENT_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")


# --------------------------------------------------------------------------------------------- #
# What was kept                                                                                  #
# --------------------------------------------------------------------------------------------- #
@dataclass
class KeptTokens:
    """What a policy kept of one video, in grid terms.

    Attributes:
        grid: ``(T, h, w)``.
        keep: ``(K,)`` int64 numpy array, sorted flat indices ``t * h * w + y * w + x`` of the tokens
            that survive or carry a merged value.
        assign: ``(T * h * w,)`` output slot (index into ``keep``) of every token, ``-1`` dropped, or
            ``None`` for plain selection.
        info: the policy's diagnostics.
        frames_per_step: input frames per grid step.
        label: a name for titles (the policy label when known).
    """

    grid: tuple[int, int, int]
    keep: np.ndarray
    assign: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)
    frames_per_step: int = 1
    label: str = ""

    def __post_init__(self) -> None:
        t, h, w = (int(v) for v in self.grid)
        self.grid = (t, h, w)
        n = t * h * w
        self.keep = _numpy(self.keep).astype(np.int64).reshape(-1)
        if self.keep.size and (self.keep.min() < 0 or self.keep.max() >= n):
            raise ValueError(f"keep holds indices outside [0, {n}) for grid {self.grid}")
        if self.keep.size > 1 and not bool((np.diff(self.keep) > 0).all()):
            raise ValueError("keep must be sorted and unique (as Compression.keep is)")
        if self.assign is not None:
            self.assign = _numpy(self.assign).astype(np.int64).reshape(-1)
            if self.assign.shape != (n,):
                raise ValueError(f"assign must have shape ({n},) for grid {self.grid}; got {self.assign.shape}")
            if self.assign.max(initial=-1) >= self.keep.size or self.assign.min(initial=-1) < -1:
                raise ValueError(f"assign holds slots outside [-1, {self.keep.size})")
        if isinstance(self.frames_per_step, bool) or int(self.frames_per_step) < 1:
            raise ValueError(f"frames_per_step must be a positive int; got {self.frames_per_step!r}")
        self.frames_per_step = int(self.frames_per_step)

    @property
    def num_tokens(self) -> int:
        t, h, w = self.grid
        return t * h * w

    @property
    def slots(self) -> np.ndarray:
        """``(T, h, w)`` output slot of every cell, ``-1`` where the token was dropped."""
        if self.assign is not None:
            flat = self.assign
        else:
            flat = np.full(self.num_tokens, -1, dtype=np.int64)
            flat[self.keep] = np.arange(self.keep.size)
        return flat.reshape(self.grid)

    @property
    def carriers(self) -> np.ndarray:
        """``(T, h, w)`` bool: the cells in ``keep`` (one per output token)."""
        mask = np.zeros(self.num_tokens, dtype=bool)
        mask[self.keep] = True
        return mask.reshape(self.grid)

    @property
    def covered(self) -> np.ndarray:
        """``(T, h, w)`` bool: cells whose content reaches the model (kept, or merged into a kept token)."""
        return self.slots >= 0

    @property
    def group_sizes(self) -> np.ndarray:
        """``(K,)`` number of input tokens in each output token."""
        slots = self.slots.reshape(-1)
        return np.bincount(slots[slots >= 0], minlength=self.keep.size)

    @property
    def merged(self) -> np.ndarray:
        """``(T, h, w)`` bool: cells that belong to an output token made of two or more inputs."""
        slots = self.slots
        sizes = self.group_sizes
        return (slots >= 0) & (sizes[np.clip(slots, 0, None)] > 1)

    def per_step(self) -> np.ndarray:
        """``(T,)`` output tokens (carriers) in each grid step."""
        t, h, w = self.grid
        return np.bincount(self.keep // (h * w), minlength=t)

    @property
    def segments(self) -> list[tuple[int, int]] | None:
        """Half-open ``(start, end)`` grid-step segments from the diagnostics, or ``None``."""
        return segments_of(self.info, self.grid[0])


def kept(
    target: Any,
    *,
    tokens: TokenSet | None = None,
    row: int = 0,
    video: int = 0,
    label: str | None = None,
) -> KeptTokens:
    """A :class:`KeptTokens` from a wrapped model, a record, or a policy's output (see the module doc).

    ``row`` and ``video`` pick the batch row and the video within it for record inputs.
    """
    if isinstance(target, KeptTokens):
        return target
    if isinstance(target, tuple) and len(target) == 2:
        a, b = target
        if isinstance(a, TokenSet) and isinstance(b, Compression):
            return kept(b, tokens=a, label=label)
        if isinstance(a, Compression) and isinstance(b, TokenSet):
            return kept(a, tokens=b, label=label)
        raise TypeError("a pair must be (TokenSet, Compression)")
    if isinstance(target, Compression):
        if tokens is None:
            raise ValueError("a Compression needs the TokenSet it was computed on: kept(compression, tokens=tokens)")
        return KeptTokens(
            grid=tokens.grid,
            keep=target.keep,
            assign=target.assign,
            info=dict(target.info),
            frames_per_step=tokens.frames_per_step,
            label=label or "",
        )
    if isinstance(target, VideoRecord):
        return KeptTokens(
            grid=target.grid,
            keep=target.keep,
            assign=target.assign,
            info=dict(target.info),
            frames_per_step=getattr(target, "frames_per_step", 1),
            label=label or "",
        )
    if isinstance(target, RowRecord):
        if not 0 <= video < len(target.videos):
            raise IndexError(f"video={video} is out of range: this row holds {len(target.videos)} video(s)")
        return kept(target.videos[video], label=label or target.policy)
    if isinstance(target, nn.Module):
        from .api import last_record

        record = last_record(target)
        if record is None:
            raise ValueError("the wrapped model has no record yet: run a forward or generate with a video first")
        target = record
    if isinstance(target, Sequence) and target and all(isinstance(r, RowRecord) for r in target):
        if not 0 <= row < len(target):
            raise IndexError(f"row={row} is out of range: the record holds {len(target)} batch row(s)")
        return kept(target[row], video=video, label=label)
    raise TypeError(
        "expected a wrapped model, last_record(model), a RowRecord, a VideoRecord, a KeptTokens, or a "
        f"Compression with tokens=TokenSet; got {type(target).__name__}"
    )


def segments_of(info: Mapping[str, Any], num_steps: int) -> list[tuple[int, int]] | None:
    """Half-open grid-step segments from a policy's diagnostics, or ``None`` when it made none.

    ``info["segments"]`` holds half-open ``(start, end)`` ranges (``(0, 5), (5, 12)``), in any order.
    Anything that does not partition ``range(num_steps)`` into non-empty ranges is reported with a
    warning and not drawn.
    """
    raw = info.get("segments")
    if raw is None:
        return None
    try:
        pairs = sorted((int(a), int(b)) for a, b in (raw.tolist() if hasattr(raw, "tolist") else raw))
    except (TypeError, ValueError):
        warnings.warn("info['segments'] is not a list of (start, end) pairs; segments not drawn", stacklevel=2)
        return None
    if not pairs:
        return None
    contiguous = all(p[1] == q[0] for p, q in zip(pairs, pairs[1:]))
    if pairs[0][0] == 0 and pairs[-1][1] == num_steps and contiguous and all(a < b for a, b in pairs):
        return pairs
    warnings.warn(
        f"info['segments'] = {pairs} does not partition the {num_steps} grid steps into half-open ranges; "
        "segments not drawn",
        stacklevel=2,
    )
    return None


# --------------------------------------------------------------------------------------------- #
# Token cells -> pixels                                                                          #
# --------------------------------------------------------------------------------------------- #
def step_frames(num_steps: int, num_frames: int, frames_per_step: int = 1) -> list[range]:
    """Input frames covered by each grid step: step ``t`` covers ``t * k ... t * k + k - 1``.

    The last step may be short (Qwen-VL pads an odd frame count by repeating the last frame). Raises
    when ``num_frames`` does not fit ``num_steps`` steps of ``frames_per_step`` frames.
    """
    k = int(frames_per_step)
    if k < 1:
        raise ValueError(f"frames_per_step must be a positive int; got {frames_per_step!r}")
    if not (num_steps - 1) * k < num_frames <= num_steps * k:
        raise ValueError(
            f"frames has {num_frames} frames but the token grid has {num_steps} steps of {k} frame(s) each "
            f"(so {(num_steps - 1) * k + 1} to {num_steps * k} frames): pass the frames the model saw, after "
            "frame sampling (tokcompress.tiny.make_inputs and the processors subsample long clips)"
        )
    return [range(t * k, min((t + 1) * k, num_frames)) for t in range(num_steps)]


def cell_edges(cells: int, pixels: int, start: int = 0) -> np.ndarray:
    """``(cells + 1,)`` pixel edges splitting ``pixels`` into ``cells`` near-equal parts: ``start + floor(i * pixels / cells)``."""
    if cells < 1 or pixels < cells:
        raise ValueError(f"cannot split {pixels} pixels into {cells} token cells")
    return start + (np.arange(cells + 1) * pixels) // cells


def center_square(height: int, width: int) -> tuple[int, int, int, int]:
    """``(top, left, side, side)``: the centred square a short-side resize + centre crop keeps."""
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


def group_colors(count: int) -> np.ndarray:
    """``(count, 3)`` float RGB, one distinct saturated colour per merged group (golden-ratio hues)."""
    hues = (np.arange(count) * 0.6180339887498949) % 1.0
    return np.array([colorsys.hsv_to_rgb(hh, 0.85, 0.95) for hh in hues], dtype=np.float64).reshape(count, 3)


def _as_frames(frames: Any) -> np.ndarray:
    """``(F, H, W, 3)`` float64 in [0, 1] from uint8 / float numpy or torch frames."""
    arr = _numpy(frames)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"frames must have shape (F, H, W, 3); got {tuple(arr.shape)}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float64) / 255.0
    arr = arr.astype(np.float64)
    if arr.size and (arr.min() < 0.0 or arr.max() > 1.0):
        raise ValueError("float frames must lie in [0, 1]; pass uint8 frames for 0..255 values")
    return arr


def render(
    target: Any,
    frames: Any | None = None,
    *,
    region: tuple[int, int, int, int] | None = None,
    dim: float = 0.3,
    tint: float = 0.45,
    **kept_kwargs: Any,
) -> np.ndarray:
    """``(T, H, W, 3)`` float images, one per grid step, with the kept tokens shown.

    Each panel is the first frame of its step. Dropped cells (and pixels outside ``region``) are
    multiplied by ``dim``; cells of merged groups are blended ``(1 - tint) * pixel + tint * colour``
    with :func:`group_colors` (one colour per output slot); other kept cells are untouched.
    ``frames=None`` draws on a plain grey canvas of 16 pixels per cell. ``region`` is
    ``(top, left, height, width)``, the part of the frame the token grid covers.
    """
    sel = kept(target, **kept_kwargs)
    t, h, w = sel.grid
    if frames is None:
        base = np.full((t, 16 * h, 16 * w, 3), 0.75)
        frame_of_step = list(range(t))
    else:
        base = _as_frames(frames)
        frame_of_step = [r[0] for r in step_frames(t, base.shape[0], sel.frames_per_step)]
    height, width = base.shape[1:3]
    top, left, rh, rw = region if region is not None else (0, 0, height, width)
    if top < 0 or left < 0 or top + rh > height or left + rw > width:
        raise ValueError(f"region {region} does not fit in {height}x{width} frames")
    ye, xe = cell_edges(h, rh, top), cell_edges(w, rw, left)
    slots = sel.slots
    colors = group_colors(sel.keep.size)
    merged = sel.merged
    out = base[frame_of_step].copy()
    inside = np.zeros((height, width), dtype=bool)
    inside[top : top + rh, left : left + rw] = True
    out[:, ~inside] *= dim
    for step in range(t):
        panel = out[step]
        for y in range(h):
            for x in range(w):
                cell = panel[ye[y] : ye[y + 1], xe[x] : xe[x + 1]]
                slot = slots[step, y, x]
                if slot < 0:
                    cell *= dim
                elif merged[step, y, x]:
                    cell *= 1.0 - tint
                    cell += tint * colors[slot]
    return out


# --------------------------------------------------------------------------------------------- #
# Figures                                                                                        #
# --------------------------------------------------------------------------------------------- #
def _plt() -> Any:
    try:
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("tokcompress.viz needs matplotlib: pip install 'tokcompress[viz]'") from err
    return plt


def _save(fig: Figure, path: str | os.PathLike | None) -> Figure:
    if path is not None:
        fig.savefig(os.fspath(path), dpi=fig.dpi, format="png")
    return fig


def _segment_index(segments: list[tuple[int, int]] | None, steps: int) -> list[int | None]:
    out: list[int | None] = [None] * steps
    for i, (a, b) in enumerate(segments or []):
        for s in range(a, b):
            out[s] = i
    return out


def _draw_panel(ax: Axes, image: np.ndarray, sel: KeptTokens, step: int, edges: tuple[np.ndarray, np.ndarray],
                outline: bool) -> None:
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    ax.imshow(image, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if not outline:
        return
    ye, xe = edges
    cells = np.argwhere(sel.carriers[step])
    boxes = [Rectangle((xe[x] - 0.5, ye[y] - 0.5), xe[x + 1] - xe[x], ye[y + 1] - ye[y]) for y, x in cells]
    coll = PatchCollection(boxes, facecolor="none", edgecolor=KEPT_EDGE, linewidth=0.6)
    coll.set_gid("kept")
    ax.add_collection(coll)


def plot_frames(
    target: Any,
    frames: Any | None = None,
    *,
    steps: Sequence[int] | None = None,
    columns: int = 8,
    region: tuple[int, int, int, int] | None = None,
    dim: float = 0.3,
    outline: bool = True,
    title: str | None = None,
    path: str | os.PathLike | None = None,
    fig: Figure | None = None,
    **kept_kwargs: Any,
) -> Figure:
    """The video's grid steps as a grid of panels with kept tokens highlighted (see :func:`render`).

    Each kept (carrier) token gets an outline (a ``PatchCollection`` with gid ``"kept"`` per panel);
    panel borders take their segment's colour when the policy made segments. ``steps`` picks which
    grid steps to show (default all).
    """
    plt = _plt()
    sel = kept(target, **kept_kwargs)
    t, h, w = sel.grid
    images = render(sel, frames, region=region, dim=dim)
    steps = list(range(t)) if steps is None else [int(s) for s in steps]
    for s in steps:
        if not 0 <= s < t:
            raise ValueError(f"steps holds {s}, outside the {t} grid steps")
    height, width = images.shape[1:3]
    top, left, rh, rw = region if region is not None else (0, 0, height, width)
    edges = (cell_edges(h, rh, top), cell_edges(w, rw, left))
    cols = max(1, min(columns, len(steps)))
    rows = -(-len(steps) // cols)
    if fig is None:
        fig = plt.figure(figsize=(1.7 * cols, 1.7 * rows * height / width + 0.5), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    seg_of = _segment_index(sel.segments, t)
    k = sel.frames_per_step
    per_step = sel.per_step()
    for i, ax in enumerate(axes.flat):
        if i >= len(steps):
            ax.axis("off")
            continue
        s = steps[i]
        _draw_panel(ax, images[s], sel, s, edges, outline)
        frames_txt = f"f{s * k}" if k == 1 else f"f{s * k}-{s * k + k - 1}"
        seg = seg_of[s]
        ax.set_title(f"t={s} ({frames_txt}) {per_step[s]}" + ("" if seg is None else f" s{seg}"), fontsize=7)
        if seg is not None:
            for spine in ax.spines.values():
                spine.set_edgecolor(SEGMENT_COLORS[seg % len(SEGMENT_COLORS)])
                spine.set_linewidth(2.5)
    fig.suptitle(title if title is not None else _summary(sel), fontsize=9)
    return _save(fig, path)


def _summary(sel: KeptTokens) -> str:
    n = sel.num_tokens
    name = f"{sel.label}: " if sel.label else ""
    merged = int(sel.merged.sum())
    extra = f", {merged} merged into {int((sel.group_sizes > 1).sum())} groups" if merged else ""
    return f"{name}kept {sel.keep.size} / {n} tokens ({100.0 * sel.keep.size / n:.1f}%){extra}"


def plot_budget(
    target: Any,
    *,
    ax: Axes | None = None,
    title: str | None = None,
    path: str | os.PathLike | None = None,
    **kept_kwargs: Any,
) -> Figure:
    """Bar chart of output tokens per grid step, with segment boundaries as vertical lines.

    Bars (one per step) have gid ``"kept-per-step"``; boundaries are lines with gid
    ``"segment-boundary"`` (one between consecutive segments), segments shaded alternately.
    """
    plt = _plt()
    sel = kept(target, **kept_kwargs)
    t, h, w = sel.grid
    if ax is None:
        fig, ax = plt.subplots(figsize=(max(4.0, 0.25 * t + 1.5), 2.4), layout="constrained")
    else:
        fig = ax.figure
    counts = sel.per_step()
    bars = ax.bar(np.arange(t), counts, width=0.8, color="#4c72b0", label="kept")
    for patch in bars:
        patch.set_gid("kept-per-step")
    ax.axhline(h * w, color="0.5", linestyle=":", linewidth=1, label=f"all ({h * w})")
    for i, (a, b) in enumerate(sel.segments or []):
        if i % 2:
            ax.axvspan(a - 0.5, b - 0.5, color="0.92", zorder=0)
        if a > 0:
            line = ax.axvline(a - 0.5, color="#d62728", linestyle="--", linewidth=1.2)
            line.set_gid("segment-boundary")
    k = sel.frames_per_step
    ax.set_xlabel("grid step" + (f" ({k} frames each)" if k > 1 else " (frame)"))
    ax.set_ylabel("tokens kept")
    ax.set_xlim(-0.6, t - 0.4)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(0, h * w * 1.08)
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title(title if title is not None else _summary(sel), fontsize=9)
    return _save(fig, path)


def show(
    target: Any,
    frames: Any | None = None,
    *,
    steps: Sequence[int] | None = None,
    columns: int = 8,
    region: tuple[int, int, int, int] | None = None,
    dim: float = 0.3,
    outline: bool = True,
    title: str | None = None,
    path: str | os.PathLike | None = None,
    **kept_kwargs: Any,
) -> Figure:
    """One figure: the frames with kept tokens (:func:`plot_frames`) above the budget (:func:`plot_budget`)."""
    plt = _plt()
    sel = kept(target, **kept_kwargs)
    t = sel.grid[0]
    n_panels = t if steps is None else len(steps)
    cols = max(1, min(columns, n_panels))
    rows = -(-n_panels // cols)
    fig = plt.figure(figsize=(max(1.7 * cols, 5.0), 1.8 * rows + 2.2), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.8 * rows + 0.4, 1.8])
    plot_frames(sel, frames, steps=steps, columns=columns, region=region, dim=dim, outline=outline,
                title=title, fig=top)
    plot_budget(sel, ax=bottom.subplots(), title="")
    return _save(fig, path)


def plot_policies(
    targets: Mapping[str, Any],
    frames: Any | None = None,
    *,
    steps: Sequence[int] | None = None,
    region: tuple[int, int, int, int] | None = None,
    dim: float = 0.3,
    outline: bool = True,
    path: str | os.PathLike | None = None,
) -> Figure:
    """Several policies on the same video: one row per label, one column per grid step.

    ``targets`` maps a label to anything :func:`kept` accepts (e.g. ``{"evs": model_record, ...}``).
    """
    plt = _plt()
    if not targets:
        raise ValueError("targets is empty: pass {label: record or KeptTokens, ...}")
    sels = {label: kept(v, label=label) for label, v in targets.items()}
    grids = {s.grid[0] for s in sels.values()}
    if len(grids) != 1:
        raise ValueError(f"the policies ran on different grids ({sorted(grids)} steps); compare them on one video")
    t = grids.pop()
    steps = list(range(t)) if steps is None else [int(s) for s in steps]
    fig = plt.figure(figsize=(1.5 * len(steps) + 1.2, 1.6 * len(sels) + 0.3), layout="constrained")
    axes = fig.subplots(len(sels), len(steps), squeeze=False)
    for r, (label, sel) in enumerate(sels.items()):
        images = render(sel, frames, region=region, dim=dim)
        height, width = images.shape[1:3]
        top, left, rh, rw = region if region is not None else (0, 0, height, width)
        edges = (cell_edges(sel.grid[1], rh, top), cell_edges(sel.grid[2], rw, left))
        per_step = sel.per_step()
        for c, s in enumerate(steps):
            ax = axes[r, c]
            _draw_panel(ax, images[s], sel, s, edges, outline)
            if r == 0:
                ax.set_title(f"t={s}", fontsize=8)
            ax.set_xlabel(str(per_step[s]), fontsize=7, labelpad=1)
        axes[r, 0].set_ylabel(f"{label}\n{sel.keep.size}/{sel.num_tokens}", fontsize=8)
    return _save(fig, path)


def plot_comparison(rows: Sequence[Mapping[str, Any]], *, path: str | os.PathLike | None = None) -> Figure:
    """TTFT against tokens kept (one line per policy) and policy time, from :func:`tokcompress.compare` rows."""
    plt = _plt()
    rows = [r for r in rows if r.get("error") is None]
    if not rows:
        raise ValueError("no successful rows to plot")
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.4), layout="constrained")
    runs: dict[int, list[Mapping[str, Any]]] = {}
    for r in rows:
        runs.setdefault(int(r["run"]), []).append(r)
    by_policy: dict[str, list[tuple[float, float, float]]] = {}
    for items in runs.values():
        # Every row of a run: its mean tokens kept per sample against its mean TTFT per call.
        calls = {int(x["input"]): float(x["ttft_s"]) for x in items}
        point = (
            float(np.mean([x["tokens_kept"] for x in items])),
            1e3 * float(np.mean(list(calls.values()))),
            float(items[0]["retain"]),
        )
        by_policy.setdefault(str(items[0]["policy"]), []).append(point)
    for name, pts in by_policy.items():
        pts.sort()
        left.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        for x, y, retain in pts:
            left.annotate(f"{retain:g}", (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
    left.set_xlabel("visual tokens kept (mean per sample)")
    left.set_ylabel("TTFT (ms, median)")
    left.legend(fontsize=7)
    left.set_title("time to first token", fontsize=9)
    labels = [str(items[0]["label"]) for items in runs.values()]
    times = [1e3 * float(np.mean([x["policy_s"] for x in items])) for items in runs.values()]
    right.barh(np.arange(len(labels)), times, color="#55a868")
    right.set_yticks(np.arange(len(labels)), labels, fontsize=6)
    right.invert_yaxis()
    right.set_xlabel("policy time (ms, mean per sample)")
    right.set_title("time inside the policy", fontsize=9)
    return _save(fig, path)


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)
