"""DivPrune: keep the most diverse visual tokens (greedy max-min on cosine distance).

Paper: Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models",
CVPR 2025. Reference: ``vbdi/divprune`` @ ``799e2d950aa01ba7860907f5a6d86061f885dca6``,
``LLaVA/llava/model/llava_arch.py::LlavaMetaForCausalLM.DivPrune`` (with
``pairwise_cosine_similarity``), called before LLM layer 0 with ``threshold_ratio = SUBSET_RATIO``.

The reference builds the full ``N x N`` distance matrix and, at greedy step ``i``, re-reduces the
``i`` selected rows (``O(K^2 N)``). :func:`divprune` gives the same selection with a running
minimum (``O(K N)`` after the distances) and, above :data:`FULL_MATRIX_MAX_TOKENS`, never holds an
``N x N`` matrix: distances are computed in blocks (step 0) and row by row in small batches (the
greedy), so memory is ``O(N * D + N * block)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..policy import Policy, check_positions
from ..registry import register
from ..tokens import Compression, TokenSet

#: Largest token count for which the full ``N x N`` distance matrix is built (1 GiB in float32).
FULL_MATRIX_MAX_TOKENS = 16384
#: Elements per block of distances on the blockwise path (64 Mi floats = 256 MiB in float32).
BLOCK_ELEMENTS = 1 << 26
#: Greedy rows computed per batch on the blockwise path.
ROW_BATCH = 256


def divprune_count(ratio: float, n: int) -> int:
    """The reference's budget: ``int(round(ratio * n))`` with Python's ``round`` (halves to even)."""
    return int(round(ratio * n))


def _unit_rows(x: Tensor) -> Tensor:
    """``x / ||x||`` row-wise in float32 (float64 kept). Zero rows stay zero instead of becoming NaN."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.to(dtype)
    norm = x.norm(dim=1, keepdim=True)
    return x / norm.clamp_min(torch.finfo(dtype).tiny)


def divprune(
    x: Tensor,
    k: int,
    *,
    full_matrix_max: int = FULL_MATRIX_MAX_TOKENS,
    block_elements: int = BLOCK_ELEMENTS,
    row_batch: int = ROW_BATCH,
) -> Tensor:
    """Greedy max-min diversity selection, as the reference's ``DivPrune``.

    Args:
        x: ``(N, D)`` tokens (any float dtype; computed in float32, or float64 for float64 input).
        k: number of tokens to select, ``0 <= k <= N``.
        full_matrix_max: build the whole ``(N, N)`` distance matrix when ``N`` is at most this;
            otherwise compute distances blockwise.
        block_elements, row_batch: sizes of the blockwise path (tests shrink them).

    Returns:
        ``(k,)`` int64 indices in selection order (step 0 first); empty for ``k = 0``.

    With ``Dm = 1 - Xn @ Xn.T`` (``Xn`` = rows scaled to unit norm): step 0 picks the token whose
    column of ``Dm`` has the largest second-smallest entry (its distance to the nearest other
    token, the self-distance being about 0); step ``i > 0`` picks the token whose smallest distance
    to the selected set is largest. Ties go to the lower index (``torch.argmax``). Unlike the
    reference, selected tokens are masked out explicitly, so indices are unique even for exactly
    duplicated tokens (the reference relies on the self-distance being the minimum).
    """
    if x.dim() != 2:
        raise ValueError(f"x must be (N, D); got shape {tuple(x.shape)}")
    n = x.shape[0]
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, N] = [0, {n}]; got {k}")
    device = x.device
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or infinite values; DivPrune needs finite token embeddings")
    if n == 1:  # the reference's topk(2) needs two tokens; one token is trivially the selection
        return torch.zeros(1, dtype=torch.long, device=device)
    xn = _unit_rows(x)
    if n <= full_matrix_max:
        return _greedy_full(xn, k)
    return _greedy_blockwise(xn, k, block_elements, row_batch)


def _greedy_full(xn: Tensor, k: int) -> Tensor:
    dist = xn @ xn.T
    dist.neg_().add_(1.0)  # Dm = 1 - cos, in place: one N x N buffer
    first = int(torch.topk(dist, 2, dim=0, largest=False).values[1].argmax())
    score = torch.full((xn.shape[0],), float("inf"), dtype=xn.dtype, device=xn.device)
    return _greedy_from(first, k, score, lambda j: dist[j])


def _greedy_blockwise(xn: Tensor, k: int, block_elements: int, row_batch: int) -> Tensor:
    n = xn.shape[0]
    # Step 0: second-smallest entry of every column, one column block at a time.
    cols = max(1, block_elements // n)
    second = torch.empty(n, dtype=xn.dtype, device=xn.device)
    for c0 in range(0, n, cols):
        block = xn @ xn[c0 : c0 + cols].T  # (N, b): columns c0.. of Xn @ Xn.T
        block.neg_().add_(1.0)
        second[c0 : c0 + cols] = torch.topk(block, 2, dim=0, largest=False).values[1]
        del block
    first = int(second.argmax())
    score = torch.full((n,), float("inf"), dtype=xn.dtype, device=xn.device)
    rows = _RowBatches(xn, score, row_batch)
    return _greedy_from(first, k, score, rows.row)


class _RowBatches:
    """Rows ``Dm[j]`` on demand. On a miss, computes the rows of ``j`` and of the best-scoring
    candidates in one matrix product: the next picks are almost always among them."""

    def __init__(self, xn: Tensor, score: Tensor, batch: int) -> None:
        self.xn, self.score, self.batch = xn, score, batch
        self.cache: dict[int, Tensor] = {}

    def row(self, j: int) -> Tensor:
        if j not in self.cache:
            self.cache.clear()
            top = torch.topk(self.score, min(self.batch, self.score.numel())).indices
            top = top[torch.isfinite(self.score[top]) & (top != j)][: self.batch - 1]
            cand = torch.cat([top.new_tensor([j]), top])
            rows = self.xn[cand] @ self.xn.T
            rows.neg_().add_(1.0)
            self.cache = dict(zip(cand.tolist(), rows.unbind(0)))
        return self.cache.pop(j)


def _greedy_from(first: int, k: int, score: Tensor, row) -> Tensor:
    """Running-min greedy from pick ``first``.

    ``score`` (``(N,)``, all ``+inf`` on entry) becomes ``min over selected j of Dm[j, i]``, and
    ``-inf`` for selected tokens (``min`` keeps them there), so each pick costs one row of ``Dm``.
    """
    order = torch.empty(k, dtype=torch.long, device=score.device)
    j = first
    order[0] = j
    for i in range(1, k):
        torch.minimum(score, row(j), out=score)
        score[j] = float("-inf")
        j = int(score.argmax())
        order[i] = j
    return order


@register("divprune")
@dataclass
class DivPrune(Policy):
    """Keep the ``K`` most mutually distant tokens of the whole video (greedy max-min, cosine).

    ``retain`` is the reference's ``threshold_ratio`` (``SUBSET_RATIO``): over the ``N`` available
    visual tokens of one video (all frames together; DivPrune has no notion of time),
    ``K = int(round(retain * N))`` with Python's ``round``, exactly as the reference. A policy must
    keep at least one token per video, so a budget that rounds to 0 is clamped to 1 (the first
    token of the reference's greedy order, i.e. the most isolated one); the core :func:`divprune`
    itself returns an empty selection for ``k = 0``.

    Survivors keep their own embeddings; ``info["order"]`` holds the flat indices in selection order.
    ``positions``: ``"kept"`` (default: survivors keep their original position ids) or
    ``"compacted"`` (the shortened prompt renumbered consecutively, as the reference's rebuilt input
    is; 1-D positions only, M-RoPE families keep their ids).

    Shapes: ``tokens.features`` ``(T, n, D)`` -> ``keep`` ``(K,)`` sorted flat indices.
    Reference: ``vbdi/divprune`` @ ``799e2d95``, ``LlavaMetaForCausalLM.DivPrune``. Deviation: the
    distances are computed in float32 whatever the model dtype (the paper's setting ran fp16 on GPU,
    where near-ties may resolve differently).
    """

    retain: float = 0.25
    positions: str = "kept"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positions(self.positions)

    def compress(self, tokens: TokenSet) -> Compression:
        cand = tokens.available_index()
        k = max(1, divprune_count(self.retain, cand.numel()))
        x = tokens.flat() if tokens.available is None else tokens.flat()[cand]  # no copy when all are present
        chosen = cand[divprune(x, k)]
        return Compression(keep=torch.sort(chosen).values, info={"order": chosen})


__all__ = ["DivPrune", "divprune", "divprune_count"]
