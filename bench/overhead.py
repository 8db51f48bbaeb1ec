"""The worker's own overhead: a job through `Worker.handle` (parse, resolve, encode, thumbnails, delivery, clean-up)
against the same generation called directly on the loaded family, the baseline, measured in the same run on tiny
models. Prints the median of each and their ratio; 1.00 would be no overhead at all.

    python bench/overhead.py [--repeats 5]

Delivery is measured inline and to S3 (moto's server on loopback, started here). Tiny models make the overhead look
larger than on a GPU with real weights, where inference dominates: compare ratios between runs, not with production.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import boto3
from moto.moto_server.threaded_moto_server import ThreadedMotoServer

from diffusion_worker.config import BucketSettings, Settings
from diffusion_worker.runtime import Worker
from diffusion_worker.schema import parse_input

REPO = Path(__file__).resolve().parents[1]
JOBS = {
    "txt2img 4×256² png": {"prompt": "a lighthouse", "seed": 1, "num_inference_steps": 4, "num_images": 4},
    "txt2video 64²×33": {
        "task": "txt2video",
        "prompt": "waves",
        "seed": 1,
        "num_inference_steps": 2,
        "width": 64,
        "height": 64,
        "num_frames": 33,
    },
}


def seconds(run: Callable[[], object]) -> float:
    began = time.perf_counter()
    run()
    return time.perf_counter() - began


def direct(worker: Worker, job_input: dict) -> Callable[[], object]:
    """The baseline: only what the model must do, with nothing encoded or delivered."""
    request = parse_input(job_input)
    family = worker.families[request.task]

    def run() -> object:
        resolved = family.resolve(request, {})
        return list(family.generate(resolved, resolved.seed, {}))

    return run


def through(worker: Worker, job_input: dict, job_id: str) -> Callable[[], object]:
    def run() -> object:
        response = worker.handle({"id": job_id, "input": job_input})
        if "error" in response:
            raise RuntimeError(response["error"])
        return response

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    repeats = parser.parse_args().repeats
    # The worker's per-job lines and moto's request log would bury the table.
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    models_dir = REPO / ".cache" / "tiny-models" / "bench"
    subprocess.run(
        [sys.executable, str(REPO / "builder" / "fetch_models.py"), "--tiny", "--models-dir", str(models_dir)],
        check=True,
    )
    worker = Worker.load(Settings(models_dir=models_dir))
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        bucket = BucketSettings(
            endpoint_url=f"http://{host}:{port}", access_key_id="bench", secret_access_key="bench", name="bench"
        )
        boto3.client(
            "s3",
            endpoint_url=bucket.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id="bench",
            aws_secret_access_key="bench",
        ).create_bucket(Bucket="bench")
        to_s3 = Worker(replace(worker.settings, bucket=bucket), worker.manifest, worker.placement, worker.families)
        print(f"{'job':<22} {'baseline s':>10} {'inline s':>9} {'ratio':>6} {'S3 s':>7} {'ratio':>6}")
        for name, job_input in JOBS.items():
            runs = {
                "baseline": direct(worker, job_input),
                "inline": through(worker, job_input, "bench-inline"),
                "s3": through(to_s3, job_input, "bench-s3"),
            }
            for run in runs.values():
                run()  # warm-up: first-call allocations and lazy imports are not overhead per job
            times: dict[str, list[float]] = {kind: [] for kind in runs}
            # Interleaved, so drift in the machine's speed falls on every kind alike.
            for _ in range(repeats):
                for kind, run in runs.items():
                    times[kind].append(seconds(run))
            base, inline, s3 = (statistics.median(times[kind]) for kind in ("baseline", "inline", "s3"))
            print(f"{name:<22} {base:>10.3f} {inline:>9.3f} {inline / base:>6.2f} {s3:>7.3f} {s3 / base:>6.2f}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
