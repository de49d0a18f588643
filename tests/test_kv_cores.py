"""Cores of the in-LLM policies: budgets, tie rules, edge cases, and the attention probe itself."""

from __future__ import annotations

import math

import pytest
import torch

import tokcompress as tc
from tokcompress.layers import attention_rows
from tokcompress.policies.dycoke import dycoke_kv_step, dycoke_ttm, kv_keep, ttm_keep
from tokcompress.policies.fastv import fastv_select, ratio_round
from tokcompress.policies.holitom_inner import holitom_inner_merge
from tokcompress.policies.prunevid import prunevid_merge, prunevid_select, refine_segments
from tokcompress.tokens import TokenSet

from test_kv import DEPTH, inputs_for, model4


# -- budgets: each reference's own rounding --------------------------------------------------------------------


def test_budget_rounding_follows_each_reference():
    fastv = tc.build_policy("fastv", retain=0.5)
    assert fastv.budget(197) == 98  # round(98.5): half to even
    assert tc.build_policy("fastv", retain=0.1).budget(450) == 45  # 450 * 0.0999... = 44.99999999999999
    assert tc.build_policy("holitom_inner", retain=0.5).budget(197) == 98
    assert tc.build_policy("holitom_inner", retain=0.5).budget(211) == 106  # round(105.5) -> 106 (even)
    assert ratio_round(450, 0.9) == 45 and int(450 * (1 - 0.9)) == 44
    assert ttm_keep(30, 0.9) == 2  # (1 - 0.9) * 30 = 2.9999999999999996
    assert tc.build_policy("dycoke_ttm", retain=1 - 0.9).keep_per_pruned_frame(30) == 2
    assert kv_keep(300, 0.8) == 59 and kv_keep(120, 0.9) == 11
    scores = torch.rand(13)
    assert prunevid_select(scores, torch.zeros(13, dtype=torch.long), 0.4).numel() == 5  # int(5.2)
    assert prunevid_select(scores[:2], torch.zeros(2, dtype=torch.long), 0.4).numel() == 0  # a group can keep none


def test_ties_go_to_the_lower_index():
    scores = torch.tensor([0.1, 0.5, 0.3, 0.5, 0.5, 0.2])
    assert fastv_select(scores, 2).tolist() == [1, 3]
    assert prunevid_select(scores, torch.zeros(6, dtype=torch.long), 0.5).tolist() == [1, 3, 4]
    keep, _ = dycoke_kv_step(scores, None, 2)
    assert keep.tolist() == [1, 3]


def test_fastv_select_keeps_the_most_attended():
    scores = torch.tensor([0.05, 0.4, 0.01, 0.3, 0.2])
    assert fastv_select(scores, 3).tolist() == [1, 3, 4]
    assert fastv_select(scores, 0).numel() == 0
    with pytest.raises(ValueError, match="count"):
        fastv_select(scores, 6)


# -- HoliTom inner: closed form == the reference's sequential loop ------------------------------------------------


def _sequential_merge(h: torch.Tensor, scores: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    keep = torch.topk(scores, count).indices.sort().values
    drop = torch.tensor([i for i in range(h.shape[0]) if i not in set(keep.tolist())], dtype=torch.long)
    h = h.clone()
    sim = (h[drop] @ h[keep].T) / (h[drop].norm(dim=-1)[:, None] * h[keep].norm(dim=-1)[None])
    for i, d in enumerate(drop.tolist()):
        t = int(keep[sim[i].argmax()])
        h[t] = (h[t] + h[d]) / 2
    return keep, h[keep]


@pytest.mark.parametrize("n, count, dim", [(40, 10, 8), (40, 1, 8), (40, 39, 8), (7, 7, 4), (100, 30, 16)])
def test_holitom_inner_merge_equals_sequential_loop(n, count, dim):
    gen = torch.Generator().manual_seed(n * 31 + count)
    prototypes = torch.randn(4, dim, generator=gen)
    h = prototypes[torch.randint(0, 4, (n,), generator=gen)] + 0.3 * torch.randn(n, dim, generator=gen)
    scores = torch.rand(n, generator=gen)
    got = holitom_inner_merge(h, scores, count)
    keep, values = _sequential_merge(h, scores, count)
    assert torch.equal(got.keep, keep)
    torch.testing.assert_close(got.values, values, atol=1e-6, rtol=0)
    assert got.dropped.numel() == n - count


def test_holitom_inner_merge_keeping_none_merges_nothing():
    merged = holitom_inner_merge(torch.randn(5, 3), torch.rand(5), 0)
    assert merged.keep.numel() == 0 and merged.values.shape == (0, 3) and merged.dropped.tolist() == list(range(5))


# -- DyCoke TTM: the reference for T >= 5, tokcompress' choice below --------------------------------------------


def _frames_at(angles_deg: list[list[float]]) -> torch.Tensor:
    """(T, n, 2) unit vectors at the given angles: cosines between frames are known in closed form."""
    a = torch.tensor(angles_deg, dtype=torch.float64) * math.pi / 180
    return torch.stack([a.cos(), a.sin()], dim=-1).float()


def test_ttm_emits_least_similar_tokens_in_similarity_order():
    # frame 1 vs frame 0: cosines cos(0)=1, cos(10), cos(90)=0, cos(45) -> least similar: token 2, then 3
    x = _frames_at([[0, 0, 0, 0], [0, 10, 90, 45]])
    assert dycoke_ttm(x, 2).tolist() == [0, 1, 2, 3, 4 + 2, 4 + 3]


@pytest.mark.parametrize(
    "per_frame",
    [
        [4],  # T = 1: the reference raises for T < 5; tokcompress keeps the lone frame
        [4, 1],
        [4, 1, 4],  # T = 3: the unpaired last frame is kept whole (odd T >= 5 drops it)
        [4, 1, 4, 1],  # T = 4: pass 1 only
        [4, 1, 1, 1, 0],  # T = 5: reference: frame 2 pruned against frame 0, the last frame dropped
        [4, 1, 1, 1, 4, 1, 4, 1],  # T = 8: frame 6 stays whole (no window of four reaches it)
        [4, 1, 1, 1, 4, 1, 1, 1, 0],  # T = 9
    ],
    ids=lambda v: f"T{len(v)}",
)
def test_ttm_short_and_odd_videos(per_frame):
    t, n, keep_n = len(per_frame), 4, 1
    x = torch.randn(t, n, 3, generator=torch.Generator().manual_seed(t))
    order = dycoke_ttm(x, keep_n)
    assert torch.bincount(order // n, minlength=t).tolist() == per_frame


def test_ttm_policy_keeps_positions_sorted_and_reports_the_reference_order():
    x = torch.randn(6, 9, 5, generator=torch.Generator().manual_seed(0))
    result = tc.build_policy("dycoke_ttm", retain=0.3)(TokenSet(features=x, grid=(6, 3, 3)))
    assert torch.equal(result.keep, result.info["order"].sort().values)
    assert result.keep.numel() == 9 * 2 + 4 * int((1 - 0.7) * 9)  # frames 0, 4 whole; 1, 2, 3, 5 pruned


# -- PruneVid outer pieces ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "labels, want",
    [
        ([0, 0, 0, 1, 2, 3, 3, 3], [0, 0, 0, 0, 0, 3, 3, 3]),  # two singleton labels dissolve; tie -> left
        ([1, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1]),  # no left neighbour -> the right one
        ([0, 1, 2], [0, 0, 0]),  # everything dissolves -> 0
        ([0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 0, 0]),  # runs tying for a label's longest are all kept
        ([2, 2, 0, 1, 1, 1, 0, 0], [2, 2, 1, 1, 1, 1, 0, 0]),  # the right run is longer
    ],
)
def test_refine_segments(labels, want):
    assert refine_segments(labels) == want


def test_prunevid_merge_short_videos_and_layout():
    gen = torch.Generator().manual_seed(0)
    for t in (1, 2, 3):  # fewer frames than k = 7: k is capped at T
        x = torch.randn(t, 16, 8, generator=gen)
        merged = prunevid_merge(x, tau=0.8, temporal_segment_ratio=0.25, cluster_ratio=0.5, k=7)
        assert sum(merged.window_sizes) == t
        assert merged.order.numel() == merged.values.shape[0] == merged.groups.numel()
        assert bool((merged.assign >= 0).all()), "every input token lands in some output token"
    # a static background: positions whose tokens never change collapse to one token per window
    x = torch.randn(1, 16, 8, generator=gen).repeat(4, 1, 1)
    x[:, :3] = torch.randn(4, 3, 8, generator=gen)  # three moving positions
    merged = prunevid_merge(x, tau=0.9, temporal_segment_ratio=0.25, cluster_ratio=0.5, k=7)
    assert merged.window_sizes == [4] and merged.static_sizes == [13] and merged.dynamic_sizes == [12]
    torch.testing.assert_close(merged.values[0], x[:, 3].mean(0))


# -- the attention probe equals eager attention --------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llava_onevision", "qwen3_vl"])
def test_attention_rows_equal_eager_probabilities(family):
    model, _ = model4(family, "eager")
    inputs = inputs_for(family, "eager", 2)
    layer_idx = DEPTH - 1
    attn = tc.adapters.adapter_for(model).self_attention(tc.adapters.adapter_for(model).decoder_layers(model)[layer_idx])
    seen = {}

    def grab(module, args, kwargs, output):
        seen["kwargs"], seen["weights"] = kwargs, output[1]

    handle = attn.register_forward_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    kw, weights = seen["kwargs"], seen["weights"]
    hidden, (cos, sin) = kw["hidden_states"], kw["position_embeddings"]
    b, length = hidden.shape[:2]
    mask = inputs["attention_mask"].bool()
    rows = torch.tensor([[length - 1, length - 5, length - 9]] * b)
    allowed = mask[:, None, :] & (torch.arange(length)[None, None] <= rows[..., None])
    with torch.no_grad():
        probs = attention_rows(attn, hidden, cos, sin, rows, allowed)
    want = weights.float().gather(2, rows[:, None, :, None].expand(-1, weights.shape[1], -1, length))
    torch.testing.assert_close(probs, want, atol=1e-6, rtol=0)


# -- hooks are gone after unwrap ---------------------------------------------------------------------------------


def test_unwrap_removes_layer_and_attention_hooks():
    model, _ = model4("qwen2_5_vl")
    adapter = tc.adapters.adapter_for(model)
    modules = [m for layer in adapter.decoder_layers(model) for m in (layer, adapter.self_attention(layer))]
    before = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in modules]
    with tc.compressed(model, ["fastv", tc.build_policy("dycoke_kv", layer=3)]):
        assert sum(len(m._forward_pre_hooks) for m in modules) > sum(b for b, _ in before)
    assert [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in modules] == before


def test_composites_expose_their_stages():
    dycoke = tc.build_policy("dycoke", retain=0.4, kv_retain=0.3, layer=2, evict=True)
    assert [p.name for p in dycoke.stages()] == ["dycoke_ttm", "dycoke_kv"]
    assert dycoke.stages()[1].evict and dycoke.stages()[1].layer == 2
    prunevid = tc.build_policy("prunevid", retain=0.3, cluster_ratio=0.6, selected_layer=5)
    assert [p.name for p in prunevid.stages()] == ["prunevid_outer", "prunevid_inner"]
    assert prunevid.stages()[1].resolve_layer(32) == 6
    holitom = tc.build_policy("holitom", retain=0.2, inner=True)
    assert [p.name for p in holitom.stages()] == ["holitom", "holitom_inner"]
    assert holitom.stages()[1].retain == 0.5 and holitom.stages()[1].resolve_layer(28) == 18
    assert holitom.label.endswith("-> holitom_inner(retain=0.5, layer=auto)")
    assert tc.build_policy("holitom", inner=False).stages() == [tc.build_policy("holitom", inner=False)]
    chain = tc.build_policy(["uniform", "fastv", "dycoke_kv"])
    assert [p.stage for p in chain.stages()] == ["input", "layer", "decode"]
    with pytest.raises(TypeError, match="acts inside the language model"):
        tc.build_policy("fastv").compress(TokenSet(features=torch.zeros(1, 4, 2), grid=(1, 2, 2)))
