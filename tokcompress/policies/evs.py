"""EVS: Efficient Video Sampling, pruning the tokens that did not change since the previous frame.

Paper: "Efficient Video Sampling: Pruning Temporally Redundant Tokens for Faster VLM Inference"
(NVIDIA, arXiv 2510.14624). Reference: vLLM ``vllm/multimodal/evs.py::compute_retention_mask``
and ``compute_retained_tokens_count`` (vllm-project/vllm @ ``094f117823287790739d3022162a3f30f13d758b``),
applied to the post-merger video embeddings of Qwen2.5-VL / Qwen3-VL (``video_pruning_rate = q``).

The reference scores each token by its cosine dissimilarity to the token at the same grid cell
in the previous temporal step, gives frame 0 the sentinel 255 (so it is always kept whole), and
keeps ``K = max(h*w, int(T*h*w*(1 - q)))`` tokens by a stable descending ``argsort`` of all
scores. :func:`stable_top_k` gives the same selection without sorting everything.

This module also holds the selection shared with the pixel variant ``evs_pixel``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..policy import Policy
from ..registry import register
from ..tokens import Compression, TokenSet

#: The reference's score for frame-0 tokens: above any cosine dissimilarity (at most 2).
FIRST_FRAME_SCORE = 255.0
#: Elements per working buffer (1 MiB of float32): large inputs are scored a block of grid cells at
#: a time so that the normalised tokens and their products stay in cache instead of making
#: full-size copies; inputs up to a few blocks are scored whole.
BLOCK_ELEMENTS = 1 << 18


def evs_count(num_frames: int, tokens_per_frame: int, q: float) -> int:
    """The reference's budget ``max(n, int(T * n * (1 - q)))`` (``int`` floors; double precision)."""
    return max(tokens_per_frame, int(num_frames * tokens_per_frame * (1 - q)))


def evs_dissimilarity(features: Tensor, eps: float = 1e-8) -> Tensor:
    """``(T, n, D)`` tokens -> ``(T, n)`` scores: ``1 - cos(E[t, i], E[t-1, i])``, frame 0 = 255.

    Bit-for-bit what the reference gets from ``torch.nn.functional.cosine_similarity(E[1:], E[:-1],
    dim=-1)`` (eps 1e-8) in the features' dtype, which computes ``sum((a / max(|a|, eps)) *
    (b / max(|b|, eps)))``; here every frame is normalised once instead of twice and, for large
    inputs, a block of grid cells at a time into two reused buffers (the same element-wise operations
    and the same row sums, so the same bits, without full-size temporaries). In float16, where 1e-8
    underflows to 0 and the reference turns a zero token into NaN, ``eps`` is raised to the smallest
    normal float16 (a zero token then has similarity 0, as in float32).
    """
    if features.dim() != 3:
        raise ValueError(f"features must be (T, n, D); got shape {tuple(features.shape)}")
    t = features.shape[0]
    scores = torch.full_like(features[:, :, 0], FIRST_FRAME_SCORE)
    if t == 1:
        return scores
    eps = max(eps, torch.finfo(features.dtype).tiny) if features.is_floating_point() else eps
    norms = torch.linalg.vector_norm(features, dim=-1, keepdim=True).clamp_min_(eps)
    if features.numel() <= 4 * BLOCK_ELEMENTS:
        unit = features / norms
        scores[1:] = 1 - (unit[1:] * unit[:-1]).sum(-1)
        return scores
    n, d = features.shape[1:]
    rows = min(n, max(1, BLOCK_ELEMENTS // d))
    previous = features.new_empty(rows, d)
    current = features.new_empty(rows, d)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        prev, cur = previous[: r1 - r0], current[: r1 - r0]
        torch.div(features[0, r0:r1], norms[0, r0:r1], out=prev)
        for i in range(1, t):
            torch.div(features[i, r0:r1], norms[i, r0:r1], out=cur)
            prev.mul_(cur)  # the previous frame's units are not needed any more
            torch.sum(prev, -1, out=scores[i, r0:r1])
            prev, cur = cur, prev
    scores[1:] = 1 - scores[1:]
    return scores


def stable_top_k(scores: Tensor, k: int) -> Tensor:
    """Sorted indices of the ``k`` largest ``scores``, ties to the lower index.

    The same set as ``argsort(scores, descending=True, stable=True)[:k]`` (the reference's rule),
    found with one selection (``kthvalue``) instead of a full sort.
    """
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D; got shape {tuple(scores.shape)}")
    m = scores.numel()
    if not 0 <= k <= m:
        raise ValueError(f"k must be in [0, {m}]; got {k}")
    if k == m:
        return torch.arange(m, device=scores.device)
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    if bool(torch.isnan(scores).any()):
        raise ValueError("scores contain NaN; the token embeddings must be finite")
    cut = torch.kthvalue(scores, m - k + 1).values  # the k-th largest value
    above = scores > cut
    tied = (scores == cut).nonzero().squeeze(1)[: k - int(above.sum())]
    mask = above
    mask[tied] = True
    return mask.nonzero().squeeze(1)


def evs_keep(scores: Tensor, k: int) -> Tensor:
    """``(T, n)`` scores -> sorted flat indices: frame 0 whole plus the ``k - n`` best later tokens.

    Equals the reference's stable global top-``k`` as long as frame 0 scores above every later
    token (the 255 sentinel for ``evs``; ``evs_pixel`` has no sentinel and forces frame 0 here).
    """
    t, n = scores.shape
    if not n <= k <= t * n:
        raise ValueError(f"k must keep at least the first frame and at most every token: {n} <= k <= {t * n}; got {k}")
    first = torch.arange(n, device=scores.device)
    rest = stable_top_k(scores[1:].reshape(-1), k - n) + n
    return torch.cat([first, rest])


def evs_retention_mask(features: Tensor, q: float) -> Tensor:
    """The reference's ``compute_retention_mask`` on ``(T, h, w, D)`` or ``(T, n, D)`` merged tokens.

    Returns a ``(T * n,)`` bool mask over the flat tokens (raster order, time-major).
    """
    if features.dim() == 4:
        features = features.reshape(features.shape[0], -1, features.shape[-1])
    t, n = features.shape[:2]
    keep = evs_keep(evs_dissimilarity(features), evs_count(t, n, q))
    mask = torch.zeros(t * n, dtype=torch.bool, device=features.device)
    mask[keep] = True
    return mask


@register("evs")
@dataclass
class EVS(Policy):
    """Prune tokens that barely changed since the same grid cell of the previous temporal step.

    ``retain`` maps to the reference's pruning rate as ``q = 1 - retain``, and the budget is the
    reference's ``K = max(h*w, int(T*h*w*(1 - q)))`` evaluated with that ``q`` in double precision,
    so ``EVS(retain=1 - q)`` keeps exactly what vLLM keeps at ``--video-pruning-rate q``. Because
    ``1 - (1 - retain)`` is not always ``retain`` in floating point, ``K`` can fall one below
    ``T*h*w*retain`` when that product is an integer (``retain=0.1`` on 100 tokens keeps 9, as vLLM
    does at ``q=0.9``). The first temporal step is always kept whole, so ``K`` is never below one
    frame's tokens (with ``T = 1`` everything is kept).

    Per family: ``T`` is the temporal grid the tokens come in (Qwen-VL: steps of
    ``frames_per_step = 2`` input frames, as in vLLM); LLaVA-OneVision's trailing newline and
    Video-LLaVA's CLS tokens are outside the TokenSet and always kept. Survivors keep their
    original positions (vLLM keeps the original M-RoPE ids). Needs the full grid, so it must come
    first in a chain.

    Shapes: ``tokens.features`` ``(T, n, D)`` -> ``keep`` ``(K,)`` sorted flat indices.
    """

    retain: float = 0.25

    accepts_partial = False

    @property
    def q(self) -> float:
        """The reference's ``video_pruning_rate``."""
        return 1 - self.retain

    def compress(self, tokens: TokenSet) -> Compression:
        tokens.require_full(self.name)
        scores = evs_dissimilarity(tokens.features)
        k = evs_count(tokens.num_frames, tokens.tokens_per_frame, self.q)
        return Compression(keep=evs_keep(scores, k))


__all__ = ["EVS", "evs_count", "evs_dissimilarity", "evs_keep", "evs_retention_mask", "stable_top_k"]
