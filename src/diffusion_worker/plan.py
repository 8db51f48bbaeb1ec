"""The memory plan: from the GPU's size, the tasks to serve and the components' sizes, where each component lives.

One module decides, every other part asks it. `make_plan` is a pure function: no torch, no files. Each component
is **resident** (on the GPU for good), **offloaded** (in host memory, moved in for its stage and out after it:
diffusers' model CPU offload), **streamed** (in host memory, moved in a few layers at a time: diffusers' group
offload at leaf level, for a component too large to move in whole) or **not served**. All-resident is preferred;
when it does not fit, encoders go first (they run once per job), then VAEs (once per job), then denoisers (every
step), largest first within each kind, until every task's largest job fits; a task whose largest job does not fit
even with everything streamed is not served, and the plan says why.

A job's peak is the resident weights, plus what its current stage moves in, plus that stage's activations,
estimated from the largest job the task accepts. The estimates (real models, runtime precision, SDPA attention,
whose memory grows linearly with the tokens):
- SDXL denoising: 1.5 KiB per output pixel (about 1.5 GiB at 1024² with classifier-free guidance's batch of 2),
  half as much again with the depth ControlNet beside the UNet.
- SDXL refiner (`refiner: true`): its UNet denoises after the base's, a stage of its own with the base's
  denoising activations.
- SDXL decode: 3 KiB per output pixel untiled (about 3 GiB at 1024²); tiled, one 1024² tile at a time.
- WAN denoising: per transformer token (latent frames × latent rows × latent columns / 2×2 patches), two FFN
  hidden rows and eight model-width rows in bf16; the conditional and unconditional passes run one after the other.
- WAN decode: 9 GiB at 832×480 untiled, growing with the frame size and not the frame count, as the causal VAE
  decodes one latent frame at a time (≈ 20 GiB at 1280×720); tiled, one 256×256 tile at a time; plus the decoded
  video in float32.
- A reserve of 1.5 GiB for the CUDA context, cuBLAS/cuDNN workspaces and the allocator's fragmentation.
VAE tiling is on above the model's native size (SDXL 1024², WAN 832×480), so the margin holds an untiled decode up
to that size and a tiled one above; a job's bytes then depend on its size alone, never on the GPU it ran on.

    python -m diffusion_worker.plan --gpu-gib 24 [--tasks txt2img,txt2video] [--json]

prints the plan for the repository's manifest (the real models' sizes), without loading anything.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from .manifest import DEFAULT_MANIFEST, Component, Manifest, load_manifest
from .schema import LARGEST_VIDEO_JOB, SDXL_SIZE, VIDEO_TASKS
from .sizes import component_bytes

GIB = 2**30
# The manifest roles each task's pipeline is built from.
TASK_ROLES = {
    "txt2img": ("sdxl", "sdxl_vae"),
    "img2img": ("sdxl", "sdxl_vae"),
    "controlnet_depth": ("sdxl", "sdxl_vae", "controlnet_depth", "depth_estimator"),
    "txt2video": ("wan_t2v",),
    "img2video": ("wan_i2v",),
}
# Roles a task uses where the worker has them: the SDXL refiner's UNet, for `refiner: true`.
OPTIONAL_TASK_ROLES = {"txt2img": ("sdxl_refiner",), "img2img": ("sdxl_refiner",)}
# Where a component runs in a job: encoders once before denoising, denoisers at every step, the VAE once after.
# The refiner's UNet denoises after the base's, never beside it: a stage of its own.
STAGES = ("encode", "denoise", "refine", "decode")
DENOISERS = frozenset({"unet", "transformer", "controlnet"})
RESERVE_BYTES = 3 * GIB // 2
RESIDENT, OFFLOADED, STREAMED, NOT_SERVED = "resident", "offloaded", "streamed", "not served"
# A streamed component holds a few layers on the GPU at a time (the one running and the next, prefetched on a side
# stream); a tenth of it is a generous bound for models of 12 to 40 blocks.
STREAMED_SHARE = 0.1

SDXL_NATIVE = 1024
SDXL_DENOISE_BYTES_PER_PIXEL = 1536
SDXL_CONTROLNET_SHARE = 0.5
SDXL_DECODE_BYTES_PER_PIXEL = 3072
SDXL_TILE = 1024
WAN_NATIVE = (832, 480)
WAN_DECODE_BYTES_PER_PIXEL = 9 * GIB / (WAN_NATIVE[0] * WAN_NATIVE[1])
WAN_TILE = 256
# The real transformers' model width and FFN width (WAN 2.1 1.3B and 14B).
WAN_WIDTHS = {"wan_t2v": (1536, 8960), "wan_i2v": (5120, 13824)}
# The WAN VAE's ×8 in space and ×4 in time, then the transformer's 2×2 patches.
WAN_SPATIAL, WAN_TEMPORAL, WAN_PATCH = 8, 4, 2
BF16 = 2
FLOAT32 = 4


def stage_of(name: str, role: str = "") -> str:
    if name in DENOISERS:
        return "refine" if role in OPTIONAL_TASK_ROLES["txt2img"] else "denoise"
    return "decode" if name == "vae" else "encode"


@dataclass(frozen=True)
class Weights:
    """One component to place. Roles whose components are byte-identical share one `key`, and one copy."""

    key: str
    role: str
    name: str
    nbytes: int
    tasks: frozenset[str]
    # Every role/name this one copy serves.
    aliases: frozenset[str]

    @property
    def stage(self) -> str:
        return stage_of(self.name, self.role)

    @property
    def offload_rank(self) -> int:
        """Encoders are offloaded first, then VAEs, then denoisers."""
        return {"encode": 0, "decode": 1, "denoise": 2, "refine": 2}[self.stage]


@dataclass(frozen=True)
class JobPeak:
    """What a task's largest job needs besides the weights, per stage."""

    largest_job: str
    activations: dict[str, int]


@dataclass(frozen=True)
class Plan:
    capacity: int | None
    reserve: int
    placements: dict[str, str]
    weights: tuple[Weights, ...]
    peaks: dict[str, JobPeak]
    # Every task asked for: how it is served, or why it is not.
    tasks: dict[str, str]
    served: frozenset[str] = field(default_factory=frozenset)

    def placement_of(self, role: str, name: str) -> str:
        return next(self.placements[w.key] for w in self.weights if f"{role}/{name}" in w.aliases)

    def shared_with(self, role: str, name: str) -> str | None:
        """The role whose copy of this component serves `role` too, if another role's."""
        owner = next(w.role for w in self.weights if f"{role}/{name}" in w.aliases)
        return None if owner == role else owner

    @property
    def resident_bytes(self) -> int:
        return sum(w.nbytes for w in self.weights if self.placements[w.key] == RESIDENT)

    @property
    def margin(self) -> int | None:
        """What the GPU keeps free for jobs once the resident weights and the reserve are in."""
        if self.capacity is None:
            return None
        return self.capacity - self.reserve - self.resident_bytes

    def as_dict(self) -> dict:
        """The plan as `info` and `--json` report it: sizes in bytes."""
        return {
            "gpu_bytes": self.capacity,
            "reserve_bytes": self.reserve if self.capacity is not None else None,
            "resident_bytes": self.resident_bytes,
            "margin_bytes": self.margin,
            "components": [
                {"role": w.role, "component": w.name, "bytes": w.nbytes, "placement": self.placements[w.key]}
                for w in self.weights
            ],
            "tasks": {
                task: {
                    "served": how,
                    "largest_job": self.peaks[task].largest_job,
                    "peak_bytes": peak_bytes(self, task) if task in self.served else None,
                }
                for task, how in self.tasks.items()
            },
        }


# --- the estimates -------------------------------------------------------------------------------------------


def job_peak(task: str) -> JobPeak:
    """The activations of the largest job `task` accepts, per stage (see the module's docstring)."""
    if task in VIDEO_TASKS:
        width, height, frames = LARGEST_VIDEO_JOB
        model_width, ffn_width = WAN_WIDTHS[TASK_ROLES[task][0]]
        latent_frames = (frames - 1) // WAN_TEMPORAL + 1
        tokens = latent_frames * (height // (WAN_SPATIAL * WAN_PATCH)) * (width // (WAN_SPATIAL * WAN_PATCH))
        denoise = tokens * (2 * ffn_width + 8 * model_width) * BF16
        untiled = WAN_DECODE_BYTES_PER_PIXEL * WAN_NATIVE[0] * WAN_NATIVE[1]
        untiled += WAN_NATIVE[0] * WAN_NATIVE[1] * frames * 3 * FLOAT32
        tiled = WAN_DECODE_BYTES_PER_PIXEL * WAN_TILE**2 + width * height * frames * 3 * FLOAT32
        return JobPeak(
            f"{width}×{height}×{frames}",
            {"encode": 0, "denoise": denoise, "refine": 0, "decode": math.ceil(max(untiled, tiled))},
        )
    side = SDXL_SIZE[1]
    denoise = SDXL_DENOISE_BYTES_PER_PIXEL * side**2
    if task == "controlnet_depth":
        denoise += int(denoise * SDXL_CONTROLNET_SHARE)
    decode = SDXL_DECODE_BYTES_PER_PIXEL * min(side, SDXL_TILE) ** 2 + side**2 * 3 * FLOAT32
    # The refiner's stage (txt2img, img2img) works on the same latents as the base's UNet alone.
    refine = SDXL_DENOISE_BYTES_PER_PIXEL * side**2 if task in OPTIONAL_TASK_ROLES else 0
    return JobPeak(f"{side}×{side}", {"encode": 0, "denoise": denoise, "refine": refine, "decode": decode})


# --- the decision --------------------------------------------------------------------------------------------


def make_plan(capacity: int | None, weights: Iterable[Weights], tasks: Iterable[str]) -> Plan:
    """Places `weights` (every component the `tasks` need) on a GPU of `capacity` bytes; None: no GPU, so
    everything is resident on the CPU and nothing limits the jobs."""
    weights = tuple(weights)
    tasks = _in_order(tasks)
    peaks = {task: job_peak(task) for task in tasks}
    if capacity is None:
        placements = dict.fromkeys((w.key for w in weights), RESIDENT)
        return Plan(None, 0, placements, weights, peaks, dict.fromkeys(tasks, "all resident"), frozenset(tasks))

    budget = capacity - RESERVE_BYTES
    reasons = {}
    for task in tasks:
        # Its smallest footprint: every component streamed.
        everything_streamed = Plan(capacity, RESERVE_BYTES, {w.key: STREAMED for w in weights}, weights, peaks, {})
        needed = peak_bytes(everything_streamed, task)
        if needed > budget:
            reasons[task] = (
                f"{NOT_SERVED}: its largest job ({peaks[task].largest_job}) needs {needed / GIB:.1f} GiB even with "
                f"every component streamed; {budget / GIB:.1f} GiB are free after the reserve"
            )
    served = frozenset(tasks) - set(reasons)
    placements = {w.key: RESIDENT if w.tasks & served else NOT_SERVED for w in weights}
    candidates = [w for w in weights if w.tasks & served]

    def fits(trial: dict[str, str]) -> bool:
        plan = Plan(capacity, RESERVE_BYTES, trial, weights, peaks, {})
        return all(peak_bytes(plan, task) <= budget for task in served)

    # Stream as little as needed, largest first (a streamed component moves at every step); then, of the ways to
    # offload the rest that fit, take the one that moves the fewest denoiser bytes per job, then VAE bytes, then
    # encoder bytes. Every subset is tried: a manifest has a dozen components, so a few thousand plans at most.
    by_size = sorted(candidates, key=lambda w: -w.nbytes)
    for count in range(len(by_size) + 1):
        streamed, rest = by_size[:count], by_size[count:]
        subsets = itertools.chain.from_iterable(itertools.combinations(rest, size) for size in range(len(rest) + 1))
        for offloaded in sorted(subsets, key=_offload_cost):
            trial = {**placements, **dict.fromkeys((w.key for w in streamed), STREAMED)}
            trial |= dict.fromkeys((w.key for w in offloaded), OFFLOADED)
            if fits(trial):
                placements = trial
                break
        else:
            continue
        break
    how = {task: reasons.get(task) or _how_served(placements, weights, task) for task in tasks}
    return Plan(capacity, RESERVE_BYTES, placements, weights, peaks, how, served)


def _in_order(tasks: Iterable[str]) -> list[str]:
    """Tasks in the table's order, so that the text-to-video role, listed first, owns the components it shares."""
    wanted = set(tasks)
    return [task for task in TASK_ROLES if task in wanted]


def _offload_cost(offloaded: Iterable[Weights]) -> tuple[int, int, int]:
    """Denoiser bytes moved per job first, then VAE bytes, then encoder bytes: encoders go before anything else."""
    cost = [0, 0, 0]
    for w in offloaded:
        cost[2 - w.offload_rank] += w.nbytes
    return cost[0], cost[1], cost[2]


def peak_bytes(plan: Plan, task: str) -> int:
    """The GPU memory `task`'s largest job needs at its fullest stage, reserve excluded: the resident weights, what
    the stage moves in, and the stage's activations."""
    worst = 0
    for stage in STAGES:
        sizes = [
            w.nbytes if plan.placements[w.key] == OFFLOADED else math.ceil(w.nbytes * STREAMED_SHARE)
            for w in plan.weights
            if task in w.tasks and w.stage == stage and plan.placements[w.key] != RESIDENT
        ]
        # Encoders move in one after the other; the denoisers of a step (UNet and ControlNet) together.
        working = max(sizes, default=0) if stage == "encode" else sum(sizes)
        worst = max(worst, working + plan.peaks[task].activations[stage])
    return plan.resident_bytes + worst


def _how_served(placements: dict[str, str], weights: tuple[Weights, ...], task: str) -> str:
    moved = [
        f"{w.role}/{w.name} {placements[w.key]}" for w in weights if task in w.tasks and placements[w.key] != RESIDENT
    ]
    return "all resident" if not moved else ", ".join(moved)


# --- the components ------------------------------------------------------------------------------------------


def _collect(
    manifest: Manifest,
    tasks: Iterable[str],
    size_and_key: Callable[[Component], tuple[int, str]],
    has_role: Callable[[str], bool],
) -> list[Weights]:
    """One `Weights` per distinct component the tasks need, in the order the tasks name them; an optional role's
    where `has_role`."""
    found: dict[str, Weights] = {}
    for task in _in_order(tasks):
        optional = [name for name in OPTIONAL_TASK_ROLES.get(task, ()) if has_role(name)]
        for role_name in [*TASK_ROLES[task], *optional]:
            for component in manifest.role(role_name).components:
                nbytes, key = size_and_key(component)
                alias = f"{component.role}/{component.name}"
                if key in found:
                    known = found[key]
                    found[key] = replace(known, tasks=known.tasks | {task}, aliases=known.aliases | {alias})
                else:
                    found[key] = Weights(
                        key, component.role, component.name, nbytes, frozenset({task}), frozenset({alias})
                    )
    return list(found.values())


def weights_from_manifest(manifest: Manifest, tasks: Iterable[str]) -> list[Weights]:
    """The real models' sizes as the manifest records them; `same_as` components counted once."""

    def size_and_key(component: Component) -> tuple[int, str]:
        source = manifest.role(component.same_as).component(component.name) if component.same_as else component
        return source.nbytes, f"{source.role}/{source.name}"

    return _collect(manifest, tasks, size_and_key, lambda name: name in manifest.roles)


def weights_from_files(
    manifest: Manifest, models_dir: Path, tasks: Iterable[str], runtime_dtype: Callable[[str], str]
) -> list[Weights]:
    """Sizes read from the weight files' headers at the precision the worker loads each component in
    (`runtime_dtype` of the manifest's dtype); components whose recorded digests match counted once."""

    def size_and_key(component: Component) -> tuple[int, str]:
        role = manifest.role(component.role)
        folder = role.component_path(models_dir, component)
        digest = role.recorded_digests(models_dir).get(component.name)
        nbytes = component_bytes(folder, role.variant, runtime_dtype(component.dtype))
        return nbytes, f"sha256:{digest}" if digest else f"{role.name}/{component.name}"

    return _collect(
        manifest,
        tasks,
        size_and_key,
        lambda name: name in manifest.roles and manifest.role(name).is_complete(models_dir),
    )


# --- the command line ----------------------------------------------------------------------------------------


def _gib(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / GIB:.1f}"


def format_plan(plan: Plan) -> str:
    lines = [
        f"GPU {_gib(plan.capacity)} GiB: {_gib(plan.resident_bytes)} GiB resident, {_gib(plan.reserve)} GiB "
        f"reserve, {_gib(plan.margin)} GiB margin for jobs",
        "",
        f"{'component':<28} {'GiB':>6}  placement",
    ]
    lines += [f"{w.role + '/' + w.name:<28} {_gib(w.nbytes):>6}  {plan.placements[w.key]}" for w in plan.weights]
    lines += ["", f"{'task':<18} {'largest job':<16} {'peak GiB':>8}  served"]
    for task, how in plan.tasks.items():
        peak = _gib(peak_bytes(plan, task)) if task in plan.served else "-"
        lines.append(f"{task:<18} {plan.peaks[task].largest_job:<16} {peak:>8}  {how}")
    return "\n".join(lines)


def format_table(plans: list[Plan]) -> str:
    """One Markdown row per GPU size, as the README shows them."""
    lines = [
        "| GPU | resident | offloaded or streamed | not served | margin for jobs |",
        "| --- | --- | --- | --- | --- |",
    ]
    for plan in plans:
        moved = [
            f"{w.role}/{w.name} ({plan.placements[w.key]})"
            for w in plan.weights
            if plan.placements[w.key] in (OFFLOADED, STREAMED)
        ]
        refused = sorted(set(plan.tasks) - plan.served)
        lines.append(
            f"| {_gib(plan.capacity)} GiB | {_gib(plan.resident_bytes)} GiB | {', '.join(moved) or 'nothing'} | "
            f"{', '.join(refused) or 'none'} | {_gib(plan.margin)} GiB |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Prints the memory plan for the manifest's real model sizes.")
    parser.add_argument(
        "--gpu-gib", type=float, nargs="+", required=True, help="the GPU's memory in GiB (several: one plan each)"
    )
    parser.add_argument("--tasks", help="comma-separated tasks (default: every task the manifest has models for)")
    parser.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST)
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="the plan as `info` reports it")
    output.add_argument("--markdown", action="store_true", help="one table row per GPU size")
    args = parser.parse_args(argv)
    manifest = load_manifest(args.manifest)
    known = [task for task, roles in TASK_ROLES.items() if all(role in manifest.roles for role in roles)]
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()] if args.tasks else known
    unknown = sorted(set(tasks) - set(known))
    if unknown:
        parser.error(f"--tasks: {', '.join(unknown)} not among the manifest's tasks ({', '.join(known)})")
    weights = weights_from_manifest(manifest, tasks)
    plans = [make_plan(round(gib * GIB), weights, tasks) for gib in args.gpu_gib]
    if args.json:
        print(json.dumps([plan.as_dict() for plan in plans] if len(plans) > 1 else plans[0].as_dict(), indent=2))
    elif args.markdown:
        print(format_table(plans))
    else:
        print("\n\n".join(format_plan(plan) for plan in plans))
    return 0


if __name__ == "__main__":
    sys.exit(main())
