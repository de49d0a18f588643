"""SparseVLM: the pure cores against hand computations, and the wrapped model against a layer-by-layer
reference (tests/kv_reference.py) whose rater choice, ranking, DPC clustering and recycling are
written below, independently of tokcompress."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import tokcompress as tc
from tokcompress.policies.fastv import FastV
from tokcompress.policies.sparsevlm import (
    choose_raters,
    schedule_layers,
    sparsevlm_prune,
    stage_count,
    stage_fractions,
)
from tokcompress.adapters import adapter_for
from tokcompress.tiny import make_inputs
from tokcompress.tokens import PromptTokens

from conftest import QUESTIONS, _videos
from kv_reference import Stage, _grid_positions, run_row
from reference import capture_lm_inputs, row_inputs
from test_kv import IDENTITY_STEPS, _generate, _steps_until_eos, _unwrapped, inputs_for, model4


TABLE = {64: (66, 30, 17), 96: (238, 48, 26), 128: (303, 110, 36), 192: (300, 200, 110)}  # score.py, v1.5
STEPS = 8

# -- pure functions ------------------------------------------------------------------------------------------------


def _manual_raters(visual: torch.Tensor, text: torch.Tensor) -> list[int]:
    t = text.shape[0]
    relevance = [0.0] * t
    for v in visual.double():
        dots = [float(v @ text[j].double()) for j in range(t)]
        top = max(dots)
        exps = [math.exp(d - top) for d in dots]
        for j in range(t):
            relevance[j] += exps[j] / sum(exps) / visual.shape[0]
    mean = sum(relevance) / t
    return [j for j in range(t) if relevance[j] > mean]


def test_raters_are_the_text_tokens_above_mean_relevance():
    g = torch.Generator().manual_seed(0)
    visual, text = torch.randn(30, 8, generator=g), torch.randn(12, 8, generator=g)
    got = choose_raters(visual, text)
    want = _manual_raters(visual, text)
    assert got.tolist() == want and 0 < len(want) < 12
    assert choose_raters(visual, text[:1]).tolist() == [0]  # one text token: nothing is above the mean, all rate
    with pytest.raises(ValueError, match="share D"):
        choose_raters(visual, torch.randn(3, 5))


@pytest.mark.parametrize("tokens", sorted(TABLE))
def test_reference_budgets_are_exact(tokens):
    fractions = stage_fractions(tokens / 576)
    assert tuple(stage_count(f, 576) for f in fractions) == TABLE[tokens]
    # scaled to the tokens that enter the LM: round half up of table * N / 576
    for n in (128, 6272, 100):
        want = tuple(max(1, (2 * k * n + 576) // (2 * 576)) for k in TABLE[tokens])
        assert tuple(stage_count(f, n) for f in fractions) == want


def test_budgets_between_and_beyond_the_table():
    assert [stage_count(f, 576) for f in stage_fractions(160 / 576)] == [302, 155, 73]  # midway 128..192, half up
    assert [stage_count(f, 576) for f in stage_fractions(32 / 576)] == [33, 15, 9]  # half of the 64 row
    assert [stage_count(f, 576) for f in stage_fractions(1.0)] == [576, 576, 576]
    assert [stage_count(f, 576) for f in stage_fractions(384 / 576)] == [438, 388, 343]  # midway 192..576
    assert stage_count(stage_fractions(0.001)[2], 100) == 1  # never below one token


def test_schedule_scales_the_reference_layers():
    assert schedule_layers(32) == (3, 7, 16)  # pruning after layers 2, 6, 15
    assert schedule_layers(28) == (3, 6, 14)
    assert schedule_layers(4) == (1, 2, 3)
    assert schedule_layers(80) == (8, 18, 40)
    with pytest.raises(ValueError, match="no room for 3 pruning stages"):
        schedule_layers(3)


def _manual_dpc_recycle(x: torch.Tensor, c: int) -> tuple[list[int], list[int]]:
    """Density peaks with kNN density (k = c), by loops; returns (centres by score, label of each token).

    Distances, densities and scores are rounded to float32 (the precision tokcompress documents), so
    near-ties the reference breaks with random noise tie here too and go to the lower index.
    """
    x = x.double()
    m = x.shape[0]
    dist = (torch.cdist(x, x) / math.sqrt(x.shape[1])).float()
    dist.fill_diagonal_(0.0)
    f32 = lambda v: float(torch.as_tensor(v, dtype=torch.float32))  # noqa: E731
    rho = [f32(torch.exp(-(dist[i].sort().values[:c] ** 2).mean())) for i in range(m)]
    top = float(dist.max())
    delta = [min([float(dist[i, j]) for j in range(m) if rho[j] > rho[i]], default=top) for i in range(m)]
    score = [f32(delta[i] * rho[i]) for i in range(m)]
    centres = sorted(range(m), key=lambda i: (-score[i], i))[:c]
    label = [min(range(c), key=lambda j: (float(dist[i, centres[j]]), j)) for i in range(m)]
    for j, centre in enumerate(centres):
        label[centre] = j
    return centres, label


def _manual_prune(hidden, scores, count):
    n = scores.numel()
    order = sorted(range(n), key=lambda i: (-float(scores[i]), i))
    survivors = sorted(order[:count])
    pruned = [i for i in range(n) if i not in survivors]
    m = int(len(pruned) * 0.3) + 1
    recycled = sorted(pruned, key=lambda i: (-float(scores[i]), i))[:m]
    c = int(m / 10) + 1
    centres, label = _manual_dpc_recycle(hidden[recycled], c)
    values = hidden.clone()
    carriers = [recycled[j] for j in centres]
    for j, carrier in enumerate(carriers):
        members = [recycled[i] for i in range(m) if label[i] == j]
        values[carrier] = hidden[members].mean(0)
    keep = sorted(survivors + carriers)
    slot = {t: s for s, t in enumerate(keep)}
    assign = [-1] * n
    for i in survivors:
        assign[i] = slot[i]
    for i, t in enumerate(recycled):
        assign[t] = slot[carriers[label[i]]]
    return keep, values[keep], assign, c


@pytest.mark.parametrize("n, count", [(40, 10), (97, 5), (12, 11)])
def test_prune_and_recycle_match_manual(n, count):
    g = torch.Generator().manual_seed(n)
    hidden = torch.randn(n, 16, generator=g)
    hidden[1] = hidden[2]  # a duplicate: distance 0 off the diagonal
    scores = torch.rand(n, generator=g)
    keep, values, assign, c = _manual_prune(hidden, scores, count)
    got = sparsevlm_prune(hidden, scores, count)
    assert got.keep.tolist() == keep and got.assign.tolist() == assign
    assert got.centres.numel() == c and got.keep.numel() == count + c
    torch.testing.assert_close(got.values, values, atol=1e-6, rtol=0)


def test_prune_keeps_everything_when_the_budget_covers_it_and_recycling_can_be_off():
    hidden, scores = torch.randn(8, 4), torch.rand(8)
    full = sparsevlm_prune(hidden, scores, 8)
    assert full.keep.tolist() == list(range(8)) and full.values is None
    plain = sparsevlm_prune(hidden, scores, 3, recycle=0.0)
    assert plain.keep.tolist() == sorted(torch.topk(scores, 3).indices.tolist()) and plain.values is None
    assert int((plain.assign >= 0).sum()) == 3


# -- the wrapped model against a layer-by-layer reference -----------------------------------------------------------


def _count(table_tokens: int, stage: int, entered: int) -> int:
    return max(1, (2 * TABLE[table_tokens][stage] * entered + 576) // (2 * 576))


def _row_raters(model, captured, input_ids, records, row) -> tuple[torch.Tensor, int]:
    """Test-side rater choice on the row's LM input: returns the raters' offsets from the sequence end and N0."""
    hidden0, _, _ = row_inputs(model, captured, input_ids, records, row)
    rec = records[row]
    placeholders = torch.isin(input_ids[row], torch.tensor(adapter_for(model).placeholder_ids(model)))
    present = captured.mask[row] & ~placeholders
    present[rec.kept] = True
    seq = present.nonzero().squeeze(1)
    visual = torch.isin(seq, _grid_positions(rec))
    last_visual = int(visual.nonzero().max())
    v = hidden0[0, visual].double()
    t = hidden0[0, last_visual + 1 :].double()
    relevance = (v @ t.T).softmax(dim=1).mean(0)
    raters = (relevance > relevance.mean()).nonzero().squeeze(1) + last_visual + 1
    return seq.numel() - raters, int(visual.sum())


def ref_sparsevlm_stage(from_end: torch.Tensor, count: int):
    def choose(attn, hidden, vis, positions):
        rows = hidden.shape[0] - from_end
        a = attn[:, rows][:, :, vis].mean(0).mean(0)
        n = vis.numel()
        if count >= n:
            return vis, None
        survivors = torch.topk(a, count).indices
        pruned = torch.tensor([i for i in range(n) if i not in set(survivors.tolist())])
        m = int(pruned.numel() * 0.3) + 1
        recycled = pruned[torch.topk(a[pruned], m).indices]
        c = int(m / 10) + 1
        centres, label = _manual_dpc_recycle(hidden[vis[recycled]], c)
        new = hidden.clone()
        label = torch.tensor(label)
        for j, centre in enumerate(centres):
            new[vis[recycled[centre]]] = hidden[vis[recycled[label == j]]].mean(0)
        keep = torch.cat([vis[survivors], vis[recycled[centres]]]).sort().values
        return keep, new

    return choose


def _check_sparsevlm(family: str, attn: str, batch: int, params: dict, counts) -> None:
    """``counts(stage, entered)``: the test-side budget; ``params`` go to wrap."""
    model, _ = model4(family, attn)
    inputs = inputs_for(family, attn, batch)
    captured = capture_lm_inputs(model, inputs)
    with tc.compressed(model, "sparsevlm", **params):
        out, tokens = _generate(model, inputs, STEPS)
        records = tc.last_record(model)
        layers = [p.resolve_layer(4) for p in tc.policy_of(model).stages()]
    eos = model.generation_config.eos_token_id
    for row in range(batch):
        from_end, entered = _row_raters(model, captured, inputs["input_ids"], records, row)
        stages = [Stage(k, ref_sparsevlm_stage(from_end, counts(i, entered))) for i, k in enumerate(layers)]
        ref = run_row(model, captured, inputs["input_ids"], records, row, STEPS, stages)
        entries = {v["layer"]: v for v in records[row].stages.values()}
        assert sorted(entries) == sorted(ref.kept)
        for layer, kept in ref.kept.items():
            assert torch.equal(entries[layer]["kept"], kept), f"row {row}: layer-{layer} kept set differs"
        torch.testing.assert_close(out.logits[0][row], ref.logits[0], atol=1e-5, rtol=0)
        n = _steps_until_eos(ref.tokens, eos)
        assert torch.equal(tokens[row, :n], ref.tokens[:n]), f"row {row}: tokens differ from the reference"
        torch.testing.assert_close(torch.stack([s[row] for s in out.logits[:n]]), torch.stack(ref.logits[:n]), atol=2e-5, rtol=0)
        assert any(e["info"]["merged"] > 0 for e in entries.values()), "the test should exercise recycling"


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_5_vl"])
@pytest.mark.parametrize("tokens", [64, 192])
def test_matches_layer_by_layer_reference_batch2(family, attn, tokens):
    """Batch 2, left-padded, a different question per row; the reference runs each row alone."""
    _check_sparsevlm(family, attn, 2, {"retain": tokens / 576}, lambda i, n: _count(tokens, i, n))


def test_matches_reference_batch1_and_explicit_schedule():
    _check_sparsevlm("llava_onevision", "sdpa", 1, {"retain": 96 / 576}, lambda i, n: _count(96, i, n))
    keep = (0.3, 0.1)
    _check_sparsevlm(
        "llava_onevision", "sdpa", 2, {"layers": (1, 3), "keep": keep}, lambda i, n: max(1, math.floor(keep[i] * n + 0.5))
    )


@pytest.mark.parametrize("family", ["qwen3_vl", "llava_next_video", "video_llava", "qwen2_vl", "internvl", "smolvlm"])
def test_other_families_match_the_reference(family):
    keep = (0.25, 0.1)  # Qwen3-VL's two deepstack layers leave room for two stages in a 4-layer model
    _check_sparsevlm(family, "sdpa", 2, {"layers": (2, 3), "keep": keep}, lambda i, n: max(1, math.floor(keep[i] * n + 0.5)))


@pytest.mark.parametrize("attn, batch", [("sdpa", 1), ("sdpa", 2), ("eager", 2)])
@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_5_vl", "qwen3_vl"])
def test_retain_one_is_bit_identical(family, attn, batch):
    model, _ = model4(family, attn)
    inputs = inputs_for(family, attn, batch)
    want = _unwrapped(family, attn, batch)
    params = {"retain": 1.0} if family != "qwen3_vl" else {"layers": (2, 3), "keep": (1.0, 1.0)}
    with tc.compressed(model, "sparsevlm", **params):
        with torch.no_grad():
            logits = model(**inputs).logits
        out, tokens = _generate(model, inputs, IDENTITY_STEPS)
    for got, ref in zip((logits, torch.stack(out.logits), tokens), want):
        assert torch.equal(got, ref)


# -- query dependence ------------------------------------------------------------------------------------------------


def _kept_grid(family: str, questions: list[str]) -> list[list[torch.Tensor]]:
    """Per row, per stage: the flat grid indices (within the video) of the visual tokens kept."""
    model, processor = model4(family, "sdpa")
    video = _videos()[0]
    inputs = dict(make_inputs(processor, [video] * len(questions), questions))
    with tc.compressed(model, "sparsevlm", retain=64 / 576), torch.no_grad():
        model(**inputs)
        records = tc.last_record(model)
    out = []
    for rec in records:
        grid = rec.videos[0].positions
        out.append([torch.searchsorted(grid, e["kept"]) for e in rec.stages.values()])
    return out


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_5_vl"])
def test_the_question_decides_what_is_kept(family):
    other = "Which colour is the large square in the top left corner at the start?"
    different = _kept_grid(family, [QUESTIONS[0], other])
    assert not torch.equal(different[0][0], different[1][0]), "two questions kept the same tokens"
    same = _kept_grid(family, [QUESTIONS[0], QUESTIONS[0]])
    for a, b in zip(same[0], same[1]):
        assert torch.equal(a, b)
    alone = _kept_grid(family, [QUESTIONS[0]])
    for a, b in zip(alone[0], different[0]):
        assert torch.equal(a, b)  # the same question keeps the same set, whatever the other row asks


# -- the "chosen" query interface -------------------------------------------------------------------------------------


@dataclass
class LastChosen(FastV):
    """Test-only: FastV whose single query row is chosen through ``queries = "chosen"`` (the last candidate)."""

    queries: ClassVar[str] = "chosen"
    seen: ClassVar[list] = []

    def choose_queries(self, prompt: PromptTokens) -> torch.Tensor:
        LastChosen.seen.append((prompt.visual.shape[0], prompt.text_positions.clone()))
        return torch.tensor([prompt.text.shape[0] - 1])


def test_chosen_last_row_is_fastv():
    model, _ = model4("llava_onevision", "sdpa")
    inputs = inputs_for("llava_onevision", "sdpa", 2)
    runs = []
    for policy in (FastV(retain=0.3, layer=2), LastChosen(retain=0.3, layer=2)):
        with tc.compressed(model, policy):
            out, tokens = _generate(model, inputs, 4)
            runs.append((torch.stack(out.logits), tokens, [r.stages[policy.label]["kept"] for r in tc.last_record(model)]))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][2], runs[1][2]))
    (n0, pos0), (n1, pos1) = LastChosen.seen[:2]
    last = inputs["input_ids"].shape[1] - 1
    assert n0 == n1 == 128 and int(pos0[-1]) == int(pos1[-1]) == last  # candidates end at the last prompt token
    assert pos1.numel() < pos0.numel()  # row 1 asks the shorter question


# -- parameters ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params, match",
    [
        ({"retain": 0.0}, "retain must be"),
        ({"retain": 1.5}, "retain must be"),
        ({"layers": (3, 2, 4)}, "layers must be"),
        ({"layers": (0, 1, 2)}, "layers must be"),
        ({"layers": 2}, "layers must be"),
        ({"layers": (1, 2)}, "keep has 3 fractions for 2 stages"),
        ({"keep": (0.5, 1.5, 0.1)}, "keep must be"),
        ({"keep": ()}, "keep must be"),
        ({"recycle": -0.1}, "recycle must be"),
        ({"recycle": True}, "recycle must be"),
        ({"cluster_size": 0}, "cluster_size must be"),
    ],
)
def test_bad_parameters_are_named(params, match):
    with pytest.raises(ValueError, match=match):
        tc.build_policy("sparsevlm", **params)


def test_layers_out_of_range_are_refused():
    model, _ = model4("llava_onevision", "sdpa")
    with pytest.raises(ValueError, match=r"outside \[1, 3\]"):
        tc.wrap(model, "sparsevlm", layers=(2, 4), keep=(0.5, 0.2))
    assert not tc.is_wrapped(model)
    with pytest.raises(TypeError, match="acts inside the language model"):
        tc.build_policy("sparsevlm").compress(None)


def test_after_an_input_stage_budgets_follow_the_tokens_that_enter_the_llm():
    model, _ = model4("qwen2_5_vl", "sdpa")
    inputs = inputs_for("qwen2_5_vl", "sdpa", 2)
    with tc.compressed(model, ["uniform", tc.build_policy("sparsevlm", retain=128 / 576)]), torch.no_grad():
        cached = model(**inputs).logits[:, -1]
        uncached = model(**inputs, use_cache=False).logits[:, -1]
        records = tc.last_record(model)
    torch.testing.assert_close(cached, uncached, atol=1e-5, rtol=0)
    for rec in records:
        entered = rec.video_tokens_after
        stages = list(rec.stages.values())
        assert stages[0]["visual_before"] == entered
        for i, stage in enumerate(stages):
            count = _count(128, i, entered)
            assert stage["info"]["count"] == count
            assert stage["visual_after"] == min(stage["visual_before"], count + stage["info"]["merged"])
            assert i == 0 or stage["visual_before"] == stages[i - 1]["visual_after"]
