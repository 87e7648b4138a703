"""Scheduler configuration read from a model's `scheduler_config.json`, as diffusers reads it.

Each scheduler declares a frozen dataclass of the diffusers keys it honours, with diffusers'
defaults for that scheduler class. `parse_config` takes the model's config dict (the full config
of the model's own scheduler class, written at build time), keeps the keys the target scheduler
knows, as diffusers' `from_config` does, and fails on values sdrt does not implement, naming the key.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, TypeVar

from ..errors import SdrtError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


@dataclasses.dataclass(frozen=True)
class CommonConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False  # Lin et al. 2023: betas rescaled so that alpha_bar_T = 0

    # keys diffusers accepts for this scheduler whose non-default values sdrt does not implement
    # (LMS and PNDM: diffusers' classes do not know rescale_betas_zero_snr, so sdrt refuses it there)
    UNSUPPORTED = {"rescale_betas_zero_snr": False}
    PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


C = TypeVar("C", bound=CommonConfig)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isinf(a) and math.isinf(b):
        return a == b
    return a == b


def parse_config(config_type: type[C], model_config: dict[str, Any], **overrides: Any) -> C:
    """Build `config_type` from a diffusers scheduler config dict; `overrides` come from the CLI."""
    fields = {f.name for f in dataclasses.fields(config_type)}
    values = {k: v for k, v in {**model_config, **overrides}.items() if k in fields}
    for key, default in config_type.UNSUPPORTED.items():
        if key in model_config and not _same(model_config[key], default):
            raise SdrtError(
                f"scheduler config key {key!r} = {model_config[key]!r} is not supported by "
                f"{config_type.__name__.removesuffix('Config').lower()} in sdrt (accepted: {default!r})"
            )
    if values.get("trained_betas") is not None:
        values["trained_betas"] = tuple(float(b) for b in values["trained_betas"])
    cfg = config_type(**values)
    _check(cfg, "beta_schedule", BETA_SCHEDULES)
    _check(cfg, "timestep_spacing", TIMESTEP_SPACINGS)
    _check(cfg, "prediction_type", config_type.PREDICTION_TYPES)
    if cfg.num_train_timesteps < 2:
        raise SdrtError(f"scheduler config key 'num_train_timesteps' = {cfg.num_train_timesteps} must be >= 2")
    return cfg


def _check(cfg: CommonConfig, key: str, accepted: tuple[str, ...]) -> None:
    value = getattr(cfg, key)
    if value not in accepted:
        raise SdrtError(f"scheduler config key {key!r} = {value!r} is not supported: accepted values are {', '.join(accepted)}")
