"""LLaVA-Scissor, STTM, VidCom2, TS-LLaVA and VisionZip: cores against hand computations, and generate on every family.

Reference fidelity (the published code's outputs) is in test_golden.py; here the cores are checked
against small independent computations (breadth-first search, explicit loops), the budget rules
against their definitions, and every policy runs through ``generate`` (batch 2, left padding) and is
compared with the manual language-model call of tests/reference.py.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

import tokcompress as tc
import tokcompress.adapters
from tokcompress.adapters.thumbnail import best_grid, tile_thumbnail
from tokcompress.errors import MissingSignalError, UnsupportedUsageError
from tokcompress.policies.llava_scissor import LlavaScissor, connected_components, scissor
from tokcompress.policies.sttm import STTM, pool_level, pyramid_sizes, representatives, sttm
from tokcompress.policies.ts_llava import TSLLaVA, linspace_index
from tokcompress.policies.vidcom2 import VidCom2, exact_counts, reference_counts
from tokcompress.policies.visionzip import VisionZip
from tokcompress.policy import keep_count
from tokcompress.tiny import FAMILIES
from tokcompress.tokens import TokenSet

from conftest import Spy, batch_inputs, tiny
from reference import (
    assert_rows_match,
    capture_lm_inputs,
    compressed_greedy,
    manual_greedy,
    reference_inputs,
    row_inputs,
    same_greedy,
    wrapped_greedy,
)


def _smooth_video(t: int, h: int, w: int, d: int, seed: int, noise: float = 0.05) -> torch.Tensor:
    """``(T, h, w, D)`` tokens: a coarse random field upsampled (neighbours similar) plus noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(t, d, 3, 3, generator=g) + 2 * torch.randn(1, d, 3, 3, generator=g)
    x = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    return x + noise * torch.randn(t, h, w, d, generator=g)


def _bfs_components(adj: list[list[bool]]) -> list[int]:
    m = len(adj)
    label = [-1] * m
    for s in range(m):
        if label[s] >= 0:
            continue
        label[s], stack = s, [s]
        while stack:
            i = stack.pop()
            for j in range(m):
                if adj[i][j] and label[j] < 0:
                    label[j] = s
                    stack.append(j)
    return label


# ----------------------------------------------------------------------------------- LLaVA-Scissor


def test_connected_components_match_breadth_first_search():
    rng = random.Random(0)
    graphs = []
    for _ in range(3):
        m = 23
        adj = [[False] * m for _ in range(m)]
        for _ in range(18):
            i, j = rng.randrange(m), rng.randrange(m)
            adj[i][j] = adj[j][i] = True
        graphs.append(adj)
    got = connected_components(torch.tensor(graphs))  # batched
    for g, adj in enumerate(graphs):
        assert got[g].tolist() == _bfs_components(adj)


def _scissor_by_hand(x: torch.Tensor, tau: float, avail: torch.Tensor) -> list[torch.Tensor]:
    """The three steps with explicit loops; returns the output tokens in key-node order."""
    t, n, _ = x.shape

    def components(y: torch.Tensor) -> list[list[int]]:
        yn = y / y.norm(dim=-1, keepdim=True)
        adj = ((yn @ yn.T) > tau).tolist()
        label = _bfs_components(adj)
        degree = [sum(r) for r in adj]
        groups: dict[int, list[int]] = {}
        for i, lab in enumerate(label):
            groups.setdefault(lab, []).append(i)
        key = {lab: min(g, key=lambda i: (-degree[i], i)) for lab, g in groups.items()}
        return [groups[lab] for lab in sorted(groups, key=lambda lab: key[lab])]

    s1 = []
    for f in range(t):
        idx = avail[f].nonzero().squeeze(1)
        s1 += [x[f, idx[c]].mean(0) for c in components(x[f, idx])]
    s1 = torch.stack(s1)
    s2 = torch.stack([s1[c].mean(0) for c in components(s1)])
    flat = x.reshape(-1, x.shape[-1])[avail.reshape(-1)]
    sim = (flat / flat.norm(dim=-1, keepdim=True)) @ (s2 / s2.norm(dim=-1, keepdim=True)).T
    out = []
    for j in range(s2.shape[0]):
        members = flat[sim.argmax(1) == j]
        out.append((s2[j] + members.sum(0)) / (members.shape[0] + 1))
    return out


@pytest.mark.parametrize("partial", [False, True])
def test_scissor_matches_hand_computation(partial):
    x = _smooth_video(3, 5, 5, 8, seed=1, noise=0.15).reshape(3, 25, 8)
    avail = torch.ones(3, 25, dtype=torch.bool)
    if partial:
        avail[:, ::3] = False
    res = scissor(x, 0.9, 0.05, available=avail if partial else None)
    want = torch.stack(_scissor_by_hand(x, 0.9, avail))
    torch.testing.assert_close(res.tokens, want, atol=1e-5, rtol=0)
    assert bool((res.assign[~avail.reshape(-1)] == -1).all()) and bool((res.assign[avail.reshape(-1)] >= 0).all())
    assert bool(avail.reshape(-1)[res.keep].all()) and torch.equal(res.keep, res.keep.sort().values)


def test_scissor_sampling_is_seeded_and_only_drops_edges():
    x = _smooth_video(2, 6, 6, 8, seed=2).reshape(2, 36, 8)
    exact = scissor(x, 0.8, epsilon=0.05)
    sampled_a = scissor(x, 0.8, epsilon=1.0, seed=3)  # s = ceil(ln 36) = 4 nodes per frame
    sampled_b = scissor(x, 0.8, epsilon=1.0, seed=3)
    assert torch.equal(sampled_a.s1_label, sampled_b.s1_label)
    # fewer edges can only split step-1 components
    assert int(sampled_a.s1_counts.sum()) >= int(exact.s1_counts.sum())


def test_scissor_retain_budget_and_identity():
    feats = _smooth_video(4, 6, 6, 16, seed=4)
    tokens = TokenSet(features=feats, grid=(4, 6, 6))
    for retain in (0.05, 0.2, 0.5):
        out = LlavaScissor(retain=retain)(tokens)
        assert out.keep.numel() <= keep_count(retain, 144)
        assert out.keep.numel() >= 0.5 * keep_count(retain, 144)  # the search gets close on smooth data
    full = LlavaScissor(retain=1.0)(tokens)
    assert torch.equal(full.keep, torch.arange(144)) and full.values is None


# ----------------------------------------------------------------------------------------- STTM


def test_pyramid_sizes_follow_the_reference_rule():
    assert pyramid_sizes(14, 14) == [(2, 2), (4, 4), (7, 7), (14, 14)]
    assert pyramid_sizes(13, 13) == [(2, 2), (4, 4), (7, 7), (13, 13)]
    assert pyramid_sizes(16, 16) == [(2, 2), (4, 4), (8, 8), (16, 16)]
    assert pyramid_sizes(10, 14) == [(2, 2), (3, 4), (5, 7), (10, 14)]
    assert pyramid_sizes(1, 1) == [(1, 1)]


@pytest.mark.parametrize("size", [(4, 6), (5, 6), (4, 7), (5, 7)])
def test_pool_level_by_hand(size):
    h, w = size
    x = torch.randn(2, h, w, 3)
    got = pool_level(x)
    rows = [[0]] + [[i, i + 1] for i in range(1, h, 2)] if h % 2 else [[i, i + 1] for i in range(0, h, 2)]
    cols = [[0]] + [[j, j + 1] for j in range(1, w, 2)] if w % 2 else [[j, j + 1] for j in range(0, w, 2)]
    assert got.shape == (2, len(rows), len(cols), 3)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            torch.testing.assert_close(got[:, i, j], x[:, r][:, :, c].mean(dim=(1, 2)), atol=1e-6, rtol=0)


def test_representatives_stop_early_like_the_reference():
    # pairs (dst, src): both touch node 3; one round sets rep = [0, 1, 2, 0], already a fixed point,
    # so node 2 stays apart although (2, 3) was merged (connected components would join all three)
    pairs = torch.tensor([[2, 3], [0, 3]])
    assert representatives(pairs, 4).tolist() == [0, 1, 2, 0]
    chain = torch.tensor([[0, 1], [1, 2], [2, 3]])
    assert representatives(chain, 4).tolist() == [0, 0, 0, 0]


def test_sttm_uniform_frames_merge_fully():
    base = torch.randn(1, 1, 1, 8).expand(3, 8, 8, 8).clone()
    res = sttm(base, 0.9, 0.9, root_level=1)
    # every frame collapses to its 4x4 root nodes, and equal nodes of consecutive frames merge
    assert res.node_tlbr.shape[0] == 3 * 16 and res.tokens.shape[0] == 16
    assert bool((res.tlbr[:, 0] == 0).all())
    torch.testing.assert_close(res.tokens, base[0, :4, :4].reshape(16, 8), atol=1e-6, rtol=0)
    # assign: each patch goes to the output of its 2x2 block
    block = (torch.arange(8)[:, None] // 2) * 4 + torch.arange(8)[None, :] // 2
    assert torch.equal(res.assign.reshape(3, 8, 8), block.expand(3, 8, 8))


def test_sttm_retain_and_refusals():
    feats = _smooth_video(4, 7, 7, 16, seed=5)
    tokens = TokenSet(features=feats, grid=(4, 7, 7))
    for retain in (0.1, 0.3):
        out = STTM(retain=retain)(tokens)
        assert out.keep.numel() <= keep_count(retain, 196)
    full = STTM(retain=1.0)(tokens)
    assert full.keep.numel() == 196 and full.values is None
    assert STTM(start_layer=2).stages()[0].stage == "layer"  # in-layer: tests/test_sttm_layer.py
    with pytest.raises(ValueError, match="sa_tree_root_level"):
        STTM(sa_tree_root_level=-1)


# --------------------------------------------------------------------------------------- VidCom2


def test_vidcom2_counts():
    shares = torch.tensor([0.1, 0.3, 0.5, 0.05, 0.2])
    # reference rounding: max(1, round(min(s, 1) * n)), halves to even
    want = [max(1, int(np.round(min(float(s), 1.0) * 20))) for s in shares.float()]
    assert reference_counts(shares, 20).tolist() == want
    for budget in (3, 5, 17, 40, 100):
        counts = exact_counts(shares, 20, budget)
        assert int(counts.sum()) == budget and int(counts.max()) <= 20
        if budget >= 5:
            assert int(counts.min()) >= 1
    counts = exact_counts(shares, 20, 17)  # unclamped: within one token of the proportional share
    target = shares.double() / shares.double().sum() * 17
    assert bool(((counts.double() - target).abs() < 1).all())


def test_vidcom2_exact_budget_and_identity():
    feats = _smooth_video(6, 5, 5, 16, seed=6)
    tokens = TokenSet(features=feats, grid=(6, 5, 5))
    for retain in (0.1, 0.33, 0.7):
        assert VidCom2(retain=retain)(tokens).keep.numel() == keep_count(retain, 150)
    assert VidCom2(retain=1.0)(tokens).keep.numel() == 150


# -------------------------------------------------------------------------------------- TS-LLaVA


def test_linspace_index_reference_default():
    n, k = 50 * 576, 2880
    exact = np.linspace(0, n - 1, k)  # float64
    got = linspace_index(n, k).numpy()
    # the reference rounds torch's float32 linspace: equal to float64 rounding except near halves
    near_half = np.abs(exact - np.floor(exact) - 0.5) < 1e-2
    assert near_half.sum() < 100 and (got[~near_half] == np.round(exact[~near_half])).all()
    assert (np.abs(got[near_half] - exact[near_half]) <= 0.51).all()
    assert got[0] == 0 and got[-1] == n - 1 and (np.diff(got) > 0).all()
    assert linspace_index(10, 10).tolist() == list(range(10))


def test_thumbnail_tiling_by_hand():
    assert best_grid(6) == (3, 2) and best_grid(4) == (2, 2) and best_grid(8) == (4, 2)
    frames = torch.randn(7, 3, 12, 12)
    got = tile_thumbnail(frames, 6)
    picked = [0, 1, 2, 4, 5, 6]  # round(linspace(0, 6, 6)) = round([0, 1.2, 2.4, 3.6, 4.8, 6])
    for k, f in enumerate(picked):
        r, c = divmod(k, 2)
        tile = F.adaptive_avg_pool2d(frames[f], (4, 6))  # area resize = exact block means here
        torch.testing.assert_close(got[:, 4 * r : 4 * r + 4, 6 * c : 6 * c + 6], tile, atol=1e-6, rtol=0)
    odd = tile_thumbnail(torch.randn(6, 3, 10, 10), 6)  # 10 // 3 = 3 rows per tile: one zero row left
    assert bool((odd[:, 9] == 0).all())


def test_ts_llava_with_a_given_thumbnail():
    feats = torch.randn(4, 9, 8)
    thumb = torch.randn(5, 8)
    tokens = TokenSet(features=feats, grid=(4, 3, 3), signals={"thumbnail6": thumb})
    out = TSLLaVA(retain=0.5, thumbnail=True)(tokens)
    k = keep_count(0.5, 36) - 5
    sampled = linspace_index(36, k)
    assert torch.equal(out.keep, torch.arange(k + 5))
    torch.testing.assert_close(out.values, torch.cat([feats.reshape(36, 8)[sampled], thumb]))
    assert torch.equal(out.assign[sampled], torch.arange(k))
    first = TSLLaVA(retain=0.5, thumbnail=True, thumbnail_first=True)(tokens)
    torch.testing.assert_close(first.values[:5], thumb)
    with pytest.raises(ValueError, match="raise retain"):
        TSLLaVA(retain=0.1, thumbnail=True)(tokens)
    with pytest.raises(ValueError, match="thumbnail_frames"):
        TSLLaVA(thumbnail_frames=5)


def test_parameter_errors_name_the_parameter():
    with pytest.raises(ValueError, match="not both"):
        LlavaScissor(retain=0.3, tau=0.9)
    with pytest.raises(ValueError, match="epsilon"):
        LlavaScissor(epsilon=0)
    with pytest.raises(ValueError, match="tau"):
        LlavaScissor(tau=1.5)
    with pytest.raises(ValueError, match="retain"):
        VidCom2(retain=0)
    with pytest.raises(ValueError, match="exact_budget"):
        VidCom2(exact_budget="yes")


# ------------------------------------------------------------------------------ through generate

STEPS = 6
POLICIES = {
    "llava_scissor": {"tau": 0.9},
    "sttm": {"sa_tree_thresh": 0.6, "sa_tree_temporal_thresh": 0.6},
    "vidcom2": {"retain": 0.3},
    "ts_llava": {"retain": 0.3},
}
FULL = {"llava_scissor": {"retain": 1.0}, "sttm": {"retain": 1.0}, "vidcom2": {"retain": 1.0}, "ts_llava": {"retain": 1.0}}


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_matches_manual_reference(family):
    model, _ = tiny(family)
    inputs, captured = reference_inputs(family)
    with torch.no_grad():
        plain = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False)
    for name, params in POLICIES.items():
        got = compressed_greedy(model, inputs, STEPS, name, **params)
        records = got[2]
        assert len(records) == 2 and all(r.video_tokens_after < r.video_tokens_before for r in records), name
        assert_rows_match(model, captured, inputs, got, STEPS, note=name)
        if name in ("llava_scissor", "sttm"):  # merging: every grid token went into one output
            video = records[0].videos[0]
            assert bool((video.assign >= 0).all()) and int(video.assign.max()) == video.keep.numel() - 1
    for name, params in FULL.items():
        with tc.compressed(model, name, **params), torch.no_grad():
            same = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False)
        assert torch.equal(same, plain), name


@pytest.mark.parametrize("family", ["llava_onevision", "video_llava"])
def test_ts_llava_thumbnail_through_generate(family):
    model, _ = tiny(family)
    inputs, captured = reference_inputs(family)
    got = compressed_greedy(model, inputs, STEPS, "ts_llava", retain=0.5, thumbnail=True)
    records = got[2]
    assert len(records) == 2
    assert_rows_match(model, captured, inputs, got, STEPS)
    inner = model.model
    frames = inputs["pixel_values_videos"]
    for row in range(2):
        rec = records[row]
        # the last tokens of the rewritten span are the thumbnail, encoded here by hand
        f = frames[row]
        rows_, cols_ = 3, 2
        th, tw = f.shape[-2] // rows_, f.shape[-1] // cols_
        pick = [round(v) for v in np.linspace(0, f.shape[0] - 1, 6)]
        image = torch.zeros_like(f[0])
        for k, idx in enumerate(pick):
            r, c = divmod(k, cols_)
            image[:, r * th : (r + 1) * th, c * tw : (c + 1) * tw] = F.interpolate(f[idx][None], (th, tw), mode="area")[0]
        with torch.no_grad():
            pooled = inner.get_video_features(pixel_values_videos=image[None, None]).pooler_output[0]
        want = pooled[:-1] if family == "llava_onevision" else pooled[1:]
        m = rec.videos[0].info["thumbnail_tokens"]
        grid_kept = torch.isin(rec.kept, rec.videos[0].positions)
        torch.testing.assert_close(rec.values[grid_kept][-m:], want, atol=1e-5, rtol=0)


def test_thumbnail_is_refused_where_the_adapter_cannot_encode_it():
    model, _ = tiny("qwen2_5_vl")
    with pytest.raises(MissingSignalError, match="thumbnail6"):
        tc.wrap(model, "ts_llava", retain=0.5, thumbnail=True)
    assert not tc.is_wrapped(model)


# ------------------------------------------------------------------------------------- VisionZip


def test_visionzip_core_by_hand():
    g = torch.Generator().manual_seed(7)
    t, n, d = 2, 12, 5
    sal, keys, x = torch.rand(t, n, generator=g), torch.randn(t, n, 3, generator=g), torch.randn(t, n, d, generator=g)
    out = VisionZip(dominant=4, contextual=3)(TokenSet(features=x, grid=(t, 3, 4), signals={"vision_saliency": sal, "vision_keys": keys}))
    values = dict(zip(out.keep.tolist(), out.values))
    for f in range(t):
        dom = sorted(sal[f].argsort(descending=True)[:4].tolist())
        rest = [i for i in range(n) if i not in dom]  # 8 left, step 8 // 3 = 2 -> targets rest[0], rest[2], rest[4]
        targets = [rest[0], rest[2], rest[4]]
        kn = keys[f] / keys[f].norm(dim=-1, keepdim=True)
        members = {j: [] for j in targets}
        for i in rest:
            if i not in targets:
                members[max(targets, key=lambda j: (float(kn[i] @ kn[j]), -j))].append(i)
        for i in dom:
            torch.testing.assert_close(values[f * n + i], x[f, i])
        for j in targets:
            want = x[f, j] + (x[f, members[j]].mean(0) if members[j] else 0)
            torch.testing.assert_close(values[f * n + j], want, atol=1e-6, rtol=0)
            assert all(int(out.assign[f * n + i]) == int(out.assign[f * n + j]) for i in members[j])
    assert sorted(values) == out.keep.tolist() and out.keep.numel() == t * 7


class VisionZipSpy(Spy):
    needs = frozenset({"vision_saliency", "vision_keys"})


@pytest.mark.parametrize("family", ["llava_onevision", "llava_next_video", "video_llava"])
def test_visionzip_signals_equal_eager_attention(family):
    model, _ = tiny(family, "eager")
    inputs = batch_inputs(family, 2, attn="eager")
    spy = VisionZipSpy()
    with tc.compressed(model, spy), torch.no_grad():
        model(**inputs)
    inner = model.model
    tower = inner.video_tower if family == "video_llava" else inner.vision_tower
    layers = getattr(tower, "vision_model", tower).encoder.layers
    index = inner.config.vision_feature_layer % (len(layers) + 1) - 1
    keys = []
    handle = layers[index].self_attn.k_proj.register_forward_hook(lambda m, a, o: keys.append(o))
    pixels = inputs["pixel_values_videos"].flatten(0, 1)
    try:
        with torch.no_grad():
            out = tower(pixels, output_attentions=True)
    finally:
        handle.remove()
    attn = out.attentions[index]  # (B*F, H, S, S), eager probabilities
    heads = attn.shape[1]
    k = keys[0].reshape(keys[0].shape[0], keys[0].shape[1], heads, -1).mean(2)
    if family == "llava_onevision":
        sal, k = attn.mean(1).mean(1), k
    else:
        sal, k = attn[:, :, 0, 1:].sum(1), k[:, 1:]
    side = math.isqrt(sal.shape[1])
    grid = torch.cat([sal[:, None], k.transpose(1, 2)], 1).reshape(sal.shape[0], -1, side, side)
    if family == "llava_onevision":
        grid = F.interpolate(grid, size=(math.ceil(side / 2),) * 2, mode="bilinear")
    elif family == "llava_next_video":
        grid = F.avg_pool2d(grid, model.config.spatial_pool_stride)
    grid = grid.flatten(2)
    frames = inputs["pixel_values_videos"].shape[1]
    assert len(spy.signals) == 2
    for v, signals in enumerate(spy.signals):
        rows = slice(v * frames, (v + 1) * frames)
        torch.testing.assert_close(signals["vision_saliency"], grid[rows, 0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(signals["vision_keys"], grid[rows, 1:].transpose(1, 2), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["llava_onevision", "llava_next_video", "video_llava"])
def test_visionzip_through_generate(family):
    model, _ = tiny(family)
    inputs, captured = reference_inputs(family)
    with torch.no_grad():
        plain = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False)
    got = compressed_greedy(model, inputs, STEPS, "visionzip", dominant=3, contextual=2)
    assert len(got[2]) == 2
    for rec in got[2]:
        video = rec.videos[0]
        assert video.keep.numel() == video.grid[0] * 5
    assert_rows_match(model, captured, inputs, got, STEPS)
    with tc.compressed(model, "visionzip", retain=1.0), torch.no_grad():
        assert torch.equal(model.generate(**inputs, max_new_tokens=STEPS, do_sample=False), plain)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "internvl", "smolvlm"])
def test_visionzip_refused_without_tower_signals(family):
    model, _ = tiny(family)
    with pytest.raises(MissingSignalError, match="vision_keys"):
        tc.wrap(model, "visionzip", retain=0.3)
    assert not tc.is_wrapped(model)


ONE_D = [f for f in FAMILIES if f not in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")]


@torch.no_grad()
def _step_logits(model, captured, input_ids, records, row, tokens, compacted):
    """Logits of every decode step when the language model is fed ``tokens`` by hand, positions 0..K-1, K, K+1, ..."""
    lm = tc.adapters.adapter_for(model).language_model(model)
    embeds, pos, extra = row_inputs(model, captured, input_ids, records, row, compacted)
    cache = DynamicCache(config=lm.config)
    out = lm(inputs_embeds=embeds, position_ids=pos, cache=cache, use_cache=True, **extra)
    logits = [model.get_output_embeddings()(out.last_hidden_state[:, -1])[0]]
    last = pos[..., -1:]
    for tok in tokens[:-1]:
        last = last + 1
        out = lm(inputs_embeds=model.get_input_embeddings()(tok.reshape(1, 1)), position_ids=last, cache=cache, use_cache=True)
        logits.append(model.get_output_embeddings()(out.last_hidden_state[:, -1])[0])
    return torch.stack(logits).float()


@pytest.mark.parametrize("family", ONE_D)
def test_compacted_positions_match_a_renumbered_reference(family):
    """positions="compacted": the shortened prompt is numbered 0..K-1 per row and decoding continues from K."""
    model, _ = tiny(family)
    inputs = batch_inputs(family, 2)
    captured = capture_lm_inputs(model, inputs)
    with tc.compressed(model, "sttm", sa_tree_thresh=0.6, sa_tree_temporal_thresh=0.6, positions="compacted"):
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, output_logits=True, return_dict_in_generate=True)
        records = tc.last_record(model)
    length = inputs["input_ids"].shape[1]
    for row in range(2):
        rec = records[row]
        real = rec.slots >= 0
        real[real.clone()] = inputs["attention_mask"][row, rec.slots[real]].bool()  # not padding
        assert torch.equal(rec.position_ids[real], torch.arange(int(real.sum())))
        tokens = out.sequences[row, length:]
        want = _step_logits(model, captured, inputs["input_ids"], records, row, tokens, compacted=True)
        got = torch.stack([step[row] for step in out.logits]).float()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_compacted_positions_are_ignored_for_mrope():
    model, _ = tiny("qwen2_5_vl")
    inputs = batch_inputs("qwen2_5_vl", 2)
    captured = capture_lm_inputs(model, inputs)
    with tc.compressed(model, "vidcom2", retain=0.3, positions="compacted"):
        first, _ = wrapped_greedy(model, inputs, 1)
        records = tc.last_record(model)
    ref_first, _ = manual_greedy(model, captured, inputs["input_ids"], records, 0, 1)  # original M-RoPE ids
    torch.testing.assert_close(first[0], ref_first, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="positions"):
        VidCom2(positions="renumbered")


def test_compacted_positions_in_a_manual_decode_loop():
    model, _ = tiny("llava_onevision")
    inputs = batch_inputs("llava_onevision", 1)
    captured = capture_lm_inputs(model, inputs)
    with tc.compressed(model, "llava_scissor", tau=0.9, positions="compacted"), torch.no_grad():
        out = model(**inputs, use_cache=True)
        records = tc.last_record(model)
        tokens, cache = [int(out.logits[0, -1].argmax())], out.cache
        for _ in range(3):
            step = model(input_ids=torch.tensor([[tokens[-1]]]), cache=cache, use_cache=True)
            cache = step.cache
            tokens.append(int(step.logits[0, -1].argmax()))
    ref_first, ref_tokens = manual_greedy(model, captured, inputs["input_ids"], records, 0, 4, compacted=True)
    torch.testing.assert_close(out.logits[0, -1].float(), ref_first, atol=1e-5, rtol=0)
    assert same_greedy(torch.tensor(tokens), ref_tokens, model.generation_config.eos_token_id)


def _benchmark_references():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "reference_more.py"
    spec = importlib.util.spec_from_file_location("reference_more", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_transcriptions_keep_what_the_policies_keep():
    """The benchmark's step-by-step transcriptions (numpy union-find, per-frame loops) agree with the policies."""
    ref = _benchmark_references()
    feats = _smooth_video(4, 6, 6, 16, seed=8, noise=0.1)
    tokens = TokenSet(features=feats, grid=(4, 6, 6))
    assert torch.equal(ref.llava_scissor_reference(tokens, 0.0), LlavaScissor(tau=ref.SCISSOR_TAU)(tokens).keep)
    for r in (0.1, 0.3):
        assert torch.equal(ref.vidcom2_reference(tokens, r), VidCom2(retain=r, exact_budget=False)(tokens).keep)
        assert torch.equal(ref.ts_llava_reference(tokens, r), TSLLaVA(retain=r)(tokens).keep)
    g = torch.Generator().manual_seed(9)
    signals = {"vision_saliency": torch.rand(4, 36, generator=g), "vision_keys": torch.randn(4, 36, 8, generator=g)}
    with_signals = TokenSet(features=feats, grid=(4, 6, 6), signals=signals)
    for r in (0.2, 0.5):
        assert torch.equal(ref.visionzip_reference(with_signals, r), VisionZip(retain=r)(with_signals).keep)


@pytest.mark.parametrize("name,params", [("visionzip", {"retain": 0.3}), ("ts_llava", {"retain": 0.5, "thumbnail": True})])
def test_vision_signals_follow_beam_expansion(name, params):
    """With beams, generate repeats each encoded video: every copy gets the video's own signals."""
    model, _ = tiny("llava_onevision")
    inputs = batch_inputs("llava_onevision", 2)
    with tc.compressed(model, name, **params), torch.no_grad():
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
        single = tc.last_record(model)
        model.generate(**inputs, max_new_tokens=2, num_beams=2, do_sample=False)
        beams = tc.last_record(model)
    assert len(beams) == 4
    for row in range(4):
        want = single[row // 2]
        assert torch.equal(beams[row].videos[0].keep, want.videos[0].keep)
        torch.testing.assert_close(beams[row].values, want.values, atol=1e-6, rtol=0)
