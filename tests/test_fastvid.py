"""FastVID: equals the reference transcriptions, keeps the spec's budgets, valid on every shape."""

from __future__ import annotations

import importlib.util
import math
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import SiglipVisionConfig, SiglipVisionModel

import tokcompress as tc
from tokcompress.policies.fastvid import FastVID, dyseg, siglip_head_weights, siglip_pooling_head
from tokcompress.tokens import TokenSet

_spec = importlib.util.spec_from_file_location("reference_impls", Path(__file__).parents[1] / "benchmarks" / "reference_impls.py")
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)


def video(t: int, n: int, dim: int, seed: int = 0, scenes: int = 3):
    """Synthetic (features (T, n, D), global (T, 16), attention (T, n)) with scene cuts and drift."""
    g = torch.Generator().manual_seed(seed)
    scene = torch.arange(t) * scenes // t
    feats = torch.randn(scenes, n, dim, generator=g)[scene] + 0.3 * torch.randn(t, n, dim, generator=g).cumsum(0) / 4
    glob = torch.randn(scenes, 16, generator=g)[scene] + 0.15 * torch.randn(t, 16, generator=g)
    attn = torch.softmax(torch.randn(t, n, generator=g), dim=-1)
    return feats, glob, attn


CASES = [
    # preset, T, params (retain, c, tau, d, p, beta)
    ("llava_onevision", 16, (0.1, 8, 0.9, 0.4, 4, 0.6)),
    ("llava_onevision", 12, (0.25, 3, 0.8, 0.3, 2, 0.3)),
    ("llava_onevision", 11, (0.1, 4, 0.85, 0.1, 2, 0.6)),  # n_ctx = 1: the per_anchor == n_ctx quirk
    ("llava_video", 16, (0.1, 8, 0.9, 0.4, 4, 0.6)),
    ("llava_video", 9, (0.3, 3, 0.9, 0.5, 3, 0.4)),
    ("qwen2_5_vl", 16, (0.27, 8, 0.84, 0.4, 4, 0.6)),
    ("qwen2_5_vl", 10, (0.5, 2, 0.9, 0.4, 2, 0.6)),
]


@pytest.mark.parametrize("preset,t,params", CASES)
def test_matches_reference_transcription(preset, t, params):
    retain, c, tau, d, p, beta = params
    feats, glob, attn = video(t, 196, 24, seed=t)
    want_keep, want_tokens, sizes = ref.reference_fastvid(feats, glob, attn, retain, c, tau, d, p, beta, version=preset)
    policy = FastVID(retain=retain, DySeg_c=c, DySeg_tau=tau, STPrune_d=d, DTM_p=p, DTM_beta=beta)
    got = policy.run(feats, glob, attn, preset)
    assert torch.equal(got.keep, want_keep)
    torch.testing.assert_close(got.values, want_tokens, atol=1e-5, rtol=0)
    assert [e - s for s, e in got.info["segments"]] == sizes


@pytest.mark.parametrize("t,retain,d,p", [(16, 0.1, 0.4, 4), (9, 0.3, 0.5, 2), (7, 0.1, 0.1, 2), (5, 0.5, 0.0, 3)])
def test_onevision_budget_follows_the_spec(t, retain, d, p):
    n = 196
    feats, glob, attn = video(t, n, 16, seed=1)
    out = FastVID(retain=retain, DySeg_c=3, DySeg_tau=0.9, STPrune_d=d, DTM_p=p).run(feats, glob, attn, "llava_onevision")
    fr = int(n * retain)
    n_sal = fr - int(fr * d)
    n_ctx = fr - n_sal
    want = t * n_sal
    for s, e in out.info["segments"]:
        length = e - s
        anchors = math.ceil(length / p)
        want += anchors * min((n_ctx * length) // anchors, n - n_sal) if n_ctx else 0
    assert out.keep.numel() == want


def test_video_budget_is_int_n_retain_per_frame():
    feats, glob, attn = video(12, 169, 16, seed=2)
    out = FastVID(retain=0.1, DySeg_c=4).run(feats, glob, attn, "llava_video")
    assert out.keep.numel() == 12 * int(169 * 0.1)


@settings(max_examples=15, deadline=None)
@given(
    t=st.integers(1, 6),
    h=st.integers(1, 5),
    w=st.integers(1, 5),
    retain=st.floats(0.01, 1.0),
    d=st.floats(0, 1),
    p=st.integers(1, 4),
    c=st.integers(1, 8),
    preset=st.sampled_from(["llava_onevision", "llava_video", "qwen2_5_vl"]),
    seed=st.integers(0, 1000),
)
def test_valid_compression_on_any_shape(t, h, w, retain, d, p, c, preset, seed):
    feats, glob, attn = video(t, h * w, 6, seed=seed, scenes=min(t, 2))
    tokens = TokenSet(feats, (t, h, w))
    policy = FastVID(retain=retain, DySeg_c=c, STPrune_d=d, DTM_p=p, preset=preset)
    out = policy.run(feats, glob, attn, preset)
    out.validate(tokens, "fastvid")  # sorted, unique, in range, shapes
    assert torch.isfinite(out.values).all()
    assert out.keep.numel() >= 1
    slots = torch.arange(out.keep.numel())
    assert torch.equal(out.assign[out.keep], slots)  # every kept token is its own slot
    assert bool(((out.assign >= -1) & (out.assign < out.keep.numel())).all())
    segs = out.info["segments"]  # half-open
    assert segs[0][0] == 0 and segs[-1][1] == t
    assert all(b[0] == a[1] for a, b in zip(segs, segs[1:])) and all(e > s for s, e in segs)


def test_edge_cases_and_fallbacks():
    feats, glob, attn = video(1, 35, 8)  # one frame, odd 5x7 grid
    out = FastVID(retain=0.2).run(feats, glob, attn, "llava_onevision")
    assert out.keep.numel() == int(35 * 0.2) and out.info["segments"] == [(0, 1)]
    feats, glob, attn = video(3, 16, 8)
    # DySeg_c - 1 > T - 1 makes the reference's topk raise: here every transition is cut
    assert dyseg(glob, 8, 0.0) == [(0, 0), (1, 1), (2, 2)]
    # retain so small that int(n * retain) == 0: one token per frame
    assert FastVID(retain=0.01).run(feats, glob, attn, "llava_onevision").keep.numel() == 3
    # retain = 1.0 keeps every token (contextual centres merge with themselves and their segment)
    full = FastVID(retain=1.0, DySeg_c=3).run(feats, glob, attn, "llava_onevision")
    assert full.keep.numel() == 3 * 16


def test_dtype_is_kept():
    feats, glob, attn = video(4, 16, 8)
    out = FastVID(retain=0.5, DySeg_c=2).run(feats.to(torch.bfloat16), glob, attn, "llava_video")
    assert out.values.dtype == torch.bfloat16


def test_pooling_head_equals_siglip_head():
    torch.manual_seed(0)
    config = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                image_size=28, patch_size=4, vision_use_head=True)
    model = SiglipVisionModel(config).eval()
    weights = siglip_head_weights(model)
    hidden = torch.randn(3, 49, 32)
    vm = getattr(model, "vision_model", model)
    with torch.no_grad():
        normed = vm.post_layernorm(hidden)
        want_pooled = vm.head(normed)
        probe = vm.head.probe.repeat(3, 1, 1)
        _, want_attn = vm.head.attention(probe, normed, normed)  # averaged over heads
    pooled, attn = siglip_pooling_head(hidden, weights, num_heads=4)
    torch.testing.assert_close(pooled, want_pooled, atol=1e-5, rtol=0)
    torch.testing.assert_close(attn, want_attn[:, 0], atol=1e-6, rtol=0)
    # the policy uses them when the adapter supplies the tower features (no substitute warning)
    tokens = TokenSet(torch.randn(3, 49, 16), (3, 7, 7), signals={"vision_features": hidden})
    policy = FastVID(retain=0.3, DySeg_c=2, pooling_head=weights, pooling_head_heads=4)
    assert "vision_features" in policy.optional_needs
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = policy(tokens)
    glob, _ = siglip_pooling_head(hidden, weights, 4)
    want = policy.run(tokens.features, glob, attn, "llava_onevision")
    assert torch.equal(out.keep, want.keep)


def test_signal_preference_and_one_time_warning():
    feats, _, attn = video(4, 16, 8, seed=3)
    qwen = TokenSet(feats, (4, 4, 4), signals={"frame_query_attention": attn}, layout="qwen2_5_vl", frames_per_step=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the Qwen2.5-VL reference's own signals: no warning
        FastVID(retain=0.5, DySeg_c=2)(qwen)
    bare = TokenSet(feats, (4, 4, 4), layout="test_layout_without_signals")
    with pytest.warns(UserWarning, match="using the frame mean token"):
        FastVID(retain=0.5, DySeg_c=2)(bare)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same message is not repeated
        FastVID(retain=0.5, DySeg_c=2)(bare)


def test_presets_and_parameter_errors():
    assert FastVID().resolved_preset("qwen3_vl") == "qwen2_5_vl"
    assert FastVID().resolved_preset("llava_onevision") == "llava_onevision"
    assert FastVID(preset="llava_video").resolved_preset("llava_onevision") == "llava_video"
    assert FastVID().resolved_tau("qwen2_5_vl") == 0.84 and FastVID().resolved_tau("llava_video") == 0.9
    assert isinstance(tc.build_policy("fastvid", retain=0.2), FastVID)
    for bad, match in [
        (dict(DySeg_c=0), "DySeg_c must be a positive int"),
        (dict(DTM_p=1.5), "DTM_p must be a positive int"),
        (dict(STPrune_d=1.2), "STPrune_d must be in"),
        (dict(DySeg_tau=2.0), "DySeg_tau must be a cosine threshold"),
        (dict(preset="llava"), "preset must be one of"),
        (dict(retain=0.0), "retain must be a fraction"),
    ]:
        with pytest.raises(ValueError, match=match):
            FastVID(**bad)
    with pytest.raises(ValueError, match="full frame grid"):
        FastVID()(TokenSet(torch.randn(2, 4, 3), (2, 2, 2), available=torch.rand(2, 4) > 0.5))
