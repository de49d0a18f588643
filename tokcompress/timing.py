"""Time-to-first-token measurement shared by the demo, ``compare`` and the benchmarks.

TTFT here is the wall time of ``model.generate(**inputs, max_new_tokens=1)``: vision encoding, the
policy, the language-model prefill and the first token, on inputs that are already processed. On
CUDA the clock is read after ``torch.cuda.synchronize``.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn


@dataclass
class Timing:
    """Seconds per repeat, with the summary people quote."""

    seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def p90(self) -> float:
        ordered = sorted(self.seconds)
        return ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]

    def as_dict(self) -> dict[str, Any]:
        return {"median_s": self.median, "p90_s": self.p90, "repeats": len(self.seconds), "all_s": list(self.seconds)}


def _sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], *, repeats: int = 3, warmup: int = 1, device: Any = None) -> Timing:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times timed."""
    for _ in range(warmup):
        fn()
    timing = Timing()
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        timing.seconds.append(time.perf_counter() - start)
    return timing


@torch.no_grad()
def ttft(model: nn.Module, inputs: dict[str, Any], *, repeats: int = 3, warmup: int = 1) -> Timing:
    """Wall time of ``generate(max_new_tokens=1)`` (greedy), see the module docstring."""
    device = next(model.parameters()).device
    return time_call(
        lambda: model.generate(**inputs, max_new_tokens=1, do_sample=False),
        repeats=repeats,
        warmup=warmup,
        device=device,
    )
