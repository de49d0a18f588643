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

#: case["policy"] -> function(case) -> outputs keyed as in case["expected"] (a subset is fine).
GOLDEN: dict[str, Callable[[Case], Outputs]] = {}


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
