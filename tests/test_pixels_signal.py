"""The "pixels" signal, and EVS / EVS-pixel / DivPrune through generate on every family.

The pixels a policy receives are checked against the processor's own pixel tensors (re-arranged
here by the documented token -> pixel rule); generate is checked against a manual call of the
language model with the kept tokens (tests/reference.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tokcompress as tc
from tokcompress.adapters.base import encoded_offsets, encoded_offsets_or_none
from tokcompress.adapters.qwen2_vl import patches_to_frames
from tokcompress.tiny import FAMILIES

from conftest import Spy, batch_inputs, tiny
from reference import assert_rows_match, compressed_greedy, reference_inputs
from test_policies_evs_divprune import divprune_reference, evs_reference

STEPS = 2


def test_patches_to_frames_inverts_the_qwen_video_processor():
    from transformers import Qwen2VLVideoProcessor

    processor = Qwen2VLVideoProcessor(
        do_resize=False, do_normalize=False, do_rescale=True, patch_size=14, merge_size=2, temporal_patch_size=2
    )
    video = np.random.default_rng(0).integers(0, 256, size=(5, 56, 84, 3), dtype=np.uint8)  # odd: padded to 6
    out = processor(videos=[video], return_tensors="pt", do_sample_frames=False, cap_pixels_per_frame=False)
    grid = tuple(out["video_grid_thw"][0].tolist())
    assert grid == (3, 4, 6)
    frames = patches_to_frames(out["pixel_values_videos"], grid, merge=2, step=2, patch=14)
    want = torch.from_numpy(video).permute(0, 3, 1, 2).float() / 255
    want = torch.cat([want, want[-1:]])  # the processor repeats the last frame
    torch.testing.assert_close(frames, want, atol=1e-6, rtol=0)


def test_encoded_offsets_plain_and_beam_repeated():
    # two rows, row 0 has a 4-frame video and a 2-frame one, row 1 a 3-frame one
    assert encoded_offsets([(0, 4), (0, 2), (1, 3)], batch=2, encoded=9) == [0, 4, 6]
    # the same prompts expanded for 2 beams: rows 0,1 show prompt 0 and rows 2,3 prompt 1
    items = [(0, 4), (0, 2), (1, 4), (1, 2), (2, 3), (3, 3)]
    assert encoded_offsets(items, batch=4, encoded=9) == [0, 4, 0, 4, 6, 6]
    with pytest.raises(RuntimeError, match="vision tower saw 8"):
        encoded_offsets([(0, 4), (1, 3)], batch=2, encoded=8)
    # one 3-frame and one 5-frame video per row; two beams each (rows 0,1 and 2,3)
    assert encoded_offsets_or_none([(0, 3), (1, 5)], 2, 8) == [0, 3]
    assert encoded_offsets_or_none([(0, 3), (1, 3), (2, 5), (3, 5)], 4, 8) == [0, 0, 3, 3]
    # one prompt holding both videos, two beams: each copy reads both videos, in prompt order
    assert encoded_offsets_or_none([(0, 3), (0, 5), (1, 3), (1, 5)], 2, 8) == [0, 3, 0, 3]
    assert encoded_offsets_or_none([(0, 3), (1, 5), (2, 3), (3, 5)], 4, 8) is None  # copies differ: no repeat
    assert encoded_offsets_or_none([(0, 3), (1, 5)], 2, 7) is None


def test_encoded_offsets_per_video_entries():
    """One unit per video (towers that report one entry per video, e.g. Qwen-VL's grids)."""
    one = lambda rows: [(r, 1) for r in rows]  # noqa: E731
    assert encoded_offsets_or_none(one([0, 1]), 2, 2) == [0, 1]
    # 2 input rows x 3 beams, one video each: LM rows 0-2 show video 0, rows 3-5 video 1
    assert encoded_offsets_or_none(one(range(6)), 6, 2) == [0, 0, 0, 1, 1, 1]
    # two videos in row 0, one in row 1, repeated twice
    assert encoded_offsets_or_none(one([0, 0, 1, 1, 2, 3]), 4, 3) == [0, 1, 0, 1, 2, 2]
    assert encoded_offsets_or_none(one([0, 1, 2]), 3, 2) is None  # cannot be told apart
    assert encoded_offsets_or_none([], 1, 0) is None


class RecordPixels(Spy):
    needs = frozenset({"pixels"})


def expected_frames(family: str, model, inputs: dict, row: int) -> torch.Tensor:
    """Row ``row``'s video frames from the processor outputs, cropped as the adapters document."""
    vision = model.config.vision_config
    if family.startswith("qwen"):
        grids = [tuple(g) for g in inputs["video_grid_thw"].tolist()]
        pieces = inputs["pixel_values_videos"].split([t * h * w for t, h, w in grids])
        m, step, p = vision.spatial_merge_size, vision.temporal_patch_size, vision.patch_size
        return patches_to_frames(pieces[row], grids[row], m, step, p)
    if family == "internvl":
        pixels = inputs["pixel_values"]
        frames = pixels.shape[0] // 2
        patch = vision.patch_size[0] if isinstance(vision.patch_size, (list, tuple)) else vision.patch_size
        unit = round(patch / model.config.downsample_ratio)
        video = pixels[row * frames : (row + 1) * frames]
    elif family == "smolvlm":
        unit = vision.patch_size * model.config.scale_factor
        video = inputs["pixel_values"][row]
    else:
        unit = vision.patch_size * (model.config.spatial_pool_stride if family == "llava_next_video" else 1)
        video = inputs["pixel_values_videos"][row]
    side_h, side_w = video.shape[-2] // unit * unit, video.shape[-1] // unit * unit
    return video[..., :side_h, :side_w]


def test_every_family_hands_policies_the_processed_frames(family):
    model, _ = tiny(family)
    inputs = batch_inputs(family, 2)
    policy = RecordPixels()
    with tc.compressed(model, policy), torch.no_grad():
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
    assert len(policy.seen) == 2
    for row, (signals, grid, step) in enumerate(policy.seen):
        pixels = signals["pixels"]
        want = expected_frames(family, model, inputs, row)
        torch.testing.assert_close(pixels, want, atol=0, rtol=0)
        t, h, w = grid
        assert pixels.shape[0] == t * step
        # the documented bins tile the cropped frame exactly
        assert pixels.shape[-2] % h == 0 and pixels.shape[-1] % w == 0


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_5_vl"])
def test_beam_rows_get_their_own_prompt_frames(family):
    model, _ = tiny(family)
    inputs = batch_inputs(family, 2)
    policy = RecordPixels()
    with tc.compressed(model, policy), torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, num_beams=2, do_sample=False)
    assert len(policy.seen) == 4
    for expanded, signals in enumerate(policy.signals):
        torch.testing.assert_close(signals["pixels"], expected_frames(family, model, inputs, expanded // 2), atol=0, rtol=0)


@pytest.mark.parametrize("name", ["evs", "evs_pixel", "divprune"])
def test_generate_matches_manual_reference(family, name):
    model, _ = tiny(family)
    inputs, captured = reference_inputs(family)  # left-padded, different question lengths
    got = compressed_greedy(model, inputs, STEPS, name, retain=0.4)
    records = got[2]
    assert len(records) == 2
    for row in range(2):
        rec = records[row]
        video = rec.videos[0]
        t, h, w = video.grid
        n = h * w
        feats = captured.embeds[row, video.positions].reshape(t, h, w, -1)
        if name == "divprune":
            want = max(1, int(round(0.4 * t * n)))
            assert video.keep.tolist() == divprune_reference(feats.reshape(t * n, -1), want).sort().values.tolist()
        else:
            want = max(n, int(t * n * (1 - (1 - 0.4))))
            assert video.keep[:n].tolist() == list(range(n)), "first temporal step kept whole"
            if name == "evs":
                assert video.keep.tolist() == evs_reference(feats, 1 - 0.4).nonzero().squeeze(1).tolist()
        assert video.keep.numel() == want
        assert rec.video_tokens_after == want + (rec.video_tokens_before - t * n)
    assert_rows_match(model, captured, inputs, got, STEPS)


def test_divprune_compacted_positions_match_a_renumbered_reference():
    family = "llava_onevision"
    model, _ = tiny(family)
    inputs, captured = reference_inputs(family)
    got = compressed_greedy(model, inputs, STEPS, "divprune", retain=0.3, positions="compacted")
    assert len(got[2]) == 2
    assert_rows_match(model, captured, inputs, got, STEPS, compacted=True)


def test_families_are_covered():
    assert len(FAMILIES) == 8
