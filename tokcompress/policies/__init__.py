"""Built-in policies. Importing this package registers them."""

from .baselines import Frames, KeepAll, Pool, RandomKeep, Uniform
from .holitom import HoliTom

__all__ = ["Frames", "HoliTom", "KeepAll", "Pool", "RandomKeep", "Uniform"]
