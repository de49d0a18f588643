"""FrameFusion inside the model: merges at layer 0 and after attention sub-blocks, then one prune.

The reference here runs the decoder layers of the unwrapped model by hand, split at the attention
sub-block (``input_layernorm -> self_attn -> + residual``, then ``post_attention_layernorm -> mlp
-> + residual``) in eager attention, and applies merge and prune with test-side code (a loop over
slot chains written from the paper's description, and the budget formula), at the reference's
sites: layer 0 before attention, then after the attention of each layer while merging runs, then
the prune after the attention of the next layer by that layer's last-query attention. The golden
cases (tests/test_golden.py) pin the pure steps to the reference code.
"""

from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch
from conftest import QUESTIONS, _videos
from kv_reference import _additive, _grid_positions, eager
from reference import capture_lm_inputs, row_inputs
from torch import Tensor
from transformers import DynamicCache

import tokcompress as tc
from tokcompress.errors import UnsupportedModelError, UnsupportedUsageError
from tokcompress.policies.framefusion import (
    FrameFusion,
    FrameFusionBudgetError,
    pruning_ratio_needed,
)
from tokcompress.tiny import build, make_inputs


DEPTH = 4
STEPS = 6


@functools.cache
def model4(family: str = "llava_onevision", attn: str = "sdpa"):
    return build(family, attn_implementation=attn, num_hidden_layers=DEPTH)


def inputs_for(family: str, batch: int, questions=QUESTIONS) -> dict:
    _, processor = model4(family)
    videos = list(_videos())[:batch]
    return dict(make_inputs(processor, videos, list(questions[:batch])))


# -- test-side FrameFusion (from the description, loops) -------------------------------------------------------


def ref_budget(sparsity: list[float], cost: float, layers: int = 28) -> float:
    rel, used = 1.0, 0.0
    for f in sparsity:
        rel = rel * (1 - f)
        used = used + rel
    left = layers * cost - used
    assert left >= 0
    share = left / ((layers - len(sparsity)) * rel)
    return 0.0 if share > 1 else 1 - share


def ref_merge(h: Tensor, keys: list[int], bound: float, ub: float) -> tuple[list[bool], Tensor, float, str]:
    """One merge call on ``h`` (N, D): returns keep flags, new h, the candidate fraction and the kind."""
    n = h.shape[0]
    chains: dict[int, list[int]] = {}
    for t, key in enumerate(keys):
        chains.setdefault(key, []).append(t)
    sim: dict[int, float] = {}
    for members in chains.values():
        for a, b in itertools.pairwise(members):
            x, y = h[a].double(), h[b].double()
            sim[b] = float(x @ y / (x.norm() * y.norm()))
    above = {t for t, s in sim.items() if s >= bound}
    frac = len(above) / n
    if frac < ub:
        cand, kind = above, "last" if frac < PARAMS_RLB[0] else "merge"
    else:
        ranked = sorted(sim, key=lambda t: -sim[t])
        cand, kind = set(ranked[: int(ub * n)]), "topk"
    out = h.clone()
    keep = [t not in cand for t in range(n)]
    for members in chains.values():
        anchor, group = None, []
        for t in members + [None]:
            if t is not None and t in cand:
                group.append(t)
                continue
            if anchor is not None and group:
                out[anchor] = torch.stack([h[anchor]] + [h[g] for g in group]).double().mean(0).to(h.dtype)
            anchor, group = t, []
    return keep, out, frac, kind


PARAMS_RLB = [0.1]  # ratio_lower_bound the test-side merge uses (set per test)


def run_reference(model, captured, input_ids, records, row, params: dict, steps: int = STEPS):
    """Prefill by hand with FrameFusion's sites, then greedy decode. Returns logits, tokens, kept per call."""
    from tokcompress.adapters import adapter_for

    cost, bound = params.get("cost", 0.3), params.get("similarity_lower_bound", 0.6)
    PARAMS_RLB[0] = params.get("ratio_lower_bound", 0.1)
    adapter = adapter_for(model)
    lm = adapter.language_model(model)
    layers = adapter.decoder_layers(model)
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    hidden, pos, _ = row_inputs(model, captured, input_ids, records, row)
    rec = records[row]
    present = captured.mask[row].clone()
    placeholder = torch.isin(input_ids[row], torch.tensor(adapter.placeholder_ids(model)))
    present &= ~placeholder
    present[rec.kept] = True
    seq = present.nonzero().squeeze(1)
    key_of: dict[int, int] = {}
    offset = 0
    for video in rec.videos:
        per_frame = video.grid[1] * video.grid[2]
        for flat, p in zip(video.keep.tolist(), video.positions[video.keep].tolist()):
            key_of[p] = offset + flat % per_frame
        offset += per_frame
    grid = _grid_positions(rec)
    sparsity: list[float] = []
    merging_done = pruning_done = False
    kept_calls: list[Tensor] = []
    cache = DynamicCache(config=lm.config)

    def visual_idx() -> Tensor:
        return torch.isin(seq, grid).nonzero().squeeze(1)

    def drop(keep_seq: Tensor) -> None:
        nonlocal hidden, cos, sin, seq
        hidden, cos, sin, seq = hidden[:, keep_seq], cos[:, keep_seq], sin[:, keep_seq], seq[keep_seq]

    def merge_call(h: Tensor) -> tuple[Tensor, Tensor]:
        nonlocal merging_done, pruning_done
        vis = visual_idx()
        keys = [key_of[int(p)] for p in seq[vis]]
        ub = ref_budget(sparsity, cost)
        keep, new, frac, kind = ref_merge(h[0, vis], keys, bound, ub)
        h = h.clone()
        h[0, vis] = new
        if kind == "topk":
            merging_done = pruning_done = True
        else:
            sparsity.append(frac)
            merging_done = kind == "last"
        keep_seq = torch.ones(seq.numel(), dtype=torch.bool)
        keep_seq[vis[~torch.tensor(keep)]] = False
        return h, keep_seq.nonzero().squeeze(1)

    with torch.no_grad(), eager(lm):
        cos, sin = lm.rotary_emb(hidden, pos)
        for i, layer in enumerate(layers):
            if i == 0 and not merging_done:
                hidden, keep_seq = merge_call(hidden)
                drop(keep_seq)
                kept_calls.append(seq[torch.isin(seq, grid)])
            n = hidden.shape[1]
            mask = _additive(torch.ones(n, n, dtype=torch.bool).tril(), hidden.dtype)
            residual = hidden
            attn_out, weights = layer.self_attn(
                hidden_states=layer.input_layernorm(hidden),
                attention_mask=mask,
                position_embeddings=(cos, sin),
                cache=cache,
                use_cache=True,
            )
            hidden = residual + attn_out
            if merging_done and not pruning_done:
                vis = visual_idx()
                row_attn = weights[0, :, -1, vis].float().mean(0)
                count = round(vis.numel() * (1 - ref_budget(sparsity, cost)))
                top = torch.sort(row_attn, descending=True, stable=True).indices[:count]
                keep_seq = torch.ones(seq.numel(), dtype=torch.bool)
                keep_seq[vis] = False
                keep_seq[vis[top]] = True
                drop(keep_seq.nonzero().squeeze(1))
                kept_calls.append(seq[torch.isin(seq, grid)])
                pruning_done = True
            elif not merging_done:
                hidden, keep_seq = merge_call(hidden)
                drop(keep_seq)
                kept_calls.append(seq[torch.isin(seq, grid)])
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        logits = head(lm.norm(hidden)[:, -1]).float()[0]
        out_logits, tokens = [logits], [int(logits.argmax())]
        last = pos[..., -1:]
        for _ in range(steps - 1):
            last = last + 1
            h = embed(torch.tensor([[tokens[-1]]]))
            cos1, sin1 = lm.rotary_emb(h, last)
            for layer in layers:
                h = layer(h, attention_mask=None, position_embeddings=(cos1, sin1), cache=cache, use_cache=True)
            logits = head(lm.norm(h)[:, -1]).float()[0]
            out_logits.append(logits)
            tokens.append(int(logits.argmax()))
    return out_logits, torch.tensor(tokens), kept_calls


def _generate(model, inputs, steps: int = STEPS):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True)
    return out, out.sequences[:, inputs["input_ids"].shape[1] :]


def _calls(record) -> list[dict]:
    return [v for k, v in record.stages.items() if k.startswith("framefusion(")]


# (similarity_lower_bound, ratio_lower_bound): schedules seen on the tiny model's two rows
SCHEDULES = {
    "merge_then_prune": {"similarity_lower_bound": 0.99, "ratio_lower_bound": 0.1},  # row 0: 4 merges, prune at layer 3
    "prune_at_layer0": {"similarity_lower_bound": 0.99, "ratio_lower_bound": 0.2},  # merge at 0, prune after layer 0's attention
    "topk": {"similarity_lower_bound": 0.98, "ratio_lower_bound": 0.1},  # several merges, a top-k merge, a late prune
    "topk_first": {"similarity_lower_bound": 0.6},  # the defaults: top-k merge at the first call
}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("family, batch", [("llava_onevision", 2), ("llava_onevision", 1), ("qwen2_vl", 2)])
def test_matches_manual_layer_by_layer_reference(family, batch, schedule):
    _check_against_reference(family, batch, schedule)


@pytest.mark.parametrize("family", ["llava_next_video", "video_llava", "qwen2_5_vl", "internvl", "smolvlm"])
def test_other_families_match_the_reference(family):
    _check_against_reference(family, 2, "merge_then_prune")


def _check_against_reference(family: str, batch: int, schedule: str) -> None:
    model, _ = model4(family)
    inputs = inputs_for(family, batch)
    if batch == 2:
        assert bool((inputs["attention_mask"] == 0).any()), "batch 2 should be left-padded"
    captured = capture_lm_inputs(model, inputs)
    params = SCHEDULES[schedule]
    with tc.compressed(model, "framefusion", **params):
        out, tokens = _generate(model, inputs)
        records = tc.last_record(model)
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    for row in range(batch):
        ref_logits, ref_tokens, kept_calls = run_reference(model, captured, inputs["input_ids"], records, row, params)
        calls = _calls(records[row])
        assert len(calls) == len(kept_calls), f"row {row}: {len(calls)} calls, the reference made {len(kept_calls)}"
        for n, (entry, want) in enumerate(zip(calls, kept_calls)):
            assert torch.equal(entry["kept"], want), f"row {row}: call {n} kept set differs"
        n = next((i + 1 for i, t in enumerate(ref_tokens.tolist()) if t in eos), STEPS)
        assert torch.equal(tokens[row, :n], ref_tokens[:n]), f"row {row}: tokens differ"
        got = torch.stack([step[row] for step in out.logits[:n]])
        torch.testing.assert_close(got, torch.stack(ref_logits[:n]), atol=2e-5, rtol=0)


def test_schedules_cover_every_kind_of_call():
    """The schedules above exercise threshold merges, the last merge, top-k merges and prunes after attention."""
    model, _ = model4()
    inputs = inputs_for("llava_onevision", 2)
    seen: set[tuple[str, str]] = set()
    for params in SCHEDULES.values():
        with tc.compressed(model, "framefusion", **params), torch.no_grad():
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
            for record in tc.last_record(model):
                for call in _calls(record):
                    seen.add((call["info"]["kind"], "layer 0" if call["info"]["site"].startswith("before") else "after"))
                    assert call["visual_after"] <= call["visual_before"]
    want = {
        ("merge", "layer 0"),
        ("merge", "after"),
        ("merge (last)", "layer 0"),
        ("merge (last)", "after"),
        ("merge (top-k, last)", "layer 0"),
        ("merge (top-k, last)", "after"),
        ("prune", "after"),
    }
    assert want <= seen, want - seen


# -- keeps everything: bit-identical ----------------------------------------------------------------------------


@pytest.mark.parametrize("family, attn, batch", [("llava_onevision", "sdpa", 2), ("llava_onevision", "eager", 1), ("qwen2_vl", "sdpa", 2)])
def test_keep_all_is_bit_identical(family, attn, batch):
    model, _ = model4(family, attn)
    inputs = inputs_for(family, batch)
    with torch.no_grad():
        want_logits = model(**inputs).logits
    want, want_tokens = _generate(model, inputs, 4)
    # similarity above 1: no candidate; cost 1: the budget asks for nothing (top-k of 0 tokens, then done)
    with tc.compressed(model, "framefusion", similarity_lower_bound=1.5, cost=1.0):
        with torch.no_grad():
            logits = model(**inputs).logits
        got, tokens = _generate(model, inputs, 4)
        record = tc.last_record(model)
    assert torch.equal(logits, want_logits)
    assert torch.equal(torch.stack(got.logits), torch.stack(want.logits))
    assert torch.equal(tokens, want_tokens)
    for row in record:
        (call,) = _calls(row)
        assert call["visual_after"] == call["visual_before"]


# -- query dependence -----------------------------------------------------------------------------------------


def _prune_kept(questions: tuple[str, str]) -> list[Tensor]:
    model, processor = model4()
    video = _videos()[0]
    kept = []
    for q in questions:
        inputs = dict(make_inputs(processor, [video], [q]))
        with tc.compressed(model, "framefusion", **SCHEDULES["prune_at_layer0"]), torch.no_grad():
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
            calls = _calls(tc.last_record(model)[0])
        assert calls[-1]["info"]["kind"] == "prune" and calls[-1]["visual_after"] < calls[-1]["visual_before"]
        merges = [c["kept"] for c in calls[:-1]]
        kept.append((merges, calls[-1]["kept"]))
    return kept


def test_prune_depends_on_the_question_merges_do_not():
    (m1, p1), (m2, p2) = _prune_kept((QUESTIONS[0], "Which colour dominates the last frame of this clip?"))
    assert len(m1) == len(m2) and all(torch.equal(a, b) for a, b in zip(m1, m2)), "merges read only the video tokens"
    assert not torch.equal(p1, p2), "the prune step reads the last prompt token's attention"
    (_, q1), (_, q2) = _prune_kept((QUESTIONS[0], QUESTIONS[0]))
    assert torch.equal(q1, q2)


# -- budget and parameters ----------------------------------------------------------------------------------


def test_pruning_ratio_needed_matches_the_formula():
    assert pruning_ratio_needed([], 0.3) == pytest.approx(0.7)
    for s in ([0.5], [0.4, 0.2], [0.5, 0.2, 0.05]):
        assert pruning_ratio_needed(s, 0.3) == pytest.approx(ref_budget(s, 0.3), abs=1e-12)
    assert pruning_ratio_needed([0.9], 0.5) == 0.0  # more left than the calls can use
    assert math.isclose(pruning_ratio_needed([], 0.3, num_layers=4), 0.7)


def test_cost_too_small_is_a_clear_error():
    with pytest.raises(FrameFusionBudgetError, match="cost=0.05 is too small"):
        pruning_ratio_needed([0.01, 0.01], 0.05, num_layers=28)
    with pytest.raises(FrameFusionBudgetError, match="too small"):
        pruning_ratio_needed([0.0] * 4, 1.0, num_layers=4)  # no call left
    model, _ = model4()
    inputs = inputs_for("llava_onevision", 1)
    with (
        tc.compressed(model, "framefusion", similarity_lower_bound=0.99, num_layers=2),
        torch.no_grad(),
        pytest.raises(FrameFusionBudgetError, match="raise cost"),
    ):
        model.generate(**inputs, max_new_tokens=1, do_sample=False)


def test_num_layers_none_takes_the_model_depth():
    model, _ = model4()
    inputs = inputs_for("llava_onevision", 1)
    with tc.compressed(model, "framefusion", num_layers=None, cost=0.9, similarity_lower_bound=0.99), torch.no_grad():
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
        first = _calls(tc.last_record(model)[0])[0]
    assert first["info"]["upper_bound"] == pytest.approx(1 - 0.9 * DEPTH / DEPTH)


@pytest.mark.parametrize(
    "params, match",
    [
        ({"cost": 0.0}, "cost must be"),
        ({"cost": 1.5}, "cost must be"),
        ({"cost": "0.3"}, "cost must be"),
        ({"similarity_lower_bound": -1.5}, "similarity_lower_bound must be"),
        ({"similarity_lower_bound": float("nan")}, "similarity_lower_bound must be"),
        ({"ratio_lower_bound": -0.1}, "ratio_lower_bound must be"),
        ({"ratio_lower_bound": 1.1}, "ratio_lower_bound must be"),
        ({"num_layers": 0}, "num_layers must be"),
        ({"num_layers": 2.5}, "num_layers must be"),
        ({"retain": 0.5, "cost": 0.3}, "retain is another name for cost"),
        ({"retain": 0.0}, "retain must be"),
    ],
)
def test_bad_parameters_are_named(params, match):
    with pytest.raises(ValueError, match=match):
        tc.build_policy("framefusion", **params)


def test_retain_is_cost():
    assert FrameFusion(retain=0.25).cost == 0.25 and FrameFusion().cost == 0.3 == FrameFusion().retain
    assert FrameFusion(retain=0.4, cost=0.4).cost == 0.4


def test_refuses_other_in_llm_stages_and_deepstack():
    model, _ = model4()
    with pytest.raises(UnsupportedUsageError, match="cannot be combined"):
        tc.wrap(model, ["framefusion", "fastv"])
    assert not tc.is_wrapped(model)
    qwen3, _ = model4("qwen3_vl")
    with pytest.raises(UnsupportedModelError, match="deepstack"):
        tc.wrap(qwen3, "framefusion")


def test_chains_after_an_input_stage():
    model, _ = model4()
    inputs = inputs_for("llava_onevision", 2)
    chain = tc.Sequential([tc.build_policy("uniform", retain=0.5), FrameFusion(similarity_lower_bound=0.95)])
    with tc.compressed(model, chain):
        _generate(model, inputs, 2)
        record = tc.last_record(model)
    for row in record:
        calls = _calls(row)
        assert calls[0]["visual_before"] == row.video_tokens_after - 1  # the trailing newline is not a candidate
        assert calls[-1]["kept"].numel() == calls[-1]["visual_after"]
