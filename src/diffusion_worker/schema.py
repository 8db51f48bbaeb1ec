"""The job contract as types (docs/API.md). Torch-free, so validation tests run in milliseconds.

Bounds are the ones the pipelines accept: a request that passes here reaches the GPU without a shape error.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal, TypeAlias

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import InvalidInput

MAX_SEED = 2**32 - 1
MAX_PROMPT_CHARS = 2000
MAX_LORAS = 4
IMAGE_TASKS = ("txt2img", "img2img", "controlnet_depth")
VIDEO_TASKS = ("txt2video", "img2video")
TASKS = (*IMAGE_TASKS, *VIDEO_TASKS, "info")
# Names users pick schedulers by; pipelines/schedulers.py maps each to a diffusers class and config.
SCHEDULER_NAMES = (
    "euler",
    "euler_ancestral",
    "dpmpp_2m",
    "dpmpp_2m_karras",
    "dpmpp_2m_sde_karras",
    "ddim",
    "pndm",
    "lms",
    "heun",
    "unipc",
)
SDXL_SIZE = (64, 2048, 8)
# RunPod job ids look like `sync-<uuid>`, `<uuid>-u1` or `local_test`; one names the job's folder of results, on the
# worker and in the client. Anything else (a `/`, a leading dot) could leave that folder or collide with another's,
# so it is refused rather than escaped.
JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
WAN_SIZE = (64, 1280, 16)
# The largest video job a worker takes, in the transformer's tokens: as many as 1280×720 at 81 frames makes, the
# largest clip WAN 2.1 is made for. Attention grows with the square of the tokens: 1280×1280 at 161 frames, which the
# size and frame bounds alone allow, is 3.5× the tokens and 12× the attention, and would more likely run out of
# memory than finish.
LARGEST_VIDEO_JOB = (1280, 720, 81)

Prompt = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]


class _Strict(BaseModel):
    # strict: "5" is not 5 and true is not 1; extra: a misspelt field is an error, not a silent default.
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class LoraRef(_Strict):
    name: str = Field(min_length=1, max_length=200)
    scale: float = Field(default=1.0, ge=-4, le=4)


class _Generation(_Strict):
    prompt: Prompt
    negative_prompt: str = Field(default="", max_length=MAX_PROMPT_CHARS)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    num_inference_steps: int | None = Field(default=None, ge=1, le=150)
    guidance_scale: float | None = Field(default=None, ge=0, le=30)
    width: int | None = None
    height: int | None = None
    loras: list[LoraRef] = Field(default_factory=list, max_length=MAX_LORAS)
    thumbnail_size: int = 256
    # At most the worker's JOB_TIMEOUT_S, which the runtime knows and checks; the schema knows only the floor.
    timeout_s: float | None = Field(default=None, ge=1)

    # (minimum, maximum, multiple) of width and height for the model family.
    size_rule: ClassVar[tuple[int, int, int]] = SDXL_SIZE

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must contain text, not only white space")
        return value

    @field_validator("thumbnail_size")
    @classmethod
    def _thumbnail_rule(cls, value: int) -> int:
        if value != 0 and not 32 <= value <= 1024:
            raise ValueError("must be 0 (no thumbnail) or from 32 to 1024")
        return value

    @field_validator("loras")
    @classmethod
    def _distinct_loras(cls, value: list[LoraRef]) -> list[LoraRef]:
        names = [lora.name for lora in value]
        if len(set(names)) != len(names):
            raise ValueError("each LoRA name may appear once")
        return value

    @model_validator(mode="after")
    def _size_rule(self) -> _Generation:
        low, high, multiple = self.size_rule
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and not (low <= value <= high and value % multiple == 0):
                raise _FieldError(name, f"must be a multiple of {multiple} from {low} to {high} (got {value})")
        return self


class _ImageGeneration(_Generation):
    scheduler: Literal[SCHEDULER_NAMES] | None = None  # type: ignore[valid-type]
    # A few-step preset of the manifest, by name; the worker checks it against those it serves.
    preset: str | None = Field(default=None, min_length=1, max_length=100)
    num_images: int = Field(default=1, ge=1, le=8)
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_quality: int = Field(default=90, ge=1, le=100)


class Txt2Img(_ImageGeneration):
    task: Literal["txt2img"] = "txt2img"
    refiner: bool = False
    # Below 1: at 1 the base would run every step and leave the refiner nothing to do.
    high_noise_frac: float = Field(default=0.8, ge=0.5, lt=1)
    refiner_inference_steps: int | None = Field(default=None, ge=1, le=150)

    @model_validator(mode="after")
    def _refiner_fields(self) -> Txt2Img:
        if self.refiner_inference_steps is not None and not self.refiner:
            raise _FieldError("refiner_inference_steps", "applies only with `refiner: true`")
        return self


class Img2Img(_ImageGeneration):
    task: Literal["img2img"]
    image: str = Field(min_length=1)
    strength: float = Field(default=0.6, gt=0, le=1)
    refiner: bool = False

    @model_validator(mode="after")
    def _refiner_runs_alone(self) -> Img2Img:
        if self.refiner and (self.loras or self.preset):
            raise _FieldError("refiner", "img2img on the refiner takes no `loras` or `preset`: they fit the base model")
        return self


class ControlNetDepth(_ImageGeneration):
    task: Literal["controlnet_depth"]
    image: str | None = Field(default=None, min_length=1)
    control_image: str | None = Field(default=None, min_length=1)
    controlnet_conditioning_scale: float = Field(default=0.8, ge=0, le=2)
    control_guidance_start: float = Field(default=0.0, ge=0, le=1)
    control_guidance_end: float = Field(default=1.0, ge=0, le=1)
    return_control_image: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> ControlNetDepth:
        if (self.image is None) == (self.control_image is None):
            raise _FieldError("image", "give exactly one of `image` (depth is estimated from it) and `control_image`")
        if self.control_guidance_start >= self.control_guidance_end:
            raise _FieldError("control_guidance_start", "must be less than `control_guidance_end`")
        return self


class _VideoGeneration(_Generation):
    size_rule: ClassVar[tuple[int, int, int]] = WAN_SIZE
    num_frames: int | None = None
    fps: int = Field(default=16, ge=1, le=60)

    @field_validator("num_frames")
    @classmethod
    def _frames_rule(cls, value: int | None) -> int | None:
        # The WAN VAE compresses time by 4 and keeps the first frame: only 4k+1 frames decode whole.
        if value is not None and not (5 <= value <= 161 and value % 4 == 1):
            raise ValueError(f"must be 4k+1 from 5 to 161, e.g. 33 or 81 (got {value})")
        return value


class Txt2Video(_VideoGeneration):
    task: Literal["txt2video"]


class Img2Video(_VideoGeneration):
    task: Literal["img2video"]
    image: str = Field(min_length=1)


class Info(_Strict):
    task: Literal["info"]


GenerationRequest: TypeAlias = Txt2Img | Img2Img | ControlNetDepth | Txt2Video | Img2Video
JobInput: TypeAlias = Annotated[GenerationRequest | Info, Field(discriminator="task")]
_job_input = TypeAdapter(JobInput)


def json_schema() -> dict[str, Any]:
    """The contract's JSON Schema, generated from the models rather than written twice."""
    return _job_input.json_schema()


def parse_input(raw: object) -> GenerationRequest | Info:
    """Validates a job's `input`; every rule broken is named, field first, in one InvalidInput."""
    if not isinstance(raw, dict):
        raise InvalidInput(f"input: must be a JSON object (got {type(raw).__name__})")
    task = raw.get("task", "txt2img")
    if task not in TASKS:
        raise InvalidInput(f"task: must be one of {', '.join(TASKS)} (got {task!r})")
    try:
        return _job_input.validate_python({**raw, "task": task})
    except ValidationError as error:
        raise InvalidInput(_describe(error)) from None


def _describe(error: ValidationError) -> str:
    problems = []
    for detail in error.errors(include_url=False):
        # The first location item is the union member's tag; the field follows it.
        location = [str(part) for part in detail["loc"][1:]]
        field = ".".join(location) or "input"
        cause = detail.get("ctx", {}).get("error")
        if isinstance(cause, _FieldError):
            field, message = cause.field, cause.rule
        elif detail["type"] == "extra_forbidden":
            message = "unknown field, not part of the job contract"
        elif detail["type"] == "missing":
            message = "required"
        else:
            message = detail["msg"].removeprefix("Value error, ")
        problems.append(f"{field}: {message}")
    return "; ".join(problems)


class _FieldError(ValueError):
    """A rule across fields, raised by a model validator, which pydantic would locate at the model itself."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule
