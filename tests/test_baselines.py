"""The baselines as pure functions: budgets, ordering, merges, chains (hypothesis over shapes)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokcompress as tc
from tokcompress.policies.baselines import Frames, KeepAll, Pool, RandomKeep, Uniform, evenly_spaced
from tokcompress.policy import Sequential, chain_compress, keep_count, round_half_up
from tokcompress.tokens import TokenSet

shapes = st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(1, 6), st.integers(2, 6))
retains = st.floats(0.01, 1.0)


def token_set(t: int, h: int, w: int, d: int, seed: int = 0) -> TokenSet:
    gen = torch.Generator().manual_seed(seed)
    return TokenSet(features=torch.randn(t, h * w, d, generator=gen), grid=(t, h, w))


def test_round_half_up_and_keep_count():
    assert [round_half_up(x) for x in (0.5, 1.5, 2.5, 2.4999)] == [1, 2, 3, 2]
    assert keep_count(0.01, 10) == 1 and keep_count(1.0, 10) == 10 and keep_count(0.25, 10) == 3


def test_evenly_spaced_is_what_it_says():
    assert evenly_spaced(10, 5).tolist() == [1, 3, 5, 7, 9]
    assert evenly_spaced(4, 4).tolist() == [0, 1, 2, 3]
    assert evenly_spaced(9, 1).tolist() == [4]


def _check(result, tokens: TokenSet, budget: int) -> None:
    keep = result.keep
    assert keep.dtype == torch.long and keep.numel() == budget
    assert bool((keep[1:] > keep[:-1]).all()) if keep.numel() > 1 else True
    assert int(keep.min()) >= 0 and int(keep.max()) < tokens.num_tokens
    if result.values is not None:
        assert bool(torch.isfinite(result.values).all())


@settings(max_examples=60, deadline=None)
@given(shapes, retains)
def test_uniform_keeps_count_per_frame(shape, retain):
    t, h, w, d = shape
    tokens = token_set(t, h, w, d)
    result = Uniform(retain=retain)(tokens)
    _check(result, tokens, t * keep_count(retain, h * w))
    per_frame = torch.bincount(result.keep // (h * w), minlength=t)
    assert bool((per_frame == keep_count(retain, h * w)).all())


@settings(max_examples=60, deadline=None)
@given(shapes, retains)
def test_frames_keeps_whole_frames(shape, retain):
    t, h, w, d = shape
    tokens = token_set(t, h, w, d)
    result = Frames(retain=retain)(tokens)
    m = keep_count(retain, t)
    _check(result, tokens, m * h * w)
    frames = sorted(set((result.keep // (h * w)).tolist()))
    assert len(frames) == m
    assert frames == [int(math.floor((i + 0.5) * t / m)) for i in range(m)]


@settings(max_examples=60, deadline=None)
@given(shapes, retains, st.integers(0, 10))
def test_random_is_seeded_and_sized(shape, retain, seed):
    t, h, w, d = shape
    tokens = token_set(t, h, w, d)
    a = RandomKeep(retain=retain, seed=seed)(tokens)
    b = RandomKeep(retain=retain, seed=seed)(tokens)
    _check(a, tokens, keep_count(retain, t * h * w))
    assert torch.equal(a.keep, b.keep)


@settings(max_examples=60, deadline=None)
@given(shapes, retains)
def test_pool_merges_every_token_into_its_bin(shape, retain):
    t, h, w, d = shape
    tokens = token_set(t, h, w, d)
    policy = Pool(retain=retain)
    result = policy(tokens)
    oh, ow = policy.output_grid(h, w)
    _check(result, tokens, t * oh * ow)
    assert result.assign is not None and bool((result.assign >= 0).all())
    flat = tokens.flat()
    for slot in range(result.keep.numel()):
        members = (result.assign == slot).nonzero().squeeze(1)
        assert int(result.keep[slot]) in members.tolist(), "a merged token takes the position of one of its members"
        torch.testing.assert_close(result.values[slot], flat[members].mean(0), atol=1e-5, rtol=0)


@settings(max_examples=40, deadline=None)
@given(shapes)
def test_keep_all_and_retain_one_keep_everything(shape):
    t, h, w, d = shape
    tokens = token_set(t, h, w, d)
    everything = torch.arange(t * h * w)
    for policy in (KeepAll(), Uniform(retain=1.0), Frames(retain=1.0), RandomKeep(retain=1.0)):
        result = policy(tokens)
        assert torch.equal(result.keep, everything) and result.values is None


def test_chain_composes_selection_and_merge():
    tokens = token_set(4, 4, 4, 3)
    chain = Sequential([Uniform(retain=0.5), RandomKeep(retain=0.5, seed=0)])
    result = chain(tokens)
    first = Uniform(retain=0.5)(tokens)
    assert set(result.keep.tolist()) <= set(first.keep.tolist())
    assert result.keep.numel() == keep_count(0.5, first.keep.numel())
    assert chain.retain == 0.25


def test_chain_after_merge_carries_merged_values_and_assign():
    tokens = token_set(2, 4, 4, 3)
    result = chain_compress([Pool(retain=0.25), KeepAll()], tokens)
    pooled = Pool(retain=0.25)(tokens)
    assert torch.equal(result.keep, pooled.keep)
    torch.testing.assert_close(result.values, pooled.values)
    assert torch.equal(result.assign, pooled.assign)


def test_pool_cannot_follow_another_policy():
    with pytest.raises(ValueError, match="full frame grid"):
        Sequential([Uniform(retain=0.5), Pool(retain=0.5)])


def test_token_set_validates_shapes():
    with pytest.raises(ValueError, match="features must have shape"):
        TokenSet(features=torch.zeros(2, 5, 3), grid=(2, 2, 2))


def test_register_rejects_duplicates():
    with pytest.raises(ValueError, match="already registered"):

        @tc.register("uniform")
        class Another(tc.Policy):
            pass
