"""FastVID and HoliTom through generate on every family: batch 2, left-padded, against a manual reference.

The reference (tests/reference.py) calls the language model by hand with the kept (merged)
embeddings at their original positions; nothing in it uses the engine or the policies.
"""

from __future__ import annotations

import pytest
import torch

from conftest import tiny
from reference import assert_rows_match, compressed_greedy, reference_inputs

STEPS = 4
POLICIES = [("fastvid", {"retain": 0.5, "DySeg_c": 2}), ("holitom", {"retain": 0.3})]


@pytest.mark.filterwarnings("ignore:fastvid")
@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p[0])
def test_generate_matches_manual_reference(family, policy):
    model, _ = tiny(family)
    inputs, captured = reference_inputs(family)
    name, params = policy
    got = compressed_greedy(model, inputs, STEPS, name, **params)
    records = got[2]
    assert records is not None and len(records) == 2
    for rec in records:
        assert rec.video_tokens_after < rec.video_tokens_before
        assert rec.values is not None  # both policies merge tokens
        assert torch.isfinite(rec.values).all()
    assert_rows_match(model, captured, inputs, got, STEPS)


@pytest.mark.parametrize("family", ["llava_onevision", "video_llava"])
def test_holitom_compacted_positions_match_a_renumbered_reference(family):
    """positions="compacted" (the reference's numbering): prefill 0..K-1 per row, decoding goes on from K."""
    model, _ = tiny(family)
    inputs, captured = reference_inputs(family)
    got = compressed_greedy(model, inputs, STEPS, "holitom", retain=0.3, positions="compacted")
    assert len(got[2]) == 2
    assert_rows_match(model, captured, inputs, got, STEPS, compacted=True)
