"""The model-agnostic token set a policy sees, and the compression it returns.

A policy never touches a model: the engine cuts one video's visual tokens out of the language-model
input, wraps them in a :class:`TokenSet`, and applies the :class:`Compression` the policy returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .errors import PolicyOutputError


@dataclass
class TokenSet:
    """The visual tokens of one video.

    Attributes:
        features: ``(T, n, D)`` tokens in the language model's embedding space (projector output),
            frame-major, each frame in raster order over its ``h x w`` grid (``n = h * w``). Tokens
            the model adds around the grid (a trailing newline, a per-frame CLS) are not included.
        grid: ``(T, h, w)``. For Qwen-VL models ``T`` counts temporal patches (``frames_per_step``
            input frames each).
        available: ``(T, n)`` bool of the tokens still present when the policy runs after another
            one in a chain; ``None`` means all are present.
        signals: optional extra inputs, by name: ``"pixels"`` ``(F, C, H, W)`` raw frames,
            ``"vision_attention"`` ``(T, n)`` attention each token receives in the vision layer the
            features come from (mean over heads and queries, pooled like the features),
            ``"frame_query_attention"`` ``(T, n)`` one pooled query's attention per frame (the CLS
            query, or the mean query of towers without CLS), ``"vision_features"`` ``(F, P, C)`` that
            layer's output before the projector, ``"frame_features"`` ``(T, D')``, ... (see
            ``tokcompress/adapters/vision_signals.py``)
        query: ``(Q, D)`` embeddings of the prompt text that follows the video (the question), or ``None``.
        layout: model family the tokens come from (``"llava_onevision"``, ``"qwen2_5_vl"``, ...,
            ``"generic"``), for policies whose reference defaults differ per model.
        frames_per_step: input frames per temporal step of ``grid`` (2 for Qwen-VL, else 1).
    """

    features: Tensor
    grid: tuple[int, int, int]
    available: Tensor | None = None
    signals: dict[str, Tensor] = field(default_factory=dict)
    query: Tensor | None = None
    layout: str = "generic"
    frames_per_step: int = 1

    def __post_init__(self) -> None:
        t, h, w = (int(v) for v in self.grid)
        self.grid = (t, h, w)
        if self.features.dim() == 4:  # accept (T, h, w, D) for convenience
            self.features = self.features.reshape(t, h * w, self.features.shape[-1])
        if self.features.dim() != 3 or tuple(self.features.shape[:2]) != (t, h * w):
            raise ValueError(
                f"features must have shape (T, h*w, D) = ({t}, {h * w}, D) for grid {self.grid}; "
                f"got {tuple(self.features.shape)}"
            )
        if self.available is not None and tuple(self.available.shape) != (t, h * w):
            raise ValueError(f"available must have shape (T, n) = ({t}, {h * w}); got {tuple(self.available.shape)}")

    @property
    def num_frames(self) -> int:
        return self.grid[0]

    @property
    def tokens_per_frame(self) -> int:
        return self.grid[1] * self.grid[2]

    @property
    def num_tokens(self) -> int:
        """Tokens in the full grid, ``T * h * w``."""
        return self.grid[0] * self.grid[1] * self.grid[2]

    @property
    def num_available(self) -> int:
        return self.num_tokens if self.available is None else int(self.available.sum())

    @property
    def dim(self) -> int:
        return self.features.shape[-1]

    def flat(self) -> Tensor:
        """``(T * n, D)`` view of the features, flat index ``t * n + y * w + x``."""
        return self.features.reshape(-1, self.dim)

    def grid_features(self) -> Tensor:
        """``(T, h, w, D)`` view of the features."""
        t, h, w = self.grid
        return self.features.reshape(t, h, w, self.dim)

    def available_index(self) -> Tensor:
        """Sorted flat indices of the available tokens."""
        if self.available is None:
            return torch.arange(self.num_tokens, device=self.features.device)
        return self.available.reshape(-1).nonzero().squeeze(1)

    def require_full(self, policy: str) -> None:
        """Raise if some tokens were already removed: for policies that need every grid cell."""
        if self.available is not None and not bool(self.available.all()):
            raise ValueError(
                f"policy {policy!r} needs the full frame grid, but an earlier policy in the chain removed tokens; "
                f"put {policy!r} first in the chain"
            )


@dataclass
class Compression:
    """What a policy keeps of a :class:`TokenSet`.

    Attributes:
        keep: ``(K,)`` int64, sorted and unique flat indices (``t * n + i``) of the tokens that survive
            or that carry a merged value; each output token takes that token's position.
        values: ``(K, D)`` embeddings written at ``keep`` (merging policies), or ``None`` when the
            kept tokens keep their own embeddings (selection).
        assign: ``(T * n,)`` int64, for each input token the output slot (index into ``keep``) it went
            into, ``-1`` when it was dropped; ``None`` for plain selection.
        info: policy diagnostics for people and plots, e.g. ``{"segments": [(0, 5), (5, 12)]}``
            (temporal segments are half-open ``(start, end)`` grid-step ranges; ``tokcompress.viz`` draws them).
    """

    keep: Tensor
    values: Tensor | None = None
    assign: Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def validate(self, tokens: TokenSet, policy: str) -> None:
        """Raise :class:`PolicyOutputError` unless this is a valid compression of ``tokens``."""
        keep = self.keep
        where = f"policy {policy!r} returned"
        if keep.dim() != 1 or keep.dtype != torch.long:
            raise PolicyOutputError(f"{where} keep of dtype {keep.dtype} and shape {tuple(keep.shape)}; expected (K,) int64")
        if keep.numel() == 0:
            raise PolicyOutputError(f"{where} no tokens; every policy must keep at least one token per video")
        if keep.numel() > 1 and not bool((keep[1:] > keep[:-1]).all()):
            raise PolicyOutputError(f"{where} keep indices that are not sorted and unique")
        if int(keep[0]) < 0 or int(keep[-1]) >= tokens.num_tokens:
            raise PolicyOutputError(f"{where} keep indices outside [0, {tokens.num_tokens})")
        if tokens.available is not None and not bool(tokens.available.reshape(-1)[keep].all()):
            raise PolicyOutputError(f"{where} tokens that an earlier policy in the chain had already removed")
        if self.values is not None and tuple(self.values.shape) != (keep.numel(), tokens.dim):
            raise PolicyOutputError(
                f"{where} values of shape {tuple(self.values.shape)}; expected ({keep.numel()}, {tokens.dim})"
            )
        if self.assign is not None and tuple(self.assign.shape) != (tokens.num_tokens,):
            raise PolicyOutputError(f"{where} assign of shape {tuple(self.assign.shape)}; expected ({tokens.num_tokens},)")


def selection(keep: Tensor, info: dict[str, Any] | None = None) -> Compression:
    """A compression that keeps ``keep`` unchanged (indices are sorted here)."""
    return Compression(keep=torch.sort(keep.long()).values, info=info or {})


@dataclass
class LayerTokens:
    """The visual tokens of one batch row at the input of decoder layer ``K`` (in-layer policies).

    Only the tokens that survived the earlier stages are present, in sequence order. The engine
    computes ``attention`` from layer ``K - 1``'s own query/key projections for the few query rows
    the policy asks for (no ``L x L`` matrix, any attention backend).

    Attributes:
        hidden: ``(N, D)`` hidden states entering layer ``K`` (the output of layer ``K - 1``).
        attention: ``(H, Q, N)`` float32 softmax attention of layer ``K - 1``, per head, from the ``Q``
            query rows the policy asked for to these tokens; each row was normalised over the whole
            sequence, so a row restricted to the visual columns sums to less than 1. Empty,
            ``(0, 0, N)``, for policies that read none (``LayerPolicy.queries = None``).
        positions: ``(N,)`` int64 indices into the original LM input of each token (its position id).
        video: ``(N,)`` int64 index of the video (within the row) each token comes from.
        frame: ``(N,)`` int64 temporal grid index of each token within its video.
        group: ``(N,)`` int64 group labels set by the input stage (an input policy returns them as
            ``Compression.info["token_groups"]``, one per kept token; PruneVid's static/dynamic groups),
            or ``None`` when the input stage defined none.
        layer: ``K``.
        cell: ``(N,)`` int64 flat index ``t*h*w + y*w + x`` of each token in its video's frame grid
            (so ``t``, ``y``, ``x`` follow from ``grids``), for policies that need the spatial layout
            (STTM); ``None`` where the engine did not provide it.
        grids: per video of the row, its ``(T, h, w)`` token grid (the ``video`` labels index it).
        queries: ``(Q,)`` int64 original positions of the query rows of ``attention``, or ``None``.
        entered: visual tokens of the row when the prefill entered the language model (after the
            input stages, before any in-layer stage): the base of budgets that several stages share.
    """

    hidden: Tensor
    attention: Tensor
    positions: Tensor
    video: Tensor
    frame: Tensor
    group: Tensor | None = None
    layer: int = 0
    cell: Tensor | None = None
    grids: tuple[tuple[int, int, int], ...] | None = None
    queries: Tensor | None = None
    entered: int | None = None

    @property
    def num_tokens(self) -> int:
        return self.hidden.shape[0]


@dataclass
class PromptTokens:
    """One batch row's language-model input embeddings (layer 0's input, after the input stages), for
    in-layer policies that pick their own query rows from the prompt (``LayerPolicy.queries = "chosen"``).

    Attributes:
        visual: ``(N, D)`` input embeddings of the row's visual tokens, in sequence order.
        text: ``(T, D)`` input embeddings of the candidate query rows: every prompt token after the
            row's last visual token (the question and the chat template's tail), in sequence order.
        text_positions: ``(T,)`` int64 original positions of the candidates.
    """

    visual: Tensor
    text: Tensor
    text_positions: Tensor


def check_query_choice(chosen: Tensor, prompt: PromptTokens, policy: str) -> None:
    """Raise :class:`PolicyOutputError` unless ``chosen`` is a non-empty sorted, unique subset of the candidates."""
    where = f"policy {policy!r} chose query rows"
    n = prompt.text.shape[0]
    if chosen.dim() != 1 or chosen.dtype != torch.long or chosen.numel() == 0:
        raise PolicyOutputError(f"{where} of dtype {chosen.dtype} and shape {tuple(chosen.shape)}; expected (Q,) int64, Q >= 1")
    if chosen.numel() > 1 and not bool((chosen[1:] > chosen[:-1]).all()):
        raise PolicyOutputError(f"{where} that are not sorted and unique")
    if int(chosen[0]) < 0 or int(chosen[-1]) >= n:
        raise PolicyOutputError(f"{where} outside [0, {n})")


@dataclass
class DecodeTokens:
    """The visual cache entries of one batch row at one decode step (decode-time policies).

    Attributes:
        attention: ``(H, N)`` float32 softmax attention of the current token at layer ``L - 1``, per
            head, over this row's visual cache entries (normalised over the whole cache, current
            token included).
        available: ``(N,)`` bool, entries still held by the cache of the layers the policy prunes
            (all True unless an earlier step evicted some).
        positions: ``(N,)`` int64 original positions of the entries.
        step: 0-based decode step.
    """

    attention: Tensor
    available: Tensor
    positions: Tensor
    step: int = 0

    @property
    def num_tokens(self) -> int:
        return self.attention.shape[-1]


@dataclass
class DecodeChoice:
    """What a decode-time policy decided for one row at one step.

    Attributes:
        keep: ``(M,)`` sorted int64 indices into the step's entries that layers ``>= L`` read, or
            ``None`` when this step prunes nothing (layers ``>= L`` read every available entry).
        memory: state handed back to the policy at the next step of the same row and generation.
        info: diagnostics for the record (e.g. ``{"similarity": 0.93}``).
    """

    keep: Tensor | None
    memory: Any = None
    info: dict[str, Any] = field(default_factory=dict)


def check_layer_result(result: Compression, tokens: LayerTokens, policy: str) -> None:
    """Raise :class:`PolicyOutputError` unless ``result`` is a valid selection of ``tokens``.

    In-layer policies may keep no token of a row (a reference budget that rounds to 0).
    """
    keep = result.keep
    where = f"policy {policy!r} returned"
    if keep.dim() != 1 or keep.dtype != torch.long:
        raise PolicyOutputError(f"{where} keep of dtype {keep.dtype} and shape {tuple(keep.shape)}; expected (M,) int64")
    if keep.numel() > 1 and not bool((keep[1:] > keep[:-1]).all()):
        raise PolicyOutputError(f"{where} keep indices that are not sorted and unique")
    if keep.numel() and (int(keep[0]) < 0 or int(keep[-1]) >= tokens.num_tokens):
        raise PolicyOutputError(f"{where} keep indices outside [0, {tokens.num_tokens})")
    if result.values is not None and tuple(result.values.shape) != (keep.numel(), tokens.hidden.shape[-1]):
        raise PolicyOutputError(
            f"{where} values of shape {tuple(result.values.shape)}; expected ({keep.numel()}, {tokens.hidden.shape[-1]})"
        )
