"""Fixtures for the lmms-eval tests: a saved tiny model whose answers are known, tasks, videos.

The model is ``tokcompress.tiny``'s LLaVA-OneVision with a few weights set by hand so that greedy
decoding always answers ``"A"`` and then ends the turn, whatever the video and question:

* the last decoder layer's attention adds a constant ``1e4 * e_0`` to every position (value
  projection zero with bias ``1e4`` on channel 0, output projection ``e_0 e_0^T``: softmax weights
  sum to one, so the attention output is that bias wherever it looks);
* the embedding of ``"A"`` is ``1e4 * e_1``;
* the LM head reads only channels 0 and 1: ``"A"`` gets ``1 * h_0``, end-of-turn gets ``2 * h_1``.

After any token but ``"A"`` the normalised last hidden state is about ``e_0`` (so ``"A"`` wins);
after ``"A"`` it is about ``(e_0 + e_1) / sqrt 2`` (so end-of-turn wins). Accuracies on the
synthetic tasks are therefore known in advance: each task's answers are A, A, A and one other
letter, so every task scores exactly 3/4, with or without compression.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

TASKS_DIR = Path(__file__).resolve().parent / "lmms_eval_tasks"
TASKS = ("tc_videomme", "tc_mvbench", "tc_nextqa")
#: Expected score of the always-"A" model on each task, in the task's own scale.
EXPECTED = {"tc_videomme": 75.0, "tc_mvbench": 75.0, "tc_nextqa": 0.75}
METRIC = {"tc_videomme": "videomme_perception_score", "tc_mvbench": "mvbench_accuracy", "tc_nextqa": "exact_match"}
VIDEOS = [f"clip{i}.mp4" for i in range(4)] + [f"{1000 + i}.mp4" for i in range(4)]
FRAMES = 8  # max_frames_num the tests ask for; the tiny OneVision model has 4x4 tokens per frame


def answer_a_model():
    """(model, processor): the tiny LLaVA-OneVision rigged as described in the module docstring."""
    from tokcompress.tiny import build

    model, processor = build("llava_onevision")
    tok = processor.tokenizer
    letter, end = tok.convert_tokens_to_ids("A"), tok.eos_token_id
    assert not model.config.tie_word_embeddings
    attn = model.model.language_model.layers[-1].self_attn
    with torch.no_grad():
        attn.v_proj.weight.zero_()
        attn.v_proj.bias.zero_()
        attn.v_proj.bias[0] = 1e4
        attn.o_proj.weight.zero_()
        attn.o_proj.weight[0, 0] = 1.0
        model.model.language_model.norm.weight.fill_(1.0)
        embed = model.get_input_embeddings().weight
        embed[letter].zero_()
        embed[letter, 1] = 1e4
        head = model.lm_head.weight
        head.zero_()
        head[letter, 0] = 1.0
        head[end, 1] = 2.0
    return model, processor


def make_eval_dir(root: Path) -> tuple[Path, Path]:
    """Write the rigged model (``root/model``) and the tasks with their videos (``root/tasks``)."""
    from tokcompress.video import synthetic_video, write_video

    model_dir, tasks_dir = root / "model", root / "tasks"
    model, processor = answer_a_model()
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    shutil.copytree(TASKS_DIR, tasks_dir, ignore=shutil.ignore_patterns("__pycache__"))
    (tasks_dir / "videos").mkdir()
    for i, name in enumerate(VIDEOS):
        write_video(tasks_dir / "videos" / name, synthetic_video(16, 64, 64, seed=i), fps=8)
    return model_dir, tasks_dir


def offline_env(root: Path) -> dict[str, str]:
    """Environment for lmms-eval runs that must not touch the network or the user's caches."""
    return {
        "HF_HOME": str(root / "hf_home"),
        "HF_DATASETS_CACHE": str(root / "hf_datasets"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "WANDB_MODE": "disabled",
        "NLTK_DATA": str(root / "nltk_data"),
        # lmms-eval's nextqa module calls nltk.download at import: make any HTTP attempt fail at once
        # (a refused local port) instead of waiting on a network that drops packets
        **{key: "http://127.0.0.1:9" for key in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")},
    }


def find_results(folder: Path) -> dict:
    """The ``*_results.json`` lmms-eval's CLI wrote somewhere under ``folder`` (exactly one)."""
    import json

    found = sorted(folder.rglob("*_results.json"))
    assert len(found) == 1, f"expected one results file under {folder}, found {found}"
    return json.loads(found[0].read_text())


def find_samples(folder: Path, task: str) -> dict[int, str]:
    """doc_id -> scored response, from the CLI's ``*_samples_<task>.jsonl``."""
    import json

    found = sorted(folder.rglob(f"*samples_{task}.jsonl"))
    assert len(found) == 1, f"expected one samples file for {task} under {folder}, found {found}"
    out = {}
    for line in found[0].read_text().splitlines():
        row = json.loads(line)
        resp = row.get("filtered_resps")
        while isinstance(resp, list):
            resp = resp[0]
        out[int(row["doc_id"])] = resp
    return out


def cpu_count_env() -> dict[str, str]:
    return {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"} if (os.cpu_count() or 1) <= 2 else {}
