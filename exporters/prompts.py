"""Prompts for int8 calibration and for the build's accuracy check, kept apart so that the check
never sees the calibration prompts. A model folder may bring its own in `sdrt.json`
({"prompts": {"calibration": [...], "evaluation": [...]}}), e.g. prompts of its own domain."""

from __future__ import annotations

CALIBRATION = (
    "a photograph of an astronaut riding a horse",
    "a watercolor painting of a fox in a snowy forest",
    "portrait of an old fisherman, dramatic lighting, highly detailed",
    "a cozy cabin by a lake at sunrise, oil painting",
    "a futuristic city skyline at night, neon lights, rain",
    "a bowl of fruit on a wooden table, still life",
    "an isometric illustration of a tiny island with a lighthouse",
    "a macro photo of a dewdrop on a green leaf",
)
EVALUATION = (
    "a red vintage car parked on a cobblestone street",
    "a mountain landscape with a river, golden hour",
    "a cat wearing a wizard hat, digital art",
    "a bustling market in a desert town",
)
