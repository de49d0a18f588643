"""Helpers for policies that read optional signals: documented substitutes and one-time warnings.

A policy lists the signals it can use in ``optional_needs``; the engine asks the adapter to capture
them when the model family can, and the policy falls back to a substitute computed from the tokens
themselves otherwise, warning once per policy and reason.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

_WARNED: set[tuple[str, str]] = set()


def warn_once(key: str, message: str) -> None:
    """Emit ``message`` as a UserWarning the first time ``(key, message)`` is seen in this process."""
    if (key, message) in _WARNED:
        return
    _WARNED.add((key, message))
    warnings.warn(message, UserWarning, stacklevel=3)


def feature_saliency(features: Tensor) -> Tensor:
    """Substitute for vision attention: ``(T, n, D) -> (T, n)``.

    Per frame, the attention that the frame's mean token would pay to each token if queries and keys
    were the tokens themselves: ``softmax_i(<x_i, mean_j x_j> / sqrt(D))``. It is the form FastVID's
    Qwen2.5-VL code uses on the vision tower (a mean query over the frame), applied to the
    language-model-space tokens, so it needs no model access. Computed in float32.
    """
    x = features.float()
    query = x.mean(dim=1, keepdim=True)  # (T, 1, D)
    logits = (x * query).sum(-1) / math.sqrt(x.shape[-1])
    return torch.softmax(logits, dim=-1)


def frame_mean(features: Tensor) -> Tensor:
    """Substitute for a frame's global feature: ``(T, n, D) -> (T, D)`` mean token, in float32.

    This is what FastVID's Qwen2.5-VL code uses as the global feature (the mean of the merged video
    embeddings of each temporal step).
    """
    return features.float().mean(dim=1)


__all__ = ["feature_saliency", "frame_mean", "warn_once"]
