"""NumPy schedulers, one algorithm per file, built from a diffusers `scheduler_config.json`."""

from __future__ import annotations

from ..errors import SdrtError
from .base import Scheduler
from .ddim import DDIMScheduler
from .dpmpp_2m import DPMSolverPlusPlus2MScheduler
from .euler import EulerScheduler
from .euler_a import EulerAncestralScheduler
from .lcm import LCMScheduler
from .lms import LMSScheduler
from .pndm import PNDMScheduler
from .tcd import TCDScheduler

SCHEDULERS: dict[str, type[Scheduler]] = {
    cls.name: cls
    for cls in (DDIMScheduler, PNDMScheduler, DPMSolverPlusPlus2MScheduler, EulerScheduler, EulerAncestralScheduler, LMSScheduler,
                LCMScheduler, TCDScheduler)
}
CONSISTENCY = ("lcm", "tcd")  # few-step samplers of distilled models: their own timestep spacing, img2img strength inside the schedule

# diffusers' class name in a model's scheduler_config.json -> sdrt's scheduler of that algorithm
DIFFUSERS_CLASS_NAMES = {
    "DDIMScheduler": "ddim",
    "PNDMScheduler": "pndm",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a",
    "LMSDiscreteScheduler": "lms",
    "LCMScheduler": "lcm",
    "TCDScheduler": "tcd",
}

DIFFUSERS_CLASS_OF = {name: cls for cls, name in DIFFUSERS_CLASS_NAMES.items()}

KARRAS_CAPABLE = ("dpmpp_2m", "euler", "lms")

# the AUTOMATIC1111 WebUI's sampler names (matched in any case) -> (sdrt's scheduler, Karras sigmas)
WEBUI_SAMPLERS = {
    "DDIM": ("ddim", False),
    "PLMS": ("pndm", False),
    "DPM++ 2M": ("dpmpp_2m", False),
    "DPM++ 2M Karras": ("dpmpp_2m", True),
    "Euler": ("euler", False),
    "Euler a": ("euler_a", False),
    "LMS": ("lms", False),
    "LMS Karras": ("lms", True),
    "LCM": ("lcm", False),
    "TCD": ("tcd", False),
}
WEBUI_NAME_OF = {name: webui for webui, (name, karras) in WEBUI_SAMPLERS.items() if not karras}


def default_scheduler_name(model_config: dict) -> str:
    """The model's own scheduler where sdrt has it, else dpmpp_2m."""
    return DIFFUSERS_CLASS_NAMES.get(model_config.get("_class_name", ""), "dpmpp_2m")


def resolve_scheduler(name: str, karras: bool) -> tuple[str, bool]:
    """sdrt's name, or a WebUI sampler name in any case ("dpm++ 2m karras") -> (sdrt's name, Karras sigmas)."""
    key = " ".join(name.lower().split())
    if key in SCHEDULERS:
        return key, karras
    for webui, (scheduler, webui_karras) in WEBUI_SAMPLERS.items():
        if webui.lower() == key:
            return scheduler, karras or webui_karras
    raise SdrtError(f"--scheduler {name!r} is not supported: accepted values are {', '.join(SCHEDULERS)}, "
                    f"or the WebUI's names {', '.join(WEBUI_SAMPLERS)} (any case)")


def make_scheduler(name: str, model_config: dict, karras_sigmas: bool = False) -> Scheduler:
    if name not in SCHEDULERS:
        raise SdrtError(f"--scheduler {name!r} is not supported: accepted values are {', '.join(SCHEDULERS)}")
    overrides = {}
    if karras_sigmas:
        if name not in KARRAS_CAPABLE:
            raise SdrtError(f"--karras applies to schedulers {', '.join(KARRAS_CAPABLE)}, not {name!r}")
        overrides["use_karras_sigmas"] = True
    return SCHEDULERS[name](model_config, **overrides)
