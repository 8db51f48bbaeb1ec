"""A finished job's files on disk, under `<folder>/<job id>/` with the worker's own names: each output from its
link, path or inline data, checked against the response's `bytes` and `sha256` before it is written; thumbnails;
the worker's result.json where the response links one; and the response itself as response.json."""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from ..schema import JOB_ID
from .failures import DownloadFailed

DATA_URI = re.compile(r"data:[\w.+-]+/([\w.+-]+);base64,(.*)", re.DOTALL)
# Extensions come from the server; only a short run of letters and digits may reach a file name.
EXTENSION = re.compile(r"[a-z0-9]{1,5}")
SOURCES = ("url", "path", "data")


def save_results(
    response: dict[str, Any], folder: Path, fetch_url: Callable[[str], bytes]
) -> tuple[dict[str, Any], list[Path]]:
    """Saves a completed job's files and returns the response with each output naming its local `file` (and
    `thumbnail_file`, and `metadata_file` for result.json) in place of inline data, and the paths written.
    Raises DownloadFailed when a file cannot be fetched or is not what the response says."""
    job_id = str(response.get("id", ""))
    # The job id comes from the server: where it could leave the folder, a digest of it names the job's folder.
    name = job_id if JOB_ID.fullmatch(job_id) else "job-" + hashlib.sha256(job_id.encode()).hexdigest()[:16]
    target = folder / name
    target.mkdir(parents=True, exist_ok=True)
    saved = copy.deepcopy(response)
    output = saved.get("output")
    written: list[Path] = []
    if isinstance(output, dict):
        for index, entry in enumerate(_entries(output)):
            body = _fetch(entry, "", fetch_url)
            if body is None:
                raise DownloadFailed(f"output {index} has none of {', '.join(SOURCES)}")
            _check(index, entry, body)
            written.append(_write(target / f"{index}.{_extension(entry.get('format'))}", body))
            entry["file"] = str(written[-1])
            entry.pop("data", None)
            thumbnail = _fetch(entry, "thumbnail_", fetch_url)
            if thumbnail is not None:
                written.append(_write(target / f"{index}.thumb.{_thumbnail_extension(entry)}", thumbnail))
                entry["thumbnail_file"] = str(written[-1])
                entry.pop("thumbnail_data", None)
        metadata = _fetch(output, "metadata_", fetch_url)
        if metadata is not None:
            written.append(_write(target / "result.json", metadata))
            output["metadata_file"] = str(written[-1])
    written.append(_write(target / "response.json", json.dumps(saved, indent=2).encode()))
    return saved, written


def _entries(output: dict[str, Any]) -> list[dict[str, Any]]:
    """Every delivered file's entry in the order the worker numbered them: the images, then a control image or a
    video (the response's other entries with a digest)."""
    images = output.get("images")
    entries = [entry for entry in images if isinstance(entry, dict)] if isinstance(images, list) else []
    return entries + [
        value for key, value in output.items() if key != "images" and isinstance(value, dict) and "sha256" in value
    ]


def _fetch(entry: dict[str, Any], prefix: str, fetch_url: Callable[[str], bytes]) -> bytes | None:
    """The bytes behind `<prefix>url`, `<prefix>path` or `<prefix>data`, whichever the entry has; None if none."""
    if isinstance(url := entry.get(f"{prefix}url"), str):
        if not url.startswith(("http://", "https://")):
            raise DownloadFailed(f"{prefix}url is not an http(s) link")
        return fetch_url(url)
    if isinstance(path := entry.get(f"{prefix}path"), str):
        # A results folder on the worker's disk: readable when the client runs on the same machine (local runs).
        try:
            return Path(path).read_bytes()
        except OSError as error:
            raise DownloadFailed(f"{path} is on the worker's disk and cannot be read here ({error.strerror})") from None
    if isinstance(data := entry.get(f"{prefix}data"), str):
        match = DATA_URI.fullmatch(data)
        try:
            if match is None:
                raise ValueError
            return base64.b64decode(match.group(2), validate=True)
        except (ValueError, binascii.Error):
            raise DownloadFailed(f"{prefix}data is not a base64 data URI") from None
    return None


def _check(index: int, entry: dict[str, Any], body: bytes) -> None:
    digest = hashlib.sha256(body).hexdigest()
    if digest != entry.get("sha256"):
        raise DownloadFailed(f"output {index}: sha256 {digest} does not match the response's {entry.get('sha256')}")
    if entry.get("bytes", len(body)) != len(body):
        raise DownloadFailed(f"output {index}: {len(body)} bytes, the response says {entry['bytes']}")


def _extension(value: object) -> str:
    if not isinstance(value, str) or not EXTENSION.fullmatch(value):
        raise DownloadFailed(f"unexpected format {value!r}")
    return value


def _thumbnail_extension(entry: dict[str, Any]) -> str:
    """From the data URI's type or the link's or path's suffix (the worker's thumbnails are WebP)."""
    if isinstance(data := entry.get("thumbnail_data"), str) and (match := DATA_URI.fullmatch(data)):
        return _extension(match.group(1))
    where = entry.get("thumbnail_url") or entry.get("thumbnail_path") or ""
    return _extension(PurePosixPath(urlsplit(str(where)).path).suffix.removeprefix("."))


def _write(path: Path, body: bytes) -> Path:
    path.write_bytes(body)
    return path
