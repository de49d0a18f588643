"""Built-in policies. Importing this package registers them."""

from .baselines import Frames, KeepAll, Pool, RandomKeep, Uniform
from .divprune import DivPrune
from .dycoke import DyCoke, DyCokeKV, DyCokeTTM
from .evs import EVS
from .evs_pixel import EVSPixel
from .fastv import FastV
from .fastvid import FastVID
from .framefusion import FrameFusion
from .free_video_llm import FreeVideoLLM
from .holitom import HoliTom
from .holitom_inner import HoliTomInner
from .llava_scissor import LlavaScissor
from .prunevid import PruneVid, PruneVidInner, PruneVidOuter
from .quota import QuoTA
from .sparsevlm import SparseVLM
from .sttm import STTM
from .ts_llava import TSLLaVA
from .vidcom2 import VidCom2
from .visionzip import VisionZip

__all__ = [
    "DivPrune",
    "DyCoke",
    "DyCokeKV",
    "DyCokeTTM",
    "EVS",
    "EVSPixel",
    "FastV",
    "FastVID",
    "FrameFusion",
    "Frames",
    "FreeVideoLLM",
    "HoliTom",
    "HoliTomInner",
    "KeepAll",
    "LlavaScissor",
    "Pool",
    "PruneVid",
    "PruneVidInner",
    "PruneVidOuter",
    "QuoTA",
    "RandomKeep",
    "SparseVLM",
    "STTM",
    "TSLLaVA",
    "Uniform",
    "VidCom2",
    "VisionZip",
]
