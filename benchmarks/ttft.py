"""Time to first token, prefill FLOPs and memory for every registered policy x retain ratio.

    python -m benchmarks.ttft                                   # offline default, ~2 min on 2 CPU cores
    python -m benchmarks.ttft --shape llava-onevision-qwen2-7b --device cuda
    python -m benchmarks.ttft --model llava-hf/llava-onevision-qwen2-7b-ov-hf --video clip.mp4

On a CPU that other jobs share, add ``--threads 1``: with more torch threads than free cores every
small kernel waits for a descheduled thread and short sequences look several times slower.

Models: with no argument, a LLaVA-OneVision-shaped model with random weights (LM hidden 256, 8
layers; 32 frames x 196 tokens); ``--shape NAME`` the real architecture of a checkpoint with random
weights (``benchmarks/shapes/NAME.json``: timings do not depend on weight values); ``--model ID`` a
real checkpoint (loaded with :func:`tokcompress.hf.load_pretrained`).

What is timed (also written into every output):

* ``decode`` and ``preprocess``: reading the video with PyAV (uniform frames), then the processor
  (resize, normalise, tokenise). The same for every policy; reported once.
* ``TTFT``: wall time of ``model.generate(**inputs, max_new_tokens=1, do_sample=False)`` on processed
  inputs already on the device, after warm-up runs (two untimed calls before the first row, then
  ``--warmup`` per row); median and p90 of the repeats, which are interleaved over the rows (repeat
  1 of every row, then repeat 2, ...) so that a drift in machine speed hits every row alike. On
  CUDA the device is synchronised around each call and the time comes from CUDA events.
* The split of each TTFT, from stamps the engine takes after device syncs
  (:mod:`tokcompress.timing`): ``vision`` (generate's setup, vision tower, projector), ``embed``
  (the model's own text embedding and feature scatter), ``policy``, ``scorer`` (the scorer model of
  ``quota`` / ``free_video_llm``: it runs inside the prefill, so it is part of TTFT), ``engine``
  (tokcompress's hook work around the policy), ``prefill`` (language model on the kept tokens, LM
  head, first token).
* Scorers: ``quota`` is scored by ``--quota-scorer`` (default ``self``: the benchmarked model rates
  its own frames, one forward per frame), ``free_video_llm`` by ``--clip`` (default ``tiny``: a tiny
  random ``CLIPModel``; pass a checkpoint id for a real one). ``free_video_llm``'s token count is set
  by its pathways: it runs once, and its retain column is the fraction it kept.
  The unwrapped model has no stamps: only its total is measured.
* ``LM ratio``: (policy + engine + prefill) of a row over the prefill of ``none`` (all tokens).
  ``FLOPs ratio``: analytic prefill FLOPs (:mod:`tokcompress.flops`, causal attention, per layer
  for the lengths each layer really saw) over the uncompressed prefill's. The FLOPs ratio is the
  physical limit of the LM ratio; ``gap`` = LM ratio / FLOPs ratio (1.0 = no overhead at all).
  ``bare LM ratio``: the language model called alone on random embeddings of the row's length, over
  the same at full length: what the model itself costs at that length, with no tokcompress code.
  ``overhead share``: (policy + scorer + engine + the row's vision time above ``none``'s, i.e. signals
  the policy captures in the vision tower) over the prefill time pruning saved.
* ``peak memory``: tensor memory allocated during one extra (untimed) call above what was allocated
  before it (CUDA: ``max_memory_allocated``; CPU: the torch profiler's allocation events, a lower
  bound). ``KV cache``: bytes of the keys and values in the cache that call returned.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Iterator, Sequence

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import common  # noqa: E402

WHAT_WAS_TIMED = (__doc__ or "").split("What is timed (also written into every output):", 1)[-1].strip()
DEFAULT_RETAIN = (0.5, 0.25, 0.1)
GOAL_RETAIN = 0.1
GOAL_GAP = 1.1


# --------------------------------------------------------------------------- model and inputs


def _setup(args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any]]:
    """``(model, processor, description)`` for the chosen way of getting a model."""
    from tokcompress.tiny import BENCHMARK_SHAPE, build

    dtype = _dtype(args)
    if args.model:
        from tokcompress.hf import load_pretrained

        model, processor = load_pretrained(args.model, device=args.device, dtype=dtype, attn_implementation=args.attn)
        frames = args.frames or 32
        return model, processor, {"kind": "checkpoint", "model": args.model, "frames": frames, "video_size": 384}
    if args.shape:
        spec = common.load_shape(args.shape)
        if args.frames:
            spec["video"]["frames"] = args.frames
        model, processor = common.build_shape(spec, device=args.device, dtype=dtype, attn=args.attn)
        return (
            model,
            processor,
            {
                "kind": "shape",
                "shape": spec["name"],
                "checkpoint": spec.get("checkpoint"),
                "note": spec.get("note"),
                "frames": spec["video"]["frames"],
                "video_size": spec["video"]["size"],
            },
        )
    shape = dict(BENCHMARK_SHAPE)
    if args.frames:
        shape["frames"] = args.frames
    model, processor = build("llava_onevision", attn_implementation=args.attn, **shape)
    model.to(device=args.device, dtype=dtype)
    return (
        model,
        processor,
        {
            "kind": "default",
            "shape": "tokcompress.tiny.BENCHMARK_SHAPE (LLaVA-OneVision layout, random weights)",
            "overrides": shape,
            "frames": shape["frames"],
            "video_size": shape["image_size"],
        },
    )


def _dtype(args: argparse.Namespace) -> torch.dtype:
    if args.dtype == "auto":
        return torch.bfloat16 if torch.device(args.device).type == "cuda" else torch.float32
    return getattr(torch, args.dtype)


def _video_path(args: argparse.Namespace, frames: int, size: int, folder: str) -> str:
    if args.video:
        return args.video
    from tokcompress.video import synthetic_video, write_video

    size += size % 2  # yuv420p needs even sizes
    path = os.path.join(folder, "synthetic.mp4")
    write_video(path, synthetic_video(num_frames=2 * frames, height=size, width=size, seed=0), fps=8)
    return path


# --------------------------------------------------------------------------- measurement


def _lengths_and_flops(model: Any, record: Any, prompt_length: int) -> tuple[list[int], dict[str, Any]]:
    from tokcompress.flops import LMShape, layer_lengths, prefill_flops

    shape = LMShape.from_config(model.config)
    lengths = layer_lengths(record[0] if record else None, prompt_length, shape.num_layers)
    return lengths, prefill_flops(shape, lengths)


class BareLM:
    """The language model alone on random embeddings of a given length (no hooks, no vision).

    The reference for what the model itself costs at a length: a pruned prefill cannot beat the bare
    model at its kept length, so ``bare ratio / FLOPs ratio`` is the part of the gap that is the
    model's (short sequences use the hardware less well), not tokcompress's.
    """

    def __init__(self, model: Any) -> None:
        from tokcompress.adapters import adapter_for

        self.model = model
        self.lm = adapter_for(model).language_model(model)
        self.width = model.config.get_text_config().hidden_size
        self.inputs: dict[int, torch.Tensor] = {}
        self.seconds: dict[int, list[float]] = {}

    def _call(self, length: int) -> None:
        with torch.no_grad():
            self.lm(inputs_embeds=self.inputs[length], use_cache=False)

    def prepare(self, length: int) -> None:
        """Make the input for ``length`` and run it once untimed (warm-up)."""
        if length not in self.inputs:
            generator = torch.Generator().manual_seed(length)
            x = torch.randn(1, length, self.width, generator=generator) * 0.02  # the scale of embedding weights
            self.inputs[length] = x.to(self.model.device, self.model.dtype)
            self._call(length)

    def time_once(self, length: int) -> None:
        from tokcompress.timing import time_call

        timing = time_call(lambda: self._call(length), repeats=1, warmup=0, device=self.model.device)
        self.seconds.setdefault(length, []).extend(timing.seconds)


def _layer_stages(record: Any) -> list[dict[str, Any]]:
    """In-layer stages of the prefill (summed over rows): where they act and how many visual tokens survive."""
    stages: dict[str, dict[str, Any]] = {}
    for row in record or []:
        for label, stage in row.stages.items():
            if not isinstance(stage, dict) or "steps" in stage or "visual_after" not in stage:
                continue
            entry = stages.setdefault(label, {"label": label, "layer": int(stage["layer"]), "before": 0, "after": 0})
            entry["before"] += int(stage["visual_before"])
            entry["after"] += int(stage["visual_after"])
    return sorted(stages.values(), key=lambda s: s["layer"])


def _profile(model: Any, inputs: dict[str, Any], args: argparse.Namespace, bare: BareLM | None) -> dict[str, Any]:
    """One row's untimed facts: memory, KV bytes, kept tokens, per-layer lengths, FLOPs."""
    import tokcompress as tc
    from tokcompress.timing import cache_bytes, peak_memory

    def call() -> Any:
        with torch.no_grad():
            return model.generate(**inputs, max_new_tokens=1, do_sample=False, return_dict_in_generate=True)

    for _ in range(args.warmup - 1 if args.memory else args.warmup):  # the profiled call below warms up too
        call()
    out: dict[str, Any] = {}
    if args.memory:
        peak, result = peak_memory(call, model.device)
        out["peak_memory_bytes"] = peak
    else:
        result = call()
    out["kv_cache_bytes"] = cache_bytes(result.cache)
    record = tc.last_record(model) if tc.is_wrapped(model) else None
    prompt_length = int(inputs["input_ids"].shape[1])
    lengths, flops = _lengths_and_flops(model, record, prompt_length)
    out.update(
        prompt_length=prompt_length,
        layer_lengths=lengths,
        flops=flops,
        video_tokens_before=sum(r.video_tokens_before for r in record) if record else None,
        video_tokens_after=sum(r.video_tokens_after for r in record) if record else None,
        layer_stages=_layer_stages(record),
    )
    if bare is not None and len(set(lengths)) == 1:  # in-layer policies change the length mid-model: no reference
        out["bare_length"] = lengths[0]
        bare.prepare(lengths[0])
    return out


@contextlib.contextmanager
def _as_row(model: Any, row: dict[str, Any], scorers: dict[str, tuple[Any, Any]] | None = None) -> Iterator[Any]:
    """The model as ``row`` runs it: unwrapped, or wrapped with the row's policy (and its scorer) for the block."""
    import tokcompress as tc

    if row["policy"] == "unwrapped":
        yield model
    else:
        extra: dict[str, Any] = {}
        if scorers and row["policy"] in scorers:
            extra["scorer"], extra["processor"] = scorers[row["policy"]]
        with tc.compressed(
            model,
            row["policy"],
            None if row["policy"] == "none" or row.get("fixed") else row["retain"],
            **row["params"],
            **extra,
        ) as wrapped:
            yield wrapped


def _scorers(
    args: argparse.Namespace, model: Any, processor: Any, names: Sequence[str]
) -> tuple[dict[str, tuple[Any, Any]], dict[str, str]]:
    """``{policy: (scorer, wrapped model's processor)}`` for the scorer policies among ``names``, and descriptions."""
    from tokcompress.scorers import CLIPScorer, QuoTAScorer

    scorers: dict[str, tuple[Any, Any]] = {}
    described: dict[str, str] = {}
    if "quota" in names:
        if args.quota_scorer == "self":
            scorers["quota"] = (QuoTAScorer(model=model, processor=processor), processor)
            described["quota"] = "QuoTAScorer: the benchmarked model itself"
        else:
            from transformers import AutoModelForImageTextToText, AutoProcessor

            vlm = AutoModelForImageTextToText.from_pretrained(args.quota_scorer, dtype=model.dtype).to(args.device)
            scorer = QuoTAScorer(model=vlm.eval(), processor=AutoProcessor.from_pretrained(args.quota_scorer))
            scorers["quota"] = (scorer, processor)
            described["quota"] = f"QuoTAScorer: {args.quota_scorer}"
    if "free_video_llm" in names:
        if args.clip == "tiny":
            from tokcompress.tiny import build_clip

            clip, clip_processor = build_clip()
            described["free_video_llm"] = "CLIPScorer: tokcompress.tiny.build_clip() (random weights)"
        else:
            from transformers import CLIPModel, CLIPProcessor

            clip = CLIPModel.from_pretrained(args.clip, dtype=model.dtype)
            clip_processor = CLIPProcessor.from_pretrained(args.clip)
            described["free_video_llm"] = f"CLIPScorer: {args.clip}"
        clip = clip.to(args.device, model.dtype).eval()
        scorers["free_video_llm"] = (CLIPScorer(clip, clip_processor), processor)
    return scorers, described


def _policy_runs(
    model: Any,
    inputs: dict[str, Any],
    args: argparse.Namespace,
    names: Sequence[str],
    scorers: dict[str, tuple[Any, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Every row: first its untimed facts, then the timed repeats, interleaved over the rows.

    Interleaving (repeat 1 of every row, then repeat 2, ...) makes a drift in machine speed (other
    jobs, clock changes) hit every row alike instead of whichever rows ran during it.
    """
    import tokcompress as tc
    from tokcompress.timing import PARTS, Timing, ttft_split

    retains = [float(r) for r in args.retain.split(",")] if args.retain else list(DEFAULT_RETAIN)
    rows: list[dict[str, Any]] = [{"policy": "unwrapped", "retain": 1.0, "params": {}, "label": "unwrapped model"}]
    for name in names:
        fixed = name in common.FIXED_BUDGET
        for retain in [1.0] if name == "none" else [None] if fixed else retains:
            params = {} if name == "none" else dict(common.POLICY_PARAMS.get(name, {}))
            rows.append({"policy": name, "retain": retain, "params": params, **({"fixed": True} if fixed else {})})
    bare = BareLM(model) if args.bare else None
    with torch.no_grad():  # the first calls of a process are slower: keep them out of every row
        for _ in range(2):
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
    progress = _progress(len(rows) * (1 + args.repeats))
    timings: dict[int, tuple[Timing, dict[str, Timing]]] = {}

    def attempt(row: dict[str, Any], step: Any) -> None:
        start = time.perf_counter()
        try:
            with _as_row(model, row, scorers) as wrapped:
                if row["policy"] != "unwrapped":
                    row["label"] = tc.policy_of(wrapped).label
                step(wrapped)
        except Exception as err:  # one broken policy must not hide the others' numbers
            row["error"] = f"{type(err).__name__}: {err}"
            row["traceback"] = traceback.format_exc(limit=6)
        row["bench_seconds"] = row.get("bench_seconds", 0.0) + time.perf_counter() - start
        progress(f"{row.get('label', row['policy'])}" + (f"  ERROR {row['error']}" if "error" in row else ""))

    for row in rows:
        attempt(row, lambda m, row=row: row.update(_profile(m, inputs, args, bare)))
        if row.get("fixed"):  # a fixed-size policy: its retain is the fraction it kept
            before, after = row.get("video_tokens_before"), row.get("video_tokens_after")
            row["retain"] = round(after / before, 4) if before else float("nan")
    for _ in range(args.repeats):
        timed_lengths: set[int] = set()
        for i, row in enumerate(rows):
            if "error" in row:
                progress(row["policy"])
                continue
            length = row.get("bare_length")
            if bare is not None and length is not None and length not in timed_lengths:
                bare.time_once(length)  # interleaved like the rows: the same machine state
                timed_lengths.add(length)

            def timed(m: Any, i: int = i) -> None:
                total, parts = ttft_split(m, inputs, repeats=1, warmup=0)
                seconds, split = timings.setdefault(i, (Timing(), {name: Timing() for name in PARTS} if parts else {}))
                seconds.seconds += total.seconds
                for name, part in parts.items():
                    split[name].seconds += part.seconds

            attempt(row, timed)
    for i, row in enumerate(rows):
        if "error" in row or i not in timings:
            continue
        total, parts = timings[i]
        if bare is not None and row.get("bare_length") in bare.seconds:
            row["bare_lm_s"] = statistics.median(bare.seconds[row["bare_length"]])
        row["ttft"] = total.as_dict()
        row["parts"] = {k: v.as_dict() for k, v in parts.items()}
        if parts:
            row["scorer_s"] = statistics.median(parts["scorer"].seconds)
            lm = [
                p + e + f for p, e, f in zip(parts["policy"].seconds, parts["engine"].seconds, parts["prefill"].seconds)
            ]
            row["lm_s"] = statistics.median(lm)
    return rows


def _progress(total: int):
    try:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="ttft", unit="run", file=sys.stderr)

        def step(text: str) -> None:
            bar.set_postfix_str(text[:60])
            bar.update(1)
            if bar.n == total:
                bar.close()

        return step
    except ImportError:  # pragma: no cover
        return lambda text: print(text, file=sys.stderr)


def derive(runs: list[dict[str, Any]]) -> None:
    """Speedups and ratios of every row against the unwrapped model and ``none``."""
    by_name = {r["policy"]: r for r in runs if "error" not in r and r["policy"] in ("unwrapped", "none")}
    base = by_name.get("unwrapped")
    none = by_name.get("none")
    full_flops = (base or none or {}).get("flops", {}).get("total")
    full_prefill = none["parts"]["prefill"]["median_s"] if none and none.get("parts") else None
    full_bare = (base or none or {}).get("bare_lm_s")
    none_vision = none["parts"]["vision"]["median_s"] if none and none.get("parts") else None
    for r in runs:
        if "error" in r:
            continue
        if base:
            r["ttft_speedup"] = base["ttft"]["median_s"] / r["ttft"]["median_s"]
        if full_flops:
            r["flops_ratio"] = r["flops"]["total"] / full_flops
        if full_prefill and r.get("lm_s") is not None:
            r["lm_ratio"] = r["lm_s"] / full_prefill
            r["lm_speedup"] = full_prefill / r["lm_s"]
            if r.get("flops_ratio"):
                r["gap"] = r["lm_ratio"] / r["flops_ratio"]
            saved = full_prefill - r["parts"]["prefill"]["median_s"]
            # signals a policy captures in the vision tower (attention maps, ...) are part of its cost
            r["vision_extra_s"] = max(0.0, r["parts"]["vision"]["median_s"] - none_vision) if none_vision else 0.0
            overhead = (
                r["parts"]["policy"]["median_s"]
                + r["parts"]["scorer"]["median_s"]
                + r["parts"]["engine"]["median_s"]
                + r["vision_extra_s"]
            )
            r["overhead_share"] = overhead / saved if saved > 0 else None
        if full_bare and r.get("bare_lm_s") is not None:
            r["bare_ratio"] = r["bare_lm_s"] / full_bare
        if r.get("video_tokens_before"):
            # after the last in-layer stage, if any: the share of video tokens the deepest layers see
            after = r["layer_stages"][-1]["after"] if r.get("layer_stages") else r["video_tokens_after"]
            r["retained_fraction"] = after / r["video_tokens_before"]
        if r["policy"] not in ("unwrapped", "none") and math.isclose(r["retain"], GOAL_RETAIN) and "gap" in r:
            r["meets_goal"] = r["gap"] <= GOAL_GAP


def profile_misses(model: Any, inputs: dict[str, Any], runs: list[dict[str, Any]], top: int = 15) -> None:
    """For rows that miss the goal: the torch profiler's top operators of one call, into ``row["profile"]``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if model.device.type == "cuda" else [])
    sort = "self_cuda_time_total" if model.device.type == "cuda" else "self_cpu_time_total"
    for row in runs:
        if row.get("meets_goal") is not False:
            continue
        with _as_row(model, row) as wrapped, torch.no_grad():
            wrapped.generate(**inputs, max_new_tokens=1, do_sample=False)
            with profile(activities=activities) as prof:
                wrapped.generate(**inputs, max_new_tokens=1, do_sample=False)
        row["profile"] = prof.key_averages().table(sort_by=sort, row_limit=top)


# --------------------------------------------------------------------------- outputs


def _ms(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds * 1000:.0f}" if seconds >= 0.1 else f"{seconds * 1000:.1f}"


def _mb(value: int | None) -> str:
    return "–" if value is None else f"{value / 2**20:.1f}"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _x(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    """The results table (Markdown) with what was timed and on what."""
    cfg, mach = result["config"], result["machine"]
    device = mach.get("gpu") or f"{mach['cpu']} ({mach['cpu_cores']} cores, {mach['torch_threads']} torch threads)"
    model = cfg.get("shape") or cfg.get("model")
    lines = [
        f"Model: {model}; {cfg['frames']} frames, prompt {cfg['prompt_length']} tokens ({cfg['video_tokens']} video), "
        f"{cfg['dtype']}, attention {cfg['attn']}. Device: {device}. "
        f"TTFT = median of {cfg['repeats']} runs of `generate(max_new_tokens=1)` after {cfg['warmup']} warm-up; "
        f"decode {_ms(result['decode']['median_s'])} ms + preprocess {_ms(result['preprocess']['median_s'])} ms come before it "
        "(same for every row).",
        "",
        "| policy | retain | video tokens | TTFT ms (p90) | TTFT speedup | vision | policy | engine | prefill | "
        "LM ratio | bare LM ratio | FLOPs ratio | gap | overhead | KV MiB | peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        if "error" in r:
            lines.append(f"| {r['policy']} | {r['retain']:g} | error: {r['error'][:80]} |" + " |" * 13)
            continue
        parts = r.get("parts") or {}
        med = {k: v["median_s"] for k, v in parts.items()}
        tokens = (
            "–" if r.get("video_tokens_before") is None else f"{r['video_tokens_after']}/{r['video_tokens_before']}"
        )
        for stage in r.get("layer_stages") or []:
            tokens += f", {stage['after']} from layer {stage['layer']}"
        policy = _ms(med.get("policy"))
        if med.get("scorer"):
            policy += f" + {_ms(med['scorer'])} scorer"
        gap = _x(r.get("gap"))
        if "meets_goal" in r:
            gap += " ✓" if r["meets_goal"] else " ✗"
        lines.append(
            f"| {r['policy']} | {r['retain']:g} | {tokens} | {_ms(r['ttft']['median_s'])} ({_ms(r['ttft']['p90_s'])}) | "
            f"{_x(r.get('ttft_speedup'))}x | {_ms(med.get('vision'))} | {policy} | {_ms(med.get('engine'))} | "
            f"{_ms(med.get('prefill'))} | {_x(r.get('lm_ratio'), 3)} | {_x(r.get('bare_ratio'), 3)} | "
            f"{_x(r.get('flops_ratio'), 3)} | {gap} | {_pct(r.get('overhead_share'))} | "
            f"{_mb(r.get('kv_cache_bytes'))} | {_mb(r.get('peak_memory_bytes'))} |"
        )
    lines += [
        "",
        "Times in ms (medians). LM ratio = (policy + engine + prefill) / prefill of `none`; bare LM ratio = the "
        "language model alone on random embeddings of the kept length / of the full length (what the model itself "
        "costs, no tokcompress); FLOPs ratio = analytic prefill FLOPs / uncompressed; gap = LM ratio / FLOPs ratio "
        f"(goal at retain {GOAL_RETAIN:g}: gap ≤ {GOAL_GAP}, ✓/✗); overhead = (policy + scorer + engine + vision time above "
        "`none`'s) / prefill time saved. `policy` shows the scorer model's time after a `+` where a policy has one "
        "(QuoTA, Free Video-LLM): it runs before the first token, so TTFT includes it. LM ratio above bare LM ratio is tokcompress's "
        "overhead; bare LM ratio above FLOPs ratio is the model running short sequences less efficiently. "
        "`vision` includes the signals a policy captures in the vision tower (attention maps for FastVID, HoliTom, "
        "VisionZip, ...): compare it with `none`'s.",
    ]
    for r in result["runs"]:
        if r.get("profile"):
            lines += [
                "",
                f"Profile of one call, {r['label']} (top operators):",
                "",
                "```",
                r["profile"].rstrip(),
                "```",
            ]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str | os.PathLike) -> None:
    """Pareto plot: TTFT speedup and LM-prefill speedup vs retained video tokens, one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = [r for r in result["runs"] if "error" not in r and r["policy"] not in ("unwrapped", "none")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    names = sorted({r["policy"] for r in rows})
    colors = plt.get_cmap("tab20")
    for k, name in enumerate(names):
        mine = sorted((r for r in rows if r["policy"] == name), key=lambda r: r.get("retained_fraction", r["retain"]))
        xs = [r.get("retained_fraction", r["retain"]) for r in mine]
        style = dict(marker="osD^v<>"[k % 7], color=colors(k % 20), label=name, ms=4)
        axes[0].plot(xs, [r.get("ttft_speedup", float("nan")) for r in mine], **style)
        axes[1].plot(xs, [r.get("lm_speedup", float("nan")) for r in mine], **style)
    # the limit as a function of the kept share holds for input-stage pruning; rows with in-layer stages
    # (their x is the share the deepest layers see) get their own limit as a short bar
    bound = sorted(
        (r.get("retained_fraction", r["retain"]), 1 / r["flops_ratio"])
        for r in rows
        if r.get("flops_ratio") and not r.get("layer_stages")
    )
    if bound:
        axes[1].plot(*zip(*bound), "k--", lw=1, label="FLOPs limit")
    staged = [(r.get("retained_fraction", r["retain"]), 1 / r["flops_ratio"]) for r in rows if r.get("layer_stages")]
    if staged:
        axes[1].plot(*zip(*staged), "k_", ms=9, label="FLOPs limit (in-layer stages)")
    bare = [(r.get("retained_fraction", r["retain"]), 1 / r["bare_ratio"]) for r in rows if r.get("bare_ratio")]
    if bare:
        axes[1].plot(*zip(*bare), "kx", ms=5, label="bare LM (no tokcompress)")
    model = result["config"].get("shape") or result["config"].get("model")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    for ax, title in zip(axes, ("TTFT speedup vs unwrapped", "LM prefill speedup vs none (incl. policy)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator([0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0]))
        ax.yaxis.set_major_locator(matplotlib.ticker.FixedLocator([0.2, 0.5, 1, 2, 3, 5, 10, 20, 30, 50, 100]))
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(plain)
            axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("retained video tokens (fraction)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("speedup (x)")
    axes[1].legend(fontsize=7, ncol=1, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(f"{model} — {result['machine'].get('gpu') or result['machine']['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from tokcompress.flops import LMShape
    from tokcompress.hf import prepare_inputs, read_clip
    from tokcompress.timing import time_call

    if args.model and args.shape:
        raise SystemExit("choose one of --model and --shape")
    if args.video and not args.model:
        raise SystemExit("--video goes with --model (the default and --shape use a synthetic video)")
    names = common.policies(args.policies)
    torch.manual_seed(0)
    model, processor, desc = _setup(args)
    with tempfile.TemporaryDirectory() as folder:
        path = _video_path(args, desc["frames"], desc["video_size"], folder)
        frames = desc["frames"]
        decode = time_call(lambda: read_clip(path, max_frames=frames), repeats=args.repeats, warmup=1)
        clip = read_clip(path, max_frames=frames)
        preprocess = time_call(
            lambda: prepare_inputs(processor, [clip], [args.question]), repeats=args.repeats, warmup=1
        )
    inputs = {
        k: (
            (v.to(args.device, model.dtype) if torch.is_floating_point(v) else v.to(args.device))
            if torch.is_tensor(v)
            else v
        )
        for k, v in prepare_inputs(processor, [clip], [args.question]).items()
    }

    scorers, scorer_desc = _scorers(args, model, processor, names)
    runs = _policy_runs(model, inputs, args, names, scorers)
    derive(runs)
    if args.profile:
        profile_misses(model, inputs, runs)
    video_tokens = next((r["video_tokens_before"] for r in runs if r.get("video_tokens_before")), None)
    result = {
        "schema": "tokcompress.ttft/1",
        "what_was_timed": WHAT_WAS_TIMED,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": common.machine(args.device),
        "versions": common.versions(),
        "config": {
            **desc,
            "question": args.question,
            "dtype": str(model.dtype).replace("torch.", ""),
            "attn": args.attn,
            "device": args.device,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "prompt_length": int(inputs["input_ids"].shape[1]),
            "video_tokens": video_tokens,
            "policies": names,
            "policy_params": {n: common.POLICY_PARAMS.get(n, {}) for n in names},
            "scorers": scorer_desc,
            "lm": dataclasses.asdict(LMShape.from_config(model.config)),
            "command": " ".join(["python -m benchmarks.ttft", *(argv if argv is not None else sys.argv[1:])]),
        },
        "decode": decode.as_dict(),
        "preprocess": preprocess.as_dict(),
        "runs": runs,
    }
    write_outputs(result, args.out, args.tag or _default_tag(args, desc))
    return result


def _default_tag(args: argparse.Namespace, desc: dict[str, Any]) -> str:
    device = torch.device(args.device).type
    what = (
        desc.get("shape")
        if desc["kind"] == "shape"
        else desc.get("model") if desc["kind"] == "checkpoint" else "default"
    )
    return common.slug(f"{what}-{device}")


def write_outputs(result: dict[str, Any], out: str | os.PathLike, tag: str) -> dict[str, Path]:
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / f"ttft-{tag}.json", "md": folder / f"ttft-{tag}.md", "png": folder / f"ttft-{tag}.png"}
    paths["json"].write_text(json.dumps(result, indent=1, default=str) + "\n")
    paths["md"].write_text(markdown(result) + "\n")
    try:
        plot(result, paths["png"])
    except ImportError as err:  # matplotlib is the [viz] extra
        print(f"no plot ({err}); pip install tokcompress[viz]", file=sys.stderr)
        paths.pop("png")
    print(markdown(result))
    for kind, path in paths.items():
        print(f"{kind}: {path}", file=sys.stderr)
    return paths


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.ttft",
        description="TTFT, prefill FLOPs and memory of every registered policy x retain ratio.",
        epilog=f"shipped shapes: {', '.join(common.shape_names())}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = parser.add_mutually_exclusive_group()
    what.add_argument(
        "--shape", help="a real architecture with random weights: a name from benchmarks/shapes/ or a JSON path"
    )
    what.add_argument("--model", help="a Hugging Face model id or local folder (real weights)")
    parser.add_argument("--video", help="video file for --model (default: a synthetic clip written with PyAV)")
    parser.add_argument("--frames", type=int, help="frames sampled per video (default: the shape's, 32)")
    parser.add_argument("--question", default="What is moving in this video, and where does it go?")
    parser.add_argument("--policies", help="comma-separated policy names (default: every registered policy)")
    parser.add_argument(
        "--retain", help=f"comma-separated retain ratios (default: {','.join(map(str, DEFAULT_RETAIN))})"
    )
    parser.add_argument(
        "--quota-scorer",
        default="self",
        help="QuoTA's frame scorer: 'self' (the benchmarked model, default) or a Hugging Face VLM id; timed inside TTFT",
    )
    parser.add_argument(
        "--clip",
        default="tiny",
        help="free_video_llm's CLIP: 'tiny' (random weights, default) or a CLIPModel id, e.g. "
        "openai/clip-vit-large-patch14-336; timed inside TTFT",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", default="auto", help="auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16"
    )
    parser.add_argument("--attn", default="sdpa", help="attention implementation (sdpa, eager, flash_attention_2)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory run")
    parser.add_argument("--no-bare", dest="bare", action="store_false", help="skip timing the bare language model")
    parser.add_argument(
        "--profile", action="store_true", help=f"profile one call of every row that misses the goal (gap > {GOAL_GAP})"
    )
    parser.add_argument("--out", default=str(common.RESULTS_DIR), help="output folder (default: benchmarks/results)")
    parser.add_argument("--tag", help="file name tag (default: from the model and device)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
