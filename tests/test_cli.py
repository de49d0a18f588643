"""The demo command: argument checks and one offline run on the tiny model."""

from __future__ import annotations

import pytest

import tokcompress as tc
from tokcompress import cli

from conftest import batch_inputs, tiny


def test_policies_command_lists_registry(capsys):
    assert cli.main(["policies"]) == 0
    assert capsys.readouterr().out.split() == tc.available_policies()


def test_unknown_command_and_help(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert cli.main([]) == 0 and "demo" in capsys.readouterr().out


def test_demo_refuses_bad_policy_and_retain_before_loading():
    with pytest.raises(tc.UnknownPolicyError):
        cli.demo(["--policy", "nope"])
    with pytest.raises(ValueError, match="retain"):
        cli.demo(["--retain", "0"])
    with pytest.raises(SystemExit, match="--video needs --model"):
        cli.demo(["--video", "clip.mp4"])


def test_run_demo_reports_counts_timings_and_answers():
    model, processor = tiny("llava_onevision")
    inputs = batch_inputs("llava_onevision", 1)
    runs = cli.run_demo(model, processor, inputs, "uniform", 0.25, max_new_tokens=3, repeats=1)
    none, pruned = runs
    assert none.policy.startswith("none") and pruned.policy == "uniform(retain=0.25)"
    assert none.tokens_before == none.tokens_after == pruned.tokens_before == 129
    assert pruned.tokens_after == 8 * 4 + 1  # 4 of 16 tokens per frame, 8 frames, + newline
    assert none.ttft_s > 0 and pruned.ttft_s > 0
    assert isinstance(pruned.answer, str)
    assert not tc.is_wrapped(model)
