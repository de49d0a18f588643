"""STTM: quadtree merging of each frame, then merging of nested nodes across consecutive frames.

Paper: Hyun et al., "Multi-Granular Spatio-Temporal Token Merging for Training-Free Acceleration of
Video LLMs", ICCV 2025. Reference: ``HYUNJS/STTM`` @ ``00736c795265faea52c576ce32dce9c449af1819``,
``token_merging_utils/quadtree_builder.py::{quadtree_build_video, quadtree_build_iteration_video}``,
``quadtree_spatial_merger.py::{avgpool_to_even_side_feature, pool_to_even_side_index_video}``,
``quadtree_temporal_merger.py::{get_cross_frame_node_pairs_fast, filter_cross_frame_node_pairs,
get_merge_dst_idx_safe, agg_feature_and_metadata}``, called from
``token_merging_monkey_patch/quadtree_attn_monkey_patch.py::Qwen2Model_forward``.

Algorithm, on the ``(T, h, w, D)`` video tokens:

1. pyramid: sizes halve (ceil) from ``(h, w)`` until a side is 2; levels are 2x2 means of the finer
   level (odd sides: the first row / column pooled in pairs, an odd-by-odd corner copied), built up to
   the root level ``sa_tree_root_level`` (an index into the sizes, coarsest first);
2. per frame, from every root node down: a node whose cosine with each of its 4 child slots is
   ``>= sa_tree_thresh`` is emitted whole, else its valid children are examined; level-0 nodes are
   always emitted. At odd borders the unused child slots point at the child level's cell (0, 0), and
   the reference compares with it too; this is reproduced;
3. temporal (``sa_tree_temporal_thresh > 0``): nodes of frames ``t`` and ``t + 1`` whose boxes nest
   are merged when their cosine (``x / (|x| + 1e-8)``) is ``>= sa_tree_temporal_thresh``; groups follow
   the reference's vectorised union-find, which stops once every node points at a fixed point (not
   always the connected components of the merged pairs); a group's value is the plain mean of its
   nodes and it takes the box of its earliest node.

Where it acts. ``start_layer`` (``sa_start_layer_idx``) is the decoder layer whose input hidden
states are merged: 0 merges the language model's input embeddings (the reference's setting for 72B
models), ``K > 0`` (2 for the reference's 7B models) merges, at prefill, the hidden states entering
layer ``K`` (:class:`STTMLayer`, an in-layer stage): layers ``< K`` run on, and cache, the full
sequence; layers ``>= K`` run on, and cache, the merged one, as in the reference.

Positions. Each output token sits at the place of the top-left patch of its box (the reference's
``merged_token_1d_idx``); ``assign`` maps every patch to the output token its node was merged into.
``positions="kept"`` (default): each output token keeps that patch's original position id.
``positions="compacted"`` (the reference, 1-D position families): the sequence from the merge on is
renumbered consecutively (``position_ids[:, :M]``). At ``start_layer=0`` every layer sees ``0..M-1``
and decoding continues at ``M``; at ``K > 0`` layers ``< K`` keep ``0..L-1``, layers ``>= K`` see
``0..M-1`` (cos/sin recomputed with the language model's rotary module) and a decoded token at
logical position ``L + s`` takes ``M + s`` in layers ``>= K`` and ``L + s`` in layers ``< K``, so both
halves stay contiguous. (The reference takes every decode position from its generate loop, which
does not know about the merge.) M-RoPE families: ``compacted`` is refused at ``K > 0``; at
``start_layer=0`` they keep the original ids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..budget import fit_threshold
from ..errors import UnsupportedUsageError
from ..policy import LayerPolicy, Policy, check_positions, check_retain, keep_count
from ..registry import register
from ..tokens import Compression, LayerTokens, TokenSet, selection


def pyramid_sizes(h: int, w: int) -> list[tuple[int, int]]:
    """Grid sizes from coarsest to finest: halve with ceil until a side is 2 (or cannot shrink)."""
    sizes = [(h, w)]
    while h != 2 and w != 2 and (h > 2 or w > 2):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
        sizes.insert(0, (h, w))
    return sizes


def pool_level(x: Tensor) -> Tensor:
    """One pyramid step on ``(T, H, W, C)``: 2x2 means, odd first row/column pooled in pairs."""
    t, hh, ww, c = x.shape
    nh, nw = math.ceil(hh / 2), math.ceil(ww / 2)
    odd_h, odd_w = hh % 2, ww % 2
    out = torch.empty(t, nh, nw, c, dtype=x.dtype, device=x.device)

    def quad(block: Tensor) -> Tensor:  # (T, 2a, 2b, C) -> (T, a, b, C)
        a, b = block.shape[1] // 2, block.shape[2] // 2
        return block.reshape(t, a, 2, b, 2, c).mean(dim=(2, 4))

    if odd_h and odd_w:
        out[:, 0, 0] = x[:, 0, 0]
        out[:, 0, 1:] = x[:, 0, 1:].reshape(t, nw - 1, 2, c).mean(2)
        out[:, 1:, 0] = x[:, 1:, 0].reshape(t, nh - 1, 2, c).mean(2)
        out[:, 1:, 1:] = quad(x[:, 1:, 1:])
    elif odd_h:
        out[:, 0] = x[:, 0].reshape(t, nw, 2, c).mean(2)
        out[:, 1:] = quad(x[:, 1:])
    elif odd_w:
        out[:, :, 0] = x[:, :, 0].reshape(t, nh, 2, c).mean(2)
        out[:, :, 1:] = quad(x[:, :, 1:])
    else:
        out = quad(x)
    return out


def child_slots(hh: int, ww: int) -> tuple[Tensor, Tensor]:
    """For the level above an ``hh x ww`` grid: each cell's 4 child slots.

    Returns ``coords`` ``(nh, nw, 4, 2)`` int64 (y, x) in the child grid, ``(0, 0)`` for unused slots
    (as in the reference), and ``valid`` ``(nh, nw, 4)`` bool. Slots are ordered top-left, top-right,
    bottom-left, bottom-right.
    """
    nh, nw = math.ceil(hh / 2), math.ceil(ww / 2)
    coords = torch.zeros(nh, nw, 4, 2, dtype=torch.long)
    valid = torch.zeros(nh, nw, 4, dtype=torch.bool)
    odd_h, odd_w = hh % 2, ww % 2
    for i in range(nh):
        # rows covered by parent row i: odd height -> row 0 alone, then pairs starting at 1
        rows = [0] if (odd_h and i == 0) else ([2 * i - 1, 2 * i] if odd_h else [2 * i, 2 * i + 1])
        for j in range(nw):
            cols = [0] if (odd_w and j == 0) else ([2 * j - 1, 2 * j] if odd_w else [2 * j, 2 * j + 1])
            for a, y in enumerate(rows):
                for b, x in enumerate(cols):
                    slot = 2 * a + b
                    coords[i, j, slot] = torch.tensor([y, x])
                    valid[i, j, slot] = True
    return coords, valid


@dataclass
class Quadtree:
    """Spatial quadtree nodes of a video, in raster order of their top-left patch (frame-major).

    Attributes:
        features: ``(Nn, D)`` float32 node values.
        tlbr: ``(Nn, 5)`` int64 ``[t, y0, x0, y1, x1]`` boxes on the patch grid (exclusive ends).
        patch_node: ``(T, h, w)`` int64 node holding each patch.
    """

    features: Tensor
    tlbr: Tensor
    patch_node: Tensor


@dataclass
class Pyramid:
    """Everything of the quadtree that does not depend on the threshold.

    Attributes:
        levels: per level, root first, ``(T, H_l, W_l, D)`` float32 values.
        boxes: per level ``(H_l, W_l, 4)`` int64 ``[y0, x0, y1, x1]`` on the patch grid (CPU).
        anc: per level ``(h, w)`` int64 cell (``y * W_l + x``) holding each patch (CPU).
        slots: per level but the last, the child slots ``(coords, valid)`` of :func:`child_slots`.
        child_min: per level but the last, ``(T, H_l, W_l)`` float32 smallest cosine of a cell with its
            4 child slots (unused slots included, as in the reference): the cell stops splitting iff
            it is ``>=`` the threshold.
    """

    levels: list[Tensor]
    boxes: list[Tensor]
    anc: list[Tensor]
    slots: list[tuple[Tensor, Tensor]]
    child_min: list[Tensor]


def build_pyramid(x: Tensor, root_level: int) -> Pyramid:
    """Step 1 on ``(T, h, w, D)`` float32 features, with every parent-child similarity."""
    t, h, w, d = x.shape
    device = x.device
    sizes = pyramid_sizes(h, w)
    root = min(root_level, len(sizes) - 1)
    levels = [x]  # finest first while building
    while tuple(levels[-1].shape[1:3]) != sizes[root]:
        levels.append(pool_level(levels[-1]))
    levels.reverse()  # levels[0] = root, levels[-1] = patches
    n_level = len(levels)
    boxes: list[Tensor] = [torch.empty(0)] * n_level
    anc: list[Tensor] = [torch.empty(0)] * n_level
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    boxes[-1] = torch.stack([yy, xx, yy + 1, xx + 1], -1)
    anc[-1] = yy * w + xx
    slots: list[tuple[Tensor, Tensor]] = [(torch.empty(0), torch.empty(0))] * (n_level - 1)
    child_min: list[Tensor] = [torch.empty(0)] * (n_level - 1)
    for lvl in range(n_level - 2, -1, -1):
        ch, cw = levels[lvl + 1].shape[1:3]
        coords, valid = child_slots(ch, cw)
        slots[lvl] = (coords, valid)
        child_box = boxes[lvl + 1][coords[..., 0], coords[..., 1]]  # (nh, nw, 4, 4)
        big = torch.iinfo(torch.long).max
        lo = torch.where(valid[..., None], child_box[..., :2], big).amin(2)
        hi = torch.where(valid[..., None], child_box[..., 2:], -1).amax(2)
        boxes[lvl] = torch.cat([lo, hi], -1)
        nh, nw = coords.shape[:2]
        parent = torch.empty(ch * cw, dtype=torch.long)
        cell = (torch.arange(nh)[:, None] * nw + torch.arange(nw)[None, :])[..., None].expand(nh, nw, 4)
        parent[(coords[..., 0] * cw + coords[..., 1])[valid]] = cell[valid]
        anc[lvl] = parent[anc[lvl + 1]]
        child = levels[lvl + 1][:, coords[..., 0].to(device), coords[..., 1].to(device)]  # (T, nh, nw, 4, D)
        child_min[lvl] = F.cosine_similarity(levels[lvl][:, :, :, None], child, dim=-1).amin(-1)
    return Pyramid(levels, boxes, anc, slots, child_min)


def descend(pyr: Pyramid, tree_thresh: float) -> Quadtree:
    """Step 2: the emitted nodes of every frame for ``tree_thresh``, in raster order of their top-left patch."""
    levels = pyr.levels
    t, h, w, _ = levels[-1].shape
    device = levels[0].device
    n_level = len(levels)
    tlbr_out, level_out, cell_out = [], [], []
    gt, gy, gx = torch.meshgrid(
        torch.arange(t), torch.arange(levels[0].shape[1]), torch.arange(levels[0].shape[2]), indexing="ij"
    )
    nt, ny, nx = gt.reshape(-1), gy.reshape(-1), gx.reshape(-1)
    stops = [(m >= tree_thresh).cpu() for m in pyr.child_min]
    for lvl in range(n_level):
        stop = torch.ones(nt.numel(), dtype=torch.bool) if lvl == n_level - 1 else stops[lvl][nt, ny, nx]
        tlbr_out.append(torch.cat([nt[stop, None], pyr.boxes[lvl][ny[stop], nx[stop]]], -1))
        level_out.append(torch.full((int(stop.sum()),), lvl, dtype=torch.long))
        cell_out.append(ny[stop] * levels[lvl].shape[2] + nx[stop])
        if lvl < n_level - 1:
            coords, valid = pyr.slots[lvl]
            split = ~stop
            sub = valid[ny[split], nx[split]]  # (S, 4)
            nt = nt[split][:, None].expand(-1, 4)[sub]
            ny, nx = coords[ny[split], nx[split], :, 0][sub], coords[ny[split], nx[split], :, 1][sub]
    tlbr = torch.cat(tlbr_out)
    order = torch.argsort(tlbr[:, 0] * (h * w) + tlbr[:, 1] * w + tlbr[:, 2])
    tlbr = tlbr[order]
    level, cell = torch.cat(level_out)[order], torch.cat(cell_out)[order]
    features = torch.empty(tlbr.shape[0], levels[0].shape[-1], dtype=levels[0].dtype, device=device)
    patch_node = torch.full((t, h, w), -1, dtype=torch.long)
    for lvl in range(n_level):
        at = level == lvl
        if not bool(at.any()):
            continue
        lh, lw = levels[lvl].shape[1:3]
        features[at.to(device)] = levels[lvl].reshape(t, lh * lw, -1)[tlbr[at, 0].to(device), cell[at].to(device)]
        table = torch.full((t, lh * lw), -1, dtype=torch.long)
        table[tlbr[at, 0], cell[at]] = torch.nonzero(at).squeeze(1)
        patch_node = torch.maximum(patch_node, table[:, pyr.anc[lvl]])
    return Quadtree(features, tlbr.to(device), patch_node.to(device))


def build_quadtree(x: Tensor, tree_thresh: float, root_level: int) -> Quadtree:
    """Steps 1-2 on ``(T, h, w, D)`` float32 features."""
    return descend(build_pyramid(x, root_level), tree_thresh)


def nested_pairs(tlbr: Tensor) -> Tensor:
    """``(L, 2)`` int64 (node of frame t, node of frame t+1) pairs whose boxes nest (either way)."""
    t_of = tlbr[:, 0].contiguous()
    frames = torch.unique_consecutive(t_of)
    pairs = []
    starts = torch.searchsorted(t_of, frames)
    ends = torch.searchsorted(t_of, frames, right=True)
    for i in range(frames.numel() - 1):
        a = torch.arange(int(starts[i]), int(ends[i]), device=tlbr.device)
        b = torch.arange(int(starts[i + 1]), int(ends[i + 1]), device=tlbr.device)
        ba, bb = tlbr[a, 1:][:, None], tlbr[b, 1:][None]
        a_in_b = (ba[..., :2] >= bb[..., :2]).all(-1) & (ba[..., 2:] <= bb[..., 2:]).all(-1)
        b_in_a = (ba[..., :2] <= bb[..., :2]).all(-1) & (ba[..., 2:] >= bb[..., 2:]).all(-1)
        ia, ib = torch.nonzero(a_in_b | b_in_a, as_tuple=True)
        pairs.append(torch.stack([a[ia], b[ib]], 1))
    if not pairs:
        return torch.zeros(0, 2, dtype=torch.long, device=tlbr.device)
    return torch.cat(pairs)


def representatives(pairs: Tensor, n: int) -> Tensor:
    """The reference's vectorised union-find (``get_merge_dst_idx_safe``) over merged ``(dst, src)`` pairs.

    Repeats ``m = min(rep[dst], rep[src])``; scatter-min ``m`` into ``rep`` at ``dst`` then ``src``;
    ``rep = rep[rep]``, until ``rep == rep[rep]``. Returns ``(n,)`` int64.
    """
    rep = torch.arange(n, device=pairs.device)
    if pairs.numel() == 0:
        return rep
    dst, src = pairs[:, 0], pairs[:, 1]
    while True:
        m = torch.minimum(rep[dst], rep[src])
        rep = rep.scatter_reduce(0, dst, m, "amin").scatter_reduce(0, src, m, "amin")
        rep = rep[rep]
        if torch.equal(rep, rep[rep]):
            return rep


@dataclass
class STTMResult:
    """STTM's output for one video.

    Attributes:
        tokens: ``(M, D)`` float32 merged tokens in the reference's order.
        keep: ``(M,)`` int64 flat index ``t*h*w + y0*w + x0`` of each output's top-left patch, ascending.
        tlbr: ``(M, 5)`` int64 box of each output (its group's earliest node).
        num_patch: ``(M,)`` int64 patches covered by each group.
        node_tlbr: ``(Nn, 5)`` int64 spatial nodes before temporal merging.
        node_rep: ``(Nn,)`` int64 representative node of each node's temporal group.
        assign: ``(T*h*w,)`` int64 output token of each patch.
    """

    tokens: Tensor
    keep: Tensor
    tlbr: Tensor
    num_patch: Tensor
    node_tlbr: Tensor
    node_rep: Tensor
    assign: Tensor


def sttm(
    features: Tensor,
    tree_thresh: float,
    temporal_thresh: float | None,
    root_level: int = 1,
    count_only: bool = False,
    pyramid: Pyramid | None = None,
) -> STTMResult | int:
    """STTM on ``(T, h, w, D)`` features (computed in float32).

    ``temporal_thresh=None`` skips the temporal step (the reference does so for thresholds ``<= 0``).
    ``pyramid`` reuses :func:`build_pyramid`'s result for these features and ``root_level``.
    """
    t, h, w, d = features.shape
    tree = descend(pyramid if pyramid is not None else build_pyramid(features.float(), root_level), tree_thresh)
    n_node = tree.tlbr.shape[0]
    if temporal_thresh is None:
        rep = torch.arange(n_node, device=tree.features.device)
    else:
        pairs = nested_pairs(tree.tlbr)
        x = tree.features
        xn = x / (x.norm(dim=-1, keepdim=True) + 1e-8)
        sim = (xn[pairs[:, 0]] * xn[pairs[:, 1]]).sum(-1)
        rep = representatives(pairs[sim >= temporal_thresh], n_node)
    survivor = rep == torch.arange(n_node, device=rep.device)
    if count_only:
        return int(survivor.sum())
    counts = torch.bincount(rep, minlength=n_node)
    sums = torch.zeros_like(tree.features).index_add_(0, rep, tree.features)
    area = (tree.tlbr[:, 3] - tree.tlbr[:, 1]) * (tree.tlbr[:, 4] - tree.tlbr[:, 2])
    patches = torch.zeros(n_node, dtype=torch.long, device=rep.device).index_add_(0, rep, area)
    slot = torch.cumsum(survivor.long(), 0) - 1
    tlbr = tree.tlbr[survivor]
    return STTMResult(
        tokens=sums[survivor] / counts[survivor, None].to(sums.dtype),
        keep=tlbr[:, 0] * (h * w) + tlbr[:, 1] * w + tlbr[:, 2],
        tlbr=tlbr,
        num_patch=patches[survivor],
        node_tlbr=tree.tlbr,
        node_rep=rep,
        assign=slot[rep[tree.patch_node.reshape(-1)]],
    )


#: LLaVA-OneVision-7B, VideoMME, 50% budget in the reference's scripts.
DEFAULT_TREE_THRESH = 0.85
DEFAULT_TEMPORAL_THRESH = 0.65


@register("sttm")
@dataclass
class STTM(Policy):
    """STTM (spatial quadtree + temporal node merging), a merging policy.

    Args:
        retain: ``None`` (default) lets the thresholds decide how many tokens remain, as the
            reference does. A fraction instead shifts both thresholds by one offset, found by
            bisection per video, to the largest output count at most ``keep_count(retain, N)``
            (at least the root nodes of one frame remain); ``retain=1.0`` keeps every token unmerged.
        sa_tree_thresh: spatial threshold (default 0.85, the reference's LLaVA-OneVision setting at 50%).
        sa_tree_temporal_thresh: temporal threshold (default 0.65); ``<= 0`` disables temporal merging.
        sa_tree_root_level: pyramid level where the trees start (index into the sizes, coarsest
            first; 1 in the reference's scripts); clamped to the finest level for small grids.
        start_layer: ``sa_start_layer_idx``, the decoder layer whose input is merged: 0 (default:
            the input embeddings) or ``K >= 1`` (the reference's 2 for 7B models: the hidden states
            entering layer ``K`` at prefill; must be below the model's depth, and past Qwen3-VL's
            deepstack layers).
        positions: ``"kept"`` (default: survivors keep their original position ids) or ``"compacted"``
            (renumbered consecutively, as the reference does; 1-D positions only, see the module notes).

    The reference assumes square frames; any ``h x w`` grid works here (Qwen-VL temporal grids count
    as frames). Needs the full grid, so it must come first in a chain (at ``K > 0`` no input stage
    may drop tokens before it).
    """

    retain: float | None = None  # type: ignore[assignment]
    sa_tree_thresh: float = DEFAULT_TREE_THRESH
    sa_tree_temporal_thresh: float = DEFAULT_TEMPORAL_THRESH
    sa_tree_root_level: int = 1
    start_layer: int = 0
    positions: str = "kept"

    accepts_partial: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_positions(self.positions)
        if self.retain is not None:
            self.retain = check_retain(self.retain)
        for name in ("sa_tree_thresh", "sa_tree_temporal_thresh"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite cosine threshold (a float); got {value!r}")
        if isinstance(self.sa_tree_root_level, bool) or not isinstance(self.sa_tree_root_level, int) or self.sa_tree_root_level < 0:
            raise ValueError(f"sa_tree_root_level must be an int >= 0; got {self.sa_tree_root_level!r}")
        if isinstance(self.start_layer, bool) or not isinstance(self.start_layer, int) or self.start_layer < 0:
            raise ValueError(f"start_layer must be an int >= 0 (a decoder layer index); got {self.start_layer!r}")

    @property
    def label(self) -> str:
        if self.retain is not None:
            text = f"retain={self.retain:g}"
        else:
            text = f"tree={self.sa_tree_thresh:g}, temporal={self.sa_tree_temporal_thresh:g}"
        if self.start_layer > 0:
            text += f", layer={self.start_layer}"
        return f"{self.name}({text})"

    def stages(self) -> list[Policy]:
        """Itself at ``start_layer=0``; else the in-layer stage that merges at the input of that layer."""
        return [self] if self.start_layer == 0 else [STTMLayer(self)]

    def compress(self, tokens: TokenSet) -> Compression:
        """The merge of a video's input tokens (also what the in-layer stage applies to hidden states)."""
        tokens.require_full(self.name)
        if self.retain == 1.0:
            return selection(tokens.available_index(), info={"offset": None})
        res, offset = self.merge(tokens.grid_features())
        info = {"offset": offset, "nodes": int(res.node_tlbr.shape[0]), "tlbr": res.tlbr}
        return Compression(
            keep=res.keep, values=res.tokens.to(tokens.features.dtype), assign=res.assign, info=info
        )

    def merge(self, feats: Tensor) -> tuple[STTMResult, float]:
        """STTM on one video's ``(T, h, w, D)`` features; with ``retain``, the threshold offset found for it too."""
        t, h, w, _ = feats.shape
        tree_t = float(self.sa_tree_thresh)
        temporal = float(self.sa_tree_temporal_thresh) if self.sa_tree_temporal_thresh > 0 else None
        offset = 0.0
        if self.retain is not None:
            budget = keep_count(self.retain, t * h * w)
            lowest = tree_t if temporal is None else min(tree_t, temporal)

            pyramid = build_pyramid(feats.float(), self.sa_tree_root_level)

            def count(delta: float) -> int:
                temporal_d = None if temporal is None else temporal + delta
                return sttm(feats, tree_t + delta, temporal_d, self.sa_tree_root_level, True, pyramid)

            offset = fit_threshold(count, budget, -1.01 - max(tree_t, temporal or tree_t), 1.01 - lowest, steps=14)
        res = sttm(feats, tree_t + offset, None if temporal is None else temporal + offset, self.sa_tree_root_level)
        assert isinstance(res, STTMResult)
        return res, offset


@dataclass
class STTMLayer(LayerPolicy):
    """The in-layer stage ``STTM(start_layer=K)`` (``K > 0``) runs as: STTM on the hidden states entering layer ``K``.

    Each video of the row is merged on its own with :meth:`STTM.merge`, exactly as at the input; each
    merged token replaces the hidden state at its top-left patch and the other patches leave the
    sequence. No attention is read. A row's tokens stay unchanged (bit-identical) when nothing merges.

    Args:
        settings: the :class:`STTM` policy whose thresholds, ``start_layer`` and ``positions`` apply.
    """

    settings: STTM = field(default_factory=STTM)
    retain: float | None = field(init=False, default=None)  # type: ignore[assignment]

    name: ClassVar[str] = "sttm"
    queries: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        if not isinstance(self.settings, STTM):
            raise TypeError(f"settings must be an STTM policy; got {type(self.settings).__name__}")
        self.retain = self.settings.retain

    @property
    def positions(self) -> str:
        return self.settings.positions

    @property
    def label(self) -> str:
        return self.settings.label

    def resolve_layer(self, depth: int) -> int:
        return self.settings.start_layer

    def layer_explicit(self) -> bool:
        return True

    def select(self, tokens: LayerTokens) -> Compression:
        n, device = tokens.num_tokens, tokens.hidden.device
        everything = torch.arange(n, device=device)
        if self.settings.retain == 1.0 or n == 0:
            return selection(everything)
        if tokens.cell is None or tokens.grids is None:
            raise UnsupportedUsageError(f"{self.label} needs each token's place in its frame grid (LayerTokens.cell, grids)")
        parts: list[tuple[Tensor, STTMResult]] = []
        offsets: list[float] = []
        for v in torch.unique(tokens.video).tolist():
            t, h, w = tokens.grids[v]
            members = (tokens.video == v).nonzero().squeeze(1)
            order = members[torch.argsort(tokens.cell[members])]  # grid (raster) order
            if order.numel() != t * h * w or not torch.equal(tokens.cell[order], torch.arange(t * h * w, device=device)):
                raise UnsupportedUsageError(
                    f"{self.label} merges whole frame grids at layer {tokens.layer}, but video {v} of this row reached it "
                    f"with {members.numel()} of its {t * h * w} tokens; no stage before it may drop tokens (put sttm first)"
                )
            res, offset = self.settings.merge(tokens.hidden[order].reshape(t, h, w, -1))
            parts.append((order, res))
            offsets.append(offset)
        keep = torch.cat([order[res.keep] for order, res in parts])
        info = {"offset": offsets, "nodes": [int(res.node_tlbr.shape[0]) for _, res in parts]}
        if keep.numel() == n:  # every node is one patch: nothing merged
            return selection(everything, info=info)
        keep, perm = torch.sort(keep)
        values = torch.cat([res.tokens for _, res in parts])[perm].to(tokens.hidden.dtype)
        slot = torch.full((n,), -1, dtype=torch.long, device=device)
        slot[keep] = torch.arange(keep.numel(), device=device)
        assign = torch.full((n,), -1, dtype=torch.long, device=device)
        for order, res in parts:
            assign[order] = slot[order[res.keep]][res.assign]
        info["tlbr"] = [res.tlbr for _, res in parts]
        return Compression(keep=keep, values=values, assign=assign, info=info)


__all__ = ["STTM", "STTMLayer", "build_pyramid", "build_quadtree", "descend", "nested_pairs", "pyramid_sizes", "representatives", "sttm"]
