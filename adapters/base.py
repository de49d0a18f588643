"""What an adapter knows about a model family, and the small types it hands to the engine.

An adapter holds facts, not plumbing: where the language model is, which token ids mark video
placeholders, how to read each video's frame grid from the call, which positions are M-RoPE, and
which extra language-model tensors must follow the tokens. The engine does all the hooking.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal

import torch
from torch import Tensor, nn


@dataclass
class VideoSpan:
    """One video in one batch row of the language-model input.

    Attributes:
        row: batch row.
        positions: ``(T*h*w,)`` sequence indices of the grid tokens, frame-major raster order.
        grid: ``(T, h, w)``.
        specials: sequence indices of the other placeholder tokens of this video (LLaVA-OneVision's
            trailing newline, Video-LLaVA's per-frame CLS); the engine always keeps them.
        frames_per_step: input frames per temporal grid step (2 for Qwen-VL).
        signals: per-video tensors captured from the vision tower (see ``TokenSet.signals``).
    """

    row: int
    positions: Tensor
    grid: tuple[int, int, int]
    specials: Tensor
    frames_per_step: int = 1
    signals: dict[str, Tensor] = field(default_factory=dict)

    @property
    def all_positions(self) -> Tensor:
        return torch.cat([self.positions, self.specials]).sort().values


@dataclass
class Capture:
    """A hook the engine installs on a vision-side module to record a per-call signal.

    ``fn(module, args, kwargs, output)`` returns the value to record (``output`` is ``None`` for
    pre-hooks); values are appended, one per call, under ``name`` until the next prefill uses them.
    """

    name: str
    module: nn.Module
    fn: Callable[[nn.Module, tuple, dict, Any], Any]
    when: Literal["pre", "post"] = "pre"


@dataclass
class CallContext:
    """What the engine saw of one forward call, for the adapter to locate videos in it."""

    target: Tensor  # (B, L) bool: placeholder tokens
    input_ids: Tensor | None
    inner_kwargs: dict[str, Any]  # kwargs the inner multimodal model received (tensors only)
    captured: dict[str, list[Any]]
    position_ids: Tensor | None  # as the language model received them


class Adapter:
    """Base class. Subclasses are small and declarative; see ``adapters/llava_onevision.py``."""

    #: Short family name, also the ``TokenSet.layout`` policies see.
    name: ClassVar[str] = "base"
    #: Model classes (``...ForConditionalGeneration`` and the inner ``...Model``) this adapter handles.
    model_classes: ClassVar[tuple[type, ...]] = ()
    #: "1d" or "mrope" position ids.
    positions: ClassVar[str] = "1d"
    #: Signals this family can supply to policies, beyond "query".
    signals: ClassVar[frozenset[str]] = frozenset()
    #: Language-model kwargs that hold one entry per sequence position and must follow pruning.
    lm_extra_kwargs: ClassVar[tuple[str, ...]] = ()

    def inner(self, model: nn.Module) -> nn.Module:
        """The multimodal model whose forward receives ``input_ids`` and calls the language model."""
        return model.model if hasattr(model, "model") and not hasattr(model, "language_model") else model

    def language_model(self, model: nn.Module) -> nn.Module:
        return self.inner(model).language_model

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The language model's decoder layers, in order (in-layer and decode-time policies hook them)."""
        return self.language_model(model).layers

    def self_attention(self, layer: nn.Module) -> nn.Module:
        """The attention module of one decoder layer (its q/k projections give the policies' scores)."""
        return layer.self_attn

    def first_prunable_layer(self, model: nn.Module) -> int:
        """Smallest decoder layer at whose input the sequence may be shortened (1: layer 0 sees every token)."""
        return 1

    def placeholder_ids(self, model: nn.Module) -> list[int]:
        """Token ids that mark video placeholders in ``input_ids``."""
        raise NotImplementedError

    def captures(self, model: nn.Module, signals: frozenset[str]) -> list[Capture]:
        """Hooks to record what :meth:`spans` and the requested ``signals`` need (default: none)."""
        return []

    def spans(self, model: nn.Module, call: CallContext) -> list[VideoSpan]:
        """Every video of the call, in batch-row then sequence order."""
        raise NotImplementedError

    def gather_extra(self, kwargs: dict[str, Any], index: Tensor, slot_valid: Tensor) -> dict[str, Any]:
        """Compact the family's extra LM kwargs with the same ``(B, Lk)`` gather index as the tokens."""
        return {}


def runs(mask: Tensor) -> list[tuple[int, int]]:
    """Maximal runs of True in a 1-D bool tensor, as ``(start, end)`` half-open intervals."""
    m = mask.to(torch.int8)
    edges = torch.diff(torch.cat([m.new_zeros(1), m, m.new_zeros(1)]))
    starts = (edges == 1).nonzero().squeeze(1).tolist()
    ends = (edges == -1).nonzero().squeeze(1).tolist()
    return list(zip(starts, ends))


def counts_from_inputs(call: CallContext, per_frame: int, extra: int = 0, *, pooled: bool = True) -> list[int] | None:
    """Placeholder tokens of each video: ``frames * per_frame + extra``.

    Frames come from ``pixel_values_videos`` ``(videos, F, C, H, W)`` in a plain forward; under
    ``generate`` the videos are encoded before the forward, and with ``pooled`` the per-video counts
    are read from the pre-encoded ``pooler_output`` ``(videos, tokens, D)`` instead. ``None`` when
    neither is there (then every placeholder run is one video).
    """
    pixels = call.inner_kwargs.get("pixel_values_videos")
    if pixels is not None:
        return [pixels.shape[1] * per_frame + extra] * pixels.shape[0]
    encoded = (call.inner_kwargs.get("mm_encoder_outputs") or {}).get("video")
    if pooled and encoded is not None and isinstance(encoded.pooler_output, Tensor):
        return [encoded.pooler_output.shape[1]] * encoded.pooler_output.shape[0]
    return None


def split_videos(target: Tensor, counts: list[int] | None) -> list[tuple[int, Tensor]]:
    """Assign placeholder positions to videos, in batch-row then sequence order.

    ``counts`` are the placeholder tokens of each video in that order (known from the pixel tensors
    or the vision features); with ``None`` every maximal run of placeholders is one video.
    Returns ``(row, positions)`` pairs.
    """
    if counts is None:
        return [
            (row, torch.arange(s, e, device=target.device))
            for row in range(target.shape[0])
            for s, e in runs(target[row])
        ]
    rows, cols = target.nonzero(as_tuple=True)  # row-major: exactly the order features are scattered in
    if sum(counts) != rows.numel():
        raise RuntimeError(
            f"the prompt holds {rows.numel()} video placeholder tokens but the videos need {sum(counts)} ({counts})"
        )
    out, offset = [], 0
    for count in counts:
        r = rows[offset : offset + count]
        if bool((r != r[0]).any()):
            raise RuntimeError("a video's placeholder tokens span two batch rows; the prompt is malformed")
        out.append((int(r[0]), cols[offset : offset + count]))
        offset += count
    return out



def last_capture(call: CallContext, name: str) -> Any | None:
    """The latest value recorded under ``name`` in this call (images are encoded before videos, so
    a vision tower's last call is the videos'), or None."""
    values = [v for v in call.captured.get(name, []) if v is not None]
    return values[-1] if values else None


def encoded_offsets_or_none(items: list[tuple[int, int]], batch: int, encoded: int) -> list[int] | None:
    """Where each item's units start among the ``encoded`` units the vision tower processed, or None.

    ``items`` are ``(row, units)`` in batch-row then sequence order (a video's frames, an image's
    tiles, or 1 per video where the tower reports one entry per video). Normally the units were
    encoded in that order. ``generate`` with beams or ``num_return_sequences = k`` encodes each
    prompt's media once, in prompt order, and repeats the rows (``repeat_interleave``), so row ``r``
    then shows the media of prompt ``r // k``, all of them: ``(A, B)`` of one prompt appear as rows
    ``A, B, A, B``. That case is recognised and mapped too. None when the items do not fit
    ``encoded`` either way (the copies of a row must hold the same items).
    """
    total = sum(units for _, units in items)
    if encoded <= 0 or total % encoded:
        return None
    k = total // encoded
    if k < 1 or batch % k:
        return None
    per_row: list[list[int]] = [[] for _ in range(batch)]
    for row, units in items:
        per_row[row].append(units)
    if any(per_row[r] != per_row[r - r % k] for r in range(batch)):
        return None
    starts, acc = [], 0
    for prompt in range(0, batch, k):
        starts.append(acc)
        acc += sum(per_row[prompt])
    if acc != encoded:
        return None
    out, used = [], [0] * batch
    for row, units in items:
        out.append(starts[row // k] + used[row])
        used[row] += units
    return out


def encoded_offsets(items: list[tuple[int, int]], batch: int, encoded: int) -> list[int]:
    """:func:`encoded_offsets_or_none`, raising ``RuntimeError`` when the items do not fit."""
    out = encoded_offsets_or_none(items, batch, encoded)
    if out is None:
        total = sum(units for _, units in items)
        raise RuntimeError(f"the prompt needs {total} encoded frames/tiles but the vision tower saw {encoded}")
    return out


def span_frames(spans: list[VideoSpan], call: CallContext, encoded: Tensor) -> list[Tensor] | None:
    """Each span's rows of ``encoded`` ``(N, ...)``, a per-frame output of one tower call, or None.

    For towers that see every video frame as one image, in span order (see
    :func:`encoded_offsets_or_none`; beam copies share their video's rows).
    """
    starts = encoded_offsets_or_none([(s.row, s.grid[0]) for s in spans], call.target.shape[0], encoded.shape[0])
    return None if starts is None else [encoded[a : a + s.grid[0]] for s, a in zip(spans, starts)]


def tower_pixels(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> torch.Tensor | None:
    """Capture function: the ``(N, C, H, W)`` pixels a vision tower's forward receives."""
    pixels = kwargs.get("pixel_values", args[0] if args else None)
    return None if pixels is None else pixels.detach()


def crop_to_patches(pixels: torch.Tensor, patch: int) -> torch.Tensor:
    """``(..., H, W)`` -> the top-left ``(H // p * p, W // p * p)`` area the patch grid covers (a view)."""
    return pixels[..., : pixels.shape[-2] // patch * patch, : pixels.shape[-1] // patch * patch]


def attach_frames(spans: list[VideoSpan], call: CallContext, patch: int) -> None:
    """Give each span its ``(F, C, H, W)`` frames from the tower's last ``(N, C, H, W)`` call (in place).

    For towers that see every video frame as one image, in span order (LLaVA-OneVision,
    LLaVA-NeXT-Video, Video-LLaVA); the frames are cropped to the area the ``patch``-pixel token
    grid covers. Does nothing when nothing was captured; raises when the call does not fit the spans.
    """
    pixels = last_capture(call, "pixels")
    if pixels is None or not spans:
        return
    frames = span_frames(spans, call, pixels)
    if frames is None:
        need = sum(s.grid[0] for s in spans)
        raise RuntimeError(f"the prompt needs {need} encoded frames but the vision tower saw {pixels.shape[0]}")
    for span, value in zip(spans, frames):
        span.signals["pixels"] = crop_to_patches(value, patch)
