"""Built-in policies. Importing this package registers them."""

from .baselines import Frames, KeepAll, Pool, RandomKeep, Uniform
from .divprune import DivPrune
from .evs import EVS
from .evs_pixel import EVSPixel
from .fastvid import FastVID
from .holitom import HoliTom
from .llava_scissor import LlavaScissor
from .sttm import STTM
from .ts_llava import TSLLaVA
from .vidcom2 import VidCom2
from .visionzip import VisionZip

__all__ = [
    "DivPrune",
    "EVS",
    "EVSPixel",
    "FastVID",
    "Frames",
    "HoliTom",
    "KeepAll",
    "LlavaScissor",
    "Pool",
    "RandomKeep",
    "STTM",
    "TSLLaVA",
    "Uniform",
    "VidCom2",
    "VisionZip",
]
