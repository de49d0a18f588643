"""Built-in policies. Importing this package registers them."""

from .baselines import Frames, KeepAll, Pool, RandomKeep, Uniform
from .dycoke import DyCoke, DyCokeKV, DyCokeTTM
from .fastv import FastV
from .holitom_inner import HoliTomInner
from .prunevid import PruneVid, PruneVidInner, PruneVidOuter

__all__ = [
    "DyCoke",
    "DyCokeKV",
    "DyCokeTTM",
    "FastV",
    "Frames",
    "HoliTomInner",
    "KeepAll",
    "Pool",
    "PruneVid",
    "PruneVidInner",
    "PruneVidOuter",
    "RandomKeep",
    "Uniform",
]
