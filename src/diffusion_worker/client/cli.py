"""`diffusion-worker-client` (also `python -m diffusion_worker.client`): one job from the command line. The response
goes to stdout as JSON, progress to stderr; the exit code says how it ended (docs/API.md, "Client")."""

from __future__ import annotations

import argparse
import base64
import json
import logging
import mimetypes
import sys
from pathlib import Path
from typing import Any, NoReturn

from ..errors import InvalidInput
from .failures import EXIT_USAGE, ClientError, JobFailed, JobTimedOut
from .jobs import DEFAULT_TIMEOUT_S, Client
from .transport import Backoff

DEFAULT_ENDPOINT = "http://localhost:8000"
# The common fields of the job contract as flags: (flag, field, type). Any other field comes with --input.
FIELD_FLAGS: tuple[tuple[str, str, type], ...] = (
    ("--task", "task", str),
    ("--prompt", "prompt", str),
    ("--negative-prompt", "negative_prompt", str),
    ("--seed", "seed", int),
    ("--width", "width", int),
    ("--height", "height", int),
    ("--steps", "num_inference_steps", int),
    ("--guidance", "guidance_scale", float),
    ("--scheduler", "scheduler", str),
    ("--num-images", "num_images", int),
    ("--num-frames", "num_frames", int),
    ("--fps", "fps", int),
    ("--strength", "strength", float),
    ("--output-format", "output_format", str),
    ("--thumbnail-size", "thumbnail_size", int),
)
IMAGE_FLAGS = (("--image", "image"), ("--control-image", "control_image"))
# Top-level fields of RunPod's request that --input may carry beside `input`, sent as they are.
REQUEST_FIELDS = ("s3Config", "policy", "webhook")


class UsageError(ClientError):
    exit_code = EXIT_USAGE


class _Parser(argparse.ArgumentParser):
    # argparse exits 2 on bad usage, which here means "the job failed": bad usage is 64, as sysexits has it.
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def parser() -> argparse.ArgumentParser:
    commands = _Parser(
        prog="diffusion-worker-client",
        description="Run one job on a diffusion-worker endpoint and download its results.",
        epilog="exit codes: 0 done, 2 the job failed, 3 timed out (cancelled), 4 no endpoint reachable, "
        "64 bad usage or invalid input",
    )
    where = commands.add_argument_group("where and how")
    where.add_argument(
        "--endpoint",
        action="append",
        help="a base URL (http://host:port: the local API server or a pod) or a RunPod endpoint id (its key from "
        f"RUNPOD_API_KEY); repeat to fall back in order (default {DEFAULT_ENDPOINT})",
    )
    where.add_argument("--sync", action="store_true", help="use /runsync rather than /run and /status polling")
    where.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds for the whole job; then it is cancelled"
    )
    where.add_argument("--webhook", help="a URL RunPod posts the result to when the job ends")
    where.add_argument("--output-dir", type=Path, help="save the results under DIR/<job id>/")
    where.add_argument("--connect-timeout", type=float, default=3.0, help="seconds to reach an endpoint (default 3)")
    where.add_argument(
        "--attempts", type=int, default=5, help="tries for each request, and rounds over the endpoints (default 5)"
    )
    where.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    job = commands.add_argument_group("the job (checked against the job contract before anything is sent)")
    job.add_argument("--input", help='a JSON file: {"input": {...}} or the input object itself; "-" for stdin')
    for flag, field, kind in FIELD_FLAGS:
        job.add_argument(flag, dest=field, type=kind, help=f"`{field}`")
    for flag, field in IMAGE_FLAGS:
        job.add_argument(flag, dest=field, help=f"`{field}`: a file (sent inline), an https:// URL or a data URI")
    job.add_argument("--lora", action="append", metavar="NAME[:SCALE]", help="a LoRA to apply; repeatable")
    return commands


def main(argv: list[str] | None = None) -> int:
    arguments = parser().parse_args(argv)
    # The library's own logger, not the root one: progress on stderr without whatever else logs in the process.
    progress = logging.StreamHandler(sys.stderr)
    progress.setFormatter(logging.Formatter("diffusion-worker-client: %(message)s"))
    logger = logging.getLogger("diffusion_worker.client")
    logger.addHandler(progress)
    logger.setLevel(logging.WARNING if arguments.quiet else logging.INFO)
    try:
        return _run(arguments)
    finally:
        logger.removeHandler(progress)


def _run(arguments: argparse.Namespace) -> int:
    try:
        job_input, request_fields = _job(arguments)
        if arguments.attempts < 1 or arguments.timeout <= 0 or arguments.connect_timeout <= 0:
            raise UsageError("--attempts, --timeout and --connect-timeout must be positive")
        try:
            client = Client(
                arguments.endpoint or [DEFAULT_ENDPOINT],
                connect_timeout_s=arguments.connect_timeout,
                backoff=Backoff(attempts=arguments.attempts),
            )
        except ValueError as error:
            raise UsageError(str(error)) from None
        webhook = arguments.webhook or request_fields.pop("webhook", None)
        result = client.run(
            job_input,
            output_dir=arguments.output_dir,
            timeout_s=arguments.timeout,
            sync=arguments.sync,
            webhook=webhook,
            request_fields=request_fields,
        )
    except InvalidInput as error:
        print(f"diffusion-worker-client: invalid input, nothing sent: {error.message}", file=sys.stderr)
        return EXIT_USAGE
    except ClientError as error:
        response = getattr(error, "response", None)
        if response is not None:
            print(json.dumps(response, indent=2))
        code = f" ({error.error_code})" if isinstance(error, JobFailed) else ""
        label = "timed out" if isinstance(error, JobTimedOut) else "failed" + code
        print(f"diffusion-worker-client: {label}: {error}", file=sys.stderr)
        return error.exit_code
    print(json.dumps(result.response, indent=2))
    for path in result.files:
        logging.getLogger(__name__).info("saved %s", path)
    return 0


def _job(arguments: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """The job's input (from --input, then the flags over it) and the request's other top-level fields."""
    job_input: dict[str, Any] = {}
    request_fields: dict[str, Any] = {}
    if arguments.input is not None:
        document = _read_json(arguments.input)
        if isinstance(document, dict) and "input" in document:
            unknown = set(document) - {"input", *REQUEST_FIELDS}
            if unknown:
                raise UsageError(f"--input: unknown request fields {', '.join(sorted(unknown))}")
            request_fields = {name: value for name, value in document.items() if name != "input"}
            document = document["input"]
        if not isinstance(document, dict):
            raise UsageError("--input: the job's input must be a JSON object")
        job_input = document
    for _, field, _ in FIELD_FLAGS:
        if (value := getattr(arguments, field)) is not None:
            job_input[field] = value
    for _, field in IMAGE_FLAGS:
        if (value := getattr(arguments, field)) is not None:
            job_input[field] = _image(value, field)
    if arguments.lora:
        job_input["loras"] = [_lora(text) for text in arguments.lora]
    return job_input, request_fields


def _read_json(source: str) -> Any:
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text()
        return json.loads(text)
    except OSError as error:
        raise UsageError(f"--input: cannot read {source}: {error.strerror}") from None
    except json.JSONDecodeError as error:
        raise UsageError(f"--input: not JSON ({error})") from None


def _image(value: str, field: str) -> str:
    """A URL or data URI as it is; a file as a data URI, so that the worker needs no access to this machine."""
    if value.startswith(("https://", "http://", "data:")):
        return value
    path = Path(value)
    try:
        body = path.read_bytes()
    except OSError as error:
        raise UsageError(f"--{field.replace('_', '-')}: cannot read {value}: {error.strerror}") from None
    mime = mimetypes.guess_type(path.name)[0] or "image/png"
    return f"data:{mime};base64,{base64.b64encode(body).decode()}"


def _lora(text: str) -> dict[str, Any]:
    name, _, scale = text.partition(":")
    if not scale:
        return {"name": name}
    try:
        return {"name": name, "scale": float(scale)}
    except ValueError:
        raise UsageError(f"--lora {text}: the scale after ':' must be a number") from None
