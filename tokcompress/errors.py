"""Exceptions raised by tokcompress.

Each one says what is wrong and what to do about it, so that a misuse fails loudly instead of
producing silently wrong tokens.
"""

from __future__ import annotations


class TokcompressError(Exception):
    """Base class of every error tokcompress raises on purpose."""


class UnknownPolicyError(TokcompressError, KeyError):
    """A policy name that is not in the registry."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly.
        return str(self.args[0]) if self.args else ""


class UnsupportedModelError(TokcompressError, TypeError):
    """A model class that no adapter describes."""


class UnsupportedUsageError(TokcompressError, NotImplementedError):
    """A generation mode the engine cannot keep exact (static caches, chunked prefill, cache reuse, ...)."""


class PolicyOutputError(TokcompressError, ValueError):
    """A policy returned indices or embeddings that do not describe a valid compression."""


class MissingSignalError(TokcompressError, ValueError):
    """A policy needs a signal (pixels, vision attention, ...) that the model's adapter cannot provide."""
