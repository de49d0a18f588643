"""FastV: drop the visual tokens the last prompt token attends to least, inside the language model.

Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024. Reference:
pkunlp-icler/FastV @ d1659729 (``LlamaModel.forward`` "Token Drop" branch and the llava-hf
``LlamaModel.fastv_forward``, which derives the count from the ratio).

At decoder layer ``K`` the visual tokens are ranked by the attention that the last prompt token paid
them at layer ``K - 1`` (mean over heads); the top ``round(N * (1 - R))`` survive (Python ``round``:
half to even) and layers ``>= K`` run on the shorter sequence with the survivors' original positions,
so their KV cache holds fewer entries. Decoding is untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..policy import LayerPolicy, check_layer, check_retain, scaled_layer
from ..registry import register
from ..tokens import Compression, LayerTokens, selection


def top_indices(scores: Tensor, count: int) -> Tensor:
    """Indices of the ``count`` largest ``scores``, ascending; ties go to the lower index.

    (CPU ``torch.topk`` returns tied values lowest index first too; on CUDA its tie order is
    unspecified, so a stable sort is used instead.)
    """
    order = torch.sort(scores, descending=True, stable=True).indices[:count]
    return order.sort().values


def ratio_round(n: int, drop: float) -> int:
    """``round(n * (1 - drop))`` with Python's round (half to even) on a double, the FastV / HoliTom budget.

    ``n = 197, drop = 0.5`` gives 98; ``n = 450, drop = 0.9`` gives 45 (``450 * 0.09999999999999998``).
    """
    return int(round(n * (1.0 - drop)))


def fastv_select(scores: Tensor, count: int) -> Tensor:
    """FastV's selection core: the ``count`` most attended tokens.

    Args:
        scores: ``(N,)`` attention of the last prompt token to each visual token (mean over heads).
        count: tokens to keep (``0 <= count <= N``).

    Returns:
        ``(count,)`` int64 sorted indices into ``scores``.
    """
    if not 0 <= count <= scores.numel():
        raise ValueError(f"count must be in [0, {scores.numel()}]; got {count}")
    return top_indices(scores.float(), count)


@register("fastv")
@dataclass
class FastV(LayerPolicy):
    """FastV (ECCV 2024) as an in-layer policy.

    Args:
        retain: fraction of the visual tokens that layers ``>= layer`` keep, ``1 - R`` in the paper's
            notation (``R`` = filtering ratio, ``FASTV_r``). Budget: ``round(N * (1 - R))``, half to even,
            with ``R = 1 - retain``.
        layer: ``K`` (``FASTV_k``), the first layer that runs on the pruned sequence. ``None`` takes the
            paper's ``K = 2`` for a 32-layer model, scaled to the model's depth
            (:func:`tokcompress.policy.scaled_layer`: 28 layers -> 2, 4 layers -> 1).

    The candidates are the video grid tokens that reach the language model (after any input-stage
    policy of the chain); special tokens inside a video span (LLaVA-OneVision's trailing newline)
    are always kept, whereas the reference lets them compete.
    """

    retain: float = 0.5
    layer: int | None = None

    #: (K, depth) of the reference setting: LLaVA-1.5-7B, 32 layers, K = 2.
    reference_layer = (2, 32)

    def __post_init__(self) -> None:
        self.retain = check_retain(self.retain)
        self.layer = check_layer(self.layer)

    @property
    def label(self) -> str:
        return f"fastv(retain={self.retain:g}, layer={self.layer if self.layer is not None else 'auto'})"

    def resolve_layer(self, depth: int) -> int:
        return self.layer if self.layer is not None else scaled_layer(*self.reference_layer, depth)

    def budget(self, n: int) -> int:
        return min(n, ratio_round(n, 1.0 - self.retain))

    def select(self, tokens: LayerTokens) -> Compression:
        scores = tokens.attention.float().mean(dim=0)[-1]  # (N,): mean over heads, last query row
        return selection(fastv_select(scores, self.budget(tokens.num_tokens)))
