"""Session fixtures: tiny models built once by the real builder, and one worker loaded from them through the
real handler module, as RunPod would at cold start."""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from importlib import metadata
from pathlib import Path
from types import ModuleType

import pytest
import requests

REPO = Path(__file__).resolve().parents[1]
LIBRARIES_IN_CONFIGS = ("torch", "diffusers", "transformers", "peft")


def _builder_fingerprint() -> str:
    """Tiny models are cached across runs, keyed by what builds them, so a builder or library change rebuilds them
    (the libraries write their versions into every config)."""
    digest = hashlib.sha256()
    for package in LIBRARIES_IN_CONFIGS:
        digest.update(f"{package}=={metadata.version(package)}".encode())
    for path in sorted([*(REPO / "builder").glob("*.py"), REPO / "models" / "manifest.toml"]):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="session")
def tiny_models_dir() -> Path:
    target = REPO / ".cache" / "tiny-models" / _builder_fingerprint()
    subprocess.run(
        [sys.executable, str(REPO / "builder" / "fetch_models.py"), "--tiny", "--models-dir", str(target)],
        check=True,
        cwd=REPO,
    )
    return target


@pytest.fixture(scope="session")
def handler_module(tiny_models_dir: Path) -> Iterator[ModuleType]:
    """`handler.py` imported with MODELS_DIR pointing at the tiny models: the same cold start RunPod runs."""
    saved = {name: os.environ.get(name) for name in ("MODELS_DIR",)}
    os.environ["MODELS_DIR"] = str(tiny_models_dir)
    sys.path.insert(0, str(REPO))
    try:
        yield importlib.import_module("handler")
    finally:
        sys.path.remove(str(REPO))
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="session")
def worker(handler_module: ModuleType):
    return handler_module.worker


@pytest.fixture(scope="session")
def run_job(handler_module: ModuleType) -> Callable[..., dict]:
    """Sends one job through the async `handler.handler` and waits for its answer, as the RunPod SDK does:
    `run_job(input, job_id=..., s3Config=...)`."""

    def run(job_input: object, job_id: str = "test-job", **extra: object) -> dict:
        return asyncio.run(handler_module.handler({"id": job_id, "input": job_input, **extra}))

    return run


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def serve_api(tiny_models_dir: Path) -> Callable[..., AbstractContextManager[str]]:
    """The RunPod SDK's local API server (`handler.py --rp_serve_api`) on loopback, with extra environment:
    `with serve_api(BUCKET_NAME=...) as base_url:`. It stops when the block ends."""

    @contextmanager
    def serve(**env: str) -> Iterator[str]:
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, "handler.py", "--rp_serve_api", "--rp_api_host", "127.0.0.1", "--rp_api_port", str(port)],
            cwd=REPO,
            env={**os.environ, "MODELS_DIR": str(tiny_models_dir), **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    requests.get(f"{base}/docs", timeout=2)
                    break
                except requests.ConnectionError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("the local API server did not start") from None
                    time.sleep(0.3)
            yield base
        finally:
            process.terminate()
            process.wait(timeout=30)

    return serve


@pytest.fixture(scope="session")
def api_server(serve_api: Callable[..., AbstractContextManager[str]]) -> Iterator[str]:
    """One local API server on the tiny models, inline results, shared by every test that needs it."""
    with serve_api() as base:
        yield base
