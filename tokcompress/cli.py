"""``tokcompress`` command line: ``tokcompress demo`` and ``tokcompress policies``.

``tokcompress demo`` with no arguments runs fully offline: a small LLaVA-OneVision-shaped model with
random weights (so its answers are gibberish; the point is the token counts and the timings), the
real processor classes, and a synthetic video written to disk and read back with PyAV. With
``--model ID --video PATH`` it does the same on a real checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Sequence

import torch

DEFAULT_QUESTION = "What is moving in this video, and where does it go?"
#: The embedded default model: LLaVA-OneVision's layout (SigLIP tower, 196 pooled tokens per frame,
#: one trailing newline) with a small Qwen2 language model, so a CPU shows the prefill savings.
DEMO_SHAPE = dict(hidden_size=256, num_hidden_layers=4, frames=16, image_size=112, patch_size=4)


@dataclass
class DemoRun:
    policy: str
    tokens_before: int
    tokens_after: int
    ttft_s: float
    answer: str


def _answer(model: Any, processor: Any, inputs: dict, max_new_tokens: int) -> str:
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1] :]
    return processor.batch_decode(new, skip_special_tokens=True)[0].strip()


def run_demo(
    model: Any,
    processor: Any,
    inputs: dict,
    policy: str,
    retain: float,
    *,
    max_new_tokens: int = 24,
    repeats: int = 3,
) -> list[DemoRun]:
    """Answer once uncompressed (``none``) and once with ``policy``; time both TTFTs."""
    import tokcompress as tc
    from tokcompress.timing import ttft

    runs = []
    for name, params in (("none", {}), (policy, {"retain": retain})):
        with tc.compressed(model, name, **params):
            timing = ttft(model, inputs, repeats=repeats, warmup=1)
            record = tc.last_record(model)
            answer = _answer(model, processor, inputs, max_new_tokens)
        before = sum(r.video_tokens_before for r in record or [])
        after = sum(r.video_tokens_after for r in record or [])
        runs.append(DemoRun(tc.build_policy(name, **params).label, before, after, timing.median, answer))
    return runs


def _offline_setup(question: str, frames: int) -> tuple[Any, Any, dict, str]:
    from tokcompress.tiny import build, make_inputs
    from tokcompress.video import read_video, synthetic_video, write_video

    shape = dict(DEMO_SHAPE, frames=frames)
    model, processor = build("llava_onevision", **shape)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "synthetic.mp4")
        write_video(path, synthetic_video(num_frames=4 * frames, height=128, width=128, seed=0), fps=8)
        video = read_video(path, num_frames=frames)
    inputs = dict(make_inputs(processor, video, question))
    where = (
        f"tiny LLaVA-OneVision (random weights; LM hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers), "
        f"synthetic {video.shape[1]}x{video.shape[2]} video, {len(video)} frames read back with PyAV"
    )
    return model, processor, inputs, where


def _checkpoint_setup(args: argparse.Namespace) -> tuple[Any, Any, dict, str]:
    from tokcompress.hf import load_pretrained, prepare_inputs

    if not args.video:
        raise SystemExit("--model needs --video PATH (a video file to ask about)")
    model, processor = load_pretrained(args.model, device=args.device, dtype=args.dtype)
    inputs = prepare_inputs(processor, [args.video], [args.question], max_frames=args.frames, fps=args.fps)
    inputs = {k: v.to(model.device) if hasattr(v, "to") else v for k, v in inputs.items()}
    return model, processor, inputs, f"{args.model} on {args.video}"


def _print_runs(runs: Sequence[DemoRun], where: str) -> None:
    print(f"model: {where}")
    print("TTFT = wall time of generate(max_new_tokens=1): vision encoding + policy + prefill + first token "
          "(median of 3 after 1 warm-up)")
    base = runs[0].ttft_s
    print(f"{'policy':<28} {'video tokens':>16} {'TTFT':>10} {'speedup':>8}")
    for r in runs:
        print(f"{r.policy:<28} {r.tokens_before:>7} -> {r.tokens_after:<6} {r.ttft_s * 1000:>8.1f}ms {base / r.ttft_s:>7.2f}x")
    for r in runs:
        print(f"\n[{r.policy}] answer: {r.answer!r}")


def demo(argv: Sequence[str] | None = None) -> list[DemoRun]:
    parser = argparse.ArgumentParser(prog="tokcompress demo", description=__doc__)
    parser.add_argument("--model", help="Hugging Face model id or local path (default: an offline tiny model)")
    parser.add_argument("--video", help="video file (required with --model)")
    parser.add_argument("--question", default=DEFAULT_QUESTION)
    parser.add_argument("--policy", default="uniform", help="a registered policy (see `tokcompress policies`)")
    parser.add_argument("--retain", type=float, default=0.25, help="fraction of video tokens kept, in (0, 1]")
    parser.add_argument("--frames", type=int, default=None, help="frames sampled from the video (default 16 offline, 32 with --model)")
    parser.add_argument("--fps", type=float, default=None, help="cap on the sampling rate (frames per second)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", help="torch dtype for --model (auto, bfloat16, float16, float32)")
    args = parser.parse_args(argv)
    import tokcompress as tc

    tc.build_policy(args.policy, retain=args.retain)  # refuse a bad name or retain before any loading
    if args.model:
        args.frames = args.frames or 32
        model, processor, inputs, where = _checkpoint_setup(args)
    else:
        if args.video:
            raise SystemExit("--video needs --model (the offline default uses its own synthetic video)")
        torch.manual_seed(0)
        model, processor, inputs, where = _offline_setup(args.question, args.frames or 16)
    runs = run_demo(model, processor, inputs, args.policy, args.retain, max_new_tokens=args.max_new_tokens)
    _print_runs(runs, where)
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: tokcompress {demo,policies} [options]\n\n"
              "  demo       answer a question about a video with and without compression (offline by default)\n"
              "  policies   list the registered policies")
        return 0
    command, rest = argv[0], argv[1:]
    if command == "demo":
        demo(rest)
        return 0
    if command == "policies":
        import tokcompress as tc

        print("\n".join(tc.available_policies()))
        return 0
    print(f"unknown command {command!r}; use demo or policies", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
