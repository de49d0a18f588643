"""HoliTom (outer part): equals the reference transcription, exact budgets, valid on every shape."""

from __future__ import annotations

import importlib.util
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokcompress as tc
from tokcompress.policies.holitom import HoliTom, holitom_outer, select_windows, static_runs, window_gains
from tokcompress.tokens import TokenSet

_spec = importlib.util.spec_from_file_location("reference_impls", Path(__file__).parents[1] / "benchmarks" / "reference_impls.py")
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)


def video(t: int, n: int, dim: int, seed: int = 0, scenes: int = 3, noise: float = 0.08):
    """Synthetic (features (T, n, D), attention (T, n)): static backgrounds, moving columns, cuts."""
    g = torch.Generator().manual_seed(seed)
    scene = torch.arange(t) * scenes // t
    feats = torch.randn(scenes, n, dim, generator=g)[scene]
    for f in range(t):
        cols = (torch.arange(max(1, n // 8)) + 2 * f) % n
        feats[f, cols] = torch.randn(cols.numel(), dim, generator=g)
    feats = feats + noise * torch.randn(t, n, dim, generator=g)
    return feats, torch.softmax(torch.randn(t, n, generator=g), dim=-1)


CASES = [
    dict(RETAIN_RATIO=0.1, T=0.65),
    dict(RETAIN_RATIO=0.15, T=0.8, NO_BETA="1"),
    dict(RETAIN_RATIO=0.25, T=0.8, MAX_WINDOW_SIZE=3),
    dict(RETAIN_RATIO=0.15, T=0.65, D=0.5),
    dict(RETAIN_RATIO=0.4, T=0.9, D=0.3, K=3, NO_BETA="1"),
    dict(RETAIN_RATIO=1.0, T=0.8),
]


@pytest.mark.parametrize("params", CASES)
def test_matches_reference_transcription(params):
    feats, attn = video(10, 196, 24, seed=len(params))
    want_tokens, want_windows, want_reduced, want_ratio = ref.reference_holitom(feats, attn, **params)
    res = holitom_outer(
        feats, attn, params["RETAIN_RATIO"], params["T"], d=params.get("D", 0.0), k=params.get("K", 7),
        max_window_size=params.get("MAX_WINDOW_SIZE", 1024), no_beta=params.get("NO_BETA", "0") != "0",
    )
    assert res.windows == want_windows
    assert res.total_reduced == want_reduced and res.retain_ratio == want_ratio
    got = res.emitted("one_token", (14, 14))["tokens"]
    assert got.shape == want_tokens.shape
    torch.testing.assert_close(got, want_tokens, atol=1e-5, rtol=0)


@settings(max_examples=15, deadline=None)
@given(t=st.integers(1, 12), n=st.integers(1, 9), p=st.floats(0, 1), width=st.integers(1, 13), seed=st.integers(0, 999))
def test_window_dp_equals_reference_loops(t, n, p, width, seed):
    rng = np.random.default_rng(seed)
    static = rng.random((max(t - 1, 0), n)) < p
    # the reference builds C from a (T, T, n) cumprod cube and runs the DP in Python loops
    sim = torch.from_numpy(static.astype(np.float32)) * 2 - 1  # > 0 exactly where static
    want_windows, want_reduced = ref._static_windows(sim, t, 0.0, width)
    windows, reduced = select_windows(window_gains(static_runs(static)), width)
    assert windows == want_windows and reduced == want_reduced


def test_budget_follows_the_spec():
    feats, attn = video(12, 196, 16, seed=5)
    res = holitom_outer(feats, attn, 0.15, 0.8)
    r = res.retain_ratio
    want = 0
    for (s, e), smask in zip(res.windows, res.static_mask):
        n_static = int(smask.sum())
        want += (e - s + 1) * math.ceil((196 - n_static) * r)  # dynamic: ceil, per frame
        want += round(n_static * r) if e > s else 0  # static: round, per window
    assert res.tokens.shape[0] == want
    assert r == min(0.15 / ((12 * 196 - res.total_reduced) / (12 * 196)), 1)


@settings(max_examples=15, deadline=None)
@given(
    t=st.integers(1, 7),
    h=st.integers(1, 5),
    w=st.integers(1, 5),
    retain=st.floats(0.01, 1.0),
    tau=st.floats(-0.5, 1.0),
    d=st.floats(0, 1),
    no_beta=st.booleans(),
    seed=st.integers(0, 999),
)
def test_valid_compression_on_any_shape(t, h, w, retain, tau, d, no_beta, seed):
    feats, attn = video(t, h * w, 5, seed=seed, scenes=min(t, 2), noise=0.3)
    tokens = TokenSet(feats, (t, h, w), signals={"vision_attention": attn})
    policy = HoliTom(retain=retain, tau=tau, d=d, no_beta=no_beta)
    out = policy(tokens)  # validates: sorted unique keep in range, shapes
    assert torch.isfinite(out.values).all()
    assert torch.equal(out.assign[out.keep], torch.arange(out.keep.numel()))
    assert bool(((out.assign >= -1) & (out.assign < out.keep.numel())).all())
    res = policy.run(tokens)
    assert res.windows[0][0] == 0 and res.windows[-1][1] == t - 1
    # the grid layout inserts exactly one newline per (frame, row) that keeps a token
    grid = res.emitted("grid", (h, w), torch.zeros(5))
    rows = torch.unique(res.carrier // w)
    assert int((grid["kind"] == 3).sum()) == rows.numel()
    assert grid["tokens"].shape[0] == res.tokens.shape[0] + rows.numel()


def test_retain_one_keeps_every_position():
    feats, attn = video(6, 16, 8, seed=2, noise=0.0)  # static backgrounds: multi-frame windows
    res = holitom_outer(feats, attn, 1.0, 0.8)
    assert res.retain_ratio == 1.0
    want = sum((e - s + 1) * int((~m).sum()) + (int(m.sum()) if e > s else 0) for (s, e), m in zip(res.windows, res.static_mask))
    assert res.tokens.shape[0] == want
    assert any(e > s for s, e in res.windows)


def test_one_frame_and_odd_grid():
    feats, attn = video(1, 35, 8)
    out = HoliTom(retain=0.2)(TokenSet(feats, (1, 5, 7), signals={"vision_attention": attn}))
    assert out.keep.numel() == math.ceil(35 * 0.2)
    assert torch.equal(out.keep, torch.topk(attn[0], 7).indices.sort().values)


def test_preset_tau_and_fallback_warning():
    assert HoliTom(retain=0.1).resolved_tau("llava_onevision") == 0.65
    assert HoliTom(retain=0.15).resolved_tau("llava_onevision") == 0.8
    assert HoliTom(retain=0.1, preset="llava_video").resolved_tau("llava_onevision") == 0.8
    assert HoliTom(retain=0.1, tau=0.5).resolved_tau("llava_onevision") == 0.5
    feats, attn = video(3, 16, 8)
    bare = TokenSet(feats, (3, 4, 4), layout="test_layout_without_attention")
    with pytest.warns(UserWarning, match="feature saliency"):
        HoliTom(retain=0.3)(bare)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        HoliTom(retain=0.3)(TokenSet(feats, (3, 4, 4), signals={"vision_attention": attn}))


def test_parameter_errors():
    assert isinstance(tc.build_policy("holitom", retain=0.2), HoliTom)
    for bad, match in [
        (dict(tau=1.5), "tau must be a cosine threshold"),
        (dict(beta=-0.1), "beta must be in"),
        (dict(d=2), "d must be in"),
        (dict(k=0), "k must be a positive int"),
        (dict(max_window_size=0), "max_window_size must be a positive int"),
        (dict(preset="qwen"), "preset must be one of"),
        (dict(positions="renumbered"), "positions must be one of"),
    ]:
        with pytest.raises(ValueError, match=match):
            HoliTom(**bad)
    with pytest.raises(ValueError, match="layout must be"):
        holitom_outer(*video(2, 4, 3), 0.5, 0.8).emitted("frame", (2, 2))


def test_inner_stage_is_chained_after_the_outer_part():
    from dataclasses import dataclass as dc

    @dc
    class Inner(tc.Policy):
        stage = "layer"

    inner = Inner(retain=0.5)
    policy = HoliTom(retain=0.2, inner=inner)
    assert policy.stages() == [policy, inner]
    with pytest.raises(ValueError, match="stage 'layer'"):
        HoliTom(inner=HoliTom())
    with pytest.raises(TypeError, match="inner must be a Policy"):
        HoliTom(inner="holitom_inner")


def test_never_returns_an_empty_video():
    feats = torch.ones(4, 1, 3)  # one static position, static over all frames: round(1 * r') == 0
    attn = torch.ones(4, 1)
    res = holitom_outer(feats, attn, 0.01, 0.5)
    assert res.windows == [(0, 3)] and res.tokens.shape[0] == 1
    out = HoliTom(retain=0.01)(TokenSet(feats, (4, 1, 1), signals={"vision_attention": attn}))
    assert out.keep.tolist() == [0]
