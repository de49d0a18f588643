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


#: case["policy"] -> function(case) -> outputs keyed as in case["expected"] (a subset is fine).
GOLDEN: dict[str, Callable[[Case], Outputs]] = {
    "evs": _evs,
    "divprune": _divprune,
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
