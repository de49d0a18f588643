"""The engine keeps generate exact: every family, sdpa and eager, batch 1 and 2 left-padded.

References are independent of the engine: the unwrapped model itself (for policies that keep
everything) and a manual call of the language model with the kept embeddings and their original
position ids (tests/reference.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import tokcompress as tc
from tokcompress.policies.baselines import evenly_spaced
from tokcompress.tokens import Compression, TokenSet, selection

from conftest import batch_inputs, tiny
from reference import (
    assert_rows_match,
    capture_lm_inputs,
    compressed_greedy,
    manual_greedy,
    reference_inputs,
    same_greedy,
    wrapped_greedy,
)

STEPS = 10


@dataclass
class QueryLength(tc.Policy):
    """Test-only: keep ``2 * len(question)`` evenly spaced tokens.

    The two rows of the test batch ask questions of different lengths, so they keep different
    numbers of tokens (and the query signal is exercised).
    """

    retain: float = 0.5

    def compress(self, tokens: TokenSet) -> Compression:
        assert tokens.query is not None and tokens.query.shape[-1] == tokens.dim
        k = max(1, min(tokens.num_tokens - 1, 2 * tokens.query.shape[0]))
        return selection(evenly_spaced(tokens.num_tokens, k, tokens.features.device))


def _plain_outputs(model, inputs):
    with torch.no_grad():
        logits = model(**inputs).logits
    first, tokens = wrapped_greedy(model, inputs, STEPS)
    return logits, first, tokens


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("policy", [("none", {}), ("uniform", {"retain": 1.0}), ("random", {"retain": 1.0})])
def test_keep_everything_is_bit_identical(family, attn, batch, policy):
    model, _ = tiny(family, attn)
    inputs = batch_inputs(family, batch)
    want = _plain_outputs(model, inputs)
    name, params = policy
    with tc.compressed(model, name, **params):
        got = _plain_outputs(model, inputs)
        rec = tc.last_record(model)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert all(r.video_tokens_after == r.video_tokens_before for r in rec)


POLICIES = [
    ("uniform", {"retain": 0.5}),
    ("frames", {"retain": 0.5}),
    ("random", {"retain": 0.3, "seed": 3}),
    ("pool", {"retain": 0.25}),
    (QueryLength(), {}),
]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p[0] if isinstance(p[0], str) else "uneven")
def test_pruned_generate_matches_manual_reference(family, attn, policy):
    model, _ = tiny(family, attn)
    inputs, captured = reference_inputs(family, attn)
    name, params = policy
    got = compressed_greedy(model, inputs, STEPS, name, **params)
    records = got[2]
    assert records is not None and len(records) == 2
    assert all(r.video_tokens_after < r.video_tokens_before for r in records)
    assert_rows_match(model, captured, inputs, got, STEPS)
    if isinstance(name, QueryLength):
        assert records[0].video_tokens_after != records[1].video_tokens_after, "uneven counts expected"


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_5_vl", "qwen3_vl"])
def test_batch1_pruned_matches_manual_reference(family):
    model, _ = tiny(family)
    inputs = batch_inputs(family, 1)
    captured = capture_lm_inputs(model, inputs)
    got = compressed_greedy(model, inputs, STEPS, "uniform", retain=0.25)
    assert len(got[2]) == 1
    assert_rows_match(model, captured, inputs, got, STEPS)


def test_pool_values_are_bin_means():
    """pool's merged embeddings equal the mean of each bin, computed here by hand."""
    family = "llava_onevision"
    model, _ = tiny(family)
    inputs = batch_inputs(family, 1)
    captured = capture_lm_inputs(model, inputs)
    with tc.compressed(model, "pool", retain=0.25):
        wrapped_greedy(model, inputs, 1)
        rec = tc.last_record(model)[0]
    video = rec.videos[0]
    t, h, w = video.grid
    feats = captured.embeds[0, video.positions].reshape(t, h, w, -1)
    oh, ow = video.info["grid_out"]
    want = []
    for f in range(t):
        for i in range(oh):
            for j in range(ow):
                y0, y1 = i * h // oh, (i + 1) * h // oh
                x0, x1 = j * w // ow, (j + 1) * w // ow
                want.append(feats[f, y0:y1, x0:x1].reshape(-1, feats.shape[-1]).mean(0))
    want = torch.stack(want)
    grid_kept = rec.kept[torch.isin(rec.kept, video.positions)]
    assert rec.values is not None
    got = rec.values[torch.isin(rec.kept, grid_kept)]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_unwrap_restores_bit_identical_outputs(family):
    model, _ = tiny(family)
    inputs = batch_inputs(family, 2)
    want = _plain_outputs(model, inputs)
    tc.wrap(model, "uniform", retain=0.25)
    pruned = _plain_outputs(model, inputs)
    tc.unwrap(model)
    got = _plain_outputs(model, inputs)
    assert not torch.equal(pruned[0].shape and pruned[1], want[1])
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_5_vl"])
def test_beam_search_and_sampling_run(family):
    model, _ = tiny(family)
    inputs = batch_inputs(family, 2)
    with torch.no_grad():
        plain_beams = model.generate(**inputs, max_new_tokens=6, num_beams=3, do_sample=False)
        with tc.compressed(model, "none"):
            same = model.generate(**inputs, max_new_tokens=6, num_beams=3, do_sample=False)
        with tc.compressed(model, "uniform", retain=0.5):
            beams = model.generate(**inputs, max_new_tokens=6, num_beams=3, do_sample=False)
            torch.manual_seed(0)
            sampled = model.generate(**inputs, max_new_tokens=6, do_sample=True, num_return_sequences=2)
    assert torch.equal(same, plain_beams)
    length = inputs["input_ids"].shape[1]
    assert beams.shape[0] == 2 and beams.shape[1] > length
    assert sampled.shape[0] == 4 and sampled.shape[1] > length


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_5_vl"])
def test_plain_forward_last_logits_match_reference(family):
    model, _ = tiny(family)
    inputs = batch_inputs(family, 2)
    captured = capture_lm_inputs(model, inputs)
    with tc.compressed(model, "uniform", retain=0.5), torch.no_grad():
        logits = model(**inputs, use_cache=False).logits
        records = tc.last_record(model)
    for row in range(2):
        ref_first, _ = manual_greedy(model, captured, inputs["input_ids"], records, row, 1)
        torch.testing.assert_close(logits[row, -1].float(), ref_first, atol=1e-5, rtol=0)
        # slots map the compact sequence back to the original positions
        slots = records[row].slots
        assert slots.shape[0] == logits.shape[1]
        assert int(slots[-1]) == inputs["input_ids"].shape[1] - 1


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_5_vl"])
def test_manual_decode_loop_without_position_ids(family):
    """A user loop (forward, then feed tokens back with the cache) gets logical positions injected."""
    model, _ = tiny(family)
    inputs = batch_inputs(family, 1)
    captured = capture_lm_inputs(model, inputs)
    with tc.compressed(model, "uniform", retain=0.5), torch.no_grad():
        out = model(**inputs, use_cache=True)
        records = tc.last_record(model)
        tokens = [int(out.logits[0, -1].argmax())]
        cache = out.cache
        for _ in range(3):
            step = model(input_ids=torch.tensor([[tokens[-1]]]), cache=cache, use_cache=True)
            cache = step.cache
            tokens.append(int(step.logits[0, -1].argmax()))
    _, ref_tokens = manual_greedy(model, captured, inputs["input_ids"], records, 0, 4)
    assert same_greedy(torch.tensor(tokens), ref_tokens, model.generation_config.eos_token_id)


def test_record_contents():
    family = "llava_onevision"
    model, _ = tiny(family)
    inputs = batch_inputs(family, 2)
    with tc.compressed(model, "uniform", retain=0.25):
        wrapped_greedy(model, inputs, 1)
        records = tc.last_record(model)
    ids = inputs["input_ids"]
    video_id = model.config.video_token_id
    for row, rec in enumerate(records):
        assert rec.policy == "uniform(retain=0.25)"
        assert rec.seconds >= 0
        assert rec.kept.dtype == torch.long
        assert torch.equal(rec.kept, rec.kept.sort().values)
        assert bool((ids[row, rec.kept] == video_id).all())
        assert rec.video_tokens_before == int((ids[row] == video_id).sum())
        video = rec.videos[0]
        t, h, w = video.grid
        expect = t * len(evenly_spaced(h * w, round(0.25 * h * w)))
        assert rec.video_tokens_after == expect + 1  # + the trailing newline
        assert int(rec.kept[-1]) == int((ids[row] == video_id).nonzero().max())  # newline kept


def test_inputs_embeds_path_equals_input_ids_path():
    family = "llava_onevision"
    model, _ = tiny(family)
    inputs = batch_inputs(family, 2)
    by_embeds = dict(inputs)
    by_embeds["inputs_embeds"] = model.get_input_embeddings()(by_embeds.pop("input_ids"))
    with tc.compressed(model, "uniform", retain=0.5), torch.no_grad():
        a = model(**inputs).logits
        rec_a = tc.last_record(model)
        b = model(**by_embeds).logits
        rec_b = tc.last_record(model)
    assert torch.equal(rec_a[0].kept, rec_b[0].kept) and torch.equal(rec_a[1].kept, rec_b[1].kept)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
