"""VisionZip: per frame, dominant tokens by vision-encoder attention plus contextual tokens merged by key similarity.

Paper: Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models", CVPR
2025. Reference: ``dvlab-research/VisionZip`` @ ``3151f6df4fca36a4cd1c985e5956e725b1f9ad02``
(``visionzip/clip_encoder.py::CLIPVisionTower_VisionZip.forward``, ``visionzip/utils.py::
CLIPAttention_forward``, ``visionzip/main.py::visionzip``); LLaVA-OneVision port: ``cokeshao/HoliTom``
``visionzip/`` (no public code of the authors for SigLIP towers).

Per frame of ``n`` tokens, with ``a`` the attention signal and ``k`` the keys averaged over heads:

1. dominant: the ``dominant`` tokens of largest ``a``;
2. the others ``R`` (ascending index); targets = positions ``0, s, 2s, ...`` *within* ``R``,
   ``s = max(1, |R| // contextual)``, the first ``contextual`` of them;
3. every other token of ``R`` joins the target of largest cosine between keys (ties to the lower one);
4. contextual token ``j`` = ``x[target_j] + mean(x[members of j])`` (the target plus the mean of its
   members, not an average including it; a target without members stays as it is).

Signals (``"vision_saliency"``, ``"vision_keys"``, from ``adapters/vision_signals.py``): on CLIP
towers with a CLS token (Video-LLaVA, LLaVA-NeXT-Video) ``a`` is the CLS row of the feature layer
summed over heads, as in the reference; the CLS token itself is a special token the engine always
keeps (the reference's "CLS counts as a dominant token"). On SigLIP towers (LLaVA-OneVision) ``a`` is the
attention each patch receives averaged over heads and queries, and ``a`` and the keys are pooled
bilinearly to the token grid, as in the port.

Where tokcompress differs. The reference merges the tower's hidden states before the projector;
tokcompress merges the projector outputs the language model receives (identical for dominant tokens;
for contextual tokens the projector's nonlinearity makes the two differ), which is what the
LLaVA-OneVision port does. Each contextual token takes its target's position, so dominant and
contextual tokens stay in position order (the reference appends the contextual tokens after the
dominant ones and numbers positions consecutively; ``positions="compacted"`` renumbers, in position order). When fewer than ``contextual`` tokens remain every
remaining token is its own target (the reference fails with a shape error).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..errors import MissingSignalError
from ..policy import Policy, check_positions, check_retain, keep_count
from ..registry import register
from ..tokens import Compression, TokenSet, selection

#: The port's split of a per-frame budget S: ``dominant = int(S * 54 / 64)`` (LLaVA-1.5's 54 + 10).
DOMINANT_SHARE = (54, 64)


@dataclass
class VisionZipResult:
    """VisionZip on ``T`` frames of ``n`` tokens.

    Attributes:
        keep: ``(K,)`` int64 sorted flat indices ``t * n + i`` of the dominant tokens and the targets.
        values: ``(K, D)`` output tokens in ``keep`` order (dominant copies, merged contextual tokens).
        dominant: ``(T, dominant)`` int64 dominant token indices per frame, ascending.
        targets: ``(T, c)`` int64 target token index of each contextual token, ascending.
        ctx_assign: ``(T, n)`` int64 contextual token of each token, -1 for dominant tokens.
        contextual: ``(T, c, D)`` the contextual tokens (target order).
    """

    keep: Tensor
    values: Tensor
    dominant: Tensor
    targets: Tensor
    ctx_assign: Tensor
    contextual: Tensor


def visionzip(saliency: Tensor, keys: Tensor, features: Tensor, dominant: int, contextual: int) -> VisionZipResult:
    """VisionZip's selection and merge on every frame at once.

    Args:
        saliency: ``(T, n)`` attention signal; the ``dominant`` largest are kept per frame.
        keys: ``(T, n, d)`` keys averaged over heads (compared by cosine).
        features: ``(T, n, D)`` tokens to keep and merge.
        dominant: tokens kept by attention per frame, ``0 <= dominant <= n``.
        contextual: merged tokens per frame, ``>= 0`` (capped at the ``n - dominant`` remaining tokens).
    """
    t, n, d = features.shape
    if not 0 <= dominant <= n or contextual < 0:
        raise ValueError(f"need 0 <= dominant <= {n} and contextual >= 0; got dominant={dominant}, contextual={contextual}")
    device = features.device
    dom = torch.topk(saliency.float(), dominant, dim=1).indices.sort(dim=1).values  # (T, dominant)
    rest_mask = torch.ones(t, n, dtype=torch.bool, device=device)
    rest_mask.scatter_(1, dom, False)
    rest = rest_mask.nonzero()[:, 1].reshape(t, n - dominant)  # ascending per frame
    r = n - dominant
    c = min(contextual, r)
    ctx_assign = torch.full((t, n), -1, dtype=torch.long, device=device)
    x = features.float()
    if c == 0:
        targets = rest[:, :0]
        merged = x.new_zeros(t, 0, d)
    else:
        step = max(1, r // c)
        slots = torch.arange(0, r, step, device=device)[:c]
        targets = rest[:, slots]  # (T, c)
        k = keys.float().gather(1, rest[..., None].expand(-1, -1, keys.shape[-1]))
        k = k / k.norm(dim=-1, keepdim=True)
        is_target = torch.zeros(r, dtype=torch.bool, device=device)
        is_target[slots] = True
        sim = k[:, ~is_target] @ k[:, slots].transpose(1, 2)  # (T, r - c, c)
        member_of = sim.argmax(-1)
        others = rest[:, ~is_target]
        ctx_assign.scatter_(1, targets, torch.arange(c, device=device).expand(t, c))
        ctx_assign.scatter_(1, others, member_of)
        sums = x.new_zeros(t, c, d).scatter_add_(1, member_of[..., None].expand(-1, -1, d), x.gather(1, others[..., None].expand(-1, -1, d)))
        counts = torch.zeros(t, c, device=device).scatter_add_(1, member_of, torch.ones_like(member_of, dtype=torch.float32))
        merged = x.gather(1, targets[..., None].expand(-1, -1, d)) + sums / counts.clamp(min=1)[..., None]
    frame = torch.arange(t, device=device)[:, None] * n
    out = x.clone()
    out.scatter_(1, targets[..., None].expand(-1, -1, d), merged)
    chosen = torch.cat([dom, targets], dim=1) + frame
    keep = chosen.reshape(-1).sort().values
    return VisionZipResult(
        keep=keep,
        values=out.reshape(t * n, d)[keep],
        dominant=dom,
        targets=targets,
        ctx_assign=ctx_assign,
        contextual=merged,
    )


@register("visionzip")
@dataclass
class VisionZip(Policy):
    """VisionZip (CVPR 2025) on video frames, a merging policy.

    Args:
        retain: fraction of each frame's grid tokens kept: ``S = keep_count(retain, n)`` per frame,
            split as the LLaVA-OneVision port does, ``dominant = int(S * 54 / 64)`` and the rest
            contextual. ``None`` when ``dominant`` and ``contextual`` are given.
        dominant: grid tokens kept by attention per frame (the reference's ``dominant`` minus its CLS
            token, e.g. 53 for LLaVA-1.5's 54 + 10).
        contextual: merged tokens per frame (the reference's ``contextual``).
        positions: ``"kept"`` (default: survivors keep their original position ids) or ``"compacted"``
            (renumbered consecutively, as the reference does; 1-D positions only).

    Needs the ``"vision_saliency"`` and ``"vision_keys"`` signals (LLaVA-OneVision, LLaVA-NeXT-Video,
    Video-LLaVA); other families are refused with :class:`~tokcompress.errors.MissingSignalError`.
    """

    retain: float | None = 0.25  # type: ignore[assignment]
    dominant: int | None = None
    contextual: int | None = None
    positions: str = "kept"

    needs: ClassVar[frozenset[str]] = frozenset({"vision_saliency", "vision_keys"})
    accepts_partial: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_positions(self.positions)
        counts = (self.dominant, self.contextual)
        if any(v is not None for v in counts):
            if any(v is None for v in counts):
                raise ValueError("give both dominant and contextual (tokens per frame), or neither and use retain")
            for name in ("dominant", "contextual"):
                value = getattr(self, name)
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ValueError(f"{name} must be an int >= 0 (tokens per frame); got {value!r}")
            if self.dominant + self.contextual < 1:
                raise ValueError("dominant + contextual must keep at least one token per frame")
            self.retain = None
        else:
            if self.retain is None:
                raise ValueError("retain must be a fraction in (0, 1] when dominant and contextual are not given")
            self.retain = check_retain(self.retain)

    @property
    def label(self) -> str:
        if self.retain is None:
            return f"{self.name}(dominant={self.dominant}, contextual={self.contextual})"
        return f"{self.name}(retain={self.retain:g})"

    def split(self, n: int) -> tuple[int, int]:
        """``(dominant, contextual)`` tokens for a frame of ``n`` tokens."""
        if self.retain is None:
            return min(self.dominant, n), self.contextual  # type: ignore[arg-type]
        s = keep_count(self.retain, n)
        dom = s * DOMINANT_SHARE[0] // DOMINANT_SHARE[1]
        return dom, s - dom

    def compress(self, tokens: TokenSet) -> Compression:
        tokens.require_full(self.name)
        if self.retain == 1.0:
            return selection(tokens.available_index())
        missing = sorted(self.needs - set(tokens.signals))
        if missing:
            raise MissingSignalError(
                f"policy {self.label} needs {missing}: the adapter records them from the vision tower in the same call "
                "(pass pixel_values_videos, not pre-computed features)"
            )
        t, n = tokens.num_frames, tokens.tokens_per_frame
        saliency, keys = tokens.signals["vision_saliency"], tokens.signals["vision_keys"]
        if tuple(saliency.shape) != (t, n) or tuple(keys.shape[:2]) != (t, n):
            raise MissingSignalError(
                f"vision signals of shape {tuple(saliency.shape)} / {tuple(keys.shape)} do not match the token grid {(t, n)}"
            )
        dom, ctx = self.split(n)
        res = visionzip(saliency.to(tokens.features.device), keys.to(tokens.features.device), tokens.features, dom, ctx)
        slot = torch.full((t * n,), -1, dtype=torch.long, device=res.keep.device)
        slot[res.keep] = torch.arange(res.keep.numel(), device=res.keep.device)
        assign = slot.clone()
        flat_ctx = res.ctx_assign.reshape(-1)
        frame = torch.arange(t, device=slot.device).repeat_interleave(n)
        in_ctx = flat_ctx >= 0
        if bool(in_ctx.any()):
            target_flat = res.targets.gather(1, res.ctx_assign.clamp(min=0)).reshape(-1) + frame * n
            assign[in_ctx] = slot[target_flat[in_ctx]]
        return Compression(
            keep=res.keep,
            values=res.values.to(tokens.features.dtype),
            assign=assign,
            info={"dominant": dom, "contextual": ctx},
        )


__all__ = ["VisionZip", "visionzip"]
