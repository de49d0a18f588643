"""An independent reference for compressed generation: call the language model by hand.

For each batch row, take what the UNWRAPPED model feeds its language model (captured once with a
plain forward pre-hook during an unwrapped ``generate``), keep the text tokens and the video tokens
the record says survived (with the record's merged values, if any), give them their original
position ids, and run prefill plus greedy decoding directly on the language model, one row at a
time, without padding. Nothing in the reference uses tokcompress' engine (:func:`compressed_greedy`
runs the system under test, for the tests to compare with :func:`assert_rows_match`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import DynamicCache

import tokcompress as tc
from tokcompress.adapters import adapter_for


@dataclass
class LMInputs:
    """What the language model received at prefill in an unwrapped generate."""

    embeds: Tensor  # (B, L, D)
    position_ids: Tensor  # (B, L) or (3, B, L)
    mask: Tensor  # (B, L) bool
    extra: dict[str, Any]


def capture_lm_inputs(model: nn.Module, inputs: dict[str, Tensor]) -> LMInputs:
    """Run an unwrapped 1-token generate and record the LM's prefill inputs."""
    assert not tc.is_wrapped(model), "capture from the unwrapped model"
    adapter = adapter_for(model)
    lm = adapter.language_model(model)
    seen: list[dict[str, Any]] = []
    handle = lm.register_forward_pre_hook(lambda m, a, k: seen.append(dict(k)), with_kwargs=True)
    try:
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
    finally:
        handle.remove()
    kw = seen[0]
    embeds = kw["inputs_embeds"]
    batch, length, _ = embeds.shape
    mask = kw.get("attention_mask")
    mask = torch.ones(batch, length, dtype=torch.bool) if mask is None else mask.bool()
    pos = kw.get("position_ids")
    if pos is None:
        pos = torch.arange(length)[None].expand(batch, length)
    if pos.dim() == 3 and pos.shape[0] == 4:
        pos = pos[1:]
    if pos.dim() == 3:
        pos = pos.expand(3, batch, length)
    else:
        pos = pos.expand(batch, length)
    extra = {k: kw[k] for k in adapter.lm_extra_kwargs if kw.get(k) is not None}
    return LMInputs(embeds.detach(), pos, mask, extra)


def placeholder_mask(model: nn.Module, input_ids: Tensor) -> Tensor:
    ids = torch.tensor(adapter_for(model).placeholder_ids(model))
    return torch.isin(input_ids, ids)


def row_inputs(
    model: nn.Module,
    captured: LMInputs,
    input_ids: Tensor,
    records: list[tc.RowRecord],
    row: int,
    compacted: bool = False,
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Kept embeddings ``(1, K, D)``, their positions, and extra LM kwargs for one row.

    Positions are the original ones, or ``0 .. K-1`` with ``compacted`` (1-D positions only).
    """
    rec = records[row]
    target = placeholder_mask(model, input_ids[row])
    keep = captured.mask[row] & ~target
    keep[rec.kept] = True
    idx = keep.nonzero().squeeze(1)
    embeds = captured.embeds[row].clone()
    if rec.values is not None:
        embeds[rec.kept] = rec.values
    embeds = embeds[idx][None]
    if captured.position_ids.dim() == 3:
        pos = captured.position_ids[:, row, idx][:, None, :]
    elif compacted:
        pos = torch.arange(idx.numel())[None]
    else:
        pos = captured.position_ids[row, idx][None]
    extra: dict[str, Any] = {}
    if "visual_pos_masks" in captured.extra:
        visual = captured.extra["visual_pos_masks"]
        flat_rows = (visual.reshape(-1).long().cumsum(0) - 1).reshape(visual.shape)[row]
        new_visual = visual[row, idx][None]
        extra["visual_pos_masks"] = new_visual
        rows = flat_rows[idx][new_visual[0]]
        extra["deepstack_visual_embeds"] = [d[rows] for d in captured.extra["deepstack_visual_embeds"]]
    return embeds, pos, extra


@torch.no_grad()
def manual_greedy(
    model: nn.Module,
    captured: LMInputs,
    input_ids: Tensor,
    records: list[tc.RowRecord],
    row: int,
    steps: int,
    compacted: bool = False,
) -> tuple[Tensor, Tensor]:
    """Greedy decode ``steps`` tokens for one row by calling the LM directly.

    Returns the first-step logits ``(V,)`` and the tokens ``(steps,)``.
    """
    adapter = adapter_for(model)
    lm = adapter.language_model(model)
    head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    embeds, pos, extra = row_inputs(model, captured, input_ids, records, row, compacted)
    cache = DynamicCache(config=lm.config)
    out = lm(inputs_embeds=embeds, position_ids=pos, cache=cache, use_cache=True, **extra)
    logits = head(out.last_hidden_state[:, -1]).float()
    first = logits[0].clone()
    tokens = [int(logits.argmax(-1))]
    last = pos[..., -1:]
    for _ in range(steps - 1):
        last = last + 1
        nxt = embed(torch.tensor([[tokens[-1]]]))
        out = lm(inputs_embeds=nxt, position_ids=last, cache=cache, use_cache=True)
        tokens.append(int(head(out.last_hidden_state[:, -1]).argmax(-1)))
    return first, torch.tensor(tokens)


@torch.no_grad()
def wrapped_greedy(model: nn.Module, inputs: dict[str, Tensor], steps: int) -> tuple[Tensor, Tensor]:
    """First-step logits ``(B, V)`` and generated tokens ``(B, steps)`` of the (wrapped) model's generate."""
    out = model.generate(
        **inputs, max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    length = inputs["input_ids"].shape[1]
    return out.logits[0].float(), out.sequences[:, length:]


def same_greedy(generated: Tensor, reference: Tensor, eos: int | list[int] | None) -> bool:
    """``generated`` (one row, padded after EOS) agrees with ``reference`` up to and including its first EOS."""
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    n = generated.shape[0]
    for i, tok in enumerate(generated.tolist()):
        if tok in eos_ids:
            n = i + 1
            break
    return torch.equal(generated[:n], reference[:n])


@functools.lru_cache(maxsize=None)
def reference_inputs(family: str, attn: str = "sdpa") -> tuple[dict[str, Tensor], LMInputs]:
    """The batch-2 test inputs of ``family`` and what the unwrapped model feeds its language model
    for them (captured once per session; do not modify them)."""
    from conftest import batch_inputs, tiny

    model, _ = tiny(family, attn)
    inputs = batch_inputs(family, 2, attn)
    return inputs, capture_lm_inputs(model, inputs)


def compressed_greedy(model: nn.Module, inputs: dict[str, Tensor], steps: int, policy: Any, **params: Any):
    """``(first, tokens, records)``: :func:`wrapped_greedy` under ``tc.compressed(model, policy, **params)``
    and the record it left."""
    with tc.compressed(model, policy, **params):
        first, tokens = wrapped_greedy(model, inputs, steps)
        return first, tokens, tc.last_record(model)


def assert_rows_match(
    model: nn.Module,
    captured: LMInputs,
    inputs: dict[str, Tensor],
    got: tuple[Tensor, Tensor, list[tc.RowRecord]],
    steps: int,
    *,
    compacted: bool = False,
    note: str = "",
) -> None:
    """Every row of ``got`` (see :func:`compressed_greedy`) equals :func:`manual_greedy` for it: the
    first-step logits to 1e-5 and the greedy tokens up to the first EOS."""
    first, tokens, records = got
    for row in range(len(records)):
        ref_first, ref_tokens = manual_greedy(model, captured, inputs["input_ids"], records, row, steps, compacted)
        torch.testing.assert_close(first[row], ref_first, atol=1e-5, rtol=0, msg=note or None)
        assert same_greedy(tokens[row], ref_tokens, model.generation_config.eos_token_id), note
