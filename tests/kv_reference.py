"""An independent reference for in-layer pruning and decode-time KV pruning: the decoder layers by hand.

For one batch row (no padding) it takes what the UNWRAPPED model feeds its language model (via
``reference.capture_lm_inputs``) and the tokens the input stage kept (``reference.row_inputs``),
then calls the decoder layers one by one with explicit 4-D additive masks, in eager attention, and
reads attention probabilities from the eager attention's own output (a forward hook on that layer's
attention module). Pruning, merging and eviction are applied with test-side code (``Stage`` and
``DecodeRule`` callbacks written in the tests), never with tokcompress.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from tokcompress.adapters import adapter_for

from reference import LMInputs, row_inputs


@dataclass
class Stage:
    """Prefill pruning at layer ``k``.

    ``choose(attn (H, L, L) of layer k - 1, hidden (L, D) entering layer k, visual (N,) sequence indices,
    their original positions (N,)) -> (kept sequence indices, new hidden (L, D) or None)``.
    """

    k: int
    choose: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor | None]]
    prune_earlier: bool = False


@dataclass
class DecodeRule:
    """Decode-time pruning at layer ``l``.

    ``choose(attn (H, Lk), visual (N,) cache idx, available (N,) bool, state) -> kept cache idx or None``.

    ``evict`` True: the entries not kept are masked for layers >= l from this step on (for good);
    False: only during this step.
    """

    l: int
    choose: Callable[[Tensor, Tensor, dict], Tensor | None]
    evict: bool = False
    state: dict = field(default_factory=dict)


@dataclass
class RunResult:
    kept: dict[int, Tensor]  # layer -> original positions of the visual tokens kept there
    logits: list[Tensor]  # per step (V,)
    tokens: Tensor  # (steps,)
    cache_lengths: list[int]  # per layer, entries after the prefill
    decode_kept: list[Tensor | None]  # per decode step, original positions kept (None: no pruning)


@contextmanager
def eager(lm: nn.Module) -> Iterator[None]:
    """Run the language model's attention in eager mode (returns probabilities) for the block."""
    configs = {id(m.config): m.config for m in lm.modules() if hasattr(m, "config")}
    saved = {k: c._attn_implementation for k, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation = "eager"
        yield
    finally:
        for k, c in configs.items():
            c._attn_implementation = saved[k]


def _additive(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """(q, k) bool -> (1, 1, q, k) additive mask."""
    return torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)[None, None]


@torch.no_grad()
def run_row(
    model: nn.Module,
    captured: LMInputs,
    input_ids: Tensor,
    records: list,
    row: int,
    steps: int,
    stages: list[Stage] = (),
    decode: DecodeRule | None = None,
    compacted: bool = False,
) -> RunResult:
    adapter = adapter_for(model)
    lm = adapter.language_model(model)
    layers = adapter.decoder_layers(model)
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    hidden, pos, extra = row_inputs(model, captured, input_ids, records, row, compacted)
    present = captured.mask[row] & ~_placeholders(model, input_ids[row])
    present[records[row].kept] = True
    seq = present.nonzero().squeeze(1)  # original position of each current token
    visual = torch.isin(seq, _grid_positions(records[row]))
    probs: dict[int, Tensor] = {}

    def grab(i: int):
        def hook(module, args, kwargs, output):
            probs[i] = output[1][0].float()

        return hook

    wanted = {s.k - 1 for s in stages} | ({decode.l - 1} if decode else set())
    handles = [adapter.self_attention(layers[i]).register_forward_hook(grab(i), with_kwargs=True) for i in wanted]
    cache = DynamicCache(config=lm.config)
    kept_at: dict[int, Tensor] = {}
    entry_pos: list[Tensor] = [seq] * len(layers)  # per layer: original position of each cache entry (-1: generated)
    deep = extra.get("deepstack_visual_embeds")
    visual_mask = extra.get("visual_pos_masks")
    try:
        with eager(lm):
            cos, sin = lm.rotary_emb(hidden, pos)
            for i, layer in enumerate(layers):
                for s in stages:
                    if s.k != i:
                        continue
                    vis_idx = visual.nonzero().squeeze(1)
                    keep_vis, new_hidden = s.choose(probs[i - 1], hidden[0], vis_idx, seq[vis_idx])
                    if new_hidden is not None:
                        hidden = new_hidden[None]
                    keep = ~visual
                    keep[keep_vis] = True
                    idx = keep.nonzero().squeeze(1)
                    hidden, cos, sin = hidden[:, idx], cos[:, idx], sin[:, idx]
                    seq, visual = seq[idx], visual[idx]
                    kept_at[i] = seq[visual]
                    if s.prune_earlier:
                        for j in range(i):
                            sel = torch.isin(entry_pos[j], seq).nonzero().squeeze(1)
                            cache.layers[j].keys = cache.layers[j].keys[:, :, sel]
                            cache.layers[j].values = cache.layers[j].values[:, :, sel]
                            entry_pos[j] = entry_pos[j][sel]
                n = hidden.shape[1]
                mask = _additive(torch.ones(n, n, dtype=torch.bool).tril(), hidden.dtype)
                hidden = layer(hidden, attention_mask=mask, position_embeddings=(cos, sin), cache=cache, use_cache=True)
                entry_pos[i] = seq
                if deep is not None and i < len(deep):
                    hidden = hidden.clone()
                    hidden[visual_mask] = hidden[visual_mask] + deep[i]
            lengths = [cache.layers[j].keys.shape[2] for j in range(len(layers))]
            logits = head(lm.norm(hidden)[:, -1]).float()[0]
            out_logits, tokens, decode_kept = [logits], [int(logits.argmax())], []
            grid = _grid_positions(records[row])
            evicted = [torch.zeros(e.numel(), dtype=torch.bool) for e in entry_pos]  # masked for good
            last = pos[..., -1:]
            for _ in range(steps - 1):
                last = last + 1
                h = embed(torch.tensor([[tokens[-1]]]))
                cos1, sin1 = lm.rotary_emb(h, last)
                step_drop: Tensor | None = None  # original positions masked for layers >= l in this step
                for i, layer in enumerate(layers):
                    allowed = torch.ones(1, entry_pos[i].numel() + 1, dtype=torch.bool)
                    if decode is not None and i >= decode.l:
                        allowed[0, :-1] &= ~evicted[i]
                        if step_drop is not None:
                            allowed[0, :-1] &= ~torch.isin(entry_pos[i], step_drop)
                    mask = _additive(allowed, h.dtype)
                    h = layer(h, attention_mask=mask, position_embeddings=(cos1, sin1), cache=cache, use_cache=True)
                    if decode is not None and i == decode.l - 1:
                        vis_entries = torch.isin(entry_pos[i], grid).nonzero().squeeze(1)
                        available = torch.ones(vis_entries.numel(), dtype=torch.bool)
                        if decode.evict:
                            for j in range(decode.l, len(layers)):
                                gone = entry_pos[j][evicted[j]]
                                available &= ~torch.isin(entry_pos[i][vis_entries], gone)
                        keep = decode.choose(probs[i][:, -1], vis_entries, available, decode.state)
                        if keep is None:
                            decode_kept.append(None)
                        else:
                            decode_kept.append(entry_pos[i][keep].sort().values)
                            drop = entry_pos[i][vis_entries[~torch.isin(vis_entries, keep)]]
                            if decode.evict:
                                for j in range(decode.l, len(layers)):
                                    evicted[j] |= torch.isin(entry_pos[j], drop)
                            else:
                                step_drop = drop
                    entry_pos[i] = torch.cat([entry_pos[i], torch.tensor([-1])])
                    evicted[i] = torch.cat([evicted[i], torch.tensor([False])])
                logits = head(lm.norm(h)[:, -1]).float()[0]
                out_logits.append(logits)
                tokens.append(int(logits.argmax()))
    finally:
        for handle in handles:
            handle.remove()
    return RunResult(kept_at, out_logits, torch.tensor(tokens), lengths, decode_kept)


def _placeholders(model: nn.Module, ids: Tensor) -> Tensor:
    return torch.isin(ids, torch.tensor(adapter_for(model).placeholder_ids(model)))


def _grid_positions(record: Any) -> Tensor:
    """Original positions of the video grid tokens the input stage kept (specials excluded)."""
    parts = [v.positions[v.keep] for v in record.videos]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
