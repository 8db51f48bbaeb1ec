"""Settings, read once from the environment at start. Nothing else in the worker reads os.environ."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .dialects import DIALECTS
from .errors import ConfigError
from .manifest import DEFAULT_MANIFEST

REPO_ROOT = Path(__file__).resolve().parents[2]
DEVICE_CHOICES = ("auto", "cuda", "cpu")
DTYPE_CHOICES = ("auto", "float16", "bfloat16", "float32")
# RunPod refuses /run payloads over 10 MB; a result has to stay well inside that once base64 and JSON wrap it.
DEFAULT_MAX_INLINE_BYTES = 8 * 1024 * 1024
# SigV4 presigned links live 7 days at the most; AWS refuses a longer expiry.
MAX_PRESIGN_EXPIRES_S = 7 * 24 * 3600
MIN_PART_BYTES = 5 * 1024 * 1024
PROGRESS_CHOICES = ("auto", "on", "off")
# Jobs in flight at once: one on the GPU, one fetching its inputs or delivering its results. More would only hold
# memory while they wait for the one GPU.
MAX_WORKER_CONCURRENCY = 8


@dataclass(frozen=True)
class BucketSettings:
    endpoint_url: str | None
    access_key_id: str | None
    secret_access_key: str | None
    name: str
    region: str | None = None
    prefix: str = ""
    public_url: str | None = None
    presign_expires_s: int = MAX_PRESIGN_EXPIRES_S
    addressing_style: str = "auto"
    # Per request: a server that accepts and never answers costs at most attempts × read timeout, plus backoff.
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 15.0
    max_attempts: int = 3
    # What `finish` waits for all of a job's uploads at the most, whatever the server does.
    upload_timeout_s: float = 60.0
    # Objects from this size up go in parts of this size (S3's smallest part is 5 MiB).
    multipart_threshold: int = 16 * 1024 * 1024

    def __repr__(self) -> str:
        # The secret must never reach a log line, even through a repr of the settings.
        return f"BucketSettings(name={self.name!r}, endpoint_url={self.endpoint_url!r}, prefix={self.prefix!r})"


@dataclass(frozen=True)
class Settings:
    models_dir: Path
    manifest_path: Path = DEFAULT_MANIFEST
    device: str = "auto"
    dtype: str = "auto"
    # None: every task whose models are present.
    worker_tasks: frozenset[str] | None = None
    bucket: BucketSettings | None = None
    max_inline_bytes: int = DEFAULT_MAX_INLINE_BYTES
    # Without a bucket: results written here instead of inline (local runs).
    output_dir: Path | None = None
    allow_private_urls: bool = False
    # A request's s3Config.endpointUrl may be http:// and reach private or loopback addresses (local testing).
    allow_private_s3config_endpoints: bool = False
    max_input_bytes: int = 20 * 1024 * 1024
    max_input_pixels: int = 4096 * 4096
    input_fetch_timeout_s: float = 15.0
    lora_cache_size: int = 8
    # The requests the worker reads and the answers it gives: its own contract, or worker-sdxl's (dialects.py).
    request_dialect: str = "native"
    # The GPU memory the plan may use, in GiB; None: the device's own size.
    gpu_memory_gib: float | None = None
    # PNG's zlib level. 1: the worker's banded encoder, on photos within 4 % of Pillow's level 6 at a fifth of its
    # time on two cores (bench/encoders.py); 2 to 9: Pillow's own encoder at that level.
    png_compress_level: int = 1
    log_level: str = "INFO"
    # The longest a job may run; a request's `timeout_s` may ask for less.
    job_timeout_s: float = 600.0
    worker_concurrency: int = 1
    progress_updates: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        reader = _Reader(env)
        settings = cls(
            models_dir=Path(reader.text("MODELS_DIR", str(REPO_ROOT / "models"))),
            # An installed (non-editable) package has no repo around it: the image names its manifest.
            manifest_path=Path(reader.text("MODEL_MANIFEST", str(DEFAULT_MANIFEST))),
            device=reader.choice("DEVICE", "auto", DEVICE_CHOICES),
            dtype=reader.choice("DTYPE", "auto", DTYPE_CHOICES),
            worker_tasks=reader.names("WORKER_TASKS"),
            bucket=_bucket_from_env(reader),
            max_inline_bytes=reader.integer("MAX_INLINE_BYTES", DEFAULT_MAX_INLINE_BYTES, minimum=1024),
            output_dir=reader.optional_path("OUTPUT_DIR"),
            allow_private_urls=reader.flag("ALLOW_PRIVATE_INPUT_URLS"),
            allow_private_s3config_endpoints=reader.flag("ALLOW_PRIVATE_S3CONFIG_ENDPOINTS"),
            max_input_bytes=reader.integer("MAX_INPUT_IMAGE_BYTES", 20 * 1024 * 1024, minimum=1024),
            max_input_pixels=reader.integer("MAX_INPUT_IMAGE_PIXELS", 4096 * 4096, minimum=64 * 64),
            input_fetch_timeout_s=reader.number("INPUT_FETCH_TIMEOUT_S", 15.0, minimum=0.1),
            lora_cache_size=reader.integer("LORA_CACHE_SIZE", 8, minimum=0),
            request_dialect=reader.choice("REQUEST_DIALECT", "native", tuple(DIALECTS)),
            gpu_memory_gib=reader.number("GPU_MEMORY_GIB", 0.0, minimum=0.0) or None,
            png_compress_level=reader.integer("PNG_COMPRESS_LEVEL", 1, minimum=0, maximum=9),
            log_level=reader.text("LOG_LEVEL", "INFO").upper(),
            job_timeout_s=reader.number("JOB_TIMEOUT_S", 600.0, minimum=1.0),
            worker_concurrency=reader.integer("WORKER_CONCURRENCY", 1, minimum=1, maximum=MAX_WORKER_CONCURRENCY),
            # Locally there is no one to send progress to: the SDK only logs that sending failed.
            progress_updates={"on": True, "off": False, "auto": "RUNPOD_WEBHOOK_GET_JOB" in env}[
                reader.choice("PROGRESS_UPDATES", "auto", PROGRESS_CHOICES)
            ],
        )
        return settings


def _bucket_from_env(reader: _Reader) -> BucketSettings | None:
    name = reader.text("BUCKET_NAME", "")
    if not name:
        return None
    return BucketSettings(
        endpoint_url=reader.text("BUCKET_ENDPOINT_URL", "") or None,
        access_key_id=reader.text("BUCKET_ACCESS_KEY_ID", "") or None,
        secret_access_key=reader.text("BUCKET_SECRET_ACCESS_KEY", "") or None,
        name=name,
        region=reader.text("BUCKET_REGION", "") or None,
        prefix=reader.text("BUCKET_PREFIX", "").strip("/"),
        public_url=reader.text("BUCKET_PUBLIC_URL", "").rstrip("/") or None,
        presign_expires_s=reader.integer(
            "PRESIGN_EXPIRES_S", MAX_PRESIGN_EXPIRES_S, minimum=1, maximum=MAX_PRESIGN_EXPIRES_S
        ),
        addressing_style=reader.choice("BUCKET_ADDRESSING_STYLE", "auto", ("auto", "path", "virtual")),
        connect_timeout_s=reader.number("BUCKET_CONNECT_TIMEOUT_S", 5.0, minimum=0.1),
        read_timeout_s=reader.number("BUCKET_READ_TIMEOUT_S", 15.0, minimum=0.1),
        max_attempts=reader.integer("BUCKET_MAX_ATTEMPTS", 3, minimum=1),
        upload_timeout_s=reader.number("BUCKET_UPLOAD_TIMEOUT_S", 60.0, minimum=0.1),
        multipart_threshold=reader.integer(
            "BUCKET_MULTIPART_THRESHOLD_BYTES", 16 * 1024 * 1024, minimum=MIN_PART_BYTES
        ),
    )


class _Reader:
    """Parses variables and names the variable in every complaint, so a bad deploy fails at start, clearly."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def text(self, name: str, default: str) -> str:
        return self.env.get(name, default).strip()

    def optional_path(self, name: str) -> Path | None:
        value = self.text(name, "")
        return Path(value).expanduser() if value else None

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.text(name, default).lower()
        if value not in choices:
            raise ConfigError(f"{name}={value!r}: must be one of {', '.join(choices)}")
        return value

    def integer(self, name: str, default: int, minimum: int, maximum: int | None = None) -> int:
        raw = self.text(name, str(default))
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r}: must be an integer") from None
        if value < minimum:
            raise ConfigError(f"{name}={value}: must be at least {minimum}")
        if maximum is not None and value > maximum:
            raise ConfigError(f"{name}={value}: must be at most {maximum}")
        return value

    def number(self, name: str, default: float, minimum: float) -> float:
        raw = self.text(name, str(default))
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r}: must be a number") from None
        if value < minimum:
            raise ConfigError(f"{name}={value}: must be at least {minimum}")
        return value

    def flag(self, name: str) -> bool:
        value = self.text(name, "false").lower()
        if value in ("1", "true", "yes", "on"):
            return True
        if value in ("0", "false", "no", "off", ""):
            return False
        raise ConfigError(f"{name}={value!r}: must be true or false")

    def names(self, name: str) -> frozenset[str] | None:
        raw = self.text(name, "")
        if not raw:
            return None
        return frozenset(part.strip() for part in raw.split(",") if part.strip())
