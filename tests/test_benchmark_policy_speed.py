"""benchmarks/policy_speed.py runs every table entry on a tiny case, and each agrees with its transcription."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "policy_speed.py"


def test_policy_speed_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("policy_speed", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    sys.modules["policy_speed"] = bench  # dataclasses look their module up
    try:
        spec.loader.exec_module(bench)
    finally:
        del sys.modules["policy_speed"]
    out = tmp_path / "speed"
    assert bench.main(["--frames", "2", "--dims", "16", "--repeat", "1", "--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert {r["policy"] for r in rows} == set(bench.POLICIES)
    for r in rows:
        assert r["seconds"] > 0 and r["kept"] > 0
        if r["ref_status"] == "ran":
            assert r["same_keep"], f"{r['policy']} disagrees with its reference transcription"
    assert "| policy |" in out.with_suffix(".md").read_text()
