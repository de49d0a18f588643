"""HoliTom (outer part): holistic token merging before the language model.

Shao et al., "HoliTom: Holistic Token Merging for Fast Video Large Language Models", NeurIPS 2025.
Reference: cokeshao/HoliTom @ e9b2972f6895c9e7d7fe74eb8c3a2ecaab8056e0, ``holitom/llava_arch.py``
(``LlavaMetaForCausalLM_holitom``: ``select_static_windows``, ``get_static_dynamic_features``,
``holitom``, ``merge_tokens_by_attention_density``, ``merge_tokens_by_density``,
``merge_tokens_by_clustering``, ``cluster_dpc_knn``, video branch of
``prepare_inputs_labels_for_multimodal``).

Steps, on ``F`` ``(T, n, D)`` (projector output, one row per frame; Qwen-VL: per temporal patch) and
the vision attention ``A`` ``(T, n)`` each token receives:

1. ``S[t, p] = cos(F[t, p], F[t+1, p])``; position ``p`` is static over ``[s..e]`` iff
   ``S[t, p] > tau`` for all ``t`` in ``s..e-1``.
2. Global temporal segmentation: a dynamic program over frames picks windows maximising the tokens
   saved, ``C[s, e] = (#static positions) * (e - s)``, windows of at most ``max_window_size`` frames,
   strict improvement only (ties keep the shorter window). ``reduced`` = the optimum.
3. ``r' = min(retain / ((T*n - reduced) / (T*n)), 1)``: the budget left after temporal merging.
4. Per window ``[s..e]``: static positions are averaged over the window's frames (one token each),
   then clustered by DPC-kNN into ``round(n_static * r')`` tokens (``k = min(k, clusters)``,
   members to the nearest centre, merged ``beta * centre + (1 - beta) * mean(members)``, or the plain
   mean of centre and members with ``no_beta``). Dynamic positions, per frame:
   ``m = ceil(n_dyn * r')`` tokens, ``round(m * (1 - d))`` "dominant" ones by attention top-k (kept
   raw), the rest "contextual" DPC-kNN clusters of the remaining tokens (only when ``d > 0``).

Where the output tokens sit: tokcompress keeps original positions, so every output token takes the
position of the token that carries it: a dominant token its own, a contextual cluster its DPC
centre's, a static cluster its centre's position in the window's FIRST frame. The reference instead
renumbers the compressed sequence (positions compacted) and, for LLaVA-OneVision, emits a window's
static tokens before the first frame's dynamic ones; :meth:`HoliTomResult.emitted` reproduces the
reference's order (used by the golden tests). The in-LLM merge (``HOLITOM_k``/``HOLITOM_r``) is a
separate stage; :meth:`HoliTom.stages` is where it will be chained.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..cluster import dpc_knn, nearest_center
from ..policy import Policy
from ..registry import register
from ..tokens import Compression, TokenSet
from .signals import feature_saliency, warn_once

#: Output token kinds (as in the golden cases).
STATIC, DOMINANT, CONTEXTUAL, NEWLINE = 0, 1, 2, 3

#: Model presets: reference default tau per model (LLaVA-OV uses 0.65 at retain 0.10, else 0.80).
PRESETS = ("auto", "llava_onevision", "llava_video", "generic")


def frame_similarity(features: Tensor) -> Tensor:
    """``(T-1, n)`` cosine similarity of each position between consecutive frames (reference form)."""
    normed = F.normalize(features.float(), p=2, dim=-1)
    return F.cosine_similarity(normed[:-1], normed[1:], dim=-1)


def window_gains(static: np.ndarray) -> np.ndarray:
    """``C[s, e] = (#positions static over [s..e]) * (e - s)`` from ``static`` ``(T-1, n)`` bool.

    Built from run lengths in ``O(T * (n + T))`` instead of the reference's ``O(T^2 * n)`` cumprod.
    """
    tm1, n = static.shape
    t = tm1 + 1
    run = np.zeros((t, n), dtype=np.int64)  # run[s, p]: consecutive static transitions from s
    for s in range(tm1 - 1, -1, -1):
        run[s] = (run[s + 1] + 1) * static[s]
    gains = np.zeros((t, t), dtype=np.int64)
    for s in range(tm1):
        hist = np.bincount(run[s], minlength=t + 1)
        at_least = np.cumsum(hist[::-1])[::-1]  # at_least[L] = #p with run >= L
        lengths = np.arange(1, t - s)
        gains[s, s + 1 :] = at_least[lengths] * lengths
    return gains


def select_windows(gains: np.ndarray, max_window_size: int) -> tuple[list[tuple[int, int]], int]:
    """The reference's dynamic program: windows ``[(s, e), ...]`` (inclusive) and the saved-token total.

    ``dp[i] = max(dp[i-1], max_w dp[i-w] + C[i-w+1, i])`` over ``w = 2..min(i+1, max_window_size)``,
    updated only on a strict improvement, window sizes tried in increasing order.
    """
    t = gains.shape[0]
    dp = np.zeros(t + 1, dtype=np.int64)  # dp[i + 1] is the reference's dp[i]; dp[0] = 0
    prev = np.zeros(t, dtype=np.int64)
    for i in range(t):
        best, start = dp[i], i
        top = min(i + 1, max_window_size)
        if top >= 2:
            sizes = np.arange(2, top + 1)
            vals = dp[i + 1 - sizes] + gains[i + 1 - sizes, i]
            j = int(np.argmax(vals))  # first maximum: the smallest window among equals
            if vals[j] > best:
                best, start = int(vals[j]), i + 1 - int(sizes[j])
        dp[i + 1], prev[i] = best, start
    windows, i = [], t - 1
    while i >= 0:
        windows.append((int(prev[i]), i))
        i = int(prev[i]) - 1
    return windows[::-1], int(dp[t])


@dataclass
class HoliTomResult:
    """Everything the outer HoliTom computed for one video, tokens in the reference's OneVision order.

    Attributes:
        tokens: ``(M, D)`` output embeddings; per window: static clusters (centre order), then per
            frame the dominant tokens (ascending position) and the contextual clusters (centre order).
        kind: ``(M,)`` int64: 0 static cluster, 1 dominant, 2 contextual (see module constants).
        src: ``(M,)`` int64 flat index ``t*n + p`` of the copied token (kind 1) or DPC centre (kind 2); -1 for kind 0.
        pos: ``(M,)`` int64 spatial position ``p`` (kind 0: the static centre's position).
        window: ``(M,)`` int64 window of each token.
        carrier: ``(M,)`` int64 flat index whose position the token takes in tokcompress (see module doc).
        windows: ``[(start, end), ...]`` inclusive frame ranges.
        static_mask: ``(W, n)`` bool static positions per window (all False for one-frame windows).
        total_reduced: the DP optimum (tokens saved by temporal merging).
        retain_ratio: the rescaled ratio ``r'``.
        assign: ``(T*n,)`` int64 for every input token the index into ``tokens`` it went into, -1 dropped.
    """

    tokens: Tensor
    kind: Tensor
    src: Tensor
    pos: Tensor
    window: Tensor
    carrier: Tensor
    windows: list[tuple[int, int]]
    static_mask: Tensor
    total_reduced: int
    retain_ratio: float
    assign: Tensor

    def emitted(self, layout: str, grid: tuple[int, int], newline: Tensor | None = None) -> dict[str, Tensor]:
        """The output sequence in the order the reference emits it.

        ``layout="one_token"`` (LLaVA-OneVision): the order of ``tokens``. ``layout="grid"``
        (LLaVA-Video): per window, static tokens join the first frame; each frame's tokens sorted by
        position; after each grid row with at least one token, one ``newline`` (kind 3).
        Returns ``tokens``, ``kind``, ``src``, ``pos``, ``window``.
        """
        fields = {"tokens": self.tokens, "kind": self.kind, "src": self.src, "pos": self.pos, "window": self.window}
        if layout == "one_token":
            return dict(fields)
        if layout != "grid":
            raise ValueError(f"layout must be 'one_token' or 'grid'; got {layout!r}")
        if newline is None:
            raise ValueError("the 'grid' layout needs the newline embedding")
        h, w = grid
        n = h * w
        # frame of each token: kind 0 -> window start; others -> from the carrier
        frame = self.carrier // n
        order = torch.argsort(frame * n + self.pos, stable=True)
        out: dict[str, list[Tensor]] = {k: [] for k in fields}
        nl = {
            "tokens": newline.reshape(1, -1).to(self.tokens.dtype),
            "kind": torch.tensor([NEWLINE]),
            "src": torch.tensor([-1]),
            "pos": torch.tensor([-1]),
        }
        row = (frame * h + self.pos // w)[order]
        bounds = torch.nonzero(torch.diff(row, prepend=row[:1] - 1)).squeeze(1).tolist() + [row.numel()]
        for a, b in zip(bounds[:-1], bounds[1:]):
            idx = order[a:b]
            for key, value in fields.items():
                out[key].append(value[idx])
            for key, value in nl.items():
                out[key].append(value)
            out["window"].append(self.window[idx[:1]])
        return {k: torch.cat(v) for k, v in out.items()}


def _merge_clusters(x: Tensor, centers: Tensor, labels: Tensor, beta: float, no_beta: bool) -> Tensor:
    """Merge every cluster of ``x`` ``(B, M, D)`` into its centre.

    ``centers`` ``(B, K)`` sorted token indices; ``labels`` ``(B, M)`` cluster of every token (centres
    included, they label themselves). Members are the non-centre tokens of a cluster.
    """
    b, m, d = x.shape
    k = centers.shape[1]
    is_center = torch.zeros(b, m, dtype=torch.bool, device=x.device)
    is_center.scatter_(1, centers, True)
    member = (~is_center).to(x.dtype)
    sums = torch.zeros(b, k, d, dtype=x.dtype, device=x.device)
    sums.scatter_add_(1, labels[:, :, None].expand(b, m, d), x * member[:, :, None])
    counts = torch.zeros(b, k, dtype=x.dtype, device=x.device).scatter_add_(1, labels, member)
    center_x = x.gather(1, centers[:, :, None].expand(b, k, d))
    if no_beta:
        merged = (sums + center_x) / (counts + 1)[:, :, None]
    else:
        merged = beta * center_x + (1 - beta) * (sums / counts.clamp(min=1)[:, :, None])
    return torch.where((counts > 0)[:, :, None], merged, center_x)


def _cluster(x: Tensor, num: int, k: int, beta: float, no_beta: bool) -> tuple[Tensor, Tensor, Tensor]:
    """DPC-kNN cluster ``x`` ``(B, M, D)`` into ``num`` tokens: ``(centres (B, num), labels (B, M), merged (B, num, D))``."""
    res = dpc_knn(x, min(k, num), num)
    centers = res.centers
    labels = nearest_center(x, centers, res.dist)
    b = x.shape[0]
    # a centre belongs to its own cluster
    labels.scatter_(1, centers, torch.arange(num, device=x.device).expand(b, num).contiguous())
    return centers, labels, _merge_clusters(x.float(), centers, labels, beta, no_beta)


def holitom_outer(
    features: Tensor,
    attention: Tensor,
    retain: float,
    tau: float,
    beta: float = 0.6,
    d: float = 0.0,
    k: int = 7,
    max_window_size: int = 1024,
    no_beta: bool = False,
) -> HoliTomResult:
    """Run HoliTom's outer part on one video.

    Args:
        features: ``(T, n, D)`` tokens (any float dtype; similarities and clustering in float32).
        attention: ``(T, n)`` attention each token receives (only its order within a frame matters).
        retain, tau, beta, d, k, max_window_size, no_beta: see :class:`HoliTom`.
    """
    t, n, dim = features.shape
    device = features.device
    feats = features.float()
    if t > 1:
        static_steps = frame_similarity(feats) > tau  # (T-1, n)
        windows, reduced = select_windows(window_gains(static_steps.cpu().numpy()), max_window_size)
    else:
        static_steps = torch.zeros(0, n, dtype=torch.bool, device=device)
        windows, reduced = [(0, 0)], 0
    total = t * n
    ratio = min(retain / ((total - reduced) / total), 1)

    tok: list[Tensor] = []
    kind: list[Tensor] = []
    src: list[Tensor] = []
    pos: list[Tensor] = []
    win: list[Tensor] = []
    carrier: list[Tensor] = []
    assign_slot = torch.full((total,), -1, dtype=torch.long, device=device)  # token -> output index
    emitted = 0
    static_masks = []
    ar = torch.arange(n, device=device)

    def emit(values: Tensor, kinds: int, srcs: Tensor, poss: Tensor, carriers: Tensor, w: int) -> Tensor:
        nonlocal emitted
        count = values.shape[0]
        tok.append(values)
        kind.append(torch.full((count,), kinds, dtype=torch.long, device=device))
        src.append(srcs)
        pos.append(poss)
        win.append(torch.full((count,), w, dtype=torch.long, device=device))
        carrier.append(carriers)
        slots = torch.arange(emitted, emitted + count, device=device)
        emitted += count
        return slots

    for w_i, (s, e) in enumerate(windows):
        length = e - s + 1
        if length > 1:
            smask = static_steps[s:e].all(dim=0)
        else:
            smask = torch.zeros(n, dtype=torch.bool, device=device)
        static_masks.append(smask)
        static_pos = ar[smask]
        dyn_pos = ar[~smask]
        frames = torch.arange(s, e + 1, device=device)

        # static tokens: temporal mean, then DPC clustering (round budget)
        n_static = int(static_pos.numel())
        if length > 1 and n_static > 0:
            static_feat = feats[s : e + 1][:, smask].mean(dim=0)  # (n_static, D)
            c = round(n_static * ratio)
            if c > 0:
                centers, labels, merged = _cluster(static_feat[None], c, k, beta, no_beta)
                cpos = static_pos[centers[0]]
                slots = emit(merged[0], STATIC, torch.full((c,), -1, device=device), cpos, s * n + cpos, w_i)
                flat = frames[:, None] * n + static_pos[None, :]  # every static token of the window
                assign_slot[flat.reshape(-1)] = slots[labels[0]].repeat(length)

        # dynamic tokens, per frame (same counts for every frame of the window)
        n_dyn = int(dyn_pos.numel())
        if n_dyn == 0:
            continue
        m = math.ceil(n_dyn * ratio)
        dominant = round(m * (1 - d))
        contextual = m - dominant
        dfeat = feats[s : e + 1][:, ~smask]  # (L, n_dyn, D)
        dattn = attention[s : e + 1][:, ~smask].float()
        if dominant > 0:
            top = torch.topk(dattn, dominant, dim=1).indices
            chosen = torch.zeros(length, n_dyn, dtype=torch.bool, device=device).scatter_(1, top, True)
        else:
            chosen = torch.zeros(length, n_dyn, dtype=torch.bool, device=device)
        dom_local = chosen.nonzero()  # (L*dominant, 2) frame-major, ascending position
        rest_local = (~chosen).nonzero()[:, 1].reshape(length, n_dyn - dominant)
        if contextual > 0:
            rest_feat = dfeat.gather(1, rest_local[:, :, None].expand(-1, -1, dim))
            ctx_centers, ctx_labels, ctx_merged = _cluster(rest_feat, contextual, k, beta, no_beta)
        for f in range(length):
            frame = s + f
            sel = dom_local[dom_local[:, 0] == f, 1]
            p = dyn_pos[sel]
            slots = emit(feats[frame, p], DOMINANT, frame * n + p, p, frame * n + p, w_i)
            assign_slot[frame * n + p] = slots
            if contextual > 0:
                cp = dyn_pos[rest_local[f, ctx_centers[f]]]
                slots = emit(ctx_merged[f], CONTEXTUAL, frame * n + cp, cp, frame * n + cp, w_i)
                members = dyn_pos[rest_local[f]]
                assign_slot[frame * n + members] = slots[ctx_labels[f]]

    def cat(parts: list[Tensor], dtype: torch.dtype) -> Tensor:
        return torch.cat(parts).to(dtype) if parts else torch.zeros(0, dtype=dtype, device=device)

    tokens = torch.cat(tok).to(features.dtype) if tok else features.new_zeros(0, dim)
    return HoliTomResult(
        tokens=tokens,
        kind=cat(kind, torch.long),
        src=cat(src, torch.long),
        pos=cat(pos, torch.long),
        window=cat(win, torch.long),
        carrier=cat(carrier, torch.long),
        windows=windows,
        static_mask=torch.stack(static_masks),
        total_reduced=reduced,
        retain_ratio=ratio,
        assign=assign_slot,
    )


@register("holitom")
@dataclass
class HoliTom(Policy):
    """HoliTom outer part (global temporal windows + static/dynamic merging), before the LLM.

    Parameters (reference environment variable in brackets):
        retain: target fraction of visual tokens kept [``RETAIN_RATIO``]; the achieved count follows
            the reference's ``ceil``/``round`` rules (typically within a few tokens of ``retain * N``).
        tau: cosine threshold for a static position [``T``]; ``None`` takes the preset's value.
        beta: weight of a cluster centre when merging [``BETA``].
        d: share of each frame's dynamic budget given to DPC contextual clusters [``D``] (0 = pure
            attention top-k, the reference default).
        k: DPC-kNN neighbours, used as ``min(k, clusters)`` [``K``].
        max_window_size: longest temporal window in frames [``MAX_WINDOW_SIZE``].
        no_beta: merge clusters by a plain mean instead of ``beta`` mixing [``NO_BETA`` != "0"].
        preset: ``"auto"`` (from ``TokenSet.layout``), ``"llava_onevision"``, ``"llava_video"`` or
            ``"generic"``: only sets the default ``tau`` (OneVision 0.65 at ``retain <= 0.10``, else 0.80;
            LLaVA-Video and generic 0.80). HF's LLaVA-Video checkpoints load as LLaVA-OneVision, so
            ``TokenSet.layout`` cannot tell them apart: pass ``preset="llava_video"`` for them.

    Signals: ``"vision_attention"`` ``(T, n)`` (attention each token receives in the vision tower's
    feature layer, mean over heads and queries, pooled like the features). Without it, a documented
    substitute is used (see :func:`tokcompress.policies.signals.feature_saliency`) with a one-time warning.
    """

    retain: float = 0.10
    tau: float | None = None
    beta: float = 0.6
    d: float = 0.0
    k: int = 7
    max_window_size: int = 1024
    no_beta: bool = False
    preset: str = "auto"

    optional_needs: ClassVar[frozenset[str]] = frozenset({"vision_attention"})
    accepts_partial = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tau is not None and (isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not -1 <= self.tau <= 1):
            raise ValueError(f"tau must be a cosine threshold in [-1, 1] or None (preset default); got {self.tau!r}")
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not 0 <= self.beta <= 1:
            raise ValueError(f"beta must be in [0, 1]; got {self.beta!r}")
        if isinstance(self.d, bool) or not isinstance(self.d, (int, float)) or not 0 <= self.d <= 1:
            raise ValueError(f"d must be in [0, 1] (share of the dynamic budget for contextual clusters); got {self.d!r}")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be a positive int (DPC-kNN neighbours); got {self.k!r}")
        if isinstance(self.max_window_size, bool) or not isinstance(self.max_window_size, int) or self.max_window_size < 1:
            raise ValueError(f"max_window_size must be a positive int (frames); got {self.max_window_size!r}")
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {PRESETS}; got {self.preset!r}")

    def resolved_tau(self, layout: str = "generic") -> float:
        """``tau``, or the preset's default for ``layout`` when ``tau`` is None."""
        if self.tau is not None:
            return float(self.tau)
        preset = layout if self.preset == "auto" else self.preset
        if preset == "llava_onevision":
            return 0.65 if self.retain <= 0.10 else 0.80
        return 0.80

    @property
    def label(self) -> str:
        return f"{self.name}(retain={self.retain:g}, tau={self.tau if self.tau is not None else 'preset'}, d={self.d:g})"

    def attention(self, tokens: TokenSet) -> Tensor:
        attn = tokens.signals.get("vision_attention")
        if attn is not None:
            return attn.reshape(tokens.num_frames, tokens.tokens_per_frame).to(tokens.features.device)
        warn_once(
            "holitom",
            f"holitom: no 'vision_attention' signal for layout {tokens.layout!r}; dominant tokens are chosen by "
            "feature saliency (softmax of each token's dot product with its frame's mean token) instead of the "
            "vision tower's attention",
        )
        return feature_saliency(tokens.features)

    def run(self, tokens: TokenSet) -> HoliTomResult:
        """The full :class:`HoliTomResult` for ``tokens`` (``compress`` keeps only what the engine needs)."""
        tokens.require_full(self.name)
        return holitom_outer(
            tokens.features,
            self.attention(tokens),
            self.retain,
            self.resolved_tau(tokens.layout),
            self.beta,
            self.d,
            self.k,
            self.max_window_size,
            self.no_beta,
        )

    def compress(self, tokens: TokenSet) -> Compression:
        res = self.run(tokens)
        order = torch.argsort(res.carrier)
        keep = res.carrier[order]
        slot_of = torch.empty_like(order)
        slot_of[order] = torch.arange(order.numel(), device=order.device)
        assign = torch.where(res.assign >= 0, slot_of[res.assign.clamp(min=0)], res.assign)
        info = {
            "windows": res.windows,
            "total_reduced": res.total_reduced,
            "retain_ratio": res.retain_ratio,
            "kinds": torch.bincount(res.kind, minlength=3).tolist(),
        }
        return Compression(keep=keep, values=res.tokens[order], assign=assign, info=info)


__all__ = ["HoliTom", "HoliTomResult", "frame_similarity", "holitom_outer", "select_windows", "window_gains"]
