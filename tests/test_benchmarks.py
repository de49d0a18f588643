"""benchmarks/: shapes, the TTFT benchmark end to end on a small config, the README generator, sweep helpers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import README_results, common, ttft, videoqa  # noqa: E402


@pytest.mark.parametrize("name", ["llava-onevision-qwen2-0.5b", "llava-onevision-qwen2-7b", "qwen2.5-vl-7b"])
def test_shapes_have_the_published_parameter_counts(name):
    """Built on the meta device with the real vocabulary: within 0.5% of the model cards' totals."""
    spec = common.load_shape(name)
    assert common.count_parameters(spec) == pytest.approx(spec["params_published"], rel=5e-3)


@pytest.mark.parametrize(
    "name, tokens",
    [("llava-onevision-qwen2-7b", 32 * 14 * 14 + 1), ("qwen2.5-vl-7b", 32 * 14 * 14)],
)
def test_shape_processors_give_the_real_token_counts(name, tokens):
    from tokcompress.hf import prepare_inputs
    from tokcompress.video import synthetic_video

    spec = common.load_shape(name)
    config, processor = common.shape_config(spec)
    size, frames = spec["video"]["size"], spec["video"]["frames"]
    inputs = prepare_inputs(processor, [synthetic_video(frames, size, size, seed=0)], ["q"])
    video_id = config.video_token_id
    assert int((inputs["input_ids"] == video_id).sum()) == tokens
    assert config.get_text_config().vocab_size < 1000  # tiny vocabulary, real layers
    assert config.get_text_config().num_hidden_layers == 28


def test_unknown_shape_names_the_shipped_ones():
    with pytest.raises(SystemExit, match="qwen2.5-vl-7b"):
        common.load_shape("no-such-shape")


@pytest.fixture(scope="module")
def ttft_run(tmp_path_factory, monkeypatch_module):
    out = tmp_path_factory.mktemp("ttft")
    # a broken parameter for one policy: its row must carry the error, the others their numbers
    monkeypatch_module.setitem(common.POLICY_PARAMS, "pool", {"no_such_parameter": 1})
    # an unreachable goal at this retain, so --profile has a row to profile
    monkeypatch_module.setattr(ttft, "GOAL_RETAIN", 0.5)
    monkeypatch_module.setattr(ttft, "GOAL_GAP", 0.0)
    argv = ["--frames", "2", "--policies", "uniform,none,pool,fastv", "--retain", "0.5", "--repeats", "1", "--warmup", "0",
            "--profile", "--out", str(out), "--tag", "default-cpu"]  # fmt: skip
    result = ttft.run(argv)
    return result, out


@pytest.fixture(scope="module")
def monkeypatch_module():
    patch = pytest.MonkeyPatch()
    yield patch
    patch.undo()


def test_ttft_benchmark_rows_ratios_and_files(ttft_run):
    result, out = ttft_run
    runs = {(r["policy"], r["retain"]): r for r in result["runs"]}
    assert list(runs) == [("unwrapped", 1.0), ("none", 1.0), ("fastv", 0.5), ("pool", 0.5), ("uniform", 0.5)]
    assert "bad parameters for policy 'pool'" in runs[("pool", 0.5)]["error"]
    prompt = result["config"]["prompt_length"]
    # 2 frames x 196 tokens + 1 newline; uniform keeps round(0.5 * 196) = 98 tokens of each frame
    assert result["config"]["video_tokens"] == 2 * 196 + 1
    uniform, none, base = runs[("uniform", 0.5)], runs[("none", 1.0)], runs[("unwrapped", 1.0)]
    assert uniform["video_tokens_after"] == 2 * 98 + 1
    assert uniform["layer_lengths"] == [prompt - 2 * 98] * 8
    assert none["layer_lengths"] == base["layer_lengths"] == [prompt] * 8
    assert none["flops_ratio"] == 1.0 and 0.4 < uniform["flops_ratio"] < 0.6
    # an in-layer policy: every token enters the LM, the layers from its stage on see fewer
    fastv = runs[("fastv", 0.5)]
    (stage,) = fastv["layer_stages"]
    k, removed = stage["layer"], stage["before"] - stage["after"]
    assert fastv["video_tokens_after"] == fastv["video_tokens_before"] and removed > 0
    assert fastv["layer_lengths"] == [prompt] * k + [prompt - removed] * (8 - k)
    assert "bare_lm_s" not in fastv and fastv["retained_fraction"] == stage["after"] / fastv["video_tokens_before"]
    assert uniform["kv_cache_bytes"] < none["kv_cache_bytes"] == base["kv_cache_bytes"]
    assert uniform["peak_memory_bytes"] > 0
    assert set(uniform["parts"]) == {"vision", "embed", "policy", "scorer", "engine", "prefill"} and base["parts"] == {}
    assert uniform["scorer_s"] == 0.0
    assert none["bare_lm_s"] == base["bare_lm_s"]  # one bare timing per length
    for key in ("ttft_speedup", "lm_ratio", "bare_ratio", "gap", "overhead_share"):
        assert key in uniform
    assert result["machine"]["cpu"] and result["versions"]["torch"]
    assert "max_new_tokens=1" in result["what_was_timed"]
    saved = json.loads((out / "ttft-default-cpu.json").read_text())
    assert saved["runs"][4]["policy"] == "uniform"
    table = (out / "ttft-default-cpu.md").read_text()
    assert "| uniform | 0.5 | 197/393 |" in table and "error: TypeError" in table
    assert f"| fastv | 0.5 | 393/393, {stage['after']} from layer {k} |" in table
    assert table.count("\n|---") == 1 and all(
        line.count("|") == 17 for line in table.splitlines() if line.startswith("| ")
    )
    assert (out / "ttft-default-cpu.png").stat().st_size > 10_000
    assert uniform["meets_goal"] is False and "aten::" in uniform["profile"]
    assert "Profile of one call, uniform(retain=0.5)" in table


def test_ttft_counts_the_scorer_inside_ttft(tmp_path):
    """quota (the model scores its own frames) and free_video_llm (a tiny CLIP): the scorer's seconds are
    a part of each TTFT, reported per row; free_video_llm runs once, at its own token count."""
    argv = ["--frames", "2", "--policies", "quota,free_video_llm", "--retain", "0.5", "--repeats", "1",
            "--warmup", "0", "--no-memory", "--no-bare", "--out", str(tmp_path), "--tag", "scorers"]  # fmt: skip
    result = ttft.run(argv)
    runs = {r["policy"]: r for r in result["runs"]}
    assert set(runs) == {"unwrapped", "quota", "free_video_llm"} and all("error" not in r for r in runs.values())
    assert result["config"]["scorers"] == {
        "quota": "QuoTAScorer: the benchmarked model itself",
        "free_video_llm": "CLIPScorer: tokcompress.tiny.build_clip() (random weights)",
    }
    for name in ("quota", "free_video_llm"):
        row = runs[name]
        scorer = row["parts"]["scorer"]["all_s"][0]
        assert row["scorer_s"] == scorer > 0
        assert sum(part["all_s"][0] for part in row["parts"].values()) == pytest.approx(row["ttft"]["all_s"][0], rel=1e-6)
    fvl = runs["free_video_llm"]
    assert fvl["retain"] == round(fvl["video_tokens_after"] / fvl["video_tokens_before"], 4) < 1
    assert runs["quota"]["retain"] == 0.5 and runs["quota"]["video_tokens_after"] < runs["quota"]["video_tokens_before"]
    table = (tmp_path / "ttft-scorers.md").read_text()
    assert " scorer |" in table and "TTFT includes it" in table


def test_readme_section_is_generated_from_the_json(ttft_run, tmp_path):
    result, out = ttft_run
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\nintro\n\n<!-- results:start -->\nold text\n<!-- results:end -->\n\n## After\n")
    assert README_results.main(["--readme", str(readme), "--results", str(out)]) == 0
    text = readme.read_text()
    assert text.startswith("# Title\n\nintro\n\n<!-- results:start -->\n") and text.endswith(
        "<!-- results:end -->\n\n## After\n"
    )
    assert "old text" not in text
    assert "| uniform | 0.5 | 197/393 |" in text
    assert result["machine"]["cpu"] in text
    assert "### Against the papers" in text and "FastVID" in text
    assert README_results.main(["--readme", str(readme), "--results", str(out), "--check"]) == 0
    readme.write_text(text.replace("197/393", "1/1"))
    assert README_results.main(["--readme", str(readme), "--results", str(out), "--check"]) == 1
    readme.write_text("# no markers\n")
    with pytest.raises(SystemExit, match="results:start"):
        README_results.main(["--readme", str(readme), "--results", str(out)])


def test_sweep_jobs_resume_and_summary(tmp_path):
    assert videoqa.jobs(["none", "uniform"], [0.5, 0.1], ["a", "b"]) == [
        ("none", 1.0, "a"), ("none", 1.0, "b"),
        ("uniform", 0.5, "a"), ("uniform", 0.5, "b"), ("uniform", 0.1, "a"), ("uniform", 0.1, "b"),
    ]  # fmt: skip
    path = tmp_path / "runs.jsonl"
    videoqa.append(path, {"policy": "none", "retain": 1.0, "task": "a", "score": 60.0, "ttft_s": 2.0,
                          "video_tokens_before": 100, "video_tokens_after": 100, "metric": "m", "documents": 5})  # fmt: skip
    videoqa.append(path, {"policy": "uniform", "retain": 0.1, "task": "a", "score": 45.0, "ttft_s": 0.5,
                          "video_tokens_before": 100, "video_tokens_after": 10, "metric": "m", "documents": 5})  # fmt: skip
    with path.open("a") as f:
        f.write('{"policy": "uniform", "retain": 0.5, "ta')  # a crash mid-write
    done = videoqa.load_done(path)
    assert set(done) == {("none", 1.0, "a"), ("uniform", 0.1, "a")}
    summary = {(s["policy"], s["retain"]): s for s in videoqa.summarize(done.values())}
    assert summary[("uniform", 0.1)]["accuracy_retained"] == pytest.approx(0.75)
    assert summary[("uniform", 0.1)]["ttft_speedup"] == pytest.approx(4.0)
    assert "| a | uniform | 0.1 | 10/100 | 45.00 | 75.0% |" in videoqa.markdown(list(summary.values()))


def test_task_score_reads_groups_and_named_metrics():
    results = {
        "results": {
            "videomme": {
                "alias": "videomme",
                "videomme_perception_score,none": 55.0,
                "videomme_perception_score_stderr,none": "N/A",
            },
            "mvbench_a": {"mvbench_accuracy,none": 40.0},
            "mvbench_b": {"mvbench_accuracy,none": 60.0},
        },
        "group_subtasks": {"mvbench": ["mvbench_a", "mvbench_b"]},
        "n-samples": {"videomme": {"effective": 9}, "mvbench_a": {"effective": 3}, "mvbench_b": {"effective": 4}},
    }
    assert videoqa.task_score(results, "videomme") == ("videomme_perception_score", 55.0, 9)
    assert videoqa.task_score(results, "mvbench") == ("mvbench_accuracy", 50.0, 7)
    with pytest.raises(KeyError, match="no numeric metric"):
        videoqa.task_score(results, "egoschema_subset")


def test_videoqa_help_lists_the_eight_benchmarks(capsys):
    with pytest.raises(SystemExit):
        videoqa.parse_args(["--help"])
    text = capsys.readouterr().out
    for task in ("mvbench", "videomme", "videomme_w_subtitle", "egoschema_subset", "nextqa_mc_test",
                 "longvideobench_val_v", "mlvu_dev", "perceptiontest_val_mc", "activitynetqa"):  # fmt: skip
        assert f"  {task} " in text


def test_readme_results_include_the_policy_speed_tables(tmp_path):
    """The speed scripts' outputs appear in the generated section, absent ones leave no heading."""
    assert "Policies alone" not in README_results.section(tmp_path, tmp_path)
    table = "| policy | frames |\n|---|---|\n| evs | 32 |"
    (tmp_path / "policy-speed-cpu.md").write_text(table + "\n")
    (tmp_path / "fastholi-speed-cpu.txt").write_text("policy  T\nfastvid 32\n")
    text = README_results.section(tmp_path, tmp_path)
    assert "### Policies alone against their references" in text
    assert table in text and "```\npolicy  T\nfastvid 32\n```" in text
    assert text.index("EVS, EVS-pixel, DivPrune") < text.index("DPC-kNN, FastVID, HoliTom")
