"""FrameFusion's data-dependent sites inside the decoder stack, driven with hooks only.

The reference (thu-nics/FrameFusion) calls its module at layer 0 before attention and then after the
attention sub-block of each layer (``h = residual + attn_out``, before the MLP) until merging
finishes, then once more to prune, at the first layer after that, after its attention sub-block.
Each batch row follows its own schedule. With hooks:

* **layer 0, before attention** (pre-hook of decoder layer 0): merge the input embeddings and hand
  layer 0 the shortened sequence (every cache layer then holds only the survivors).
* **after the attention of layer i** (forward hook of layer ``i``'s attention module): the layer adds
  the attention output to its input, so returning ``attn_out' = h' - residual`` at the anchors makes
  ``residual + attn_out'`` the merged state (up to one rounding of the subtraction). The MLP is
  token-wise, so running it on every token of layer ``i`` changes nothing for the survivors; the
  pre-hook of layer ``i + 1`` then drops the removed tokens with the engine's compaction (original
  positions kept, cos/sin and position ids gathered, mask rebuilt). Layer ``i``'s cache holds every
  token of that layer, as in the reference.
* **prune after the attention of layer i**, by layer ``i``'s last-query attention (mean over heads),
  recomputed from its ``q_proj``/``k_proj`` in the attention pre-hook: equal to dropping before layer
  ``i + 1`` with layer ``i``'s attention rows.

Slots: the spatial index of a grid token within its frame (temporal patch for Qwen-VL), one chain per
(video, slot). Special tokens inside a video span (LLaVA-OneVision's trailing newline, Video-LLaVA's
per-frame CLS) are not candidates and are always kept; the reference's LLaVA-Video layout with a
newline column (one more slot per row) does not occur in Hugging Face's LLaVA-Video models, which
append a single newline per video.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .errors import UnsupportedModelError, UnsupportedUsageError
from .layers import Layout, attention_rows, compact_index, kept_position_kwargs, layer_mask, require_qk
from .policies.framefusion import MERGE_TOPK, FrameFusion, FrameFusionState

if TYPE_CHECKING:
    from .layers import LayerRunner
    from .record import VideoRecord

#: ``register_post(module, hook)`` installs a forward hook (``with_kwargs=True``) and owns its removal.
RegisterPost = Callable[[nn.Module, Callable[..., Any]], None]

KIND_NAMES = {0: "merge", 1: "merge (last)", 2: "merge (top-k, last)", 3: "prune"}


class FrameFusionSites:
    """Runs one :class:`FrameFusion` policy inside a model, for the :class:`~tokcompress.layers.LayerRunner` that owns it."""

    def __init__(
        self,
        runner: LayerRunner,
        policy: FrameFusion,
        layers: nn.ModuleList,
        first_layer: int,
        register: Callable[[nn.Module, Callable[..., Any]], None],
        register_post: RegisterPost | None,
    ) -> None:
        if first_layer > 1:
            raise UnsupportedModelError(
                f"{policy.label} merges at layer 0, but this model adds visual features to the hidden states after "
                f"layers 0 .. {first_layer - 1} (Qwen3-VL deepstack), indexed by the full-length visual mask; "
                "framefusion is not supported for this family"
            )
        if register_post is None:
            raise UnsupportedUsageError(f"{policy.label} needs forward hooks on the attention modules (register_post)")
        for i, attn in enumerate(runner.attn):
            require_qk(attn, i, "framefusion recomputes the last query row from q_proj/k_proj")
        for i, layer in enumerate(layers):
            # Gemma-style layers normalise the attention output before the residual add: attn_out' would be renormed.
            if hasattr(layer, "pre_feedforward_layernorm") or hasattr(layer, "post_feedforward_layernorm"):
                raise UnsupportedModelError(
                    f"decoder layer {i} ({type(layer).__name__}) normalises its attention output before the residual "
                    "add; framefusion's after-attention merge assumes h = residual + attn_out"
                )
        self.runner = runner
        self.policy = policy
        self.depth = len(layers)
        self._prefill: Any = None  # the runner's _Prefill this state belongs to
        self.states: list[FrameFusionState] = []
        self.chain: Tensor | None = None  # (B, L0) chain key per compact-prompt slot, -1 off the grid
        self.residual: Tensor | None = None  # input of the current layer (the residual of its attention add)
        self.pending: Tensor | None = None  # (B, L) keep mask decided after the attention of the previous layer
        self.scores: Tensor | None = None  # (B, H, 1, L) last-query attention of the current layer
        self.calls = [0]  # per prefill: effective calls so far (record keys)
        for i, layer in enumerate(layers):
            register(layer, self._layer_hook(i))
        for i, attn in enumerate(runner.attn):
            register(attn, self._attention_pre(i))
            register_post(attn, self._attention_post(i))

    # -- per prefill --------------------------------------------------------------------------
    def begin(self, slot_of: Tensor, videos: list[list[VideoRecord]], mask: Tensor) -> None:
        """A compressed prefill starts: one schedule per row, chain keys per compact slot."""
        b, length = mask.shape
        chain = torch.full((b, length), -1, dtype=torch.long, device=mask.device)
        for r in range(b):
            offset = 0
            for rec in videos[r]:
                per_frame = rec.grid[1] * rec.grid[2]
                slots = slot_of[r, rec.positions.to(mask.device)[rec.keep]]
                chain[r, slots] = offset + rec.keep.to(mask.device) % per_frame
                offset += per_frame
        self.chain = chain
        self.states = [FrameFusionState() for _ in range(b)]
        for r in range(b):
            if not bool((chain[r] >= 0).any()):
                self.states[r].merging_done = self.states[r].pruning_done = True  # no video in this row
        self._prefill = self.runner.prefill
        self.residual = self.pending = self.scores = None
        self.calls = [0] * b

    def _active(self) -> bool:
        return self._prefill is not None and self.runner.prefill is self._prefill

    # -- hooks ---------------------------------------------------------------------------------
    def _layer_hook(self, i: int) -> Callable[..., tuple[tuple, dict] | None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            if not self._active():
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            changed = False
            if self.pending is not None:
                hidden, kwargs = self._compact(i, self.pending, hidden, kwargs)
                self.pending, changed = None, True
            if i == 0 and any(s.wants_merge for s in self.states):
                keep, writes = self._merge_all(0, hidden, "before attention of layer 0")
                if writes:
                    hidden = hidden.clone()
                    for r, where, values in writes:
                        hidden[r, where] = values.to(hidden.dtype)
                    changed = True
                if not bool(keep.all()):
                    hidden, kwargs = self._compact(0, keep, hidden, kwargs)
                    changed = True
            self.residual = hidden
            if not changed:
                return None
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        return hook

    def _attention_pre(self, i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self.scores = None
            if not self._active() or not any(s.wants_prune for s in self.states):
                return
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            cos, sin = kwargs["position_embeddings"]
            valid = self.runner._current().mask.bool()
            index = torch.arange(valid.shape[1], device=valid.device)
            last = torch.where(valid, index, -1).amax(dim=1)[:, None]  # (B, 1) each row's last real slot
            allowed = valid[:, None, :] & (index[None, None, :] <= last[..., None])
            with torch.no_grad():
                self.scores = attention_rows(module, hidden, cos, sin, last, allowed)

        return hook

    def _attention_post(self, i: int) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            if not self._active() or self.residual is None:
                return None
            states = self.states
            if not any(s.wants_merge or s.wants_prune for s in states):
                return None
            attn_out = output[0] if isinstance(output, tuple) else output
            with torch.no_grad():
                h = self.residual + attn_out
                site = f"after attention of layer {i}"
                keep, writes = self._merge_all(i + 1, h, site, prune_scores=self.scores)
            self.scores = None
            if not bool(keep.all()):
                self.pending = keep
            if not writes:
                return None
            new_out = attn_out.clone()
            for r, where, values in writes:
                new_out[r, where] = (values.to(h.dtype) - self.residual[r, where]).to(attn_out.dtype)
            return (new_out, *output[1:]) if isinstance(output, tuple) else new_out

        return hook

    # -- the calls -----------------------------------------------------------------------------
    def _merge_all(
        self, first_short: int, hidden: Tensor, site: str, prune_scores: Tensor | None = None
    ) -> tuple[Tensor, list[tuple[int, Tensor, Tensor]]]:
        """Run each row's next call on ``hidden`` ``(B, L, D)``; returns the keep mask and the anchor writes.

        ``first_short`` is the first layer that runs on the shorter sequence (for the record).
        """
        runner = self.runner
        kv, layout = runner.prefill.kv, runner._current()
        keep = torch.ones_like(layout.mask, dtype=torch.bool)  # padding is dropped (and re-added) by the compaction
        writes: list[tuple[int, Tensor, Tensor]] = []
        for r, state in enumerate(self.states):
            prune = state.wants_prune and prune_scores is not None
            if not (prune or state.wants_merge):
                continue
            vis = runner._visual_slots(layout, r)
            origin = layout.origin[r, vis]
            before = vis.numel()
            start = time.perf_counter()
            if prune:
                step = self.policy.prune(state, prune_scores[r, :, 0, vis].float().mean(dim=0), self.depth)
                kept, kind, info = step.keep, 3, {"ratio": step.ratio}
            else:
                step = self.policy.merge(state, hidden[r, vis], self.chain[r, origin], self.depth)
                kept, kind = step.keep, step.kind
                info = {"fraction": step.fraction, "upper_bound": step.upper_bound}
                if kept.numel() < before:
                    writes.append((r, vis[kept], step.values))
            seconds = time.perf_counter() - start
            gone = torch.ones(before, dtype=torch.bool, device=vis.device)
            gone[kept] = False
            keep[r, vis[gone]] = False
            self._record(r, first_short, site, kind, kv.slots.positions[r, origin], kept, before, info, seconds)
        return keep, writes

    def _record(
        self, r: int, first_short: int, site: str, kind: int, positions: Tensor, kept: Tensor, before: int, info: dict, seconds: float
    ) -> None:
        state = self.states[r]
        state.calls.append({"site": site, "kind": KIND_NAMES[kind], "visual_before": before, "visual_after": int(kept.numel())})
        records = self.runner.prefill.kv.records
        n = self.calls[r]
        self.calls[r] += 1
        if not records:
            return
        info = {**info, "kind": KIND_NAMES[kind], "site": site, "sparsity": list(state.sparsity)}
        if kind == MERGE_TOPK:
            info["pruning_skipped"] = True
        records[r].stages[f"{self.policy.label} #{n}"] = {
            "layer": first_short,
            "cache_layers": (first_short, self.depth - 1),
            "kept": positions[kept].detach(),
            "visual_before": before,
            "visual_after": int(kept.numel()),
            "merged": kind != 3 and int(kept.numel()) < before,
            "info": info,
            "seconds": seconds,
        }

    # -- compaction ----------------------------------------------------------------------------
    def _compact(self, k: int, keep: Tensor, hidden: Tensor, kwargs: dict) -> tuple[Tensor, dict]:
        """Shorten every row to its ``keep`` slots before layer ``k``; later layers get the same substitutes."""
        runner = self.runner
        prefill, layout = runner.prefill, runner._current()
        keep = keep & layout.mask.bool()
        index, slot_valid = compact_index(keep)
        new_hidden = hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))
        new_layout = Layout(k, layout.origin.gather(1, index), slot_valid.long())
        subst = kept_position_kwargs(kwargs, index, keep.shape[1])
        subst["attention_mask"] = layer_mask(runner.config, new_hidden, new_layout, prefill.cache, subst.get("position_ids"))
        prefill.subst = subst
        if k == 0:  # before any layer ran: every cache layer holds the survivors only
            prefill.kv.layouts = [new_layout]
            runner._update_prefix(new_layout)
        else:
            prefill.kv.layouts.append(new_layout)
        return new_hidden, {**kwargs, **subst}
