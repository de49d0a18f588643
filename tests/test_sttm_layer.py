"""STTM inside the language model (``start_layer > 0``) against a layer-by-layer reference.

The reference (below) takes what the UNWRAPPED model feeds its language model, runs the decoder
layers ``< K`` on the full row, applies the pure STTM merge (:func:`tokcompress.policies.sttm.sttm`,
golden-exact in tests/test_golden.py) to the hidden states of each video entering layer ``K``, puts
each merged token at its top-left patch, and runs layers ``>= K`` on the shortened row with the
stated positions: ``kept`` (original ids) or ``compacted`` (``0..M-1``, rotary recomputed). Decode
steps: layers ``< K`` take the logical position ``L + s``; layers ``>= K`` take ``L + s`` (kept) or
``M + s`` (compacted). One row at a time, no padding, eager attention with explicit masks; the
wrapped model runs batch 2, left-padded, through ``generate``.
"""

from __future__ import annotations

import functools
from typing import Callable

import pytest
import torch
from torch import Tensor
from transformers import DynamicCache

import tokcompress as tc
from tokcompress.adapters import adapter_for
from tokcompress.errors import UnsupportedUsageError
from tokcompress.policies.sttm import STTM, STTMLayer, sttm
from tokcompress.tiny import build, make_inputs

from conftest import QUESTIONS, _videos
from kv_reference import eager
from reference import capture_lm_inputs

DEPTH = 4
STEPS = 8


@functools.lru_cache(maxsize=None)
def model4(family: str, attn: str = "sdpa"):
    return build(family, attn_implementation=attn, num_hidden_layers=DEPTH)


def inputs_for(family: str, attn: str, batch: int = 2) -> dict:
    _, processor = model4(family, attn)
    return dict(make_inputs(processor, list(_videos())[:batch], list(QUESTIONS[:batch])))


Merge = Callable[[Tensor], tuple[Tensor, Tensor]]  # (T, h, w, D) -> (merged (M, D), top-left flat cells (M,))


def by_thresholds(tree: float, temporal: float, root: int) -> Merge:
    def merge(feats: Tensor) -> tuple[Tensor, Tensor]:
        res = sttm(feats, tree, temporal if temporal > 0 else None, root)
        return res.tokens, res.keep

    return merge


def by_retain(retain: float, root: int) -> Merge:
    def merge(feats: Tensor) -> tuple[Tensor, Tensor]:
        res, _ = STTM(retain=retain, sa_tree_root_level=root).merge(feats)
        return res.tokens, res.keep

    return merge


def _causal(n_query: int, n_key: int, dtype: torch.dtype) -> Tensor:
    allowed = torch.ones(n_query, n_key, dtype=torch.bool).tril(n_key - n_query)
    return torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)[None, None]


@torch.no_grad()
def reference_row(model, captured, row: int, videos: list[tuple[Tensor, tuple]], k: int, merge: Merge, compacted: bool, steps: int):
    """Greedy tokens, per-step logits, and the original positions of the video tokens kept at layer ``k``."""
    adapter = adapter_for(model)
    lm, layers = adapter.language_model(model), adapter.decoder_layers(model)
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    seq = captured.mask[row].nonzero().squeeze(1)  # original sequence index of each current token
    hidden = captured.embeds[row, seq][None]
    mrope = captured.position_ids.dim() == 3
    pos = captured.position_ids[:, row, seq][:, None] if mrope else captured.position_ids[row, seq][None]
    first_pos = pos
    cache = DynamicCache(config=lm.config)
    kept = torch.zeros(0, dtype=torch.long)
    with eager(lm):
        cos, sin = lm.rotary_emb(hidden, pos)
        for i, layer in enumerate(layers):
            if i == k:
                keep = torch.ones(seq.numel(), dtype=torch.bool)
                new = hidden[0].clone()
                parts = []
                for positions, grid in videos:
                    where = torch.searchsorted(seq, positions)  # grid tokens in raster order
                    tokens, cells = merge(hidden[0, where].reshape(*grid, -1))
                    keep[where] = False
                    keep[where[cells]] = True
                    new[where[cells]] = tokens.to(new.dtype)
                    parts.append(positions[cells])
                kept = torch.cat(parts).sort().values
                sel = keep.nonzero().squeeze(1)
                hidden, seq = new[sel][None], seq[sel]
                pos = torch.arange(sel.numel())[None] if compacted else pos[..., sel]
                cos, sin = lm.rotary_emb(hidden, pos)
            n = hidden.shape[1]
            hidden = layer(hidden, attention_mask=_causal(n, n, hidden.dtype), position_embeddings=(cos, sin), cache=cache, use_cache=True)
        logits = [head(lm.norm(hidden)[:, -1]).float()[0]]
        tokens = [int(logits[-1].argmax())]
        for s in range(1, steps):
            h = embed(torch.tensor([[tokens[-1]]]))
            logical = first_pos[..., -1:] + s
            late = pos[..., -1:] + s if compacted else logical
            full_rope, late_rope = lm.rotary_emb(h, logical), lm.rotary_emb(h, late)
            for i, layer in enumerate(layers):
                n_keys = cache.layers[i].keys.shape[2] + 1
                h = layer(h, attention_mask=_causal(1, n_keys, h.dtype), position_embeddings=late_rope if i >= k else full_rope, cache=cache, use_cache=True)
            logits.append(head(lm.norm(h)[:, -1]).float()[0])
            tokens.append(int(logits[-1].argmax()))
    return torch.tensor(tokens), logits, kept


def _generate(model, inputs, steps: int = STEPS):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True)
    return out, out.sequences[:, inputs["input_ids"].shape[1] :]


def _until_eos(tokens: Tensor, eos) -> int:
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    for i, t in enumerate(tokens.tolist()):
        if t in eos:
            return i + 1
    return tokens.numel()


# (wrap params, reference merge)
# The tiny models' hidden states at layer 2 are very similar to each other: thresholds near 1 merge
# some nodes and not others on LLaVA-OneVision (both rows). "retain" fits the thresholds per video.
CASES = {
    "thresholds": (dict(sa_tree_thresh=0.97, sa_tree_temporal_thresh=0.99, sa_tree_root_level=0), by_thresholds(0.97, 0.99, 0)),
    "spatial_only": (dict(sa_tree_thresh=0.97, sa_tree_temporal_thresh=-1.0, sa_tree_root_level=0), by_thresholds(0.97, -1.0, 0)),
    "retain": (dict(retain=0.4, sa_tree_root_level=0), by_retain(0.4, 0)),
}


def _check(family: str, attn: str, case: str, k: int, positions: str) -> None:
    model, _ = model4(family, attn)
    inputs = inputs_for(family, attn)
    captured = capture_lm_inputs(model, inputs)
    params, merge = CASES[case]
    with tc.compressed(model, "sttm", start_layer=k, positions=positions, **params):
        out, tokens = _generate(model, inputs)
        records = tc.last_record(model)
    eos = model.generation_config.eos_token_id
    for row in range(tokens.shape[0]):
        videos = [(v.positions, tuple(v.grid)) for v in records[row].videos]
        ref_tokens, ref_logits, kept = reference_row(model, captured, row, videos, k, merge, positions == "compacted", STEPS)
        stage = next(iter(records[row].stages.values()))
        assert stage["layer"] == k and stage["merged"]
        assert 1 < stage["visual_after"] < stage["visual_before"], "the case should merge some tokens, not all"
        assert torch.equal(stage["kept"], kept), f"row {row}: positions of the merged tokens differ"
        torch.testing.assert_close(out.logits[0][row], ref_logits[0], atol=1e-5, rtol=0)
        n = _until_eos(ref_tokens, eos)
        assert torch.equal(tokens[row, :n], ref_tokens[:n]), f"row {row}: greedy tokens differ from the reference"
        got = torch.stack([step[row] for step in out.logits[:n]])
        torch.testing.assert_close(got, torch.stack(ref_logits[:n]), atol=2e-5, rtol=0)


@pytest.mark.parametrize("positions", ["kept", "compacted"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_matches_layer_by_layer_reference(attn, case, positions):
    _check("llava_onevision", attn, case, 2, positions)


@pytest.mark.parametrize("k", [1, 3])
def test_other_layers(k):
    _check("llava_onevision", "sdpa", "thresholds", k, "compacted")


@pytest.mark.parametrize("family, positions", [("video_llava", "compacted"), ("llava_next_video", "kept"), ("qwen2_5_vl", "kept")])
def test_other_families(family, positions):
    _check(family, "sdpa", "retain", 2, positions)


# -- settings that merge nothing are the unwrapped model ---------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _unwrapped(family: str):
    model, _ = model4(family)
    inputs = inputs_for(family, "sdpa")
    with torch.no_grad():
        logits = model(**inputs).logits
    out, tokens = _generate(model, inputs, 4)
    return logits, torch.stack(out.logits), tokens


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_5_vl"])
def test_merging_nothing_is_bit_identical(family):
    model, _ = model4(family)
    inputs = inputs_for(family, "sdpa")
    want = _unwrapped(family)
    settings = [
        dict(sa_tree_thresh=1.5, sa_tree_temporal_thresh=1.5, positions="kept"),
        dict(sa_tree_thresh=1.5, sa_tree_temporal_thresh=-1.0, sa_tree_root_level=0, positions="kept"),
        dict(retain=1.0, positions="kept"),
    ]
    if family == "llava_onevision":
        settings.append(dict(sa_tree_thresh=1.5, sa_tree_temporal_thresh=1.5, positions="compacted"))
    for params in settings:
        with tc.compressed(model, "sttm", start_layer=2, **params):
            with torch.no_grad():
                logits = model(**inputs).logits
            out, tokens = _generate(model, inputs, 4)
        for got, ref in zip((logits, torch.stack(out.logits), tokens), want):
            assert torch.equal(got, ref), f"sttm {params} is not bit-identical"


# -- what the policy object is -----------------------------------------------------------------------------------


def test_start_layer_selects_the_stage():
    assert tc.build_policy("sttm").stages()[0].stage == "input"
    policy = tc.build_policy("sttm", start_layer=2, positions="compacted")
    (stage,) = policy.stages()
    assert isinstance(stage, STTMLayer) and stage.stage == "layer" and stage.queries is None
    assert stage.resolve_layer(28) == 2 and stage.positions == "compacted"
    assert stage.label == policy.label == "sttm(tree=0.85, temporal=0.65, layer=2)"


def test_record_maps_merged_tokens_to_their_top_left_patch():
    model, _ = model4("llava_onevision")
    inputs = inputs_for("llava_onevision", "sdpa")
    with tc.compressed(model, "sttm", start_layer=2, **CASES["thresholds"][0]), torch.no_grad():
        model(**inputs)
        records = tc.last_record(model)
    for rec in records:
        stage = next(iter(rec.stages.values()))
        (video,) = rec.videos
        tlbr = stage["info"]["tlbr"][0]
        t, h, w = video.grid
        top_left = video.positions[tlbr[:, 0] * h * w + tlbr[:, 1] * w + tlbr[:, 2]]
        assert torch.equal(stage["kept"], top_left)
        assert stage["cache_layers"] == (2, DEPTH - 1)


# -- refusals ----------------------------------------------------------------------------------------------------


def test_start_layer_beyond_the_depth_is_refused():
    model, _ = model4("llava_onevision")
    with pytest.raises(ValueError, match="layer 4 is outside"):
        tc.wrap(model, "sttm", start_layer=DEPTH)
    assert not tc.is_wrapped(model)


def test_compacted_is_refused_on_mrope():
    model, _ = model4("qwen2_5_vl")
    with pytest.raises(UnsupportedUsageError, match="M-RoPE"):
        tc.wrap(model, "sttm", start_layer=2, positions="compacted")
    assert not tc.is_wrapped(model)


def test_a_stage_that_drops_tokens_before_it_is_refused():
    model, _ = model4("llava_onevision")
    inputs = inputs_for("llava_onevision", "sdpa")
    chain = [tc.build_policy("sttm", start_layer=2), tc.build_policy("uniform", retain=0.5)]
    with tc.compressed(model, chain), pytest.raises(UnsupportedUsageError, match="put sttm first"), torch.no_grad():
        model(**inputs)


@pytest.mark.parametrize("value", [-1, 1.5, True])
def test_bad_start_layer_is_named(value):
    with pytest.raises(ValueError, match="start_layer"):
        tc.build_policy("sttm", start_layer=value)


def test_a_later_in_layer_stage_sees_the_merged_sequence():
    """FastV at layer 3 after STTM at 2 (compacted): it picks among STTM's outputs, and generate runs."""
    model, _ = model4("llava_onevision")
    inputs = inputs_for("llava_onevision", "sdpa")
    chain = [tc.build_policy("sttm", start_layer=2, positions="compacted", **CASES["thresholds"][0]), tc.build_policy("fastv", retain=0.5, layer=3)]
    seen = []
    layer3 = adapter_for(model).decoder_layers(model)[3]
    with tc.compressed(model, chain):
        # registered after the engine's hooks: sees what layer 3 receives
        handle = layer3.register_forward_pre_hook(lambda m, a, k: seen.append(dict(k)), with_kwargs=True)
        try:
            out, tokens = _generate(model, inputs, 4)
        finally:
            handle.remove()
        records = tc.last_record(model)
    assert tokens.shape == (2, 4)
    prefill = seen[0]
    ids, (cos, sin) = prefill["position_ids"], prefill["position_embeddings"]
    lm = adapter_for(model).language_model(model)
    want_cos, want_sin = lm.rotary_emb(cos, ids)
    assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin), "layer 3 got cos/sin of other positions"
    for row, rec in enumerate(records):
        real = ids[row]
        merged = rec.stages[tc.build_policy(chain).stages()[0].label]
        # compacted at layer 2: the row's last token sits at (real tokens at layer 2) - 1
        assert int(real[-1]) == int(inputs["attention_mask"][row].sum()) - (merged["visual_before"] - merged["visual_after"]) - 1
    for rec in records:
        merged, pruned = (rec.stages[p.label] for p in tc.build_policy(chain).stages())
        assert (merged["layer"], pruned["layer"]) == (2, 3)
        assert pruned["visual_before"] == merged["visual_after"] > pruned["visual_after"]
        assert bool(torch.isin(pruned["kept"], merged["kept"]).all())
