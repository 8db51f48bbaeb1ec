"""Endurance: a few hundred mixed jobs, failures among them, through the RunPod SDK's local API server, two at a
time. Every job ends as it should, and the server's resident memory stops growing once the first jobs warmed it."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path

import pytest
import requests
from test_sdxl_family import PHOTO

pytestmark = pytest.mark.slow

TINY = {"prompt": "a lighthouse", "num_inference_steps": 1, "width": 64, "height": 64, "thumbnail_size": 0}
# Each job and how it must end: None for success, else its error code.
MIXED: list[tuple[dict, str | None]] = [
    ({**TINY, "num_images": 2}, None),
    ({**TINY, "task": "img2img", "image": PHOTO, "strength": 1.0, "output_format": "jpeg"}, None),
    ({**TINY, "task": "txt2video", "num_frames": 5}, None),
    ({**TINY, "scheduler": "dpmpp_2m_sde_karras", "loras": [{"name": "sdxl-offset"}]}, None),
    ({**TINY, "num_images": 99}, "INVALID_INPUT"),
    ({**TINY, "loras": [{"name": "no-such-lora"}]}, "UNKNOWN_LORA"),
    ({**TINY, "task": "img2img", "image": "aGVsbG8gd29ybGQ="}, "INVALID_INPUT"),
]
JOBS = 301
WARMED_AFTER = 42


def resident_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def server_pid(base: str) -> int:
    """The local API server's process, found by the port it was started with."""
    port = base.rsplit(":", 1)[1]
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with suppress(OSError):
            arguments = cmdline.read_bytes().split(b"\0")
            if b"--rp_serve_api" in arguments and port.encode() in arguments:
                return int(cmdline.parent.name)
    raise AssertionError(f"no API server on port {port}")


def test_hundreds_of_mixed_jobs_end_as_they_should_in_flat_memory(api_server: str) -> None:
    base, pid = api_server, server_pid(api_server)
    resident: dict[int, float] = {}

    def run(number: int) -> tuple[int, str | None, dict]:
        job, expected = MIXED[number % len(MIXED)]
        answer = requests.post(f"{base}/runsync", json={"input": {**job, "seed": number}}, timeout=120).json()
        return number, expected, answer

    with ThreadPoolExecutor(2) as clients:
        for number, expected, answer in clients.map(run, range(1, JOBS + 1)):
            if expected is None:
                assert answer["status"] == "COMPLETED", (number, answer)
            else:
                assert answer["status"] == "FAILED" and f"{expected}:" in str(answer), (number, answer)
            if number in (WARMED_AFTER, JOBS):
                resident[number] = resident_mib(pid)
    growth = resident[JOBS] - resident[WARMED_AFTER]
    print(
        f"resident memory: {resident[WARMED_AFTER]:.1f} MiB after job {WARMED_AFTER}, "
        f"{resident[JOBS]:.1f} MiB after job {JOBS} ({growth:+.1f} MiB)"
    )
    # Allocator noise, not a leak: a leak of even one output per job would be hundreds of MiB here.
    assert growth < 32
