"""Vision-side signals recomputed from a layer's q/k equal what eager attention computes.

Independent references: the towers' own eager attention probabilities (``output_attentions=True``)
for SigLIP/CLIP, and for Qwen2.5-VL (whose vision attention never returns probabilities) the
layer's own ``qkv`` output and transformers' rotary function, captured with hooks on the real tower.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

import tokcompress as tc
from tokcompress.adapters.vision_signals import (
    attention_rows,
    encoder_layers,
    feature_layer,
    layer_attention_capture,
    mean_query_attention,
    mean_received_attention,
    project_qk,
)

from conftest import Spy, batch_inputs, tiny


def _tower(kind: str):
    torch.manual_seed(0)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=28, patch_size=4)
    config = SiglipVisionConfig(**common, vision_use_head=False) if kind == "siglip" else CLIPVisionConfig(**common)
    config._attn_implementation = "eager"
    model = SiglipVisionModel(config) if kind == "siglip" else CLIPVisionModel(config)
    return model.eval()


@pytest.mark.parametrize("kind", ["siglip", "clip"])
def test_recomputed_attention_equals_eager(kind):
    model = _tower(kind)
    pixels = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        out = model(pixel_values=pixels, output_attentions=True, output_hidden_states=True)
    layers = encoder_layers(model)
    for i, layer in enumerate(layers):
        eager = out.attentions[i]  # (B, H, S, S)
        qk = project_qk(layer, out.hidden_states[i])
        torch.testing.assert_close(mean_received_attention(qk), eager.mean(1).mean(1), atol=1e-6, rtol=0)
        # block-wise over query rows gives the same
        torch.testing.assert_close(mean_received_attention(qk, max_block=100), eager.mean(1).mean(1), atol=1e-6, rtol=0)
        rows = torch.tensor([0, 5])
        torch.testing.assert_close(attention_rows(qk, rows), eager[:, :, rows], atol=1e-6, rtol=0)
        # mean-query attention: softmax of the mean query against the keys, per head, then mean over heads
        x = layer.layer_norm1(out.hidden_states[i])
        heads = layer.self_attn.num_heads
        q = layer.self_attn.q_proj(x).reshape(3, -1, heads, 8).mean(1)  # (B, H, d)
        k = layer.self_attn.k_proj(x).reshape(3, -1, heads, 8)
        want = torch.softmax(torch.einsum("bhd,bshd->bhs", q, k) / math.sqrt(8), dim=-1).mean(1)
        torch.testing.assert_close(mean_query_attention(qk), want, atol=1e-6, rtol=0)


def test_cls_capture_drops_the_cls_column():
    model = _tower("clip")
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        out = model(pixel_values=pixels, output_attentions=True, output_hidden_states=True)
    layer = encoder_layers(model)[1]
    got = layer_attention_capture(["vision_attention", "frame_query_attention"], cls_token=True)(
        layer, (out.hidden_states[1],), {}, None
    )
    eager = out.attentions[1]
    torch.testing.assert_close(got["vision_attention"], eager.mean(1).mean(1)[:, 1:], atol=1e-6, rtol=0)
    torch.testing.assert_close(got["frame_query_attention"], eager[:, :, 0, 1:].mean(1), atol=1e-6, rtol=0)


def test_feature_layer_follows_hidden_states_indexing():
    model = _tower("siglip")
    layers = encoder_layers(model)
    pixels = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        out = model(pixel_values=pixels, output_hidden_states=True)
    for index in (-1, -2, 1, 3, [-2, -1]):
        layer = feature_layer(layers, index)
        last = index[-1] if isinstance(index, list) else index
        seen = []
        handle = layer.register_forward_hook(lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o))
        with torch.no_grad():
            model(pixel_values=pixels)
        handle.remove()
        assert torch.equal(seen[0], out.hidden_states[last])
    assert feature_layer(layers, 0) is None
    with pytest.raises(ValueError, match="outside a tower of 3 layers"):
        feature_layer(layers, 5)


class AttentionSpy(Spy):
    optional_needs = frozenset({"vision_attention", "frame_query_attention"})


def _spy(model, inputs, generate: bool):
    spy = AttentionSpy()
    with tc.compressed(model, spy), torch.no_grad():
        if generate:
            model.generate(**inputs, max_new_tokens=1, do_sample=False, num_beams=2)
        else:
            model(**inputs)
    return spy.signals


def test_llava_onevision_signals_equal_eager_tower_attention():
    model, _ = tiny("llava_onevision", "eager")
    inputs = batch_inputs("llava_onevision", 2, "eager")
    tower = model.model.vision_tower
    pixels = inputs["pixel_values_videos"]
    with torch.no_grad():
        out = tower(pixel_values=pixels.flatten(0, 1), output_attentions=True)
    eager = out.attentions[-1].mean(1).mean(1)  # vision_feature_layer -1: the last layer
    side = math.isqrt(eager.shape[1])
    h, w = tc.adapters.adapter_for(model).frame_grid(model)
    want = torch.nn.functional.interpolate(eager.reshape(-1, 1, side, side), size=(h, w), mode="bilinear")
    want = want.reshape(pixels.shape[0], pixels.shape[1], h * w)
    for generate in (False, True):
        got = _spy(model, inputs, generate)
        rows = [0, 1] if not generate else [0, 0, 1, 1]  # beams repeat each row
        assert len(got) == len(rows)
        for signals, video in zip(got, rows):
            torch.testing.assert_close(signals["vision_attention"], want[video], atol=1e-6, rtol=0)


def test_video_llava_signals_equal_eager_tower_attention():
    model, _ = tiny("video_llava", "eager")
    inputs = batch_inputs("video_llava", 2, "eager")
    pixels = inputs["pixel_values_videos"]
    with torch.no_grad():
        out = model.model.video_tower(pixel_values=pixels.flatten(0, 1), output_attentions=True)
    attn = out.attentions[model.config.vision_feature_layer]  # hidden_states[-2] is layer[-2]'s output
    got = _spy(model, inputs, False)
    for video, signals in enumerate(got):
        frames = slice(video * pixels.shape[1], (video + 1) * pixels.shape[1])
        torch.testing.assert_close(signals["vision_attention"], attn[frames].mean(1).mean(1)[:, 1:], atol=1e-6, rtol=0)
        torch.testing.assert_close(signals["frame_query_attention"], attn[frames, :, 0, 1:].mean(1), atol=1e-6, rtol=0)


def test_qwen2_5_vl_signals_equal_a_recomputation_from_the_tower():
    """The last block's qkv output and rotary, taken from the running tower, give the same maps."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
    from transformers.vision_utils import get_vision_window_index

    model, _ = tiny("qwen2_5_vl")
    inputs = batch_inputs("qwen2_5_vl", 2)
    visual = model.model.visual
    block = visual.blocks[-1]
    grabbed = {}
    h1 = block.attn.qkv.register_forward_hook(lambda m, a, o: grabbed.__setitem__("qkv", o.detach()))
    h2 = block.attn.register_forward_pre_hook(
        lambda m, a, k: grabbed.__setitem__("rot", k["position_embeddings"]), with_kwargs=True
    )
    try:
        got = _spy(model, inputs, False)
    finally:
        h1.remove()
        h2.remove()
    heads = block.attn.num_heads
    qkv = grabbed["qkv"].reshape(grabbed["qkv"].shape[0], 3, heads, -1).permute(1, 0, 2, 3)
    q, k = apply_rotary_pos_emb_vision(qkv[0], qkv[1], *grabbed["rot"])  # (S, H, d), window order
    grid = inputs["video_grid_thw"]
    index, _ = get_vision_window_index(grid, visual.spatial_merge_size, visual.window_size, visual.patch_size)
    merge = visual.spatial_merge_size**2
    start = 0
    for video, (t, h, w) in enumerate(grid.tolist()):
        frames_q = q[start : start + t * h * w].reshape(t, h * w, heads, -1).float()
        frames_k = k[start : start + t * h * w].reshape(t, h * w, heads, -1).float()
        d = frames_q.shape[-1]
        probs = torch.softmax(torch.einsum("tqhd,tkhd->thqk", frames_q, frames_k) / math.sqrt(d), dim=-1)
        received = probs.mean(2).mean(1).reshape(t, -1, merge).mean(-1)  # window order, per merge unit
        qm = frames_q.mean(1)  # (t, H, d)
        km = frames_k.reshape(t, -1, merge, heads, d).mean(2)  # (t, units, H, d)
        fq = torch.softmax(torch.einsum("thd,tuhd->thu", qm, km) / math.sqrt(d), dim=-1).mean(1)
        units = t * h * w // merge
        reverse = torch.argsort(index[video * units : (video + 1) * units] - video * units)
        torch.testing.assert_close(got[video]["vision_attention"], received.reshape(-1)[reverse].reshape(t, -1), atol=1e-6, rtol=0)
        torch.testing.assert_close(got[video]["frame_query_attention"], fq.reshape(-1)[reverse].reshape(t, -1), atol=1e-6, rtol=0)
        start += t * h * w


def test_every_family_delivers_attention_signals(family):
    model, _ = tiny(family)
    inputs = batch_inputs(family, 2)
    for generate in (False, True):
        got = _spy(model, inputs, generate)
        assert got and all({"vision_attention", "frame_query_attention"} <= set(s) for s in got)
        for s in got:
            assert all(torch.isfinite(v).all() and (v >= 0).all() for v in s.values())


class SpyAll(Spy):
    """Also asks for the pixels, VisionZip's signals and a thumbnail where the family has them."""

    optional_needs = frozenset(
        {"vision_attention", "frame_query_attention", "pixels", "vision_saliency", "vision_keys", "thumbnail4"}
    )


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_5_vl"])
def test_two_videos_in_one_prompt_under_beams(family):
    """Beams repeat the prompt's rows, each with BOTH videos: the copies read videos A, B, A, B."""
    from conftest import two_video_inputs
    from test_pixels_signal import expected_frames

    model, _ = tiny(family)
    inputs = two_video_inputs(family)
    spy = SpyAll()
    with tc.compressed(model, spy), torch.no_grad():
        model(**inputs)
        model.generate(**inputs, max_new_tokens=1, do_sample=False, num_beams=2)
    plain, beams = spy.signals[:2], spy.signals[2:]
    assert len(plain) == 2 and len(beams) == 4
    for video, signals in enumerate(plain):  # the plain forward against the processor's own pixels
        torch.testing.assert_close(signals["pixels"], expected_frames(family, model, inputs, video), atol=0, rtol=0)
    assert not torch.equal(plain[0]["vision_attention"][:1], plain[1]["vision_attention"][:1])  # the videos differ
    names = {"vision_attention", "frame_query_attention", "pixels"}
    if family == "llava_onevision":
        names |= {"vision_saliency", "vision_keys", "thumbnail4"}
    for copy, signals in enumerate(beams):
        want = plain[copy % 2]
        assert names <= set(signals)
        for name in names:
            torch.testing.assert_close(signals[name], want[name], atol=1e-6, rtol=0)
