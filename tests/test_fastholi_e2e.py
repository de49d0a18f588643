"""FastVID and HoliTom through generate on every family: batch 2, left-padded, against a manual reference.

The reference (tests/reference.py) calls the language model by hand with the kept (merged)
embeddings at their original positions; nothing in it uses the engine or the policies.
"""

from __future__ import annotations

import functools

import pytest
import torch

import tokcompress as tc

from conftest import batch_inputs, tiny
from reference import capture_lm_inputs, manual_greedy, same_greedy, wrapped_greedy

STEPS = 4


@functools.lru_cache(maxsize=None)
def _reference_inputs(family: str):
    """What the unwrapped model feeds its language model (captured once per family)."""
    model, _ = tiny(family)
    inputs = batch_inputs(family, 2)
    return inputs, capture_lm_inputs(model, inputs)
POLICIES = [("fastvid", {"retain": 0.5, "DySeg_c": 2}), ("holitom", {"retain": 0.3})]



@pytest.mark.filterwarnings("ignore:fastvid")
@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p[0])
def test_generate_matches_manual_reference(family, policy):
    model, _ = tiny(family)
    inputs, captured = _reference_inputs(family)
    name, params = policy
    with tc.compressed(model, name, **params):
        first, tokens = wrapped_greedy(model, inputs, STEPS)
        records = tc.last_record(model)
    assert records is not None and len(records) == 2
    for row in range(2):
        rec = records[row]
        assert rec.video_tokens_after < rec.video_tokens_before
        assert rec.values is not None  # both policies merge tokens
        assert torch.isfinite(rec.values).all()
        ref_first, ref_tokens = manual_greedy(model, captured, inputs["input_ids"], records, row, STEPS)
        torch.testing.assert_close(first[row], ref_first, atol=1e-5, rtol=0)
        assert same_greedy(tokens[row], ref_tokens, model.generation_config.eos_token_id)


@pytest.mark.parametrize("family", ["llava_onevision", "video_llava"])
def test_holitom_compacted_positions_match_a_renumbered_reference(family):
    """positions="compacted" (the reference's numbering): prefill 0..K-1 per row, decoding goes on from K."""
    model, _ = tiny(family)
    inputs, captured = _reference_inputs(family)
    with tc.compressed(model, "holitom", retain=0.3, positions="compacted"):
        first, tokens = wrapped_greedy(model, inputs, STEPS)
        records = tc.last_record(model)
    for row in range(2):
        ref_first, ref_tokens = manual_greedy(model, captured, inputs["input_ids"], records, row, STEPS, compacted=True)
        torch.testing.assert_close(first[row], ref_first, atol=1e-5, rtol=0)
        assert same_greedy(tokens[row], ref_tokens, model.generation_config.eos_token_id)
