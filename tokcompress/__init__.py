"""tokcompress: training-free visual-token compression for Hugging Face video LLMs.

    import tokcompress as tc
    model = tc.wrap(model, "uniform", retain=0.25)
    out = model.generate(**inputs, max_new_tokens=64)
    tc.last_record(model)
    tc.unwrap(model)

Pictures of what a policy kept: ``tokcompress.viz`` (matplotlib); several policies side by side:
``tc.compare(model, inputs, ["uniform", "random"], retains=[0.5, 0.25])``.
"""

from .api import available_policies, build_policy, compressed, is_wrapped, last_record, policy_of, unwrap, wrap
from .comparison import Comparison, compare
from .errors import (
    MissingSignalError,
    PolicyOutputError,
    TokcompressError,
    UnknownPolicyError,
    UnsupportedModelError,
    UnsupportedUsageError,
)
from .layers import cache_bytes, cache_lengths
from .policy import DecodePolicy, LayerPolicy, Policy, Sequential
from .record import RowRecord, VideoRecord
from .registry import register
from .tokens import Compression, DecodeChoice, DecodeTokens, LayerTokens, TokenSet

__version__ = "0.1.0"

__all__ = [
    "Comparison",
    "Compression",
    "DecodeChoice",
    "DecodePolicy",
    "DecodeTokens",
    "LayerPolicy",
    "LayerTokens",
    "MissingSignalError",
    "Policy",
    "PolicyOutputError",
    "RowRecord",
    "Sequential",
    "TokcompressError",
    "TokenSet",
    "UnknownPolicyError",
    "UnsupportedModelError",
    "UnsupportedUsageError",
    "VideoRecord",
    "available_policies",
    "build_policy",
    "cache_bytes",
    "cache_lengths",
    "compare",
    "compressed",
    "is_wrapped",
    "last_record",
    "policy_of",
    "register",
    "unwrap",
    "wrap",
]
