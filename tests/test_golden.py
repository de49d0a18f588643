"""Reference fidelity: every golden case under TOKCOMPRESS_GOLDEN_DIR must be reproduced.

A case is a dict (see tests/data/golden/README.md) with the reference's own parameters, inputs and
outputs. ``GOLDEN`` maps a case's ``policy`` field to a function that runs the tokcompress
implementation on the case and returns the outputs to compare. Indices must match exactly,
embeddings to 1e-5 absolute. A case whose policy is not in the table is skipped with the reason.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

GOLDEN_DIR = Path(os.environ.get("TOKCOMPRESS_GOLDEN_DIR", Path(__file__).parent / "data" / "golden"))
CASES = sorted(GOLDEN_DIR.rglob("*.pt"))
ATOL = 1e-5

Case = dict[str, Any]
Outputs = dict[str, torch.Tensor]


def _evs(case: Case) -> Outputs:
    from tokcompress.policies.evs import EVS, evs_retention_mask
    from tokcompress.tokens import TokenSet

    features, q = case["inputs"]["features"], case["params"]["q"]
    t, h, w, _ = features.shape
    s = case["params"]["spatial_merge_size"]
    assert list(case["params"]["video_size_thw"]) == [t, h * s, w * s]
    # The policy's retain is 1 - q; its budget must come out as the reference's for this q.
    keep = EVS(retain=1 - q)(TokenSet(features=features, grid=(t, h, w))).keep
    return {"mask": evs_retention_mask(features, q), "keep": keep}


def _divprune(case: Case) -> Outputs:
    from tokcompress.policies.divprune import DivPrune, divprune, divprune_count
    from tokcompress.tokens import TokenSet

    features, ratio = case["inputs"]["features"], case["params"]["ratio"]
    t, h, w, d = features.shape
    x = features.reshape(-1, d)
    order = divprune(x, divprune_count(ratio, x.shape[0]))
    if order.numel() == 0:  # the core returns nothing; the policy would keep one token (documented clamp)
        keep = order
    else:
        keep = DivPrune(retain=ratio)(TokenSet(features=features, grid=(t, h, w))).keep
    return {"order": order, "keep": keep, "tokens": x[keep]}


def _llava_scissor(case: Case) -> Outputs:
    from tokcompress.policies.llava_scissor import LlavaScissor, scissor
    from tokcompress.tokens import TokenSet

    features, p = case["inputs"]["features"], case["params"]
    t, h, w, d = features.shape
    res = scissor(features.reshape(t, h * w, d), p["tau"], p["epsilon"])
    policy = LlavaScissor(tau=p["tau"], epsilon=p["epsilon"])(TokenSet(features=features, grid=(t, h, w)))
    assert torch.equal(policy.keep, res.keep) and torch.equal(policy.assign, res.assign)
    return {
        "tokens": policy.values,
        "s1_label": res.s1_label,
        "s1_counts": res.s1_counts,
        "s2_label": res.s2_label,
        "assign": policy.assign,
    }


def _vidcom2(case: Case) -> Outputs:
    from tokcompress.policies.vidcom2 import VidCom2, reference_counts, vidcom2_scores, vidcom2_select
    from tokcompress.tokens import TokenSet

    features, inputs, r = case["inputs"]["features"], case["inputs"], case["params"]["base_scale"]
    t, h, w, d = features.shape
    if case["layout"] == "qwen2_5_vl":
        s = case["params"]["spatial_merge_size"]
        assert inputs["video_grid_thw"].tolist() == [t, h * s, w * s]
    x = features.reshape(t, h * w, d)
    scores = vidcom2_scores(x, r)
    counts = reference_counts(scores.shares, h * w)
    keep = vidcom2_select(scores, counts)
    policy = VidCom2(retain=r, exact_budget=False)(TokenSet(features=features, grid=(t, h, w)))
    assert torch.equal(policy.keep, keep)
    flat = x.reshape(-1, d)
    if case["layout"] == "llava_video":  # per frame: kept tokens, then the frame's h newline tokens
        src = torch.cat([torch.cat([keep[keep // (h * w) == f], torch.full((h,), -1)]) for f in range(t)])
    else:
        src = keep
    tokens = torch.where((src >= 0)[:, None], flat[src.clamp(min=0)], inputs.get("newline", torch.zeros(d)))
    return {
        "keep": policy.keep,
        "src": src,
        "tokens": tokens,
        "k_per_frame": counts,
        "channels": scores.channels,
        "vid_score": scores.vid_score,
        "frame_score": scores.frame_score,
        "frame_prob": scores.frame_prob,
        "scales": scores.shares.clamp(max=1.0),
    }


def _sttm(case: Case) -> Outputs:
    from tokcompress.policies.sttm import STTM, sttm
    from tokcompress.tokens import TokenSet

    features, p = case["inputs"]["features"], case["params"]
    assert p["sa_tree_weighted_avg"] is False
    t, h, w, _ = features.shape
    temporal = p["sa_tree_temporal_thresh"]
    res = sttm(features, p["sa_tree_thresh"], temporal if temporal > 0 else None, p["sa_tree_root_level"])
    policy = STTM(
        sa_tree_thresh=p["sa_tree_thresh"], sa_tree_temporal_thresh=temporal, sa_tree_root_level=p["sa_tree_root_level"]
    )(TokenSet(features=features, grid=(t, h, w)))
    assert torch.equal(policy.keep, res.keep) and torch.equal(policy.assign, res.assign)
    return {
        "tokens": policy.values,
        "keep": policy.keep,
        "tlbr": res.tlbr,
        "num_patch": res.num_patch,
        "node_tlbr": res.node_tlbr,
        "node_rep": res.node_rep,
    }


def _visionzip(case: Case) -> Outputs:
    from tokcompress.policies.visionzip import VisionZip, visionzip
    from tokcompress.tokens import TokenSet

    inputs, p = case["inputs"], case["params"]
    features, cls = inputs["features"], inputs["cls"]
    t, h, w, d = features.shape
    n = h * w
    saliency = inputs["cls_attn"][:, :, 1:].sum(1)  # CLS row summed over heads
    keys = inputs["keys"].mean(1)[:, 1:]  # keys averaged over heads, patches only
    x = features.reshape(t, n, d)
    dom_patches, ctx = p["dominant"] - 1, p["contextual"]  # the reference's dominant counts CLS
    res = visionzip(saliency, keys, x, dom_patches, ctx)
    signals = {"vision_saliency": saliency, "vision_keys": keys}
    policy = VisionZip(dominant=dom_patches, contextual=ctx)(TokenSet(features=features, grid=(t, h, w), signals=signals))
    assert torch.equal(policy.keep, res.keep)
    frame = torch.arange(t)[:, None] * n
    tokens = torch.cat([torch.cat([cls[:, None], x.gather(1, res.dominant[..., None].expand(-1, -1, d)), res.contextual], 1)])
    kind = torch.tensor([0] + [1] * dom_patches + [2] * ctx).repeat(t)
    src = torch.cat([torch.full((t, 1), -1), res.dominant + frame, res.targets + frame], 1)
    return {
        "tokens": tokens.reshape(-1, d),
        "keep": policy.keep,
        "kind": kind,
        "src": src.reshape(-1),
        "all_indices": torch.cat([torch.zeros(t, 1, dtype=torch.long), res.dominant + 1], 1),
        "ctx_assign": res.ctx_assign,
    }


def _dpc_knn(case: Case) -> Outputs:
    from tokcompress.cluster import dpc_knn

    res = dpc_knn(case["inputs"]["x"], case["params"]["k"], case["params"]["cluster_num"])
    # dist_matrix is not compared: its diagonal is torch.cdist round-off in the reference (see the README)
    return {"index": res.index, "keep": res.centers}


def _holitom(case: Case) -> Outputs:
    from tokcompress.policies.holitom import holitom_outer

    p, x = case["params"], case["inputs"]
    t, h, w, dim = x["features"].shape
    res = holitom_outer(
        x["features"].reshape(t, h * w, dim),
        x["attn"],
        retain=p["RETAIN_RATIO"],
        tau=p["T"],
        beta=p["BETA"],
        d=p["D"],
        k=p["K"],
        max_window_size=p["MAX_WINDOW_SIZE"],
        no_beta=p["NO_BETA"] != "0",
    )
    layout = p["mm_newline_position"]
    out = res.emitted(layout, (h, w), x.get("newline"))
    out["windows"] = torch.tensor(res.windows, dtype=torch.long)
    out["static_mask"] = res.static_mask
    out["total_reduced"] = torch.tensor(float(res.total_reduced), dtype=torch.float64)
    out["retain_ratio"] = torch.tensor(res.retain_ratio, dtype=torch.float64)
    return out


def _fastvid(case: Case) -> Outputs:
    from tokcompress.policies.fastvid import FastVID

    p, x = case["params"], case["inputs"]
    t, h, w, dim = x["features"].shape
    policy = FastVID(
        retain=p["retention_ratio"],
        DySeg_c=p["DySeg_c"],
        DySeg_tau=p["DySeg_tau"],
        STPrune_d=p["STPrune_d"],
        DTM_p=p["DTM_p"],
        DTM_beta=p["DTM_beta"],
    )
    res = policy.run(x["features"].reshape(t, h * w, dim), x["frame_global"], x["frame_attn"], case["layout"])
    inclusive = [(s, e - 1) for s, e in res.info["segments"]]  # the reference's (first, last)
    out = {"keep": res.keep, "tokens": res.values, "segments": torch.tensor(inclusive, dtype=torch.long)}
    if case["layout"] == "llava_video":  # a row's newline is kept iff one token of the row is
        out["newline_rows"] = torch.unique(res.keep // w)
    return out


#: case["policy"] -> function(case) -> outputs keyed as in case["expected"] (a subset is fine).
GOLDEN: dict[str, Callable[[Case], Outputs]] = {
    "divprune": _divprune,
    "dpc_knn": _dpc_knn,
    "evs": _evs,
    "fastvid": _fastvid,
    "holitom": _holitom,
    "llava_scissor": _llava_scissor,
    "sttm": _sttm,
    "vidcom2": _vidcom2,
    "visionzip": _visionzip,
}


@pytest.mark.parametrize("path", CASES, ids=[str(p.relative_to(GOLDEN_DIR)) for p in CASES])
def test_golden_case(path: Path) -> None:
    case = torch.load(path, weights_only=True)
    assert case["format"] == "tokcompress-golden/1"
    run = GOLDEN.get(case["policy"])
    if run is None:
        pytest.skip(f"policy {case['policy']!r} is not implemented in tokcompress yet")
    got = run(case)
    assert got, "the golden runner returned nothing to compare"
    for key, value in got.items():
        want = case["expected"][key]
        if want.dtype in (torch.int64, torch.int32, torch.bool):
            assert torch.equal(value.cpu().to(want.dtype), want), f"{key} differs from the reference"
        else:
            assert value.shape == want.shape, f"{key}: shape {tuple(value.shape)} != {tuple(want.shape)}"
            torch.testing.assert_close(value.cpu().float(), want.float(), atol=ATOL, rtol=0, msg=f"{key} differs")


def test_golden_dir_has_cases() -> None:
    assert CASES, f"no golden cases under {GOLDEN_DIR}"


# -- in-LLM stages: FastV, HoliTom inner, DyCoke (TTM and KV), PruneVid inner ---------------------------------
# Their cases hold the signals the reference reads (attention rows, hidden states); the glue hands them to the
# policies as LayerTokens / DecodeTokens, the same objects the engine builds from a running model.


def _span(case: Case) -> tuple[int, int, int]:
    x = case["inputs"]
    length = x["seq_len"] if "seq_len" in x else (x["attn_row"] if "attn_row" in x else x["h"]).shape[0]
    return int(x["vis_start"]), int(x["vis_len"]), int(length)


def _with_text(kept: torch.Tensor, start: int, n: int, length: int) -> torch.Tensor:
    """Original positions kept: the text before and after the visual span, and the kept visual tokens."""
    return torch.cat([torch.arange(start), kept + start, torch.arange(start + n, length)])


def _layer_tokens(hidden: torch.Tensor, attention: torch.Tensor, group: torch.Tensor | None = None):
    from tokcompress.tokens import LayerTokens

    n = attention.shape[-1]
    zeros = torch.zeros(n, dtype=torch.long)
    return LayerTokens(hidden=hidden, attention=attention, positions=torch.arange(n), video=zeros, frame=zeros, group=group)


def _golden_fastv(case: Case) -> Outputs:
    from tokcompress.policies.fastv import FastV

    start, n, length = _span(case)
    row = case["inputs"]["attn_row"]
    policy = FastV(retain=1.0 - case["params"]["FASTV_r"], layer=case["params"]["FASTV_k"])
    assert policy.budget(n) == case["params"]["fast_v_attention_rank"]
    result = policy.select(_layer_tokens(torch.zeros(n, 1), row[start : start + n][None, None]))
    keep = _with_text(result.keep, start, n, length)
    mask = torch.zeros(length, dtype=torch.bool)
    mask[keep] = True
    return {"keep": keep, "mask": mask}


def _golden_holitom_inner(case: Case) -> Outputs:
    from tokcompress.policies.holitom_inner import HoliTomInner, holitom_inner_merge

    start, n, length = _span(case)
    h, row = case["inputs"]["h"], case["inputs"]["attn_row"]
    policy = HoliTomInner(retain=1.0 - case["params"]["HOLITOM_r"], layer=case["params"]["HOLITOM_k"])
    result = policy.select(_layer_tokens(h[start : start + n], row[start : start + n][None, None]))
    merged = h.clone()
    if result.values is not None:
        merged[result.keep + start] = result.values
    keep = _with_text(result.keep, start, n, length)
    core = holitom_inner_merge(h[start : start + n], row[start : start + n], policy.budget(n))
    return {"keep": keep, "hidden": merged[keep], "dropped": core.dropped + start, "merge_target": core.target + start}


def _golden_dycoke_ttm(case: Case) -> Outputs:
    from tokcompress.policies.dycoke import DyCokeTTM
    from tokcompress.tokens import TokenSet

    features = case["inputs"]["features"]
    t, h, w, _ = features.shape
    assert case["params"]["num_tokens_per_frame"] == h * w
    result = DyCokeTTM(retain=1.0 - case["params"]["merging_ratio"])(TokenSet(features=features, grid=(t, h, w)))
    order = result.info["order"]
    return {"keep": result.keep, "order": order, "tokens": features.reshape(t * h * w, -1)[order]}


def _golden_dycoke_kv(case: Case) -> Outputs:
    from tokcompress.policies.dycoke import DyCokeKV
    from tokcompress.tokens import DecodeTokens

    x = case["inputs"]
    start, n = int(x["image_token_start_index"]), int(x["image_token_length"])
    policy = DyCokeKV(retain=1.0 - case["params"]["dycoke_p"], layer=case["params"]["dycoke_l"])
    rows, lengths = x["attn_rows"], x["row_len"]
    pruned = torch.zeros(rows.shape[0], dtype=torch.bool)
    index = torch.full(rows.shape, -1, dtype=torch.long)
    similarity = torch.zeros(rows.shape[0], dtype=torch.float64)
    memory = None  # the reference keeps it across samples too (case_03), so the glue does
    for i in range(rows.shape[0]):
        visual = rows[i, start : start + n]
        tokens = DecodeTokens(attention=visual[None], available=torch.ones(n, dtype=torch.bool), positions=torch.arange(n), step=i)
        choice = policy.step(tokens, memory)
        memory = choice.memory
        similarity[i] = choice.info["similarity"]
        if choice.keep is not None:
            pruned[i] = True
            kept = _with_text(choice.keep, start, n, int(lengths[i]))
            index[i, : kept.numel()] = kept
    return {"pruned": pruned, "kv_index": index, "similarity": similarity}


def _golden_prunevid_inner(case: Case) -> Outputs:
    from tokcompress.policies.prunevid import PruneVidInner

    start, n, length = _span(case)
    x = case["inputs"]
    labels, label = [], 0
    for static, dynamic, frames in zip(x["static_sizes"].tolist(), x["dynamic_sizes"].tolist(), x["window_sizes"].tolist()):
        labels += [label] * static  # the window's static tokens, then each frame's dynamic tokens
        labels += [label + 1 + f for f in range(frames) for _ in range(dynamic // frames)]
        label += frames + 1
    policy = PruneVidInner(retain=case["params"]["alpha"], selected_layer=case["params"]["selected_layer"])
    attention = x["attn_text_to_video"]
    result = policy.select(_layer_tokens(torch.zeros(n, 1), attention, torch.tensor(labels)))
    cut = policy.resolve_layer(depth=10**6)  # layers 0 .. selected_layer have their cache cut
    return {"keep": _with_text(result.keep, start, n, length), "n_cache_layers_pruned": torch.tensor(cut)}


GOLDEN.update(
    {
        "fastv": _golden_fastv,
        "holitom_inner": _golden_holitom_inner,
        "dycoke_ttm": _golden_dycoke_ttm,
        "dycoke_kv": _golden_dycoke_kv,
        "prunevid_inner": _golden_prunevid_inner,
    }
)


def _golden_prunevid_outer(case: Case) -> Outputs:
    from tokcompress.policies.prunevid import PruneVidOuter
    from tokcompress.tokens import TokenSet

    p, features = case["params"], case["inputs"]["features"]
    t, h, w, _ = features.shape
    assert p["num_frames"] == t and p["pooling_shape"][1] * p["pooling_shape"][2] == h * w
    policy = PruneVidOuter(retain=p["cluster_ratio"], tau=p["tau"], temporal_segment_ratio=p["temporal_segment_ratio"], k=p["k"])
    result = policy(TokenSet(features=features, grid=(t, h, w)))
    info = result.info
    emitted = torch.searchsorted(result.keep, info["order"])
    return {
        "tokens": result.values[emitted],
        "window_sizes": torch.tensor(info["window_sizes"]),
        "static_sizes": torch.tensor(info["static_sizes"]),
        "dynamic_sizes": torch.tensor(info["dynamic_sizes"]),
        "static_mask": info["static_mask"],
        "segment_labels_raw": torch.tensor(info["segment_labels_raw"]),
        "segment_labels": torch.tensor(info["segment_labels"]),
    }


GOLDEN["prunevid_outer"] = _golden_prunevid_outer


def _golden_framefusion(case: Case) -> Outputs:
    """Replays the reference's call sequence: each step reads ``h`` rows of the tokens that survived the last one."""
    from tokcompress.policies.framefusion import PRUNE, FrameFusion, FrameFusionState

    x, p = case["inputs"], case["params"]
    policy = FrameFusion(cost=p["cost"], similarity_lower_bound=p["similarity_lower_bound"], ratio_lower_bound=p["ratio_lower_bound"])
    patch_type = x["patch_type"]
    state = FrameFusionState()
    present = torch.arange(patch_type.shape[0])  # original positions entering the step
    offset = 0
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("keep", "hidden", "removed", "merge_target")}
    kinds, fractions, bounds, lengths, removed_len = [], [], [], [], []
    for length in x["step_len"].tolist():
        assert length == present.numel()
        h = x["h"][offset : offset + length].clone()
        offset += length
        vis = (patch_type[present] >= 0).nonzero().squeeze(1)
        keep_vis = torch.ones(length, dtype=torch.bool)
        target = present.clone()
        if state.wants_prune:
            step = policy.prune(state, x["attn_row"][vis], depth=28)
            kinds.append(PRUNE)
            fractions.append(float("nan"))
            bounds.append(step.ratio)
            kept = torch.zeros(vis.numel(), dtype=torch.bool)
            kept[step.keep] = True
            keep_vis[vis[~kept]] = False
            target[vis[~kept]] = -1
        else:
            step = policy.merge(state, h[vis], patch_type[present[vis]], depth=28)
            kinds.append(step.kind)
            fractions.append(step.fraction)
            bounds.append(step.upper_bound)
            h[vis[step.keep]] = step.values
            gone = torch.ones(vis.numel(), dtype=torch.bool)
            gone[step.keep] = False
            keep_vis[vis[gone]] = False
            target[vis] = present[vis[step.target]]
        removed = ~keep_vis
        out["removed"].append(present[removed])
        out["merge_target"].append(target[removed])
        removed_len.append(int(removed.sum()))
        present = present[keep_vis]
        out["keep"].append(present)
        out["hidden"].append(h[keep_vis])
        lengths.append(present.numel())
    assert state.merging_done == (kinds[-1] != 0), "the case ends while the policy's schedule does not (or the reverse)"
    torch.testing.assert_close(
        torch.tensor(fractions, dtype=torch.float64), case["expected"]["above_k_ratio"], equal_nan=True, atol=0, rtol=0
    )
    result = {k: torch.cat(v) for k, v in out.items()}
    result.update(
        step_kind=torch.tensor(kinds),
        upper_bound=torch.tensor(bounds, dtype=torch.float64),
        out_len=torch.tensor(lengths),
        removed_len=torch.tensor(removed_len),
        sparsity_list=torch.tensor(state.sparsity, dtype=torch.float64),
    )
    return result


GOLDEN["framefusion"] = _golden_framefusion
