"""EVS, EVS-pixel and DivPrune: budgets, invariants, and agreement with direct transcriptions of the
references' own formulations (written here, independently of the library code)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from tokcompress import MissingSignalError, Sequential, TokenSet
from tokcompress.policies import DivPrune, EVS, EVSPixel, Uniform
from tokcompress.policies.divprune import divprune, divprune_count
from tokcompress.policies.evs import evs_count, evs_dissimilarity, evs_retention_mask, stable_top_k
from tokcompress.policies.evs_pixel import pixel_dissimilarity

FAST = settings(max_examples=40, deadline=None)


def tokens(t: int, h: int, w: int, d: int = 16, seed: int = 0, dtype=torch.float32, **kw) -> TokenSet:
    g = torch.Generator().manual_seed(seed)
    return TokenSet(features=torch.randn(t, h * w, d, generator=g, dtype=dtype), grid=(t, h, w), **kw)


# --------------------------------------------------------------------------------------------
# Transcriptions of the references


def divprune_reference(x: torch.Tensor, k: int) -> torch.Tensor:
    """vbdi/divprune ``DivPrune`` as written: full matrix, re-reduce the selected rows each step."""
    xn = x / x.norm(dim=1, keepdim=True)
    dm = 1.0 - xn @ xn.T
    s = torch.empty(k, dtype=torch.long)
    for i in range(k):
        if i == 0:
            scores = torch.topk(dm, 2, dim=0, largest=False).values[1, :]
        else:
            scores = torch.min(torch.index_select(dm, 0, s[:i]), dim=0).values
        s[i] = torch.argmax(scores)
    return s


def divprune_margin(x: torch.Tensor, k: int) -> float:
    """Smallest gap between the best and the runner-up score over the reference's greedy steps.

    Mutual nearest neighbours tie exactly at step 0 in exact arithmetic, so which one wins depends on
    rounding; like the golden cases, the comparison is only meaningful away from such near-ties.
    """
    xn = x / x.norm(dim=1, keepdim=True)
    dm = 1.0 - xn @ xn.T
    chosen: list[int] = []
    gap = float("inf")
    for i in range(min(k, x.shape[0] - 1)):
        if i == 0:
            scores = torch.topk(dm, 2, dim=0, largest=False).values[1, :]
        else:
            scores = dm[chosen].min(dim=0).values
        scores = scores.clone()
        scores[chosen] = -float("inf")
        top = torch.topk(scores, 2).values
        gap = min(gap, float(top[0] - top[1]))
        chosen.append(int(torch.argmax(scores)))
    return gap


def evs_reference(x: torch.Tensor, q: float) -> torch.Tensor:
    """vLLM ``compute_retention_mask`` as written, on ``(T, h, w, D)`` merged embeddings."""
    t, h, w, _ = x.shape
    sim = F.cosine_similarity(x[1:], x[:-1], dim=-1)
    dis = torch.cat([255 * torch.ones_like(x[:1, :, :, 0]), 1 - sim], dim=0)
    order = torch.argsort(dis.view(-1), dim=-1, descending=True, stable=True)
    k = max(h * w, int(t * h * w * (1 - q)))
    mask = torch.zeros(t * h * w, dtype=torch.bool)
    mask[order[:k]] = True
    return mask


# --------------------------------------------------------------------------------------------
# DivPrune


@FAST
@given(
    t=st.integers(1, 4), h=st.integers(1, 5), w=st.integers(1, 5), d=st.integers(2, 24),
    retain=st.floats(0.01, 1.0), seed=st.integers(0, 2**16),
)
def test_divprune_running_min_equals_reference_greedy(t, h, w, d, retain, seed):
    x = torch.randn(t * h * w, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    n = x.shape[0]
    k = int(round(retain * n))
    if n < 2:  # the reference's topk(2) needs two tokens
        assert divprune(x, k).tolist() == list(range(k))
        return
    assume(divprune_margin(x, k) > 1e-9)
    want = divprune_reference(x, k)
    assert torch.equal(divprune(x, k), want)
    # The blockwise path (no N x N matrix) gives the same order.
    assert torch.equal(divprune(x, k, full_matrix_max=0, block_elements=3 * n, row_batch=4), want)


@pytest.mark.parametrize(
    "ratio,n,k",
    [(0.25, 288, 72), (0.0703125, 64, 4), (0.5, 27, 14), (0.5, 25, 12), (0.098, 576, 56), (1.0, 25, 25), (0.02, 20, 0)],
)
def test_divprune_budget_is_python_round(ratio, n, k):
    assert divprune_count(ratio, n) == k  # 4.5 -> 4, 13.5 -> 14, 12.5 -> 12 (halves to even)
    ts = tokens(1, 1, n, seed=n)
    assert DivPrune(retain=ratio)(ts).keep.numel() == max(1, k)


def test_divprune_zero_budget_core_empty_policy_keeps_step0_pick():
    ts = tokens(2, 2, 5)  # N = 20, round(0.02 * 20) = 0
    x = ts.flat().double()
    assert divprune(ts.flat(), 0).numel() == 0
    keep = DivPrune(retain=0.02)(TokenSet(features=x.reshape(2, 10, -1), grid=(2, 2, 5))).keep
    assert keep.tolist() == divprune_reference(x, 1).tolist()


@pytest.mark.parametrize("grid", [(1, 4, 4), (3, 5, 7), (2, 1, 9), (5, 3, 3)])
def test_divprune_invariants(grid):
    ts = tokens(*grid, seed=sum(grid))
    out = DivPrune(retain=0.3)(ts)
    n = ts.num_tokens
    assert out.keep.numel() == max(1, round(0.3 * n))
    assert bool((out.keep[1:] > out.keep[:-1]).all())
    assert torch.equal(out.keep, out.info["order"].sort().values)
    assert out.values is None


def test_divprune_retain_one_keeps_all():
    ts = tokens(3, 4, 5)
    assert DivPrune(retain=1.0)(ts).keep.tolist() == list(range(60))


def test_divprune_duplicates_and_zero_tokens_stay_unique_and_finite():
    x = torch.ones(4, 3, 8)
    x[1:3] = 0.0  # zero tokens would be NaN in the reference's x / ||x||
    ts = TokenSet(features=x, grid=(4, 1, 3))
    keep = DivPrune(retain=1.0)(ts).keep
    assert keep.tolist() == list(range(12))
    order = divprune(x.reshape(12, 8), 6)
    assert order.unique().numel() == 6


def test_divprune_rejects_nan():
    x = torch.randn(10, 4)
    x[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        divprune(x, 3)


def test_divprune_after_another_policy_uses_available_tokens_only():
    ts = tokens(2, 4, 4, seed=3)
    out = Sequential([Uniform(retain=0.5), DivPrune(retain=0.5)])(ts)
    first = Uniform(retain=0.5)(ts).keep
    assert out.keep.numel() == round(0.5 * first.numel())
    assert set(out.keep.tolist()) <= set(first.tolist())
    x = ts.flat()[first].double()
    want = first[divprune_reference(x, out.keep.numel())].sort().values
    assert torch.equal(out.keep, want)


def test_divprune_positions_option():
    assert DivPrune(retain=0.5, positions="compacted").positions == "compacted"
    with pytest.raises(ValueError, match="positions"):
        DivPrune(retain=0.5, positions="renumbered")


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, "0.5", True])
def test_bad_retain_raises(bad):
    for cls in (DivPrune, EVS, EVSPixel):
        with pytest.raises(ValueError, match="retain"):
            cls(retain=bad)


# --------------------------------------------------------------------------------------------
# EVS


@FAST
@given(
    t=st.integers(1, 6), h=st.integers(1, 5), w=st.integers(1, 5), d=st.integers(1, 12),
    retain=st.floats(0.001, 1.0), seed=st.integers(0, 2**16),
)
def test_evs_equals_vllm_formula(t, h, w, d, retain, seed):
    ts = tokens(t, h, w, d, seed=seed)
    q = 1 - retain
    mask = evs_reference(ts.features.reshape(t, h, w, d), q)
    keep = EVS(retain=retain)(ts).keep
    assert torch.equal(keep, mask.nonzero().squeeze(1))
    assert torch.equal(evs_retention_mask(ts.features, q), mask)
    assert keep[: h * w].tolist() == list(range(h * w))  # frame 0 whole


@FAST
@given(scores=st.lists(st.integers(-3, 3), min_size=1, max_size=40), frac=st.floats(0, 1))
def test_stable_top_k_matches_stable_argsort_with_ties(scores, frac):
    s = torch.tensor(scores, dtype=torch.float32)
    k = int(frac * len(scores))
    want = torch.argsort(s, descending=True, stable=True)[:k].sort().values
    assert torch.equal(stable_top_k(s, k), want)


@pytest.mark.parametrize(
    "t,n,retain,k",
    [
        (8, 36, 0.25, 72),
        (5, 16, 0.01, 16),  # int(80 * 0.01) = 0 -> one frame
        (1, 25, 0.1, 25),
        (10, 10, 0.1, 10),  # one-frame minimum
        (20, 5, 0.1, 9),  # q = 0.9: int(100 * 0.09999999999999998) = 9, as vLLM; not 10
        (4, 25, 0.3, 30),
        (6, 24, 1.0, 144),
    ],
)
def test_evs_budget(t, n, retain, k):
    assert evs_count(t, n, 1 - retain) == k
    assert EVS(retain=retain)(tokens(t, 1, n)).keep.numel() == k


def test_evs_single_frame_and_full_retain_keep_everything():
    assert EVS(retain=0.05)(tokens(1, 3, 5)).keep.tolist() == list(range(15))
    assert EVS(retain=1.0)(tokens(4, 3, 5)).keep.tolist() == list(range(60))


def test_evs_keeps_what_changed():
    t, h, w, d = 5, 3, 4, 8
    base = torch.randn(h * w, d, generator=torch.Generator().manual_seed(0))
    x = base.expand(t, -1, -1).clone()
    moved = [(1, 5), (2, 6), (3, 7), (4, 11)]  # (frame, cell) whose embedding changes
    for f, c in moved:
        x[f:, c] = torch.randn(d, generator=torch.Generator().manual_seed(f))
    n = h * w
    retain = (n + len(moved) + 0.5) / (t * n)  # budget: frame 0 + the changed tokens
    keep = EVS(retain=retain)(TokenSet(features=x, grid=(t, h, w))).keep
    assert keep.tolist() == list(range(n)) + [f * n + c for f, c in moved]


def test_evs_needs_full_grid():
    with pytest.raises(ValueError, match="first"):
        Sequential([Uniform(retain=0.5), EVS(retain=0.5)])
    ts = tokens(2, 2, 2)
    ts.available = torch.tensor([[True, False, True, True], [True] * 4])
    with pytest.raises(ValueError, match="full frame grid"):
        EVS(retain=0.5)(ts)
    out = Sequential([EVS(retain=0.5), DivPrune(retain=0.5)])(tokens(4, 3, 3))
    assert out.keep.numel() == round(0.5 * max(9, int(36 * 0.5)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_evs_dissimilarity_is_bitwise_the_reference_cosine(dtype):
    x = torch.randn(7, 9, 33, generator=torch.Generator().manual_seed(1)).to(dtype)
    want = torch.cat([torch.full_like(x[:1, :, 0], 255), 1 - F.cosine_similarity(x[1:], x[:-1], dim=-1)])
    assert torch.equal(evs_dissimilarity(x), want)



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_evs_dissimilarity_blocked_path_is_bitwise_the_reference_cosine(dtype):
    # Large enough for the cache-blocked path, with a partial last block of grid cells and static tokens.
    from tokcompress.policies.evs import BLOCK_ELEMENTS

    d = BLOCK_ELEMENTS // 50 + 7
    x = torch.randn(6, 101, d, generator=torch.Generator().manual_seed(2)).to(dtype)
    x[3:5, :40] = x[2, :40]
    assert x.numel() > 4 * BLOCK_ELEMENTS and 101 % (BLOCK_ELEMENTS // d) != 0
    want = torch.cat([torch.full_like(x[:1, :, 0], 255), 1 - F.cosine_similarity(x[1:], x[:-1], dim=-1)])
    assert torch.equal(evs_dissimilarity(x), want)


def test_evs_no_nan_on_zero_tokens():
    x = torch.zeros(3, 4, 6)
    keep = EVS(retain=0.5)(TokenSet(features=x, grid=(3, 2, 2))).keep
    assert keep.numel() == 6 and keep.unique().numel() == 6
    half = torch.randn(3, 4, 6).half()
    half[1, 2] = 0  # the reference gives NaN here in float16 (its eps underflows)
    assert not bool(torch.isnan(evs_dissimilarity(half)).any())


# --------------------------------------------------------------------------------------------
# EVS in pixel space


def moving_square_video(frames: int, side: int = 56, cell: int = 14, seed: int = 0) -> tuple[torch.Tensor, list]:
    """A static textured background with one ``cell``-pixel square stepping one cell right per frame.

    Returns ``(F, 3, side, side)`` pixels and, per frame ``f >= 1``, the grid cells that changed.
    """
    g = torch.Generator().manual_seed(seed)
    background = torch.rand(3, side, side, generator=g) * 0.5
    video = background.expand(frames, -1, -1, -1).clone()
    cells = side // cell
    changed = [[]]
    for f in range(frames):
        y, x = 1, f % cells
        video[f, :, y * cell : (y + 1) * cell, x * cell : (x + 1) * cell] = 1.0
        if f:
            prev = (f - 1) % cells
            changed.append(sorted({y * cells + prev, y * cells + x}))
    return video, changed


def test_evs_pixel_prunes_static_background_keeps_moving_object():
    video, changed = moving_square_video(6)
    t, n = 6, 16
    moving = sum(len(c) for c in changed)
    ts = TokenSet(features=torch.randn(t, n, 8), grid=(t, 4, 4), signals={"pixels": video})
    out = EVSPixel(retain=(n + moving + 0.5) / (t * n))(ts)
    want = list(range(n)) + [f * n + c for f in range(1, t) for c in changed[f]]
    assert out.keep.tolist() == want
    assert out.info["threshold"] > 0.1  # every kept later token changed a lot


def test_evs_pixel_temporal_steps_of_two_frames():
    video, changed = moving_square_video(8)
    t, n = 4, 16  # Qwen-like: each token covers 2 frames
    scores = pixel_dissimilarity(video, (t, 4, 4), frames_per_step=2)
    assert torch.isinf(scores[0]).all()
    for step in range(1, t):
        moved = set(changed[2 * step]) | set(changed[2 * step + 1])
        hot = set((scores[step] > 0).nonzero().squeeze(1).tolist())
        assert hot == moved
    ts = TokenSet(features=torch.randn(t, n, 8), grid=(t, 4, 4), signals={"pixels": video}, frames_per_step=2)
    keep = EVSPixel(retain=(n + 9 + 0.5) / (t * n))(ts).keep  # 3 cells change per step
    assert keep.tolist() == list(range(n)) + sorted(
        s * n + c for s in range(1, t) for c in set(changed[2 * s]) | set(changed[2 * s + 1])
    )


def test_evs_pixel_uneven_bins_and_errors():
    pixels = torch.rand(6, 3, 30, 22)
    scores = pixel_dissimilarity(pixels, (3, 4, 3), frames_per_step=2)
    assert scores.shape == (3, 12) and bool(torch.isfinite(scores[1:]).all())
    # token (1, y, x): mean |p2 - p1| and |p3 - p2| over its adaptive-pool bin, then over the two frames
    y0, y1 = math.floor(1 * 30 / 4), math.ceil(2 * 30 / 4)
    x0, x1 = math.floor(2 * 22 / 3), math.ceil(3 * 22 / 3)
    manual = np.mean([(pixels[f] - pixels[f - 1]).abs()[:, y0:y1, x0:x1].mean().item() for f in (2, 3)])
    assert scores[1, 1 * 3 + 2].item() == pytest.approx(manual, rel=1e-5)
    with pytest.raises(ValueError, match="frames"):
        pixel_dissimilarity(pixels, (4, 4, 3))
    # equal bins (30 = 5 x 6, 22 = 2 x 11): token (2, y, x) = mean |p2 - p1| over its 6 x 11 tile
    tiled = pixel_dissimilarity(pixels[:3], (3, 5, 2))
    manual = (pixels[2] - pixels[1]).abs()[:, 3 * 6 : 4 * 6, 11:22].mean().item()
    assert tiled[2, 3 * 2 + 1].item() == pytest.approx(manual, rel=1e-5)
    ts = TokenSet(features=torch.randn(3, 12, 4), grid=(3, 4, 3))
    with pytest.raises(MissingSignalError, match="pixels"):
        EVSPixel(retain=0.5)(ts)


def test_engine_refuses_pixels_without_adapter_support():
    from tokcompress.adapters.base import Adapter
    from tokcompress.engine import Session

    class NoPixels(Adapter):
        name = "no_pixels"

    with pytest.raises(MissingSignalError, match="pixels"):
        Session(nn.Module(), NoPixels(), EVSPixel(retain=0.5))
    with pytest.raises(MissingSignalError, match="pixels"):
        Session(nn.Module(), NoPixels(), Sequential([EVSPixel(retain=0.5), DivPrune(retain=0.5)]))
