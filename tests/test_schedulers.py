"""A job's scheduler: built once per name, model config and preset, then copied, and every copy the same as one
built from the config, whatever a job before did with its own."""

from __future__ import annotations

from inspect import signature
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler

from diffusion_worker.pipelines.schedulers import SCHEDULERS, build_scheduler
from diffusion_worker.schema import SCHEDULER_NAMES

MODEL_CONFIG = EulerDiscreteScheduler(timestep_spacing="leading", steps_offset=1).config
TRAILING = {"timestep_spacing": "trailing"}


def state(value: Any) -> Any:
    """A scheduler's state as plain values that compare with ==, arrays and tensors included."""
    if isinstance(value, torch.Tensor | np.ndarray):
        return (str(value.dtype), value.tolist())
    if isinstance(value, dict):
        return {key: state(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [state(item) for item in value]
    if hasattr(value, "__dict__"):
        return (type(value).__name__, state(vars(value)))
    return value


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
@pytest.mark.parametrize("preset_config", [None, TRAILING], ids=["own", "preset"])
def test_a_jobs_scheduler_is_as_if_built_from_the_config(name: str, preset_config: dict | None) -> None:
    scheduler_class, overrides = SCHEDULERS[name]
    expected = state(scheduler_class.from_config(MODEL_CONFIG, **{**overrides, **(preset_config or {})}))
    used = build_scheduler(name, MODEL_CONFIG, preset_config)
    used.set_timesteps(4)
    sample = used.scale_model_input(torch.ones(1, 4, 8, 8), used.timesteps[0])
    # The stochastic schedulers draw noise from a generator; the others take none.
    noise = {"generator": torch.Generator().manual_seed(0)} if "generator" in signature(used.step).parameters else {}
    used.step(torch.zeros_like(sample), used.timesteps[0], sample, **noise)
    fresh = build_scheduler(name, MODEL_CONFIG, preset_config)
    assert fresh is not used
    assert state(fresh) == expected
    assert fresh.config.timestep_spacing == (preset_config or MODEL_CONFIG)["timestep_spacing"]
