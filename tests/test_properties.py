"""Property tests through the whole engine: frames, grid, batch size, padding side and retain vary."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tokcompress as tc
from tokcompress.policy import keep_count
from tokcompress.tiny import make_inputs
from tokcompress.video import synthetic_video

from conftest import tiny

QUESTIONS = ["What moves?", "Where does the red box go after it bounces off the wall?", "Why?"]


def expected_after(policy: str, retain: float, grid: tuple[int, int, int]) -> int:
    t, h, w = grid
    n = h * w
    if policy == "uniform":
        return t * keep_count(retain, n)
    if policy == "frames":
        return keep_count(retain, t) * n
    if policy == "random":
        return keep_count(retain, t * n)
    if policy == "pool":
        oh, ow = tc.build_policy("pool", retain=retain).output_grid(h, w)
        return t * oh * ow
    return t * n


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    family=st.sampled_from(["qwen2_5_vl", "llava_onevision", "video_llava"]),
    frames=st.sampled_from([2, 4, 6]),
    size=st.sampled_from([32, 48, 64, 80]),
    batch=st.integers(1, 3),
    side=st.sampled_from(["left", "right"]),
    policy=st.sampled_from(["uniform", "frames", "random", "pool", "none"]),
    retain=st.floats(0.05, 1.0),
)
def test_record_invariants(family, frames, size, batch, side, policy, retain):
    model, processor = tiny(family)
    videos = [synthetic_video(frames, size, size, seed=i) for i in range(batch)]
    inputs = dict(make_inputs(processor, videos, QUESTIONS[:batch], padding_side=side))
    params = {} if policy == "none" else {"retain": retain}
    with tc.compressed(model, policy, **params), torch.no_grad():
        out = model(**inputs)
        records = tc.last_record(model)
    assert torch.isfinite(out.logits).all()
    assert len(records) == batch
    ids = inputs["input_ids"]
    placeholder = torch.isin(ids, torch.tensor(tc.adapters.adapter_for(model).placeholder_ids(model)))
    for row, rec in enumerate(records):
        kept = rec.kept
        assert kept.numel() == torch.unique(kept).numel()
        assert torch.equal(kept, kept.sort().values)
        assert bool(placeholder[row, kept].all()), "kept indices lie inside the video span"
        specials = sum(v.positions.numel() for v in rec.videos)
        specials = rec.video_tokens_before - specials
        want = sum(expected_after(policy, retain, v.grid) for v in rec.videos) + specials
        assert rec.video_tokens_after == want
        # the compact row holds every non-video position and exactly the kept video tokens
        slots = rec.slots[rec.slots >= 0]
        assert int((placeholder[row, slots]).sum()) == rec.video_tokens_after


import tokcompress.adapters  # noqa: E402  (used above through tc.adapters)

