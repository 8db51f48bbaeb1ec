"""WAN video through the real handler on tiny models: text-to-video and image-to-video as streamable MP4s with a
thumbnail, the model's defaults and bounds, LoRAs that leave nothing behind, workers that serve part of the tasks,
a job's scratch files, and no job leaking into the next."""

from __future__ import annotations

import base64
import hashlib
import io
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from PIL import Image
from test_no_leak import exploding
from test_sdxl_family import PHOTO, adapters_left, as_base64, gradient

from diffusion_worker import runtime
from diffusion_worker.config import Settings
from diffusion_worker.errors import Internal
from diffusion_worker.hygiene import weights_digest
from diffusion_worker.manifest import DEFAULT_MANIFEST, load_manifest
from diffusion_worker.media import encode_video
from diffusion_worker.pipelines.outputs import GeneratedVideo
from diffusion_worker.pipelines.sdxl import SdxlFamily
from diffusion_worker.pipelines.wan import WanFamily
from diffusion_worker.placement import Placement
from diffusion_worker.runtime import Worker
from diffusion_worker.schema import parse_input

FAST = {
    "task": "txt2video",
    "prompt": "a lighthouse at dusk",
    "seed": 5,
    "num_inference_steps": 2,
    "width": 64,
    "height": 64,
    "num_frames": 9,
}
LORA = "causvid"


@pytest.fixture(scope="module")
def family(worker) -> WanFamily:
    return worker.families["txt2video"]


def mp4_of(entry: dict) -> bytes:
    header, payload = entry["data"].split(",", 1)
    assert header == "data:video/mp4;base64"
    data = base64.b64decode(payload)
    assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
    return data


def top_level_boxes(data: bytes) -> list[str]:
    """The MP4's top-level boxes in file order; each starts with its size and its four-letter type."""
    boxes, position = [], 0
    while position < len(data):
        size, kind = struct.unpack(">I4s", data[position : position + 8])
        assert size >= 8, "a box of 64-bit or to-the-end size: not what ffmpeg writes for a short clip"
        boxes.append(kind.decode("ascii"))
        position += size
    assert position == len(data)
    return boxes


def decode(data: bytes, folder: Path) -> tuple[dict, np.ndarray]:
    """Decodes an MP4 with the wheel's ffmpeg: what ffmpeg reports of the stream, and every frame as RGB."""
    path = folder / "decoded.mp4"
    path.write_bytes(data)
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    width, height = meta["size"]
    frames = np.stack([np.frombuffer(frame, np.uint8).reshape(height, width, 3) for frame in reader])
    return meta, frames


def moving_gradient(count: int, width: int, height: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    frames = np.empty((count, height, width, 3), np.uint8)
    for t in range(count):
        frames[t, ..., 0] = 128 + 100 * np.sin((x + 3 * t) / 9)
        frames[t, ..., 1] = 128 + 100 * np.cos((y - 2 * t) / 7)
        frames[t, ..., 2] = 40 + 4 * t
    return frames


# --- encoding ----------------------------------------------------------------------------------------------------


def test_encode_video_is_a_deterministic_streamable_h264_mp4(tmp_path: Path) -> None:
    frames = moving_gradient(17, 48, 32)
    first = encode_video(frames, 24, tmp_path)
    assert (first.ext, first.mime) == ("mp4", "video/mp4")
    assert encode_video(frames.copy(), 24, tmp_path).data == first.data
    # +faststart: the index (moov) precedes the media data, so a browser can play while downloading.
    boxes = top_level_boxes(first.data)
    assert boxes[0] == "ftyp" and boxes.index("moov") < boxes.index("mdat")
    # No encoder version string or creation time: nothing but the frames decides the bytes.
    assert b"Lavf" not in first.data
    meta, decoded = decode(first.data, tmp_path)
    assert meta["codec"] == "h264" and meta["pix_fmt"].startswith("yuv420p(tv, bt709")
    assert meta["fps"] == 24 and meta["size"] == (48, 32)
    assert decoded.shape == frames.shape
    # BT.709 in, BT.709 tagged, BT.709 out: the colours come back as they went in, up to compression.
    assert np.abs(decoded.astype(int) - frames).mean() < 4


def test_a_failing_encoder_is_internal_and_its_output_stays_in_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(imageio_ffmpeg, "get_ffmpeg_exe", lambda: "false")
    with pytest.raises(Internal, match="the video encoder failed; the worker log has the details"):
        encode_video(moving_gradient(5, 32, 32), 16, tmp_path)
    assert "ffmpeg failed on 5 frames of 32x32" in caplog.text


# --- through the handler -----------------------------------------------------------------------------------------


def test_txt2video_returns_the_contract_response(run_job: Callable[..., dict], tmp_path: Path) -> None:
    result = run_job({**FAST, "fps": 12})
    assert "error" not in result, result
    assert "images" not in result and result["seed"] == 5
    video = result["video"]
    facts = {key: video[key] for key in ("width", "height", "format", "seed", "num_frames", "fps")}
    assert facts == {"width": 64, "height": 64, "format": "mp4", "seed": 5, "num_frames": 9, "fps": 12}
    data = mp4_of(video)
    boxes = top_level_boxes(data)
    assert boxes.index("moov") < boxes.index("mdat")
    meta, frames = decode(data, tmp_path)
    assert meta["codec"] == "h264" and meta["pix_fmt"].startswith("yuv420p")
    assert meta["fps"] == 12 and meta["size"] == (64, 64) and len(frames) == 9
    # The thumbnail is a WEBP of the middle frame: of all decoded frames, the one it matches best is frame 4.
    header, payload = video["thumbnail_data"].split(",", 1)
    assert header == "data:image/webp;base64"
    thumbnail = Image.open(io.BytesIO(base64.b64decode(payload)))
    assert thumbnail.format == "WEBP" and thumbnail.size == (64, 64)
    distances = [np.abs(frame.astype(int) - np.asarray(thumbnail.convert("RGB"))).mean() for frame in frames]
    assert int(np.argmin(distances)) == 4
    parameters = result["parameters"]
    assert parameters["guidance_scale"] == 5.0 and parameters["num_inference_steps"] == 2
    assert result["timings"]["encode_s"] > 0


def test_same_input_and_seed_give_the_same_mp4_and_other_seeds_another(run_job: Callable[..., dict]) -> None:
    first = run_job(FAST)["video"]
    assert run_job(FAST)["video"]["data"] == first["data"]
    assert run_job({**FAST, "seed": 6})["video"]["sha256"] != first["sha256"]


def test_thumbnail_size_zero_gives_none(run_job: Callable[..., dict]) -> None:
    video = run_job({**FAST, "thumbnail_size": 0})["video"]
    assert "thumbnail_data" not in video and video["data"]


def test_defaults_are_the_models_recommended_ones(family: WanFamily) -> None:
    t2v = family.resolve(parse_input({"task": "txt2video", "prompt": "a lighthouse"}), {})
    assert (t2v.width, t2v.height, t2v.num_frames, t2v.fps) == (832, 480, 81, 16)
    assert (t2v.num_inference_steps, t2v.guidance_scale) == (50, 5.0)
    i2v = family.resolve(parse_input({"task": "img2video", "prompt": "a lighthouse", "image": PHOTO}), {})
    assert (i2v.width, i2v.height, i2v.num_frames, i2v.num_inference_steps) == (832, 480, 81, 40)
    # UniPC on flow sigmas, built for each job: flow shift 3 up to 480p, 5 above.
    for (width, height), shift in {(832, 480): 3.0, (64, 64): 3.0, (1280, 720): 5.0, (960, 544): 5.0}.items():
        scheduler = family.pipeline_for("txt2video", width, height).scheduler
        assert type(scheduler).__name__ == "UniPCMultistepScheduler"
        assert scheduler.config.prediction_type == "flow_prediction" and scheduler.config.use_flow_sigmas
        assert scheduler.config.flow_shift == shift


def test_img2video_takes_its_size_from_the_image(family: WanFamily) -> None:
    """The img2img rule: the image's aspect ratio at the default's pixel count (832×480), sides multiples of 16."""

    def size(image: Image.Image, **given: int) -> tuple[int, int]:
        job = {"task": "img2video", "prompt": "a lighthouse", "image": PHOTO, **given}
        resolved = family.resolve(parse_input(job), {"image": image})
        return resolved.width, resolved.height

    assert size(Image.new("RGB", (300, 200))) == (768, 512)
    assert size(Image.new("RGB", (480, 832))) == (480, 832)
    assert size(Image.new("RGB", (300, 200)), width=320) == (320, 208)
    assert size(Image.new("RGB", (300, 200)), width=320, height=320) == (320, 320)


def test_every_job_has_its_own_pipeline_around_one_copy_of_the_weights(family: WanFamily) -> None:
    for task, base in family.pipelines.items():
        job = family.pipeline_for(task, 64, 64)
        assert job is not base and job.scheduler is not base.scheduler
        for name in ("transformer", "vae", "text_encoder"):
            assert getattr(job, name) is getattr(base, name)
    assert family.pipelines["img2video"].image_encoder is family.pipeline_for("img2video", 64, 64).image_encoder


def test_img2video_follows_its_image(run_job: Callable[..., dict], tmp_path: Path) -> None:
    # A 96×64 image, fitted to 80×64 by covering and cropping, as img2img does.
    job = {**FAST, "task": "img2video", "image": PHOTO, "width": 80}
    result = run_job(job)
    assert "error" not in result, result
    meta, frames = decode(mp4_of(result["video"]), tmp_path)
    assert meta["size"] == (80, 64) and len(frames) == 9
    assert run_job(job)["video"]["sha256"] == result["video"]["sha256"]
    other = as_base64(gradient(96, 64).transpose(Image.Transpose.ROTATE_180))
    assert run_job({**job, "image": other})["video"]["sha256"] != result["video"]["sha256"]


def test_img2video_needs_an_image(run_job: Callable[..., dict]) -> None:
    result = run_job({**FAST, "task": "img2video"})
    assert result["error"] == "INVALID_INPUT: image: required"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"width": 1280, "height": 1280, "num_frames": 161},
            "INVALID_INPUT: num_frames: 161 frames at 1280×1280 is more than this worker takes (as much as "
            "1280×720 at 81 frames); at 1280×1280 use at most 41 frames, or a smaller size",
        ),
        # The default 81 frames at a size larger than 720p.
        (
            {"width": 1280, "height": 960, "num_frames": None},
            "INVALID_INPUT: num_frames: 81 frames at 1280×960 is more than this worker takes (as much as "
            "1280×720 at 81 frames); at 1280×960 use at most 57 frames, or a smaller size",
        ),
        ({"width": 72}, "INVALID_INPUT: width: must be a multiple of 16 from 64 to 1280 (got 72)"),
        ({"num_frames": 10}, "INVALID_INPUT: num_frames: must be 4k+1 from 5 to 161, e.g. 33 or 81 (got 10)"),
        ({"fps": 0}, "INVALID_INPUT: fps: Input should be greater than or equal to 1"),
        ({"scheduler": "euler"}, "INVALID_INPUT: scheduler: unknown field, not part of the job contract"),
    ],
)
def test_what_would_not_fit_is_refused_naming_the_field(
    run_job: Callable[..., dict], change: dict, message: str
) -> None:
    job = {key: value for key, value in {**FAST, **change}.items() if value is not None}
    assert run_job(job)["error"] == message


def test_a_blank_video_is_a_failed_decode(run_job: Callable[..., dict], family: WanFamily, monkeypatch) -> None:
    def black(*args: object, **kwargs: object) -> Iterator[GeneratedVideo]:
        yield GeneratedVideo(frames=np.zeros((9, 64, 64, 3), np.uint8), fps=16, seed=5)

    monkeypatch.setattr(family, "generate", black)
    result = run_job(FAST)
    assert result["error_code"] == "INTERNAL"
    assert "video 0 is uniformly black" in result["error"]


# --- LoRA --------------------------------------------------------------------------------------------------------


def test_a_video_lora_changes_the_video_and_leaves_the_weights_as_they_were(
    run_job: Callable[..., dict], family: WanFamily
) -> None:
    before = weights_digest(family.weight_modules())
    base = run_job(FAST)["video"]["sha256"]
    with_lora = run_job({**FAST, "loras": [{"name": LORA, "scale": 1.0}]})
    assert "error" not in with_lora, with_lora
    assert with_lora["video"]["sha256"] != base
    assert adapters_left(family) == []
    assert weights_digest(family.weight_modules()) == before
    assert run_job(FAST)["video"]["sha256"] == base


def test_an_unknown_or_image_lora_is_refused_for_video(run_job: Callable[..., dict]) -> None:
    result = run_job({**FAST, "loras": [{"name": "sdxl-offset", "scale": 1.0}]})
    assert result["error"] == ("UNKNOWN_LORA: loras: 'sdxl-offset' not available for wan_t2v (causvid)")
    result = run_job({**FAST, "task": "img2video", "image": PHOTO, "loras": [{"name": LORA, "scale": 1.0}]})
    assert result["error"] == "UNKNOWN_LORA: loras: 'causvid' not available for wan_i2v (none on this worker)"


# --- which tasks a worker serves ---------------------------------------------------------------------------------


def test_a_worker_serving_all_tasks_loads_wan_beside_sdxl(worker) -> None:
    assert isinstance(worker.families["txt2video"], WanFamily)
    assert worker.families["img2video"] is worker.families["txt2video"]
    assert isinstance(worker.families["txt2img"], SdxlFamily)
    pipelines = {pipeline["tasks"][0]: pipeline for pipeline in worker.info()["pipelines"]}
    assert pipelines["img2video"]["loras"] == {"img2video": [], "txt2video": [LORA]}
    assert [model["role"] for model in pipelines["img2video"]["models"]] == ["wan_t2v", "wan_i2v"]


def test_a_video_only_worker_loads_no_sdxl(tiny_models_dir: Path) -> None:
    video_only = Worker.load(Settings(models_dir=tiny_models_dir, worker_tasks=frozenset({"txt2video"})))
    assert video_only.tasks == ["txt2video"]
    [family] = set(video_only.families.values())
    assert isinstance(family, WanFamily) and set(family.pipelines) == {"txt2video"}
    assert video_only.handle({"id": "x", "input": {"task": "txt2img", "prompt": "a lighthouse"}}) == {
        "error": "TASK_UNAVAILABLE: task: txt2img is not served by this worker (it serves txt2video)",
        "error_code": "TASK_UNAVAILABLE",
        "retryable": False,
    }
    assert "video" in video_only.handle({"id": "x", "input": FAST})


def test_an_image_only_worker_loads_no_wan(tiny_models_dir: Path) -> None:
    image_only = Worker.load(Settings(models_dir=tiny_models_dir, worker_tasks=frozenset({"txt2img"})))
    assert not any(isinstance(family, WanFamily) for family in image_only.families.values())
    assert image_only.handle({"id": "x", "input": FAST})["error_code"] == "TASK_UNAVAILABLE"


def test_img2video_is_unavailable_without_an_i2v_model(tiny_models_dir: Path, tmp_path: Path) -> None:
    """Without its folder, or without a role in the manifest, a worker serves txt2video alone."""
    manifest = load_manifest()
    models = tmp_path / "models"
    models.mkdir()
    folder = manifest.role("wan_t2v").folder
    (models / folder).symlink_to(tiny_models_dir / folder)
    (models / "loras").symlink_to(tiny_models_dir / "loras")
    without_folder = Worker.load(Settings(models_dir=models))
    assert without_folder.tasks == ["txt2video"]
    result = without_folder.handle({"id": "x", "input": {**FAST, "task": "img2video", "image": PHOTO}})
    assert result["error"] == "TASK_UNAVAILABLE: task: img2video is not served by this worker (it serves txt2video)"

    text = DEFAULT_MANIFEST.read_text(encoding="utf-8")
    start = text.index("[roles.wan_i2v]")
    end = text.index("\n\n", start)
    unconfigured = tmp_path / "manifest.toml"
    unconfigured.write_text(text[:start] + text[end:], encoding="utf-8")
    assert "wan_i2v" not in load_manifest(unconfigured).roles
    assert WanFamily.available_tasks(tiny_models_dir, load_manifest(unconfigured)) == {"txt2video"}


# --- scratch files -----------------------------------------------------------------------------------------------


@pytest.fixture
def scratch_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, list[list[str]]]]:
    """Points the temp folder at an empty one and records what the encoder saw in its scratch folder."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    seen: list[list[str]] = []

    def recording(frames: np.ndarray, fps: int, scratch_dir: Path):
        try:
            return encode_video(frames, fps, scratch_dir)
        finally:
            assert scratch_dir.parent == root
            seen.append(sorted(path.suffix for path in scratch_dir.iterdir()))

    monkeypatch.setattr(runtime, "encode_video", recording)
    yield root, seen


def test_a_video_jobs_scratch_files_are_gone_after_it_succeeds(run_job: Callable[..., dict], scratch_root) -> None:
    root, seen = scratch_root
    assert "video" in run_job(FAST)
    assert seen == [[".mp4"]]
    assert list(root.iterdir()) == []


@pytest.mark.parametrize("failure", ["delivery", "encoder"])
def test_a_video_jobs_scratch_files_are_gone_after_it_fails(
    run_job: Callable[..., dict], worker, scratch_root, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    root, seen = scratch_root
    if failure == "delivery":
        # Encoded, then refused by delivery: the MP4 was whole before the job failed.
        monkeypatch.setattr(worker, "settings", replace(worker.settings, max_inline_bytes=1024))
        expected = "RESULT_TOO_LARGE"
    else:
        monkeypatch.setattr(imageio_ffmpeg, "get_ffmpeg_exe", lambda: "false")
        expected = "INTERNAL"
    assert run_job(FAST)["error_code"] == expected
    assert seen == [[".mp4"]]
    assert list(root.iterdir()) == []


# --- no leak -----------------------------------------------------------------------------------------------------


def modules_of(family: WanFamily, task: str) -> list[torch.nn.Module]:
    return [module for module in family.pipelines[task].components.values() if isinstance(module, torch.nn.Module)]


def test_no_job_leaks_into_the_next_video(
    run_job: Callable[..., dict], family: WanFamily, tiny_models_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    # The baseline from a family loaded afresh, which has run nothing else.
    settings = Settings(models_dir=tiny_models_dir)
    fresh = WanFamily.load(settings, load_manifest(), Placement.from_settings(settings), frozenset({"txt2video"}))
    request = fresh.resolve(parse_input(FAST), {})
    [video] = fresh.generate(request, FAST["seed"], {})
    baseline = hashlib.sha256(encode_video(video.frames, video.fps, tmp_path).data).hexdigest()
    assert run_job(FAST)["video"]["sha256"] == baseline
    weights = weights_digest(family.weight_modules())

    lora = [{"name": LORA, "scale": 1.0}]
    image_job = {"prompt": "a cottage", "seed": 3, "num_inference_steps": 2, "width": 64, "height": 64}
    jobs = [
        ({**FAST, "loras": lora}, "video"),
        ({**FAST, "task": "img2video", "image": PHOTO, "width": 80, "seed": 1}, "video"),
        ({**image_job, "loras": [{"name": "sdxl-offset", "scale": 1.0}]}, "images"),
        ({**FAST, "num_frames": 5, "fps": 8, "width": 80, "guidance_scale": 0.0, "seed": 9}, "video"),
        ({**image_job, "task": "img2img", "image": PHOTO}, "images"),
        ({**FAST, "loras": [{"name": LORA, "scale": -2.0}], "seed": 2}, "video"),
        ({**FAST, "task": "img2video", "image": "aGVsbG8gd29ybGQ="}, "error"),
    ]
    for job, answer in jobs:
        assert answer in run_job(job)
    # Failures where shared state was touched: mid-denoising with a LoRA loaded, and in the encoder.
    with exploding(family.pipelines["txt2video"].transformer, on_call=2):
        assert run_job({**FAST, "loras": lora})["error_code"] == "INTERNAL"
    with monkeypatch.context() as patch:
        patch.setattr(imageio_ffmpeg, "get_ffmpeg_exe", lambda: "false")
        assert run_job(FAST)["error_code"] == "INTERNAL"

    assert adapters_left(family) == []
    assert weights_digest(family.weight_modules()) == weights
    assert weights_digest(modules_of(family, "txt2video")) == weights_digest(fresh.weight_modules())
    assert run_job(FAST)["video"]["sha256"] == baseline
