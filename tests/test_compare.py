"""tokcompress.compare: rows that pandas and json take, counts that match the policies' budget rules."""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import tokcompress as tc  # noqa: E402
from tokcompress.policies.baselines import RandomKeep  # noqa: E402

from conftest import batch_inputs, tiny  # noqa: E402


@pytest.fixture(scope="module")
def result():
    model, processor = tiny("llava_onevision")
    inputs = [batch_inputs("llava_onevision", batch=2), batch_inputs("llava_onevision", batch=1)]
    rows = tc.compare(
        model,
        inputs,
        ["uniform", ("random", {"seed": 1}), RandomKeep(retain=0.3, seed=2), "none"],
        retains=[0.5, 0.25],
        processor=processor,
        max_new_tokens=3,
        repeats=1,
        warmup=0,
        progress=False,
    )
    assert not tc.is_wrapped(model)
    return rows


def test_rows_are_tidy_plain_dicts(result):
    # runs: uniform x 2, random x 2, the RandomKeep object once, none once = 6; rows: 3 per run
    assert len(result) == 6 * 3
    assert sorted({r["label"] for r in result}) == sorted(
        ["uniform(retain=0.5)", "uniform(retain=0.25)", "random(retain=0.5)", "random(retain=0.25)",
         "random(retain=0.3)", "none(retain=1)"]
    )
    df = pd.DataFrame(result)
    assert list(df.columns[:6]) == ["run", "policy", "label", "retain", "input", "row"]
    assert df.groupby("run").size().tolist() == [3] * 6
    json.dumps(list(result))  # plain Python values only
    assert all(isinstance(r["text"], str) for r in result)
    assert all(r["ttft_s"] > 0 and r["policy_s"] >= 0 and r["new_tokens"] == 3 for r in result)


def test_token_counts_follow_the_budget_rules(result):
    # tiny llava_onevision: 8 frames of 4x4 tokens + 1 newline kept by the engine = 129 placeholders.
    for r in result:
        assert r["tokens_before"] == 129
        expected = {
            "uniform(retain=0.5)": 8 * 8 + 1,  # keep_count(0.5, 16) = 8 per frame
            "uniform(retain=0.25)": 8 * 4 + 1,
            "random(retain=0.5)": 64 + 1,  # keep_count(0.5, 128)
            "random(retain=0.25)": 32 + 1,
            "random(retain=0.3)": 38 + 1,  # round_half_up(38.4)
            "none(retain=1)": 129,
        }[r["label"]]
        assert r["tokens_kept"] == expected, r["label"]
        assert r["kept_fraction"] == pytest.approx(expected / 129)


def test_rows_of_one_call_share_its_ttft_and_records_match(result):
    for run in {r["run"] for r in result}:
        first = [r for r in result if r["run"] == run and r["input"] == 0]
        assert len({r["ttft_s"] for r in first}) == 1
        record = result.records[(run, 0)]
        assert [rec.video_tokens_after for rec in record] == [r["tokens_kept"] for r in first]


def test_kept_and_plot(result):
    kept = result.kept(input=0, row=1)
    assert kept["uniform(retain=0.25)"].per_step().tolist() == [4] * 8
    assert len(kept) == 6
    fig = result.plot()
    left, right = fig.axes[:2]
    assert len(left.get_lines()) == 3  # one line per policy name: uniform, random, none
    assert len(right.patches) == 6  # one bar per run
    plt.close("all")


def test_greedy_text_matches_a_plain_wrapped_generate(result):
    model, processor = tiny("llava_onevision")
    inputs = batch_inputs("llava_onevision", batch=1)
    with tc.compressed(model, "uniform", retain=0.25):
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    text = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    row = next(r for r in result if r["label"] == "uniform(retain=0.25)" and r["input"] == 1)
    assert row["text"] == text


def test_bad_arguments():
    model, _ = tiny("llava_onevision")
    inputs = batch_inputs("llava_onevision", batch=1)
    with pytest.raises(ValueError, match="retains="):
        tc.compare(model, inputs, [("random", {"retain": 0.5})], progress=False)
    with pytest.raises(TypeError, match="name"):
        tc.compare(model, inputs, [3], progress=False)
    with pytest.raises(TypeError, match="input_ids"):
        tc.compare(model, [{"pixel_values": torch.zeros(1)}], ["uniform"], progress=False)
    with pytest.raises(ValueError, match="max_new_tokens"):
        tc.compare(model, inputs, ["uniform"], max_new_tokens=0, progress=False)
    with tc.compressed(model, "uniform", retain=0.5):
        with pytest.raises(ValueError, match="unwrapped"):
            tc.compare(model, inputs, ["uniform"], progress=False)
    with pytest.raises(tc.UnknownPolicyError):
        tc.compare(model, inputs, ["no-such-policy"], progress=False)
