"""The public entry points: wrap, unwrap, compressed, last_record, available_policies."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence, TypeVar

from torch import nn

from .adapters import adapter_for
from .engine import SESSION_ATTR, Session
from .policy import Policy, Sequential
from .record import RowRecord
from .registry import available, make_policy

M = TypeVar("M", bound=nn.Module)
PolicySpec = str | Policy | Sequence[str | Policy]


def build_policy(policy: PolicySpec, retain: float | None = None, **params: Any) -> Policy:
    """A Policy from a registered name (with ``retain`` and ``params``), a Policy, or a list of them."""
    if isinstance(policy, Policy):
        if retain is not None or params:
            raise ValueError("retain and policy parameters go into the policy object itself when you pass one")
        return policy
    if isinstance(policy, str):
        if retain is not None:
            params["retain"] = retain
        return make_policy(policy, **params)
    if isinstance(policy, Sequence) and not isinstance(policy, (str, bytes)):
        if retain is not None or params:
            raise ValueError(
                "a chain takes no shared retain or parameters: pass configured policy objects, "
                "e.g. [EVS(retain=0.5), DivPrune(retain=0.5)]"
            )
        items = [p if isinstance(p, Policy) else make_policy(p) for p in policy]
        return items[0] if len(items) == 1 else Sequential(items)
    raise TypeError(f"policy must be a name, a Policy or a list of them; got {type(policy).__name__}")


def wrap(
    model: M, policy: PolicySpec = "none", retain: float | None = None, *, processor: Any = None, **params: Any
) -> M:
    """Install compression hooks on ``model`` and return the same object.

    ``policy`` is a registered name (see :func:`available_policies`), a Policy object, or a list of
    them applied in order. ``retain`` is the fraction of visual tokens kept. ``processor`` is the
    wrapped model's processor, needed by policies with a scorer (``quota``, ``free_video_llm``) to
    read the question text and the frames of each call. Wrapping a model that
    is already wrapped raises: call :func:`unwrap` first, or wrap once with a list to chain policies.
    """
    existing = getattr(model, SESSION_ATTR, None)
    if existing is not None:
        raise ValueError(
            f"this model is already wrapped with {existing.policy.label}; call tokcompress.unwrap(model) first, "
            "or pass a list of policies to chain them in one wrap"
        )
    adapter = adapter_for(model)
    Session(model, adapter, build_policy(policy, retain, **params), processor=processor)
    return model


def unwrap(model: M) -> M:
    """Remove every hook and attribute tokcompress added; the model behaves exactly as before."""
    session = _session(model)
    session.close()
    return model


def is_wrapped(model: nn.Module) -> bool:
    return getattr(model, SESSION_ATTR, None) is not None


def last_record(model: nn.Module) -> list[RowRecord] | None:
    """Per batch row, what the last compressed prefill kept (None before the first one)."""
    return _session(model).record


def policy_of(model: nn.Module) -> Policy:
    """The policy a wrapped model runs."""
    return _session(model).policy


@contextmanager
def compressed(
    model: M, policy: PolicySpec = "none", retain: float | None = None, *, processor: Any = None, **params: Any
) -> Iterator[M]:
    """``with compressed(model, "random", retain=0.5, seed=0): ...`` wraps for the block only."""
    wrap(model, policy, retain, processor=processor, **params)
    try:
        yield model
    finally:
        unwrap(model)


def available_policies() -> list[str]:
    """Names of the registered policies."""
    return available()


def _session(model: nn.Module) -> Session:
    session = getattr(model, SESSION_ATTR, None)
    if session is None:
        raise ValueError("this model is not wrapped by tokcompress; call tokcompress.wrap(model, policy) first")
    return session
