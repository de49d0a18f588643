"""Equal-budget baselines: the honest comparison points every published policy should beat.

``none`` keeps everything (and still runs the whole engine), ``uniform`` keeps an evenly spaced
subset of each frame, ``frames`` keeps whole frames evenly spaced in time, ``pool`` averages
neighbouring tokens of each frame down to the budget (a merging policy), ``random`` keeps a seeded
random subset. Budgets use :func:`tokcompress.policy.keep_count` (half-up rounding, at least one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..policy import Policy, keep_count
from ..registry import register
from ..tokens import Compression, TokenSet, selection


def evenly_spaced(n: int, k: int, device: torch.device | None = None) -> Tensor:
    """``k`` distinct indices spread evenly over ``range(n)``: the centre of each of ``k`` equal bins."""
    return ((torch.arange(k, device=device, dtype=torch.float64) + 0.5) * (n / k)).floor().long()


@register("none")
@dataclass
class KeepAll(Policy):
    """Keep every token. Runs the full engine path, so it measures the engine's own overhead."""

    retain: float = 1.0

    def compress(self, tokens: TokenSet) -> Compression:
        return selection(tokens.available_index())


@register("uniform")
@dataclass
class Uniform(Policy):
    """Per frame, keep ``keep_count(retain, n_frame)`` tokens evenly spaced in raster order.

    Budget: ``sum over frames of keep_count(retain, available tokens of that frame)``.
    """

    def compress(self, tokens: TokenSet) -> Compression:
        n = tokens.tokens_per_frame
        avail = tokens.available if tokens.available is not None else None
        keep = []
        for t in range(tokens.num_frames):
            cand = (
                torch.arange(n, device=tokens.features.device)
                if avail is None
                else avail[t].nonzero().squeeze(1)
            )
            if cand.numel() == 0:
                continue
            k = keep_count(self.retain, cand.numel())
            keep.append(cand[evenly_spaced(cand.numel(), k, cand.device)] + t * n)
        return selection(torch.cat(keep))


@register("frames")
@dataclass
class Frames(Policy):
    """Keep ``keep_count(retain, T)`` whole frames, evenly spaced in time (what uniform frame sampling does)."""

    def compress(self, tokens: TokenSet) -> Compression:
        t, n = tokens.num_frames, tokens.tokens_per_frame
        frames = evenly_spaced(t, keep_count(self.retain, t), tokens.features.device)
        keep = (frames[:, None] * n + torch.arange(n, device=frames.device)).reshape(-1)
        if tokens.available is not None:
            keep = keep[tokens.available.reshape(-1)[keep]]
        return selection(keep, info={"frames": frames.tolist()})


def _bins(size: int, out: int) -> list[tuple[int, int]]:
    """Partition ``range(size)`` into ``out`` contiguous, non-empty, near-equal bins."""
    edges = [(i * size) // out for i in range(out + 1)]
    return list(zip(edges[:-1], edges[1:]))


@register("pool")
@dataclass
class Pool(Policy):
    """Average-pool each frame's ``h x w`` grid to about ``retain * h * w`` cells.

    The output grid ``(oh, ow)`` keeps the frame's aspect ratio: with ``s = sqrt(1 / retain)``,
    ``oh = clamp(round(h / s), 1, h)`` and likewise ``ow``, so the achieved count is ``T * oh * ow``
    (reported per row in the record). Each pooled token is the mean of its bin and takes the
    position of the bin's centre token (upper-left of the two middles on even sides).
    """

    accepts_partial = False

    def output_grid(self, h: int, w: int) -> tuple[int, int]:
        s = (1.0 / self.retain) ** 0.5
        oh = min(h, max(1, int(h / s + 0.5)))
        ow = min(w, max(1, int(w / s + 0.5)))
        return oh, ow

    def compress(self, tokens: TokenSet) -> Compression:
        tokens.require_full(self.name)
        t, h, w = tokens.grid
        oh, ow = self.output_grid(h, w)
        cell = torch.full((h, w), -1, dtype=torch.long)
        centres = []
        for i, (y0, y1) in enumerate(_bins(h, oh)):
            for j, (x0, x1) in enumerate(_bins(w, ow)):
                cell[y0:y1, x0:x1] = i * ow + j
                centres.append(((y0 + y1 - 1) // 2) * w + (x0 + x1 - 1) // 2)
        device = tokens.features.device
        cell = cell.reshape(-1).to(device)
        centres_t = torch.tensor(centres, dtype=torch.long, device=device)
        n_cells = oh * ow
        # Mean of each cell, all frames at once: scatter-add then divide by the cell sizes.
        feats = tokens.features.float()
        sums = torch.zeros(t, n_cells, tokens.dim, dtype=feats.dtype, device=device)
        sums.index_add_(1, cell, feats)
        sizes = torch.bincount(cell, minlength=n_cells).to(feats.dtype)
        values = (sums / sizes[None, :, None]).to(tokens.features.dtype)
        # Output slot order = sorted flat positions. Centres are increasing in (i, j), so slot = t * n_cells + cell.
        keep = (torch.arange(t, device=device)[:, None] * (h * w) + centres_t[None, :]).reshape(-1)
        assign = (torch.arange(t, device=device)[:, None] * n_cells + cell[None, :]).reshape(-1)
        return Compression(keep=keep, values=values.reshape(-1, tokens.dim), assign=assign, info={"grid_out": (oh, ow)})


@register("random")
@dataclass
class RandomKeep(Policy):
    """Keep a uniformly random subset of ``keep_count(retain, N)`` tokens, from a generator seeded by ``seed``.

    Every call with the same seed and token count draws the same subset, so the rows of one sample in
    beam search stay identical.
    """

    seed: int = 0

    def compress(self, tokens: TokenSet) -> Compression:
        cand = tokens.available_index()
        k = keep_count(self.retain, cand.numel())
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        pick = torch.randperm(cand.numel(), generator=gen)[:k].to(cand.device)
        return selection(cand[pick])
