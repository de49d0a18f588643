"""Helpers shared by the benchmark scripts: model shapes, the machine, versions, policy lists."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPES_DIR = Path(__file__).resolve().parent / "shapes"
RESULTS_DIR = Path(__file__).resolve().parent / "results"

#: Extra constructor arguments per policy, where its defaults are not what a benchmark wants.
#: Every registered policy runs; only those listed here get more than ``retain``.
POLICY_PARAMS: dict[str, dict[str, Any]] = {
    "random": {"seed": 0},
}

#: Policies whose token count is set by their own parameters (no ``retain`` budget): benchmarks run
#: them once, at the reference setting.
FIXED_BUDGET: frozenset[str] = frozenset({"free_video_llm"})


def policies(names: str | None = None) -> list[str]:
    """Registered policies (``none`` first), or the comma-separated ``names`` after checking them."""
    import tokcompress as tc

    known = tc.available_policies()
    if names:
        chosen = [n.strip() for n in names.split(",") if n.strip()]
        unknown = [n for n in chosen if n not in known]
        if unknown:
            raise SystemExit(f"unknown policies {unknown}; registered: {', '.join(known)}")
    else:
        chosen = known
    return sorted(chosen, key=lambda n: (n != "none", n))


def shape_names() -> list[str]:
    return sorted(p.stem for p in SHAPES_DIR.glob("*.json"))


def load_shape(name: str) -> dict[str, Any]:
    """A shape spec by name (``benchmarks/shapes/<name>.json``) or path."""
    path = Path(name)
    if path.suffix != ".json":
        path = SHAPES_DIR / f"{name}.json"
    if not path.exists():
        raise SystemExit(f"unknown shape {name!r}; shipped shapes: {', '.join(shape_names())} (or give a JSON path)")
    spec = json.loads(path.read_text())
    spec.setdefault("name", path.stem)
    return spec


_TOKEN_KEYS = (
    "image_token_index",
    "video_token_index",
    "image_token_id",
    "video_token_id",
    "vision_start_token_id",
    "vision_end_token_id",
)
_TEXT_TOKEN_KEYS = ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")


def shape_config(spec: dict[str, Any]) -> tuple[Any, Any]:
    """``(config, processor)`` of a shape: the real architecture, the tiny tokenizer's vocabulary and ids.

    The processor is the family's real processor class from :func:`tokcompress.tiny.build_config`
    with the spec's frame geometry; the config is the spec's (the checkpoint's) with the token ids
    and vocabulary size of that processor's tokenizer.
    """
    from tokcompress.tiny import build_config

    geometry = dict(spec.get("processor", {}))
    geometry["frames"] = int(spec["video"]["frames"])
    tiny_config, processor = build_config(spec["family"], **geometry)
    config = type(tiny_config).from_dict(json.loads(json.dumps(spec["config"])))
    for key in _TOKEN_KEYS:
        if hasattr(tiny_config, key):
            setattr(config, key, getattr(tiny_config, key))
    text, tiny_text = config.get_text_config(), tiny_config.get_text_config()
    for key in _TEXT_TOKEN_KEYS:
        setattr(text, key, getattr(tiny_text, key))
    return config, processor


def build_shape(
    spec: dict[str, Any], *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, attn: str = "sdpa"
) -> tuple[Any, Any]:
    """``(model, processor)`` of a shape with random weights, built directly on ``device``."""
    import transformers

    from tokcompress.tiny import _MODEL_CLASSES

    config, processor = shape_config(spec)
    model_cls = getattr(transformers, _MODEL_CLASSES[spec["family"]])
    with torch.device(device), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = model_cls._from_config(config, attn_implementation=attn, dtype=dtype)
    model.eval()
    processor.tokenizer.padding_side = "left"
    return model, processor


def count_parameters(spec: dict[str, Any], *, real_vocab: bool = True) -> int:
    """Parameters of a shape's architecture (built on the meta device: no memory, no time)."""
    import transformers

    from tokcompress.tiny import _MODEL_CLASSES

    if real_vocab:
        config = type(shape_config(spec)[0]).from_dict(json.loads(json.dumps(spec["config"])))
    else:
        config = shape_config(spec)[0]
    model_cls = getattr(transformers, _MODEL_CLASSES[spec["family"]])
    with torch.device("meta"):
        model = model_cls._from_config(config)
    seen, total = set(), 0
    for p in model.parameters():  # tied weights once
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_total() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def machine(device: str | torch.device) -> dict[str, Any]:
    """What ran the benchmark: CPU, cores, torch threads, memory, GPU."""
    info: dict[str, Any] = {
        "cpu": _cpu_name(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_bytes": _memory_total(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "device": str(device),
    }
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(torch.device(device))
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda)
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    return info


def versions() -> dict[str, Any]:
    import importlib.metadata as md

    out: dict[str, Any] = {}
    for name in ("tokcompress", "torch", "torchvision", "transformers", "accelerate", "av", "numpy", "lmms_eval"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            out["git_commit"] = commit.stdout.strip()
            out["git_dirty"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-._" else "-" for c in text).strip("-").lower()
