"""Components where the memory plan puts them: loaded straight onto their device, moved in and out by hooks when
offloaded or streamed, and loaded once when two roles hold the same bytes.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from accelerate import cpu_offload_with_hook
from diffusers.hooks import apply_group_offloading

from ..hygiene import OFFLOAD_HOOKS
from ..manifest import ModelRole
from ..placement import Placement
from ..plan import OFFLOADED, RESIDENT, STREAMED, stage_of

log = logging.getLogger(__name__)
PlacedModule = tuple[ModelRole, str, torch.nn.Module]


def placement_of(placement: Placement, role: ModelRole, name: str) -> str:
    return placement.plan.placement_of(role.name, name) if placement.plan is not None else RESIDENT


def load_model(model_class: Any, role: ModelRole, name: str, models_dir: Path, placement: Placement) -> Any:
    """Loads one component at its precision, straight onto the GPU when the plan keeps it resident there (no full
    copy in host memory first), into host memory otherwise (offloaded, streamed, or a CPU worker)."""
    component = role.component(name)
    folder = role.component_path(models_dir, component)
    where = {}
    if placement.device.type == "cuda" and placement_of(placement, role, name) == RESIDENT:
        where["device_map"] = str(placement.device)
    return model_class.from_pretrained(
        folder,
        dtype=placement.dtype_for(component.dtype),
        variant=variant_in(folder, role.variant),
        local_files_only=True,
        **where,
    )


def load_components(
    role: ModelRole, models_dir: Path, placement: Placement, given: Iterable[str] = ()
) -> dict[str, torch.nn.Module]:
    """Every component of a pipeline role but those `given`, each of the class its model_index.json names."""
    index = json.loads((role.path(models_dir) / "model_index.json").read_text(encoding="utf-8"))
    loaded = {}
    for component in role.components:
        if component.name not in given:
            library, class_name = index[component.name]
            model_class = getattr(importlib.import_module(library), class_name)
            loaded[component.name] = load_model(model_class, role, component.name, models_dir, placement)
    return loaded


def variant_in(folder: Path, variant: str | None) -> str | None:
    """The manifest's weight variant (fp16) if the folder holds files of it, else the plain weights."""
    if variant and any(folder.rglob(f"*.{variant}*.safetensors")):
        return variant
    return None


def shared_objects(role: ModelRole, models_dir: Path, loaded: dict[str, Any], names: Iterable[str]) -> dict[str, Any]:
    """Of `names` (components and tokenizers), those another role already loaded from byte-identical files, as the
    builder's recorded digests prove: `loaded` maps digests to what was loaded from them."""
    digests = role.recorded_digests(models_dir)
    return {name: loaded[digests[name]] for name in names if digests.get(name) in loaded}


def remember(role: ModelRole, models_dir: Path, loaded: dict[str, Any], objects: dict[str, Any]) -> None:
    """Records what `role` loaded by its digests, for a later role with the same bytes to reuse."""
    digests = role.recorded_digests(models_dir)
    for name, value in objects.items():
        if name in digests:
            loaded.setdefault(digests[name], value)


def place(modules: Iterable[PlacedModule], placement: Placement) -> None:
    """Puts each module where the plan says, once however many roles share it.

    Resident: on the device (already there when loaded straight onto it). Offloaded: in host memory, moved in by
    its forward, and out again when a module of another stage starts (the denoisers of a step stay in together) or
    the job ends. Streamed: diffusers' group offload at leaf level, a few layers on the device at a time, the next
    prefetched on a side stream on CUDA.
    """
    unique: dict[int, tuple[str, torch.nn.Module]] = {}
    offloaded: list[tuple[str, torch.nn.Module, Any]] = []
    for role, name, module in modules:
        if id(module) in unique:
            continue
        unique[id(module)] = (stage_of(name, role.name), module)
        where = placement_of(placement, role, name)
        if where == STREAMED:
            apply_group_offloading(
                module, onload_device=placement.device, offload_type="leaf_level", use_stream=torch.cuda.is_available()
            )
        elif where == OFFLOADED:
            _, hook = cpu_offload_with_hook(module, placement.device)
            offloaded.append((stage_of(name, role.name), module, hook))
            OFFLOAD_HOOKS.append(hook)
        else:
            module.to(placement.device)
    for stage, module in unique.values():
        evicted = [
            hook
            for other_stage, other, hook in offloaded
            if other is not module and not (stage == other_stage == "denoise")
        ]
        if evicted:
            module.register_forward_pre_hook(_evicting(evicted))


def _evicting(hooks: list[Any]) -> Any:
    def evict(*_: object) -> None:
        for hook in hooks:
            hook.offload()

    return evict


@contextmanager
def vae_tiling(vae: Any, tiled: bool) -> Iterator[None]:
    """Decodes in tiles for one job, restored after however it ends. Slicing would decode a batch one item at a
    time, and a job's decode is one item already."""
    if not tiled:
        yield
        return
    vae.enable_tiling()
    try:
        yield
    finally:
        vae.disable_tiling()


@contextmanager
def vae_precision_kept(vae: Any, dtype: torch.dtype) -> Iterator[None]:
    """Checks after the job that the shared VAE is in the precision it was loaded in (`dtype`), never upcast: a cast
    to float32 and back interrupted by a failure would leave it so, and every later job would fail on the dtype. Put
    back, and said in the log, if not."""
    try:
        yield
    finally:
        # The first parameter's dtype, as diffusers' `vae.dtype` returns, without its walk through every module for
        # hooks: this runs after every job, beside the encoding of its last image. A cast goes module by module
        # from the first, so one cut short has changed that parameter.
        left_in = next(vae.parameters()).dtype
        if left_in != dtype or vae.config.force_upcast:
            log.error(
                "the VAE was left in %s (force_upcast %s); put back to %s", left_in, vae.config.force_upcast, dtype
            )
            vae.register_to_config(force_upcast=False)
            vae.to(dtype=dtype)
