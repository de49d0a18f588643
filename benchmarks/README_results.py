"""Regenerate the README's results section from the benchmark JSON files (never typed by hand).

    python -m benchmarks.README_results            # rewrites README.md between the markers
    python -m benchmarks.README_results --check    # exit 1 if README.md is out of date

The section between ``<!-- results:start -->`` and ``<!-- results:end -->`` is replaced by: the
default-config TTFT table and plot (``benchmarks/results/ttft-default-cpu.json``), the 7B-shape
GPU table if ``ttft-llava-onevision-qwen2-7b-cuda.json`` exists, our speedups beside the papers'
(``benchmarks/papers.json``), and the VideoQA summary of any ``videoqa-*.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common, ttft, videoqa

START, END = "<!-- results:start -->", "<!-- results:end -->"
CPU_JSON = "ttft-default-cpu.json"
#: Each policy alone against a step-by-step transcription of its reference (issue: >= 2x at 32 frames).
SPEED_TABLES = (
    ("policy-speed-cpu", "EVS, EVS-pixel, DivPrune", "python benchmarks/policy_speed.py --threads 2 --out benchmarks/results/policy-speed-cpu"),
    (
        "fastholi-speed-cpu",
        "DPC-kNN, FastVID, HoliTom",
        "python benchmarks/fastholi_speed.py --frames 16 32 64 256 --dims 896 3584 --memory --threads 2 "
        "> benchmarks/results/fastholi-speed-cpu.txt",
    ),
)
GPU_JSON = "ttft-llava-onevision-qwen2-7b-cuda.json"


def _link(path: Path, root: Path) -> str:
    return Path(os.path.relpath(path.resolve(), root.resolve())).as_posix()


def _machine(result: dict[str, Any]) -> str:
    m, v = result["machine"], result["versions"]
    where = m.get("gpu") or f"{m['cpu']}, {m['cpu_cores']} cores ({m['torch_threads']} torch threads)"
    memory = f", {m['memory_bytes'] / 2**30:.0f} GiB RAM" if m.get("memory_bytes") else ""
    commit = (
        f", commit {v['git_commit'][:7]}{' (modified)' if v.get('git_dirty') else ''}" if v.get("git_commit") else ""
    )
    return (
        f"{where}{memory}; torch {v.get('torch')}, transformers {v.get('transformers')}, tokcompress {v.get('tokcompress')}"
        f"{commit}; measured {result['date']}"
    )


def _ttft_block(result: dict[str, Any], title: str, png: Path, root: Path) -> list[str]:
    lines = [f"### {title}", "", f"Machine: {_machine(result)}.", "", ttft.markdown(result), ""]
    if png.exists():
        lines += [f"![TTFT speedup vs retained tokens]({_link(png, root)})", ""]
    lines += [
        "<details><summary>What was timed</summary>",
        "",
        result["what_was_timed"],
        "",
        f"Command: `{result['config'].get('command', 'python -m benchmarks.ttft')}`",
        "",
        "</details>",
        "",
    ]
    return lines


def _ours(results: list[dict[str, Any]], policy: str, retain: float | None) -> str:
    parts = []
    for result in results:
        runs = [r for r in result["runs"] if r["policy"] == policy and "error" not in r]
        if retain is not None:
            runs = [r for r in runs if abs(r["retain"] - retain) < 1e-9]
        where = result["machine"].get("gpu") or "CPU"
        config = result["config"]
        model = {"default": "default config", "shape": config.get("shape")}.get(config["kind"], config.get("model"))
        for r in sorted(runs, key=lambda r: -r["retain"]):
            limit = f", FLOPs limit {1 / r['flops_ratio']:.1f}x" if r.get("flops_ratio") else ""
            lm = f", LM prefill {r['lm_speedup']:.2f}x" if r.get("lm_speedup") else ""
            parts.append(
                f"{r['retain']:g}: TTFT {r.get('ttft_speedup', float('nan')):.2f}x{lm}{limit} ({model}, {where})"
            )
    return "; ".join(parts) if parts else "not measured (policy not registered when the benchmark ran)"


def _papers_block(results: list[dict[str, Any]]) -> list[str]:
    papers = json.loads((Path(__file__).resolve().parent / "papers.json").read_text())
    lines = [
        "### Against the papers",
        "",
        papers["note"],
        "",
        "| policy | paper | their setting | retain | they report | what they timed | ours (retain: speedups) |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in papers["rows"]:
        retain = "–" if p["retain"] is None else f"{p['retain']:g}"
        lines.append(
            f"| {p['policy']} | {p['paper']} | {p['model']} | {retain} | {p['reported']:g}x | {p['what']} | "
            f"{_ours(results, p['policy'], p['retain'])} |"
        )
    return lines + [""]


def _speed_block(results_dir: Path) -> list[str]:
    """The policies alone against their reference transcriptions, as the speed scripts wrote them."""
    lines: list[str] = []
    for stem, what, command in SPEED_TABLES:
        md, txt = results_dir / f"{stem}.md", results_dir / f"{stem}.txt"
        if not (md.exists() or txt.exists()):
            continue
        if not lines:
            lines = [
                "### Policies alone against their references",
                "",
                "Seconds per call of each policy on synthetic `(T, 196, D)` features (T frames of LLaVA-OneVision's "
                "14x14 grid, D = 896 or 3584 as the 0.5B and 7B models), beside a transcription of the reference's "
                "own formulation kept in `benchmarks/` (not in the library). `policy_speed.py` checks on every row that "
                "both keep the same tokens; the FastVID, HoliTom and DPC-kNN transcriptions are checked against the library "
                "in `tests/test_fastvid.py`, `tests/test_holitom.py` and `tests/test_dpc_knn.py`.",
                "",
            ]
        lines += [f"{what} (`{command}`):", ""]
        lines += [md.read_text().rstrip(), ""] if md.exists() else ["```", txt.read_text().rstrip(), "```", ""]
    if (results_dir / "policy-speed-cpu.json").exists():
        meta = json.loads((results_dir / "policy-speed-cpu.json").read_text()).get("meta", {})
        lines += [f"Machine: {meta.get('machine')} CPU, {meta.get('threads')} torch threads, torch {meta.get('torch')}.", ""]
    return lines


def section(results_dir: Path, root: Path) -> str:
    """The generated Markdown between the markers (without the markers)."""
    lines = [
        "<!-- generated by `python -m benchmarks.README_results` from benchmarks/results/: edit that script, not this section -->",
        "",
    ]
    found = []
    cpu = results_dir / CPU_JSON
    if cpu.exists():
        result = json.loads(cpu.read_text())
        found.append(result)
        lines += _ttft_block(result, "Time to first token: default config on a CPU", cpu.with_suffix(".png"), root)
    else:
        lines += [f"No TTFT results yet: run `python -m benchmarks.ttft` (writes benchmarks/results/{CPU_JSON}).", ""]
    gpu = results_dir / GPU_JSON
    if gpu.exists():
        result = json.loads(gpu.read_text())
        found.append(result)
        lines += _ttft_block(
            result, "Time to first token: LLaVA-OneVision-7B shape on a GPU", gpu.with_suffix(".png"), root
        )
    lines += _papers_block(found)
    lines += _speed_block(results_dir)
    for jsonl in sorted(results_dir.glob("videoqa-*.jsonl")):
        rows = list(videoqa.load_done(jsonl).values())
        if not rows:
            continue
        model = rows[0].get("model", jsonl.stem)
        lines += [f"### VideoQA accuracy: {model}", "", videoqa.markdown(videoqa.summarize(rows)), ""]
        png = jsonl.with_suffix(".png")
        if png.exists():
            lines += [f"![accuracy vs speedup]({_link(png, root)})", ""]
    return "\n".join(lines).rstrip() + "\n"


def render(readme: str, body: str) -> str:
    if readme.count(START) != 1 or readme.count(END) != 1 or readme.index(START) > readme.index(END):
        raise SystemExit(
            f"README must hold exactly one {START} ... {END} pair (in that order); add them where the results go"
        )
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{body}{END}{tail}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.README_results", description=__doc__.split("\n\n")[0])
    parser.add_argument("--readme", default=str(common.ROOT / "README.md"))
    parser.add_argument("--results", default=str(common.RESULTS_DIR), help="folder of the benchmark outputs")
    parser.add_argument("--check", action="store_true", help="only check that the README is up to date")
    args = parser.parse_args(argv)
    path = Path(args.readme)
    old = path.read_text()
    new = render(old, section(Path(args.results), path.resolve().parent))
    if args.check:
        if new != old:
            print(f"{path} results section is out of date: run python -m benchmarks.README_results", file=sys.stderr)
            return 1
        return 0
    path.write_text(new)
    print(f"updated {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
