"""TS-LLaVA: tokens sampled evenly across all frames, optionally plus a thumbnail of tiled frames.

Paper: Qu et al., "TS-LLaVA: Constructing Visual Tokens through Thumbnail-and-Sampling for
Training-Free Video Large Language Models", 2024. Reference: ``tingyu215/TS-LLaVA`` @
``03cdeaee`` (``llava/model/llava_arch.py::{sample_tokens, uniformly_sample_frames, find_best_grid,
create_image_grid, grid_aggregation}``; default method ``V2``: 6 thumbnail frames, 2880 sampled
tokens, sampled tokens first).

Sampling: of the video's ``N`` tokens (frame-major), keep indices
``round(linspace(0, N - 1, K))`` (``torch.linspace`` in float32, halves to even), so the first and
the last token are always kept.

Thumbnail (``thumbnail=True``): ``thumbnail_frames`` frames at ``round(linspace(0, F - 1, k))`` are
resized and tiled into one image, which the model's vision tower encodes once more; its tokens come
from the adapter as the signal ``"thumbnail<k>"`` (``(m, D)``, LLM-embedding space). The video span is
then rewritten as ``[K sampled tokens, m thumbnail tokens]`` (``thumbnail_first`` swaps the halves, the
reference's ``Y`` methods) in its first ``K + m`` slots, so positions run consecutively as in the
reference. ``retain`` counts both halves: ``K = keep_count(retain, N) - m``. Only adapters that can
encode the thumbnail provide the signal (LLaVA-OneVision); elsewhere the policy is refused with
:class:`~tokcompress.errors.MissingSignalError`.

Without the thumbnail this is a selection: survivors keep their embeddings and original positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..errors import MissingSignalError
from ..policy import Policy, check_positions, keep_count
from ..registry import register
from ..tokens import Compression, TokenSet, selection

#: Thumbnail sizes the reference uses (methods V1/V2/V3).
THUMBNAIL_FRAMES = (4, 6, 8)


def linspace_index(n: int, k: int) -> Tensor:
    """The reference's ``round(linspace(0, n - 1, k))`` (float32, halves to even), clamped to ``[0, n)``."""
    if not 0 < k <= n:
        raise ValueError(f"cannot sample {k} of {n} items; need 0 < k <= n")
    return torch.linspace(0, n - 1, steps=k).round().long().clamp(0, n - 1)


def thumbnail_signal(frames: int) -> str:
    """Name of the signal that holds the tokens of a ``frames``-frame thumbnail."""
    return f"thumbnail{frames}"


@register("ts_llava")
@dataclass
class TSLLaVA(Policy):
    """TS-LLaVA's token sampling, with the thumbnail as an option.

    Args:
        retain: fraction of the video's tokens in the output, thumbnail tokens included.
        thumbnail: add the thumbnail image's tokens (needs the ``"thumbnail<k>"`` signal).
        thumbnail_frames: frames tiled into the thumbnail, one of 4, 6, 8 (reference V1/V2/V3).
        thumbnail_first: put the thumbnail before the sampled tokens (reference ``Y``; default ``V``).
        positions: ``"kept"`` (default: survivors keep their original position ids) or ``"compacted"``
            (renumbered consecutively, as the reference does; 1-D positions only).
    """

    retain: float = 0.25
    thumbnail: bool = False
    thumbnail_frames: int = 6
    thumbnail_first: bool = False
    positions: str = "kept"

    accepts_partial: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_positions(self.positions)
        super().__post_init__()
        for name in ("thumbnail", "thumbnail_first"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False; got {getattr(self, name)!r}")
        if self.thumbnail_frames not in THUMBNAIL_FRAMES or isinstance(self.thumbnail_frames, bool):
            raise ValueError(f"thumbnail_frames must be one of {THUMBNAIL_FRAMES}; got {self.thumbnail_frames!r}")

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({thumbnail_signal(self.thumbnail_frames)}) if self.thumbnail else frozenset()

    @property
    def label(self) -> str:
        extra = f", thumbnail={self.thumbnail_frames}" if self.thumbnail else ""
        return f"{self.name}(retain={self.retain:g}{extra})"

    def compress(self, tokens: TokenSet) -> Compression:
        cand = tokens.available_index()
        total = keep_count(self.retain, cand.numel())
        if not self.thumbnail:
            return selection(cand[linspace_index(cand.numel(), total).to(cand.device)])
        tokens.require_full(f"{self.name} with thumbnail")
        name = thumbnail_signal(self.thumbnail_frames)
        thumb = tokens.signals.get(name)
        if thumb is None:
            raise MissingSignalError(
                f"policy {self.label} needs the {name!r} signal: the adapter encodes the thumbnail from the frames it sees "
                "in the same call (pass pixel_values_videos, not pre-computed features)"
            )
        m = thumb.shape[0]
        k = total - m
        if k < 1:
            raise ValueError(
                f"retain={self.retain:g} keeps {total} of {cand.numel()} tokens, not more than the thumbnail's {m}; "
                f"raise retain above {(m + 1) / cand.numel():.3g} or set thumbnail=False"
            )
        sampled = cand[linspace_index(cand.numel(), k).to(cand.device)]
        feats = tokens.flat()[sampled]
        parts = (thumb.to(feats.dtype), feats) if self.thumbnail_first else (feats, thumb.to(feats.dtype))
        values = torch.cat(parts)
        # the rewritten span occupies the video's first K + m slots
        device = tokens.features.device
        keep = torch.arange(k + m, device=device)
        assign = torch.full((tokens.num_tokens,), -1, dtype=torch.long, device=device)
        assign[sampled] = torch.arange(k, device=device) + (m if self.thumbnail_first else 0)
        return Compression(keep=keep, values=values, assign=assign, info={"sampled": sampled, "thumbnail_tokens": m})


__all__ = ["TSLLaVA", "linspace_index", "thumbnail_signal"]
