"""Speed and memory of each policy alone, against a transcription of its reference's own formulation.

    python benchmarks/policy_speed.py            # 16/32/64/256 frames x 196 tokens, hidden 896 and 3584
    python benchmarks/policy_speed.py --quick    # 16 and 32 frames, hidden 896
    python benchmarks/policy_speed.py --policies divprune --frames 32 --dims 3584

For every (policy, frames, hidden size) it times ``policy(tokens)`` (median of ``--repeat`` runs
after one warm-up; one run when a run takes over 5 s) and the reference transcription on the same
inputs, and checks that both keep the same tokens.

Memory is the peak *extra resident memory* of the process during one call: the kernel's peak-RSS
counter (``VmHWM``) is reset through ``/proc/self/clear_refs`` and freed heap pages are handed back
(``malloc_trim``) just before the call, and the figure is ``VmHWM`` after it minus ``VmRSS`` before
it. It counts every allocation the call touches (torch tensors and anything else), not the inputs.
Linux only; elsewhere the column is empty.

Inputs: ``T`` frames of a 14x14 grid (LLaVA-OneVision's pooled SigLIP grid, 196 tokens), float32
features made of a per-cell base vector plus per-frame noise and a moving block (so static and
changing tokens both exist), and for pixel policies ``T`` frames of 3x378x378 pixels (the area
LLaVA-OneVision's 27x27 SigLIP patches cover) with a static background and a moving square.

Reference transcriptions live in this file, not in the library; they follow the references step by
step (full ``N x N`` distance matrix and the ``O(K^2 N)`` greedy for DivPrune; cosine similarity via
``torch.nn.functional.cosine_similarity`` and an ``argsort`` over all tokens for EVS; the
full-resolution frame differences and an ``argsort`` over all patches for EVS-pixel). A
transcription whose estimated memory exceeds ``--ref-limit-gb`` is skipped and reported as such.

Adding a policy = one entry in ``POLICIES``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import tokcompress
from tokcompress import Policy, TokenSet
from tokcompress.policies import DivPrune, EVS, EVSPixel

GRID = 14  # tokens per frame side
PIXEL_SIDE = 378  # pixels covered per frame side (27 patches x 14)
GiB = 1 << 30

# --------------------------------------------------------------------------------------------
# Reference transcriptions (retain -> reference parameters as the policies document)


class ReferenceTimeout(Exception):
    """A transcription passed ``DEADLINE``; ``done`` says how far it got."""

    def __init__(self, done: str) -> None:
        super().__init__(done)
        self.done = done


#: perf_counter() value after which long-running transcriptions stop (set per run).
DEADLINE = math.inf


def divprune_reference(tokens: TokenSet, retain: float) -> torch.Tensor:
    """vbdi/divprune ``DivPrune``: Dm = 1 - cos over all N tokens, greedy re-reducing the selected rows."""
    x = tokens.flat().float()
    k = max(1, int(round(retain * x.shape[0])))
    xn = x / x.norm(dim=1, keepdim=True)
    dm = 1.0 - xn @ xn.T
    s = torch.empty(k, dtype=torch.long)
    for i in range(k):
        if i == 0:
            scores = torch.topk(dm, 2, dim=0, largest=False).values[1, :]
        else:
            scores = torch.min(torch.index_select(dm, 0, s[:i]), dim=0).values
        s[i] = torch.argmax(scores)
        if time.perf_counter() > DEADLINE:
            raise ReferenceTimeout(f"{i + 1} of {k} greedy steps")
    return s.sort().values


def divprune_reference_bytes(t: int, n: int, d: int) -> int:
    return 2 * (t * n) ** 2 * 4  # Dm and the similarity matrix it is made from


def evs_reference(tokens: TokenSet, retain: float) -> torch.Tensor:
    """vLLM ``compute_retention_mask``: cosine to the previous frame, sentinel 255, argsort of everything."""
    t, h, w = tokens.grid
    e = tokens.features.reshape(t, h, w, -1)
    q = 1 - retain
    sim = F.cosine_similarity(e[1:], e[:-1], dim=-1)
    dis = torch.cat([255 * torch.ones_like(e[:1, :, :, 0]), 1 - sim], dim=0)
    order = torch.argsort(dis.view(-1), dim=-1, descending=True, stable=True)
    k = max(h * w, int(t * h * w * (1 - q)))
    mask = torch.zeros(t * h * w, dtype=torch.bool)
    mask[order[:k]] = True
    return mask.nonzero().squeeze(1)


def evs_reference_bytes(t: int, n: int, d: int) -> int:
    return 5 * t * n * d * 4  # two normalised copies, their product, and slices


def evs_pixel_reference(tokens: TokenSet, retain: float) -> torch.Tensor:
    """The paper's pixel EVS: L1 of full-resolution frame differences per patch, frame 0 kept, argsort of all."""
    t, h, w = tokens.grid
    p = tokens.signals["pixels"]
    c, hh, ww = p.shape[1:]
    diff = (p[1:] - p[:-1]).abs()  # (T-1, C, H, W), materialised
    patches = diff.reshape(t - 1, c, h, hh // h, w, ww // w)
    l1 = patches.sum(dim=(1, 3, 5)).reshape(t - 1, h * w)
    scores = torch.cat([torch.full((1, h * w), float("inf")), l1]).reshape(-1)
    order = torch.argsort(scores, descending=True, stable=True)
    q = 1 - retain
    k = max(h * w, int(t * h * w * (1 - q)))
    return order[:k].sort().values


def evs_pixel_reference_bytes(t: int, n: int, d: int) -> int:
    return 2 * t * 3 * PIXEL_SIDE**2 * 4


@dataclass(frozen=True)
class Bench:
    make: Callable[[float], Policy]
    reference: Callable[[TokenSet, float], torch.Tensor] | None = None
    reference_bytes: Callable[[int, int, int], int] | None = None
    pixels: bool = False  # needs the "pixels" signal
    uses_dim: bool = True  # False: the hidden size does not matter (run once per frame count)


#: name -> how to benchmark it. One line per policy.
POLICIES: dict[str, Bench] = {
    "evs": Bench(lambda r: EVS(retain=r), evs_reference, evs_reference_bytes),
    "evs_pixel": Bench(lambda r: EVSPixel(retain=r), evs_pixel_reference, evs_pixel_reference_bytes, True, False),
    "divprune": Bench(lambda r: DivPrune(retain=r), divprune_reference, divprune_reference_bytes),
}

# --------------------------------------------------------------------------------------------
# Inputs and measurement


def make_features(t: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = GRID * GRID
    x = torch.randn(1, n, d, generator=g).expand(t, n, d).clone()
    x += 0.3 * torch.randn(t, n, d, generator=g)
    for f in range(t):  # a 3x3 block of tokens that moves one cell per frame
        y, c = 5, f % (GRID - 3)
        cells = torch.tensor([(y + i) * GRID + c + j for i in range(3) for j in range(3)])
        x[f, cells] = torch.randn(9, d, generator=g) * 2
    return x


def make_pixels(t: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    side, cell = PIXEL_SIDE, PIXEL_SIDE // GRID
    frames = (torch.rand(1, 3, side, side, generator=g) * 2 - 1).expand(t, 3, side, side).clone()
    for f in range(t):
        y, x = 4 * cell, (f % (GRID - 2)) * cell
        frames[f, :, y : y + 2 * cell, x : x + 2 * cell] = 1.0
    return frames


def _status(key: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"{key}:\s+(\d+) kB", text)
    return int(match.group(1)) * 1024 if match else None


def _trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_extra_bytes(fn: Callable[[], object]) -> tuple[object, int | None]:
    """Run ``fn`` once; return its result and the peak extra resident memory during the call."""
    _trim()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        before = _status("VmRSS")
    except OSError:
        before = None
    out = fn()
    peak = _status("VmHWM")
    return out, (None if before is None or peak is None else max(0, peak - before))


def timed(fn: Callable[[], object], repeat: int) -> tuple[object, float, int | None]:
    """Median seconds of ``repeat`` runs (1 if the first takes over 5 s) and the peak memory of the first."""
    start = time.perf_counter()
    out, mem = peak_extra_bytes(fn)
    times = [time.perf_counter() - start]
    if times[0] < 5 and repeat > 0:
        fn()  # the measured first run doubled as warm-up; take fresh timings
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return out, statistics.median(times), mem


def run(args: argparse.Namespace, save: Callable[[list[dict]], None] = lambda rows: None) -> list[dict]:
    """Measure every case; ``save(rows)`` is called after each one, so partial results survive."""
    global DEADLINE
    from tqdm import tqdm

    jobs = []
    for name in args.policies:
        bench = POLICIES[name]
        for t in args.frames:
            for d in args.dims if bench.uses_dim else args.dims[:1]:
                jobs.append((name, t, d))
    rows = []
    cache: dict[tuple, TokenSet] = {}
    for name, t, d in tqdm(jobs, desc="policy_speed", unit="case"):
        bench = POLICIES[name]
        key = (t, d, bench.pixels)
        if key not in cache:
            cache.clear()
            signals = {"pixels": make_pixels(t)} if bench.pixels else {}
            cache[key] = TokenSet(features=make_features(t, d), grid=(t, GRID, GRID), signals=signals)
        tokens = cache[key]
        policy = bench.make(args.retain)
        kept, secs, mem = timed(lambda: policy(tokens).keep, args.repeat)
        row = {
            "policy": name, "frames": t, "tokens": tokens.num_tokens, "hidden": d if bench.uses_dim else None,
            "kept": int(kept.numel()), "seconds": secs, "peak_extra_bytes": mem,
            "ref_seconds": None, "ref_peak_extra_bytes": None, "ref_status": "none", "same_keep": None,
        }
        if bench.reference is not None and not args.no_reference:
            need = bench.reference_bytes(t, GRID * GRID, d) if bench.reference_bytes else 0
            if need > args.ref_limit_gb * GiB:
                n = tokens.num_tokens
                what = "N x N too large" if name == "divprune" else "too large"
                row["ref_status"] = f"skipped: {what} ({n} tokens, ~{need / GiB:.1f} GiB)"
            else:
                DEADLINE = time.perf_counter() + args.ref_timeout
                try:
                    ref_kept, ref_secs, ref_mem = timed(lambda: bench.reference(tokens, args.retain), args.repeat)
                except ReferenceTimeout as stop:
                    row["ref_status"] = f"timed out: > {args.ref_timeout:g} s ({stop.done})"
                else:
                    row.update(ref_seconds=ref_secs, ref_peak_extra_bytes=ref_mem, ref_status="ran",
                               same_keep=bool(torch.equal(ref_kept, kept)))
                finally:
                    DEADLINE = math.inf
        rows.append(row)
        save(rows)
    return rows


def _mib(b: int | None) -> str:
    return "" if b is None else f"{b / (1 << 20):,.0f}"


def markdown(rows: list[dict]) -> str:
    head = (
        "| policy | frames | tokens | hidden | kept | time (s) | peak extra MiB | reference time (s) "
        "| reference peak MiB | speed-up | same keep |\n|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        if r["ref_status"] == "ran":
            ref_t, ref_m = f"{r['ref_seconds']:.4f}", _mib(r["ref_peak_extra_bytes"])
            speed = f"{r['ref_seconds'] / r['seconds']:.1f}x"
        else:
            ref_t, ref_m, speed = r["ref_status"], "", ""
        same = "" if r["same_keep"] is None else ("yes" if r["same_keep"] else "**NO**")
        hidden = "-" if r["hidden"] is None else str(r["hidden"])
        lines.append(
            f"| {r['policy']} | {r['frames']} | {r['tokens']} | {hidden} | {r['kept']} | {r['seconds']:.4f} "
            f"| {_mib(r['peak_extra_bytes'])} | {ref_t} | {ref_m} | {speed} | {same} |"
        )
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 and 32 frames at hidden 896 only")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--frames", nargs="+", type=int, default=None)
    parser.add_argument("--dims", nargs="+", type=int, default=None)
    parser.add_argument("--retain", type=float, default=0.25)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--ref-limit-gb", type=float, default=3.0, help="skip transcriptions estimated above this")
    parser.add_argument("--ref-timeout", type=float, default=120.0, help="stop a transcription after this many seconds")
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--out", type=Path, default=Path("out/policy_speed"), help="writes OUT.json and OUT.md")
    args = parser.parse_args(argv)
    args.frames = args.frames or ([16, 32] if args.quick else [16, 32, 64, 256])
    args.dims = args.dims or ([896] if args.quick else [896, 3584])
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = {
        "torch": torch.__version__, "tokcompress": tokcompress.__version__, "threads": torch.get_num_threads(),
        "machine": platform.machine(), "processor": platform.processor() or platform.platform(),
        "retain": args.retain, "memory": "peak extra RSS during one call (VmHWM reset via clear_refs)",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save(rows: list[dict]) -> None:
        args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        args.out.with_suffix(".md").write_text(markdown(rows))

    rows = run(args, save)
    sys.stdout.write(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
