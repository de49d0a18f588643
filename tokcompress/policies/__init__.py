"""Built-in policies. Importing this package registers them."""

from .baselines import Frames, KeepAll, Pool, RandomKeep, Uniform

__all__ = ["Frames", "KeepAll", "Pool", "RandomKeep", "Uniform"]
