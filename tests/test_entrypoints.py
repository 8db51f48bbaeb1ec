"""The ways users reach the worker, run for real: `python handler.py` on test_input.json, and the RunPod SDK's
local API server answering /runsync, /run and /status over HTTP on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def worker_env(tiny_models_dir: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "MODELS_DIR": str(tiny_models_dir), **extra}


def test_python_handler_runs_test_input_json(tiny_models_dir: Path, tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "handler.py"],
        cwd=REPO,
        env=worker_env(tiny_models_dir, OUTPUT_DIR=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    expected = json.loads((REPO / "test_input.json").read_text())["input"]["num_images"]
    written = sorted(path.name for path in (tmp_path / "local_test").iterdir())
    assert [name for name in written if name.endswith(".png")] == [f"{k}.png" for k in range(expected)]


def test_a_failing_job_makes_python_handler_exit_1(tiny_models_dir: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "handler.py", "--test_input", json.dumps({"input": {"prompt": "x", "width": 7}})],
        cwd=REPO,
        env=worker_env(tiny_models_dir),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 1
    assert "INVALID_INPUT: width" in completed.stdout + completed.stderr


def test_a_worker_without_models_refuses_to_start(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-c", "import handler"],
        cwd=REPO,
        env=worker_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 1
    assert "no models found" in completed.stderr


JOB = {"prompt": "a lighthouse", "seed": 11, "num_inference_steps": 2, "width": 64, "height": 64}


def test_runsync_completes(api_server: str) -> None:
    answer = requests.post(f"{api_server}/runsync", json={"input": JOB}, timeout=120).json()
    assert answer["status"] == "COMPLETED", answer
    output = answer["output"]
    assert output["seed"] == 11 and len(output["images"]) == 1
    assert output["images"][0]["data"].startswith("data:image/png;base64,")


def test_run_then_status(api_server: str) -> None:
    queued = requests.post(f"{api_server}/run", json={"input": JOB}, timeout=30).json()
    # The SDK's local server runs a queued job when its status is asked for.
    status = requests.post(f"{api_server}/status/{queued['id']}", timeout=120).json()
    assert status["status"] == "COMPLETED", status
    again = requests.post(f"{api_server}/runsync", json={"input": JOB}, timeout=120).json()
    assert status["output"]["images"][0]["sha256"] == again["output"]["images"][0]["sha256"]


def test_runsync_reports_bad_input_as_failed(api_server: str) -> None:
    answer = requests.post(f"{api_server}/runsync", json={"input": {"prompt": "x", "num_images": 99}}, timeout=60)
    body = answer.json()
    assert body["status"] == "FAILED"
    assert "INVALID_INPUT: num_images" in json.dumps(body)


def test_runsync_video(api_server: str) -> None:
    job = {**JOB, "task": "txt2video", "num_frames": 9}
    answer = requests.post(f"{api_server}/runsync", json={"input": job}, timeout=120).json()
    assert answer["status"] == "COMPLETED", answer
    video = answer["output"]["video"]
    assert video["data"].startswith("data:video/mp4;base64,")
    assert video["thumbnail_data"].startswith("data:image/webp;base64,")
    assert (video["format"], video["num_frames"], video["fps"], video["width"]) == ("mp4", 9, 16, 64)
