"""VideoQA accuracy of policies x retain ratios x tasks, through lmms-eval (its prompts, parsing, metrics).

    python -m benchmarks.videoqa --model llava-hf/llava-onevision-qwen2-7b-ov-hf \\
        --policies none,uniform,fastvid --retain 0.25,0.1 --tasks videomme,mvbench --limit 200
    accelerate launch --num_processes 8 -m benchmarks.videoqa --model ... # documents sharded over GPUs

The model is loaded once (:func:`tokcompress.hf.load_pretrained`), wrapped for each (policy, retain)
and handed to ``lmms_eval.evaluator.simple_evaluate`` as a ``tokcompress.lmms_eval.TokcompressChat``.
Every finished (policy, retain, task) is appended to the JSONL file at once; a rerun skips what is
already there, so a crashed sweep resumes where it stopped. ``none`` runs once (retain 1). At the
end: a summary table (accuracy retained relative to ``none`` and TTFT speedup over ``none``'s, per
task) and the accuracy-vs-speedup Pareto plot (PNG).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common

#: The eight benchmarks our users report, as lmms-eval task names, with each task's main metric.
BENCHMARKS: dict[str, tuple[str, str]] = {
    "mvbench": ("MVBench (group of 20 sub-tasks)", "mvbench_accuracy"),
    "videomme": ("Video-MME without subtitles", "videomme_perception_score"),
    "videomme_w_subtitle": ("Video-MME with subtitles", "videomme_perception_score"),
    "egoschema_subset": ("EgoSchema (the 500-question subset with public answers)", "score"),
    "nextqa_mc_test": ("NExT-QA multiple choice", "exact_match"),
    "longvideobench_val_v": ("LongVideoBench validation", "lvb_acc"),
    "mlvu_dev": ("MLVU dev", "mlvu_percetion_score"),
    "perceptiontest_val_mc": ("PerceptionTest validation, multiple choice", "accuracy"),
    "activitynetqa": ("ActivityNet-QA (scored by an OpenAI judge: needs OPENAI_API_KEY)", "gpt_eval_accuracy"),
}
DEFAULT_RETAIN = (0.25, 0.1)


def _epilog() -> str:
    rows = "\n".join(f"  {name:<24} {desc}" for name, (desc, _) in BENCHMARKS.items())
    return (
        "tasks (lmms-eval names; the default is all of them):\n"
        f"{rows}\n\n"
        "Videos and annotations are downloaded by lmms-eval into $HF_HOME on first use. Any other\n"
        "lmms-eval task name (or a local task found through --include-path) works too."
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.videoqa",
        description="VideoQA accuracy and TTFT of policies x retain ratios x tasks through lmms-eval.",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="Hugging Face model id or a save_pretrained folder")
    parser.add_argument("--policies", help="comma-separated policy names (default: every registered policy)")
    parser.add_argument(
        "--retain", help=f"comma-separated retain ratios (default: {','.join(map(str, DEFAULT_RETAIN))})"
    )
    parser.add_argument("--tasks", default=",".join(BENCHMARKS), help="comma-separated lmms-eval task names")
    parser.add_argument("--limit", type=float, help="documents per task (an int), or a fraction of them")
    parser.add_argument("--include-path", help="folder of extra lmms-eval task YAMLs")
    parser.add_argument("--max-frames", type=int, default=32, help="frames per video, evenly spaced (default 32)")
    parser.add_argument("--fps", type=float, help="cap on the frame sampling rate")
    parser.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available; per process under accelerate)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--attn", default=None, help="attention implementation (default: the model's)")
    parser.add_argument("--out", help="JSONL file of finished runs (default: benchmarks/results/videoqa-<model>.jsonl)")
    parser.add_argument("--no-plot", dest="plot", action="store_false")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit >= 1:
        args.limit = int(args.limit)
    return args


# --------------------------------------------------------------------------- the sweep


def jobs(policies: Iterable[str], retains: Sequence[float], tasks: Sequence[str]) -> list[tuple[str, float, str]]:
    """(policy, retain, task) in run order: ``none`` once per task (retain 1), the others per ratio."""
    out = []
    for name in policies:
        for retain in [1.0] if name == "none" else retains:
            out += [(name, float(retain), task) for task in tasks]
    return out


def load_done(path: Path) -> dict[tuple[str, float, str], dict[str, Any]]:
    """Finished runs of a JSONL file by (policy, retain, task); a torn last line (crash) is ignored."""
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[(row["policy"], float(row["retain"]), row["task"])] = row
    return done


def append(path: Path, row: dict[str, Any]) -> None:
    """Add one finished run and flush it to disk (after a torn last line, on a line of its own)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torn = path.exists() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
    with path.open("a") as f:
        f.write(("\n" if torn else "") + json.dumps(row, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def task_score(results: dict[str, Any], task: str) -> tuple[str, float, int]:
    """``(metric, score, documents)`` of ``task`` (a group: the mean of its sub-tasks' scores)."""
    table = results["results"]
    metric = BENCHMARKS.get(task, (None, None))[1]
    if task in table:
        score = _metric(table[task], metric)
        if score is not None:
            return score[0], score[1], int(results.get("n-samples", {}).get(task, {}).get("effective", 0))
    subtasks = results.get("group_subtasks", {}).get(task) or []
    scores = [(s, _metric(table.get(s, {}), metric)) for s in subtasks]
    scores = [(s, v) for s, v in scores if v is not None]
    if not scores:
        raise KeyError(f"no numeric metric for task {task!r} in the lmms-eval results ({sorted(table)})")
    n = sum(int(results.get("n-samples", {}).get(s, {}).get("effective", 0)) for s, _ in scores)
    return scores[0][1][0], sum(v[1] for _, v in scores) / len(scores), n


def _metric(row: dict[str, Any], preferred: str | None) -> tuple[str, float] | None:
    keys = [f"{preferred},none"] if preferred else []
    keys += [k for k in row if k.endswith(",none") and "stderr" not in k]
    for key in keys:
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return key.split(",")[0], float(value)
    return None


def run_one(
    model: Any, processor: Any, policy: str, retain: float, task: str, args: argparse.Namespace
) -> dict[str, Any] | None:
    """Evaluate one (policy, retain, task); the JSONL row (None on processes other than 0)."""
    import tokcompress as tc
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from tokcompress.lmms_eval import TokcompressChat

    params = {} if policy == "none" else {"retain": retain, **common.POLICY_PARAMS.get(policy, {})}
    start = time.time()
    with tc.compressed(model, policy, **params):
        lm = TokcompressChat(model=model, processor=processor, max_frames_num=args.max_frames, fps=args.fps)
        results = simple_evaluate(
            model=lm,
            tasks=[task],
            limit=args.limit,
            bootstrap_iters=0,
            log_samples=False,
            task_manager=TaskManager(include_path=args.include_path) if args.include_path else None,
        )
        label = tc.policy_of(model).label
    if not results:  # processes other than 0 under accelerate
        return None
    metric, score, n = task_score(results, task)
    throughput = results.get("throughput", {})
    return {
        "policy": policy,
        "retain": retain,
        "task": task,
        "label": label,
        "metric": metric,
        "score": score,
        "documents": n,
        "ttft_s": throughput.get("avg_ttft_s"),
        "latency_s": throughput.get("avg_latency"),
        "policy_s": throughput.get("avg_policy_s"),
        "video_tokens_before": throughput.get("avg_video_tokens_before"),
        "video_tokens_after": throughput.get("avg_video_tokens_after"),
        "model": args.model,
        "limit": args.limit,
        "max_frames": args.max_frames,
        "fps": args.fps,
        "seconds": time.time() - start,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": common.versions(),
        "machine": common.machine(lm.device),
    }


# --------------------------------------------------------------------------- summary


def summarize(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (policy, retain, task): accuracy retained relative to ``none`` and TTFT speedup over ``none``."""
    rows = [r for r in rows if "error" not in r]
    base = {r["task"]: r for r in rows if r["policy"] == "none"}
    out = []
    for r in sorted(rows, key=lambda r: (r["task"], r["policy"] != "none", r["policy"], -r["retain"])):
        b = base.get(r["task"])
        out.append(
            {
                **{k: r[k] for k in ("policy", "retain", "task", "metric", "score", "documents")},
                "accuracy_retained": r["score"] / b["score"] if b and b["score"] else None,
                "ttft_speedup": b["ttft_s"] / r["ttft_s"] if b and b.get("ttft_s") and r.get("ttft_s") else None,
                "ttft_s": r.get("ttft_s"),
                "tokens": (
                    f"{r['video_tokens_after']:.0f}/{r['video_tokens_before']:.0f}"
                    if r.get("video_tokens_before")
                    else "–"
                ),
            }
        )
    return out


def markdown(summary: list[dict[str, Any]]) -> str:
    lines = [
        "| task | policy | retain | video tokens | score | accuracy retained | TTFT s | TTFT speedup |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        kept = "–" if s["accuracy_retained"] is None else f"{100 * s['accuracy_retained']:.1f}%"
        speed = "–" if s["ttft_speedup"] is None else f"{s['ttft_speedup']:.2f}x"
        ttft = "–" if s["ttft_s"] is None else f"{s['ttft_s']:.3f}"
        lines.append(
            f"| {s['task']} | {s['policy']} | {s['retain']:g} | {s['tokens']} | {s['score']:.2f} | {kept} | {ttft} | {speed} |"
        )
    return "\n".join(lines)


def plot(summary: list[dict[str, Any]], path: str | os.PathLike, title: str = "") -> None:
    """Accuracy retained vs TTFT speedup, one line per policy (points: retain ratios, averaged over tasks)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points: dict[str, dict[float, list[tuple[float, float]]]] = {}
    for s in summary:
        if s["policy"] == "none" or s["accuracy_retained"] is None or s["ttft_speedup"] is None:
            continue
        points.setdefault(s["policy"], {}).setdefault(s["retain"], []).append(
            (s["ttft_speedup"], s["accuracy_retained"])
        )
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for name, by_retain in sorted(points.items()):
        xs, ys, labels = [], [], []
        for retain, pts in sorted(by_retain.items(), reverse=True):
            xs.append(sum(p[0] for p in pts) / len(pts))
            ys.append(100 * sum(p[1] for p in pts) / len(pts))
            labels.append(retain)
        ax.plot(xs, ys, marker="o", label=name)
        for x, y, r in zip(xs, ys, labels):
            ax.annotate(f"{r:g}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.axhline(100, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("TTFT speedup over none (x)")
    ax.set_ylabel("accuracy retained (% of none, mean over tasks)")
    ax.set_title(title, fontsize=8)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from tqdm import tqdm

    from tokcompress import TokcompressError
    from tokcompress.hf import load_pretrained

    names = common.policies(args.policies)
    retains = [float(r) for r in args.retain.split(",")] if args.retain else list(DEFAULT_RETAIN)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    out = Path(args.out) if args.out else common.RESULTS_DIR / f"videoqa-{common.slug(args.model)}.jsonl"
    done = load_done(out)
    todo = [j for j in jobs(names, retains, tasks) if j not in done]
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        print(f"{len(done)} runs already in {out}; {len(todo)} to go", file=sys.stderr)
    if todo:
        model, processor = load_pretrained(
            args.model, device=_device(args), dtype=args.dtype, attn_implementation=args.attn
        )
        for policy, retain, task in tqdm(todo, desc="videoqa", unit="run", disable=rank != 0):
            try:
                row = run_one(model, processor, policy, retain, task, args)
            except TokcompressError as err:  # e.g. a policy this model family cannot run: note it, go on
                row = {"policy": policy, "retain": retain, "task": task, "error": f"{type(err).__name__}: {err}"}
                print(f"{policy} retain={retain:g} on {task}: {row['error']}", file=sys.stderr)
            if row is not None and rank == 0:
                append(out, row)
    if rank != 0:
        return 0
    rows = list(load_done(out).values())
    summary = summarize(r for r in rows if r["task"] in tasks)
    table = markdown(summary)
    print(table)
    out.with_suffix(".md").write_text(table + "\n")
    if args.plot and summary:
        try:
            plot(summary, out.with_suffix(".png"), title=args.model)
            print(f"plot: {out.with_suffix('.png')}", file=sys.stderr)
        except ImportError as err:
            print(f"no plot ({err})", file=sys.stderr)
    return 0


def _device(args: argparse.Namespace) -> str:
    import torch

    if args.device:
        return args.device
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu"


if __name__ == "__main__":
    raise SystemExit(main())
