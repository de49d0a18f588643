"""tokcompress.viz: the token -> pixel mapping, and the pictures' content (pixels, artists, the PNG)."""

from __future__ import annotations

import warnings

import matplotlib

matplotlib.use("Agg")

import matplotlib.image as mpimg  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import tokcompress as tc  # noqa: E402
from tokcompress import viz  # noqa: E402
from tokcompress.policies.baselines import Pool, Uniform  # noqa: E402
from tokcompress.tokens import Compression, TokenSet  # noqa: E402

from conftest import batch_inputs, tiny  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def tokens(t: int, h: int, w: int, frames_per_step: int = 1) -> TokenSet:
    return TokenSet(features=torch.randn(t, h * w, 8, generator=torch.Generator().manual_seed(0)), grid=(t, h, w),
                    frames_per_step=frames_per_step)


def white(frames: int, height: int, width: int) -> np.ndarray:
    return np.full((frames, height, width, 3), 255, dtype=np.uint8)


# ------------------------------------------------------------------------------------------ mapping
def test_step_frames_single_and_paired_frames():
    assert [list(r) for r in viz.step_frames(3, 3, 1)] == [[0], [1], [2]]
    assert [list(r) for r in viz.step_frames(4, 8, 2)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    # Qwen-VL pads an odd frame count: the last step holds one real frame.
    assert [list(r) for r in viz.step_frames(4, 7, 2)] == [[0, 1], [2, 3], [4, 5], [6]]


@pytest.mark.parametrize("steps, frames, k", [(8, 16, 1), (4, 6, 2), (4, 9, 2), (4, 8, 0)])
def test_step_frames_refuses_frames_that_do_not_fit(steps, frames, k):
    with pytest.raises(ValueError, match="frames"):
        viz.step_frames(steps, frames, k)


def test_cell_edges_and_center_square():
    assert viz.cell_edges(4, 64).tolist() == [0, 16, 32, 48, 64]
    assert viz.cell_edges(4, 30).tolist() == [0, 7, 15, 22, 30]  # floor(i * 30 / 4)
    assert viz.cell_edges(3, 40, start=12).tolist() == [12, 25, 38, 52]
    assert viz.center_square(48, 64) == (0, 8, 48, 48)
    assert viz.center_square(64, 40) == (12, 0, 40, 40)
    with pytest.raises(ValueError, match="pixels"):
        viz.cell_edges(8, 4)


# ------------------------------------------------------------------------------------------ segments
def test_segments_are_half_open():
    assert viz.segments_of({"segments": [(0, 3), (3, 8)]}, 8) == [(0, 3), (3, 8)]
    assert viz.segments_of({"segments": [(3, 8), (0, 3)]}, 8) == [(0, 3), (3, 8)]  # any order
    assert viz.segments_of({"segments": torch.tensor([[0, 8]])}, 8) == [(0, 8)]
    assert viz.segments_of({"segments": [(0, 1), (1, 2)]}, 2) == [(0, 1), (1, 2)]
    assert viz.segments_of({"frames": [0, 2]}, 8) is None


def test_fastvid_and_holitom_segments_are_read():
    """The two policies that segment the video write ``info["segments"]`` in the convention viz reads."""
    from tokcompress.policies.fastvid import FastVID, dyseg
    from tokcompress.policies.holitom import HoliTom

    g = torch.Generator().manual_seed(0)
    scenes = torch.randn(3, 1, 16, generator=g).repeat_interleave(torch.tensor([3, 2, 3]), dim=0)  # 8 frames, 3 scenes
    feats = scenes.expand(8, 16, 16) + 0.01 * torch.randn(8, 16, 16, generator=g)
    glob, attn = feats.mean(1), torch.rand(8, 16, generator=g)
    out = FastVID(retain=0.3, DySeg_c=3).run(feats, glob, attn, "llava_video")
    inclusive = dyseg(glob, 3, 0.9)  # (first, last) per segment
    assert viz.segments_of(out.info, 8) == [(a, b + 1) for a, b in inclusive] == [(0, 3), (3, 5), (5, 8)]
    res = HoliTom(retain=0.3, max_window_size=3).run(TokenSet(features=feats, grid=(8, 4, 4)))
    comp = HoliTom(retain=0.3, max_window_size=3).compress(TokenSet(features=feats, grid=(8, 4, 4)))
    assert viz.segments_of(comp.info, 8) == [(a, b + 1) for a, b in res.windows]
    assert "windows" not in comp.info


def test_segments_that_do_not_partition_warn_and_are_not_drawn():
    with pytest.warns(UserWarning, match="does not partition"):
        assert viz.segments_of({"segments": [(0, 3), (4, 8)]}, 8) is None
    with pytest.warns(UserWarning, match="pairs"):
        assert viz.segments_of({"segments": [1, 2, 3]}, 8) is None


# ------------------------------------------------------------------------------------------ rendered pixels
def test_render_selection_keeps_exactly_the_kept_cells():
    # grid (2, 3, 4) over 48x64 frames: every cell is exactly 16x16 pixels.
    keep = torch.tensor([0, 5, 11, 12, 13, 22])
    sel = viz.kept(Compression(keep=keep), tokens=tokens(2, 3, 4))
    rng = np.random.default_rng(0)
    frames = rng.integers(20, 255, size=(2, 48, 64, 3), dtype=np.uint8)
    img = viz.render(sel, frames, dim=0.3)
    base = frames / 255.0
    untouched, dimmed = set(), set()
    for t in range(2):
        for y in range(3):
            for x in range(4):
                cell = img[t, 16 * y : 16 * y + 16, 16 * x : 16 * x + 16]
                orig = base[t, 16 * y : 16 * y + 16, 16 * x : 16 * x + 16]
                if np.allclose(cell, orig):
                    untouched.add(t * 12 + y * 4 + x)
                elif np.allclose(cell, 0.3 * orig):
                    dimmed.add(t * 12 + y * 4 + x)
    assert untouched == {0, 5, 11, 12, 13, 22}
    assert len(untouched) + len(dimmed) == 24


def test_render_paired_frames_shows_first_frame_of_each_step():
    frames = np.stack([np.full((8, 8, 3), 10 * i, dtype=np.uint8) for i in range(6)])
    comp = Compression(keep=torch.arange(12))  # keep all tokens of the 3 steps of 2x2
    img = viz.render(comp, frames, tokens=tokens(3, 2, 2, frames_per_step=2))
    assert [round(float(img[s, 0, 0, 0]) * 255) for s in range(3)] == [0, 20, 40]


def test_render_region_maps_cells_onto_the_center_crop():
    # 40x64 frame, a centre-cropping processor sees columns 12..51; a 4x4 grid has 10-pixel cells there.
    sel = viz.kept(Compression(keep=torch.tensor([5])), tokens=tokens(1, 4, 4))  # cell (y=1, x=1)
    img = viz.render(sel, white(1, 40, 64), region=viz.center_square(40, 64), dim=0.5)[0]
    bright = np.argwhere(img[..., 0] == 1.0)
    assert bright[:, 0].min() == 10 and bright[:, 0].max() == 19
    assert bright[:, 1].min() == 22 and bright[:, 1].max() == 31
    assert np.all(img[:, :12] == 0.5) and np.all(img[:, 52:] == 0.5)  # outside the crop: dimmed


def test_render_merged_groups_one_colour_each():
    # Pool 4x4 -> 2x2: the 2x2 blocks are the groups (independent of pool's own code).
    ts = tokens(1, 4, 4)
    comp = Pool(retain=0.25)(ts)
    img = viz.render(comp, white(1, 32, 32), tokens=ts, tint=0.5)[0]
    colour = {}
    for y in range(4):
        for x in range(4):
            cell = img[8 * y : 8 * y + 8, 8 * x : 8 * x + 8].reshape(-1, 3)
            assert np.allclose(cell, cell[0])  # a cell is one flat tint on a white frame
            colour[(y, x)] = tuple(np.round(cell[0], 6))
    blocks = {(y // 2, x // 2) for y in range(4) for x in range(4)}
    per_block = {b: {colour[(y, x)] for y in range(4) for x in range(4) if (y // 2, x // 2) == b} for b in blocks}
    assert all(len(c) == 1 for c in per_block.values())
    assert len({next(iter(c)) for c in per_block.values()}) == 4
    assert all(c != (1.0, 1.0, 1.0) for c in colour.values())  # every cell is tinted: all were merged


def test_kept_tokens_counts_for_merging():
    ts = tokens(2, 4, 4)
    sel = viz.kept(Pool(retain=0.25)(ts), tokens=ts)
    assert sel.keep.size == 8
    assert sel.per_step().tolist() == [4, 4]
    assert sel.group_sizes.tolist() == [4] * 8
    assert sel.merged.all() and sel.covered.all()
    assert int(sel.carriers.sum()) == 8


# ------------------------------------------------------------------------------------------ figures
def _outlined_count(ax) -> int:
    return sum(len(c.get_paths()) for c in ax.collections if c.get_gid() == "kept")


def test_plot_frames_outlines_one_rectangle_per_kept_token():
    keep = torch.tensor([0, 5, 11, 12, 13, 22])
    ts = tokens(2, 3, 4)
    fig = viz.plot_frames(Compression(keep=keep), white(2, 48, 64), tokens=ts)
    panels = [ax for ax in fig.axes if ax.images]
    assert [_outlined_count(ax) for ax in panels] == [3, 3]
    # Where the outlines sit: the bounding boxes' top-left corners in pixel coordinates -> cells.
    cells = set()
    for t, ax in enumerate(panels):
        for c in ax.collections:
            for path in c.get_paths():
                x0, y0 = path.vertices.min(axis=0)
                cells.add(t * 12 + int(round(y0 + 0.5)) // 16 * 4 + int(round(x0 + 0.5)) // 16)
    assert cells == {0, 5, 11, 12, 13, 22}


def test_png_has_as_many_bright_cells_as_kept_tokens(tmp_path):
    """Read the saved PNG back and classify each cell's centre pixel: bright = kept, grey = dropped."""
    keep = torch.tensor([1, 2, 7, 8, 15])
    ts = tokens(1, 4, 4)
    path = tmp_path / "frames.png"
    fig = viz.plot_frames(Compression(keep=keep), white(1, 64, 64), tokens=ts, dim=0.3, path=path)
    fig.canvas.draw()
    ax = next(ax for ax in fig.axes if ax.images)
    png = mpimg.imread(path)[..., :3]
    height = png.shape[0]
    bright = set()
    for y in range(4):
        for x in range(4):
            px, py = ax.transData.transform((16 * x + 7.5, 16 * y + 7.5))
            value = png[int(height - py), int(px)]
            if np.all(value > 0.9):
                bright.add(y * 4 + x)
            else:
                assert np.allclose(value, 0.3, atol=0.02), value
    assert bright == {1, 2, 7, 8, 15}


def test_plot_budget_bars_and_segment_boundaries():
    ts = tokens(8, 2, 2)
    comp = Compression(keep=torch.tensor([0, 1, 2, 3, 4, 9, 13, 14, 29]),
                       info={"segments": [(0, 3), (3, 5), (5, 8)]})  # cuts before steps 3 and 5
    fig = viz.plot_budget(comp, tokens=ts)
    ax = fig.axes[0]
    bars = [p for p in ax.patches if p.get_gid() == "kept-per-step"]
    assert [int(b.get_height()) for b in bars] == [4, 1, 1, 2, 0, 0, 0, 1]
    lines = [ln for ln in ax.lines if ln.get_gid() == "segment-boundary"]
    assert sorted(float(ln.get_xdata()[0]) for ln in lines) == [2.5, 4.5]


def test_plot_frames_colours_panel_borders_by_segment():
    ts = tokens(4, 2, 2)
    comp = Compression(keep=torch.arange(16), info={"segments": [(0, 1), (1, 4)]})
    fig = viz.plot_frames(comp, None, tokens=ts)
    panels = [ax for ax in fig.axes if ax.images]
    colours = [matplotlib.colors.to_hex(ax.spines["top"].get_edgecolor()) for ax in panels]
    assert colours[0] != colours[1] and colours[1] == colours[2] == colours[3]


def test_show_and_plot_policies_save_pngs(tmp_path):
    ts = tokens(4, 4, 4)
    frames = white(4, 32, 32)
    fig = viz.show((ts, Uniform(retain=0.25)(ts)), frames, path=tmp_path / "show.png")
    assert (tmp_path / "show.png").stat().st_size > 0
    assert sum(_outlined_count(ax) for ax in fig.axes) == 16
    fig = viz.plot_policies({"uniform": (ts, Uniform(retain=0.25)(ts)), "pool": (ts, Pool(retain=0.5)(ts))},
                            frames, steps=[0, 3], path=tmp_path / "pols.png")
    counts = [_outlined_count(ax) for ax in fig.axes if ax.images]
    # rows: uniform keeps 4 of 16 per step; pool at 0.5 pools 4x4 to round(4 / sqrt(2)) = 3 -> 3x3 = 9 per step
    assert counts == [4, 4, 9, 9]
    assert mpimg.imread(tmp_path / "pols.png").shape[-1] in (3, 4)


# ------------------------------------------------------------------------------------------ inputs
def test_kept_refuses_bad_inputs():
    with pytest.raises(ValueError, match="TokenSet"):
        viz.kept(Compression(keep=torch.tensor([0])))
    with pytest.raises(TypeError, match="wrapped model"):
        viz.kept("uniform")
    with pytest.raises(ValueError, match="frames must have shape"):
        viz.render(Compression(keep=torch.tensor([0])), np.zeros((1, 8, 8)), tokens=tokens(1, 2, 2))
    with pytest.raises(ValueError, match="does not fit"):
        viz.render(Compression(keep=torch.tensor([0])), white(1, 8, 8), tokens=tokens(1, 2, 2), region=(0, 4, 8, 8))
    with pytest.raises(ValueError, match="steps"):
        viz.plot_frames(Compression(keep=torch.tensor([0])), None, tokens=tokens(1, 2, 2), steps=[3])


def test_from_wrapped_model_record_llava_onevision():
    model, _ = tiny("llava_onevision")
    inputs = batch_inputs("llava_onevision", batch=2)
    frames = np.stack([np.zeros((32, 32, 3), np.uint8)] * 8)
    with tc.compressed(model, "uniform", retain=0.25):
        with pytest.raises(ValueError, match="no record"):
            viz.kept(model)
        model(**inputs)
        record = tc.last_record(model)
        sel = viz.kept(model, row=1)
        assert np.array_equal(sel.keep, record[1].videos[0].keep.numpy())
        assert sel.label == "uniform(retain=0.25)" and sel.frames_per_step == 1
        # uniform keeps keep_count(0.25, 16) = 4 of each frame's 16 tokens, 8 frames
        assert sel.per_step().tolist() == [4] * 8
        fig = viz.show(model, frames, row=1)
        assert sum(_outlined_count(ax) for ax in fig.axes) == 32
        with pytest.raises(IndexError, match="row=2"):
            viz.kept(model, row=2)
        with pytest.raises(IndexError, match="video=1"):
            viz.kept(model, video=1)


def test_from_wrapped_model_record_qwen_pairs_frames():
    model, _ = tiny("qwen2_5_vl")
    inputs = batch_inputs("qwen2_5_vl", batch=1)
    with tc.compressed(model, "random", retain=0.25, seed=3):
        model(**inputs)
        sel = viz.kept(model)
    assert sel.grid == (4, 4, 4) and sel.frames_per_step == 2
    assert viz.render(sel, white(8, 64, 64)).shape == (4, 64, 64, 3)
    with pytest.raises(ValueError, match="pass the frames the model saw"):
        viz.render(sel, white(16, 64, 64))


def test_no_warning_for_plain_policies():
    ts = tokens(2, 2, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        viz.show((ts, Uniform(retain=0.5)(ts)), None)
