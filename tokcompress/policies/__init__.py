"""Built-in policies. Importing this package registers them."""

from .baselines import Frames, KeepAll, Pool, RandomKeep, Uniform
from .divprune import DivPrune
from .evs import EVS
from .evs_pixel import EVSPixel

__all__ = ["DivPrune", "EVS", "EVSPixel", "Frames", "KeepAll", "Pool", "RandomKeep", "Uniform"]
