"""Name -> policy class registry. ``@register("name")`` on a Policy subclass adds it."""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from .errors import UnknownPolicyError
from .policy import Policy

_REGISTRY: dict[str, type[Policy]] = {}

P = TypeVar("P", bound=type[Policy])


def register(name: str) -> Callable[[P], P]:
    """Class decorator: make ``cls`` available as ``name``. Duplicate names raise."""

    def decorator(cls: P) -> P:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(
                f"policy name {name!r} is already registered by {_REGISTRY[name].__qualname__}; choose another name"
            )
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def available() -> list[str]:
    """Sorted names of the registered policies."""
    _load_builtin()
    return sorted(_REGISTRY)


def policy_class(name: str) -> type[Policy]:
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownPolicyError(
            f"unknown policy {name!r}; known policies: {', '.join(sorted(_REGISTRY))}. "
            "Register a new one with @tokcompress.register('name') on a Policy subclass."
        ) from None


def make_policy(name: str, **params: Any) -> Policy:
    """Instantiate the policy registered as ``name`` with ``params``."""
    cls = policy_class(name)
    try:
        return cls(**params)
    except TypeError as err:
        raise TypeError(f"bad parameters for policy {name!r}: {err}") from None


def _load_builtin() -> None:
    from . import policies  # noqa: F401  (importing registers the built-in policies)
