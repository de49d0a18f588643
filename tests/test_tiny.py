"""Checks for the tiny offline video LLMs and the synthetic-video helpers.

The geometry helpers below are the executable form of ``docs/families.md``:
they derive each video's frame count T and token grid (h, w) from the kwargs
the model receives plus its config, and say where the span's special tokens
sit. If transformers changes a layout, these tests fail first.
"""

from __future__ import annotations

import itertools
import math
import os

import numpy as np
import pytest
import torch

from tokcompress.tiny import BENCHMARK_SHAPE, FAMILIES, build, make_inputs
from tokcompress.video import read_video, synthetic_video, video_info, write_video


QUESTIONS = ["What moves?", "Which colour is the object in the top-left corner of the frame?"]


@pytest.fixture(scope="module")
def models() -> dict:
    """One sdpa model per family, built once for the module (building is cheap, imports are not)."""
    return {fam: build(fam) for fam in FAMILIES}


@pytest.fixture(scope="module")
def clips() -> list[np.ndarray]:
    return [synthetic_video(8, 64, 64, seed=0), synthetic_video(8, 64, 64, seed=1)]


# --------------------------------------------------------------------------- #
# Geometry (documented in docs/families.md)                                    #
# --------------------------------------------------------------------------- #


def placeholder_id(family: str, config) -> int:
    """The token id the model scatters visual features into."""
    if family in ("internvl", "smolvlm"):
        return config.image_token_id  # frames are fed as images
    return config.video_token_id


def video_geometry(family: str, inputs, config) -> list[tuple[int, int, int]]:
    """(T, h, w) per video, T = number of token "frames" (temporal patches for Qwen)."""
    vc = config.vision_config
    if family in ("llava_onevision", "llava_next_video", "video_llava"):
        b, t = inputs["pixel_values_videos"].shape[:2]
        n = vc.image_size // vc.patch_size
        if family == "llava_onevision":
            n = math.ceil(n / 2)  # bilinear 2x downsample
        elif family == "llava_next_video":
            n = n // config.spatial_pool_stride
        return [(t, n, n)] * b
    if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        m = vc.spatial_merge_size
        return [(int(t), int(h) // m, int(w) // m) for t, h, w in inputs["video_grid_thw"].tolist()]
    if family == "internvl":
        b = inputs["input_ids"].shape[0]
        t = inputs["pixel_values"].shape[0] // b  # all frames of all videos, concatenated
        n = int(vc.image_size[0] // vc.patch_size[0] * config.downsample_ratio)
        return [(t, n, n)] * b
    if family == "smolvlm":
        b, t = inputs["pixel_values"].shape[:2]
        n = vc.image_size // vc.patch_size // config.scale_factor
        return [(t, n, n)] * b
    raise AssertionError(family)


def expected_span_tokens(family: str, t: int, h: int, w: int) -> int:
    """Placeholder tokens per video: T*h*w plus the specials that share the placeholder id."""
    if family == "llava_onevision":
        return t * h * w + 1  # one trailing image_newline per video
    if family == "video_llava":
        return t * (h * w + 1)  # CLS first in every frame
    return t * h * w


def runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """(start, length) of consecutive True runs in a 1-D bool tensor."""
    out, pos = [], 0
    for value, group in itertools.groupby(mask.tolist()):
        n = len(list(group))
        if value:
            out.append((pos, n))
        pos += n
    return out


# --------------------------------------------------------------------------- #
# Tests                                                                        #
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("family", FAMILIES)
def test_builds_real_classes(models, family):
    model, processor = models[family]
    assert type(model).__module__.startswith(f"transformers.models.{family}")
    assert type(processor).__module__.startswith(f"transformers.models.{family}")
    assert not model.training
    assert model.config.get_text_config().vocab_size >= len(processor.tokenizer)
    # the language model attribute adapters hook into
    lm = model.model.text_model if family == "smolvlm" else model.model.language_model
    assert len(lm.layers) == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_batch2_left_padded(models, clips, family):
    model, processor = models[family]
    inputs = make_inputs(processor, clips, QUESTIONS)
    mask = inputs["attention_mask"]
    assert mask.shape[0] == 2
    lengths = mask.sum(1)
    assert lengths[0] < lengths[1]
    pad = int(mask.shape[1] - lengths[0])
    assert mask[0, :pad].sum() == 0 and mask[0, pad:].all() and mask[1].all()
    assert (inputs["input_ids"][0, :pad] == processor.tokenizer.pad_token_id).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_placeholder_counts_match_geometry(models, clips, family):
    model, processor = models[family]
    inputs = make_inputs(processor, clips, QUESTIONS)
    pid = placeholder_id(family, model.config)
    geometry = video_geometry(family, inputs, model.config)
    ids = inputs["input_ids"]
    for row, (t, h, w) in enumerate(geometry):
        assert t >= 2 and h >= 2 and w >= 2
        is_ph = ids[row] == pid
        assert int(is_ph.sum()) == expected_span_tokens(family, t, h, w)
        r = runs(is_ph)
        if family in ("qwen3_vl", "internvl", "smolvlm"):
            # one run per (temporal) frame, each between the family's delimiters
            assert [n for _, n in r] == [h * w] * t
            tok = processor.tokenizer
            before, after = {
                "qwen3_vl": ("<|vision_start|>", "<|vision_end|>"),
                "internvl": ("<img>", "</img>"),
                "smolvlm": ("<global-img>", "<fake_token_around_image>"),
            }[family]
            for start, n in r:
                assert int(ids[row, start - 1]) == tok.convert_tokens_to_ids(before)
                assert int(ids[row, start + n]) == tok.convert_tokens_to_ids(after)
        else:
            assert len(r) == 1  # one contiguous span per video


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_forward_and_generate(models, clips, family, attn):
    model, processor = models[family] if attn == "sdpa" else build(family, attn_implementation=attn)
    batch2 = make_inputs(processor, clips, QUESTIONS)
    batch1 = make_inputs(processor, clips[:1], QUESTIONS[:1])
    with torch.no_grad():
        for inputs in (batch1, batch2):
            logits = model(**inputs).logits
            assert logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(logits).all()
            out = model.generate(**inputs, max_new_tokens=10, do_sample=False)
            assert out.shape == (inputs["input_ids"].shape[0], inputs["input_ids"].shape[1] + 10)
        # left padding must not change the un-padded row's next-token distribution
        single = model(**batch1).logits[0, -1]
        padded = model(**batch2).logits[0, -1]
    torch.testing.assert_close(padded, single, atol=2e-4, rtol=1e-4)


def _identity(module, args, kwargs, output):
    hidden = args[0] if args else kwargs["hidden_states"]
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@pytest.mark.parametrize("family", FAMILIES)
def test_span_order_is_raster_t_major(family):
    """Perturb one cell of one frame with the vision blocks made identity: exactly one span token changes."""
    model, processor = build(family)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and not any(
            s in name for s in ("language_model", "text_model", "deepstack_merger", "image_tower")
        ):
            for layer in module:
                layer.register_forward_hook(_identity, with_kwargs=True)
    captured = {}
    lm = model.model.text_model if family == "smolvlm" else model.model.language_model
    lm.register_forward_pre_hook(lambda m, a, k: captured.update(e=k["inputs_embeds"][0]), with_kwargs=True)

    side = 64 if family.startswith("qwen") else 32  # processor's own size: no resampling blur
    base = synthetic_video(8, side, side, num_objects=0, seed=5)

    def embeds(video):
        inputs = make_inputs(processor, video, "q")
        with torch.no_grad():
            model(**inputs)
        return inputs, captured["e"].clone()

    inputs, e0 = embeds(base)
    (t_tok, h, w) = video_geometry(family, inputs, model.config)[0]
    frames_per_t = 8 // t_tok
    positions = (inputs["input_ids"][0] == placeholder_id(family, model.config)).nonzero().flatten()
    cell = side // h
    for frame, i, j in [(0, 0, 3), (3, 2, 1), (7, 3, 3)]:
        video = base.copy()
        video[frame, i * cell : (i + 1) * cell, j * cell : (j + 1) * cell] = (255, 255, 0)
        _, e1 = embeds(video)
        change = (e1 - e0).norm(dim=-1)[positions]
        changed = (change > 1e-3 * change.max()).nonzero().flatten().tolist()
        t = frame // frames_per_t
        if family == "video_llava":
            expected = t * (h * w + 1) + 1 + i * w + j  # CLS at index 0 of each frame
        else:
            expected = t * h * w + i * w + j
        assert changed == [expected], (frame, i, j)


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_5_vl", "qwen3_vl", "smolvlm"])
def test_save_pretrained_round_trip(models, clips, family, tmp_path, monkeypatch):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, processor = models[family]
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    model2 = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    processor2 = AutoProcessor.from_pretrained(tmp_path)
    assert type(model2) is type(model) and type(processor2) is type(processor)
    a = make_inputs(processor, clips, QUESTIONS)
    b = make_inputs(processor2, clips, QUESTIONS)
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
    with torch.no_grad():
        torch.testing.assert_close(model2(**b).logits, model(**a).logits)


def test_same_seed_same_weights():
    a, _ = build("qwen2_vl", seed=3)
    b, _ = build("qwen2_vl", seed=3)
    c, _ = build("qwen2_vl", seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_benchmark_shaped_overrides():
    model, processor = build("llava_onevision", **BENCHMARK_SHAPE)
    text = model.config.text_config
    assert (text.hidden_size, text.num_hidden_layers) == (256, 8)
    assert (text.num_attention_heads, text.num_key_value_heads, text.intermediate_size) == (4, 1, 704)
    inputs = make_inputs(processor, synthetic_video(40, 112, 112), "q")  # subsampled to 32 frames
    assert inputs["pixel_values_videos"].shape[:2] == (1, 32)
    assert int((inputs["input_ids"] == model.config.video_token_id).sum()) == 32 * 196 + 1
    with pytest.raises(TypeError):
        build("qwen2_vl", hidden_dim=3)


def test_synthetic_video_deterministic_with_static_background():
    a = synthetic_video(16, 64, 64, seed=0)
    assert a.shape == (16, 64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, synthetic_video(16, 64, 64, seed=0))
    assert not np.array_equal(a, synthetic_video(16, 64, 64, seed=1))
    static = (a == a[:1]).all(axis=(0, 3)).mean()
    assert 0.3 < static < 0.95  # mostly static background, but things move


def test_video_write_read_round_trip(tmp_path):
    frames = synthetic_video(16, 48, 64, seed=2)
    path = tmp_path / "clip.mp4"
    write_video(path, frames, fps=8)
    assert os.path.getsize(path) > 0
    info = video_info(path)
    assert info["num_frames"] == 16 and info["fps"] == pytest.approx(8.0)
    assert info["duration"] == pytest.approx(2.0, abs=0.2)
    decoded = read_video(path)
    assert decoded.shape == frames.shape and decoded.dtype == np.uint8
    # yuv420p chroma subsampling + mpeg4: close, not exact
    assert np.abs(decoded.astype(int) - frames.astype(int)).mean() < 10
    four = read_video(path, num_frames=4)
    assert four.shape[0] == 4
    assert np.abs(four.astype(int) - frames[[0, 5, 10, 15]].astype(int)).mean() < 10
    assert read_video(path, fps=2).shape[0] == 4  # every 4th frame of an 8 fps clip
    assert read_video(path, max_frames=5).shape[0] == 5
    with pytest.raises(ValueError):
        write_video(tmp_path / "odd.mp4", synthetic_video(2, 33, 64))
