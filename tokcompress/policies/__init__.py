"""Built-in policies. Importing this package registers them."""

from .baselines import Frames, KeepAll, Pool, RandomKeep, Uniform
from .fastvid import FastVID
from .holitom import HoliTom

__all__ = ["FastVID", "Frames", "HoliTom", "KeepAll", "Pool", "RandomKeep", "Uniform"]
