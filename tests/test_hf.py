"""tokcompress.hf: the one loading path for real checkpoints (demo --model, benchmarks, lmms-eval plugin)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tokcompress.hf import Clip, load_pretrained, prepare_inputs, read_clip, resolve_dtype
from tokcompress.video import synthetic_video, write_video

from conftest import tiny


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    write_video(path, synthetic_video(24, 64, 64, seed=3), fps=8)
    return path


def test_read_clip_samples_like_lmms_eval(clip_path):
    clip = read_clip(clip_path, max_frames=8)
    assert clip.frames.shape == (8, 64, 64, 3)
    assert clip.indices.tolist() == np.linspace(0, 23, 8).round().astype(int).tolist()
    meta = clip.metadata()
    assert (meta["fps"], meta["total_num_frames"], meta["duration"]) == (8.0, 24, 3.0)
    capped = read_clip(clip_path, fps=2, max_frames=32)  # every 4th frame of an 8 fps clip
    assert capped.indices.tolist() == [0, 4, 8, 12, 16, 20]
    assert read_clip(clip_path, fps=2, max_frames=4).indices.tolist() == [0, 8, 15, 23]
    with pytest.raises(FileNotFoundError):
        read_clip(clip_path.parent / "missing.mp4")


def test_round_trip_through_save_pretrained(family, clip_path, tmp_path):
    """load_pretrained gives the same model and processor back for every family, and inputs built from a file."""
    model, processor = tiny(family)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = load_pretrained(tmp_path, dtype="float32")
    assert type(loaded) is type(model) and type(loaded_processor) is type(processor)
    assert not loaded.training and loaded_processor.tokenizer.padding_side == "left"
    inputs = prepare_inputs(loaded_processor, [clip_path], ["What moves?"], max_frames=8)
    reference = prepare_inputs(processor, [read_clip(clip_path, max_frames=8)], ["What moves?"])
    assert inputs.keys() == reference.keys()
    for key in inputs:
        if torch.is_tensor(inputs[key]):
            assert torch.equal(inputs[key], reference[key]), key
    with torch.no_grad():
        ours = loaded.generate(**inputs, max_new_tokens=3, do_sample=False)
        theirs = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(ours, theirs)


def test_batch_of_arrays_and_broadcast():
    _, processor = tiny("qwen2_5_vl")
    video = synthetic_video(8, 64, 64, seed=1)
    inputs = prepare_inputs(processor, [video], ["Short?", "A longer question here?"])
    assert inputs["input_ids"].shape[0] == 2
    assert inputs["attention_mask"][0, 0] == 0  # left padding
    with pytest.raises(ValueError, match="2 videos but 3 questions"):
        prepare_inputs(processor, [video, video], ["a", "b", "c"])
    with pytest.raises(ValueError, match="uint8"):
        Clip.from_array(video.astype(np.float32))


def test_unsupported_model_type_is_refused_before_loading_weights(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=1).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not support"):
        load_pretrained(tmp_path)


def test_resolve_dtype():
    assert resolve_dtype("auto") == "auto" and resolve_dtype(None) == "auto"
    assert resolve_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be"):
        resolve_dtype("float33")
