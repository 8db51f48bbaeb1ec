"""The client against the real local API server (inline results, and presigned links from S3 on loopback), and
against a scripted loopback server for what the local one cannot show: RunPod's GET /status and /cancel, 429 and
5xx answers, a job that never ends, links that fail once."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from conftest import REPO, free_port
from s3_fixtures import closed_after

from diffusion_worker.client import Backoff, Client, Endpoint, InvalidInput
from diffusion_worker.client.cli import main

if TYPE_CHECKING:
    from s3_fixtures import S3Server

pytest_plugins = ("s3_fixtures",)
FAST = {"prompt": "a lighthouse", "seed": 11, "num_inference_steps": 2, "width": 64, "height": 64}
FAST_FLAGS = ["--prompt", "a lighthouse", "--seed", "11", "--steps", "2", "--width", "64", "--height", "64"]
PICTURE = b"\x89PNG not really, but bytes with a digest"
THUMBNAIL = b"RIFF a thumbnail"


@dataclass
class Seen:
    method: str
    path: str
    at: float
    body: Any


@dataclass
class ScriptedServer:
    """RunPod's routes on loopback, from a script: each `(method, path)` answers from its own list of
    `(status, body)` in turn, repeating the last (a body of bytes is sent as it is, anything else as JSON);
    anything else is 404. Every request is recorded."""

    script: dict[tuple[str, str], list[tuple[int, Any]]]
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.answer(self)

            def do_POST(self) -> None:
                owner.answer(self)

            def log_message(self, *args: object) -> None:
                pass

        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def answer(self, request: BaseHTTPRequestHandler) -> None:
        length = int(request.headers.get("Content-Length") or 0)
        raw = request.rfile.read(length) if length else b""
        path = request.path.split("?", 1)[0]
        with self.lock:
            self.seen.append(Seen(request.command, request.path, time.monotonic(), json.loads(raw) if raw else None))
            answers = self.script.get((request.command, path), [(404, {"error": "no such route"})])
            status, body = answers.pop(0) if len(answers) > 1 else answers[0]
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        request.send_response(status)
        request.send_header("Content-Length", str(len(payload)))
        request.end_headers()
        request.wfile.write(payload)

    def requests_to(self, method: str, path: str) -> list[Seen]:
        return [seen for seen in self.seen if seen.method == method and seen.path.split("?", 1)[0] == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def scripted() -> Iterator[Callable[..., ScriptedServer]]:
    yield from closed_after(ScriptedServer)


def inline_output(digest: str | None = None) -> dict[str, Any]:
    entry = {
        "data": "data:image/png;base64," + base64.b64encode(PICTURE).decode(),
        "thumbnail_data": "data:image/webp;base64," + base64.b64encode(THUMBNAIL).decode(),
        "format": "png",
        "bytes": len(PICTURE),
        "sha256": digest or hashlib.sha256(PICTURE).hexdigest(),
    }
    return {"images": [entry], "seed": 1}


def dead_endpoint() -> str:
    """A loopback port nothing listens on: connections are refused at once."""
    return f"http://127.0.0.1:{free_port()}"


def exit_code(argv: list[str]) -> int:
    """What `diffusion-worker-client argv` exits with, run in this process (argparse exits by itself)."""
    try:
        return main(argv)
    except SystemExit as stop:
        return int(stop.code or 0)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any, str]:
    """`diffusion-worker-client argv` in this process: its exit code, the JSON on stdout (None if none), stderr."""
    code = exit_code(list(argv))
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if captured.out.strip() else None, captured.err


def check_saved(output: dict[str, Any]) -> None:
    """Every output's file holds the bytes its digest names; its inline copy is gone; its thumbnail is WebP."""
    entries = [*output.get("images", []), *(output[kind] for kind in ("video", "control_image") if kind in output)]
    assert entries
    for index, entry in enumerate(entries):
        saved = Path(entry["file"])
        assert saved.name == f"{index}.{entry['format']}"
        assert hashlib.sha256(saved.read_bytes()).hexdigest() == entry["sha256"]
        assert "data" not in entry and "thumbnail_data" not in entry
        assert Path(entry["thumbnail_file"]).read_bytes().startswith(b"RIFF")


# --- against the real local API server --------------------------------------------------------------------------


def test_runsync_end_to_end_saves_verified_files(
    api_server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, response, progress = run_cli(
        capsys, "--endpoint", api_server, "--sync", *FAST_FLAGS, "--num-images", "2", "--output-dir", str(tmp_path)
    )
    assert code == 0, progress
    assert response["status"] == "COMPLETED"
    check_saved(response["output"])
    folder = tmp_path / response["id"]
    assert sorted(path.name for path in folder.iterdir()) == [
        "0.png",
        "0.thumb.webp",
        "1.png",
        "1.thumb.webp",
        "response.json",
    ]
    assert json.loads((folder / "response.json").read_text()) == response


@pytest.fixture(scope="module")
def bucket_api_server(
    serve_api: Callable[..., AbstractContextManager[str]], s3_server: S3Server
) -> Iterator[tuple[str, S3Server]]:
    """A second local API server, delivering to a bucket on moto: its responses hold presigned links."""
    with serve_api(**s3_server.worker_env(s3_server.create_bucket("client-results"))) as base:
        yield base, s3_server


def test_run_and_status_download_presigned_links_with_the_console_script(
    bucket_api_server: tuple[str, S3Server], tmp_path: Path
) -> None:
    base, _ = bucket_api_server
    request = tmp_path / "job.json"
    request.write_text(json.dumps({"input": {**FAST, "output_format": "jpeg"}}))
    script = Path(sys.executable).parent / "diffusion-worker-client"
    completed = subprocess.run(
        [script, "--endpoint", base, "--input", str(request), "--output-dir", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    response = json.loads(completed.stdout)
    output = response["output"]
    check_saved(output)
    assert "X-Amz-Signature" in output["images"][0]["url"]
    metadata = json.loads(Path(output["metadata_file"]).read_text())
    assert metadata["job_id"] == response["id"]
    assert metadata["outputs"][0]["sha256"] == output["images"][0]["sha256"]
    # Progress on stderr, from /run's answer to /status's; never a link's signature.
    assert f"job {response['id']}: IN_PROGRESS" in completed.stderr
    assert f"job {response['id']}: COMPLETED" in completed.stderr
    assert "Signature" not in completed.stderr


def test_a_dead_first_endpoint_falls_back_to_the_live_one(
    api_server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dead = dead_endpoint()
    code, response, progress = run_cli(
        capsys, "--endpoint", dead, "--endpoint", api_server, *FAST_FLAGS, "--output-dir", str(tmp_path)
    )
    assert code == 0, progress
    assert f"{dead} did not take the job" in progress and "Connection refused" in progress
    assert f"accepted by {api_server}" in progress
    check_saved(response["output"])


def test_a_failed_job_exits_2_with_the_workers_error_code(api_server: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, response, progress = run_cli(capsys, "--endpoint", api_server, *FAST_FLAGS, "--lora", "no-such-lora:0.5")
    assert code == 2
    assert response["status"] == "FAILED"
    assert "failed (UNKNOWN_LORA): UNKNOWN_LORA: " in progress


def test_the_webhook_goes_through_run_to_the_server(
    api_server: str, scripted: Callable[..., ScriptedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    hook = scripted({("POST", "/hook"): [(200, {})]})
    code, response, progress = run_cli(capsys, "--endpoint", api_server, *FAST_FLAGS, "--webhook", f"{hook.url}/hook")
    assert code == 0, progress
    # The local server posts the result from a thread of its own once the job is done.
    for _ in range(100):
        if hook.requests_to("POST", "/hook"):
            break
        time.sleep(0.1)
    (delivered,) = hook.requests_to("POST", "/hook")
    assert delivered.body["output"]["images"][0]["sha256"] == response["output"]["images"][0]["sha256"]


def test_a_batch_runs_side_by_side_from_threads(api_server: str, tmp_path: Path) -> None:
    client = Client([api_server])
    jobs = [{**FAST, "seed": seed} for seed in (1, 2)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda job: client.run(job, output_dir=tmp_path, timeout_s=120), jobs))
    assert len({result.id for result in results}) == 2
    assert [result.output["seed"] for result in results] == [1, 2]
    for result in results:
        check_saved(result.output)


# --- against a scripted server ----------------------------------------------------------------------------------


@pytest.mark.parametrize("server_kind", ["runpod", "local"])
def test_the_timeout_cancels_the_job_and_exits_3(
    server_kind: str, scripted: Callable[..., ScriptedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    running = (200, {"id": "job-1", "status": "IN_PROGRESS"})
    if server_kind == "runpod":
        script = {("GET", "/status/job-1"): [running], ("POST", "/cancel/job-1"): [(200, {"status": "CANCELLED"})]}
    else:
        # The SDK's local server: POST /status only (GET is 405), and no /cancel.
        script = {
            ("GET", "/status/job-1"): [(405, {"detail": "Method Not Allowed"})],
            ("POST", "/status/job-1"): [running],
        }
    server = scripted({("POST", "/run"): [(200, {"id": "job-1", "status": "IN_QUEUE"})], **script})
    began = time.monotonic()
    code, _, progress = run_cli(capsys, "--endpoint", server.url, "--prompt", "x", "--timeout", "2")
    elapsed = time.monotonic() - began
    assert code == 3
    assert 2 <= elapsed < 3
    assert len(server.requests_to("POST", "/cancel/job-1")) == 1
    if server_kind == "runpod":
        assert "timed out: timed out after 2 s; job job-1 cancelled" in progress
    else:
        assert "job job-1 not cancelled (the server has no /cancel)" in progress
        # The 405 was learnt once: every later poll went straight to POST.
        assert len(server.requests_to("GET", "/status/job-1")) == 1
        assert len(server.requests_to("POST", "/status/job-1")) >= 2


def test_429_and_5xx_are_retried_with_backoff(scripted: Callable[..., ScriptedServer], tmp_path: Path) -> None:
    server = scripted(
        {
            ("POST", "/run"): [(429, {}), (503, {}), (200, {"id": "job-2", "status": "IN_QUEUE"})],
            ("GET", "/status/job-2"): [
                (500, {}),
                (200, {"id": "job-2", "status": "COMPLETED", "output": inline_output()}),
            ],
        }
    )
    client = Client([server.url], backoff=Backoff(attempts=4, base_s=0.2))
    result = client.run({"prompt": "x"}, output_dir=tmp_path, timeout_s=30)
    check_saved(result.output)
    submissions = [seen.at for seen in server.requests_to("POST", "/run")]
    polls = [seen.at for seen in server.requests_to("GET", "/status/job-2")]
    assert (len(submissions), len(polls)) == (3, 2)
    # Equal jitter: each wait is at least half its exponential step (0.2 s, then 0.4 s).
    assert submissions[1] - submissions[0] >= 0.1 and submissions[2] - submissions[1] >= 0.2
    assert polls[1] - polls[0] >= 0.1


def test_runsync_still_running_after_its_wait_is_polled_and_links_fetched(
    scripted: Callable[..., ScriptedServer], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = scripted({})
    link = f"{server.url}/files/job-3/0.png?X-Amz-Signature=secret"
    entry = {"url": link, "thumbnail_url": f"{server.url}/files/job-3/0.thumb.webp?X-Amz-Signature=secret"}
    output = {
        "images": [{**entry, "format": "png", "bytes": len(PICTURE), "sha256": hashlib.sha256(PICTURE).hexdigest()}]
    }
    server.script.update(
        {
            ("POST", "/runsync"): [(200, {"id": "job-3", "status": "IN_PROGRESS"})],
            ("GET", "/status/job-3"): [(200, {"id": "job-3", "status": "COMPLETED", "output": output})],
            ("GET", "/files/job-3/0.png"): [(502, b"bad gateway"), (200, PICTURE)],
            ("GET", "/files/job-3/0.thumb.webp"): [(200, THUMBNAIL)],
        }
    )
    code, response, progress = run_cli(
        capsys, "--endpoint", server.url, "--sync", "--prompt", "x", "--timeout", "30", "--output-dir", str(tmp_path)
    )
    assert code == 0, progress
    check_saved(response["output"])
    # RunPod is asked to answer /runsync within the job's time, leaving a job id to poll or cancel.
    (submitted,) = server.requests_to("POST", "/runsync")
    assert "wait=" in submitted.path and submitted.body == {"input": {"prompt": "x"}}
    assert "retrying" in progress and "secret" not in progress


def test_a_file_that_does_not_match_its_digest_is_not_kept(
    scripted: Callable[..., ScriptedServer], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    answer = {"id": "job-4", "status": "COMPLETED", "output": inline_output(digest="0" * 64)}
    server = scripted({("POST", "/runsync"): [(200, answer)]})
    code, response, progress = run_cli(
        capsys, "--endpoint", server.url, "--sync", "--prompt", "x", "--output-dir", str(tmp_path)
    )
    assert code == 2
    assert "failed (DOWNLOAD_FAILED): DOWNLOAD_FAILED: output 0: sha256" in progress
    assert response == answer
    assert not (tmp_path / "job-4" / "0.png").exists()


def test_no_endpoint_reachable_exits_4(capsys: pytest.CaptureFixture[str]) -> None:
    first, second = dead_endpoint(), dead_endpoint()
    code, _, progress = run_cli(capsys, "--endpoint", first, "--endpoint", second, "--prompt", "x", "--attempts", "2")
    assert code == 4
    assert f"no endpoint reachable: {first}: [Errno 111] Connection refused; {second}:" in progress


def test_an_endpoint_that_refuses_the_job_is_not_asked_again(
    scripted: Callable[..., ScriptedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    server = scripted({("POST", "/run"): [(401, {"error": "unauthorized"})]})
    code, _, progress = run_cli(capsys, "--endpoint", server.url, "--prompt", "x", "--attempts", "3")
    assert code == 4
    assert "HTTP 401" in progress
    assert len(server.requests_to("POST", "/run")) == 1


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--prompt", "x", "--width", "7"], "width: must be a multiple of 8"),
        (["--prompt", "x", "--seed", "abc"], "--seed: invalid int value"),
        (["--task", "txt2video"], "prompt: required"),
        (["--prompt", "x", "--lora", "style:strong"], "the scale after ':' must be a number"),
        (["--prompt", "x", "--image", "/no/such/picture.png"], "--image: cannot read"),
        (["--input", "/no/such/job.json"], "--input: cannot read"),
        (["--prompt", "x", "--timeout", "0"], "must be positive"),
    ],
)
def test_invalid_input_exits_64_and_sends_nothing(
    argv: list[str], named: str, scripted: Callable[..., ScriptedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    server = scripted({})
    assert exit_code(["--endpoint", server.url, *argv]) == 64
    assert named in capsys.readouterr().err
    assert server.seen == []


def test_invalid_input_raises_before_the_library_sends_anything(scripted: Callable[..., ScriptedServer]) -> None:
    server = scripted({})
    with pytest.raises(InvalidInput, match="num_images: "):
        Client([server.url]).run({"prompt": "x", "num_images": 99})
    assert server.seen == []


NO_TORCH = """
import runpy, sys

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {"torch", "diffusers", "transformers"}:
            raise ImportError(f"{name} is not installed here")

sys.meta_path.insert(0, Refuse())
from diffusion_worker.client import Client
from diffusion_worker.schema import parse_input

assert parse_input({"prompt": "x", "width": 64}).width == 64
try:
    import torch
except ImportError:
    print("no torch")
sys.argv = ["diffusion-worker-client", "--endpoint", "http://127.0.0.1:9", "--prompt", "x", "--width", "7"]
runpy.run_module("diffusion_worker.client", run_name="__main__")
"""


def test_the_client_imports_validates_and_runs_without_torch() -> None:
    completed = subprocess.run([sys.executable, "-c", NO_TORCH], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 64, completed.stderr
    assert completed.stdout == "no torch\n"
    assert "invalid input, nothing sent: width: must be a multiple of 8" in completed.stderr


def test_endpoints_are_ids_on_runpod_or_base_urls_and_the_key_goes_to_runpod_only() -> None:
    on_runpod = Endpoint.parse("abc123xyz", "key")
    assert on_runpod.url("run") == "https://api.runpod.ai/v2/abc123xyz/run"
    assert on_runpod.headers == {"Authorization": "Bearer key"} and "key" not in repr(on_runpod)
    assert Endpoint.parse("https://api.runpod.ai/v2/abc123xyz/", "key").url("run") == on_runpod.url("run")
    pod = Endpoint.parse("http://127.0.0.1:8000/", "key")
    assert (pod.url("status/j"), pod.headers) == ("http://127.0.0.1:8000/status/j", {})
    for text, problem in [
        ("abc123xyz", "needs RUNPOD_API_KEY"),
        ("127.0.0.1:8000", "give a base URL"),
        ("http://h/?a=1", "path only"),
    ]:
        with pytest.raises(ValueError, match=problem):
            Endpoint.parse(text, None)


def test_an_endpoint_id_without_a_key_is_bad_usage(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("RUNPOD_API_KEY", raising=False)
    assert exit_code(["--endpoint", "abc123xyz", "--prompt", "x"]) == 64
    assert "needs RUNPOD_API_KEY" in capsys.readouterr().err
