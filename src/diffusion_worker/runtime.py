"""The worker: pipelines loaded once, then each job parsed, generated, encoded, delivered and cleaned up after."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import platform
import secrets
import tempfile
import time
from collections.abc import Awaitable
from contextlib import closing
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from PIL import Image

from . import __version__
from .config import Settings
from .dialects import DIALECTS
from .errors import (
    ConfigError,
    GpuStateLost,
    InvalidInput,
    TaskUnavailable,
    WorkerError,
)
from .hygiene import classify_failure, memory_figures, release_memory
from .inputs import InputLimits, echoed_url, load_image
from .lifecycle import GpuThread, Handoff, JobControl, Pending
from .manifest import Manifest, load_manifest
from .media import check_not_blank, encode_image, encode_thumbnail, encode_video
from .pipelines.common import describe_models
from .pipelines.outputs import GeneratedImage, GeneratedVideo
from .pipelines.sdxl import SdxlFamily
from .pipelines.wan import WanFamily
from .placement import Placement
from .schema import MAX_SEED, SCHEDULER_NAMES, TASKS, VIDEO_TASKS, GenerationRequest, Info, parse_input
from .storage import Asset, Sink, bucket_for_job, open_sink

log = logging.getLogger(__name__)
FAMILIES = (SdxlFamily, WanFamily)
INPUT_IMAGE_FIELDS = ("image", "control_image")
VERSIONED_PACKAGES = ("torch", "diffusers", "transformers", "peft", "runpod", "pydantic")
# Tasks the warm-up prefers, as they need no input image.
WARM_UP_TASKS = ("txt2img", "txt2video")
# The pipelines are shared and not thread-safe: all GPU work of the process, one job at a time, in one thread.
GPU = GpuThread()


@dataclass
class Timings:
    inference_s: float = 0.0
    encode_s: float = 0.0
    upload_s: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    def as_dict(self) -> dict[str, float]:
        return {
            "inference_s": round(self.inference_s, 3),
            "encode_s": round(self.encode_s, 3),
            "upload_s": round(self.upload_s, 3),
            "total_s": round(time.perf_counter() - self.started, 3),
        }


class Worker:
    def __init__(self, settings: Settings, manifest: Manifest, placement: Placement, families: dict) -> None:
        self.settings = settings
        self.manifest = manifest
        self.placement = placement
        self.families: dict[str, SdxlFamily | WanFamily] = families
        self.input_limits = InputLimits.from_settings(settings)
        # Set by the first CUDA failure other than out-of-memory: then every job is refused.
        self.gpu_lost: GpuStateLost | None = None

    @classmethod
    def load(cls, settings: Settings) -> Worker:
        """Loads every pipeline this worker serves; raises at once if the settings or models can't serve them."""
        manifest = load_manifest(settings.manifest_path)
        placement = Placement.from_settings(settings)
        available = {
            family: family.available_tasks(settings.models_dir, manifest) & family.TASKS for family in FAMILIES
        }
        served = set().union(*available.values())
        wanted = settings.worker_tasks if settings.worker_tasks is not None else served
        unknown = wanted - set(TASKS) - {"info"}
        if unknown:
            raise ConfigError(f"WORKER_TASKS names unknown tasks {sorted(unknown)}; tasks: {', '.join(TASKS)}")
        missing = wanted - served - {"info"}
        if missing:
            raise ConfigError(
                f"WORKER_TASKS asks for {sorted(missing)}, whose models are not in {settings.models_dir}; "
                "run builder/fetch_models.py"
            )
        if not wanted - {"info"}:
            raise ConfigError(f"no models found in {settings.models_dir}; run builder/fetch_models.py")
        placement = placement.planned(manifest, settings.models_dir, wanted - {"info"})
        for task, how in placement.plan.tasks.items():
            log.log(logging.INFO if task in placement.plan.served else logging.WARNING, "%s: %s", task, how)
        if not placement.plan.served:
            raise ConfigError("no task's largest job fits this GPU, even with offloading; see the log")
        wanted = placement.plan.served | (wanted & {"info"})
        families: dict[str, Any] = {}
        for family, tasks in available.items():
            if tasks & wanted:
                started = time.perf_counter()
                loaded = family.load(settings, manifest, placement, tasks & wanted)
                log.info(
                    "loaded %s for %s in %.1f s",
                    family.__name__,
                    sorted(loaded.tasks),
                    time.perf_counter() - started,
                )
                families.update(dict.fromkeys(loaded.tasks, loaded))
        return cls(settings, manifest, placement, families)

    def warm_up(self) -> None:
        """One step at the smallest size on every loaded family, encoded too, so that the first real job does not
        pay for kernels, the allocator and lazy imports; then what lives as long as the worker is frozen out of the
        per-job collection. Nothing is delivered; a failure here stops the worker at start."""
        began = time.perf_counter()
        picture = Image.new("RGB", (64, 64), (120, 130, 140))
        families = {id(family): family for family in self.families.values()}
        for family in families.values():
            # A task without input images where the family serves one, else one given a plain picture.
            task = min(family.tasks, key=lambda name: (name not in WARM_UP_TASKS, name))
            raw: dict[str, Any] = {"task": task, "prompt": "warm-up", "seed": 0, "num_inference_steps": 1}
            raw.update(width=64, height=64)
            if task in VIDEO_TASKS:
                raw["num_frames"] = 5
            if task not in WARM_UP_TASKS:
                raw["image"] = "warm-up"
            request = parse_input(raw)
            inputs = {} if task in WARM_UP_TASKS else {"image": picture}
            request = family.resolve(request, inputs)
            # A generator runs where it is iterated: here, in the GPU thread.
            outputs = GPU.executor.submit(list, family.generate(request, 0, inputs)).result()
            with tempfile.TemporaryDirectory(prefix="diffusion-warm-up-", ignore_cleanup_errors=True) as scratch:
                for index, output in enumerate(outputs):
                    _encode(output, request, index, Path(scratch), self.settings.png_compress_level)
        # Its collection freezes what loading and warm-up made (hygiene.LATE_LONG_LIVED).
        release_memory()
        log.info("warmed up %s in %.2f s", ", ".join(sorted(self.tasks)), time.perf_counter() - began)

    def handle(self, job: dict[str, Any]) -> dict[str, Any]:
        """`run` for callers without an event loop of their own: scripts, benchmarks, tests."""
        return asyncio.run(self.run(job))

    async def run(self, job: dict[str, Any]) -> dict[str, Any]:
        """Runs one job to the contract's response or error dict (in the request dialect's shape), always cleaning
        up. It raises nothing but a cancel, which it re-raises once the job's GPU work has stopped."""
        started = time.monotonic()
        timings = Timings()
        job_id = str(job.get("id") or "local")
        dialect = DIALECTS[self.settings.request_dialect]
        control: JobControl | None = None
        if self.gpu_lost is not None:
            return dialect.answer(self.gpu_lost.to_response())
        try:
            if "input" not in job:
                raise InvalidInput("input: required, a JSON object with at least `prompt`")
            request = parse_input(dialect.read(job["input"], self.has_refiner))
            if isinstance(request, Info):
                response = self.info()
            else:
                control = self._control(job, request, started)
                response = await self._generate(job_id, job, request, control, timings)
        except WorkerError as error:
            log.warning("job %s failed: %s", job_id, error.to_response()["error"])
            response = self._answer(error)
        # Whatever else a job raises is turned into a coded error here, in one place, so the handler never raises.
        except Exception as error:
            classified = classify_failure(error)
            log.exception("job %s failed: %s", job_id, classified.code)
            response = self._answer(classified)
        if control is not None:
            await control.settle_progress()
        return dialect.answer(response)

    def _answer(self, error: WorkerError) -> dict[str, Any]:
        """The error's response. Once the GPU is lost, every later job is refused the same way until RunPod replaces
        the worker: the device may be corrupt, and its results can no longer be trusted."""
        if isinstance(error, GpuStateLost):
            self.gpu_lost = self.gpu_lost or error
        return error.to_response()

    def _control(self, job: dict[str, Any], request: GenerationRequest, started: float) -> JobControl:
        limit, limit_name = self.settings.job_timeout_s, "JOB_TIMEOUT_S"
        if request.timeout_s is not None:
            if request.timeout_s > limit:
                raise InvalidInput(f"timeout_s: must be at most {limit:g} (JOB_TIMEOUT_S) (got {request.timeout_s:g})")
            limit, limit_name = request.timeout_s, "timeout_s"
        return JobControl(
            job,
            started,
            limit,
            limit_name,
            self.settings.progress_updates,
            images=getattr(request, "num_images", 1),
            kind="video" if request.task in VIDEO_TASKS else "image",
        )

    async def _generate(
        self, job_id: str, job: dict[str, Any], request: GenerationRequest, control: JobControl, timings: Timings
    ) -> dict[str, Any]:
        family = self.families.get(request.task)
        if family is None:
            raise TaskUnavailable(
                f"task: {request.task} is not served by this worker (it serves {', '.join(self.tasks)})"
            )
        bucket = bucket_for_job(
            self.settings.bucket, job.get("s3Config"), self.settings.allow_private_s3config_endpoints
        )
        # Downloads and decoding happen before the GPU: they need none and may be slow. They come before `resolve`
        # because an input image sets the output size where the request gives none.
        inputs = await asyncio.to_thread(self._load_inputs, request)
        control.check()
        request = family.resolve(request, inputs)
        seed = request.seed if request.seed is not None else secrets.randbelow(MAX_SEED + 1)
        request = request.model_copy(update={"seed": seed})
        log.info("job %s: %s", job_id, _summary(request))
        sink = open_sink(bucket, job_id, self.settings.max_inline_bytes, self.settings.output_dir)
        described: list[tuple[str, dict[str, Any]]] = []
        pending = Pending()
        # Files the encoding writes (an MP4 is finished in place) go to a folder of the job's own, removed once the
        # job's threads have ended, whether it succeeds, fails or is stopped.
        with tempfile.TemporaryDirectory(prefix="diffusion-job-", ignore_cleanup_errors=True) as scratch:
            try:
                if GPU.busy:
                    control.wait_for_gpu()
                handoff = Handoff(control)
                gpu = pending.track(
                    GPU.submit(self._run_on_gpu, family, request, seed, inputs, control, handoff, timings)
                )
                # Output k is encoded and delivered here while the GPU thread makes k+1.
                while (output := await handoff.get()) is not None:
                    index = len(described)
                    control.enter("encoding", index + 1)
                    began = time.perf_counter()
                    # The output's encoding, the longer, starts first. The thumbnail goes out as soon as it is made,
                    # while the output itself is still encoding.
                    encoded = pending.offload(
                        _encode, output, request, index, Path(scratch), self.settings.png_compress_level
                    )
                    thumbnail = None
                    if request.thumbnail_size:
                        made = pending.offload(encode_thumbnail, _picture(output), request.thumbnail_size)
                        thumbnail = pending.spawn(_deliver_thumbnail(sink, index, made))
                    asset, facts = await encoded
                    if thumbnail is not None:
                        await thumbnail
                    timings.encode_s += time.perf_counter() - began
                    sink.put(index, asset)
                    described.append((output.kind, facts))
                    handoff.taken()
                await gpu
                control.enter("uploading")
                response: dict[str, Any] = {"seed": seed, "parameters": _echoed_parameters(request)}
                began = time.perf_counter()
                metadata = {
                    **response,
                    "job_id": job_id,
                    "outputs": [{"kind": kind, **facts} for kind, facts in described],
                    # Not `describe()`, whose dtype walks every module of the UNet, holding the GIL while the
                    # uploads start.
                    "models": describe_models(family.roles),
                    # Upload time is still running here; the response has the final figures.
                    "timings": {name: value for name, value in timings.as_dict().items() if name != "upload_s"},
                }
                delivered = await pending.offload(sink.finish, metadata)
                timings.upload_s += time.perf_counter() - began
            finally:
                # Whatever ended the job: its GPU work stops at the next step, uploads not begun are cancelled, and
                # the job waits for the rest, so nothing of it runs or lands after it answered.
                control.stop()
                sink.close()
                for upload in sink.in_flight():
                    pending.track(upload)
                await pending.settle()
        response.update(sink.result_json)
        for (kind, facts), where in zip(described, delivered, strict=True):
            entry = {**where, **facts}
            if kind == "image":
                response.setdefault("images", []).append(entry)
            else:
                response[kind] = entry
        response["timings"] = timings.as_dict()
        log.info(
            "job %s: done, %d bytes in %.2f s",
            job_id,
            sum(facts["bytes"] for _, facts in described),
            response["timings"]["total_s"],
        )
        return response

    def _load_inputs(self, request: GenerationRequest) -> dict[str, Image.Image]:
        return {
            name: load_image(getattr(request, name), name, self.input_limits)
            for name in INPUT_IMAGE_FIELDS
            if getattr(request, name, None) is not None
        }

    def _run_on_gpu(
        self,
        family: SdxlFamily | WanFamily,
        request: GenerationRequest,
        seed: int,
        inputs: dict[str, Image.Image],
        control: JobControl,
        handoff: Handoff,
        timings: Timings,
    ) -> None:
        """A job's GPU work, in the GPU thread: each output handed over as soon as it is made, then the clean-up,
        before the next job's GPU work can begin."""
        try:
            with closing(family.generate(request, seed, inputs, on_step=control.on_step)) as generated:
                for index in itertools.count():
                    control.begin_output(index)
                    began = time.perf_counter()
                    output = next(generated, None)
                    timings.inference_s += time.perf_counter() - began
                    if output is None:
                        return
                    # Here, before the output is handed over: nothing of a failed decode is delivered, not even
                    # its thumbnail.
                    _check(output, index)
                    handoff.put(output)
        finally:
            handoff.close()
            # Never raises; a clean-up that failed on the GPU loses it for the jobs after this one.
            failure = release_memory()
            if failure is not None:
                self._answer(classify_failure(failure))

    @property
    def has_refiner(self) -> bool:
        return getattr(self.families.get("txt2img"), "refiner_unet", None) is not None

    @property
    def tasks(self) -> list[str]:
        return sorted(self.families)

    def info(self) -> dict[str, Any]:
        families = {id(family): family for family in self.families.values()}
        return {
            "tasks": self.tasks,
            "pipelines": [family.describe() for family in families.values()],
            "schedulers": list(SCHEDULER_NAMES),
            "device": str(self.placement.device),
            "memory": memory_figures(),
            "memory_plan": self.placement.plan.as_dict(),
            "versions": {
                "worker": __version__,
                "python": platform.python_version(),
                **{name: metadata.version(name) for name in VERSIONED_PACKAGES},
            },
        }


def _check(output: GeneratedImage | GeneratedVideo, index: int) -> None:
    """A blank result is a failed decode (media.check_not_blank). A depth map is data, not a picture, uniform where
    the scene is flat: it is not checked."""
    if isinstance(output, GeneratedVideo):
        check_not_blank(output.frames, f"video {index}")
    elif output.kind == "image":
        check_not_blank(output.image, f"image {index}")


def _picture(output: GeneratedImage | GeneratedVideo) -> Image.Image:
    """What an output's thumbnail shows and its width and height describe."""
    return output.middle_frame if isinstance(output, GeneratedVideo) else output.image


async def _deliver_thumbnail(sink: Sink, index: int, made: Awaitable[Asset]) -> None:
    sink.put_thumbnail(index, await made)


def _encode(
    output: GeneratedImage | GeneratedVideo, request: GenerationRequest, index: int, scratch: Path, png_level: int
) -> tuple[Asset, dict]:
    """Encodes one checked output, returning its file and the facts the response lists."""
    extra: dict[str, int] = {}
    if isinstance(output, GeneratedVideo):
        asset = encode_video(output.frames, output.fps, scratch)
        extra = {"num_frames": len(output.frames), "fps": output.fps}
    elif output.kind == "image":
        asset = encode_image(output.image, request.output_format, request.output_quality, png_level)
    else:
        # A depth map is always lossless.
        asset = encode_image(output.image, "png", request.output_quality, png_level)
    picture = _picture(output)
    facts = {
        "width": picture.width,
        "height": picture.height,
        "format": asset.ext,
        "seed": output.seed,
        "bytes": len(asset.data),
        "sha256": hashlib.sha256(asset.data).hexdigest(),
        **extra,
    }
    return asset, facts


def _echoed_parameters(request: GenerationRequest) -> dict[str, Any]:
    """The resolved request as the response and result.json repeat it. An input image sent inline is named by the
    SHA-256 of the string sent rather than sent back; a URL loses its userinfo, query and fragment (`echoed_url`)."""
    parameters = request.model_dump(mode="json")
    for name in INPUT_IMAGE_FIELDS:
        value = parameters.get(name)
        if value is None:
            continue
        if value.startswith("https://"):
            parameters[name] = echoed_url(value)
        else:
            parameters[name] = "sha256:" + hashlib.sha256(value.encode()).hexdigest()
    return parameters


def _summary(request: GenerationRequest) -> str:
    """The resolved request in one short log line: sizes and counts, never prompts or image data."""
    parts = [request.task, f"{request.width}x{request.height}", f"steps={request.num_inference_steps}"]
    for name in ("num_images", "num_frames", "scheduler"):
        value = getattr(request, name, None)
        if value is not None:
            parts.append(f"{name}={value}")
    if request.loras:
        parts.append("loras=" + ",".join(ref.name for ref in request.loras))
    return " ".join(parts)
