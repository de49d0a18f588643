"""Transcriptions of the reference formulations of LLaVA-Scissor, VidCom2, VisionZip and TS-LLaVA.

For ``benchmarks/policy_speed.py``: each ``*_reference(tokens, retain)`` follows its reference's own
code path step by step (numpy union-find with Python loops for LLaVA-Scissor, per-frame loops for
VidCom2 and VisionZip) and returns the sorted flat indices the matching tokcompress policy keeps, so
the benchmark can time both and check they agree; ``*_bytes(t, n, d)`` estimates the transcription's
peak memory. They live here, not in the library. Entries for the benchmark's ``POLICIES`` table::

    "llava_scissor": Bench(lambda r: LlavaScissor(tau=SCISSOR_TAU), llava_scissor_reference, llava_scissor_bytes),
    "vidcom2": Bench(lambda r: VidCom2(retain=r, exact_budget=False), vidcom2_reference, vidcom2_bytes),
    "visionzip": Bench(lambda r: VisionZip(retain=r), visionzip_reference, visionzip_bytes),  # needs signals
    "ts_llava": Bench(lambda r: TSLLaVA(retain=r), ts_llava_reference, ts_llava_bytes),

(``visionzip`` needs ``"vision_saliency"`` ``(T, n)`` and ``"vision_keys"`` ``(T, n, d)`` in the token
set's signals; STTM's reference is already vectorised the way tokcompress is, so it has no separate
transcription.)
"""

from __future__ import annotations


import numpy as np
import torch
import torch.nn.functional as F

from tokcompress.policy import keep_count
from tokcompress.tokens import TokenSet

#: LLaVA-Scissor's threshold in the benchmark (README default); its budget is not a ratio.
SCISSOR_TAU = 0.9


# ----------------------------------------------------------------------------------- LLaVA-Scissor


class _UnionFind:
    """The reference's union-find: union by rank, path halving, plain Python over numpy arrays."""

    def __init__(self, size: int) -> None:
        self.parent = np.arange(size, dtype=np.int64)
        self.rank = np.zeros(size, dtype=np.int32)

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, x: int, y: int) -> None:
        rx, ry = self.find(x), self.find(y)
        if rx == ry:
            return
        if self.rank[rx] < self.rank[ry]:
            self.parent[rx] = ry
        else:
            self.parent[ry] = rx
            if self.rank[rx] == self.rank[ry]:
                self.rank[rx] += 1


def _approximate_components(adj: np.ndarray, epsilon: float, rng: np.random.RandomState) -> list[list[int]]:
    """The reference's ``approximate_components``, including its raw-parent membership rule."""
    n = adj.shape[0]
    if n == 0:
        return []
    untouched = np.ones(n)
    s = min(n, int(np.ceil(np.log(n) / epsilon**2)))
    sampled = rng.choice(n, size=s, replace=False)
    untouched[sampled] = 0
    neighbours = {}
    for i in sampled:
        neighbours[i] = np.nonzero(adj[i])[0]
        untouched[neighbours[i]] = 0
    uf = _UnionFind(n)
    for i in sampled:
        for j in neighbours[i]:
            uf.union(i, j)
    roots = np.unique([uf.find(i) for i in sampled])
    comps = [np.where(uf.parent == r)[0].tolist() for r in roots]
    comps = [c for c in comps if c] + [[i] for i in np.nonzero(untouched)[0]]
    degree = np.count_nonzero(adj, axis=1)
    return sorted(comps, key=lambda c: min(c, key=lambda i: (-degree[i], i)))


def _key(comp: list[int], degree: np.ndarray) -> int:
    return min(comp, key=lambda i: (-degree[i], i))


def llava_scissor_reference(tokens: TokenSet, retain: float, tau: float = SCISSOR_TAU, epsilon: float = 0.05) -> torch.Tensor:
    """Spatial then temporal components (numpy, per frame), then the final merge; returns the kept key positions."""
    del retain  # the reference's count follows tau
    rng = np.random.RandomState(0)
    t, n, _ = tokens.features.shape
    x = tokens.features.float()
    xn = x / x.norm(dim=-1, keepdim=True)
    adj = (xn @ xn.transpose(1, 2) > tau).cpu().numpy()
    s1, s1_key = [], []
    for f in range(t):
        degree = np.count_nonzero(adj[f], axis=1)
        for comp in _approximate_components(adj[f], epsilon, rng):
            s1.append(x[f, comp].mean(0))
            s1_key.append(f * n + _key(comp, degree))
    s1 = torch.stack(s1)
    s1n = s1 / s1.norm(dim=-1, keepdim=True)
    adj2 = (s1n @ s1n.T > tau).cpu().numpy()
    degree2 = np.count_nonzero(adj2, axis=1)
    comps = _approximate_components(adj2, epsilon, rng)
    keep = [s1_key[_key(c, degree2)] for c in comps]
    # final merge of every token (timed as the reference does it; the kept positions do not depend on it)
    s2 = torch.stack([s1[c].mean(0) for c in comps])
    flat = x.reshape(t * n, -1)
    closest = torch.argmax((flat / flat.norm(dim=1, keepdim=True)) @ (s2 / s2.norm(dim=1, keepdim=True)).T, dim=1)
    merged = torch.zeros_like(s2).scatter_add_(0, closest[:, None].expand(-1, s2.shape[1]), flat)
    _ = (s2 + merged) / (torch.bincount(closest, minlength=len(comps)).float() + 1)[:, None]
    return torch.tensor(keep, dtype=torch.long)


def llava_scissor_bytes(t: int, n: int, d: int) -> int:
    m = t * n // 2  # step-1 tokens, a typical half
    return 4 * t * n * n + 5 * m * m + 8 * t * n * d


# ----------------------------------------------------------------------------------------- VidCom2


def vidcom2_reference(tokens: TokenSet, retain: float) -> torch.Tensor:
    """Channel variance, normalised features, per-scale Gaussian kernels, softmax frame weights, per-frame top-k."""
    t, n, d = tokens.features.shape
    x = tokens.features.float().reshape(t * n, d)
    channels = torch.topk(x.var(dim=0, unbiased=False), int(d * 0.5), largest=False).indices
    feats = F.normalize(x[:, channels], dim=-1).view(t, n, -1)
    video = feats.reshape(t * n, -1).mean(0)

    def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        dist = ((a - b) ** 2).sum(-1)
        return sum(torch.exp(-dist / (2 * alpha)) for alpha in (0.125, 0.25, 0.5, 1.0, 2.0))

    vid = torch.stack([kernel(feats[f], video) for f in range(t)])
    frame = torch.stack([kernel(feats[f], feats[f].mean(0)) for f in range(t)])
    u = -vid.mean(1)
    probs = torch.softmax((u - u.max()) / 0.01, dim=0)
    scales = (retain * (1 + probs - probs.mean())).clamp(max=1.0)
    keep = []
    for f in range(t):
        k = max(1, int((scales[f] * n).round()))
        keep.append(torch.topk(vid[f] + frame[f], k, largest=False, sorted=False).indices.sort().values + f * n)
    return torch.cat(keep)


def vidcom2_bytes(t: int, n: int, d: int) -> int:
    return 4 * t * n * d  # the channel selection copy, its normalised copy and per-frame differences


# --------------------------------------------------------------------------------------- VisionZip


def visionzip_reference(tokens: TokenSet, retain: float) -> torch.Tensor:
    """Per frame: top-k of the attention signal, targets within the rest, cosine assignment; returns kept positions."""
    t, n, _ = tokens.features.shape
    s = keep_count(retain, n)
    dominant = s * 54 // 64
    contextual = s - dominant
    keep = []
    for f in range(t):
        att = tokens.signals["vision_saliency"][f]
        metric = tokens.signals["vision_keys"][f].float()
        dom = torch.topk(att, dominant).indices
        mask = torch.ones(n, dtype=torch.bool, device=att.device)
        mask[dom] = False
        rest = torch.arange(n, device=att.device)[mask]
        step = max(1, rest.numel() // contextual) if contextual else 1
        targets = rest[torch.arange(0, rest.numel(), step, device=att.device)[:contextual]]
        kn = metric[rest] / metric[rest].norm(dim=-1, keepdim=True)
        _ = (kn @ (metric[targets] / metric[targets].norm(dim=-1, keepdim=True)).T).argmax(1)
        keep.append(torch.cat([dom, targets]).sort().values + f * n)
    return torch.cat(keep)


def visionzip_bytes(t: int, n: int, d: int) -> int:
    return 4 * n * n + 8 * n * d


# ---------------------------------------------------------------------------------------- TS-LLaVA


def ts_llava_reference(tokens: TokenSet, retain: float) -> torch.Tensor:
    """``sample_tokens``: ``round(linspace(0, N - 1, K))`` over the flattened video."""
    n = tokens.num_tokens
    return torch.linspace(0, n - 1, steps=keep_count(retain, n)).round().long()


def ts_llava_bytes(t: int, n: int, d: int) -> int:
    return 12 * t * n


__all__ = [
    "SCISSOR_TAU",
    "llava_scissor_bytes",
    "llava_scissor_reference",
    "ts_llava_bytes",
    "ts_llava_reference",
    "vidcom2_bytes",
    "vidcom2_reference",
    "visionzip_bytes",
    "visionzip_reference",
]
