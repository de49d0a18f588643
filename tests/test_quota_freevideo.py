"""QuoTA and Free Video-LLM: the pure assignments against manual computations written from the spec,
and generate through wrapped tiny models with tiny scorers against a manual language-model reference.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import tokcompress as tc
from tokcompress.policies import FreeVideoLLM, QuoTA
from tokcompress.policies.free_video_llm import place
from tokcompress.scorers import CLIPScorer, QuoTAScorer, frames_from_pixels, question_text
from tokcompress.tokens import TokenSet

from conftest import QUESTIONS, tiny
from reference import assert_rows_match, compressed_greedy, reference_inputs
from test_pixels_signal import expected_frames
from test_scorers import clip, sensitive_vlm

STEPS = 2
FAMILIES = ["llava_onevision", "qwen2_5_vl"]


# ------------------------------------------------------------------------------- manual references


def bilinear(grid: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(h, w, D) -> (rows, cols, D), bilinear with half-pixel centres (align_corners=False), by hand."""
    h, w, _ = grid.shape
    out = []
    for i in range(rows):
        y = max((i + 0.5) * h / rows - 0.5, 0.0)
        y0 = int(math.floor(y))
        y1, ly = min(y0 + 1, h - 1), y - y0
        line = []
        for j in range(cols):
            x = max((j + 0.5) * w / cols - 0.5, 0.0)
            x0 = int(math.floor(x))
            x1, lx = min(x0 + 1, w - 1), x - x0
            line.append(
                (1 - ly) * ((1 - lx) * grid[y0, x0] + lx * grid[y0, x1])
                + ly * ((1 - lx) * grid[y1, x0] + lx * grid[y1, x1])
            )
        out.append(torch.stack(line))
    return torch.stack(out)


def quota_reference(features: torch.Tensor, p: list[float], retain: float):
    """QuoTA Stage D (spec section 3), written out: counts, grids, kept positions and values."""
    t, h, w, _ = features.shape
    n = h * w
    budget = int(math.floor(retain * t * n + 0.5))
    raw = [(100 * x) ** 2 for x in p]
    weights = [x / sum(raw) for x in raw]
    cap = n / budget
    excess = sum(x - cap for x in weights if x > cap)
    below = sum(x for x in weights if x <= cap)
    weights = [cap if x > cap else x + excess * x / below for x in weights]
    counts = [min(n, int(budget * x)) for x in weights]
    keep, values, grids = [], [], []
    for frame, c in enumerate(counts):
        if c <= 0:
            grids.append((0, 0))
            continue
        a = b = int(math.isqrt(c))
        if a * b < c:
            if (a + 1) * b <= c:
                a += 1
            elif a * (b + 1) <= c:
                b += 1
        if a > h:  # port to non-square grids (documented): clamp to the grid, fill the other side
            a, b = h, min(w, c // h)
        if b > w:
            a, b = min(h, c // w), w
        grids.append((a, b))
        values.append(bilinear(features[frame].double(), a, b).reshape(-1, features.shape[-1]))
        for i in range(a):
            for j in range(b):
                keep.append(frame * n + int((i + 0.5) * h / a) * w + int((j + 0.5) * w / b))
    return counts, grids, torch.tensor(keep), torch.cat(values)


def free_video_reference(x, frame_scores, patch_scores, slow, middle, fast_pool, roi):
    """Free Video-LLM (spec section 6) for even h and w: per frame the ROI tokens by flat pair index and
    the fast tokens, as the reference computes them (MaxPool1d over flat tokens, the (h/2, w) view)."""
    t, h, w, d = x.shape
    slow_frames = sorted(torch.sort(frame_scores, descending=True).indices[:slow].tolist())
    middle_frames = np.linspace(0, t, middle + 1).astype(int)[:-1].tolist()
    fast = torch.nn.AdaptiveAvgPool2d(fast_pool)(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(t, -1, d)
    rows, cols = h // 2, w
    out = {}
    for frame in range(t):
        roi_tokens = {}
        if frame in slow_frames or frame in middle_frames:
            pooled = torch.nn.MaxPool1d(2, 2)(x[frame].reshape(h * w, d).T[None])[0].T  # (h*w/2, D)
            m = pooled.shape[0]
            idx = torch.sort(patch_scores[frame].reshape(-1), descending=True).indices[: int(m * roi)]
            cx, cy = int((idx % cols).double().mean()), int((idx // cols).double().mean())
            bh, bw = round(rows * math.sqrt(roi)), round(cols * math.sqrt(roi))
            left, top = cx - bw // 2, cy - bh // 2
            left, top = max(0, min(left, cols - bw)), max(0, min(top, rows - bh))
            for r in range(top, top + bh):
                for c in range(left, left + bw):
                    roi_tokens[2 * (r * cols + c)] = pooled[r * cols + c]  # anchor: the pair's left token
        out[frame] = (roi_tokens, fast[frame])
    return slow_frames, middle_frames, out


# ------------------------------------------------------------------------------ pure assignments


def test_quota_counts_grids_positions_and_values_by_hand():
    features = torch.randn(4, 4, 4, 5, generator=torch.Generator().manual_seed(0))
    tokens = TokenSet(features=features, grid=(4, 4, 4), signals={"frame_scores": torch.tensor([0.1, 0.2, 0.3, 0.4])})
    got = QuoTA(retain=0.25)(tokens)
    # B = 16; w = [1, 4, 9, 16] / 30; c = int(16 w) = [0, 2, 4, 8]; grids 2 -> 2x1, 4 -> 2x2, 8 -> 3x2
    assert got.info["frame_tokens"] == [0, 2, 4, 6]
    assert got.info["frame_grids"] == [(0, 0), (2, 1), (2, 2), (3, 2)]
    assert got.keep[:2].tolist() == [16 + 1 * 4 + 2, 16 + 3 * 4 + 2]  # 2x1 cells centred on (1, 2) and (3, 2)
    counts, grids, keep, values = quota_reference(features, [0.1, 0.2, 0.3, 0.4], 0.25)
    assert counts == [0, 2, 4, 8] and grids == got.info["frame_grids"]
    assert torch.equal(got.keep, keep)
    torch.testing.assert_close(got.values.double(), values, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "grid, scores, retain",
    [
        ((4, 4, 4), [0.9, 0.1, 0.1, 0.1], 0.5),  # frame 0 over the cap: clipped, excess to the others
        ((5, 4, 6), [0.3, 0.01, 0.5, 0.2, 0.25], 0.3),  # non-square grid (Qwen-VL-like)
        ((6, 3, 3), [0.5, 0.4, 0.3, 0.2, 0.1, 0.05], 0.2),
    ],
)
def test_quota_matches_the_written_out_stage_d(grid, scores, retain):
    t, h, w = grid
    features = torch.randn(t, h, w, 3, generator=torch.Generator().manual_seed(1))
    got = QuoTA(retain=retain)(TokenSet(features=features, grid=grid, signals={"frame_scores": torch.tensor(scores)}))
    counts, grids, keep, values = quota_reference(features, scores, retain)
    assert got.info["frame_grids"] == grids and torch.equal(got.keep, keep)
    torch.testing.assert_close(got.values.double(), values, atol=1e-6, rtol=0)
    if grid == (4, 4, 4):
        assert counts == [16, 5, 5, 5] and grids[0] == (4, 4)  # capped at the frame's 16 tokens: kept as is
        torch.testing.assert_close(got.values[:16], features[0].reshape(16, 3))


def test_quota_averages_scores_over_a_temporal_step_and_keeps_all_at_retain_1():
    features = torch.randn(3, 4, 4, 3)
    per_frame = torch.tensor([0.1, 0.3, 0.2, 0.2, 0.6, 0.4])  # 2 frames per step -> [0.2, 0.2, 0.5]
    a = QuoTA(retain=0.3)(
        TokenSet(features=features, grid=(3, 4, 4), signals={"frame_scores": per_frame}, frames_per_step=2)
    )
    b = QuoTA(retain=0.3)(
        TokenSet(features=features, grid=(3, 4, 4), signals={"frame_scores": torch.tensor([0.2, 0.2, 0.5])})
    )
    assert torch.equal(a.keep, b.keep) and torch.equal(a.values, b.values)
    full = QuoTA(retain=1.0)(TokenSet(features=features, grid=(3, 4, 4), signals={"frame_scores": per_frame}))
    assert torch.equal(full.keep, torch.arange(48)) and full.values is None


def test_free_video_llm_matches_the_written_out_pathways():
    gen = torch.Generator().manual_seed(2)
    t, h, w, d = 6, 4, 8, 5
    x = torch.randn(t, h, w, d, generator=gen)
    frame_scores = torch.rand(t, generator=gen)
    patch_scores = torch.rand(t, h, w // 2, generator=gen)
    tokens = TokenSet(features=x, grid=(t, h, w), signals={"frame_scores": frame_scores, "patch_scores": patch_scores})
    got = FreeVideoLLM(slow_frames=2, middle_frames=2, fast_pool=(2, 2), roi=0.5)(tokens)
    slow, middle, frames = free_video_reference(x, frame_scores, patch_scores, 2, 2, (2, 2), 0.5)
    assert got.info["slow"] == slow and got.info["middle"] == middle == [0, 3]
    n = h * w
    for frame, (roi_tokens, fast) in frames.items():
        sel = (got.keep >= frame * n) & (got.keep < (frame + 1) * n)
        positions = (got.keep[sel] - frame * n).tolist()
        values = dict(zip(positions, got.values[sel]))
        assert len(roi_tokens) == (6 if frame in slow + middle else 0)  # a 1 x 6 box of the 2 x 8 view
        for anchor, value in roi_tokens.items():
            assert torch.equal(values.pop(anchor), value)
        rest = torch.stack(list(values.values()))
        assert rest.shape == fast.shape  # every frame gets its 2x2 pooled tokens, at bin-centre positions
        torch.testing.assert_close(rest, fast, atol=1e-6, rtol=0)
        assert sorted(values) == [1, 5, 17, 21]


def test_free_video_llm_resizes_patch_scores_of_another_grid_and_keeps_all_at_retain_1():
    x = torch.randn(4, 4, 8, 3)
    fine = torch.rand(4, 8, 8)
    coarse = torch.nn.functional.interpolate(fine[:, None], size=(4, 4), mode="bilinear", align_corners=False)[:, 0]
    policy = FreeVideoLLM(slow_frames=1, middle_frames=1, fast_pool=(1, 1))
    scores = torch.rand(4)
    a = policy(TokenSet(features=x, grid=(4, 4, 8), signals={"frame_scores": scores, "patch_scores": fine}))
    b = policy(TokenSet(features=x, grid=(4, 4, 8), signals={"frame_scores": scores, "patch_scores": coarse}))
    assert torch.equal(a.keep, b.keep) and torch.equal(a.values, b.values)
    full = FreeVideoLLM(retain=1.0)(
        TokenSet(features=x, grid=(4, 4, 8), signals={"frame_scores": scores, "patch_scores": fine})
    )
    assert torch.equal(full.keep, torch.arange(128)) and full.values is None


def test_place_moves_colliding_tokens_to_the_nearest_free_cell():
    assert place(torch.tensor([2, 2, 3]), {2}, 6) == [3, 1, 4]
    assert place(torch.tensor([0, 0]), {1}, 2) == [0, None]  # the frame is full


# ------------------------------------------------------------------------------------ refusals


def test_scorer_policies_without_a_scorer_name_it():
    model, processor = tiny("llava_onevision")
    with pytest.raises(tc.MissingSignalError, match=r"scorer=.*QuoTAScorer"):
        tc.wrap(model, "quota", retain=0.5)
    with pytest.raises(tc.MissingSignalError, match=r"CLIPScorer"):
        tc.wrap(model, "free_video_llm")
    assert not tc.is_wrapped(model)
    with pytest.raises(tc.MissingSignalError, match=r"signal 'frame_scores' from a scorer"):
        QuoTA(retain=0.5)(TokenSet(features=torch.randn(2, 4, 3), grid=(2, 2, 2)))


def test_scorer_refusals():
    model, processor = tiny("llava_onevision")
    clip_model, clip_processor = clip()
    with pytest.raises(ValueError, match=r"processor=<the processor of the wrapped model>"):
        tc.wrap(model, "free_video_llm", scorer=CLIPScorer(clip_model, clip_processor))
    with pytest.raises(TypeError, match="scorer must be a tokcompress.scorers.Scorer"):
        tc.wrap(model, "quota", retain=0.5, scorer="qwen", processor=processor)
    with pytest.raises(ValueError, match=r"retain must be None \(the reference's sizes\) or 1.0"):
        tc.wrap(model, "free_video_llm", retain=0.5)
    assert not tc.is_wrapped(model)


# ----------------------------------------------------------------------------- through generate


def expected_keep(family, policy, scorer, row):
    """What the policy keeps of row ``row`` when the scorer is run by hand on that row's frames and question."""
    model, processor = tiny(family)
    inputs, captured = reference_inputs(family)
    frames = frames_from_pixels(expected_frames(family, model, inputs, row), processor)
    signals = scorer(frames, QUESTIONS[row])
    with tc.compressed(model, "none"), torch.no_grad():
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
        video = tc.last_record(model)[row].videos[0]
    t, h, w = video.grid
    features = captured.embeds[row, video.positions].reshape(t, h * w, -1)
    tokens = TokenSet(features=features, grid=video.grid, signals=signals, frames_per_step=video.frames_per_step)
    return policy(tokens)


@pytest.mark.parametrize("family", FAMILIES)
def test_quota_generate_equals_the_manual_reference(family):
    model, processor = tiny(family)
    inputs, captured = reference_inputs(family)  # batch 2: two videos, two different questions
    scorer_model, scorer_processor = sensitive_vlm()
    scorer = QuoTAScorer(model=scorer_model, processor=scorer_processor)
    got = compressed_greedy(model, inputs, STEPS, "quota", retain=0.4, scorer=scorer, processor=processor)
    records = got[2]
    for row in range(2):
        want = expected_keep(family, QuoTA(retain=0.4), scorer, row)
        assert torch.equal(records[row].videos[0].keep, want.keep)
        assert records[row].scorer_seconds > 0 and records[row].videos[0].scorer_seconds == records[row].scorer_seconds
    assert_rows_match(model, captured, inputs, got, STEPS)


@pytest.mark.parametrize("family", FAMILIES)
def test_free_video_llm_generate_equals_the_manual_reference(family):
    model, processor = tiny(family)
    inputs, captured = reference_inputs(family)
    scorer = CLIPScorer(*clip())
    params = dict(slow_frames=1, middle_frames=1, fast_pool=(1, 2), roi=0.5)
    got = compressed_greedy(model, inputs, STEPS, "free_video_llm", scorer=scorer, processor=processor, **params)
    for row in range(2):
        want = expected_keep(family, FreeVideoLLM(**params), scorer, row)
        assert torch.equal(got[2][row].videos[0].keep, want.keep)
        assert got[2][row].video_tokens_after < got[2][row].video_tokens_before
    assert_rows_match(model, captured, inputs, got, STEPS)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_wrapped_model_scores_itself_with_hooks_paused(family):
    """QuoTA with the wrapped model as scorer and decoupler: no recursion, one record, Qwen-VL's
    M-RoPE deltas of the outer call survive the inner calls (decode steps match the reference)."""
    model, processor = tiny(family)
    inputs, captured = reference_inputs(family)
    scorer = QuoTAScorer(model=model, processor=processor, decoupler=model, max_new_tokens=4)
    got = compressed_greedy(model, inputs, STEPS, "quota", retain=0.4, scorer=scorer)  # processor: the scorer's
    assert len(got[2]) == 2 and all(r.videos[0].grid[0] > 1 for r in got[2])
    assert_rows_match(model, captured, inputs, got, STEPS)
    assert not tc.is_wrapped(model)
    for row in range(2):  # the same scores as the unwrapped model gives: the hooks did nothing inside
        want = expected_keep(family, QuoTA(retain=0.4), scorer, row)
        assert torch.equal(got[2][row].videos[0].keep, want.keep)


def question_pair_inputs(family: str, questions: list[str]):
    from tokcompress.tiny import make_inputs

    from conftest import _videos

    _, processor = tiny(family)
    video = _videos()[0]
    return dict(make_inputs(processor, [video, video], questions))


@pytest.mark.parametrize("policy", ["quota", "free_video_llm"])
@pytest.mark.parametrize("family", FAMILIES)
def test_query_dependence(family, policy):
    """One video, one batch: two different questions keep different tokens, the same question the same."""
    model, processor = tiny(family)
    if policy == "quota":
        params = dict(retain=0.4, scorer=QuoTAScorer(model=sensitive_vlm()[0], processor=sensitive_vlm()[1]))
    else:
        params = dict(scorer=CLIPScorer(*clip()), slow_frames=2, middle_frames=1, fast_pool=(1, 2), roi=0.3)
    kept = {}
    for name, questions in {"different": list(QUESTIONS), "same": [QUESTIONS[0]] * 2}.items():
        with tc.compressed(model, policy, processor=processor, **params), torch.no_grad():
            model.generate(**question_pair_inputs(family, questions), max_new_tokens=1, do_sample=False)
            kept[name] = [r.videos[0].keep for r in tc.last_record(model)]
    assert not torch.equal(kept["different"][0], kept["different"][1])
    assert torch.equal(kept["same"][0], kept["same"][1])
    assert torch.equal(kept["same"][0], kept["different"][0])


@pytest.mark.parametrize("family", FAMILIES)
def test_keeping_everything_is_bit_identical(family):
    model, processor = tiny(family)
    inputs, _ = reference_inputs(family)
    with torch.no_grad():
        base = model.generate(
            **inputs, max_new_tokens=STEPS, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    cases = [
        (
            "quota",
            dict(retain=1.0, scorer=QuoTAScorer(model=model, processor=processor, decoupler=model, max_new_tokens=2)),
        ),
        ("free_video_llm", dict(retain=1.0, scorer=CLIPScorer(*clip()), processor=processor)),
    ]
    for name, params in cases:
        with tc.compressed(model, name, **params), torch.no_grad():
            out = model.generate(
                **inputs, max_new_tokens=STEPS, do_sample=False, output_logits=True, return_dict_in_generate=True
            )
        assert torch.equal(out.sequences, base.sequences), name
        assert all(torch.equal(a, b) for a, b in zip(out.logits, base.logits)), name


def test_question_text_of_each_row_reaches_the_scorer():
    family = "qwen2_5_vl"
    model, processor = tiny(family)
    inputs, _ = reference_inputs(family)
    seen = []

    class Recording(CLIPScorer):
        def __call__(self, frames, question):
            seen.append((frames.shape, question))
            return super().__call__(frames, question)

    with tc.compressed(model, "free_video_llm", scorer=Recording(*clip()), processor=processor), torch.no_grad():
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
    assert [q for _, q in seen] == list(QUESTIONS)
    assert all(shape[1] == 3 for shape, _ in seen)
    assert question_text(torch.tensor([], dtype=torch.long), processor) == ""


def test_every_family_hands_the_scorer_its_rows_frames_and_question(family):
    """The scorer gets each row's question (decoded after the video) and that row's frames as uint8."""
    model, processor = tiny(family)
    inputs, _ = reference_inputs(family)
    seen = []

    class Recording(CLIPScorer):
        def __call__(self, frames, question):
            seen.append((frames, question))
            return super().__call__(frames, question)

    params = dict(slow_frames=1, middle_frames=1, fast_pool=(1, 1), roi=0.5)
    with tc.compressed(model, "free_video_llm", scorer=Recording(*clip()), processor=processor, **params):
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
        records = tc.last_record(model)
    assert len(seen) == 2 and all(r.video_tokens_after < r.video_tokens_before for r in records)
    for row, (frames, question) in enumerate(seen):
        assert question.startswith(QUESTIONS[row])  # Video-LLaVA's template adds "ASSISTANT:" (no end-of-turn token)
        want = frames_from_pixels(expected_frames(family, model, inputs, row), processor)
        assert frames.dtype == torch.uint8 and torch.equal(frames.cpu(), want)
