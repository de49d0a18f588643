"""The lmms-eval plugin end to end, offline: real task machinery, real scoring functions, known answers.

The tasks in tests/lmms_eval_tasks use the schemas of Video-MME, MVBench and NExT-QA and lmms-eval's
own prompt and scoring functions of those benchmarks, on short clips written with PyAV here. The
model is a saved tiny LLaVA-OneVision that always answers "A" (see tests/eval_fixtures.py), loaded
through ``pretrained=PATH``; every task's answers are A, A, A and another letter, so each score is
exactly 3/4 whatever the policy.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is not installed
    sys.path.insert(0, str(ROOT))

pytest.importorskip("lmms_eval")

from eval_fixtures import (
    EXPECTED,
    FRAMES,
    METRIC,
    TASKS,
    answer_a_model,
    find_results,
    find_samples,
    make_eval_dir,
    offline_env,
)  # noqa: E402

# 8 frames x 4x4 tokens + 1 trailing newline; uniform keeps round(retain * 16) of each frame's 16.
TOKENS_BEFORE = FRAMES * 16 + 1
TOKENS_AFTER_HALF = FRAMES * 8 + 1


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms_eval")
    model_dir, tasks_dir = make_eval_dir(root)
    patch = pytest.MonkeyPatch()
    for key, value in offline_env(root).items():
        patch.setenv(key, value)
    yield root, model_dir, tasks_dir
    patch.undo()


def _evaluate(tasks_dir, tasks, **kwargs):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    return simple_evaluate(
        tasks=list(tasks),
        task_manager=TaskManager(include_path=str(tasks_dir)),
        bootstrap_iters=0,
        log_samples=True,
        **kwargs,
    )


def _score(results, task):
    return results["results"][task][f"{METRIC[task]},none"]


def _responses(results, task):
    out = {}
    for sample in results["samples"][task]:
        resp = sample["filtered_resps"]
        while isinstance(resp, list):
            resp = resp[0]
        out[int(sample["doc_id"])] = resp
    return out


@pytest.fixture(scope="module")
def uniform_run(env):
    _, model_dir, tasks_dir = env
    args = f"pretrained={model_dir},policy=uniform,retain=0.5,max_frames_num={FRAMES}"
    return _evaluate(tasks_dir, TASKS, model="tokcompress", model_args=args)


def test_entry_point_resolves_to_the_plugin_classes():
    from lmms_eval import models

    from tokcompress.lmms_eval import TokcompressChat, TokcompressSimple

    assert models.get_model("tokcompress") is TokcompressChat
    assert models.get_model("tokcompress", force_simple=True) is TokcompressSimple


def test_pruned_run_scores_known_answers_and_logs_efficiency(uniform_run):
    for task in TASKS:
        assert _score(uniform_run, task) == pytest.approx(EXPECTED[task])
        assert set(_responses(uniform_run, task).values()) == {"A"}
    stats = uniform_run["throughput"]
    assert stats["avg_video_tokens_before"] == TOKENS_BEFORE
    assert stats["avg_video_tokens_after"] == TOKENS_AFTER_HALF
    assert stats["total_gen_tokens"] == 2 * 4 * len(TASKS)  # "A" and end-of-turn, 4 docs per task
    assert 0 < stats["avg_ttft_s"] <= stats["avg_latency"]
    assert stats["avg_policy_s"] > 0 and stats["avg_preprocess_s"] > 0


def test_uncompressed_run_scores_the_same(env):
    _, model_dir, tasks_dir = env
    args = f"pretrained={model_dir},policy=none,max_frames_num={FRAMES}"
    results = _evaluate(tasks_dir, TASKS, model="tokcompress", model_args=args)
    for task in TASKS:
        assert _score(results, task) == pytest.approx(EXPECTED[task])
    assert results["throughput"]["avg_video_tokens_after"] == TOKENS_BEFORE


def test_wrapped_model_object_and_simple_class(env):
    import tokcompress as tc
    from tokcompress.hf import load_pretrained
    from tokcompress.lmms_eval import TokcompressChat, TokcompressSimple

    _, model_dir, tasks_dir = env
    model, processor = load_pretrained(model_dir)
    tc.wrap(model, "random", retain=0.25, seed=0)
    with pytest.raises(ValueError, match="already wrapped"):
        TokcompressChat(model=model, processor=processor, policy="uniform")
    lm = TokcompressSimple(model=model, processor=processor, max_frames_num=FRAMES)
    results = _evaluate(tasks_dir, ["tc_nextqa"], model=lm)
    assert _score(results, "tc_nextqa") == pytest.approx(EXPECTED["tc_nextqa"])
    assert results["throughput"]["avg_video_tokens_after"] == FRAMES * 4 + 1  # round(0.25 * 16) per frame
    assert tc.policy_of(model).label == "random(retain=0.25)"


def test_bad_arguments_are_refused(env):
    from tokcompress import UnknownPolicyError
    from tokcompress.lmms_eval import TokcompressChat, _paths

    model, processor = answer_a_model()
    with pytest.raises(UnknownPolicyError):
        TokcompressChat(model=model, processor=processor, policy="no-such-policy")
    with pytest.raises(ValueError, match="one request at a time"):
        TokcompressChat(model=model, processor=processor, batch_size=4)
    with pytest.raises(ValueError, match="pretrained="):
        TokcompressChat()
    with pytest.raises(NotImplementedError, match="file paths"):
        _paths([object()])
    with pytest.raises(NotImplementedError, match="time window"):
        _paths([{"path": "clip.mp4", "video_start": 1.0, "video_end": 2.0}])
    assert _paths([{"path": "clip.mp4"}, "other.mp4"]) == ["clip.mp4", "other.mp4"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_shard_and_gather_to_the_single_process_results(env, uniform_run):
    """``accelerate launch`` (2 processes on the CPU) through lmms-eval's own CLI."""
    root, model_dir, tasks_dir = env
    out = root / "two_processes"
    tasks = ["tc_videomme", "tc_nextqa"]
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        # --multi_gpu selects accelerate's multi-process launcher; without GPUs each process runs on the CPU
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        "-m", "lmms_eval", "eval", "--model", "tokcompress",
        "--model_args", f"pretrained={model_dir},policy=uniform,retain=0.5,max_frames_num={FRAMES}",
        "--tasks", ",".join(tasks), "--include_path", str(tasks_dir),
        "--output_path", str(out), "--log_samples", "--batch_size", "1",
    ]  # fmt: skip
    env_vars = {**os.environ, **offline_env(root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env_vars, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    # lmms-eval's CLI exits 0 even when the model raised: check what it wrote instead
    assert "tokcompress: process 0 of 2 answers 4 requests" in log, log[-3000:]
    assert "tokcompress: process 1 of 2 answers 4 requests" in log, log[-3000:]
    results = find_results(out)
    for task in tasks:
        assert results["results"][task][f"{METRIC[task]},none"] == pytest.approx(_score(uniform_run, task))
        assert find_samples(out, task) == _responses(uniform_run, task)
    assert results["throughput"]["total_gen_tokens"] == 2 * 4 * len(tasks)  # gathered from both processes
    assert results["throughput"]["avg_video_tokens_after"] == TOKENS_AFTER_HALF


def test_videoqa_sweep_appends_each_run_and_resumes(env, tmp_path, monkeypatch):
    import json

    from benchmarks import videoqa

    _, model_dir, tasks_dir = env
    out = tmp_path / "sweep.jsonl"
    argv = ["--model", str(model_dir), "--policies", "uniform,none", "--retain", "0.5", "--tasks", "tc_nextqa",
            "--include-path", str(tasks_dir), "--max-frames", str(FRAMES), "--out", str(out)]  # fmt: skip
    assert videoqa.main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["policy"], r["retain"], r["task"]) for r in rows] == [
        ("none", 1.0, "tc_nextqa"),
        ("uniform", 0.5, "tc_nextqa"),
    ]
    assert [r["score"] for r in rows] == [EXPECTED["tc_nextqa"]] * 2
    assert [r["video_tokens_after"] for r in rows] == [TOKENS_BEFORE, TOKENS_AFTER_HALF]
    assert "| tc_nextqa | uniform | 0.5 | 65/129 | 0.75 | 100.0% |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").exists()

    # a crash while writing the second run: only that run is redone
    first, second = out.read_text().splitlines()
    out.write_text(first + "\n" + second[:30])
    ran = []
    run_one = videoqa.run_one
    monkeypatch.setattr(videoqa, "run_one", lambda *a: ran.append(a[2:5]) or run_one(*a))
    assert videoqa.main(argv) == 0
    assert ran == [("uniform", 0.5, "tc_nextqa")]
    assert len(videoqa.load_done(out)) == 2

    # nothing left to do: the model is not even loaded
    def refuse(*args, **kwargs):
        raise AssertionError("a finished sweep must not load the model")

    monkeypatch.setattr("tokcompress.hf.load_pretrained", refuse)
    assert videoqa.main(argv) == 0
