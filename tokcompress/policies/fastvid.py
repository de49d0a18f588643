"""FastVID: dynamic temporal segmentation (DySeg) + density-based spatio-temporal pruning (STPrune).

Shen et al., "FastVID: Dynamic Density Pruning for Fast Video Large Language Models", NeurIPS 2025.
Reference: LunarShen/FastVID @ a40a109cb8df20e8c2c17c6850f8269717369990, which ships three
implementations, all reproduced here and chosen by ``preset``:

* ``"llava_onevision"``: ``fastvid_llavaonevision/.../modeling_qwen2.py::Qwen2Model.forward`` (the
  "parallelized" version of the paper's efficiency section);
* ``"llava_video"``: ``fastvid_llavavideo/.../modeling_qwen2.py::Qwen2Model.forward`` (per-segment loop);
* ``"qwen2_5_vl"``: ``fastvid_qwen25vl/.../modeling_qwen2_5_vl.py::Qwen2_5_VLForConditionalGeneration.forward``.

Algorithm on ``F`` ``(T, n, D)`` (projector output; Qwen-VL: one row per temporal patch), a global
feature per frame ``g`` ``(T, Dg)`` and a per-frame attention ``a`` ``(T, n)``:

1. DySeg: ``s[t] = cos(g[t], g[t+1])``; cut after the ``DySeg_c - 1`` least similar transitions and
   after every transition with ``s[t] < DySeg_tau``.
2. Per frame ``fr = int(n * retain)`` tokens: ``n_sal`` salient ones by attention top-k (kept raw) and
   ``n_ctx`` contextual ones (``STPrune_d`` of the budget), placed on "anchor" frames (every
   ``DTM_p``-th frame counted back from the segment's end) as DPC-kNN centres (``k = 4``) of the
   anchor's non-salient tokens, into which the segment's non-salient tokens are merged by cosine
   similarity: ``centre <- w * centre + (1 - w) * mean(sources)``, ``w = max(1 / (count + 1), DTM_beta)``.
   The three versions differ in how budgets are spread and what is merged; see the helpers below.

Survivors keep their original positions (as in the reference). ``Compression.assign`` maps each
merged token to one output slot: for a token merged into several anchors of its segment (the
reference feeds every anchor independently), the earliest anchor's.

Where the reference raises, tokcompress uses a defined fallback (documented at each field): fewer
frames than ``DySeg_c`` (every transition is cut), budgets larger than the tokens available (capped),
fewer than 4 tokens for the density (``k`` = available tokens), ``int(n * retain) == 0`` (one token per
frame).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from ..cluster import cluster_sums, dpc_density, dpc_parent_distance, top_scores
from ..policy import Policy
from ..registry import register
from ..tokens import Compression, TokenSet
from .signals import feature_saliency, frame_mean, warn_once

PRESETS = ("auto", "llava_onevision", "llava_video", "qwen2_5_vl")
#: TokenSet.layout values that "auto" maps to the Qwen2.5-VL version.
QWEN_LAYOUTS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
#: Reference defaults per preset (scripts/eval.sh of each version).
DEFAULT_TAU = {"llava_onevision": 0.9, "llava_video": 0.9, "qwen2_5_vl": 0.84}
DPC_K = 4


# ---------------------------------------------------------------------------------------------
# DySeg
# ---------------------------------------------------------------------------------------------
def dyseg(frame_global: Tensor, c: int, tau: float) -> list[tuple[int, int]]:
    """Segments ``[(first, last), ...]`` (inclusive) of ``T`` frames from their global features ``(T, Dg)``.

    With ``c - 1 > T - 1`` (fewer transitions than requested cuts; the reference's ``topk`` raises)
    every transition is cut.
    """
    t = frame_global.shape[0]
    if t <= 1:
        return [(0, max(t - 1, 0))]
    g = frame_global.float()
    g = g / g.norm(dim=1, keepdim=True)
    sim = (g[:-1] * g[1:]).sum(dim=1)
    lowest = torch.topk(sim, min(c - 1, t - 1), largest=False).indices
    cuts = torch.unique(torch.cat([lowest, torch.nonzero(sim < tau).squeeze(1)])).tolist()
    bounds = [-1] + sorted(cuts) + [t - 1]  # cuts are transitions 0..T-2
    return [(a + 1, b) for a, b in zip(bounds[:-1], bounds[1:])]


# ---------------------------------------------------------------------------------------------
# shared pieces
# ---------------------------------------------------------------------------------------------
def _density_scores(x: Tensor) -> Tensor:
    """DPC-kNN score of each token of each frame, ``(B, m, D) -> (B, m)``, k = min(4, m)."""
    k = min(DPC_K, x.shape[1])
    density, dist_max, dist = dpc_density(x, k)
    return dpc_parent_distance(x, density, dist_max, dist) * density


def _float64_stack(rows: list[Tensor], scratch: Tensor | None = None) -> Tensor:
    """``torch.stack(rows).double()`` written straight into one float64 tensor, one row set at a time.

    The DPC distances are computed in float64 (see :func:`~tokcompress.cluster.scaled_cdist`);
    building that copy directly skips a full-size float32 stack (large fresh buffers cost more in
    page faults than the copying itself). ``scratch``: a flat float64 buffer to write into (reused
    across calls), large enough for the result.
    """
    shape = (len(rows), *rows[0].shape)
    if scratch is None:
        out = rows[0].new_empty(shape, dtype=torch.float64)
    else:
        out = scratch[: math.prod(shape)].view(shape)
    for dst, src in zip(out, rows):
        dst.copy_(src)
    return out


def _merge(centres: Tensor, sources: Tensor, label: Tensor, beta: float, k: int, weight: Tensor | None = None) -> Tensor:
    """``w * centre + (1 - w) * mean(sources)`` with ``w = max(1 / (count + 1), beta)`` (FastVID's DTM).

    ``centres`` ``(..., k, D)``, ``sources`` ``(..., S, D)``, ``label`` ``(..., S)`` in ``[0, k)``;
    leading dims are a batch; ``weight`` ``(..., S)`` 0/1 excludes sources.
    """
    sums, count = cluster_sums(sources, label, k, weight)
    count = count[..., None]
    w = (1 / (count + 1)).clamp(min=beta)
    return w * centres + (1 - w) * (sums / count.clamp(min=1))


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True)


@dataclass
class _Out:
    """Collects kept tokens: flat index, value, and the source -> output map."""

    total: int
    device: torch.device
    index: list[Tensor] = field(default_factory=list)
    values: list[Tensor] = field(default_factory=list)
    # (source flat indices, kept flat index of the token they went into); first writer wins
    links: list[tuple[Tensor, Tensor]] = field(default_factory=list)

    def add(self, index: Tensor, values: Tensor) -> None:
        self.index.append(index)
        self.values.append(values)
        self.links.append((index, index))

    def link(self, sources: Tensor, targets: Tensor) -> None:
        self.links.append((sources, targets))

    def compression(self, dtype: torch.dtype, info: dict) -> Compression:
        index = torch.cat(self.index)
        values = torch.cat(self.values)
        order = torch.argsort(index)
        keep = index[order]
        slot_of = torch.full((self.total,), -1, dtype=torch.long, device=self.device)
        slot_of[keep] = torch.arange(keep.numel(), device=self.device)
        assign = torch.full((self.total,), -1, dtype=torch.long, device=self.device)
        for sources, targets in reversed(self.links):  # earlier links overwrite later ones
            assign[sources] = slot_of[targets]
        assign[keep] = torch.arange(keep.numel(), device=self.device)  # a kept token is its own slot
        return Compression(keep=keep, values=values[order].to(dtype), assign=assign, info=info)


# ---------------------------------------------------------------------------------------------
# LLaVA-OneVision version (parallelized)
# ---------------------------------------------------------------------------------------------
def _onevision(feats: Tensor, attn: Tensor, segs: list[tuple[int, int]], p: "FastVID") -> _Out:
    t, n, dim = feats.shape
    device = feats.device
    fr = max(1, int(n * p.retain))
    n_sal = fr - int(fr * p.STPrune_d)
    n_ctx = fr - n_sal
    m = n - n_sal
    out = _Out(t * n, device)
    base = torch.arange(t, device=device)[:, None] * n

    x = feats.reshape(-1, dim)
    # Rows are copied with index_select on the flat tokens (a row gather; gather with an expanded
    # index is several times slower) and only where used, never all frames' non-salient tokens at once.
    sal = torch.topk(attn, n_sal, dim=1).indices  # (T, n_sal)
    sal_flat = (base + sal).reshape(-1)
    out.add(sal_flat, x.index_select(0, sal_flat))
    if n_ctx == 0 or m == 0:
        return out
    rest_mask = torch.ones(t, n, dtype=torch.bool, device=device).scatter_(1, sal, False)
    rest = rest_mask.nonzero()[:, 1].reshape(t, m)  # ascending per frame
    rest_flat = base + rest

    def rest_x(frames: Tensor | slice) -> Tensor:
        """The non-salient tokens of ``frames``, ``(F, m, D)``."""
        return x.index_select(0, rest_flat[frames].reshape(-1)).reshape(-1, m, dim)

    count = [0] * t  # contextual tokens per frame (anchor distribution)
    for s, e in segs:
        length = e - s + 1
        per_anchor = (n_ctx * length) // math.ceil(length / p.DTM_p)
        for f in range(s, e + 1):
            if (e - f) % p.DTM_p == 0:
                count[f] = min(per_anchor, m)  # capped: the reference raises when per_anchor > m
    scored = [f for f in range(t) if count[f] > 0]
    score = torch.zeros(t, m, device=device)
    if scored:
        idx = torch.tensor(scored, device=device)
        # only frames that take centres
        score[idx] = _density_scores(_float64_stack([x.index_select(0, rest_flat[f]) for f in scored]))

    # frames whose count equals n_ctx: centres from and merge within the own frame
    single = [f for f in range(t) if count[f] == n_ctx]
    if single:
        idx = torch.tensor(single, device=device)
        centres = top_scores(score[idx], n_ctx)  # (S, n_ctx), highest score first
        src = rest_x(idx)
        kept = rest_flat[idx].gather(1, centres)  # (S, n_ctx)
        target = x.index_select(0, kept.reshape(-1)).reshape(len(single), n_ctx, dim)
        # cosine argmax over centres: a source's own norm does not change it, so it is not divided out
        label = (src @ _unit(target).transpose(1, 2)).argmax(dim=2)
        out.add(kept.reshape(-1), _merge(target, src, label, p.DTM_beta, n_ctx).reshape(-1, dim))
        out.link(rest_flat[idx].reshape(-1), kept.gather(1, label).reshape(-1))
    # anchors of multi-frame segments: centres from the anchor, sources = the whole segment
    for s, e in segs:
        anchors = [f for f in range(s, e + 1) if count[f] > n_ctx]
        if not anchors:
            continue
        per_anchor = count[e]
        src = rest_x(slice(s, e + 1)).reshape(-1, dim)
        src_flat = rest_flat[s : e + 1].reshape(-1)
        idx = torch.tensor(anchors, device=device)
        centres = top_scores(score[idx], per_anchor)  # (A, per_anchor)
        kept = rest_flat[idx].gather(1, centres)
        target = x.index_select(0, kept.reshape(-1)).reshape(len(anchors), per_anchor, dim)
        label = (src[None] @ _unit(target).transpose(1, 2)).argmax(dim=2)  # (A, S), cosine argmax
        out.add(kept.reshape(-1), _merge(target, src[None], label, p.DTM_beta, per_anchor).reshape(-1, dim))
        for row in range(len(anchors)):
            out.link(src_flat, kept[row, label[row]])
    return out


# ---------------------------------------------------------------------------------------------
# LLaVA-Video and Qwen2.5-VL versions (per-segment budgets)
# ---------------------------------------------------------------------------------------------
def _spread(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` near-equal ints, the remainder +1 to the first ones."""
    q, r = divmod(total, parts)
    return [q + (1 if i < r else 0) for i in range(parts)]


def _anchor_counts(total: int, length: int, p: int) -> list[int]:
    """Contextual tokens of ``length`` units: ``ceil(length / p)`` anchors at ``(length-1-i) % p == 0``,
    the remainder +1 to the anchors closest to the end."""
    shares = _spread(total, (length + p - 1) // p)
    return [shares[(length - 1 - i) // p] if (length - 1 - i) % p == 0 else 0 for i in range(length)]


def _budget_video(length: int, n: int, p: "FastVID") -> tuple[list[int], list[int]]:
    fr = max(1, int(n * p.retain))
    seg_retain = fr * length
    seg_ctx = int(seg_retain * p.STPrune_d)
    seg_sal = seg_retain - seg_ctx
    if length == 1:
        return [seg_sal], [seg_ctx]
    return _spread(seg_sal, length), _anchor_counts(seg_ctx, length, p.DTM_p)


def _budget_qwen(length: int, n: int, p: "FastVID", unit_g: Tensor) -> tuple[list[int], list[int]]:
    fr = max(1, int(n * p.retain))
    seg_retain = fr * length
    seg_ctx = max(int(seg_retain * p.STPrune_d), 1)
    seg_sal = seg_retain - seg_ctx
    if length == 1:
        return [seg_sal], [seg_ctx]
    # sub-runs: cut where consecutive global features are less similar than DySeg_ignore
    sim = (unit_g[:-1] * unit_g[1:]).sum(dim=1)
    cuts = torch.nonzero(sim < p.resolved_ignore()).squeeze(1).tolist()
    bounds = [-1] + cuts + [length - 1]
    runs = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    sal_run = _spread(seg_sal, len(runs))
    ctx_run = [min(c, n // 2) for c in _anchor_counts(seg_ctx, len(runs), p.DTM_p)]
    sal, ctx = [], []
    for size, s_v, c_v in zip(runs, sal_run, ctx_run):  # budget goes to the last frame of each sub-run
        sal += [0] * (size - 1)
        ctx += [0] * (size - 1)
        ctx.append(c_v)
        sal.append(min(s_v, n - c_v) if c_v > 0 else min(s_v, n))
    return sal, ctx


def _per_segment(feats: Tensor, attn: Tensor, g: Tensor, segs: list[tuple[int, int]], p: "FastVID", qwen: bool) -> _Out:
    t, n, dim = feats.shape
    device = feats.device
    out = _Out(t * n, device)
    sal_n, ctx_n = [0] * t, [0] * t
    for s, e in segs:
        length = e - s + 1
        sal, ctx = _budget_qwen(length, n, p, g[s : e + 1]) if qwen else _budget_video(length, n, p)
        sal_n[s : e + 1], ctx_n[s : e + 1] = sal, ctx
    sal_t = torch.tensor(sal_n, device=device)
    ranks = torch.empty(t, n, dtype=torch.long, device=device)
    order = torch.sort(attn, dim=1, descending=True, stable=True).indices
    ranks.scatter_(1, order, torch.arange(n, device=device).expand(t, n).contiguous())
    salient = ranks < sal_t[:, None]  # (T, n): the top-sal_n[t] attention tokens of each frame
    flat = torch.arange(t * n, device=device).reshape(t, n)
    out.add(flat[salient], feats[salient])

    # contextual centres: DPC-kNN on each anchor's non-salient tokens, frames grouped by token count
    centres: dict[int, Tensor] = {}
    anchors = [f for f in range(t) if ctx_n[f] > 0]
    by_size: dict[int, list[int]] = {}
    for f in anchors:
        by_size.setdefault(n - sal_n[f], []).append(f)
    # one float64 buffer for every group's DPC input (fresh pages of a large buffer are costly)
    scratch = feats.new_empty(max((len(fr) * m * dim for m, fr in by_size.items()), default=0), dtype=torch.float64)
    for m, frames in by_size.items():
        if m == 0:
            continue
        idx = torch.tensor(frames, device=device)
        rest = (~salient[idx]).nonzero()[:, 1].reshape(len(frames), m)
        rows = [feats[f].index_select(0, rest[row]) for row, f in enumerate(frames)]
        score = _density_scores(_float64_stack(rows, scratch))
        for row, f in enumerate(frames):
            pick = top_scores(score[row], min(ctx_n[f], m)).sort().values  # capped at the tokens left
            centres[f] = f * n + rest[row, pick]

    x = feats.reshape(-1, dim)
    for s, e in segs:
        seg_anchors = [f for f in range(s, e + 1) if f in centres]
        if not seg_anchors:
            continue
        # Sources of an anchor: the segment's non-salient tokens except its own centres. All anchors of
        # the segment at once (centre lists padded to the longest), on a view of the segment's tokens.
        lo = s * n
        xs = x[lo : (e + 1) * n]  # (S, D), no copy
        sizes = [centres[f].numel() for f in seg_anchors]
        width = max(sizes)
        pad = torch.stack([torch.cat([centres[f], centres[f][:1].expand(width - c)]) for f, c in zip(seg_anchors, sizes)])
        valid = torch.arange(width, device=device)[None, :] < torch.tensor(sizes, device=device)[:, None]
        target = x[pad]  # (A, width, D)
        # cosine argmax over the anchor's centres (the source's own norm does not change it)
        sim = (xs @ _unit(target).transpose(1, 2)).masked_fill(~valid[:, None, :], -math.inf)
        label = sim.argmax(dim=2)  # (A, S): ties go to the lower (ascending) centre
        is_src = (~salient[s : e + 1].reshape(1, -1)).repeat(len(seg_anchors), 1)
        is_src.scatter_(1, pad - lo, False)  # an anchor's own centres are not its sources
        merged = _merge(target, xs, label, p.DTM_beta, width, weight=is_src)
        out.add(pad[valid], merged[valid])
        for row in range(len(seg_anchors)):
            src = is_src[row].nonzero().squeeze(1)
            out.link(src + lo, pad[row, label[row, src]])
    return out


# ---------------------------------------------------------------------------------------------
# SigLIP attention-pooling head (the signal the LLaVA versions read)
# ---------------------------------------------------------------------------------------------
def _head_weight(weights: Mapping[str, Tensor], name: str) -> Tensor:
    for key, value in weights.items():
        if key == name or key.endswith("." + name):
            return value
    raise KeyError(f"pooling_head is missing {name!r} (expected SigLIP keys such as 'head.probe', 'post_layernorm.weight')")


def siglip_pooling_head(hidden: Tensor, weights: Mapping[str, Tensor], num_heads: int, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """SigLIP's ``post_layernorm`` + multi-head attention pooling head (MAP), as FastVID runs it.

    Args:
        hidden: ``(F, P, C)`` vision-tower features (the output of the layer the projector reads).
        weights: SigLIP vision weights by their Hugging Face names (``post_layernorm.*``, ``head.probe``,
            ``head.attention.in_proj_weight/bias``, ``head.attention.out_proj.*``, ``head.layernorm.*``,
            ``head.mlp.fc1.*``, ``head.mlp.fc2.*``; any prefix such as ``vision_model.`` is ignored).
        num_heads: heads of the pooling attention (16 for siglip-so400m).

    Returns:
        ``(pooled (F, C), probe_attention (F, P))``: the pooled embedding and the probe's attention
        over the patches, averaged over heads. Float32.
    """
    w = {name: _head_weight(weights, name).float().to(hidden.device) for name in (
        "post_layernorm.weight", "post_layernorm.bias", "head.probe", "head.attention.in_proj_weight",
        "head.attention.in_proj_bias", "head.attention.out_proj.weight", "head.attention.out_proj.bias",
        "head.layernorm.weight", "head.layernorm.bias", "head.mlp.fc1.weight", "head.mlp.fc1.bias",
        "head.mlp.fc2.weight", "head.mlp.fc2.bias")}
    x = F.layer_norm(hidden.float(), hidden.shape[-1:], w["post_layernorm.weight"], w["post_layernorm.bias"], eps)
    f, p_len, c = x.shape
    wq, wk, wv = w["head.attention.in_proj_weight"].chunk(3)
    bq, bk, bv = w["head.attention.in_proj_bias"].chunk(3)
    d = c // num_heads
    q = F.linear(w["head.probe"].reshape(1, c), wq, bq).reshape(1, num_heads, d).transpose(0, 1)  # (H, 1, d)
    k = F.linear(x, wk, bk).reshape(f, p_len, num_heads, d).permute(0, 2, 1, 3)  # (F, H, P, d)
    v = F.linear(x, wv, bv).reshape(f, p_len, num_heads, d).permute(0, 2, 1, 3)
    probs = torch.softmax((q[None] @ k.transpose(-1, -2)) / math.sqrt(d), dim=-1)  # (F, H, 1, P)
    pooled = (probs @ v).permute(0, 2, 1, 3).reshape(f, c)
    pooled = F.linear(pooled, w["head.attention.out_proj.weight"], w["head.attention.out_proj.bias"])
    h = F.layer_norm(pooled, (c,), w["head.layernorm.weight"], w["head.layernorm.bias"], eps)
    h = F.linear(F.gelu(F.linear(h, w["head.mlp.fc1.weight"], w["head.mlp.fc1.bias"]), approximate="tanh"),
                 w["head.mlp.fc2.weight"], w["head.mlp.fc2.bias"])
    return pooled + h, probs[:, :, 0].mean(dim=1)


def pool_to_grid(values: Tensor, grid: tuple[int, int]) -> Tensor:
    """Bilinearly resize per-patch values ``(F, P)`` (square patch grid) to the token grid ``(F, h*w)``.

    This is LLaVA-OneVision's own pooling (``apply_pooling``: bilinear resize of the patch grid).
    """
    f, p_len = values.shape
    side = math.isqrt(p_len)
    if side * side != p_len:
        raise ValueError(f"cannot pool {p_len} patches: not a square grid")
    h, w = grid
    if (side, side) == (h, w):
        return values
    return F.interpolate(values.reshape(f, 1, side, side).float(), size=(h, w), mode="bilinear").reshape(f, h * w)


def siglip_head_weights(model: torch.nn.Module) -> dict[str, Tensor]:
    """The ``post_layernorm`` and ``head`` weights of a Hugging Face SigLIP vision model, for ``pooling_head``.

    E.g. ``SiglipVisionModel.from_pretrained("google/siglip-so400m-patch14-384")``, which is where
    FastVID loads them from (llava-hf checkpoints do not include them).
    """
    state = model.state_dict()
    out = {k: v.detach() for k, v in state.items() if ".post_layernorm." in f".{k}" or ".head." in f".{k}"}
    if not any(k.endswith("head.probe") for k in out):
        raise ValueError("this model has no SigLIP attention-pooling head (head.probe); load the original SigLIP checkpoint")
    return out


# ---------------------------------------------------------------------------------------------
# the policy
# ---------------------------------------------------------------------------------------------
@register("fastvid")
@dataclass
class FastVID(Policy):
    """FastVID (DySeg + STPrune + DTM), before the language model.

    Parameters (reference config names ``fastvid_<name>``):
        retain: ``retention_ratio``, per-frame budget ``int(n * retain)`` (the achieved fraction can be
            lower: floors, anchor shares, Qwen caps; the Qwen2.5-VL script's 0.27 keeps about 24%).
        DySeg_c: at least ``DySeg_c`` segments (the ``c - 1`` least similar transitions are cut).
        DySeg_tau: also cut every transition with cosine below it; ``None`` = preset default
            (0.9 LLaVA, 0.84 Qwen2.5-VL).
        DySeg_ignore: Qwen2.5-VL version only: inside a segment, frames whose successor is more similar
            than this get no budget (default 0.95).
        STPrune_d: contextual share of the budget.
        DTM_p: anchor spacing (frames).
        DTM_beta: lower bound of a centre's own weight when merging.
        preset: which reference version runs: ``"llava_onevision"``, ``"llava_video"``, ``"qwen2_5_vl"``,
            or ``"auto"`` (Qwen-VL layouts -> ``qwen2_5_vl``, everything else -> ``llava_onevision``).
            HF's LLaVA-Video checkpoints load as LLaVA-OneVision, so ``TokenSet.layout`` cannot tell
            them apart: pass ``preset="llava_video"`` for them.
        pooling_head: optional SigLIP ``post_layernorm`` + ``head`` weights (see :func:`siglip_head_weights`)
            for the LLaVA presets' exact signals; with them the adapter must supply ``"vision_features"``.
        pooling_head_heads: heads of that pooling attention (16 for siglip-so400m).

    Signals, in order of preference (a substitute warns once):
        global feature per frame: the SigLIP pooling head (with ``pooling_head``), else the frame's
        mean token (the Qwen2.5-VL reference's own choice; a substitute for the LLaVA presets).
        per-frame attention: the pooling head's probe attention (with ``pooling_head``), else
        ``"frame_query_attention"`` (mean query of the frame over 2x2-merged keys in the last vision
        block: the Qwen2.5-VL reference's signal), else ``"vision_attention"``, else
        :func:`~tokcompress.policies.signals.feature_saliency`.
    """

    retain: float = 0.10
    DySeg_c: int = 8
    DySeg_tau: float | None = None
    DySeg_ignore: float | None = None
    STPrune_d: float = 0.4
    DTM_p: int = 4
    DTM_beta: float = 0.6
    preset: str = "auto"
    pooling_head: Mapping[str, Tensor] | None = field(default=None, repr=False, compare=False)
    pooling_head_heads: int = 16

    accepts_partial = False

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("DySeg_c", "DTM_p", "pooling_head_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        for name, low, high in (("STPrune_d", 0, 1), ("DTM_beta", 0, 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise ValueError(f"{name} must be in [{low}, {high}]; got {value!r}")
        for name in ("DySeg_tau", "DySeg_ignore"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not -1 <= value <= 1):
                raise ValueError(f"{name} must be a cosine threshold in [-1, 1] or None (preset default); got {value!r}")
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {PRESETS}; got {self.preset!r}")

    @property
    def optional_needs(self) -> frozenset[str]:  # type: ignore[override]
        base = {"frame_query_attention", "vision_attention"}
        return frozenset(base | ({"vision_features"} if self.pooling_head is not None else set()))

    def resolved_preset(self, layout: str) -> str:
        if self.preset != "auto":
            return self.preset
        return "qwen2_5_vl" if layout in QWEN_LAYOUTS else "llava_onevision"

    def resolved_tau(self, preset: str) -> float:
        return float(self.DySeg_tau) if self.DySeg_tau is not None else DEFAULT_TAU[preset]

    def resolved_ignore(self) -> float:
        return 0.95 if self.DySeg_ignore is None else float(self.DySeg_ignore)

    @property
    def label(self) -> str:
        return f"{self.name}(retain={self.retain:g}, preset={self.preset})"

    def signals(self, tokens: TokenSet, preset: str) -> tuple[Tensor, Tensor]:
        """``(frame_global (T, Dg), frame_attn (T, n))`` from the best available source."""
        t, n = tokens.num_frames, tokens.tokens_per_frame
        device = tokens.features.device
        sig = tokens.signals
        if self.pooling_head is not None and "vision_features" in sig:
            hidden = sig["vision_features"].to(device)
            pooled, probe = siglip_pooling_head(hidden, self.pooling_head, self.pooling_head_heads)
            step = hidden.shape[0] // t  # frames per temporal step (1 for the LLaVA family)
            pooled = pooled.reshape(t, step, -1).mean(1)
            attn = pool_to_grid(probe, tokens.grid[1:]).reshape(t, step, n).mean(1)
            return pooled, attn
        if self.pooling_head is not None:
            warn_once("fastvid", f"fastvid: pooling_head was given but the {tokens.layout!r} adapter supplied no "
                      "'vision_features'; falling back to substitutes")
        global_ = sig["frame_features"].to(device).float() if "frame_features" in sig else frame_mean(tokens.features)
        for name in ("frame_query_attention", "vision_attention"):
            if name in sig:
                attn = sig[name].reshape(t, n).to(device).float()
                break
        else:
            name, attn = "feature_saliency", feature_saliency(tokens.features)
        exact = preset == "qwen2_5_vl" and name == "frame_query_attention"
        if not exact:
            what = "the SigLIP pooling head (pass pooling_head=siglip_head_weights(...))" if preset != "qwen2_5_vl" \
                else "the last vision block's mean-query attention ('frame_query_attention')"
            warn_once("fastvid", f"fastvid[{preset}] on {tokens.layout!r}: the reference reads {what}; using the "
                      f"frame mean token as global feature and {name!r} as attention instead")
        return global_, attn

    def compress(self, tokens: TokenSet) -> Compression:
        tokens.require_full(self.name)
        preset = self.resolved_preset(tokens.layout)
        global_, attn = self.signals(tokens, preset)
        return self.run(tokens.features, global_, attn, preset)

    def run(self, features: Tensor, frame_global: Tensor, frame_attn: Tensor, preset: str) -> Compression:
        """FastVID on explicit signals: ``features`` ``(T, n, D)``, ``frame_global`` ``(T, Dg)``,
        ``frame_attn`` ``(T, n)``, ``preset`` one of the reference versions (not ``"auto"``).

        Returns the :class:`Compression`; ``info["segments"]`` holds the DySeg segments as half-open
        ``(start, end)`` frame ranges (the convention of ``Compression.info``; :func:`dyseg` is inclusive).
        """
        if preset not in DEFAULT_TAU:
            raise ValueError(f"preset must be one of {tuple(DEFAULT_TAU)}; got {preset!r}")
        feats = features.float()
        segs = dyseg(frame_global, self.DySeg_c, self.resolved_tau(preset))
        if preset == "llava_onevision":
            out = _onevision(feats, frame_attn.float(), segs, self)
        else:
            unit_g = _unit(frame_global.float())
            out = _per_segment(feats, frame_attn.float(), unit_g, segs, self, qwen=preset == "qwen2_5_vl")
        return out.compression(features.dtype, {"segments": [(s, e + 1) for s, e in segs], "preset": preset})


__all__ = ["FastVID", "dyseg", "pool_to_grid", "siglip_head_weights", "siglip_pooling_head"]
