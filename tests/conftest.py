"""Session fixtures: tiny models built once by the real builder, and one worker loaded from them through the
real handler module, as RunPod would at cold start."""

from __future__ import annotations

import hashlib
import importlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from types import ModuleType

import pytest

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
    """Sends one job through `handler.handler`, as the RunPod SDK does: `run_job(input, job_id=..., s3Config=...)`."""

    def run(job_input: object, job_id: str = "test-job", **extra: object) -> dict:
        return handler_module.handler({"id": job_id, "input": job_input, **extra})

    return run
