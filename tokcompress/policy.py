"""The policy interface: a small dataclass whose ``compress`` maps a TokenSet to a Compression.

Policies are pure: they read tensors and return tensors. They never see the model, the cache or the
generation kwargs; the engine applies what they return. ``retain`` is, everywhere, the fraction of
visual tokens kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Sequence

import torch

from .tokens import Compression, DecodeChoice, DecodeTokens, LayerTokens, TokenSet

#: Where a policy acts. "input": on the language model's input embeddings (before layer 0);
#: "layer": on the hidden states entering a decoder layer during prefill; "decode": on the KV cache
#: at every decode step.
STAGES = ("input", "layer", "decode")


def check_retain(retain: float, name: str = "retain") -> float:
    """Return ``retain`` as a float, or raise a ValueError that says what is allowed."""
    if isinstance(retain, bool) or not isinstance(retain, (int, float)) or not 0.0 < float(retain) <= 1.0:
        raise ValueError(f"{name} must be a fraction in (0, 1] of the visual tokens to keep; got {retain!r}")
    return float(retain)


#: How survivors are numbered: "kept" (original position ids, the engine's default) or "compacted"
#: (the shortened sequence renumbered consecutively, as references that rebuild the input do; 1-D
#: positions only, M-RoPE families always keep the original ids).
POSITIONS = ("kept", "compacted")


def check_positions(positions: str) -> str:
    """Return ``positions`` or raise a ValueError that says what is allowed."""
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}; got {positions!r}")
    return positions


def round_half_up(x: float) -> int:
    """Round to the nearest integer, halves up (Python's round() rounds halves to even)."""
    return int(math.floor(x + 0.5))


def keep_count(retain: float, n: int) -> int:
    """``retain * n`` rounded half up, at least 1 and at most ``n``: the baselines' budget rule."""
    return max(1, min(n, round_half_up(retain * n)))


def check_layer(layer: int | None, name: str = "layer", lowest: int = 1) -> int | None:
    """Return ``layer`` (None allowed: the scaled default), or raise a ValueError that says what is allowed."""
    if layer is None:
        return None
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < lowest:
        raise ValueError(f"{name} must be None (the scaled reference default) or an int >= {lowest}; got {layer!r}")
    return layer


def scaled_layer(reference: int, reference_depth: int, depth: int, lowest: int = 1) -> int:
    """Default decoder layer for a language model of ``depth`` layers.

    The reference layer is kept as is at the reference depth; otherwise it is scaled by
    ``depth / reference_depth``, rounded half up and clamped to ``[lowest, depth - 1]`` (so a 2-layer
    test model gets layer 1 and HoliTom's layer 18 of 28 becomes 51 of 80).
    """
    if depth == reference_depth:
        return reference
    return max(lowest, min(depth - 1, round_half_up(reference * depth / reference_depth)))


@dataclass
class Policy:
    """Base class of every policy.

    Subclasses set ``name`` (the registry key), declare the extra ``needs`` they read from
    ``TokenSet.signals`` (``"pixels"``, ``"vision_attention"``, ...; ``"query"`` for the question
    embeddings), the ``optional_needs`` they use when available (and replace by a documented
    substitute otherwise), and implement :meth:`compress`.
    """

    retain: float = 0.25

    name: ClassVar[str] = "policy"
    stage: ClassVar[str] = "input"
    needs: ClassVar[frozenset[str]] = frozenset()
    #: Signals the policy uses when the adapter can capture them, with a documented fallback otherwise.
    optional_needs: ClassVar[frozenset[str]] = frozenset()
    #: False for policies that need the whole grid and so must come first in a chain.
    accepts_partial: ClassVar[bool] = True

    def __post_init__(self) -> None:
        self.retain = check_retain(self.retain)

    def compress(self, tokens: TokenSet) -> Compression:
        """Choose (and optionally merge) tokens. Must return a valid :class:`Compression`."""
        raise NotImplementedError

    def __call__(self, tokens: TokenSet) -> Compression:
        result = self.compress(tokens)
        result.validate(tokens, self.name)
        return result

    @property
    def label(self) -> str:
        """Short human-readable description, e.g. ``uniform(retain=0.25)``."""
        return f"{self.name}(retain={self.retain:g})"

    def stages(self) -> list[Policy]:
        """The policies this one is made of, in order (itself for a single policy)."""
        return [self]


@dataclass
class LayerPolicy(Policy):
    """Base class of in-layer (prefill) policies: they act on the hidden states entering layer ``K``.

    The engine computes the attention of layer ``K - 1`` for the query rows named by ``queries`` and
    hands the row's visual tokens to :meth:`select` as a :class:`~tokcompress.tokens.LayerTokens`;
    layers ``>= K`` then run on the survivors and cache only them. Survivors keep their original
    positions, unless the policy has ``positions == "compacted"`` (1-D positions only): then layers
    ``>= K`` see the shortened sequence renumbered consecutively, with rotary embeddings recomputed.
    """

    stage: ClassVar[str] = "layer"
    #: Query rows whose layer ``K - 1`` attention the policy reads: ``"last"`` (the row's last prompt
    #: token) or ``"after_video"`` (every token after the row's last video token); ``None`` for
    #: policies that read no attention (nothing is recomputed; ``LayerTokens.attention`` is empty).
    queries: ClassVar[str | None] = "last"
    #: True when the caches of layers ``< K`` are cut to the survivors as well (PruneVid).
    prune_earlier: ClassVar[bool] = False

    def resolve_layer(self, depth: int) -> int:
        """``K`` for a language model of ``depth`` decoder layers (``1 <= K < depth``)."""
        raise NotImplementedError

    def layer_explicit(self) -> bool:
        """True when the user chose the layer (a scaled default may be moved past Qwen3-VL's deepstack layers)."""
        return getattr(self, "layer", None) is not None

    def select(self, tokens: LayerTokens) -> Compression:
        """Choose (and optionally merge) visual tokens; ``keep`` indexes ``tokens``' rows."""
        raise NotImplementedError

    def compress(self, tokens: TokenSet) -> Compression:
        raise TypeError(
            f"policy {self.name!r} acts inside the language model; wrap a model with it (tokcompress.wrap) "
            "instead of calling it on input tokens"
        )


@dataclass
class DecodePolicy(Policy):
    """Base class of decode-time policies: at every decode step they choose which visual cache
    entries layers ``>= L`` read, from the current token's attention at layer ``L - 1``.

    :meth:`step` is pure: what it must remember between steps goes into ``DecodeChoice.memory`` and
    comes back as ``memory`` at the next step of the same row and generation.
    """

    stage: ClassVar[str] = "decode"

    def resolve_layer(self, depth: int) -> int:
        """``L`` for a language model of ``depth`` decoder layers (``1 <= L < depth``)."""
        raise NotImplementedError

    def layer_explicit(self) -> bool:
        return getattr(self, "layer", None) is not None

    @property
    def evicts(self) -> bool:
        """True when pruned entries are removed from the cache for good (frees memory)."""
        return False

    def step(self, tokens: DecodeTokens, memory: object) -> DecodeChoice:
        raise NotImplementedError

    def compress(self, tokens: TokenSet) -> Compression:
        raise TypeError(
            f"policy {self.name!r} acts on the KV cache during decoding; wrap a model with it (tokcompress.wrap) "
            "instead of calling it on input tokens"
        )


@dataclass
class Sequential(Policy):
    """Apply several policies in order. Input-stage ones run one after another, each on the
    survivors of the last; in-layer and decode-time ones (listed by :meth:`stages`) then act inside
    the language model on what the input stages kept.

    ``retain`` is derived: the product of the input-stage children's. Children are never mutated.
    """

    policies: Sequence[Policy] = field(default_factory=tuple)
    retain: float = field(init=False, default=1.0)

    name: ClassVar[str] = "sequential"

    def __post_init__(self) -> None:
        self.policies = tuple(self.policies)
        if not self.policies:
            raise ValueError("Sequential needs at least one policy")
        for i, child in enumerate(self.policies):
            if not isinstance(child, Policy):
                raise TypeError(f"Sequential takes Policy objects; item {i} is {type(child).__name__}")
            if i > 0 and child.stage == "input" and not child.accepts_partial:
                raise ValueError(
                    f"policy {child.name!r} needs the full frame grid and cannot follow another policy; put it first"
                )
        # Threshold-controlled policies (retain None) count as 1: their kept fraction is data-dependent.
        self.retain = math.prod(p.retain for p in self.policies if p.stage == "input" and p.retain is not None)

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset().union(*(p.needs for p in self.policies))

    @property
    def optional_needs(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset().union(*(p.optional_needs for p in self.policies)) - self.needs

    @property
    def label(self) -> str:
        return " -> ".join(p.label for p in self.policies)

    def stages(self) -> list[Policy]:
        return [s for p in self.policies for s in p.stages()]

    def compress(self, tokens: TokenSet) -> Compression:
        inputs = [p for p in self.policies if p.stage == "input"]
        return chain_compress(inputs, tokens)


def chain_compress(policies: Sequence[Policy], tokens: TokenSet) -> Compression:
    """Run input-stage ``policies`` in order, each on what the previous one kept.

    Merged values flow forward (a later policy sees them as features) and ``assign`` is composed, so
    the result maps every original token to its final slot.
    """
    features = tokens.flat()
    changed = False  # did any step write merged values?
    current: TokenSet = tokens
    result: Compression | None = None
    assign: torch.Tensor | None = None  # original token -> slot in result.keep
    for policy in policies:
        step = policy(current)
        if step.values is not None:
            changed = True
            features = features.clone()
            features[step.keep] = step.values.to(features.dtype)
        assign = _compose_assign(assign, result, step, tokens.num_tokens)
        result = step
        available = torch.zeros(tokens.num_tokens, dtype=torch.bool, device=features.device)
        available[step.keep] = True
        current = TokenSet(
            features=features.reshape(tokens.features.shape),
            grid=tokens.grid,
            available=available.reshape(tokens.num_frames, tokens.tokens_per_frame),
            signals=tokens.signals,
            query=tokens.query,
            layout=tokens.layout,
            frames_per_step=tokens.frames_per_step,
        )
    assert result is not None
    values = features[result.keep] if changed else None
    return Compression(keep=result.keep, values=values, assign=assign, info=dict(result.info))


def _compose_assign(
    assign: torch.Tensor | None, previous: Compression | None, step: Compression, n: int
) -> torch.Tensor | None:
    """Compose token->slot maps of consecutive steps (None while nothing was merged)."""
    if assign is None and step.assign is None:
        return None
    device = step.keep.device
    # slot (in previous.keep order) -> flat index of the token carrying it
    step_assign = step.assign
    if step_assign is None:  # plain selection: kept tokens map to their own slot
        step_assign = torch.full((n,), -1, dtype=torch.long, device=device)
        step_assign[step.keep] = torch.arange(step.keep.numel(), device=device)
    if assign is None:
        if previous is None:
            return step_assign
        assign = torch.full((n,), -1, dtype=torch.long, device=device)
        assign[previous.keep] = torch.arange(previous.keep.numel(), device=device)
    assert previous is not None
    carrier = previous.keep  # flat index of each previous slot
    out = torch.full((n,), -1, dtype=torch.long, device=device)
    alive = assign >= 0
    out[alive] = step_assign[carrier[assign[alive]]]
    return out
