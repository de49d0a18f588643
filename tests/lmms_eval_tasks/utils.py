"""Video paths for the synthetic lmms-eval tasks: files in ``videos/`` next to this file.

Prompts and scoring are lmms-eval's own functions of the real benchmarks (named in the YAMLs).
The test copies this folder to a temporary place and writes the videos there with PyAV.
"""

import os

VIDEOS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "videos")


def _path(name):
    path = os.path.join(VIDEOS, name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"synthetic test video missing: {path}")
    return path


def videomme_doc_to_visual(doc):
    return [_path(doc["videoID"] + ".mp4")]


def mvbench_doc_to_visual(doc, lmms_eval_specific_kwargs=None):
    return [_path(doc["video"])]


def nextqa_doc_to_visual(doc):
    return [_path(str(doc["video"]) + ".mp4")]
