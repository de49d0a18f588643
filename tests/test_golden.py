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
    out = {"keep": res.keep, "tokens": res.values, "segments": torch.tensor(res.info["segments"], dtype=torch.long)}
    if case["layout"] == "llava_video":  # a row's newline is kept iff one token of the row is
        out["newline_rows"] = torch.unique(res.keep // w)
    return out


#: case["policy"] -> function(case) -> outputs keyed as in case["expected"] (a subset is fine).
GOLDEN: dict[str, Callable[[Case], Outputs]] = {
    "dpc_knn": _dpc_knn,
    "fastvid": _fastvid,
    "holitom": _holitom,
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
