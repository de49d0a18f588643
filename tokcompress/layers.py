"""In-layer (prefill) and decode-time stages: the mechanics behind LayerPolicy and DecodePolicy.

The Session in ``engine.py`` owns every hook; it hands :class:`LayerRunner` a ``register`` callback
and calls it at the start of each language-model forward. The runner then works through pre-hooks on
the decoder layers and on the attention modules of the layers whose attention a policy reads:

* **Scores** (attention pre-hook of layer ``S``): the attention probabilities of the few query rows a
  policy needs are recomputed from that layer's own ``q_proj``/``k_proj`` (plus ``q_norm``/``k_norm``
  where present) and the module's ``apply_rotary_pos_emb``, against the whole sequence or cache:
  ``O(B * H * Q * L)`` memory and independent of the attention backend (eager, sdpa, flash).
* **In-layer pruning** (pre-hook of layer ``K`` at prefill): the policy sees the row's visual tokens
  and the scores of layer ``K - 1``; the hidden states, ``position_embeddings`` (cos, sin) and
  ``position_ids`` are gathered at the survivors (original positions kept), rows are left-padded to a
  common length, and a new mask is built with ``create_causal_mask(..., layer_idx=K)``. Later layers
  get the same substitutes (the model's loop keeps passing the full-length ones). Policies that
  ``prune_earlier`` also cut the caches already written by layers ``< K``. A policy with
  ``positions == "compacted"`` (1-D positions) has layers ``>= K`` renumber the survivors
  consecutively (each loses the count of tokens removed before it), with cos/sin recomputed by the
  language model's own rotary module; at decode steps those layers take the step's position minus
  the row's removed count, while layers ``< K`` keep the logical positions.
* **Decode** (every step after a prefill through such a cache): each run of layers whose cache has a
  different physical layout gets its own 2-D mask ``[prompt layout | generated columns]``, turned
  into the backend's mask with ``create_causal_mask(..., layer_idx=i)``. A decode-time policy scores
  the step at layer ``L - 1`` and either masks the visual entries it drops for layers ``>= L`` during
  that step (the cache keeps them) or evicts them from those layers' caches for good.

Per-cache state lives in :class:`KVState`, attached to the engine's ``CacheState``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask

from .errors import UnsupportedModelError, UnsupportedUsageError
from .policy import DecodePolicy, LayerPolicy
from .record import RowRecord, VideoRecord
from .tokens import Compression, DecodeTokens, LayerTokens, PromptTokens, check_layer_result, check_query_choice

#: ``register(module, hook)`` installs a forward pre-hook (``with_kwargs=True``) and owns its removal.
Register = Callable[[nn.Module, Callable[..., Any]], None]


def compact_index(keep: Tensor) -> tuple[Tensor, Tensor]:
    """Per row, the kept indices left-padded to a common length.

    Returns ``index`` ``(B, Lk)`` (padding slots point at 0) and ``slot_valid`` ``(B, Lk)``.
    """
    counts = keep.sum(1)
    compact_len = int(counts.max()) if keep.shape[0] else 0
    # Stable sort puts dropped positions first and kept ones after, in order; take the last Lk.
    order = torch.sort(keep.to(torch.int8), dim=1, stable=True).indices[:, keep.shape[1] - compact_len :]
    slot_valid = torch.arange(compact_len, device=keep.device)[None] >= (compact_len - counts)[:, None]
    index = torch.where(slot_valid, order, torch.zeros_like(order))
    return index, slot_valid


def cache_lengths(cache: Cache) -> list[int]:
    """Physical entries held by each layer of a dynamic cache (padding slots included)."""
    return [layer.get_seq_length() for layer in cache.layers]


def cache_bytes(cache: Cache) -> int:
    """Bytes held by the keys and values of every layer of ``cache`` (0 for an empty cache)."""
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, Tensor):
                total += t.numel() * t.element_size()
    return total


def attention_rows(
    attn: nn.Module,
    hidden: Tensor,
    cos: Tensor,
    sin: Tensor,
    rows: Tensor,
    allowed: Tensor,
    past_keys: Tensor | None = None,
) -> Tensor:
    """Softmax attention probabilities of a few query rows, recomputed from the layer's projections.

    Args:
        attn: the layer's attention module (``q_proj``, ``k_proj``, ``head_dim``, ``scaling``;
            ``q_norm``/``k_norm`` when the family has them).
        hidden: ``(B, L, D)`` the attention's input (after the layer's input norm).
        cos, sin: ``(B or 1, L, d)`` the rotary embeddings the layer receives.
        rows: ``(B, Q)`` int64 query rows (indices into ``L``).
        allowed: ``(B, Q, P + L)`` bool, keys each query may see (padding and causality).
        past_keys: ``(B, H_kv, P, d)`` cached keys (after RoPE) in front of the new ones, or None.

    Returns:
        ``(B, H, Q, P + L)`` float32 probabilities.
    """
    b, length, dim = hidden.shape
    q_in = hidden.gather(1, rows[..., None].expand(-1, -1, dim))
    q = attn.q_proj(q_in).view(b, rows.shape[1], -1, attn.head_dim)
    if getattr(attn, "q_norm", None) is not None:
        q = attn.q_norm(q)
    q = q.transpose(1, 2)
    cos, sin = cos.expand(b, -1, -1), sin.expand(b, -1, -1)
    idx = rows[..., None].expand(-1, -1, cos.shape[-1])
    q = _rope(attn)(q, q, cos.gather(1, idx), sin.gather(1, idx))[0]
    k = new_keys(attn, hidden, cos, sin)
    if past_keys is not None:
        k = torch.cat([past_keys.to(k.dtype), k], dim=2)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # GQA: query head h reads kv head h // groups
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * attn.scaling
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    return logits.softmax(dim=-1)


def require_qk(attn: nn.Module, layer: int, why: str) -> None:
    """Refuse an attention module whose rows :func:`attention_rows` cannot recompute; ``why`` says who needs them."""
    for name in ("q_proj", "k_proj", "head_dim", "scaling"):
        if not hasattr(attn, name):
            raise UnsupportedModelError(
                f"the attention module of decoder layer {layer} ({type(attn).__name__}) has no {name!r}; {why}"
            )


def _rope(attn: nn.Module) -> Callable[..., tuple[Tensor, Tensor]]:
    """The ``apply_rotary_pos_emb`` of the attention module's own modeling file."""
    return sys.modules[type(attn).__module__].apply_rotary_pos_emb


def new_keys(attn: nn.Module, hidden: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``(B, H_kv, L, d)`` keys (after RoPE) the attention module computes for ``hidden``, as it caches them."""
    b, length, _ = hidden.shape
    k = attn.k_proj(hidden).view(b, length, -1, attn.head_dim)
    if getattr(attn, "k_norm", None) is not None:
        k = attn.k_norm(k)
    k = k.transpose(1, 2)
    return _rope(attn)(k, k, cos.expand(b, -1, -1), sin.expand(b, -1, -1))[1]


@dataclass
class Layout:
    """The physical prompt entries held by the cache layers ``start ..`` (until the next layout).

    ``origin`` ``(B, P)``: slot of the engine's compact prompt each entry comes from (0 on padding);
    ``mask`` ``(B, P)`` long: 1 for real entries, 0 for padding.
    """

    start: int
    origin: Tensor
    mask: Tensor


@dataclass
class SlotInfo:
    """Per slot of the engine's compact prompt ``(B, L0)``: what in-layer policies need to know."""

    visual: Tensor  # bool: a video grid token that reached the language model
    positions: Tensor  # long: original position (-1 on padding)
    video: Tensor  # long: video index within the row (-1 off video)
    frame: Tensor  # long: temporal grid index within the video (-1 off video)
    group: Tensor | None  # long: input-stage group label (-1 off video), None when no stage set groups
    cell: Tensor | None = None  # long: flat index t*h*w + y*w + x in the video's grid (-1 off video)
    grids: list[tuple[tuple[int, int, int], ...]] | None = None  # per row, (T, h, w) of each video


@dataclass
class KVState:
    """What the runner keeps with one cache between steps."""

    layouts: list[Layout]
    slots: SlotInfo
    records: list[RowRecord] | None
    memory: list[Any] = field(default_factory=list)  # decode policy memory, per row
    steps: int = 0
    fingerprint: Tensor | None = None  # (B, H_kv, d) last layer's key of the last decoded token, per row
    shifts: list[tuple[int, Tensor]] = field(default_factory=list)  # (K, (B,) removed) of compacting stages


@dataclass
class _Prefill:
    cache: Cache | None
    kv: KVState
    state: Any  # the engine's CacheState (None without cache)
    scores: dict[int, list[Tensor]] = field(default_factory=dict)  # K -> per row (H, Q, N)
    query_positions: dict[int, list[Tensor]] = field(default_factory=dict)  # K -> per row (Q,) original positions
    chosen: dict[int, list[Tensor]] = field(default_factory=dict)  # K -> per row compact-prompt slots (queries="chosen")
    subst: dict[str, Any] | None = None  # kwargs substituted in the layers after the last pruning


@dataclass
class _Step:
    cache: Cache
    kv: KVState
    new_cols: Tensor  # (B, generated + 1) logical mask columns after the prompt
    dropped: Tensor | None = None  # (B, L0) bool: compact-prompt slots masked for layers >= L this step
    masks: dict[tuple[int, bool], Any] = field(default_factory=dict)
    moved: dict[int, dict[str, Any]] = field(default_factory=dict)  # compacting stages passed -> position kwargs


class LayerRunner:
    """In-layer and decode-time stages of one wrapped model."""

    def __init__(
        self,
        layers: nn.ModuleList,
        attention: Callable[[nn.Module], nn.Module],
        config: Any,
        layer_policies: list[LayerPolicy],
        decode_policy: DecodePolicy | None,
        first_layer: int,
        register: Register,
        rotary: nn.Module | None = None,
        positions: str = "1d",
        register_post: Register | None = None,
    ) -> None:
        depth = len(layers)
        self.config = config
        self.depth = depth
        stepped = [p for p in layer_policies if getattr(p, "stepped", False)]  # data-dependent sites (FrameFusion)
        layer_policies = [p for p in layer_policies if not getattr(p, "stepped", False)]
        _check_stepped(stepped, layer_policies, decode_policy)
        self.rotary = rotary  # the language model's rotary module: cos/sin for compacted positions
        self.stages: list[tuple[int, LayerPolicy]] = []
        for policy in layer_policies:
            k = self._check_layer(policy, policy.resolve_layer(depth), first_layer, policy.layer_explicit())
            if _compacts(policy):
                if positions != "1d" or rotary is None:
                    raise UnsupportedUsageError(
                        f"{policy.label}: positions='compacted' renumbers 1-D position ids inside the language model; "
                        f"this model uses {'M-RoPE' if positions == 'mrope' else positions!r} positions"
                        f"{'' if rotary is not None else ' or has no rotary_emb module'}; use positions='kept'"
                    )
                if policy.prune_earlier:
                    raise UnsupportedUsageError(
                        f"{policy.label}: positions='compacted' cannot renumber the caches of earlier layers; use positions='kept'"
                    )
            self.stages.append((k, policy))
        self.stages.sort(key=lambda s: s[0])
        ks = [k for k, _ in self.stages]
        if len(set(ks)) != len(ks):
            raise ValueError(f"two in-layer policies act at the same layer ({ks}); give them different layers")
        self.decode = decode_policy
        self.decode_layer = 0
        if decode_policy is not None:
            self.decode_layer = self._check_layer(
                decode_policy, decode_policy.resolve_layer(depth), 1, decode_policy.layer_explicit()
            )
        self.attn = [attention(layer) for layer in layers]
        probed = {k - 1 for k, p in self.stages if p.queries is not None}  # attention modules whose q/k the runner reads
        if decode_policy is not None:
            probed |= {self.decode_layer - 1, depth - 1}  # the last layer fingerprints rows (_check_row_order)
        for i in sorted(probed):
            require_qk(self.attn[i], i, "in-layer and decode-time policies recompute attention rows from q_proj/k_proj")
        self.prefill: _Prefill | None = None
        self.step: _Step | None = None
        for i, layer in enumerate(layers):
            register(layer, self._layer_hook(i))
        for i in sorted(probed):
            register(self.attn[i], self._attention_hook(i))
        self.sites = None
        if stepped:
            from .framefusion_sites import FrameFusionSites

            self.sites = FrameFusionSites(self, stepped[0], layers, first_layer, register, register_post)

    def _check_layer(self, policy: Any, k: int, first: int, explicit: bool) -> int:
        if not 1 <= k < self.depth:
            raise ValueError(
                f"{policy.label}: layer {k} is outside [1, {self.depth - 1}] for a language model of {self.depth} layers"
            )
        if k < first:
            if explicit:
                raise UnsupportedUsageError(
                    f"{policy.label}: layer {k} comes before the model's deepstack layers end (layer {first - 1} adds "
                    f"visual features to the hidden states after it runs); choose a layer >= {first}"
                )
            k = first  # the scaled default moves past the deepstack layers
            if k >= self.depth:
                raise UnsupportedUsageError(f"{policy.label}: no layer after the deepstack layers in this model")
        return k

    # -- engine entry points -------------------------------------------------------------------
    def reset(self) -> None:
        """Called at the start of every language-model forward."""
        self.prefill = None
        self.step = None

    def begin_prefill(
        self,
        cache: Cache | None,
        state: Any,
        mask: Tensor,
        slot_of: Tensor,
        videos: list[list[VideoRecord]],
        records: list[RowRecord],
    ) -> None:
        """A compressed prefill is about to run through the decoder layers.

        ``mask`` ``(B, L0)`` is the compact prompt's 2-D mask, ``slot_of`` ``(B, L)`` maps original
        positions to compact slots (-1 dropped), ``videos`` the input stage's per-row records.
        """
        slots = _slot_info(mask, slot_of, videos)
        b, length = mask.shape
        origin = torch.arange(length, device=mask.device).expand(b, length)
        kv = KVState(layouts=[Layout(0, origin, mask.long())], slots=slots, records=records, memory=[None] * b)
        self.prefill = _Prefill(cache=cache, kv=kv, state=state)
        if state is not None:
            state.kv = kv
        if self.sites is not None:
            self.sites.begin(slot_of, videos, mask)

    def begin_step(self, cache: Cache, state: Any, new_cols: Tensor) -> None:
        """A decode step through a cache whose prefill this runner shaped."""
        kv = getattr(state, "kv", None)
        if kv is None or (len(kv.layouts) == 1 and self.decode is None):
            return
        if self.decode is not None:
            self._check_row_order(cache, kv)
        self.step = _Step(cache=cache, kv=kv, new_cols=new_cols)

    def _check_row_order(self, cache: Cache, kv: KVState) -> None:
        """Refuse caches whose rows were reordered between steps (beam search): per-row state would not follow.

        The last layer's key of the previous step's token, recorded as the model computed it, depends on
        the row's whole history; after a reorder the newest cache entry of some row no longer equals it.
        """
        keys = cache.layers[-1].keys
        if kv.fingerprint is not None and not torch.equal(keys[:, :, -1], kv.fingerprint):
            raise UnsupportedUsageError(
                f"{self.decode.label} keeps per-row state across decode steps, and the rows of this cache were "
                "reordered between steps (beam search does this); run it with num_beams=1 or without the "
                "decode-time policy"
            )

    # -- hooks ---------------------------------------------------------------------------------
    def _attention_hook(self, i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if self.prefill is not None:
                self._prefill_scores(i, module, args, kwargs)
            elif self.step is not None and self.decode is not None:
                if i == self.decode_layer - 1:
                    self._decode_scores(i, module, args, kwargs)
                if i == self.depth - 1:
                    hidden = kwargs.get("hidden_states", args[0] if args else None)
                    with torch.no_grad():
                        keys = new_keys(module, hidden, *kwargs["position_embeddings"])
                    self.step.kv.fingerprint = keys[:, :, -1]

        return hook

    def _layer_hook(self, i: int) -> Callable[..., tuple[tuple, dict] | None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            if self.prefill is not None:
                return self._prefill_layer(i, args, kwargs)
            if self.step is not None:
                return self._decode_layer(i, args, kwargs)
            return None

        return hook

    # -- prefill -------------------------------------------------------------------------------
    def _current(self) -> Layout:
        assert self.prefill is not None
        return self.prefill.kv.layouts[-1]

    def _visual_slots(self, layout: Layout, row: int) -> Tensor:
        slots = self.prefill.kv.slots if self.prefill is not None else self.step.kv.slots  # type: ignore[union-attr]
        visual = slots.visual[row].gather(0, layout.origin[row]) & layout.mask[row].bool()
        return visual.nonzero().squeeze(1)

    @torch.no_grad()
    def _prefill_scores(self, i: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        assert self.prefill is not None
        wanted = [p for k, p in self.stages if k - 1 == i and p.queries is not None]
        if not wanted:
            return
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        cos, sin = kwargs["position_embeddings"]
        layout = self._current()
        valid = layout.mask.bool()
        b, length = valid.shape
        queries = wanted[0].queries
        index = torch.arange(length, device=valid.device)
        last = torch.where(valid, index, -1).amax(dim=1)  # (B,) last real slot
        if queries == "last":
            rows = last[:, None]
            row_ok = torch.ones_like(rows, dtype=torch.bool)
        elif queries == "chosen":
            rows, row_ok = self._chosen_rows(i + 1, layout, last)
        elif queries == "after_video":
            after = torch.zeros_like(valid)
            for r in range(b):
                vis = self._visual_slots(layout, r)
                start = int(vis[-1]) + 1 if vis.numel() else 0
                after[r, start:] = valid[r, start:]
            count = int(after.sum(1).max())
            if count == 0:
                raise UnsupportedUsageError(
                    f"{wanted[0].label} reads the attention of the tokens after the video, but a prompt ends with "
                    "its video; put the question after the video"
                )
            rows = torch.sort(after.to(torch.int8), dim=1, stable=True, descending=True).indices[:, :count]
            row_ok = torch.arange(count, device=valid.device)[None] < after.sum(1)[:, None]
            rows = torch.where(row_ok, rows, last[:, None])
        else:
            raise ValueError(f"unknown queries {queries!r} declared by {wanted[0].label}")
        allowed = valid[:, None, :] & (index[None, None, :] <= rows[..., None])
        probs = attention_rows(module, hidden, cos, sin, rows, allowed)  # (B, H, Q, L)
        per_row, query_positions = [], []
        for r in range(b):
            vis = self._visual_slots(layout, r)
            per_row.append(probs[r][:, row_ok[r]][:, :, vis])
            query_positions.append(self.prefill.kv.slots.positions[r, layout.origin[r, rows[r, row_ok[r]]]])
        k = i + 1
        self.prefill.scores[k] = per_row
        self.prefill.query_positions[k] = query_positions

    def _choose_queries(self, hidden: Tensor) -> None:
        """Layer 0's input: the stages with ``queries = "chosen"`` pick their query rows from it, per row."""
        prefill = self.prefill
        assert prefill is not None
        layout = self._current()
        valid = layout.mask.bool()
        index = torch.arange(valid.shape[1], device=valid.device)
        for k, policy in self.stages:
            if policy.queries != "chosen":
                continue
            per_row = []
            for r in range(valid.shape[0]):
                vis = self._visual_slots(layout, r)
                start = int(vis[-1]) + 1 if vis.numel() else 0
                text = (valid[r] & (index >= start)).nonzero().squeeze(1)
                if text.numel() == 0:
                    raise UnsupportedUsageError(
                        f"{policy.label} chooses its query rows among the tokens after the video, but a prompt ends "
                        "with its video; put the question after the video"
                    )
                origin = layout.origin[r, text]
                prompt = PromptTokens(
                    visual=hidden[r, vis], text=hidden[r, text], text_positions=prefill.kv.slots.positions[r, origin]
                )
                picked = policy.choose_queries(prompt)
                check_query_choice(picked, prompt, policy.name)
                per_row.append(origin[picked.to(origin.device)])
            prefill.chosen[k] = per_row

    def _chosen_rows(self, k: int, layout: Layout, last: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, Q)`` current slots of the rows chosen for stage ``k`` (padded with ``last``) and their validity."""
        assert self.prefill is not None
        chosen = self.prefill.chosen[k]
        b = layout.mask.shape[0]
        device = layout.mask.device
        count = max(c.numel() for c in chosen)
        rows = last[:, None].repeat(1, count)
        row_ok = torch.zeros(b, count, dtype=torch.bool, device=device)
        for r in range(b):
            slot_now = torch.full((self.prefill.kv.slots.visual.shape[1],), -1, dtype=torch.long, device=device)
            real = layout.mask[r].bool()
            slot_now[layout.origin[r, real]] = real.nonzero().squeeze(1)
            now = slot_now[chosen[r]]
            if bool((now < 0).any()):
                raise RuntimeError("a chosen query row was pruned before its stage")  # in-layer stages drop visual tokens only
            rows[r, : now.numel()] = now
            row_ok[r, : now.numel()] = True
        return rows, row_ok

    def _prefill_layer(self, i: int, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        assert self.prefill is not None
        hidden = args[0] if args else kwargs["hidden_states"]
        if i == 0 and any(policy.queries == "chosen" for _, policy in self.stages):
            with torch.no_grad():
                self._choose_queries(hidden)
        for k, policy in self.stages:
            if k == i:  # an earlier stage's substitutes (shortened position embeddings) are the current ones
                hidden = self._apply(k, policy, hidden, {**kwargs, **(self.prefill.subst or {})})
        subst = self.prefill.subst
        if subst is None:
            return None
        if args:
            return (hidden, *args[1:]), {**kwargs, **subst}
        return args, {**kwargs, **subst, "hidden_states": hidden}

    def _apply(self, k: int, policy: LayerPolicy, hidden: Tensor, kwargs: dict) -> Tensor:
        prefill = self.prefill
        assert prefill is not None
        kv, layout = prefill.kv, self._current()
        scores = prefill.scores.pop(k, None)
        query_positions = prefill.query_positions.pop(k, None)
        if scores is None and policy.queries is not None:
            raise RuntimeError(f"{policy.label}: no attention scores from layer {k - 1} (was that layer skipped?)")
        b = hidden.shape[0]
        keep = layout.mask.bool().clone()
        writes: list[tuple[int, Tensor, Tensor]] = []
        changed = False
        for r in range(b):
            vis = self._visual_slots(layout, r)
            origin = layout.origin[r, vis]
            tokens = LayerTokens(
                hidden=hidden[r, vis],
                attention=scores[r] if scores is not None else hidden.new_zeros(0, 0, vis.numel(), dtype=torch.float32),
                positions=kv.slots.positions[r, origin],
                video=kv.slots.video[r, origin],
                frame=kv.slots.frame[r, origin],
                group=None if kv.slots.group is None else kv.slots.group[r, origin],
                layer=k,
                cell=None if kv.slots.cell is None else kv.slots.cell[r, origin],
                grids=None if kv.slots.grids is None else kv.slots.grids[r],
                queries=None if query_positions is None else query_positions[r],
                entered=int(kv.slots.visual[r].sum()),
            )
            start = time.perf_counter()
            result = policy.select(tokens)
            seconds = time.perf_counter() - start
            check_layer_result(result, tokens, policy.name)
            gone = torch.ones(vis.numel(), dtype=torch.bool, device=vis.device)
            gone[result.keep] = False
            keep[r, vis[gone]] = False
            changed |= bool(gone.any())
            if result.values is not None:
                writes.append((r, vis[result.keep], result.values))
                changed = True
            self._record(policy, k, r, tokens, result, seconds)
        if not changed:
            return hidden  # keeps everything: no substitution, bit-identical to the unwrapped model
        index, slot_valid = compact_index(keep)
        dim = hidden.shape[-1]
        if writes:
            hidden = hidden.clone()
            for r, where, values in writes:
                hidden[r, where] = values.to(hidden.dtype)
        new_hidden = hidden.gather(1, index[..., None].expand(-1, -1, dim))
        new_layout = Layout(k, layout.origin.gather(1, index), slot_valid.long())
        subst: dict[str, Any] = {}
        position_ids = kwargs.get("position_ids")
        if _compacts(policy):
            if not isinstance(position_ids, Tensor) or position_ids.dim() != 2 or position_ids.shape[-1] != keep.shape[1]:
                raise UnsupportedModelError(
                    f"{policy.label}: positions='compacted' needs the (B, L) position_ids the language model passes to "
                    f"its decoder layers; layer {k} got {None if position_ids is None else tuple(position_ids.shape)}"
                )
            removed = (layout.mask.bool() & ~keep).long()  # real slots this stage removes
            subst["position_ids"] = _gather_seq(position_ids, index) - removed.cumsum(1).gather(1, index)
            subst["position_embeddings"] = self.rotary(new_hidden, subst["position_ids"])
            kv.shifts.append((k, removed.sum(1)))
        else:
            subst.update(kept_position_kwargs(kwargs, index, keep.shape[1]))
        subst["attention_mask"] = layer_mask(self.config, new_hidden, new_layout, prefill.cache, subst.get("position_ids"))
        prefill.subst = subst
        if policy.prune_earlier:
            if prefill.cache is not None:
                for old in kv.layouts:
                    stop = self._layout_stop(kv.layouts, old, k)
                    table = _slot_table(old, keep.shape[0], kv.slots.visual.shape[1])
                    _gather_cache(prefill.cache, range(old.start, stop), table.gather(1, new_layout.origin))
            new_layout.start = 0
            kv.layouts = [new_layout]
            self._update_prefix(new_layout)
        else:
            kv.layouts.append(new_layout)
        return new_hidden

    def _layout_stop(self, layouts: list[Layout], layout: Layout, limit: int) -> int:
        later = [other.start for other in layouts if other.start > layout.start]
        return min([limit, *later])

    def _update_prefix(self, layout: Layout) -> None:
        """Layer 0's entries changed (prune_earlier): the engine's compact prefix follows."""
        state = self.prefill.state if self.prefill is not None else None
        if state is None:
            return
        state.prefix_mask = layout.mask.to(state.prefix_mask.dtype)
        state.compact_len = layout.mask.shape[1]
        state.prefix_all_ones = state.prefix_all_ones and bool(layout.mask.all())

    def _record(self, policy: LayerPolicy, k: int, row: int, tokens: LayerTokens, result: Compression, seconds: float) -> None:
        records = self.prefill.kv.records if self.prefill is not None else None
        if not records:
            return
        first = 0 if policy.prune_earlier else k
        records[row].stages[policy.label] = {
            "layer": k,
            "cache_layers": (first, self.depth - 1),
            "kept": tokens.positions[result.keep].detach(),
            "visual_before": tokens.num_tokens,
            "visual_after": int(result.keep.numel()),
            "merged": result.values is not None,
            "info": dict(result.info),
            "seconds": seconds,
        }

    # -- decode --------------------------------------------------------------------------------
    def _layout_of(self, kv: KVState, i: int) -> Layout:
        return [layout for layout in kv.layouts if layout.start <= i][-1]

    @torch.no_grad()
    def _decode_scores(self, i: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        step, policy = self.step, self.decode
        assert step is not None and policy is not None
        kv = step.kv
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if hidden.shape[1] != 1:
            return
        cos, sin = kwargs["position_embeddings"]
        layout = self._layout_of(kv, i)
        past = step.cache.layers[i].keys
        keys_valid = torch.cat([layout.mask.bool(), step.new_cols.bool()], dim=1)
        if keys_valid.shape[1] != past.shape[2] + 1:
            raise RuntimeError(
                f"decode step: layer {i} holds {past.shape[2]} entries but the mask covers {keys_valid.shape[1] - 1}"
            )
        rows = torch.zeros(hidden.shape[0], 1, dtype=torch.long, device=hidden.device)
        probs = attention_rows(module, hidden, cos, sin, rows, keys_valid[:, None, :], past_keys=past)
        target = self._layout_of(kv, self.decode_layer)
        dropped = torch.zeros_like(kv.slots.visual)
        any_drop = False
        for r in range(hidden.shape[0]):
            vis = self._visual_slots(layout, r)
            origin = layout.origin[r, vis]
            present = torch.zeros_like(kv.slots.visual[r])
            present[target.origin[r][target.mask[r].bool()]] = True
            tokens = DecodeTokens(
                attention=probs[r, :, 0, vis],
                available=present[origin],
                positions=kv.slots.positions[r, origin],
                step=kv.steps,
            )
            choice = policy.step(tokens, kv.memory[r])
            kv.memory[r] = choice.memory
            kept = None
            if choice.keep is not None:
                gone = tokens.available.clone()
                gone[choice.keep] = False
                dropped[r, origin[gone]] = True
                any_drop |= bool(gone.any())
                kept = tokens.positions[choice.keep].detach()
            self._record_step(policy, r, kv, choice.keep is not None, kept, choice.info)
        kv.steps += 1
        step.dropped = dropped if any_drop else None

    def _record_step(self, policy: DecodePolicy, row: int, kv: KVState, pruned: bool, kept: Tensor | None, info: dict) -> None:
        if not kv.records:
            return
        entry = kv.records[row].stages.setdefault(
            policy.label, {"layer": self.decode_layer, "cache_layers": (self.decode_layer, self.depth - 1), "steps": []}
        )
        entry["steps"].append({"step": kv.steps, "pruned": pruned, "kept": kept, **info})

    def _decode_layer(self, i: int, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        step = self.step
        assert step is not None
        kv = step.kv
        if self.decode is not None and i == self.decode_layer and step.dropped is not None and self.decode.evicts:
            self._evict(step, step.dropped)
            step.dropped = None
        layout = self._layout_of(kv, i)
        masked = step.dropped is not None and self.decode is not None and i >= self.decode_layer
        moved = self._decode_positions(step, i, args, kwargs)
        if layout.start == 0 and not masked:
            return (args, {**kwargs, **moved}) if moved else None
        key = (layout.start, masked)
        if key not in step.masks:
            prefix = layout.mask
            if masked:
                assert step.dropped is not None
                prefix = prefix * ~step.dropped.gather(1, layout.origin)
            mask2d = torch.cat([prefix, step.new_cols.to(prefix.dtype)], dim=1)
            hidden = args[0] if args else kwargs["hidden_states"]
            step.masks[key] = create_causal_mask(
                config=self.config, inputs_embeds=hidden, attention_mask=mask2d, cache=step.cache, layer_idx=i
            )
        return args, {**kwargs, **moved, "attention_mask": step.masks[key]}

    def _decode_positions(self, step: _Step, i: int, args: tuple, kwargs: dict) -> dict[str, Any]:
        """Position kwargs of layer ``i`` at a decode step: the step's position minus what compacting stages removed."""
        shifts = [shift for k, shift in step.kv.shifts if k <= i]
        if not shifts:
            return {}
        if len(shifts) not in step.moved:
            position_ids = kwargs.get("position_ids")
            if not isinstance(position_ids, Tensor) or position_ids.dim() != 2:
                raise UnsupportedModelError(
                    f"compacted positions need the (B, q) position_ids the language model passes to decoder layer {i}"
                )
            ids = position_ids - sum(shifts).to(position_ids.device)[:, None]
            hidden = args[0] if args else kwargs["hidden_states"]
            assert self.rotary is not None
            step.moved[len(shifts)] = {"position_ids": ids, "position_embeddings": self.rotary(hidden, ids)}
        return step.moved[len(shifts)]

    def _evict(self, step: _Step, dropped: Tensor) -> None:
        """Remove the ``dropped`` prompt entries from the caches of layers ``>= L`` for good."""
        kv, first = step.kv, self.decode_layer
        layouts: list[Layout] = []
        for n, layout in enumerate(kv.layouts):
            stop = kv.layouts[n + 1].start if n + 1 < len(kv.layouts) else self.depth
            if stop <= first:
                layouts.append(layout)
                continue
            if layout.start < first:  # split: layers before L keep every entry
                layouts.append(layout)
                layout = Layout(first, layout.origin, layout.mask)
            keep = layout.mask.bool() & ~dropped.gather(1, layout.origin)
            index, slot_valid = compact_index(keep)
            _gather_cache(step.cache, range(layout.start, stop), index, prompt=layout.mask.shape[1])
            layouts.append(Layout(layout.start, layout.origin.gather(1, index), slot_valid.long()))
        kv.layouts = layouts
        step.masks.clear()


def _check_stepped(stepped: list[LayerPolicy], others: list[LayerPolicy], decode: DecodePolicy | None) -> None:
    """A policy with data-dependent sites (FrameFusion) runs alone inside the language model."""
    if not stepped:
        return
    if len(stepped) > 1 or others or decode is not None:
        labels = [p.label for p in [*stepped, *others, *([decode] if decode is not None else [])]]
        raise UnsupportedUsageError(
            f"{stepped[0].label} acts at data-dependent layers and cannot be combined with other in-layer or "
            f"decode-time policies ({labels}); chain it with input-stage policies only"
        )


def _compacts(policy: LayerPolicy) -> bool:
    """True for an in-layer policy that renumbers the survivors (``positions == "compacted"``)."""
    return getattr(policy, "positions", "kept") == "compacted"


def kept_position_kwargs(kwargs: dict, index: Tensor, length: int) -> dict[str, Any]:
    """``position_embeddings`` (and ``position_ids`` when the layer gets them) gathered at the survivors:
    their original positions, for the layers after a cut of a length-``length`` sequence."""
    cos, sin = kwargs["position_embeddings"]
    out: dict[str, Any] = {"position_embeddings": tuple(_gather_seq(t, index) for t in (cos, sin))}
    position_ids = kwargs.get("position_ids")
    if isinstance(position_ids, Tensor) and position_ids.shape[-1] == length:
        out["position_ids"] = _gather_seq(position_ids, index)
    return out


def layer_mask(config: Any, hidden: Tensor, layout: Layout, cache: Cache | None, position_ids: Tensor | None) -> Any:
    """The backend's attention mask for the layers from ``layout.start`` on, over the shortened rows."""
    return create_causal_mask(
        config=config,
        inputs_embeds=hidden,
        attention_mask=layout.mask,
        cache=cache,
        position_ids=position_ids,
        layer_idx=layout.start,
    )


def _gather_seq(t: Tensor, index: Tensor) -> Tensor:
    """Gather ``t`` ``(..., B or 1, L[, d])`` along its sequence dim with ``index`` ``(B, Lk)``."""
    b, lk = index.shape
    if t.dim() == index.dim() + 1:  # (B, L, d)
        full = t.expand(b, -1, -1)
        return full.gather(1, index[..., None].expand(-1, -1, t.shape[-1]))
    if t.dim() == index.dim():  # (B, L)
        return t.expand(b, -1).gather(1, index)
    rows = t.shape[0]  # (R, B, L)
    return t.expand(rows, b, -1).gather(2, index[None].expand(rows, -1, -1))


def _slot_table(layout: Layout, batch: int, width: int) -> Tensor:
    """``(B, L0)``: for each compact-prompt slot, where ``layout`` holds it (0 when it does not)."""
    table = torch.zeros(batch, width, dtype=torch.long, device=layout.origin.device)
    slots = torch.arange(layout.origin.shape[1], device=table.device).expand_as(layout.origin)
    real = layout.mask.bool()
    table[torch.nonzero(real, as_tuple=True)[0], layout.origin[real]] = slots[real]
    return table


def _gather_cache(cache: Cache, layers: range, index: Tensor, prompt: int | None = None) -> None:
    """Re-order/cut the prompt entries of ``layers`` with ``index`` ``(B, Lk)``; later entries follow unchanged."""
    for j in layers:
        if j >= len(cache.layers):
            continue
        layer = cache.layers[j]
        if not getattr(layer, "is_initialized", False) or layer.keys is None or layer.keys.numel() == 0:
            continue
        total = layer.keys.shape[2]
        head = total if prompt is None else prompt
        full = torch.cat([index, torch.arange(head, total, device=index.device).expand(index.shape[0], -1)], dim=1)
        idx = full[:, None, :, None]
        layer.keys = layer.keys.gather(2, idx.expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3]))
        layer.values = layer.values.gather(2, idx.expand(-1, layer.values.shape[1], -1, layer.values.shape[3]))


def _slot_info(mask: Tensor, slot_of: Tensor, videos: list[list[VideoRecord]]) -> SlotInfo:
    b, length = mask.shape
    device = mask.device
    visual = torch.zeros(b, length, dtype=torch.bool, device=device)
    video = torch.full((b, length), -1, dtype=torch.long, device=device)
    frame = torch.full_like(video, -1)
    group = torch.full_like(video, -1)
    cell = torch.full_like(video, -1)
    has_groups = False
    positions = torch.full_like(video, -1)
    for r in range(b):
        real = slot_of[r] >= 0
        positions[r, slot_of[r, real]] = torch.nonzero(real).squeeze(1)
        offset = 0
        for v, rec in enumerate(videos[r]):
            kept_pos = rec.positions.to(device)[rec.keep]
            slots = slot_of[r, kept_pos]
            visual[r, slots] = True
            video[r, slots] = v
            frame[r, slots] = rec.keep // (rec.grid[1] * rec.grid[2])
            cell[r, slots] = rec.keep.to(device)
            groups = rec.info.get("token_groups")  # (K,) int64 label per kept token, set by an input stage
            if isinstance(groups, Tensor) and groups.shape == rec.keep.shape:
                has_groups = True
                group[r, slots] = groups.to(device) + offset
                offset += int(groups.max()) + 1 if groups.numel() else 0
    grids = [tuple(tuple(int(n) for n in rec.grid) for rec in row) for row in videos]
    return SlotInfo(visual, positions, video, frame, group if has_groups else None, cell, grids)


__all__ = ["LayerRunner", "attention_rows", "cache_bytes", "cache_lengths", "compact_index"]
