"""In-layer (FastV, HoliTom inner, PruneVid inner) and decode-time (DyCoke KV) policies in generate.

The reference is independent of the engine: tests/kv_reference.py calls the decoder layers of the
unwrapped model one by one, reads attention probabilities from eager attention, and applies the
selection rules written below (test-side code), including masking the evicted or pruned cache
columns. Families: LLaVA-OneVision (1-D RoPE), Qwen2.5-VL (M-RoPE), Qwen3-VL (M-RoPE, q/k norms,
deepstack), each with 4 decoder layers; sdpa and eager; batch 2 with uneven visual counts.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import tokcompress as tc
from tokcompress.errors import UnsupportedUsageError
from tokcompress.policies.baselines import evenly_spaced
from tokcompress.tiny import build, make_inputs
from tokcompress.tokens import Compression, TokenSet, selection

from conftest import QUESTIONS, _videos
from kv_reference import DecodeRule, Stage, run_row
from reference import capture_lm_inputs

FAMILIES = ["llava_onevision", "qwen2_5_vl", "qwen3_vl"]
DEPTH = 4
STEPS = 10


@functools.lru_cache(maxsize=None)
def model4(family: str, attn: str = "sdpa"):
    return build(family, attn_implementation=attn, num_hidden_layers=DEPTH)


def inputs_for(family: str, attn: str, batch: int) -> dict:
    _, processor = model4(family, attn)
    return dict(make_inputs(processor, list(_videos())[:batch], list(QUESTIONS[:batch])))


@dataclass
class Uneven(tc.Policy):
    """Test-only input stage: a long question keeps 3/4 of the video, a short one 1/2 (uneven rows)."""

    retain: float = 0.5

    def compress(self, tokens: TokenSet) -> Compression:
        assert tokens.query is not None
        k = tokens.num_tokens * (3 if tokens.query.shape[0] > 30 else 2) // 4
        return selection(evenly_spaced(tokens.num_tokens, k, tokens.features.device))


# -- test-side selection rules (what each paper's reference does, written independently) -----------------------


def _count_round(n: int, retain: float) -> int:
    return round(n * (1 - (1 - retain)))  # reference: round(N * (1 - R)), half to even


def ref_fastv(retain: float):
    def choose(attn, hidden, vis, positions):
        a = attn[:, -1].mean(0)[vis]
        return vis[torch.topk(a, _count_round(vis.numel(), retain)).indices].sort().values, None

    return choose


def ref_holitom(retain: float):
    def choose(attn, hidden, vis, positions):
        a = attn[:, -1].mean(0)[vis]
        keep = vis[torch.topk(a, _count_round(vis.numel(), retain)).indices].sort().values
        drop = vis[~torch.isin(vis, keep)]
        h = hidden.clone()
        sim = F.cosine_similarity(h[drop][:, None], h[keep][None], dim=-1, eps=0.0)
        for i, d in enumerate(drop.tolist()):  # the reference's sequential running average
            t = int(keep[sim[i].argmax()])
            h[t] = (h[t] + h[d]) / 2
        return keep, h

    return choose


def ref_prunevid(retain: float, group_of: dict[int, int]):
    def choose(attn, hidden, vis, positions):
        rows = torch.arange(int(vis.max()) + 1, attn.shape[1])
        score = attn[:, rows][:, :, vis].amax(0).amax(0)
        groups = torch.tensor([group_of[int(p)] for p in positions])
        keep = []
        for g in groups.unique():
            members = (groups == g).nonzero().squeeze(1)
            n = int(members.numel() * retain)
            keep.append(vis[members[torch.topk(score[members], n).indices]])
        return torch.cat(keep).sort().values, None

    return choose


def ref_dycoke(retain: float, threshold: float):
    def choose(attn, vis, available, state):
        x = attn.mean(0)[vis]
        prev = state.get("prev")
        sim = 0.0 if prev is None else float(F.cosine_similarity(x, prev, dim=0))
        state["prev"] = x
        if not sim < threshold:
            return None
        n = int(vis.numel() * (1 - (1 - retain)))
        cand = available.nonzero().squeeze(1)
        return vis[cand[torch.topk(x[cand], min(n, cand.numel())).indices]]

    return choose


def _groups(record) -> dict[int, int]:
    """Original position -> group: the outer stage's groups when it set them, else (video, frame)."""
    out = {}
    for v, video in enumerate(record.videos):
        n = video.grid[1] * video.grid[2]
        groups = video.info.get("token_groups")
        for i, (flat, pos) in enumerate(zip(video.keep.tolist(), video.positions[video.keep].tolist())):
            out[pos] = (v, int(groups[i]) if groups is not None else flat // n)
    return {pos: hash(g) for pos, g in out.items()}


# (policy spec for wrap, function(record) -> reference stages, decode rule factory or None)
CASES = {
    "fastv": (("fastv", {"retain": 0.5, "layer": 2}), lambda rec: [Stage(2, ref_fastv(0.5))], None),
    "holitom_inner": (("holitom_inner", {"retain": 0.4, "layer": 3}), lambda rec: [Stage(3, ref_holitom(0.4))], None),
    "holitom+inner": (
        ("holitom", {"retain": 0.5, "inner": True}),  # outer HoliTom, then the inner merge at the scaled layer 3
        lambda rec: [Stage(3, ref_holitom(0.5))],
        None,
    ),
    "prunevid_inner": (
        ("prunevid_inner", {"retain": 0.4, "selected_layer": 1}),
        lambda rec: [Stage(2, ref_prunevid(0.4, _groups(rec)), prune_earlier=True)],
        None,
    ),
    "prunevid": (
        ("prunevid", {"retain": 0.5, "cluster_ratio": 0.5, "tau": 0.5, "k": 3, "selected_layer": 2}),
        lambda rec: [Stage(3, ref_prunevid(0.5, _groups(rec)), prune_earlier=True)],
        None,
    ),
    "uneven+fastv": (
        ([Uneven(), tc.build_policy("fastv", retain=0.6, layer=2)], {}),
        lambda rec: [Stage(2, ref_fastv(0.6))],
        None,
    ),
    "dycoke_kv": (("dycoke_kv", {"retain": 0.3, "layer": 2}), lambda rec: [], lambda: DecodeRule(2, ref_dycoke(0.3, 0.9))),
    "dycoke_kv_every_step": (
        ("dycoke_kv", {"retain": 0.3, "layer": 2, "threshold": 1.01}),
        lambda rec: [],
        lambda: DecodeRule(2, ref_dycoke(0.3, 1.01)),
    ),
    "dycoke_kv_evict": (
        ("dycoke_kv", {"retain": 0.3, "layer": 2, "threshold": 1.01, "evict": True}),
        lambda rec: [],
        lambda: DecodeRule(2, ref_dycoke(0.3, 1.01), evict=True),
    ),
    "dycoke": (
        ("dycoke", {"retain": 0.5, "kv_retain": 0.3, "layer": 2}),
        lambda rec: [],
        lambda: DecodeRule(2, ref_dycoke(0.3, 0.9)),
    ),
    "dycoke_compacted": (
        ("dycoke", {"retain": 0.5, "kv_retain": 0.3, "layer": 2, "evict": True, "positions": "compacted"}),
        lambda rec: [],
        lambda: DecodeRule(2, ref_dycoke(0.3, 0.9), evict=True),
    ),
    "prunevid_compacted": (
        ("prunevid", {"retain": 0.5, "tau": 0.5, "k": 3, "selected_layer": 2, "positions": "compacted"}),
        lambda rec: [Stage(3, ref_prunevid(0.5, _groups(rec)), prune_earlier=True)],
        None,
    ),
    "fastv+dycoke_kv_evict": (
        ([tc.build_policy("fastv", retain=0.5, layer=2), tc.build_policy("dycoke_kv", retain=0.5, layer=3, evict=True)], {}),
        lambda rec: [Stage(2, ref_fastv(0.5))],
        lambda: DecodeRule(3, ref_dycoke(0.5, 0.9), evict=True),
    ),
}


def _generate(model, inputs, steps: int = STEPS):
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    return out, out.sequences[:, inputs["input_ids"].shape[1] :]


def _steps_until_eos(tokens: torch.Tensor, eos) -> int:
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    for i, t in enumerate(tokens.tolist()):
        if t in eos:
            return i + 1
    return tokens.numel()


def _check_against_reference(family: str, attn: str, batch: int, case: str) -> None:
    model, _ = model4(family, attn)
    inputs = inputs_for(family, attn, batch)
    captured = capture_lm_inputs(model, inputs)
    (policy, params), stages_of, rule_of = CASES[case]
    with tc.compressed(model, policy, **params):
        out, tokens = _generate(model, inputs)
        records = tc.last_record(model)
        label_of = {type(p).__name__: p.label for p in tc.policy_of(model).stages()}
    eos = model.generation_config.eos_token_id
    for row in range(batch):
        rule = rule_of() if rule_of else None
        compacted = case.endswith("_compacted")
        ref = run_row(model, captured, inputs["input_ids"], records, row, STEPS, stages_of(records[row]), rule, compacted)
        n = _steps_until_eos(ref.tokens, eos)
        assert torch.equal(tokens[row, :n], ref.tokens[:n]), f"row {row}: tokens differ from the reference"
        got = torch.stack([step[row] for step in out.logits[:n]])
        torch.testing.assert_close(got, torch.stack(ref.logits[:n]), atol=2e-5, rtol=0)
        stages = records[row].stages
        for layer, kept in ref.kept.items():
            entry = next(v for v in stages.values() if v.get("layer") == layer and "kept" in v)
            assert torch.equal(entry["kept"], kept), f"row {row}: layer-{layer} kept set differs"
            assert entry["visual_after"] < entry["visual_before"]
        if rule is not None:
            label = label_of["DyCokeKV"]
            steps = stages[label]["steps"]
            assert len(steps) >= n - 1
            for step, want in zip(steps[: n - 1], ref.decode_kept):
                assert step["pruned"] == (want is not None)
                if want is not None:
                    assert torch.equal(step["kept"], want)
            assert any(s["pruned"] for s in steps), "the test should exercise at least one pruning step"


@pytest.mark.parametrize("case", [c for c in CASES if not c.endswith("_compacted")])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_matches_layer_by_layer_reference_batch2(family, attn, case):
    _check_against_reference(family, attn, 2, case)


@pytest.mark.parametrize("case", ["dycoke_compacted", "prunevid_compacted"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_compacted_positions_match_the_reference(attn, case):
    """The references renumber positions after their outer stages; positions="compacted" does too (1-D)."""
    _check_against_reference("llava_onevision", attn, 2, case)


@pytest.mark.parametrize("case", ["holitom_inner", "prunevid", "fastv+dycoke_kv_evict"])
@pytest.mark.parametrize("family", ["llava_next_video", "video_llava", "qwen2_vl", "internvl", "smolvlm"])
def test_other_families_match_the_reference(family, case):
    _check_against_reference(family, "sdpa", 2, case)


@pytest.mark.parametrize("case", ["fastv", "holitom_inner", "prunevid_inner", "dycoke_kv_evict"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_matches_layer_by_layer_reference_batch1(attn, case):
    _check_against_reference("llava_onevision", attn, 1, case)


# -- retain 1.0 is the unwrapped model ---------------------------------------------------------------------------

IDENTITY = [
    ("fastv", {"retain": 1.0}),
    ("holitom_inner", {"retain": 1.0}),
    ("prunevid_inner", {"retain": 1.0}),
    ("dycoke_ttm", {"retain": 1.0}),
    ("dycoke_kv", {"retain": 1.0, "threshold": 1.01}),
    ("dycoke_kv", {"retain": 1.0, "threshold": 1.01, "evict": True}),
    ("dycoke", {"retain": 1.0, "kv_retain": 1.0}),
    ("prunevid_outer", {"retain": 1.0, "tau": 1.5}),  # tau above 1: no static position
    ("prunevid", {"retain": 1.0, "cluster_ratio": 1.0, "tau": 1.5}),
]


@functools.lru_cache(maxsize=None)
def _unwrapped(family: str, attn: str, batch: int):
    model, _ = model4(family, attn)
    inputs = inputs_for(family, attn, batch)
    with torch.no_grad():
        logits = model(**inputs).logits
    out, tokens = _generate(model, inputs, IDENTITY_STEPS)
    return logits, torch.stack(out.logits), tokens


IDENTITY_STEPS = 5


@pytest.mark.parametrize("attn, batch", [("sdpa", 1), ("sdpa", 2), ("eager", 2)])
@pytest.mark.parametrize("family", FAMILIES)
def test_retain_one_is_bit_identical(family, attn, batch):
    model, _ = model4(family, attn)
    inputs = inputs_for(family, attn, batch)
    want = _unwrapped(family, attn, batch)
    for name, params in IDENTITY:
        with tc.compressed(model, name, **params):
            with torch.no_grad():
                logits = model(**inputs).logits
            out, tokens = _generate(model, inputs, IDENTITY_STEPS)
        for got, ref in zip((logits, torch.stack(out.logits), tokens), want):
            assert torch.equal(got, ref), f"{name} {params} is not bit-identical"


# -- cache layouts -----------------------------------------------------------------------------------------------


def _lengths(policy, params, family="llava_onevision", steps=3):
    model, _ = model4(family)
    inputs = inputs_for(family, "sdpa", 1)
    with tc.compressed(model, policy, **params), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, return_dict_in_generate=True)
        record = tc.last_record(model)[0]
    return tc.cache_lengths(out.past_key_values), inputs["input_ids"].shape[1], record, out.past_key_values


def test_per_layer_cache_lengths():
    video = 8 * 16  # LLaVA-OV tiny: 8 frames of 4x4 grid tokens (+ 1 newline, always kept)
    lengths, prompt, _, _ = _lengths("fastv", {"retain": 0.25, "layer": 2})
    decoded = 2  # 3 new tokens: the last one is never fed back
    assert lengths == [prompt + decoded] * 2 + [prompt - video + 32 + decoded] * 2
    lengths, _, _, _ = _lengths("holitom_inner", {"retain": 0.5, "layer": 3})
    assert lengths == [prompt + decoded] * 3 + [prompt - 64 + decoded]
    lengths, _, record, _ = _lengths("prunevid_inner", {"retain": 0.5, "selected_layer": 1})
    assert lengths == [prompt - 64 + decoded] * 4  # every layer, the earlier ones cut after the fact
    assert record.stages["prunevid_inner(retain=0.5, selected_layer=1)"]["cache_layers"] == (0, 3)
    lengths, _, record, _ = _lengths("dycoke_kv", {"retain": 0.25, "layer": 1, "evict": True})
    assert lengths == [prompt + decoded] + [prompt - video + 32 + decoded] * 3
    lengths, _, _, _ = _lengths("dycoke_kv", {"retain": 0.25, "layer": 1})
    assert lengths == [prompt + decoded] * 4  # the reference behaviour keeps every entry


def test_cache_bytes_counts_keys_and_values():
    lengths, _, _, cache = _lengths("fastv", {"retain": 0.25, "layer": 2})
    layer = cache.layers[0]
    per_entry = 2 * layer.keys.shape[0] * layer.keys.shape[1] * layer.keys.shape[3] * layer.keys.element_size()
    assert tc.cache_bytes(cache) == per_entry * sum(lengths)
    full, _, _, full_cache = _lengths("none", {})
    assert tc.cache_bytes(cache) < tc.cache_bytes(full_cache) == per_entry * sum(full)


# -- chains and records ------------------------------------------------------------------------------------------


def test_chain_record_reports_each_stage():
    model, _ = model4("llava_onevision")
    inputs = inputs_for("llava_onevision", "sdpa", 2)
    chain = [tc.build_policy("uniform", retain=0.5), tc.build_policy("fastv", retain=0.5, layer=1), tc.build_policy("dycoke_kv", layer=2)]
    with tc.compressed(model, chain):
        _generate(model, inputs)
        records = tc.last_record(model)
    for rec in records:
        assert rec.video_tokens_after == 64 + 1  # uniform: 8 of 16 per frame, 8 frames, + the newline
        fastv = rec.stages["fastv(retain=0.5, layer=1)"]
        assert (fastv["layer"], fastv["visual_before"], fastv["visual_after"]) == (1, 64, 32)
        assert bool(torch.isin(fastv["kept"], rec.kept).all())  # a subset of what the input stage kept
        steps = rec.stages["dycoke_kv(retain=0.2, layer=2)"]["steps"]
        assert len(steps) == STEPS - 1 and steps[0]["pruned"] and steps[0]["similarity"] == 0.0
        assert bool(torch.isin(steps[0]["kept"], fastv["kept"]).all())
        assert steps[0]["kept"].numel() == int(32 * 0.2)


def test_beam_search_runs_with_layer_stages_and_refuses_decode_state():
    model, _ = model4("llava_onevision")
    inputs = inputs_for("llava_onevision", "sdpa", 1)
    with tc.compressed(model, "fastv", retain=0.5), torch.no_grad():
        model.generate(**inputs, max_new_tokens=4, num_beams=2, do_sample=False)
    with tc.compressed(model, "dycoke_kv", retain=0.5), torch.no_grad():
        model.generate(**inputs, max_new_tokens=4, do_sample=True, num_return_sequences=2)  # no reordering
        with pytest.raises(UnsupportedUsageError, match="num_beams=1"):
            model.generate(**inputs, max_new_tokens=6, num_beams=3, do_sample=False)


def test_plain_forward_without_cache():
    model, _ = model4("qwen2_5_vl")
    inputs = inputs_for("qwen2_5_vl", "sdpa", 2)
    with tc.compressed(model, "fastv", retain=0.5, layer=2), torch.no_grad():
        cached = model(**inputs).logits[:, -1]
        uncached = model(**inputs, use_cache=False).logits[:, -1]
    torch.testing.assert_close(cached, uncached, atol=1e-5, rtol=0)


# -- layers: defaults, explicit values, Qwen3-VL deepstack --------------------------------------------------------


def test_default_layers_scale_with_depth():
    assert tc.build_policy("fastv").resolve_layer(32) == 2
    assert tc.build_policy("fastv").resolve_layer(28) == 2
    assert tc.build_policy("fastv").resolve_layer(4) == 1
    assert tc.build_policy("holitom_inner").resolve_layer(28) == 18
    assert tc.build_policy("holitom_inner").resolve_layer(4) == 3
    assert tc.build_policy("holitom_inner").resolve_layer(2) == 1
    assert tc.build_policy("dycoke_kv").resolve_layer(28) == 3
    assert tc.build_policy("dycoke_kv").resolve_layer(4) == 1
    assert tc.build_policy("prunevid_inner").resolve_layer(32) == 11
    assert tc.build_policy("prunevid_inner").resolve_layer(4) == 2
    assert tc.build_policy("prunevid_inner").resolve_layer(2) == 1


def test_qwen3_deepstack_layers():
    model, _ = model4("qwen3_vl")
    deep = len(model.config.vision_config.deepstack_visual_indexes)
    assert deep == 2
    with pytest.raises(UnsupportedUsageError, match="deepstack"):
        tc.wrap(model, "fastv", layer=1)
    assert not tc.is_wrapped(model)
    with tc.compressed(model, "fastv", retain=0.5):  # the scaled default (1) moves past the deepstack layers
        _generate(model, inputs_for("qwen3_vl", "sdpa", 1))
        assert tc.last_record(model)[0].stages["fastv(retain=0.5, layer=auto)"]["layer"] == deep


def test_layer_out_of_range_and_clashes():
    model, _ = model4("llava_onevision")
    with pytest.raises(ValueError, match=r"outside \[1, 3\]"):
        tc.wrap(model, "fastv", layer=4)
    with pytest.raises(ValueError, match="same layer"):
        tc.wrap(model, [tc.build_policy("fastv", layer=2), tc.build_policy("holitom_inner", layer=2)])
    with pytest.raises(ValueError, match="one decode-time policy"):
        tc.wrap(model, [tc.build_policy("dycoke_kv"), tc.build_policy("dycoke_kv", evict=True)])
    assert not tc.is_wrapped(model)


@pytest.mark.parametrize(
    "name, params, match",
    [
        ("fastv", {"layer": 0}, "layer must be"),
        ("fastv", {"layer": 1.5}, "layer must be"),
        ("holitom_inner", {"retain": 0.0}, "retain must be"),
        ("prunevid_inner", {"selected_layer": -1}, "selected_layer must be"),
        ("dycoke_kv", {"evict": "yes"}, "evict must be"),
        ("dycoke", {"kv_retain": 1.5}, "kv_retain must be"),
    ],
)
def test_bad_parameters_are_named(name, params, match):
    with pytest.raises(ValueError, match=match):
        tc.build_policy(name, **params)


def test_dycoke_modes_agree_until_the_reference_reselects():
    """Masking (reference) and eviction choose the same entries at the first decode step, so the logits
    of the prefill and of that step agree; later steps differ in general: the reference re-selects
    among all visual entries (or reads them all when attention is stable), eviction cannot bring any back."""
    model, _ = model4("llava_onevision")
    inputs = inputs_for("llava_onevision", "sdpa", 2)
    runs = {}
    for evict in (False, True):
        with tc.compressed(model, "dycoke_kv", retain=0.25, layer=2, evict=evict):
            out, _ = _generate(model, inputs, 4)
            runs[evict] = (out.logits, tc.last_record(model))
    (mask_logits, mask_rec), (evict_logits, evict_rec) = runs[False], runs[True]
    for step in (0, 1):
        torch.testing.assert_close(mask_logits[step], evict_logits[step], atol=1e-5, rtol=0)
    for a, b in zip(mask_rec, evict_rec):
        first_a = next(iter(a.stages.values()))["steps"][0]
        first_b = next(iter(b.stages.values()))["steps"][0]
        assert torch.equal(first_a["kept"], first_b["kept"])
