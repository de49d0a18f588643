"""The "pixels" signal: adapters hand policies the frames the vision tower saw."""

from __future__ import annotations

import numpy as np
import torch

from tokcompress.adapters.base import tail_frames
from tokcompress.adapters.qwen2_vl import patches_to_frames


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


def test_tail_frames_takes_the_last_frames_across_calls():
    image = torch.zeros(3, 1, 2, 2)
    video = torch.arange(5.0)[:, None, None, None].expand(5, 1, 2, 2)
    assert torch.equal(tail_frames([image, video], 4), video[1:])
    both = tail_frames([image, video], 7)
    assert both.shape[0] == 7 and torch.equal(both[2:], video) and torch.equal(both[:2], image[1:])
    assert tail_frames([image], 4) is None
    assert tail_frames([], 1) is None
