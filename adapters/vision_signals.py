"""Vision-side signals recomputed from one encoder layer's own weights, without eager attention.

Some policies read attention probabilities of the vision tower (HoliTom: the attention each patch
receives in the feature layer; FastVID: a pooled query's attention over a frame; VisionZip: the CLS
row and the keys). SDPA and FlashAttention never return probabilities, and switching the tower to
eager attention would change every layer. Instead, an adapter hooks the one layer it needs
(a forward pre-hook sees that layer's input hidden states), and these helpers recompute the
queries and keys with the layer's own pre-attention norm and projections, then reduce the softmax
rows block by block, so at most ``max_block`` attention entries exist at any time.

Supported layer shapes (found by attribute, not by class name):

* ``layer_norm1`` + ``self_attn.{q_proj,k_proj}`` (SigLIP, CLIP, Idefics3/SmolVLM vision);
* ``layernorm_before`` + ``attention.{q_proj,k_proj[,q_norm,k_norm]}`` (InternVL vision);
* ``norm1`` + ``attn.qkv`` with rotary ``position_embeddings`` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL).

Signals of one layer (:func:`layer_attention_capture`), per encoded image, on its patches (a tower's
CLS token is dropped from every map):

* ``"vision_attention"``: attention each patch receives, mean over heads and all queries;
* ``"frame_query_attention"``: attention of one pooled query over the patches (the CLS query where
  the tower has one, mean over heads; else the mean of all queries, see :func:`mean_query_attention`);
* ``"vision_saliency"``: what VisionZip ranks by: with a CLS token its attention row *summed* over
  heads (``attentions[-2][:, :, 0, 1:].sum(1)`` in the reference); without one (SigLIP, the
  LLaVA-OneVision port in ``cokeshao/HoliTom``'s ``visionzip/``) the attention each patch receives;
* ``"vision_keys"``: the layer's keys averaged over heads (VisionZip's ``metric``), ``(B, P, d)``.

Everything is computed in float32 under ``torch.no_grad()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .base import CallContext, Capture, VideoSpan, span_frames

#: Attention maps the layer captures below provide.
ATTENTION_SIGNALS = ("vision_attention", "frame_query_attention")
#: VisionZip's signals, from the same layer capture.
VISIONZIP_SIGNALS = frozenset({"vision_saliency", "vision_keys"})
#: Every signal :func:`layer_attention_capture` computes.
LAYER_SIGNALS = (*ATTENTION_SIGNALS, "vision_saliency", "vision_keys")

#: Largest number of attention probabilities materialised at once (2**26 floats = 256 MiB).
MAX_BLOCK = 1 << 26

_NORMS = ("layer_norm1", "layernorm_before", "norm1", "ln_1", "input_layernorm")
_ATTNS = ("self_attn", "attention", "attn")


@dataclass
class QK:
    """Queries and keys of one attention layer.

    Attributes:
        q: ``(B, H, S, d)`` float32 queries (rotary applied where the layer uses it).
        k: ``(B, H, S, d)`` float32 keys.
        scale: the layer's softmax scale (usually ``d ** -0.5``).
    """

    q: Tensor
    k: Tensor
    scale: float

    def select(self, index: Tensor | slice, dim: int = 2) -> QK:
        """The same layer restricted to some tokens (``dim=2``) or some batch rows (``dim=0``)."""
        if isinstance(index, slice):
            q, k = self.q[(slice(None),) * dim + (index,)], self.k[(slice(None),) * dim + (index,)]
        else:
            q, k = self.q.index_select(dim, index), self.k.index_select(dim, index)
        return QK(q, k, self.scale)


def _find(module: nn.Module, names: tuple[str, ...], what: str) -> nn.Module:
    for name in names:
        sub = getattr(module, name, None)
        if isinstance(sub, nn.Module):
            return sub
    raise TypeError(
        f"cannot recompute attention for {type(module).__name__}: no {what} among {names}; "
        "extend tokcompress/adapters/vision_signals.py for this vision layer"
    )


def _heads(attn: nn.Module) -> int:
    for name in ("num_heads", "num_attention_heads"):
        value = getattr(attn, name, None)
        if isinstance(value, int):
            return value
    config = getattr(attn, "config", None)
    for name in ("num_heads", "num_attention_heads"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise TypeError(f"cannot find the number of heads of {type(attn).__name__}")


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _split(x: Tensor, heads: int) -> Tensor:
    """``(B, S, H*d) -> (B, H, S, d)``."""
    b, s, _ = x.shape
    return x.reshape(b, s, heads, -1).transpose(1, 2)


@torch.no_grad()
def project_qk(layer: nn.Module, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor] | None = None) -> QK:
    """Queries and keys that ``layer``'s attention computes from its input ``hidden_states``.

    Args:
        layer: a vision encoder layer (see the module docstring for the supported shapes).
        hidden_states: the layer's input, ``(B, S, C)`` or unbatched ``(S, C)`` (Qwen-VL packs all
            patches of a call in one sequence; pass one frame or one video at a time).
        position_embeddings: ``(cos, sin)`` ``(S, d)`` or ``(B, S, d)`` for rotary layers (the kwarg
            Qwen-VL blocks receive, sliced like ``hidden_states``).
    """
    x = hidden_states if hidden_states.dim() == 3 else hidden_states[None]
    norm = _find(layer, _NORMS, "pre-attention norm")
    attn = _find(layer, _ATTNS, "attention module")
    heads = _heads(attn)
    h = norm(x)
    if hasattr(attn, "q_proj") and hasattr(attn, "k_proj"):
        q, k = attn.q_proj(h), attn.k_proj(h)
        if isinstance(getattr(attn, "q_norm", None), nn.Module):
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = _split(q.float(), heads), _split(k.float(), heads)
    elif hasattr(attn, "qkv"):
        b, s, _ = h.shape
        qkv = attn.qkv(h).reshape(b, s, 3, heads, -1).float()
        q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
    else:
        raise TypeError(f"cannot find q/k projections in {type(attn).__name__}")
    if position_embeddings is not None:  # (S, d) shared by the batch, or (B, S, d)
        cos, sin = (t.float().reshape(-1, 1, x.shape[1], t.shape[-1]) for t in position_embeddings)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
    scale = getattr(attn, "scale", None) or getattr(attn, "scaling", None) or q.shape[-1] ** -0.5
    return QK(q.contiguous(), k.contiguous(), float(scale))


def _row_blocks(batch: int, heads: int, rows: int, keys: int, max_block: int) -> int:
    return max(1, min(rows, max_block // max(1, batch * heads * keys)))


@torch.no_grad()
def attention_rows(qk: QK, rows: Tensor | None = None) -> Tensor:
    """Softmax attention probabilities of the chosen query ``rows``: ``(B, H, R, S)``.

    ``rows`` ``(R,)`` int64 query positions (all queries when None; only sensible for small ``S``).
    """
    q = qk.q if rows is None else qk.q.index_select(2, rows)
    return torch.softmax((q @ qk.k.transpose(-1, -2)) * qk.scale, dim=-1)


@torch.no_grad()
def mean_received_attention(qk: QK, *, max_block: int = MAX_BLOCK) -> Tensor:
    """``(B, S)``: attention each token receives, averaged over heads and all queries.

    ``softmax(q k^T * scale)`` row by row, in blocks of query rows (never the full ``S x S`` per head
    unless it fits ``max_block``); equals ``attentions.mean(1).mean(1)`` of an eager forward.
    """
    b, h, s, _ = qk.q.shape
    step = _row_blocks(b, h, s, s, max_block)
    total = qk.q.new_zeros(b, h, s)
    kt = qk.k.transpose(-1, -2)
    for start in range(0, s, step):
        probs = torch.softmax((qk.q[:, :, start : start + step] @ kt) * qk.scale, dim=-1)
        total += probs.sum(dim=2)
    return (total / s).mean(dim=1)


@torch.no_grad()
def mean_query_attention(qk: QK, group: int = 1) -> Tensor:
    """``(B, S // group)``: attention of the mean query over (group-averaged) keys, mean over heads.

    FastVID's Qwen2.5-VL signal: per head the mean of all queries of the frame attends to keys
    averaged over consecutive ``group`` tokens (one 2x2 merge unit = 4 patches), softmax over the
    groups, then the mean over heads. ``group=1`` gives the plain mean-query attention.
    """
    b, h, s, d = qk.q.shape
    if s % group:
        raise ValueError(f"{s} tokens do not split into groups of {group}")
    q = qk.q.mean(dim=2, keepdim=True)  # (B, H, 1, d)
    k = qk.k.reshape(b, h, s // group, group, d).mean(dim=3)
    probs = torch.softmax((q @ k.transpose(-1, -2)) * qk.scale, dim=-1)  # (B, H, 1, S/group)
    return probs[:, :, 0].mean(dim=1)


def feature_layer(encoder_layers: nn.ModuleList, feature_layer_index: int | list[int]) -> nn.Module | None:
    """The encoder layer whose output is ``hidden_states[feature_layer_index]`` (HF convention).

    ``hidden_states[0]`` is the embedding output and ``hidden_states[i]`` the output of layer
    ``i - 1``; negative indices count from the last layer's output. For a list (features of several
    layers concatenated) the last entry is used. Returns None for index 0 (no attention layer).
    """
    index = feature_layer_index[-1] if isinstance(feature_layer_index, (list, tuple)) else feature_layer_index
    count = len(encoder_layers)
    position = index if index >= 0 else count + 1 + index  # position in hidden_states
    if not 0 <= position <= count:
        raise ValueError(f"vision feature layer {index} is outside a tower of {count} layers")
    return None if position == 0 else encoder_layers[position - 1]


def encoder_layers(tower: nn.Module) -> nn.ModuleList:
    """The list of encoder layers of a HF vision tower (``encoder.layers`` or ``encoder.layer``)."""
    inner = getattr(tower, "vision_model", tower)
    encoder = inner.encoder
    layers = getattr(encoder, "layers", None)
    return layers if layers is not None else encoder.layer


def layer_attention_capture(wanted: list[str], cls_token: bool) -> Callable[[nn.Module, tuple, dict, Any], dict[str, Tensor]]:
    """A pre-hook capture function for one encoder layer, returning ``{signal: (B, P)}``.

    ``wanted`` are names from :data:`LAYER_SIGNALS` (see the module docstring); ``"vision_keys"`` is
    ``(B, P, d)``. With ``cls_token`` the CLS column is dropped, so ``P`` counts patches only.
    """

    def capture(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> dict[str, Tensor]:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        qk = project_qk(module, hidden)
        patches = slice(1, None) if cls_token else slice(None)
        received = cls_row = None
        if "vision_attention" in wanted or ("vision_saliency" in wanted and not cls_token):
            received = mean_received_attention(qk)
        if cls_token and ("frame_query_attention" in wanted or "vision_saliency" in wanted):
            cls_row = attention_rows(qk, torch.zeros(1, dtype=torch.long, device=qk.q.device))[:, :, 0, 1:]  # (B, H, P)
        values = {}
        if "vision_attention" in wanted:
            values["vision_attention"] = received[:, patches]
        if "frame_query_attention" in wanted:
            values["frame_query_attention"] = cls_row.mean(dim=1) if cls_token else mean_query_attention(qk)
        if "vision_saliency" in wanted:
            values["vision_saliency"] = cls_row.sum(dim=1) if cls_token else received
        if "vision_keys" in wanted:
            values["vision_keys"] = qk.k.mean(dim=1)[:, patches]
        return values

    return capture


def feature_layer_captures(tower: nn.Module, feature_layer_index: int | list[int], wanted: list[str], cls_token: bool) -> list[Capture]:
    """The capture of :func:`layer_attention_capture` on the tower's feature layer (none when nothing
    is wanted). VisionZip's signals on the patch embeddings (no attention to read) are refused."""
    if not wanted:
        return []
    layer = feature_layer(encoder_layers(tower), feature_layer_index)
    if layer is None:
        if VISIONZIP_SIGNALS & set(wanted):
            raise ValueError("vision_feature_layer selects the patch embeddings, which have no attention to read")
        return []
    return [Capture("vision_attention_maps", layer, layer_attention_capture(wanted, cls_token))]


def per_patch(pool: Callable[[Tensor], Tensor], values: Tensor) -> Tensor:
    """Apply ``pool`` ``(N, P) -> (N, n)`` to ``(N, P)`` or, channel by channel, to ``(N, P, c)`` values."""
    if values.dim() == 2:
        return pool(values)
    n, p, c = values.shape
    pooled = pool(values.transpose(1, 2).reshape(n * c, p))
    return pooled.reshape(n, c, -1).transpose(1, 2)


def attach_frame_signals(
    spans: list[VideoSpan], call: CallContext, pool: Callable[[Tensor, str], Tensor], name: str = "vision_attention_maps"
) -> None:
    """Give every span the per-frame signals of the last tower call, pooled onto its token grid.

    The last call of the vision tower encodes every frame of every video at once (videos are encoded
    after images), ``(N, P)`` (or ``(N, P, c)``) per signal; ``pool(values, signal)`` maps ``(N, P)`` to
    ``(N, h*w)`` the way the model pools its features (channels are pooled one by one). The rows are
    matched to the spans by :func:`~adapters.base.span_frames`. Anything that does not fit is left out
    (the policy then uses its documented substitute, or reports the missing signal).
    """
    maps = call.captured.get(name) or []
    if not spans or not maps or not isinstance(maps[-1], dict):
        return
    for signal, value in maps[-1].items():
        pooled = per_patch(lambda v: pool(v, signal), value)
        parts = span_frames(spans, call, pooled)
        if parts is None or any(pooled.shape[1] != s.grid[1] * s.grid[2] for s in spans):
            continue
        for span, part in zip(spans, parts):
            span.signals = {**span.signals, signal: part}


__all__ = [
    "ATTENTION_SIGNALS",
    "LAYER_SIGNALS",
    "MAX_BLOCK",
    "QK",
    "VISIONZIP_SIGNALS",
    "attach_frame_signals",
    "attention_rows",
    "encoder_layers",
    "feature_layer",
    "feature_layer_captures",
    "layer_attention_capture",
    "mean_query_attention",
    "mean_received_attention",
    "per_patch",
    "project_qk",
]
