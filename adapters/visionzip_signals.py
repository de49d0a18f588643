"""VisionZip's vision-tower signals, recomputed from one encoder layer's own q/k (no eager attention).

VisionZip ranks a frame's tokens by the attention of its vision encoder's feature layer and groups the
rest by the layer's keys. SDPA and FlashAttention never return probabilities, and switching the tower
to eager attention would change every layer, so the adapter hooks the one layer whose output the
projector reads (a forward pre-hook sees its input hidden states) and the helpers here recompute that
layer's queries and keys with its own ``layer_norm1`` and ``self_attn.{q_proj,k_proj}`` (CLIP,
SigLIP), in float32 under ``torch.no_grad()``. Softmax rows are reduced in blocks of query rows, so at
most ``MAX_BLOCK`` probabilities exist at once.

Signals (per frame, on the language model's token grid, see ``TokenSet.signals``):

* ``"vision_saliency"`` ``(T, n)``: what VisionZip ranks by. CLIP towers with a CLS token: the CLS
  query's attention row, summed over heads (the reference, ``attentions[-2][:, :, 0, 1:].sum(1)``);
  SigLIP towers (no CLS): the attention each patch receives, averaged over heads and all queries (the
  LLaVA-OneVision port in ``cokeshao/HoliTom``'s ``visionzip/``).
* ``"vision_keys"`` ``(T, n, d)``: the layer's keys averaged over heads (the reference's ``metric``).

Both are pooled onto the token grid exactly as the family pools the features (bilinear 2x for
LLaVA-OneVision, average pooling for LLaVA-NeXT-Video, none for Video-LLaVA).

This module stands in for the shared ``adapters/vision_signals.py`` being written alongside; it
should be folded into it when that lands.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import CallContext, Capture, VideoSpan, frame_slices

#: Largest number of attention probabilities materialised at once (2**24 floats = 64 MiB).
MAX_BLOCK = 1 << 24
VISIONZIP_SIGNALS = frozenset({"vision_saliency", "vision_keys"})
_CAPTURE = "visionzip_signals"


def encoder_layers(tower: nn.Module) -> nn.ModuleList:
    """The encoder layers of a CLIP/SigLIP vision tower (``tower.vision_model.encoder.layers``)."""
    inner = getattr(tower, "vision_model", tower)
    return inner.encoder.layers


def feature_layer_index(num_layers: int, vision_feature_layer: int) -> int:
    """Index of the layer whose output is ``hidden_states[vision_feature_layer]`` (-1 for the embeddings)."""
    if not isinstance(vision_feature_layer, int):
        raise TypeError(f"VisionZip signals need one vision_feature_layer, got {vision_feature_layer!r}")
    index = (vision_feature_layer % (num_layers + 1)) - 1
    if index < 0:
        raise ValueError("vision_feature_layer selects the patch embeddings, which have no attention to read")
    return index


@torch.no_grad()
def queries_keys(layer: nn.Module, hidden: Tensor) -> tuple[Tensor, Tensor, float]:
    """``q, k`` ``(B, H, S, d)`` float32 and the softmax scale of ``layer``'s attention on its input ``hidden``."""
    attn = layer.self_attn
    x = layer.layer_norm1(hidden)
    b, s, _ = x.shape
    heads = attn.num_heads
    q = attn.q_proj(x).float().reshape(b, s, heads, -1).transpose(1, 2)
    k = attn.k_proj(x).float().reshape(b, s, heads, -1).transpose(1, 2)
    scale = float(getattr(attn, "scale", q.shape[-1] ** -0.5))
    return q, k, scale


@torch.no_grad()
def cls_attention(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """``(B, S - 1)``: the CLS query's (token 0) softmax attention to the patches, summed over heads."""
    probs = torch.softmax((q[:, :, :1] @ k.transpose(-1, -2)) * scale, dim=-1)  # (B, H, 1, S)
    return probs[:, :, 0, 1:].sum(1)


@torch.no_grad()
def received_attention(q: Tensor, k: Tensor, scale: float, max_block: int = MAX_BLOCK) -> Tensor:
    """``(B, S)``: attention each token receives, averaged over heads and all queries (blocked rows)."""
    b, h, s, _ = q.shape
    step = max(1, min(s, max_block // max(1, b * h * s)))
    total = torch.zeros(b, h, s, dtype=torch.float32, device=q.device)
    for start in range(0, s, step):
        rows = q[:, :, start : start + step]
        total += torch.softmax((rows @ k.transpose(-1, -2)) * scale, dim=-1).sum(2)
    return total.sum(1) / (h * s)


def _to_grid(values: Tensor, pool: Callable[[Tensor], Tensor]) -> Tensor:
    """``(B, P, c)`` per-patch values on a square patch grid -> ``(B, n, c)`` on the token grid."""
    b, p, c = values.shape
    side = math.isqrt(p)
    if side * side != p:
        raise RuntimeError(f"cannot place {p} vision patches on a square grid")
    grid = values.transpose(1, 2).reshape(b, c, side, side)
    return pool(grid).reshape(b, c, -1).transpose(1, 2)


def bilinear_half(grid: Tensor) -> Tensor:
    """LLaVA-OneVision's video pooling: bilinear resize to ``ceil(side / 2)``."""
    side = grid.shape[-1]
    return F.interpolate(grid, size=(math.ceil(side / 2),) * 2, mode="bilinear")


def visionzip_capture(
    layer: nn.Module, has_cls: bool, pool: Callable[[Tensor], Tensor] | None = None
) -> Capture:
    """A pre-hook capture on ``layer`` that records both VisionZip signals for every tower call."""
    pool = pool or (lambda g: g)

    def fn(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> dict[str, Tensor]:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        q, k, scale = queries_keys(module, hidden)
        if has_cls:
            saliency, keys = cls_attention(q, k, scale), k.mean(1)[:, 1:]
        else:
            saliency, keys = received_attention(q, k, scale), k.mean(1)
        return {
            "vision_saliency": _to_grid(saliency[..., None], pool)[..., 0],
            "vision_keys": _to_grid(keys, pool),
        }

    return Capture(_CAPTURE, layer, fn, when="pre")


def attach_visionzip_signals(call: CallContext, spans: list[VideoSpan], frames: list[int]) -> None:
    """Split the last tower call that saw the videos' frames per video (repeated videos share them)."""
    for value in reversed(call.captured.get(_CAPTURE, [])):
        slices = frame_slices(frames, value["vision_saliency"].shape[0])
        if slices is not None:
            for span, (a, b) in zip(spans, slices):
                span.signals.update({name: v[a:b] for name, v in value.items()})
            return


__all__ = [
    "VISIONZIP_SIGNALS",
    "attach_visionzip_signals",
    "bilinear_half",
    "cls_attention",
    "encoder_layers",
    "feature_layer_index",
    "queries_keys",
    "received_attention",
    "visionzip_capture",
]
