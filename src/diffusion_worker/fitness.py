"""Health at start: the check RunPod runs once the worker is loaded and before it takes a job
(`runpod.serverless.register_fitness_check`, on RunPod only). A worker that fails it exits and RunPod replaces it,
rather than it failing every job it is sent.

CUDA is expected when DEVICE=cuda, as the Docker image sets it; DEVICE=auto means "CUDA if there is one" and
expects nothing, so a local run on a laptop passes.
"""

from __future__ import annotations

import torch

from .config import Settings
from .placement import Placement
from .runtime import Worker


class UnfitWorker(RuntimeError):
    """The worker cannot serve what it was configured to; the message lists every reason found."""


def check_fitness(worker: Worker) -> None:
    found = cuda_problems(worker.settings, worker.placement) + model_problems(worker)
    if found:
        raise UnfitWorker("; ".join(found))


def cuda_problems(settings: Settings, placement: Placement) -> list[str]:
    if settings.device != "cuda":
        return []
    if not torch.cuda.is_available():
        return ["DEVICE=cuda, but torch sees no CUDA device (no GPU, driver or container runtime)"]
    if placement.device.type != "cuda":
        return [f"DEVICE=cuda, but the pipelines were loaded on {placement.device}"]
    try:
        # A kernel, not just a device count: a GPU this torch build has no kernels for (a newer architecture), a
        # driver too old for its CUDA, or a device in an error state all fail here.
        probe = torch.ones(64, 64, device=placement.device, dtype=torch.float16)
        (probe @ probe).sum().item()
        torch.cuda.synchronize(placement.device)
    except RuntimeError as error:
        name = torch.cuda.get_device_name(placement.device)
        return [f"CUDA is present but unusable on {name}: {error}"]
    return []


def model_problems(worker: Worker) -> list[str]:
    """Every task the worker serves has its models in the models folder, complete, and loaded (no weights left on
    the meta device by a load that skipped them)."""
    found = []
    if not set(worker.tasks) - {"info"}:
        found.append("the worker serves no generation task")
    families = {id(family): family for family in worker.families.values()}.values()
    for family in families:
        for role in family.roles:
            if not role.is_complete(worker.settings.models_dir):
                found.append(f"model {role.name} is missing or incomplete in {role.path(worker.settings.models_dir)}")
        unloaded = {type(module).__name__ for module in family.weight_modules() if _has_meta_weights(module)}
        found += [f"{name} ({', '.join(sorted(family.tasks))}) has weights that did not load" for name in unloaded]
    return found


def _has_meta_weights(module: torch.nn.Module) -> bool:
    return any(parameter.is_meta for parameter in module.parameters())
