"""Time-to-first-token measurement shared by the demo, ``compare`` and the benchmarks.

TTFT here is the wall time of ``model.generate(**inputs, max_new_tokens=1)``: vision encoding, the
policy, the language-model prefill and the first token, on inputs that are already processed. On
CUDA the clock is read after ``torch.cuda.synchronize`` and the total is taken from CUDA events.

:func:`ttft_split` also splits each call of a wrapped model into parts, from the stamps the engine
writes into :attr:`tokcompress.RowRecord.clock` (each read after a device sync):

* ``vision``: from the call to the inner model's forward: ``generate``'s setup, the vision encoder
  and the projector (``generate`` encodes the media before the first forward);
* ``embed``: the inner model's own work before the language model (text embeddings, scattering the
  video features into them, position ids);
* ``policy``: the policy itself (input stage, plus in-layer stages when a policy has them);
* ``scorer``: the scorer model of a query-dependent policy (QuoTA, Free Video-LLM; 0 otherwise): it
  runs inside the prefill, so users wait for it before the first token;
* ``engine``: tokcompress's hook work around the policy (finding the videos, gathering the kept
  positions, masks, position ids);
* ``prefill``: the language model on the compacted sequence, the LM head and choosing the first
  token (in-layer policy time excluded, it is in ``policy``).

An unwrapped model has no stamps: only its total is measured.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

#: The parts :func:`ttft_split` reports for a wrapped model, in call order.
PARTS = ("vision", "embed", "policy", "scorer", "engine", "prefill")


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


def _is_cuda(device: Any) -> bool:
    return device is not None and torch.device(device).type == "cuda"


def _sync(device: torch.device | str | None) -> None:
    if _is_cuda(device):
        torch.cuda.synchronize(device)


class _Clock:
    """Wall time of one region: CUDA events on a GPU (after a sync), ``perf_counter`` elsewhere."""

    def __init__(self, device: Any) -> None:
        self.cuda = _is_cuda(device)
        self.device = device

    def __enter__(self) -> "_Clock":
        _sync(self.device)
        if self.cuda:
            self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self._events[0].record()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            self._events[1].record()
        _sync(self.device)
        self.end = time.perf_counter()
        self.seconds = self._events[0].elapsed_time(self._events[1]) / 1000.0 if self.cuda else self.end - self.start


def time_call(fn: Callable[[], Any], *, repeats: int = 3, warmup: int = 1, device: Any = None) -> Timing:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times timed."""
    for _ in range(warmup):
        fn()
    timing = Timing()
    for _ in range(repeats):
        with _Clock(device) as clock:
            fn()
        timing.seconds.append(clock.seconds)
    return timing


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def ttft(model: nn.Module, inputs: dict[str, Any], *, repeats: int = 3, warmup: int = 1) -> Timing:
    """Wall time of ``generate(max_new_tokens=1)`` (greedy), see the module docstring."""
    return time_call(
        lambda: model.generate(**inputs, max_new_tokens=1, do_sample=False),
        repeats=repeats,
        warmup=warmup,
        device=_device(model),
    )


def split_from_record(record: list[Any], start: float, end: float) -> dict[str, float]:
    """Seconds per part (:data:`PARTS`) of one call that ran from ``start`` to ``end`` (``perf_counter``).

    ``record`` is ``tokcompress.last_record(model)`` right after the call; raises if it holds no
    stamps from inside ``[start, end]`` (the call did not go through a compressed prefill).
    """
    if not record or not record[0].clock:
        raise RuntimeError("the model recorded no prefill stamps: is it wrapped, and did the inputs hold a video?")
    clock = record[0].clock
    if not start <= clock["inner_start"] <= clock["lm_start"] <= end:
        raise RuntimeError("the last record is not from this call (no compressed prefill happened in it)")
    input_policy = sum(row.seconds for row in record)
    scorer = sum(getattr(row, "scorer_seconds", 0.0) for row in record)
    layer_policy = sum(
        float(stage["seconds"])
        for row in record
        for stage in row.stages.values()
        if isinstance(stage, dict) and "seconds" in stage
    )
    return {
        "vision": clock["inner_start"] - start,
        "embed": clock["lm_hook_start"] - clock["inner_start"],
        "policy": input_policy + layer_policy,
        "scorer": scorer,
        "engine": clock["lm_start"] - clock["lm_hook_start"] - input_policy - scorer,
        "prefill": end - clock["lm_start"] - layer_policy,
    }


@torch.no_grad()
def ttft_split(
    model: nn.Module, inputs: dict[str, Any], *, repeats: int = 3, warmup: int = 1
) -> tuple[Timing, dict[str, Timing]]:
    """TTFT of ``generate(max_new_tokens=1)`` and, for a wrapped model, its parts (see the module docstring).

    Returns ``(total, parts)``; ``parts`` maps each name of :data:`PARTS` to its Timing (same repeats
    as ``total``), and is empty for a model that is not wrapped.
    """
    from .api import is_wrapped, last_record

    device = _device(model)
    wrapped = is_wrapped(model)

    def call() -> None:
        model.generate(**inputs, max_new_tokens=1, do_sample=False)

    for _ in range(warmup):
        call()
    total = Timing()
    parts: dict[str, Timing] = {name: Timing() for name in PARTS} if wrapped else {}
    for _ in range(repeats):
        with _Clock(device) as clock:
            call()
        total.seconds.append(clock.seconds)
        if wrapped:
            split = split_from_record(last_record(model) or [], clock.start, clock.end)
            for name in PARTS:
                parts[name].seconds.append(split[name])
    return total, parts


def cache_bytes(cache: Any) -> int:
    """Bytes the key/value tensors of a transformers cache hold (every layer, keys and values)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def peak_memory(fn: Callable[[], Any], device: Any) -> tuple[int, Any]:
    """Peak bytes of tensor memory allocated while ``fn`` runs, above what was allocated before; and ``fn()``.

    CUDA: ``torch.cuda.max_memory_allocated`` (exact for the caching allocator). CPU: the torch
    profiler's allocation events replayed in time order; a buffer allocated and freed inside one
    kernel is not seen, so this is a lower bound on the true peak.
    """
    if _is_cuda(device):
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        _sync(device)
        return int(torch.cuda.max_memory_allocated(device) - base), out
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = sorted(
        (e for e in prof.events() if e.self_cpu_memory_usage),
        key=lambda e: e.time_range.start,
    )
    current = peak = 0
    for event in events:
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return int(peak), out
