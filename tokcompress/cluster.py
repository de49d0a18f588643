"""Clustering cores shared by several policies: DPC-kNN and nearest-centre assignment.

DPC-kNN (density peaks clustering with k-nearest-neighbour density; Rodriguez & Laio 2014, in the
kNN form of TCFormer, Zeng et al. CVPR 2022) is what FastVID, HoliTom and PruneVid use to pick
"contextual" cluster centres among tokens. For tokens ``x_1..x_M`` of dimension ``C``:

* ``dist[i, j] = ||x_i - x_j||_2 / sqrt(C)`` (float32);
* ``density[i] = exp(-mean(d ** 2))`` over the ``k`` smallest entries ``d`` of row ``i``, the
  self-distance 0 included;
* ``parent[i] = min(dist[i, j] for j with density[j] > density[i])`` (strictly denser), or, for a
  token with no denser token, the largest entry of the whole distance matrix;
* ``score = parent * density``; the centres are the ``cluster_num`` highest scores.

Differences from the reference code (``cluster_dpc_knn`` in cokeshao/HoliTom @ e9b2972f and the
inline copies in LunarShen/FastVID @ a40a109c), all documented and deliberate:

* The references add ``torch.rand(M) * 1e-6`` to the density to break ties, so their output depends
  on the RNG state. Here there is no noise and ties are broken deterministically: equal densities
  are not "denser" than each other, and among equal scores the lower index ranks first (a stable
  descending sort). The golden cases were produced with the noise switched off and checked to be
  insensitive to it.
* Distances are exact to float32 rounding (a float64 Gram matrix, see :func:`scaled_cdist`); the
  references use ``torch.cdist``'s float32 matmul path, whose round-off (up to ~1e-3 relative on
  close points, and on the diagonal) can decide near-ties there. Self-distances are exactly 0.
* Above ``max_block`` distance entries the matrix is never materialised: rows are processed in
  blocks, once for the kNN densities and the global maximum, and once more for the parent
  distances. The result is exact (same formula, block by block), memory is ``O(block * M)``.

All functions accept ``(M, C)`` or batched ``(B, M, C)`` inputs and run on the input's device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

#: Largest number of distance entries (per call, over the batch) held at once; 2**26 floats = 256 MiB.
MAX_BLOCK = 1 << 26
#: Elements per working buffer of the row-wise squared norms (2 MiB of float64): large token sets are
#: squared a block of rows at a time instead of through one full-size product (whose fresh pages cost
#: more than the arithmetic).
NORM_BLOCK = 1 << 18


def squared_norms(x: Tensor) -> Tensor:
    """``(x * x).sum(-1)``, bit for bit, without a full-size temporary for large ``x``.

    Each row's sum is the same reduction over the same products whether the product is formed for
    all rows at once or for a block of rows, so the result does not depend on the blocking.
    """
    c = x.shape[-1]
    if x.numel() <= 4 * NORM_BLOCK or c == 0:
        return (x * x).sum(-1)
    out = x.new_empty(x.shape[:-1])
    if x.dim() == 2:
        pairs = [(x, out)]
    elif x.is_contiguous():
        pairs = [(x.reshape(-1, c), out.view(-1))]
    else:  # a block of rows of a batch (see _block_dist): one batch entry at a time
        pairs = [(x[i].reshape(-1, c), out[i].view(-1)) for i in range(x.shape[0])]
    step = max(1, NORM_BLOCK // c)
    buf = x.new_empty(step, c)
    for src, dst in pairs:
        for start in range(0, src.shape[0], step):
            chunk = src[start : start + step]
            prod = buf[: chunk.shape[0]]
            torch.mul(chunk, chunk, out=prod)
            torch.sum(prod, -1, out=dst[start : start + step])
    return out


def take_rows(x: Tensor, index: Tensor) -> Tensor:
    """``x.gather(1, index[..., None].expand(-1, -1, D))`` for ``x`` ``(B, M, D)``, ``index`` ``(B, K)``.

    The same rows copied with one ``index_select`` over the flattened tokens: on CPU a gather with
    an expanded index reads one index per element and is several times slower.
    """
    b, m, d = x.shape
    flat = index + torch.arange(b, device=index.device)[:, None] * m
    return x.reshape(b * m, d).index_select(0, flat.reshape(-1)).reshape(b, index.shape[1], d)


@dataclass
class DPCResult:
    """Output of :func:`dpc_knn`.

    Attributes:
        index: ``(..., cluster_num)`` int64 centre indices, highest score first (ties: lower index first).
        score: ``(..., M)`` float32 ``parent_distance * density``.
        density: ``(..., M)`` float32 local density.
        dist: ``(..., M, M)`` float32 scaled distance matrix when it was small enough to build at once
            (``M * M * B <= max_block``), else ``None``.
    """

    index: Tensor
    score: Tensor
    density: Tensor
    dist: Tensor | None = None

    @property
    def centers(self) -> Tensor:
        """``index`` sorted ascending (the order HoliTom and FastVID use the centres in)."""
        return self.index.sort(dim=-1).values


def scaled_cdist(a: Tensor, b: Tensor) -> Tensor:
    """``||a_i - b_j|| / sqrt(C)`` as float32, ``(..., Ma, C) x (..., Mb, C) -> (..., Ma, Mb)``.

    Computed as ``|a|^2 + |b|^2 - 2 a.b`` in float64 (one GEMM, about as fast on CPU as
    ``torch.cdist``'s float32 matmul path), then rounded to float32. Unlike ``torch.cdist`` (whose
    float32 matmul path loses up to ~1e-3 relative on close points and returns round-off on the
    diagonal) this is the exact distance to float32 rounding, so it is symmetric, zero for identical
    tokens, and the same whether rows are computed together or in blocks.
    """
    a64 = a.double()
    b64 = a64 if b is a else b.double()
    sq_a = squared_norms(a64)
    sq_b = sq_a if b is a else squared_norms(b64)
    # in place on the |a|^2 + |b|^2 matrix: the same GEMM (beta = 1) and element-wise steps as the
    # out-of-place forms, without two more matrix-sized buffers
    d2 = sq_a[..., :, None] + sq_b[..., None, :]
    d2 = d2.baddbmm_(a64, b64.transpose(-1, -2), alpha=-2) if a64.dim() == 3 else d2.addmm_(a64, b64.T, alpha=-2)
    return d2.clamp_min_(0).sqrt_().div_(math.sqrt(a.shape[-1])).float()


def _batched(x: Tensor, name: str = "x") -> tuple[Tensor, bool]:
    if x.dim() == 2:
        return x[None], True
    if x.dim() != 3:
        raise ValueError(f"{name} must have shape (M, C) or (B, M, C); got {tuple(x.shape)}")
    return x, False


def _rows_per_block(batch: int, m: int, max_block: int) -> int:
    return max(1, min(m, max_block // max(1, batch * m)))


def _block_dist(x: Tensor, start: int, stop: int) -> Tensor:
    """Scaled distances of rows ``start:stop`` to all rows, self-distances set to exactly 0."""
    d = scaled_cdist(x[:, start:stop], x) if (start, stop) != (0, x.shape[1]) else scaled_cdist(x, x)
    rows = torch.arange(stop - start, device=x.device)
    d[:, rows, rows + start] = 0.0
    return d


def dpc_density(x: Tensor, k: int, *, max_block: int = MAX_BLOCK) -> tuple[Tensor, Tensor, Tensor | None]:
    """kNN density of every token, the matrix maximum, and the matrix itself when it fits.

    Returns ``(density (B, M), dist_max (B,), dist (B, M, M) or None)`` for a batched ``(B, M, C)`` x.
    """
    b, m, _ = x.shape
    rows = _rows_per_block(b, m, max_block)
    if rows >= m:
        dist = _block_dist(x, 0, m)
        near = torch.topk(dist, k, dim=-1, largest=False).values
        density = (-(near**2).mean(dim=-1)).exp()
        return density, dist.flatten(1).max(dim=-1).values, dist
    density = x.new_empty(b, m, dtype=torch.float32)
    dist_max = torch.full((b,), -math.inf, device=x.device)
    for start in range(0, m, rows):
        stop = min(m, start + rows)
        d = _block_dist(x, start, stop)
        near = torch.topk(d, k, dim=-1, largest=False).values
        density[:, start:stop] = (-(near**2).mean(dim=-1)).exp()
        dist_max = torch.maximum(dist_max, d.flatten(1).max(dim=-1).values)
    return density, dist_max, None


def dpc_parent_distance(
    x: Tensor, density: Tensor, dist_max: Tensor, dist: Tensor | None = None, *, max_block: int = MAX_BLOCK
) -> Tensor:
    """``(B, M)`` distance of each token to its nearest strictly denser token (``dist_max`` for peaks)."""
    b, m, _ = x.shape

    def parent(d: Tensor, dens_rows: Tensor) -> Tensor:
        denser = density[:, None, :] > dens_rows[:, :, None]
        nearest = torch.where(denser, d, math.inf).min(dim=-1).values
        return torch.where(torch.isinf(nearest), dist_max[:, None].expand_as(nearest), nearest)

    if dist is not None:
        return parent(dist, density)
    rows = _rows_per_block(b, m, max_block)
    out = x.new_empty(b, m, dtype=torch.float32)
    for start in range(0, m, rows):
        stop = min(m, start + rows)
        out[:, start:stop] = parent(_block_dist(x, start, stop), density[:, start:stop])
    return out


def top_scores(score: Tensor, count: int) -> Tensor:
    """Indices of the ``count`` largest entries of the last dim, largest first, ties by lower index."""
    return torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :count]


def dpc_knn(x: Tensor, k: int, cluster_num: int, *, max_block: int = MAX_BLOCK) -> DPCResult:
    """DPC-kNN cluster centres of ``x``.

    Args:
        x: ``(M, C)`` or ``(B, M, C)`` tokens (any float dtype; computed in float32).
        k: neighbours for the density, the token itself included (``1 <= k <= M``).
        cluster_num: centres to return (``0 <= cluster_num <= M``).
        max_block: largest number of distance entries held at once (see the module docstring).

    Returns:
        :class:`DPCResult`; ``index`` is ``(cluster_num,)`` or ``(B, cluster_num)``.
    """
    xb, squeeze = _batched(x)
    m = xb.shape[1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= max(m, 1):
        raise ValueError(f"k must be an int in [1, M={m}] (neighbours counted with the token itself); got {k!r}")
    if isinstance(cluster_num, bool) or not isinstance(cluster_num, int) or not 0 <= cluster_num <= m:
        raise ValueError(f"cluster_num must be an int in [0, M={m}]; got {cluster_num!r}")
    if m == 0:
        empty = xb.new_zeros(xb.shape[0], 0)
        res = DPCResult(empty.long(), empty.float(), empty.float(), None)
    else:
        xb = xb.double()  # once, for every distance block (see scaled_cdist)
        density, dist_max, dist = dpc_density(xb, k, max_block=max_block)
        score = dpc_parent_distance(xb, density, dist_max, dist, max_block=max_block) * density
        res = DPCResult(top_scores(score, cluster_num), score, density, dist)
    if squeeze:
        res = DPCResult(res.index[0], res.score[0], res.density[0], None if res.dist is None else res.dist[0])
    return res


def nearest_center(x: Tensor, centers: Tensor, dist: Tensor | None = None, *, max_block: int = MAX_BLOCK) -> Tensor:
    """For every token, the position in ``centers`` of its nearest centre by L2 distance.

    Args:
        x: ``(M, C)`` or ``(B, M, C)`` tokens.
        centers: ``(K,)`` or ``(B, K)`` int64 token indices of the centres (``K >= 1``).
        dist: optional precomputed scaled distance matrix ``(..., M, M)`` (e.g. ``DPCResult.dist``);
            used as is, so assignments agree with the matrix the centres were chosen on.

    Returns:
        ``(M,)`` or ``(B, M)`` int64 in ``[0, K)``; ties go to the lower position in ``centers``.
    """
    xb, squeeze = _batched(x)
    cb = centers[None] if centers.dim() == 1 else centers
    b, m, c = xb.shape
    if cb.shape[-1] == 0:
        raise ValueError("nearest_center needs at least one centre")
    if dist is not None:
        db = dist[None] if dist.dim() == 2 else dist
        d = db.gather(2, cb[:, None, :].expand(b, m, cb.shape[-1]))
        out = d.argmin(dim=-1)
    else:
        cx = take_rows(xb, cb)
        rows = _rows_per_block(b, cb.shape[-1], max_block)
        out = torch.empty(b, m, dtype=torch.long, device=x.device)
        for start in range(0, m, rows):
            stop = min(m, start + rows)
            out[:, start:stop] = scaled_cdist(xb[:, start:stop], cx).argmin(dim=-1)
    return out[0] if squeeze else out


def cluster_sums(x: Tensor, labels: Tensor, k: int, weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-cluster sums and counts.

    Args:
        x: ``(..., M, D)`` tokens, batched like ``labels``, or one shared ``(M, D)`` (or ``(1, M, D)``)
            for all rows.
        labels: ``(..., M)`` int64 cluster of each token, in ``[0, k)``.
        weight: optional ``(..., M)`` bool; False excludes the token.

    Returns ``(sums (..., k, D), counts (..., k))`` in ``x``'s dtype. On CPU these are ``index_add_``
    (``O(M * D)`` per row, no ``(M, k)`` one-hot); on accelerators a one-hot matmul, which is
    deterministic there (``index_add_`` uses atomics).
    """
    if weight is not None:  # excluded tokens go to a dummy cluster k, dropped at the end
        labels = torch.where(weight.bool(), labels, torch.full_like(labels, k))
    kk = k + (weight is not None)
    lead = labels.shape[:-1]
    d = x.shape[-1]
    if x.dim() > 2 and math.prod(x.shape[:-2]) == 1:
        x = x.reshape(x.shape[-2], d)  # one token set for every row of labels
    shared = x.dim() == 2 and labels.dim() > 1
    if x.device.type == "cpu":
        rows = labels.reshape(-1, labels.shape[-1])
        sums = torch.zeros(rows.shape[0], kk, d, dtype=x.dtype, device=x.device)
        if shared:
            for r in range(rows.shape[0]):
                sums[r].index_add_(0, rows[r], x)
        else:
            offset = torch.arange(rows.shape[0], device=x.device)[:, None] * kk
            sums.view(-1, d).index_add_(0, (rows + offset).reshape(-1), x.reshape(-1, d))
        counts = torch.zeros(rows.shape[0], kk, dtype=x.dtype, device=x.device)
        counts.scatter_add_(1, rows, torch.ones_like(rows, dtype=x.dtype))
        sums, counts = sums.reshape(*lead, kk, d), counts.reshape(*lead, kk)
    else:
        one_hot = torch.nn.functional.one_hot(labels, kk).to(x.dtype)
        sums, counts = one_hot.transpose(-1, -2) @ x, one_hot.sum(dim=-2)
    return sums[..., :k, :], counts[..., :k]


__all__ = ["DPCResult", "cluster_sums", "dpc_density", "dpc_knn", "dpc_parent_distance", "nearest_center", "scaled_cdist", "squared_norms", "take_rows", "top_scores"]
