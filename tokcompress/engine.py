"""The hook engine: the only place that installs hooks on a model.

Design (see the project's HF_INTERNALS notes): a forward pre-hook on the inner multimodal model
records where the video placeholders are; a forward pre-hook on the language model runs the policy
on the projected video tokens, drops the pruned positions from ``inputs_embeds``, ``position_ids``
(survivors keep their original ids) and the 2-D mask, and remembers the compact layout on the cache
object. On every later step through that cache it rebuilds the 2-D mask for the physical cache, so
``generate`` stays exact. In-layer and decode-time policies work through pre-hooks on the decoder
layers and their attention modules, installed here and driven by :class:`~tokcompress.layers.LayerRunner`.
No model code is patched; :meth:`Session.close` removes every hook.
"""

from __future__ import annotations

import time
import weakref
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from .adapters.base import Adapter, CallContext, VideoSpan
from .errors import MissingSignalError, UnsupportedUsageError
from .layers import LayerRunner, compact_index
from .policy import DecodePolicy, LayerPolicy, Policy, chain_compress
from .record import RowRecord, VideoRecord
from .scorers import SCORER_SIGNALS, frames_from_pixels, question_text
from .tokens import Compression, TokenSet, selection

#: Attribute under which a wrapped model carries its session. Removed by ``close``.
SESSION_ATTR = "_tokcompress_session"

#: Attributes a model's forward stores on the inner model for later decode steps (Qwen-VL's M-RoPE
#: deltas). A scorer that runs the wrapped model itself would overwrite them; the engine restores them.
FORWARD_STATE_ATTRS = ("rope_deltas",)


@dataclass
class CacheState:
    """Compact layout of a compressed prefill, kept with the cache it was written to."""

    orig_len: int  # logical prompt length (what generate's mask and positions count)
    compact_len: int  # physical prompt length in the cache
    prefix_mask: Tensor  # (B, compact_len) 2-D mask of the compact prompt
    prefix_all_ones: bool
    kv: Any = None  # per-layer layouts of in-layer / decode-time stages (tokcompress.layers.KVState)
    shift: Tensor | None = None  # (B,) tokens removed per row when positions are compacted, else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _stamp(device: torch.device) -> float:
    """``time.perf_counter()`` after the device has finished the work queued so far."""
    _sync(device)
    return time.perf_counter()


def _cache_arg(kwargs: dict[str, Any]) -> Cache | None:
    cache = kwargs.get("cache")
    return kwargs.get("past_key_values") if cache is None else cache


def _check_cache_supported(cache: Any) -> None:
    """Only dynamic caches can hold a compact prompt; refuse everything else with a reason."""
    if cache is None:
        return
    if not isinstance(cache, DynamicCache) or not all(type(layer) is DynamicLayer for layer in cache.layers):
        kinds = sorted({type(layer).__name__ for layer in getattr(cache, "layers", [])}) or [type(cache).__name__]
        raise UnsupportedUsageError(
            f"tokcompress needs a DynamicCache with full-attention layers, got {type(cache).__name__} "
            f"({', '.join(kinds)}). Static caches and compiled generation pre-size the mask to the uncompressed "
            "length; call generate without cache_implementation='static' / compile_config, "
            "or tokcompress.unwrap(model) first."
        )


class Session:
    """Hooks and per-call state of one wrapped model."""

    def __init__(self, model: nn.Module, adapter: Adapter, policy: Policy, processor: Any = None) -> None:
        self.model = model
        self.adapter = adapter
        self.policy = policy
        stages = policy.stages()
        self.input_policies = [p for p in stages if p.stage == "input"]
        self.scorers = self._scorers(self.input_policies)
        self.processor = self._scorer_processor(processor)
        self._paused = 0  # > 0 while a scorer runs: every hook of this session does nothing
        layer_policies = [p for p in stages if isinstance(p, LayerPolicy)]
        decode_policies = [p for p in stages if isinstance(p, DecodePolicy)]
        if len(decode_policies) > 1:
            raise ValueError(f"a chain can hold one decode-time policy; got {[p.label for p in decode_policies]}")
        # positions="compacted" (some policies offer it to match references that renumber the shortened
        # sequence) applies to 1-D positions; M-RoPE families always keep the original ids.
        self.compact_positions = adapter.positions == "1d" and any(
            getattr(p, "positions", "kept") == "compacted" for p in self.input_policies
        )
        provided = frozenset().union(*(s.provides for s in self.scorers))
        missing = set(policy.needs) - {"query"} - set(adapter.signals) - provided
        if missing & SCORER_SIGNALS:
            raise MissingSignalError(
                f"policy {policy.label} needs {sorted(missing & SCORER_SIGNALS)}, which come from a scorer model: pass "
                "scorer= (tokcompress.scorers.QuoTAScorer(model, processor) for quota, "
                "tokcompress.scorers.CLIPScorer(clip_model, clip_processor) for free_video_llm) and processor= "
                "(the wrapped model's processor) to tokcompress.wrap"
            )
        if missing:
            raise MissingSignalError(
                f"policy {policy.label} needs {sorted(missing)}, which the {adapter.name} adapter cannot provide "
                f"(it provides {sorted(adapter.signals) or 'no extra signals'})"
            )
        self.inner = adapter.inner(model)
        self.lm = adapter.language_model(model)
        self.token_ids = adapter.placeholder_ids(model)
        self.captured: dict[str, list[Any]] = {}
        self.call: CallContext | None = None
        self.caches: weakref.WeakKeyDictionary[Cache, CacheState] = weakref.WeakKeyDictionary()
        self.record: list[RowRecord] | None = None
        self._inner_start: float | None = None  # clock stamp of the current prefill call (see RowRecord.clock)
        self._stack = ExitStack()
        self.runner: LayerRunner | None = None
        try:
            needs = frozenset(policy.needs) | frozenset(policy.optional_needs)
            self._install(needs | ({"pixels"} if self.scorers else frozenset()))
            if layer_policies or decode_policies:
                self.runner = LayerRunner(
                    adapter.decoder_layers(model),
                    adapter.self_attention,
                    self.lm.config,
                    layer_policies,
                    decode_policies[0] if decode_policies else None,
                    adapter.first_prunable_layer(model),
                    self._register_pre,
                    rotary=getattr(self.lm, "rotary_emb", None),  # compacted in-layer positions recompute cos/sin
                    positions=adapter.positions,
                    register_post=self._register_post,
                )
        except BaseException:
            self._stack.close()
            raise

    # -- scorers --------------------------------------------------------------------------------
    @staticmethod
    def _scorers(policies: list[Policy]) -> list[Any]:
        """The scorers the input policies declare (a ``scorer`` field), each once."""
        out: list[Any] = []
        seen: dict[str, str] = {}
        for p in policies:
            scorer = getattr(p, "scorer", None)
            if scorer is None or any(scorer is s for s in out):
                continue
            if not callable(scorer) or not isinstance(getattr(scorer, "provides", None), frozenset):
                raise TypeError(
                    f"policy {p.name!r}: scorer must be a tokcompress.scorers.Scorer (QuoTAScorer, CLIPScorer, ...); "
                    f"got {type(scorer).__name__}"
                )
            for signal in scorer.provides:
                if signal in seen:
                    raise ValueError(f"two scorers provide signal {signal!r} (policies {seen[signal]!r} and {p.name!r})")
                seen[signal] = p.name
            out.append(scorer)
        return out

    def _scorer_processor(self, processor: Any) -> Any:
        """The wrapped model's processor (question text, frame normalisation), needed when scorers run."""
        if not self.scorers or processor is not None:
            return processor
        for scorer in self.scorers:
            if getattr(scorer, "model", None) is self.model and getattr(scorer, "processor", None) is not None:
                return scorer.processor  # the scorer is the wrapped model: same processor
        raise ValueError(
            "a scorer reads the question text and the frames of each call, which needs the wrapped model's "
            "processor: pass processor=<the processor of the wrapped model> to tokcompress.wrap"
        )

    def _run_scorers(self, span: VideoSpan, input_ids: Tensor | None, valid: Tensor, target: Tensor) -> tuple[dict, float]:
        """Signals of every scorer for one video, and the seconds they took (hooks paused meanwhile)."""
        pixels = span.signals.get("pixels")
        if pixels is None or input_ids is None:
            raise MissingSignalError(
                "a scorer needs the video frames and the question's token ids: pass input_ids and the video as "
                "pixel values (not pre-computed embeddings)"
            )
        after = torch.zeros_like(valid[span.row])
        after[int(span.all_positions.max()) + 1 :] = True
        ids = input_ids[span.row][(after & valid[span.row] & ~target[span.row]).to(input_ids.device)]
        question = question_text(ids, self.processor)
        frames = frames_from_pixels(pixels, self.processor)
        saved = {a: getattr(self.inner, a) for a in FORWARD_STATE_ATTRS if hasattr(self.inner, a)}
        _sync(pixels.device)
        start = time.perf_counter()
        self._paused += 1
        try:
            signals: dict[str, Tensor] = {}
            for scorer in self.scorers:
                signals.update(scorer(frames, question))
        finally:
            self._paused -= 1
            for name, value in saved.items():
                setattr(self.inner, name, value)
        _sync(pixels.device)
        return {k: v.to(pixels.device) for k, v in signals.items()}, time.perf_counter() - start

    # -- installation -------------------------------------------------------------------------
    def _install(self, needs: frozenset[str]) -> None:
        hooks = [
            self.inner.register_forward_pre_hook(self._inner_pre, with_kwargs=True),
            self.lm.register_forward_pre_hook(self._lm_pre, with_kwargs=True),
        ]
        for cap in self.adapter.captures(self.model, needs):
            if cap.when == "pre":
                fn = self._capture_pre(cap.name, cap.fn)
                hooks.append(cap.module.register_forward_pre_hook(fn, with_kwargs=True))
            else:
                fn = self._capture_post(cap.name, cap.fn)
                hooks.append(cap.module.register_forward_hook(fn, with_kwargs=True))
        for handle in hooks:
            self._stack.callback(handle.remove)
        setattr(self.model, SESSION_ATTR, self)
        self._stack.callback(delattr, self.model, SESSION_ATTR)

    def _register_pre(self, module: nn.Module, fn: Any) -> None:
        """Install a forward pre-hook (with kwargs) removed by :meth:`close`; the runner's only way to hook."""
        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> Any:
            return None if self._paused else fn(mod, args, kwargs)

        self._stack.callback(module.register_forward_pre_hook(hook, with_kwargs=True).remove)

    def _register_post(self, module: nn.Module, fn: Any) -> None:
        """Install a forward hook (with kwargs) removed by :meth:`close`; for stages that edit a module's output."""
        def hook(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            return None if self._paused else fn(mod, args, kwargs, output)

        self._stack.callback(module.register_forward_hook(hook, with_kwargs=True).remove)

    def close(self) -> None:
        """Remove every hook and attribute this session added."""
        self._stack.close()
        self.captured.clear()
        self.call = None

    def _capture_pre(self, name: str, fn: Any) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not self._paused:
                self.captured.setdefault(name, []).append(fn(module, args, kwargs, None))

        return hook

    def _capture_post(self, name: str, fn: Any) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if not self._paused:
                self.captured.setdefault(name, []).append(fn(module, args, kwargs, output))

        return hook

    # -- hook on the inner multimodal model ----------------------------------------------------
    def _inner_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self._paused:
            return None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        cache = _cache_arg(kwargs)
        state = self.caches.get(cache) if cache is not None else None
        if state is not None:
            self.call = None
            if kwargs.get("position_ids") is None:
                return args, {**kwargs, "position_ids": self._logical_positions(cache, state, input_ids, embeds)}
            return None
        if any(kwargs.get(k) is not None for k in ("pixel_values_videos", "pixel_values", "pixel_values_images")):
            self.captured.clear()  # the vision tower is about to run for this call
        target = self._placeholder_mask(input_ids, embeds)
        self._inner_start = _stamp(target.device)
        self.call = CallContext(
            target=target,
            input_ids=input_ids,
            inner_kwargs=dict(kwargs),
            captured=self.captured,
            position_ids=None,
        )
        return None

    def _placeholder_mask(self, input_ids: Tensor | None, embeds: Tensor | None) -> Tensor:
        if input_ids is not None:
            ids = torch.tensor(self.token_ids, device=input_ids.device)
            return torch.isin(input_ids, ids)
        assert embeds is not None
        table = self.inner.get_input_embeddings()
        ids = torch.tensor(self.token_ids, device=embeds.device)
        placeholder = table(ids).to(embeds.dtype)  # (P, D)
        return (embeds[:, :, None, :] == placeholder[None, None]).all(-1).any(-1)

    def _logical_positions(self, cache: Cache, state: CacheState, input_ids: Tensor | None, embeds: Tensor | None) -> Tensor:
        """Positions the unwrapped model would derive for a manual decode step (it counts the full prompt)."""
        ref = input_ids if input_ids is not None else embeds
        assert ref is not None
        batch, q = ref.shape[0], ref.shape[1]
        past = state.orig_len + cache.get_seq_length() - state.compact_len
        text = torch.arange(past, past + q, device=ref.device).expand(batch, q)
        if self.adapter.positions != "mrope":
            return text
        deltas = getattr(self.inner, "rope_deltas", None)
        mrope = text[None].expand(3, batch, q)
        if deltas is not None:
            mrope = mrope + deltas.to(ref.device).reshape(1, -1, 1)
        return torch.cat([text[None], mrope], dim=0)

    # -- hook on the language model ------------------------------------------------------------
    def _lm_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self._paused:
            return None
        cache = _cache_arg(kwargs)
        if self.runner is not None:
            self.runner.reset()
        if cache is not None and cache in self.caches:
            self.call = None
            return args, self._continue(kwargs, cache, self.caches[cache])
        call, self.call = self.call, None
        if call is None or not bool(call.target.any()):
            self.captured.clear()
            return None
        hook_start = _stamp(call.target.device)
        previous = self.record
        try:
            out = self._prefill(module, kwargs, cache, call)
        finally:
            self.captured.clear()
        if self.record is not None and self.record is not previous:
            clock = {"inner_start": self._inner_start, "lm_hook_start": hook_start, "lm_start": _stamp(call.target.device)}
            for row in self.record:
                row.clock = dict(clock)
        return args, out

    def _continue(self, kwargs: dict, cache: Cache, state: CacheState) -> dict:
        """A step after a compressed prefill: map the logical 2-D mask to the physical cache."""
        positions = kwargs.get("position_ids")
        if state.shift is not None and positions is not None:  # compacted positions continue from the short prompt
            kwargs = {**kwargs, "position_ids": positions - state.shift.to(positions.device)[:, None]}
        embeds = kwargs.get("inputs_embeds")
        q = embeds.shape[1] if embeds is not None else kwargs["input_ids"].shape[1]
        decoded = cache.get_seq_length() - state.compact_len
        if q != 1:
            raise UnsupportedUsageError(
                f"a compressed cache can only be continued one token at a time, got {q} new tokens. Chunked prefill "
                "(prefill_chunk_size), assisted/speculative decoding and reusing a compressed cache across generate "
                "calls are not supported: run a fresh generate (no past_key_values) or unwrap the model."
            )
        mask = kwargs.get("attention_mask")
        if isinstance(mask, dict) or (mask is not None and mask.dim() != 2):
            raise UnsupportedUsageError("tokcompress needs a 2-D attention mask (or none); got a 4-D or per-layer mask")
        if mask is None:
            ones = state.prefix_mask.new_ones(state.prefix_mask.shape[0], decoded + q)
            if self.runner is not None:
                self.runner.begin_step(cache, state, ones)
            if state.prefix_all_ones:
                return kwargs
            return {**kwargs, "attention_mask": torch.cat([state.prefix_mask, ones], dim=1)}
        expected = state.orig_len + decoded + q
        if mask.shape[1] != expected or mask.shape[0] != state.prefix_mask.shape[0]:
            raise UnsupportedUsageError(
                f"the attention mask covers {mask.shape[1]} positions, but the compressed cache expects {expected} "
                f"({state.orig_len} prompt + {decoded} generated + {q} new). Reusing a compressed cache across generate "
                "calls (multi-turn) or changing the batch mid-generation is not supported."
            )
        new = torch.cat([state.prefix_mask.to(mask.dtype), mask[:, state.orig_len :]], dim=1)
        if self.runner is not None:
            self.runner.begin_step(cache, state, mask[:, state.orig_len :])
        return {**kwargs, "attention_mask": new}

    def _prefill(self, module: nn.Module, kwargs: dict, cache: Cache | None, call: CallContext) -> dict:
        _check_cache_supported(cache)
        if cache is not None and cache.get_seq_length() > 0:
            raise UnsupportedUsageError(
                "video tokens arrived on a cache that already holds tokens: chunked prefill "
                "(prefill_chunk_size) and appending a video to an existing conversation cache are not supported "
                "while compressing; run generate without them or unwrap the model."
            )
        embeds: Tensor = kwargs["inputs_embeds"]
        batch, length, dim = embeds.shape
        mask = kwargs.get("attention_mask")
        if isinstance(mask, dict) or (mask is not None and mask.dim() != 2):
            raise UnsupportedUsageError(
                "tokcompress needs a 2-D attention mask (or none) at the language model; this model passes a "
                "4-D or per-layer mask, which cannot be compacted"
            )
        if tuple(call.target.shape) != (batch, length):
            raise RuntimeError(
                f"placeholder mask {tuple(call.target.shape)} does not match the language-model input {(batch, length)}"
            )
        position_ids = kwargs.get("position_ids")
        call.position_ids = position_ids
        try:
            spans = self.adapter.spans(self.model, call)
        except RuntimeError as err:
            raise UnsupportedUsageError(
                f"could not locate the videos of this call: {err}. If generate ran with prefill_chunk_size "
                "(chunked prefill), a video is split across calls, which tokcompress does not support."
            ) from err
        if not spans:
            return dict(kwargs)
        valid = mask.bool() if mask is not None else torch.ones(batch, length, dtype=torch.bool, device=embeds.device)

        # Placeholder tokens no span claims (e.g. still images beside the video) pass through untouched.
        video = torch.zeros_like(call.target)
        for span in spans:
            video[span.row, span.all_positions.to(embeds.device)] = True
        if bool((video & ~call.target).any()):
            raise RuntimeError(f"the {self.adapter.name} adapter placed a video span on non-placeholder tokens")
        keep = ~video
        new_values: list[tuple[int, Tensor, Tensor]] = []  # (row, seq positions, values)
        videos: list[list[VideoRecord]] = [[] for _ in range(batch)]
        kept_rows: list[list[Tensor]] = [[] for _ in range(batch)]
        for span in spans:
            scorer_seconds = 0.0
            if self.scorers:
                scores, scorer_seconds = self._run_scorers(span, call.input_ids, valid, call.target)
                span.signals = {**span.signals, **scores}
            tokens = self._token_set(span, embeds, valid, call.target)
            result, seconds = self._run_policy(tokens, embeds.device)
            kept_pos = span.positions.to(embeds.device)[result.keep]
            keep[span.row, kept_pos] = True
            keep[span.row, span.specials.to(embeds.device)] = True
            if result.values is not None:
                new_values.append((span.row, kept_pos, result.values))
            kept_rows[span.row] += [kept_pos, span.specials.to(embeds.device)]
            videos[span.row].append(
                VideoRecord(
                    span.positions,
                    span.grid,
                    result.keep,
                    result.assign,
                    result.info,
                    seconds,
                    span.frames_per_step,
                    scorer_seconds,
                )
            )
        index, slot_valid = compact_index(keep)
        compact_len = index.shape[1]
        dropped = compact_len != length or bool((~keep).any())
        gather = index[..., None].expand(-1, -1, dim)
        new_embeds = embeds.gather(1, gather)
        slot_of = torch.full((batch, length), -1, dtype=torch.long, device=embeds.device)
        rows = torch.arange(batch, device=embeds.device)[:, None].expand_as(index)
        slot_of[rows[slot_valid], index[slot_valid]] = torch.nonzero(slot_valid)[:, 1]
        for row, pos, values in new_values:
            new_embeds[row, slot_of[row, pos]] = values.to(new_embeds.dtype)

        base_mask = mask if mask is not None else valid.long()
        new_mask = base_mask.gather(1, index) * slot_valid.to(base_mask.dtype)
        out = dict(kwargs)
        out["inputs_embeds"] = new_embeds
        out["attention_mask"] = None if (mask is None and not dropped) else new_mask
        new_positions = self._compact_positions(position_ids, index, new_mask, batch, length, dropped, embeds.device)
        shift = None
        if self.compact_positions and new_positions is not None:
            removed = (~keep & valid).long()
            new_positions = new_positions - removed.cumsum(1).gather(1, index)
            shift = removed.sum(1)
        if new_positions is not None:
            out["position_ids"] = new_positions
        out.update(self.adapter.gather_extra(kwargs, index, slot_valid))

        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(module.config, "use_cache", True) and not module.training
        if use_cache and cache is None:
            cache = DynamicCache(config=module.config)
            out["cache"] = cache
            out.pop("past_key_values", None)
        if cache is not None and use_cache:
            self.caches[cache] = CacheState(
                orig_len=length,
                compact_len=compact_len,
                prefix_mask=new_mask,
                prefix_all_ones=mask is None and bool(new_mask.all()),
                shift=shift,
            )
        merged_rows = {row for row, _, _ in new_values}
        self.record = self._rows_record(
            video, kept_rows, merged_rows, new_embeds, slot_of, index, slot_valid, new_positions, videos
        )
        if self.runner is not None:
            state = self.caches.get(cache) if cache is not None and use_cache else None
            self.runner.begin_prefill(cache if use_cache else None, state, new_mask, slot_of, videos, self.record)
        return out

    def _token_set(self, span: VideoSpan, embeds: Tensor, valid: Tensor, target: Tensor) -> TokenSet:
        t, h, w = span.grid
        pos = span.positions.to(embeds.device)
        features = embeds[span.row, pos].reshape(t, h * w, embeds.shape[-1])
        after = torch.zeros_like(valid[span.row])
        after[int(pos.max()) + 1 :] = True
        query_mask = after & valid[span.row] & ~target[span.row]
        return TokenSet(
            features=features,
            grid=span.grid,
            signals=span.signals,
            query=embeds[span.row, query_mask],
            layout=self.adapter.name,
            frames_per_step=span.frames_per_step,
        )

    def _run_policy(self, tokens: TokenSet, device: torch.device) -> tuple[Compression, float]:
        _sync(device)
        start = time.perf_counter()
        if not self.input_policies:  # only in-layer / decode-time stages: every token enters the LM
            result = selection(tokens.available_index())
        elif len(self.input_policies) == 1:
            result = self.input_policies[0](tokens)
        else:
            result = chain_compress(self.input_policies, tokens)
        _sync(device)
        return result, time.perf_counter() - start

    def _compact_positions(
        self,
        position_ids: Tensor | None,
        index: Tensor,
        new_mask: Tensor,
        batch: int,
        length: int,
        dropped: bool,
        device: torch.device,
    ) -> Tensor | None:
        """Gather position ids so survivors keep their original values.

        When the caller passed none, the LM would count ``0..L-1``; those are gathered too, since the
        compact sequence must not be renumbered.
        """
        if position_ids is None:
            if not dropped:
                return None
            position_ids = torch.arange(length, device=device)[None].expand(batch, length)
            if self.adapter.positions == "mrope":
                position_ids = position_ids[None].expand(3, batch, length)
        if position_ids.dim() == 2:
            return position_ids.expand(batch, length).gather(1, index)
        rows = position_ids.shape[0]
        full = position_ids.expand(rows, batch, length)
        out = full.gather(2, index[None].expand(rows, -1, -1))
        if rows == 4 and dropped:
            # Row 0 is the text row: only masks and packed-sequence detection read it, so renumber it
            # contiguously (as the unpruned sequence would be) instead of leaving gaps.
            text = (new_mask.long().cumsum(-1) - 1).masked_fill(new_mask == 0, 0)
            out = torch.cat([text[None].to(out.dtype), out[1:]], dim=0)
        return out

    def _rows_record(
        self,
        target: Tensor,
        kept_rows: list[list[Tensor]],
        merged_rows: set[int],
        new_embeds: Tensor,
        slot_of: Tensor,
        index: Tensor,
        slot_valid: Tensor,
        positions: Tensor | None,
        videos: list[list[VideoRecord]],
    ) -> list[RowRecord]:
        records = []
        for row in range(target.shape[0]):
            kept = torch.cat(kept_rows[row]).sort().values if kept_rows[row] else index.new_zeros(0)
            values = new_embeds[row, slot_of[row, kept]].detach() if row in merged_rows else None
            slots = torch.where(slot_valid[row], index[row], torch.full_like(index[row], -1))
            pos_row = None
            if positions is not None:
                pos_row = positions[row] if positions.dim() == 2 else positions[-3:, row]
            records.append(
                RowRecord(
                    kept=kept,
                    values=values,
                    video_tokens_before=int(target[row].sum()),
                    video_tokens_after=int(kept.numel()),
                    policy=self.policy.label,
                    seconds=sum(v.seconds for v in videos[row]),
                    scorer_seconds=sum(v.scorer_seconds for v in videos[row]),
                    slots=slots,
                    position_ids=pos_row,
                    videos=videos[row],
                )
            )
        return records

