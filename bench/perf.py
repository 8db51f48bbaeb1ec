"""The worker's own costs against the usual way and the bare libraries, measured in the same run: one table,
printed and written as JSON.

    python bench/perf.py [--repeats 5] [--jobs 300] [--size 1024] [--formats png,jpeg,webp]
                         [--sections overhead,handler,cold,memory,resident] [--output .cache/bench/perf.json]
    python bench/perf.py --markdown .cache/bench/perf.json      # a written table, as the README shows it

Sections (medians of --repeats runs, each kind interleaved with its baseline so drift falls on both alike):
- overhead: per image, the handler's wall time minus the time spent inside the diffusers pipelines' `__call__`
  (timed by wrapping the pipeline classes here, never inside the worker), for png, jpeg and webp, inline and to S3
  (moto on loopback), 1 and 4 images, on tiny-model output and on real photos; against the usual way on the same
  images: Pillow's defaults (PNG level 6), written to disk, uploaded with boto3 and presigned (inline: a base64 data
  URI). The generation is replayed here (the wrapped `__call__` returns the next image at once, made from decoded
  floats by the pipeline's own last step into what was asked for), so nothing the worker does can hide behind it:
  the worst case, and minutes instead of an hour of 1024² generations.
- handler: a job through the handler against the bare diffusers call on the same models and inputs (png to S3).
- cold: process start to ready (`import handler`) against bare `from_pretrained` of the same components
  (bench/bare_load.py), each in a fresh process; memory of all pipelines' tensors (distinct storage) against the
  sum of their distinct components (by content).
- resident: resident memory after 20 and after --jobs mixed tiny jobs (every task, LoRAs, formats), and the
  clean-up's own time per job.

Tiny models make the generation cheap, so the worker's share looks larger than on a GPU with real weights.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import inspect
import io
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

import boto3
import numpy as np
import torch
from moto.moto_server.threaded_moto_server import ThreadedMotoServer
from PIL import Image
from samples import photos

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("overhead", "handler", "cold", "memory", "resident")
FORMATS = ("png", "jpeg", "webp")
QUALITY = 90  # the contract's default output_quality
# The usual way: Pillow's defaults for each format (PNG at level 6, JPEG without optimize, WEBP at method 4).
USUAL_OPTIONS: dict[str, dict[str, Any]] = {
    "png": {"format": "PNG"},
    "jpeg": {"format": "JPEG", "quality": QUALITY},
    "webp": {"format": "WEBP", "quality": QUALITY},
}
MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
PROMPT = "a lighthouse on a cliff at dusk"
S3_KEYS = {"accessId": "bench", "accessSecret": "bench", "bucketName": "bench"}


@dataclass
class Row:
    section: str
    measure: str
    unit: str
    worker: float
    baseline: float
    # ("ratio", limit): worker / baseline must be at most limit; ("worker", limit): the worker's own value.
    target: tuple[str, float] | None = None
    note: str = ""
    ratio: float = field(init=False)
    holds: bool | None = field(init=False)

    def __post_init__(self) -> None:
        self.ratio = self.worker / self.baseline if self.baseline else float("inf")
        if self.target is None:
            self.holds = None
        else:
            kind, limit = self.target
            self.holds = (self.ratio if kind == "ratio" else self.worker) <= limit

    def target_text(self) -> str:
        if self.target is None:
            return ""
        kind, limit = self.target
        return f"≤ {limit:g}×" if kind == "ratio" else f"≤ {limit:g} {self.unit}"


class PipelineClock:
    """Time spent inside the diffusers pipeline classes' `__call__`, by wrapping the classes for as long as it is
    entered. With `replay` set, a call returns the next of those images at once instead of generating."""

    def __init__(self, classes: list[type]) -> None:
        self.originals = {cls: cls.__call__ for cls in classes}
        self.inside = 0.0
        self.depth = 0
        self.replay: Iterator[Image.Image] | None = None

    def __enter__(self) -> PipelineClock:
        for cls, original in self.originals.items():
            cls.__call__ = self._timed(original)
        return self

    def __exit__(self, *exc: object) -> None:
        for cls, original in self.originals.items():
            cls.__call__ = original

    def _timed(self, original: Callable[..., Any]) -> Callable[..., Any]:
        from diffusers.pipelines.stable_diffusion_xl.pipeline_output import StableDiffusionXLPipelineOutput

        def call(pipeline: object, *args: Any, **kwargs: Any) -> Any:
            # Only the outermost call counts, should one pipeline call another.
            self.depth += 1
            began = time.perf_counter()
            try:
                if self.replay is not None:
                    # The next image as the VAE would decode it, then made into what the caller asked for (PIL
                    # images, floats) by the pipeline's own last step, as a generation ends.
                    pixels = torch.from_numpy(np.array(next(self.replay))).permute(2, 0, 1).contiguous()
                    decoded = pixels[None] / 127.5 - 1
                    output_type = kwargs.get("output_type", "pil")
                    return StableDiffusionXLPipelineOutput(
                        images=pipeline.image_processor.postprocess(decoded, output_type=output_type)
                    )
                return original(pipeline, *args, **kwargs)
            finally:
                self.depth -= 1
                if self.depth == 0:
                    self.inside += time.perf_counter() - began

        return call


class Handler:
    """`handler.handler` as RunPod calls it, whether it is a function or a coroutine function."""

    def __init__(self, module: ModuleType) -> None:
        self.module = module
        self.loop = asyncio.new_event_loop()

    def __call__(self, job: dict[str, Any]) -> dict[str, Any]:
        result = self.module.handler(job)
        if inspect.isawaitable(result):
            result = self.loop.run_until_complete(result)
        if "error" in result:
            raise RuntimeError(f"job {job['id']}: {result['error']}")
        return result


def median_of(repeats: int, runs: dict[str, Callable[[], float]]) -> dict[str, float]:
    """Each run returns the figure it measured; one warm-up each (first-call allocations and lazy imports are not
    costs per job), then `repeats` rounds, interleaved."""
    for run in runs.values():
        run()
    figures: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            figures[name].append(run())
    return {name: statistics.median(values) for name, values in figures.items()}


def image_job(size: int, count: int, output_format: str, s3: dict[str, str] | None, job_id: str) -> dict[str, Any]:
    job: dict[str, Any] = {
        "id": job_id,
        "input": {
            "prompt": PROMPT,
            "seed": 1,
            "num_inference_steps": 1,
            "width": size,
            "height": size,
            "num_images": count,
            "output_format": output_format,
            "output_quality": QUALITY,
        },
    }
    if s3 is not None:
        job["s3Config"] = s3
    return job


def usual_way(images: list[Image.Image], output_format: str, s3: Any, scratch: Path) -> Callable[[], float]:
    """What a handler written the usual way does per image: Pillow's defaults, to disk, uploaded and presigned;
    inline, a base64 data URI. Returns seconds per image."""

    def run() -> float:
        began = time.perf_counter()
        inline: list[str] = []
        for index, image in enumerate(images):
            if s3 is None:
                buffer = io.BytesIO()
                image.save(buffer, **USUAL_OPTIONS[output_format])
                inline.append(f"data:{MIME[output_format]};base64,{base64.b64encode(buffer.getvalue()).decode()}")
                continue
            path = scratch / f"{index}.{output_format}"
            image.save(path, **USUAL_OPTIONS[output_format])
            key = f"usual/{index}.{output_format}"
            s3.upload_file(str(path), "bench", key, ExtraArgs={"ContentType": MIME[output_format]})
            s3.generate_presigned_url("get_object", Params={"Bucket": "bench", "Key": key}, ExpiresIn=3600)
        return (time.perf_counter() - began) / len(images)

    return run


def usual_bytes(images: list[Image.Image], output_format: str) -> int:
    total = 0
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, **USUAL_OPTIONS[output_format])
        total += buffer.tell()
    return total


def overhead_rows(
    handle: Handler, clock: PipelineClock, sources: dict[str, list[Image.Image]], s3: Any, s3_config: dict, args: Any
) -> list[Row]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-usual-") as scratch:
        for source, images in sources.items():
            for output_format in args.formats:
                for sink in ("inline", "s3"):
                    for count in (1, 4):
                        chosen = images[:count]
                        job = image_job(args.size, count, output_format, s3_config if sink == "s3" else None, "bench")
                        sizes: list[int] = []

                        def through_worker(job: dict = job, chosen: list = chosen, sizes: list = sizes) -> float:
                            clock.replay, clock.inside = iter(chosen), 0.0
                            began = time.perf_counter()
                            response = handle(job)
                            wall = time.perf_counter() - began
                            clock.replay = None
                            sizes[:] = [image["bytes"] for image in response["images"]]
                            return (wall - clock.inside) / len(chosen)

                        usual = usual_way(chosen, output_format, s3 if sink == "s3" else None, Path(scratch))
                        medians = median_of(args.repeats, {"worker": through_worker, "usual": usual})
                        # The targets: a quarter of the usual way's time for png on real photos, its time
                        # on tiny-model noise, which no encoder compresses; 60 ms for jpeg and webp. libwebp alone
                        # spends about 100 ms on 1024² of noise: there webp is held to the usual way's time too.
                        if output_format == "jpeg":
                            target = ("worker", 60.0)
                        elif source == "tiny":
                            target = ("ratio", 1.0)
                        elif output_format == "png":
                            target = ("ratio", 0.25)
                        else:
                            target = ("worker", 60.0)
                        rows.append(
                            Row(
                                "overhead",
                                f"{source} {output_format} {sink} ×{count}",
                                "ms/image",
                                medians["worker"] * 1000,
                                medians["usual"] * 1000,
                                target,
                                note=f"bytes {sum(sizes) / usual_bytes(chosen, output_format):.3f}× the usual way's",
                            )
                        )
                        print_row(rows[-1])
    return rows


def bare_generation(worker: Any, size: int, count: int) -> list[Image.Image]:
    """What the worker generates for a job, by the diffusers pipeline alone: one call per image, seed + index."""
    base = worker.families["txt2img"].base
    return [
        base(
            prompt=PROMPT,
            num_inference_steps=1,
            guidance_scale=5.0,
            width=size,
            height=size,
            generator=torch.Generator("cpu").manual_seed(1 + index),
            output_type="pil",
        ).images[0]
        for index in range(count)
    ]


def handler_rows(handle: Handler, clock: PipelineClock, worker: Any, s3_config: dict, args: Any) -> list[Row]:
    rows = []
    for count in (1, 4):
        job = image_job(args.size, count, "png", s3_config, "bench-handler")
        own: list[float] = []

        def through_handler(job: dict = job, count: int = count, own: list = own) -> float:
            clock.inside = 0.0
            began = time.perf_counter()
            handle(job)
            wall = time.perf_counter() - began
            own.append((wall - clock.inside) / count)
            return wall

        def bare(count: int = count) -> float:
            began = time.perf_counter()
            bare_generation(worker, args.size, count)
            return time.perf_counter() - began

        medians = median_of(args.repeats, {"handler": through_handler, "bare": bare})
        rows.append(
            Row(
                "handler",
                f"txt2img {args.size}² png s3 ×{count}, 1 step",
                "s",
                medians["handler"],
                medians["bare"],
                ("ratio", 1.05),
                note=f"own time {statistics.median(own) * 1000:.0f} ms/image while generating",
            )
        )
        print_row(rows[-1])
    return rows


def seconds_to_ready(command: list[str], env: dict[str, str]) -> float:
    began = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in process.stdout:
        if line.startswith("ready"):
            ready = time.perf_counter() - began
            break
    else:
        raise RuntimeError(f"{command} exited with {process.wait()} before it was ready")
    process.wait()
    return ready


def cold_rows(args: Any) -> list[Row]:
    # handler.py lives at the repository's root; a PYTHONPATH given to the benchmark (another checkout's src/) still
    # goes before the installed package.
    path = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "MODELS_DIR": str(args.models_dir), "LOG_LEVEL": "WARNING", "PYTHONPATH": path}
    runs = {
        "worker": lambda: seconds_to_ready([sys.executable, "-c", "import handler; print('ready', flush=True)"], env),
        "bare": lambda: seconds_to_ready(
            [sys.executable, str(REPO / "bench" / "bare_load.py"), str(args.models_dir)], env
        ),
    }
    medians = median_of(args.repeats, runs)
    row = Row("cold", "process start to ready", "s", medians["worker"], medians["bare"], ("ratio", 1.1))
    print_row(row)
    return [row]


def memory_rows(worker: Any) -> list[Row]:
    """All pipelines' tensors, each storage counted once, against one copy of each distinct component (by content):
    equal when no component is held twice."""
    from diffusion_worker.hygiene import weights_digest

    modules = [
        module for family in {id(f): f for f in worker.families.values()}.values() for module in family.weight_modules()
    ]
    storages: dict[tuple[str, int], int] = {}
    by_content: dict[str, int] = {}
    for module in modules:
        own: dict[tuple[str, int], int] = {}
        for tensor in [*module.parameters(), *module.buffers()]:
            storage = tensor.untyped_storage()
            own[(str(tensor.device), storage.data_ptr())] = storage.nbytes()
        storages.update(own)
        by_content[weights_digest([module])] = sum(own.values())
    row = Row(
        "memory",
        "all pipelines' weights",
        "MiB",
        sum(storages.values()) / 2**20,
        sum(by_content.values()) / 2**20,
        ("ratio", 1.0),
        note=f"{len(modules)} components held, {len(by_content)} distinct",
    )
    print_row(row)
    return [row]


def resident_kib() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def mixed_jobs(worker: Any, picture: str) -> list[dict[str, Any]]:
    """Tiny jobs of every task the worker serves, with and without LoRAs, in every format, delivered inline."""
    image = {"prompt": "a harbour", "num_inference_steps": 2, "width": 64, "height": 64, "thumbnail_size": 32}
    video = {**image, "num_frames": 9}
    candidates = [
        {**image, "task": "txt2img", "output_format": "png"},
        {**image, "task": "img2img", "image": picture, "output_format": "webp"},
        {**image, "task": "controlnet_depth", "image": picture, "output_format": "jpeg"},
        {**video, "task": "txt2video"},
        {**video, "task": "img2video", "image": picture},
        {**image, "task": "txt2img", "num_images": 2, "loras": [{"name": name} for name in ("sdxl-offset",)]},
    ]
    served = set(worker.tasks)
    loras = set(worker.families["txt2img"].loras.names) if "txt2img" in served else set()
    return [
        job for job in candidates if job["task"] in served and {lora["name"] for lora in job.get("loras", [])} <= loras
    ]


def resident_rows(handle: Handler, worker: Any, args: Any) -> list[Row]:
    import diffusion_worker.runtime as runtime

    buffer = io.BytesIO()
    photos(64, 1)[0].save(buffer, format="PNG")
    picture = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    jobs = mixed_jobs(worker, picture)
    clean_up = runtime.release_memory
    spent: list[float] = []

    def timed_clean_up() -> None:
        began = time.perf_counter()
        try:
            clean_up()
        finally:
            spent.append(time.perf_counter() - began)

    runtime.release_memory = timed_clean_up
    walls, resident = [], {}
    try:
        for number in range(1, args.jobs + 1):
            job_input = {**jobs[number % len(jobs)], "seed": number}
            began = time.perf_counter()
            handle({"id": f"mixed-{number}", "input": job_input})
            walls.append(time.perf_counter() - began)
            if number in (20, args.jobs):
                resident[number] = resident_kib()
    finally:
        runtime.release_memory = clean_up
    rows = [
        Row(
            "resident",
            f"resident memory after job {args.jobs} vs job 20",
            "MiB",
            resident.get(args.jobs, 0) / 1024,
            resident.get(20, resident.get(args.jobs, 0)) / 1024,
            ("ratio", 1.02) if args.jobs >= 20 else None,
            note=f"{len(jobs)} kinds of job in turn",
        ),
        Row(
            "resident",
            "clean-up per job vs the whole job",
            "ms",
            statistics.median(spent) * 1000,
            statistics.median(walls) * 1000,
            note="the clean-up's own time, inside the job's",
        ),
    ]
    for row in rows:
        print_row(row)
    return rows


HEADER = f"{'section':<9} {'measure':<44} {'unit':<9} {'worker':>9} {'baseline':>9} {'ratio':>6} {'target':>10} holds"


def print_row(row: Row) -> None:
    holds = {None: "", True: "yes", False: "NO"}[row.holds]
    print(
        f"{row.section:<9} {row.measure:<44} {row.unit:<9} {row.worker:>9.1f} {row.baseline:>9.1f} "
        f"{row.ratio:>6.2f} {row.target_text():>10} {holds:<5} {row.note}",
        flush=True,
    )


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    with open("/proc/cpuinfo") as cpuinfo:
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), cpu)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        **{name: metadata.version(name) for name in ("torch", "diffusers", "pillow", "boto3")},
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def markdown(report: dict[str, Any]) -> str:
    """A written table as the README shows it."""
    machine = report["machine"]
    lines = [
        f"{machine['cpu']}, {machine['cores']} cores, Python {machine['python']}, torch {machine['torch']}, "
        f"Pillow {machine['pillow']}; {machine['date']}; {report['arguments']}",
        "",
        "| section | measure | unit | worker | baseline | ratio | target | holds | note |",
        "| --- | --- | --- | ---: | ---: | ---: | --- | --- | --- |",
    ]
    for fields in report["rows"]:
        given = {name: fields[name] for name in ("section", "measure", "unit", "worker", "baseline", "note")}
        row = Row(**given, target=tuple(fields["target"]) if fields["target"] else None)
        holds = {None: "", True: "yes", False: "**no**"}[row.holds]
        lines.append(
            f"| {row.section} | {row.measure} | {row.unit} | {row.worker:.1f} | {row.baseline:.1f} | {row.ratio:.2f} "
            f"| {row.target_text()} | {holds} | {row.note} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs per median (default 5)")
    parser.add_argument("--jobs", type=int, default=300, help="mixed jobs for the resident memory row (default 300)")
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels (default 1024)")
    parser.add_argument("--formats", default=",".join(FORMATS), help="the overhead's image formats (default: all)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    parser.add_argument("--models-dir", type=Path, default=REPO / ".cache" / "tiny-models" / "bench")
    parser.add_argument("--output", type=Path, default=REPO / ".cache" / "bench" / "perf.json", help="the JSON table")
    parser.add_argument("--markdown", type=Path, metavar="JSON", help="print a written table as markdown, and stop")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return
    sections = set(args.sections.split(","))
    if sections - set(SECTIONS):
        parser.error(f"--sections: unknown {sorted(sections - set(SECTIONS))}; known: {', '.join(SECTIONS)}")
    args.formats = args.formats.split(",")
    if set(args.formats) - set(FORMATS):
        parser.error(f"--formats: unknown {sorted(set(args.formats) - set(FORMATS))}; known: {', '.join(FORMATS)}")
    subprocess.run(
        [sys.executable, str(REPO / "builder" / "fetch_models.py"), "--tiny", "--models-dir", str(args.models_dir)],
        check=True,
        capture_output=True,
    )
    # What the handler reads at import, as a deployment sets it; the jobs' s3Config names moto on loopback, over http.
    # Four 1024² PNGs of noise are 10 MiB inline, past the limit RunPod's payloads impose; the cost of making them is
    # what is measured here.
    os.environ.update(
        MODELS_DIR=str(args.models_dir),
        LOG_LEVEL="WARNING",
        RUNPOD_LOG_LEVEL="ERROR",
        ALLOW_PRIVATE_S3CONFIG_ENDPOINTS="true",
        MAX_INLINE_BYTES=str(64 * 2**20),
    )
    sys.path.insert(0, str(REPO))
    print(json.dumps(machine()))
    print(HEADER, flush=True)
    rows: list[Row] = []
    if "cold" in sections:
        rows += cold_rows(args)
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    import handler
    from diffusion_worker.pipelines import sdxl, wan

    # Quiet, so the table is all there is to read: the runpod SDK sets the root logger's level on import.
    for name in ("diffusion_worker", "werkzeug"):
        logging.getLogger(name).setLevel(logging.ERROR)
    handle = Handler(handler)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        s3_config = {**S3_KEYS, "endpointUrl": f"http://{host}:{port}"}
        s3 = boto3.client(
            "s3",
            endpoint_url=s3_config["endpointUrl"],
            region_name="us-east-1",
            aws_access_key_id="bench",
            aws_secret_access_key="bench",
        )
        s3.create_bucket(Bucket="bench")
        with PipelineClock([*sdxl.PIPELINES.values(), *wan.PIPELINES.values()]) as clock:
            if "memory" in sections:
                rows += memory_rows(handler.worker)
            if "handler" in sections:
                rows += handler_rows(handle, clock, handler.worker, s3_config, args)
            if "overhead" in sections:
                sources = {"tiny": bare_generation(handler.worker, args.size, 4), "photos": photos(args.size)}
                rows += overhead_rows(handle, clock, sources, s3, s3_config, args)
            if "resident" in sections:
                rows += resident_rows(handle, handler.worker, args)
    finally:
        server.stop()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": machine(),
        "arguments": {"repeats": args.repeats, "jobs": args.jobs, "size": args.size, "sections": sorted(sections)},
        "rows": [asdict(row) for row in rows],
    }
    args.output.write_text(json.dumps(report, indent=2))
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
