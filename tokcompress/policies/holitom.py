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

Where the output tokens sit: every output token takes the place of the token that carries it: a
dominant token its own, a contextual cluster its DPC centre's, a static cluster its centre's position
in the window's FIRST frame, and keeps that token's position id (``positions="kept"``, the default) or
is renumbered consecutively (``positions="compacted"``, as the reference; 1-D families). The
reference also orders a LLaVA-OneVision window's static tokens before the first frame's dynamic ones
(here they interleave by position, which is the reference's LLaVA-Video order);
:meth:`HoliTomResult.emitted` reproduces the reference's order (used by the golden tests). The in-LLM merge (``HOLITOM_k``/``HOLITOM_r``) is a
separate stage; :meth:`HoliTom.stages` is where it will be chained.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from ..cluster import cluster_sums, dpc_knn, nearest_center, take_rows
from ..policy import Policy, check_positions
from ..registry import register
from ..tokens import Compression, TokenSet
from .holitom_inner import HoliTomInner
from .signals import feature_saliency, warn_once

#: Output token kinds (as in the golden cases).
STATIC, DOMINANT, CONTEXTUAL, NEWLINE = 0, 1, 2, 3

#: Model presets: reference default tau per model (LLaVA-OV uses 0.65 at retain 0.10, else 0.80).
PRESETS = ("auto", "llava_onevision", "llava_video", "generic")


def static_runs(static: np.ndarray) -> np.ndarray:
    """``run[s, p]``: how many consecutive transitions from ``s`` on keep position ``p`` static.

    ``static`` ``(T-1, n)`` bool -> ``(T, n)`` int64 (row ``T-1`` is 0). Position ``p`` is static over
    window ``[s..e]`` iff ``run[s, p] >= e - s``.
    """
    tm1, n = static.shape
    run = np.zeros((tm1 + 1, n), dtype=np.int64)
    for s in range(tm1 - 1, -1, -1):
        run[s] = (run[s + 1] + 1) * static[s]
    return run


def window_gains(run: np.ndarray) -> np.ndarray:
    """``C[s, e] = (#positions static over [s..e]) * (e - s)`` from :func:`static_runs` ``(T, n)``.

    ``O(T * (n + T))`` through run-length histograms, instead of the reference's ``O(T^2 * n)`` cumprod.
    """
    t = run.shape[0]
    gains = np.zeros((t, t), dtype=np.int64)
    for s in range(t - 1):
        hist = np.bincount(run[s], minlength=t + 1)
        at_least = np.cumsum(hist[::-1])[::-1]  # at_least[L] = #p with run >= L
        lengths = np.arange(1, t - s)
        gains[s, s + 1 :] = at_least[lengths] * lengths
    return gains


def select_windows(gains: np.ndarray, max_window_size: int) -> tuple[list[tuple[int, int]], int]:
    """The reference's dynamic program: windows ``[(s, e), ...]`` (inclusive) and the saved-token total.

    ``dp[i] = max(dp[i-1], max_w dp[i-w] + C[i-w+1, i])`` over ``w = 2..min(i+1, max_window_size)``,
    updated only on a strict improvement, window sizes tried in increasing order (exact integers).
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
    """Everything the outer HoliTom computed for one video.

    Output tokens are stored in tokcompress order (ascending ``carrier``); :meth:`emitted` gives the
    reference's order.

    Attributes:
        tokens: ``(M, D)`` output embeddings.
        kind: ``(M,)`` int64: 0 static cluster, 1 dominant, 2 contextual (see module constants).
        src: ``(M,)`` int64 flat index ``t*n + p`` of the copied token (kind 1) or DPC centre (kind 2); -1 for kind 0.
        pos: ``(M,)`` int64 spatial position ``p`` (kind 0: the static centre's position).
        window: ``(M,)`` int64 window of each token.
        carrier: ``(M,)`` int64 sorted flat index whose position the token takes in tokcompress: its own
            (kind 1), its DPC centre's (kind 2), its centre's in the window's first frame (kind 0).
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

        ``layout="one_token"`` (LLaVA-OneVision): per window, the static clusters (ascending centre
        position), then frame by frame the dominant tokens (ascending position) and the contextual
        clusters (ascending centre position). ``layout="grid"`` (LLaVA-Video): per window the static
        tokens join the first frame, each frame's tokens are sorted by position, and after each grid
        row with at least one token comes one ``newline`` (kind 3; empty rows emit nothing).
        Returns ``tokens``, ``kind``, ``src``, ``pos``, ``window``.
        """
        h, w = grid
        n = h * w
        frame = self.carrier // n
        fields = {"tokens": self.tokens, "kind": self.kind, "src": self.src, "pos": self.pos, "window": self.window}
        if layout == "one_token":
            frames = int(frame.max()) + 1 if frame.numel() else 1
            key = ((self.window * 2 + (self.kind != STATIC)) * frames + frame) * 2 + (self.kind == CONTEXTUAL)
            order = torch.argsort(key * n + self.pos)
            return {k: v[order] for k, v in fields.items()}
        if layout != "grid":
            raise ValueError(f"layout must be 'one_token' or 'grid'; got {layout!r}")
        if newline is None:
            raise ValueError("the 'grid' layout needs the newline embedding")
        # carrier order is already frame-major, position-minor: insert a newline after each row's run
        row = frame * h + self.pos // w
        last = torch.ones_like(row, dtype=torch.bool)
        last[:-1] = row[1:] != row[:-1]
        slots = torch.arange(row.numel(), device=row.device) + torch.cumsum(last.long(), 0) - last.long()
        size = row.numel() + int(last.sum())
        nl_slots = slots[last] + 1
        out = {}
        fill = {"tokens": newline.to(self.tokens), "kind": NEWLINE, "src": -1, "pos": -1}
        for key, value in fields.items():
            full = value.new_empty((size,) + tuple(value.shape[1:]))
            full[slots] = value
            full[nl_slots] = self.window[last] if key == "window" else fill[key]
            out[key] = full
        return out


def _merge_clusters(x: Tensor, centers: Tensor, labels: Tensor, beta: float, no_beta: bool) -> Tensor:
    """Merge every cluster of ``x`` ``(B, M, D)`` into its centre.

    ``centers`` ``(B, K)`` sorted token indices; ``labels`` ``(B, M)`` cluster of every token (centres
    included, they label themselves). Members are the non-centre tokens of a cluster.
    """
    b, m, d = x.shape
    k = centers.shape[1]
    is_center = torch.zeros(b, m, dtype=torch.bool, device=x.device)
    is_center.scatter_(1, centers, True)
    sums, counts = cluster_sums(x, labels, k, weight=~is_center)  # members only
    center_x = take_rows(x, centers)
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


class _Parts:
    """Output pieces in any order, with the token -> carrier links; sorted by carrier at the end."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cols: dict[str, list[Tensor]] = {k: [] for k in ("tokens", "kind", "src", "pos", "window", "carrier")}
        self.sources: list[Tensor] = []
        self.targets: list[Tensor] = []

    def add(self, tokens: Tensor, kind: int, src: Tensor, pos: Tensor, window: Tensor, carrier: Tensor) -> None:
        count = tokens.shape[0]
        for key, value in (
            ("tokens", tokens),
            ("kind", torch.full((count,), kind, dtype=torch.long, device=self.device)),
            ("src", src),
            ("pos", pos),
            ("window", window.expand(count) if window.dim() == 0 else window),
            ("carrier", carrier),
        ):
            self.cols[key].append(value)

    def link(self, sources: Tensor, carriers: Tensor) -> None:
        self.sources.append(sources.reshape(-1))
        self.targets.append(carriers.reshape(-1))


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

    If the reference's rounding would keep no token at all (only possible for grids of a few tokens
    at a tiny ``retain``), the highest-attention token of the first frame is kept.
    """
    t, n, dim = features.shape
    device = features.device
    feats = features.float()
    if t > 1:
        norms = feats.norm(dim=-1).clamp(min=1e-12)
        cosine = torch.linalg.vecdot(feats[:-1], feats[1:]) / (norms[:-1] * norms[1:])  # (T-1, n)
        run = static_runs((cosine > tau).cpu().numpy())
        windows, reduced = select_windows(window_gains(run), max_window_size)
    else:
        run = np.zeros((1, n), dtype=np.int64)
        windows, reduced = [(0, 0)], 0
    total = t * n
    ratio = min(retain / ((total - reduced) / total), 1)

    starts = np.array([s for s, _ in windows])
    lengths = np.array([e - s + 1 for s, e in windows])
    static_np = (run[starts] >= (lengths - 1)[:, None]) & (lengths > 1)[:, None]  # (W, n)
    static_mask = torch.from_numpy(static_np).to(device)
    frame_window = torch.repeat_interleave(torch.arange(len(windows), device=device), torch.from_numpy(lengths).to(device))
    frame_static = static_mask[frame_window]  # (T, n)
    n_dyn = n - static_np.sum(axis=1)
    budget = [math.ceil(int(nd) * ratio) for nd in n_dyn]
    dominant = [round(m * (1 - d)) for m in budget]
    parts = _Parts(device)
    ar = torch.arange(n, device=device)

    # static tokens, per multi-frame window: temporal mean, then DPC-kNN clusters (round budget)
    for w_i, (s, e) in enumerate(windows):
        n_static = int(static_np[w_i].sum())
        c = round(n_static * ratio) if e > s else 0
        if c == 0:
            continue
        smask = static_mask[w_i]
        spos = ar[smask]
        static_feat = feats[s : e + 1][:, smask].mean(dim=0)  # (n_static, D), the reference's form
        centers, labels, merged = _cluster(static_feat[None], c, k, beta, no_beta)
        cpos = spos[centers[0]]
        parts.add(merged[0], STATIC, torch.full((c,), -1, device=device), cpos, torch.tensor(w_i, device=device), s * n + cpos)
        frames = torch.arange(s, e + 1, device=device)[:, None]
        parts.link(frames * n + spos[None, :], (s * n + cpos[labels[0]])[None, :].expand(e - s + 1, -1))

    # dominant tokens, all frames at once: attention top-k among each frame's dynamic positions
    dom_t = torch.tensor(dominant, device=device)[frame_window]
    scores = attention.float().to(device).masked_fill(frame_static, -math.inf)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order).scatter_(1, order, ar.expand(t, n).contiguous())
    chosen = ranks < dom_t[:, None]
    fi, pi = chosen.nonzero(as_tuple=True)
    flat = fi * n + pi
    parts.add(feats[fi, pi], DOMINANT, flat, pi, frame_window[fi], flat)
    parts.link(flat, flat)

    # contextual tokens (d > 0): DPC-kNN clusters of each frame's remaining dynamic tokens
    for w_i, (s, e) in enumerate(windows):
        contextual = budget[w_i] - dominant[w_i]
        if contextual <= 0:
            continue
        length = e - s + 1
        rest_mask = ~frame_static[s : e + 1] & ~chosen[s : e + 1]
        rest = rest_mask.nonzero()[:, 1].reshape(length, -1)  # ascending positions per frame
        rest_feat = take_rows(feats[s : e + 1], rest)
        centers, labels, merged = _cluster(rest_feat, contextual, k, beta, no_beta)
        frames = torch.arange(s, e + 1, device=device)[:, None]
        cpos = rest.gather(1, centers)
        carrier = frames * n + cpos
        parts.add(merged.reshape(-1, dim), CONTEXTUAL, carrier.reshape(-1), cpos.reshape(-1), torch.tensor(w_i, device=device),
                  carrier.reshape(-1))
        parts.link(frames * n + rest, carrier.gather(1, labels))

    if sum(c.numel() for c in parts.cols["carrier"]) == 0:  # nothing survived the rounding (tiny grids, tiny retain): keep one token
        p0 = attention[0].float().argmax().to(device)
        parts.add(feats[0, p0][None], DOMINANT, p0[None], p0[None], torch.tensor(0, device=device), p0[None])
        parts.link(p0[None], p0[None])
    cols = {key: torch.cat(value) for key, value in parts.cols.items()}
    order = torch.argsort(cols["carrier"])
    cols = {key: value[order] for key, value in cols.items()}
    slot_of = torch.full((total,), -1, dtype=torch.long, device=device)
    slot_of[cols["carrier"]] = torch.arange(order.numel(), device=device)
    assign = torch.full((total,), -1, dtype=torch.long, device=device)
    assign[torch.cat(parts.sources)] = slot_of[torch.cat(parts.targets)]
    return HoliTomResult(
        tokens=cols["tokens"].to(features.dtype),
        kind=cols["kind"],
        src=cols["src"].long(),
        pos=cols["pos"],
        window=cols["window"],
        carrier=cols["carrier"],
        windows=windows,
        static_mask=static_mask,
        total_reduced=reduced,
        retain_ratio=ratio,
        assign=assign,
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
        positions: ``"kept"`` (default: every output token takes its carrier's original position id) or
            ``"compacted"`` (the shortened sequence renumbered consecutively, as the reference does; 1-D
            positions only). Either way the tokens are in carrier order (see the module docstring).
        inner: HoliTom's in-LLM merge (step 4, ``HOLITOM_k``/``HOLITOM_r``) chained after this part:
            ``True`` for :class:`~tokcompress.policies.holitom_inner.HoliTomInner` with the reference
            defaults (``HOLITOM_r = 0.5``; ``HOLITOM_k = 18`` of 28 layers, scaled to the depth), or any
            ``stage="layer"`` policy object (e.g. ``HoliTomInner(retain=0.5, layer=18)``); ``None``/``False``
            for none ("HoliTom w/o M"). :meth:`stages` lists it, the engine runs it inside the LM.
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
    positions: str = "kept"
    inner: Policy | bool | None = None

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
        check_positions(self.positions)
        if self.inner is True:
            self.inner = HoliTomInner()
        elif self.inner is False:
            self.inner = None
        if self.inner is not None:
            if not isinstance(self.inner, Policy):
                raise TypeError(f"inner must be a Policy (HoliTom's in-LLM stage); got {type(self.inner).__name__}")
            if self.inner.stage == "input":
                raise ValueError("inner must act inside the language model (stage 'layer'); chain input policies with Sequential")

    def stages(self) -> list[Policy]:
        """This outer part, then the in-LLM stage when one is chained (``inner``)."""
        return [self] + ([] if self.inner is None else self.inner.stages())

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset() if self.inner is None else frozenset(self.inner.needs)

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
        outer = f"{self.name}(retain={self.retain:g}, tau={self.tau if self.tau is not None else 'preset'}, d={self.d:g})"
        return outer if self.inner is None else f"{outer} -> {self.inner.label}"

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
        info = {
            "segments": [(s, e + 1) for s, e in res.windows],  # half-open, as Compression.info segments are
            "total_reduced": res.total_reduced,
            "retain_ratio": res.retain_ratio,
            "kinds": torch.bincount(res.kind, minlength=3).tolist(),
        }
        return Compression(keep=res.carrier, values=res.tokens, assign=res.assign, info=info)


__all__ = ["HoliTom", "HoliTomResult", "holitom_outer", "select_windows", "static_runs", "window_gains"]
