"""Time tokcompress's dpc_knn / fastvid / holitom against step-by-step reference transcriptions.

    python benchmarks/fastholi_speed.py [--frames 16 32 64 256] [--dims 896 3584] [--device cpu]

Synthetic video features ``(T, 196, D)`` (14x14 tokens per frame: LLaVA-OneVision's layout) with a
static background, drifting regions and scene cuts, so the temporal logic is exercised. Prints one
row per (policy, T, D): reference seconds, tokcompress seconds, speed-up, and the extra peak memory
tokcompress needed (CUDA: ``max_memory_allocated``; CPU: peak RSS growth of a fresh subprocess).
The references are in ``benchmarks/reference_impls.py``; "dpc_knn" clusters one frame-sized set
of ``T * 196 / 8`` tokens (HoliTom-style static tokens) into 10%.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _load_refs():
    spec = importlib.util.spec_from_file_location("reference_impls", HERE / "reference_impls.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def synthetic(frames: int, dim: int, n: int = 196, seed: int = 0, device: str = "cpu"):
    """``(features (T, n, D), frame_global (T, 64), attn (T, n))`` of a video with 4 scenes."""
    g = torch.Generator().manual_seed(seed)
    scenes = 4
    base = torch.randn(scenes, n, dim, generator=g)
    scene_of = torch.arange(frames) * scenes // max(frames, 1)
    drift = torch.randn(frames, n, dim, generator=g).cumsum(0) * 0.02
    moving = torch.zeros(frames, n, dim)
    for t in range(frames):
        cols = (torch.arange(12) + t) % n
        moving[t, cols] = torch.randn(12, dim, generator=g)
    feats = base[scene_of] + drift + moving + 0.05 * torch.randn(frames, n, dim, generator=g)
    glob = torch.randn(scenes, 64, generator=g)[scene_of] + 0.1 * torch.randn(frames, 64, generator=g)
    attn = torch.softmax(torch.randn(frames, n, generator=g), dim=-1)
    return feats.to(device), glob.to(device), attn.to(device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time(fn, device: str, repeat: int) -> float:
    fn()  # warm-up
    _sync(device)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def cases(policy: str, frames: int, dim: int, device: str):
    """``(reference_fn, tokcompress_fn)`` closures for one configuration."""
    from tokcompress.cluster import dpc_knn
    from tokcompress.policies.fastvid import FastVID
    from tokcompress.policies.holitom import holitom_outer

    ref = _load_refs()
    feats, glob, attn = synthetic(frames, dim, device=device)
    if policy == "dpc_knn":
        x = feats.reshape(-1, dim)[:: 8][None]
        num = max(1, x.shape[1] // 10)
        return (lambda: ref.reference_dpc_knn(x, 7, num)), (lambda: dpc_knn(x, 7, num))
    if policy == "fastvid":
        pol = FastVID(retain=0.1, DySeg_c=8, DySeg_tau=0.9)
        return (
            lambda: ref.reference_fastvid(feats, glob, attn, 0.1, 8, 0.9, 0.4, 4, 0.6),
            lambda: pol.run(feats, glob, attn, "llava_onevision"),
        )
    if policy == "fastvid_video":
        pol = FastVID(retain=0.1, DySeg_c=8, DySeg_tau=0.9)
        return (
            lambda: ref.reference_fastvid(feats, glob, attn, 0.1, 8, 0.9, 0.4, 4, 0.6, version="llava_video"),
            lambda: pol.run(feats, glob, attn, "llava_video"),
        )
    if policy == "holitom":
        return (
            lambda: ref.reference_holitom(feats, attn, 0.15, 0.8),
            lambda: holitom_outer(feats, attn, 0.15, 0.8),
        )
    raise ValueError(policy)


_MEMORY_PROBE = """
import json, sys, torch
sys.path.insert(0, {here!r})
import fastholi_speed as b
ref, ours = b.cases({policy!r}, {frames}, {dim}, {device!r})
fn = ref if {which!r} == "reference" else ours
if {device!r}.startswith("cuda"):
    torch.cuda.synchronize(); base = torch.cuda.memory_allocated(); torch.cuda.reset_peak_memory_stats()
    fn(); torch.cuda.synchronize()
    print(json.dumps((torch.cuda.max_memory_allocated() - base) / 2**20))
else:
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    import gc; gc.collect()
    base = status("VmRSS:")
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS (VmHWM) to the current RSS
    fn()
    print(json.dumps(status("VmHWM:") - base))
"""


def peak_extra_mb(policy: str, frames: int, dim: int, device: str, which: str) -> float:
    """Extra peak memory (MiB) of one call beyond its inputs, in a fresh subprocess.

    CUDA: ``max_memory_allocated`` growth. CPU: growth of the peak resident set (Linux ``VmHWM``,
    reset just before the call), which includes allocator caching, so it is an upper bound.
    """
    code = _MEMORY_PROBE.format(here=str(HERE), policy=policy, frames=frames, dim=dim, device=device, which=which)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policies", nargs="+", default=["dpc_knn", "fastvid", "fastvid_video", "holitom"])
    parser.add_argument("--frames", nargs="+", type=int, default=[16, 32, 64, 256])
    parser.add_argument("--dims", nargs="+", type=int, default=[896, 3584])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--memory", action="store_true", help="also measure the extra peak memory")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--skip-reference-above", type=int, default=10**9, help="frames above which the reference is not timed")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()}")
    print(f"{'policy':<14}{'T':>5}{'D':>6}{'reference s':>13}{'tokcompress s':>15}{'speed-up':>10}{'extra MiB':>11}")
    for policy in args.policies:
        for dim in args.dims:
            for frames in args.frames:
                ref, ours = cases(policy, frames, dim, args.device)
                t_ours = _time(ours, args.device, args.repeat)
                t_ref = _time(ref, args.device, args.repeat) if frames <= args.skip_reference_above else float("nan")
                mem = peak_extra_mb(policy, frames, dim, args.device, "ours") if args.memory else float("nan")
                print(f"{policy:<14}{frames:>5}{dim:>6}{t_ref:>13.4f}{t_ours:>15.4f}{t_ref / t_ours:>10.2f}{mem:>11.1f}", flush=True)


if __name__ == "__main__":
    main()
