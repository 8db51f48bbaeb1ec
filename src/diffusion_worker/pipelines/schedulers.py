"""Scheduler names users choose from, each a diffusers class plus the config changes that define it.

A job gets a scheduler built fresh from the model's own scheduler config, so no job can leave its timesteps,
step index or sigmas behind for the next.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ..schema import SCHEDULER_NAMES

SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "euler": (EulerDiscreteScheduler, {}),
    "euler_ancestral": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"use_karras_sigmas": False}),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    # The multistep SDE variant: the single-step one needs torchsde, an extra dependency for one scheduler.
    "dpmpp_2m_sde_karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    ),
    "ddim": (DDIMScheduler, {}),
    # PLMS without the Runge-Kutta warm-up, as Stable Diffusion's own PNDM config: the warm-up needs 4 steps or more.
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
    "lms": (LMSDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
}
assert tuple(SCHEDULERS) == SCHEDULER_NAMES, "schema.SCHEDULER_NAMES and SCHEDULERS must list the same names"
# Schedulers as `fresh_scheduler` first builds them, by class, config and changes: a few per model and preset.
_built: dict[str, SchedulerMixin] = {}


def build_scheduler(
    name: str, model_config: Mapping[str, Any], preset_config: Mapping[str, Any] | None = None
) -> SchedulerMixin:
    """A new scheduler of the table's `name`, with a preset's config changes (trailing timesteps) on top."""
    scheduler_class, overrides = SCHEDULERS[name]
    return fresh_scheduler(scheduler_class, model_config, **{**overrides, **(preset_config or {})})


def fresh_scheduler(
    scheduler_class: type[SchedulerMixin], model_config: Mapping[str, Any], **changes: Any
) -> SchedulerMixin:
    """A scheduler no job has used: a copy of one built once per class, config and changes. `from_config` reads the
    signatures of every compatible class each time (0.6 ms, on the way to the GPU); the copy takes a sixth of that.

    `from_config` copies the config, and the built one is only ever copied, so neither the model's config, nor the
    table, nor what a job's scheduler keeps (timesteps, step index, sigmas) reaches another job."""
    # Scheduler configs are JSON (diffusers saves them so): the key holds every value whole.
    key = json.dumps([scheduler_class.__name__, model_config, changes], sort_keys=True)
    if key not in _built:
        _built[key] = scheduler_class.from_config(model_config, **changes)
    return copy.deepcopy(_built[key])


def scheduler_name_of(scheduler: SchedulerMixin) -> str:
    """The table name of a model's own scheduler: the default when a request names none."""
    for name, (scheduler_class, overrides) in SCHEDULERS.items():
        if type(scheduler) is scheduler_class and all(
            scheduler.config.get(key) == value for key, value in overrides.items()
        ):
            return name
    raise ValueError(f"the model's scheduler {type(scheduler).__name__} has no name in the scheduler table")
