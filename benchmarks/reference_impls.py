"""Step-by-step transcriptions of the reference implementations, for speed and equivalence checks.

Each ``reference_<policy>(features, ...)`` follows the formulation of the official code (full
distance matrices, the same per-segment / per-frame / per-cluster Python loops, the same tensor
shapes), rewritten as a plain function over tensors with the model plumbing removed. They are the
baselines ``benchmarks/fastholi_speed.py`` times tokcompress against, and independent references the
tests compare with. The one deliberate change everywhere: DPC-kNN's ``torch.rand * 1e-6`` density
noise is left out (as in the golden cases), so results are deterministic.

* ``reference_dpc_knn``: cokeshao/HoliTom @ e9b2972f, ``LlavaMetaForCausalLM_holitom.cluster_dpc_knn``.
* ``reference_fastvid``: LunarShen/FastVID @ a40a109c, the ``Qwen2Model.forward`` FastVID blocks of
  ``fastvid_llavaonevision`` (parallel version) and ``fastvid_llavavideo`` (per-segment version), and
  the one in ``fastvid_qwen25vl``'s ``Qwen2_5_VLForConditionalGeneration.forward``.
* ``reference_holitom``: cokeshao/HoliTom @ e9b2972f, the video branch of
  ``prepare_inputs_labels_for_multimodal`` with ``select_static_windows``,
  ``get_static_dynamic_features``, ``holitom`` and the merge functions (``D > 0`` with the
  ``pos.masked_select(mask)`` fix the golden cases document).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


# ---------------------------------------------------------------------------------------------
# DPC-kNN
# ---------------------------------------------------------------------------------------------
def reference_dpc_knn(x: Tensor, k: int, cluster_num: int) -> tuple[Tensor, Tensor]:
    """``(index_center (B, cluster_num) in score order, dist_matrix (B, M, M))`` for ``x`` ``(B, M, C)``."""
    c = x.shape[-1]
    dist = torch.cdist(x.float(), x.float()) / (c**0.5)
    nearest = torch.topk(dist, k, dim=-1, largest=False).values
    density = (-(nearest**2).mean(dim=-1)).exp()
    denser = (density[:, None, :] > density[:, :, None]).type(x.dtype)
    dist_max = dist.flatten(1).max(dim=-1).values[:, None, None]
    parent = (dist * denser + dist_max * (1 - denser)).min(dim=-1).values
    score = parent * density
    return score.topk(cluster_num, dim=-1).indices, dist


def _density_score(x: Tensor, k: int = 4) -> Tensor:
    """FastVID's inline DPC score, ``x`` ``(B, M, C)`` -> ``(B, M)``."""
    dist = torch.cdist(x.float(), x.float()) / (x.shape[-1] ** 0.5)
    nearest = torch.topk(dist, k=k, dim=-1, largest=False).values
    density = (-(nearest**2).mean(dim=-1)).exp()
    denser = (density[:, None, :] > density[:, :, None]).type(x.dtype)
    dist_max = dist.flatten(1).max(dim=-1)[0][:, None, None]
    parent = (dist * denser + dist_max * (1 - denser)).min(dim=-1)[0]
    return parent * density


# ---------------------------------------------------------------------------------------------
# FastVID
# ---------------------------------------------------------------------------------------------
def _dyseg(frame_global: Tensor, c: int, tau: float) -> list[int]:
    g = frame_global / frame_global.norm(dim=1, keepdim=True)
    sim = (g[:-1] * g[1:]).sum(dim=1)
    cuts = torch.unique(torch.cat([torch.topk(sim, c - 1, largest=False).indices, torch.nonzero(sim < tau).squeeze(1)]))
    cuts = cuts.sort().values
    padded = F.pad(cuts, (1, 1), value=-1)
    padded[-1] = frame_global.shape[0] - 1
    return padded.diff().tolist()


def _fastvid_onevision(h: Tensor, attn: Tensor, g: Tensor, ratio: float, c: int, tau: float, d: float, p: int, beta: float):
    t, n, dim = h.shape
    frame_idx = torch.arange(t).unsqueeze(1)
    all_idx = torch.arange(t * n).view(t, n)
    sizes = _dyseg(g, c, tau)
    tokens, keep = [], []
    fr = int(n * ratio)
    n_sal = fr - int(fr * d)
    n_ctx = fr - n_sal
    ctx_count = torch.zeros(t, dtype=torch.int)
    offset = 0
    for length in sizes:
        per = (n_ctx * length) // ((length + p - 1) // p)
        back = torch.arange(length - 1, -1, -1)
        ctx_count[offset : offset + length][back % p == 0] = per
        offset += length
    sal = torch.topk(attn, n_sal, dim=1).indices
    rows = frame_idx.expand(-1, n_sal)
    tokens.append(h[rows, sal].view(-1, dim))
    keep.append(all_idx[rows, sal].view(-1))
    mask = torch.ones(t, n, dtype=torch.bool)
    mask.scatter_(1, sal, False)
    rest = torch.arange(n).unsqueeze(0).expand(t, -1)[mask].view(t, n - n_sal)
    rows = frame_idx.expand(-1, n - n_sal)
    rest_h = h[rows, rest]
    rest_idx = all_idx[rows, rest]
    score = _density_score(rest_h)
    centres = torch.topk(score, k=n_ctx, dim=-1).indices
    rows = frame_idx.expand(-1, n_ctx)
    ctx_h = rest_h[rows, centres]
    ctx_idx = rest_idx[rows, centres]
    unit = rest_h / rest_h.norm(dim=-1, keepdim=True)
    sim = torch.bmm(unit, unit[rows, centres].transpose(1, 2))
    one_hot = torch.zeros(t, n - n_sal, n_ctx).scatter_(2, sim.argmax(dim=2).unsqueeze(-1), 1)
    w = (1 / (one_hot.sum(dim=1).unsqueeze(-1) + 1)).clamp(min=beta)
    agg = torch.bmm(one_hot.transpose(1, 2), rest_h) / one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    ctx_h = w * ctx_h + (1 - w) * agg
    single = ctx_count == n_ctx
    tokens.append(ctx_h[single].view(-1, dim))
    keep.append(ctx_idx[single].view(-1))
    start = 0
    for length in sizes:
        if length > 1:
            counts = ctx_count[start : start + length]
            per = int(counts[-1])
            targets = counts > n_ctx
            num = int(targets.sum())
            seg_score = score[start : start + length][targets]
            seg_rest = rest_h[start : start + length]
            anchor_h = seg_rest[targets]
            seg_rest = seg_rest.reshape(1, -1, dim).expand(num, -1, -1)
            anchor_idx = rest_idx[start : start + length][targets]
            pick = torch.topk(seg_score, k=per, dim=-1).indices
            rows = frame_idx[:num].expand(-1, per)
            cur_h = anchor_h[rows, pick]
            cur_idx = anchor_idx[rows, pick]
            src = seg_rest / seg_rest.norm(dim=-1, keepdim=True)
            tgt = cur_h / cur_h.norm(dim=-1, keepdim=True)
            sim = torch.bmm(src, tgt.transpose(1, 2))
            one_hot = torch.zeros(num, src.shape[1], per).scatter_(2, sim.argmax(dim=2).unsqueeze(-1), 1)
            w = (1 / (one_hot.sum(dim=1).unsqueeze(-1) + 1)).clamp(min=beta)
            agg = torch.bmm(one_hot.transpose(1, 2), seg_rest) / one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
            tokens.append((w * cur_h + (1 - w) * agg).view(-1, dim))
            keep.append(cur_idx.view(-1))
        start += length
    tokens = torch.cat(tokens)
    keep = torch.cat(keep)
    order = torch.argsort(keep)
    return keep[order], tokens[order], sizes


def _fastvid_segmented(h, attn, g, ratio, c, tau, d, p, beta, qwen: bool, ignore: float = 0.95):
    t, n, dim = h.shape
    g = g / g.norm(dim=1, keepdim=True)
    sizes = _dyseg(g, c, tau)
    fr = int(n * ratio)
    out_h, out_idx = [], []
    seg_start = 0
    for seg_h, seg_a, seg_g in zip(torch.split(h, sizes), torch.split(attn, sizes), torch.split(g, sizes)):
        length = seg_a.shape[0]
        seg_retain = fr * length
        seg_ctx = max(int(seg_retain * d), 1) if qwen else int(seg_retain * d)
        seg_sal = seg_retain - seg_ctx
        if length == 1:
            sal_n, ctx_n = [seg_sal], [seg_ctx]
        else:
            if qwen:
                cuts = torch.nonzero((seg_g[:-1] * seg_g[1:]).sum(dim=1) < ignore).squeeze(1).sort().values.tolist()
                runs = [b - a for a, b in zip([-1] + cuts, cuts + [length - 1])]
            else:
                runs = [1] * length
            units = len(runs)
            sal_u = [seg_sal // units + (1 if i < seg_sal % units else 0) for i in range(units)]
            anchors = (units + p - 1) // p
            shares = [seg_ctx // anchors + (1 if i < seg_ctx % anchors else 0) for i in range(anchors)]
            ctx_u, used = [], 0
            for i in range(units):
                if i % p == 0:
                    ctx_u.append(min(shares[used], n // 2) if qwen else shares[used])
                    used += 1
                else:
                    ctx_u.append(0)
            ctx_u.reverse()
            if qwen:
                sal_n, ctx_n = [], []
                for size, s_v, c_v in zip(runs, sal_u, ctx_u):
                    sal_n += [0] * (size - 1)
                    ctx_n += [0] * (size - 1)
                    if c_v == 0:
                        sal_n.append(min(s_v, n))
                        ctx_n.append(0)
                    else:
                        ctx_n.append(min(c_v, n // 2))
                        sal_n.append(min(s_v, n - ctx_n[-1]))
            else:
                sal_n, ctx_n = sal_u, ctx_u
        sal_idx, ctx_idx = [], []
        for f in range(length):
            top = torch.topk(seg_a[f], sal_n[f]).indices if sal_n[f] > 0 else None
            if ctx_n[f] > 0:
                every = torch.arange(n)
                remaining = every[~torch.isin(every, top)] if top is not None else every
                score = _density_score(seg_h[f][remaining].unsqueeze(0))
                pick = torch.topk(score, k=ctx_n[f], dim=-1).indices[0].sort().values
                ctx_idx.append(remaining[pick] + f * n)
            if top is not None:
                sal_idx.append(top + f * n)
        flat = seg_h.reshape(length * n, -1)
        sal_idx = torch.cat(sal_idx)
        every = torch.arange(length * n)
        unit = flat / flat.norm(dim=-1, keepdim=True)
        merged = []
        for centres in ctx_idx:
            src = every[~torch.isin(every, torch.cat([sal_idx, centres]))]
            sim = torch.mm(unit[src], unit[centres].T)
            one_hot = torch.zeros(src.shape[0], centres.shape[0]).scatter_(1, sim.argmax(dim=1).unsqueeze(-1), 1)
            w = (1 / (one_hot.sum(dim=0).unsqueeze(-1) + 1)).clamp(min=beta)
            agg = torch.mm(one_hot.T, flat[src]) / one_hot.sum(dim=0).clamp(min=1).unsqueeze(-1)
            merged.append(w * flat[centres] + (1 - w) * agg)
        idx = torch.cat([sal_idx] + ctx_idx)
        val = torch.cat([flat[sal_idx]] + merged)
        order = torch.argsort(idx)
        out_h.append(val[order])
        out_idx.append(idx[order] + seg_start)
        seg_start += length * n
    return torch.cat(out_idx), torch.cat(out_h), sizes


def reference_fastvid(
    features: Tensor,
    frame_global: Tensor,
    frame_attn: Tensor,
    retention_ratio: float = 0.1,
    DySeg_c: int = 8,
    DySeg_tau: float = 0.9,
    STPrune_d: float = 0.4,
    DTM_p: int = 4,
    DTM_beta: float = 0.6,
    version: str = "llava_onevision",
    DySeg_ignore: float = 0.95,
) -> tuple[Tensor, Tensor, list[int]]:
    """``(keep (K,), tokens (K, D) in keep order, segment sizes)`` for ``features`` ``(T, n, D)``.

    ``version``: ``"llava_onevision"`` (parallel), ``"llava_video"`` or ``"qwen2_5_vl"`` (per segment).
    """
    args = (features, frame_attn, frame_global, retention_ratio, DySeg_c, DySeg_tau, STPrune_d, DTM_p, DTM_beta)
    if version == "llava_onevision":
        return _fastvid_onevision(*args)
    return _fastvid_segmented(*args, qwen=version == "qwen2_5_vl", ignore=DySeg_ignore)


# ---------------------------------------------------------------------------------------------
# HoliTom (outer part)
# ---------------------------------------------------------------------------------------------
def _static_windows(sim: Tensor, t: int, tau: float, max_window: int) -> tuple[list[tuple[int, int]], float]:
    cube = torch.ones((t, t, sim.shape[1]))
    for start in range(t - 1):
        run = torch.cumprod(sim[start:] > tau, dim=0)
        cube[start, start + 1 : start + 1 + len(run)] = run.float()
    lengths = (torch.arange(t).unsqueeze(0) - torch.arange(t).unsqueeze(1)).clamp(min=0)
    gains = (cube.sum(dim=-1) * lengths).float()
    dp = torch.zeros(t)
    prev = torch.zeros(t, dtype=torch.long)
    for i in range(t):
        best = dp[i - 1] if i > 0 else 0
        best_j = i
        for size in range(2, min(i + 1, max_window) + 1):
            j = i - size
            val = (dp[j] if j >= 0 else 0) + gains[j + 1, i]
            if val > best:
                best, best_j = val, j + 1
        dp[i] = best
        prev[i] = best_j
    windows, i = [], t - 1
    while i >= 0:
        windows.append((prev[i].item(), i))
        i = prev[i].item() - 1
    return windows[::-1], dp[-1].item()


def _merge_clusters(feat: Tensor, centres: Tensor, dist: Tensor, num: int, beta: float, no_beta: bool) -> Tensor:
    b, m, dim = feat.shape
    every = torch.arange(m).unsqueeze(0).expand(b, -1)
    others = torch.zeros((b, m - num), dtype=torch.long)
    for r in range(b):
        others[r] = every[r][~torch.isin(every[r], centres[r])]
    other_feat = torch.gather(feat, 1, others.unsqueeze(-1).expand(-1, -1, dim))
    d = torch.gather(dist, 1, others.unsqueeze(-1).expand(-1, -1, dist.size(-1)))
    d = torch.gather(d, 2, centres.unsqueeze(1).expand(-1, d.size(1), -1))
    label = torch.argmin(d, dim=-1)
    out = []
    for r in range(b):
        row = []
        for i in range(num):
            members = label[r] == i
            if members.any():
                group = other_feat[r][members]
                if not no_beta:
                    row.append(beta * feat[r][centres[r][i]] + (1 - beta) * group.mean(dim=0))
                else:
                    row.append(torch.cat([feat[r][centres[r][i]].unsqueeze(0), group], dim=0).mean(dim=0))
            else:
                row.append(feat[r][centres[r][i]])
        out.append(torch.stack(row))
    return torch.stack(out)


def _dynamic(feat, attn, pos, ratio, d, beta, k, no_beta):
    b, m, dim = feat.shape
    budget = math.ceil(m * ratio)
    dominant = round(budget * (1 - d))
    contextual = budget - dominant
    if dominant > 0:
        top = attn.topk(dominant, dim=1).indices
        mask = torch.ones_like(feat[:, :, 0], dtype=torch.bool).scatter_(1, top, False)
        dom = feat.masked_select(~mask.unsqueeze(-1)).view(b, dominant, dim)
        dom_pos = pos.masked_select(~mask).view(b, dominant)
    else:
        mask = torch.ones_like(feat[:, :, 0], dtype=torch.bool)
        dom, dom_pos = torch.empty((b, 0, dim)), torch.empty((b, 0), dtype=torch.long)
    if contextual > 0:
        rest = feat.masked_select(mask.unsqueeze(-1)).view(b, m - dominant, dim)
        rest_pos = pos.masked_select(mask).view(b, m - dominant)
        centres, dist = reference_dpc_knn(rest, min(k, contextual), contextual)
        centres = torch.sort(centres, dim=-1)[0]
        ctx_pos = torch.stack([rest_pos[r][centres[r]] for r in range(b)])
        ctx = _merge_clusters(rest, centres, dist, contextual, beta, no_beta)
    else:
        ctx, ctx_pos = torch.empty((b, 0, dim)), torch.empty((b, 0), dtype=torch.long)
    return torch.cat([dom, ctx], dim=1), torch.cat([dom_pos, ctx_pos], dim=1)


def reference_holitom(
    features: Tensor,
    attn: Tensor,
    RETAIN_RATIO: float = 0.1,
    T: float = 0.8,
    BETA: float = 0.6,
    D: float = 0.0,
    K: int = 7,
    MAX_WINDOW_SIZE: int = 1024,
    NO_BETA: str = "0",
) -> tuple[Tensor, list[tuple[int, int]], float, float]:
    """``(tokens (M, D) in LLaVA-OneVision order, windows, total_reduced, rescaled ratio)``.

    ``features`` ``(T, n, D)``, ``attn`` ``(T, n)``; parameters by the reference's environment names.
    """
    frames, n, dim = features.shape
    no_beta = NO_BETA != "0"
    normed = F.normalize(features, p=2, dim=-1)
    sim = F.cosine_similarity(normed[:-1], normed[1:], dim=-1)
    windows, reduced = _static_windows(sim, frames, T, MAX_WINDOW_SIZE)
    total = frames * n
    ratio = min(RETAIN_RATIO / ((total - reduced) / total), 1)
    out = []
    for s, e in windows:
        every = torch.arange(n).unsqueeze(0)
        if s == e:
            dyn, _ = _dynamic(features[s : e + 1], attn[s : e + 1], every, ratio, D, BETA, K, no_beta)
            out.append(dyn.flatten(0, 1))
            continue
        mask = torch.all(sim[s:e, :] > T, dim=0)
        static = features[s : e + 1, mask].mean(dim=0).unsqueeze(0)
        dyn, _ = _dynamic(
            features[s : e + 1, ~mask], attn[s : e + 1, ~mask], every[:, ~mask].expand(e - s + 1, -1), ratio, D, BETA, K, no_beta
        )
        num = round(static.shape[1] * ratio)
        if num > 0:
            centres, dist = reference_dpc_knn(static, min(K, num), num)
            centres = torch.sort(centres, dim=-1)[0]
            static = _merge_clusters(static, centres, dist, num, BETA, no_beta)
        else:
            static = torch.empty((1, 0, dim))
        out.append(torch.cat([static.flatten(0, 1), dyn.flatten(0, 1)]))
    return torch.cat(out), windows, reduced, ratio


__all__ = ["reference_dpc_knn", "reference_fastvid", "reference_holitom"]
