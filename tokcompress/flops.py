"""Analytic prefill FLOPs of a decoder-only language model, per layer, for the lengths it really saw.

What is counted, for one sequence of ``n`` tokens entering a layer (1 multiply-add = 2 FLOPs):

* attention projections: ``2 n d (H hd)`` (q) + ``2 * 2 n d (G hd)`` (k, v) + ``2 n (H hd) d`` (o),
  with ``d`` the hidden size, ``H`` query heads, ``G`` key/value heads, ``hd`` the head size;
* attention scores and weighted sum: ``2 * 2 H hd P`` with ``P = n (n + 1) / 2`` query-key pairs for
  causal attention (``P = n^2`` when ``causal=False``, the convention of the FastV/FastVID papers);
* gated MLP (SwiGLU, all supported families): ``3 * 2 n d m`` with ``m`` the intermediate size;
* the LM head for the last position only (``generate`` computes logits for one position): ``2 d V``.

Norms, rotary embeddings, softmax and residual adds are left out (they are O(n d), far below the
rest). The ratio of two counts is the physical limit of what pruning can give the prefill: a pruned
prefill cannot run faster than its share of the arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence


@dataclass(frozen=True)
class LMShape:
    """The sizes that decide a decoder's FLOPs."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int

    @classmethod
    def from_config(cls, config: Any) -> "LMShape":
        """From a transformers config (a multimodal config's text part is used)."""
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = int(text.num_attention_heads)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        return cls(
            hidden_size=int(text.hidden_size),
            num_layers=int(text.num_hidden_layers),
            num_heads=heads,
            num_kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
            head_dim=int(head_dim),
            intermediate_size=int(text.intermediate_size),
            vocab_size=int(text.vocab_size),
        )


def layer_flops(shape: LMShape, n: int, *, causal: bool = True) -> dict[str, float]:
    """FLOPs of one decoder layer on ``n`` tokens: ``{"attention": ..., "mlp": ...}``."""
    d, q, kv = shape.hidden_size, shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    pairs = n * (n + 1) / 2 if causal else float(n) * n
    projections = 2.0 * n * d * q + 2 * 2.0 * n * d * kv + 2.0 * n * q * d
    scores = 2 * 2.0 * shape.num_heads * shape.head_dim * pairs
    mlp = 3 * 2.0 * n * d * shape.intermediate_size
    return {"attention": projections + scores, "mlp": mlp}


def prefill_flops(shape: LMShape, lengths: Sequence[int], *, causal: bool = True, rows: int = 1) -> dict[str, Any]:
    """FLOPs of a prefill whose layer ``i`` saw ``lengths[i]`` tokens (per row; ``rows`` identical rows).

    Returns ``{"total", "attention", "mlp", "head", "per_layer": [{"attention", "mlp"}, ...]}``.
    """
    if len(lengths) != shape.num_layers:
        raise ValueError(f"lengths must give one length per layer ({shape.num_layers}); got {len(lengths)}")
    per_layer = [layer_flops(shape, int(n), causal=causal) for n in lengths]
    attention = sum(layer["attention"] for layer in per_layer) * rows
    mlp = sum(layer["mlp"] for layer in per_layer) * rows
    head = 2.0 * shape.hidden_size * shape.vocab_size * rows
    return {
        "total": attention + mlp + head,
        "attention": attention,
        "mlp": mlp,
        "head": head,
        "per_layer": [{k: v * rows for k, v in layer.items()} for layer in per_layer],
    }


def layer_lengths(record: Any, prompt_length: int, num_layers: int) -> list[int]:
    """Tokens each decoder layer saw in the compressed prefill of one row.

    ``record`` is one :class:`tokcompress.RowRecord` (or ``None``: nothing was pruned). Input-stage
    policies shorten every layer by ``video_tokens_before - video_tokens_after``; an in-layer stage
    (``record.stages`` entry with ``layer``, ``visual_before`` and ``visual_after``) shortens the
    layers from ``layer`` on by the tokens it removed.
    """
    if record is None:
        return [int(prompt_length)] * num_layers
    first = int(prompt_length) - (record.video_tokens_before - record.video_tokens_after)
    lengths = [first] * num_layers
    for stage in getattr(record, "stages", {}).values():
        if not isinstance(stage, dict) or "steps" in stage:
            continue
        if not {"layer", "visual_before", "visual_after"} <= set(stage):
            continue
        removed = int(stage["visual_before"]) - int(stage["visual_after"])
        for i in range(int(stage["layer"]), num_layers):
            lengths[i] -= removed
    return lengths
