"""The SDXL family on tiny models: img2img, ControlNet-depth and LoRAs on one set of weights, through the real
handler wherever a user would reach them, and the examples users start from."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image
from safetensors.torch import load_file
from test_txt2img import decode_data_uri

from diffusion_worker.errors import Internal
from diffusion_worker.manifest import load_manifest, lora_dir
from diffusion_worker.pipelines import loras as loras_module
from diffusion_worker.pipelines.common import cover, output_size
from diffusion_worker.pipelines.depth import depth_to_image
from diffusion_worker.pipelines.loras import LoraRegistry
from diffusion_worker.pipelines.sdxl import SdxlFamily
from diffusion_worker.schema import SDXL_SIZE, TASKS, VIDEO_TASKS, LoraRef, parse_input

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "examples").glob("*.json"))
FAST = {"prompt": "a cottage", "num_inference_steps": 2, "width": 64, "height": 64, "seed": 5}
LORA_NAMES = ["hyper-sdxl-8step", "pixel-art-xl", "sdxl-lightning-4step", "sdxl-lightning-8step", "sdxl-offset"]


def as_base64(image: Image.Image) -> str:
    """An image as a job carries it: bare base64 of a PNG."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def gradient(width: int, height: int) -> Image.Image:
    """A deterministic picture with structure in both directions, so depth and img2img have something to see."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], axis=-1)
    return Image.fromarray(pixels.astype(np.uint8))


PHOTO = as_base64(gradient(96, 64))


def decoded(entry: dict) -> Image.Image:
    return Image.open(io.BytesIO(decode_data_uri(entry["data"])[1]))


def sha(result: dict) -> str:
    assert "error" not in result, result
    return result["images"][0]["sha256"]


def sdxl_info(info: dict) -> dict:
    return next(pipeline for pipeline in info["pipelines"] if "img2img" in pipeline["tasks"])


def adapters_left(family: SdxlFamily) -> list[str]:
    """Every trace a LoRA could leave in the shared models: peft configs and adapter layers."""
    traces = []
    for module in family.weight_modules():
        if getattr(module, "peft_config", None):
            traces.append(f"{type(module).__name__}.peft_config")
        traces += [name for name, _ in module.named_modules() if "lora_" in name]
    return traces


# --- one set of weights ------------------------------------------------------------------------------------------


def test_every_sdxl_pipeline_shares_one_copy_of_the_weights(
    run_job: Callable[..., dict], worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    family = worker.families["txt2img"]
    assert family.tasks == {"txt2img", "img2img", "controlnet_depth"}
    assert all(worker.families[task] is family for task in family.tasks)
    # The pipelines real jobs run on, one job per task.
    used = []
    pipeline_for = family.pipeline_for

    def recording(*args: object):
        used.append(pipeline_for(*args))
        return used[-1]

    monkeypatch.setattr(family, "pipeline_for", recording)
    for job in (
        FAST,
        {**FAST, "task": "img2img", "image": PHOTO},
        {**FAST, "task": "controlnet_depth", "image": PHOTO},
    ):
        assert "error" not in run_job(job)
    assert [type(pipeline).__name__ for pipeline in used] == [
        "StableDiffusionXLPipeline",
        "StableDiffusionXLImg2ImgPipeline",
        "StableDiffusionXLControlNetPipeline",
    ]
    base = family.base
    for pipeline in used:
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            shared, own = getattr(base, name), getattr(pipeline, name)
            assert own is shared, (type(pipeline).__name__, name)
            assert [p.data_ptr() for p in own.parameters()] == [p.data_ptr() for p in shared.parameters()]
        # A scheduler of its own: timesteps and step index never pass from one job to the next.
        assert pipeline.scheduler is not base.scheduler
    assert used[2].controlnet is family.controlnet
    assert len({id(pipeline.scheduler) for pipeline in used}) == 3


def test_controlnet_depth_is_served_only_with_its_controlnet_and_depth_estimator(
    tiny_models_dir: Path, tmp_path: Path
) -> None:
    manifest = load_manifest()

    def served_with(*roles: str) -> frozenset[str]:
        models = tmp_path / "-".join(roles)
        for role in roles:
            folder = manifest.role(role).folder
            (models / folder).parent.mkdir(parents=True, exist_ok=True)
            (models / folder).symlink_to(tiny_models_dir / folder)
        return SdxlFamily.available_tasks(models, manifest)

    assert served_with("sdxl") == frozenset()
    assert served_with("sdxl", "sdxl_vae") == {"txt2img", "img2img"}
    assert served_with("sdxl", "sdxl_vae", "controlnet_depth") == {"txt2img", "img2img"}
    assert served_with("sdxl", "sdxl_vae", "depth_estimator") == {"txt2img", "img2img"}
    assert served_with("sdxl", "sdxl_vae", "controlnet_depth", "depth_estimator") == SdxlFamily.TASKS


# --- sizes -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height", "source", "expected"),
    [
        (None, None, None, (1024, 1024)),
        (512, None, None, (512, 1024)),
        (640, 384, (300, 300), (640, 384)),
        # The input's aspect ratio at about 1024² pixels, sides rounded to multiples of 8.
        (None, None, (300, 200), (1256, 840)),
        (None, None, (4000, 3000), (1184, 888)),
        (None, None, (64, 64), (1024, 1024)),
        # One side given: the other follows the input's aspect ratio.
        (768, None, (4000, 3000), (768, 576)),
        (None, 512, (300, 200), (768, 512)),
        # Extreme aspect ratios stop at SDXL's bounds; `cover` crops the rest.
        (None, None, (10000, 100), (2048, 104)),
        (2048, None, (1000, 10), (2048, 64)),
    ],
)
def test_output_size(
    width: int | None, height: int | None, source: tuple[int, int] | None, expected: tuple[int, int]
) -> None:
    image = Image.new("RGB", source) if source else None
    assert output_size(width, height, image, (1024, 1024), SDXL_SIZE) == expected


def test_cover_crops_the_overflow_evenly_and_never_stretches() -> None:
    # Red, green and blue bands 10, 20 and 10 pixels wide: covering a square keeps the green middle only.
    bands = np.zeros((20, 40, 3), np.uint8)
    bands[:, :10, 0] = bands[:, 10:30, 1] = bands[:, 30:, 2] = 255
    square = np.asarray(cover(Image.fromarray(bands), (20, 20)))
    assert (square == [0, 255, 0]).all()
    # Scaled to cover: a 40×20 image becomes 80×40, of which the middle 80×20 stays: the white band, no black
    # rows (Lanczos rings a little at the cut).
    band = np.zeros((20, 40, 3), np.uint8)
    band[5:15] = 255
    wide = np.asarray(cover(Image.fromarray(band), (80, 20)))
    assert wide.shape == (20, 80, 3) and wide.min() >= 200
    image = gradient(64, 64)
    assert cover(image, (64, 64)) is image


# --- img2img -----------------------------------------------------------------------------------------------------


def test_img2img_takes_its_size_from_the_image_and_is_deterministic(run_job: Callable[..., dict]) -> None:
    job = {**FAST, "task": "img2img", "image": PHOTO}
    del job["width"], job["height"]
    result = run_job(job)
    parameters = result["parameters"]
    # 96×64 at the tiny model's default of 256² pixels, in multiples of 8.
    assert (parameters["width"], parameters["height"]) == (312, 208)
    assert (result["images"][0]["width"], result["images"][0]["height"]) == (312, 208)
    assert parameters["strength"] == 0.6
    assert decoded(result["images"][0]).size == (312, 208)
    assert sha(run_job(job)) == sha(result)
    widened = run_job({**job, "width": 128})
    assert (widened["parameters"]["width"], widened["parameters"]["height"]) == (128, 88)


def test_img2img_follows_the_image_and_the_strength(run_job: Callable[..., dict]) -> None:
    job = {**FAST, "task": "img2img", "image": PHOTO, "strength": 0.5}
    as_data_uri = {**job, "image": "data:image/png;base64," + PHOTO}
    assert sha(run_job(as_data_uri)) == sha(run_job(job))
    other_image = {**job, "image": as_base64(gradient(64, 96))}
    stronger = {**job, "strength": 1.0}
    results = {sha(run_job(variant)) for variant in (job, other_image, stronger, {**FAST, "seed": 5})}
    assert len(results) == 4


def test_img2img_refuses_a_strength_that_leaves_no_step(run_job: Callable[..., dict]) -> None:
    result = run_job({**FAST, "task": "img2img", "image": PHOTO, "strength": 0.4})
    assert result["error_code"] == "INVALID_INPUT"
    assert result["error"].startswith("INVALID_INPUT: strength: 0.4 × num_inference_steps 2 leaves no step")


@pytest.mark.parametrize("task", ["img2img", "controlnet_depth"])
def test_a_bad_input_image_is_invalid_input(run_job: Callable[..., dict], task: str) -> None:
    result = run_job({**FAST, "task": task, "image": "bm90IGFuIGltYWdl"})
    assert result["error_code"] == "INVALID_INPUT"
    assert result["error"].startswith("INVALID_INPUT: image: ")


# --- ControlNet-depth --------------------------------------------------------------------------------------------


def test_controlnet_returns_the_estimated_depth_map_when_asked(run_job: Callable[..., dict]) -> None:
    job = {**FAST, "task": "controlnet_depth", "image": PHOTO, "num_images": 2}
    plain = run_job(job)
    assert "control_image" not in plain
    result = run_job({**job, "return_control_image": True})
    assert [image["sha256"] for image in result["images"]] == [image["sha256"] for image in plain["images"]]
    entry = result["control_image"]
    assert (entry["format"], entry["seed"], entry["width"], entry["height"]) == ("png", 5, 64, 64)
    assert decode_data_uri(entry["data"])[0] == "image/png"
    depth = decoded(entry)
    # 8-bit greyscale stretched over the whole range: the nearest point is white and the farthest black.
    assert depth.mode == "L" and depth.size == (64, 64)
    assert depth.getextrema() == (0, 255)
    defaults = result["parameters"]
    assert defaults["controlnet_conditioning_scale"] == 0.8
    assert (defaults["control_guidance_start"], defaults["control_guidance_end"]) == (0.0, 1.0)


def test_a_given_depth_map_is_used_as_given(run_job: Callable[..., dict]) -> None:
    depth_map = gradient(64, 64).convert("L")
    job = {**FAST, "task": "controlnet_depth", "control_image": as_base64(depth_map), "return_control_image": True}
    result = run_job(job)
    returned = decoded(result["control_image"])
    assert np.array_equal(np.asarray(returned.convert("L")), np.asarray(depth_map))
    # Covered to the output size as img2img's image is.
    wide = run_job({**job, "width": 128})["control_image"]
    assert (wide["width"], wide["height"]) == (128, 64)


def test_the_control_image_steers_the_result(run_job: Callable[..., dict]) -> None:
    job = {**FAST, "task": "controlnet_depth", "control_image": as_base64(gradient(64, 64))}
    other_map = {**job, "control_image": as_base64(gradient(64, 64).transpose(Image.Transpose.ROTATE_90))}
    late = {**job, "control_guidance_start": 0.5}
    results = [sha(run_job(variant)) for variant in (job, other_map, late)]
    assert len(set(results)) == 3
    # At scale 0 the ControlNet adds exact zeros: the txt2img image, bit for bit.
    assert sha(run_job({**job, "controlnet_conditioning_scale": 0.0})) == sha(run_job(FAST))


def test_depth_to_image_stretches_each_map_over_the_whole_range() -> None:
    depth = torch.tensor([[1.0, 2.0], [3.0, 5.0]])
    assert np.asarray(depth_to_image(depth)).tolist() == [[0, 64], [128, 255]]
    flat = depth_to_image(torch.full((3, 4), 7.0))
    assert flat.size == (4, 3) and flat.getextrema() == (128, 128)


def test_no_model_is_loaded_during_a_job(run_job: Callable[..., dict], monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded during a job")

    for target in (
        "transformers.AutoModelForDepthEstimation.from_pretrained",
        "transformers.AutoImageProcessor.from_pretrained",
        "diffusers.ControlNetModel.from_pretrained",
        "diffusers.AutoencoderKL.from_pretrained",
        "diffusers.StableDiffusionXLPipeline.from_pretrained",
    ):
        monkeypatch.setattr(target, refuse)
    for job in (
        {**FAST, "task": "controlnet_depth", "image": PHOTO},
        {**FAST, "task": "img2img", "image": PHOTO, "loras": [{"name": "sdxl-offset", "scale": 1.0}]},
    ):
        assert "error" not in run_job(job)


# --- LoRAs -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "job",
    [
        FAST,
        {**FAST, "task": "img2img", "image": PHOTO},
        {**FAST, "task": "controlnet_depth", "image": PHOTO},
    ],
    ids=["txt2img", "img2img", "controlnet_depth"],
)
def test_a_lora_changes_every_task_and_leaves_nothing_behind(run_job: Callable[..., dict], worker, job: dict) -> None:
    family = worker.families["txt2img"]
    before = sha(run_job(job))
    with_lora = run_job({**job, "loras": [{"name": "sdxl-offset", "scale": 1.0}]})
    assert sha(with_lora) != before
    assert with_lora["parameters"]["loras"] == [{"name": "sdxl-offset", "scale": 1.0}]
    assert adapters_left(family) == []
    assert sha(run_job(job)) == before


def test_two_loras_with_their_own_scales(run_job: Callable[..., dict]) -> None:
    def with_loras(*refs: tuple[str, float]) -> str:
        return sha(run_job({**FAST, "loras": [{"name": name, "scale": scale} for name, scale in refs]}))

    pair = with_loras(("sdxl-offset", 1.0), ("pixel-art-xl", -0.5))
    assert pair == with_loras(("sdxl-offset", 1.0), ("pixel-art-xl", -0.5))
    others = {
        with_loras(("sdxl-offset", 1.0)),
        with_loras(("sdxl-offset", 1.0), ("pixel-art-xl", 0.5)),
        with_loras(("sdxl-offset", 0.5), ("pixel-art-xl", -0.5)),
    }
    assert pair not in others and len(others) == 3


def test_lora_weights_load_as_the_file_holds_them(worker) -> None:
    """The manifest's SDXL LoRAs are in kohya's layout, whose names follow Stability's UNet (input_blocks.4.1 is
    down_blocks.1.attentions.0) and whose alpha scales the adapter rather than its weights."""
    family = worker.families["txt2img"]
    refs = [LoraRef(name="sdxl-offset", scale=1.0), LoraRef(name="pixel-art-xl", scale=0.5)]
    pipeline = family.pipeline_for("txt2img", "euler")
    with family.loras.applied(pipeline, refs):
        for adapter, ref in enumerate(refs):
            stored = load_file(family.loras.files[ref.name])
            for encoder, part, prefix in (("text_encoder", "te1", ""), ("text_encoder_2", "te2", "text_model.")):
                loaded = dict(getattr(pipeline, encoder).named_parameters())
                key = "encoder.layers.0.self_attn.k_proj"
                assert torch.equal(
                    loaded[f"{prefix}{key}.lora_A.job_{adapter}.weight"],
                    stored[f"lora_{part}_text_model_{key.replace('.', '_')}.lora_down.weight"],
                )
            unet = dict(pipeline.unet.named_parameters())
            key = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
            assert torch.equal(
                unet[f"{key}.lora_B.job_{adapter}.weight"],
                stored["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight"],
            )
            alpha = stored["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha"].item()
            rank = stored["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight"].shape[0]
            # set_adapters multiplies it by the job's scale.
            assert dict(pipeline.unet.named_modules())[key].scaling[f"job_{adapter}"] == alpha / rank * ref.scale
    assert adapters_left(family) == []


@pytest.fixture
def lora_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the LoRA files read from disk from now on, in order."""
    reads: list[str] = []
    load_file = loras_module.load_file

    def counting_load_file(path: Path) -> dict[str, torch.Tensor]:
        reads.append(Path(path).stem)
        return load_file(path)

    monkeypatch.setattr(loras_module, "load_file", counting_load_file)
    return reads


def test_a_cached_lora_is_not_read_again_and_stays_as_read(
    run_job: Callable[..., dict], worker, lora_reads: list[str]
) -> None:
    registry = worker.families["txt2img"].loras
    job = {**FAST, "loras": [{"name": "pixel-art-xl", "scale": 1.0}]}
    first = sha(run_job(job))
    assert len(lora_reads) <= 1
    read_so_far = len(lora_reads)
    assert sha(run_job(job)) == first
    assert len(lora_reads) == read_so_far
    # Loading adapters from the cache must not alter it: the next job loads them again.
    as_read = load_file(registry.files["pixel-art-xl"])
    cached = registry.state_dict("pixel-art-xl")
    assert cached.keys() == as_read.keys()
    assert all(torch.equal(cached[name], as_read[name]) for name in as_read)


def test_the_registry_lists_safetensors_only_and_evicts_the_least_recent(
    tiny_models_dir: Path, tmp_path: Path, lora_reads: list[str]
) -> None:
    folder = lora_dir(tmp_path, "sdxl")
    folder.mkdir(parents=True)
    source = lora_dir(tiny_models_dir, "sdxl") / "sdxl-offset.safetensors"
    for name in ("a", "b"):
        (folder / f"{name}.safetensors").write_bytes(source.read_bytes())
    # Pickle-based formats can run code when loaded: they are never listed, whatever their content.
    for name in ("c.ckpt", "d.bin", "e.pt", "f.pth", "g.safetensors.bin"):
        (folder / name).write_bytes(source.read_bytes())
    registry = LoraRegistry.scan(tmp_path, "sdxl", cache_size=1)
    assert registry.names == ["a", "b"]
    for name in ("a", "a", "b", "a"):
        registry.state_dict(name)
    assert lora_reads == ["a", "b", "a"]


def test_a_lora_file_that_is_not_safetensors_is_the_workers_fault(tmp_path: Path) -> None:
    """The file is on the worker's own disk: the request that names it is not to blame."""
    folder = lora_dir(tmp_path, "sdxl")
    folder.mkdir(parents=True)
    (folder / "broken.safetensors").write_bytes(b"\x80\x04K\x01.")
    registry = LoraRegistry.scan(tmp_path, "sdxl", cache_size=1)
    with pytest.raises(Internal, match="loras: 'broken' can't be read on this worker") as raised:
        registry.state_dict("broken")
    assert raised.value.to_response()["retryable"] is True


@pytest.mark.parametrize(
    "name", ["../x", "sdxl/../../x", "../sdxl/sdxl-offset", "sdxl-offset.safetensors", "/etc/passwd", "SDXL-OFFSET"]
)
def test_a_lora_name_is_looked_up_never_joined_into_a_path(run_job: Callable[..., dict], name: str) -> None:
    result = run_job({**FAST, "loras": [{"name": "sdxl-offset", "scale": 1.0}, {"name": name, "scale": 1.0}]})
    assert result["error_code"] == "UNKNOWN_LORA"
    assert result["error"] == f"UNKNOWN_LORA: loras: {name!r} not available for sdxl ({', '.join(LORA_NAMES)})"
    assert result["retryable"] is False


def test_info_lists_the_tasks_models_and_loras(run_job: Callable[..., dict]) -> None:
    info = run_job({"task": "info"})
    assert {"txt2img", "img2img", "controlnet_depth"} <= set(info["tasks"])
    sdxl = sdxl_info(info)
    assert sdxl["loras"] == LORA_NAMES
    manifest = load_manifest()
    roles = ["sdxl", "sdxl_vae", "controlnet_depth", "depth_estimator", "sdxl_refiner"]
    assert [model["role"] for model in sdxl["models"]] == roles
    for model in sdxl["models"]:
        assert model["revision"] == manifest.role(model["role"]).revision


# --- examples ----------------------------------------------------------------------------------------------------


def example_input(path: Path) -> dict:
    """An example's input with at most 2 steps and 5 frames: on tiny random models more only cost time."""
    job_input = json.loads(path.read_text())["input"]
    if "num_inference_steps" in job_input:
        job_input["num_inference_steps"] = min(job_input["num_inference_steps"], 2)
    if "num_frames" in job_input:
        job_input["num_frames"] = 5
    return job_input


def check_example_output(job_input: dict, output: dict) -> None:
    assert "error" not in output, output
    if job_input["task"] == "info":
        assert sdxl_info(output)["loras"] == LORA_NAMES
        return
    if job_input["task"] in VIDEO_TASKS:
        assert output["video"]["num_frames"] == job_input["num_frames"]
        return
    assert len(output["images"]) == job_input.get("num_images", 1)
    assert ("control_image" in output) == job_input.get("return_control_image", False)


def test_there_is_an_example_for_every_task() -> None:
    tasks = {json.loads(path.read_text())["input"]["task"] for path in EXAMPLES}
    assert tasks == set(TASKS)
    for path in EXAMPLES:
        parse_input(json.loads(path.read_text())["input"])


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.stem)
def test_every_example_runs_through_the_handler(run_job: Callable[..., dict], path: Path) -> None:
    job_input = example_input(path)
    check_example_output(job_input, run_job(job_input, job_id=path.stem))


@pytest.mark.slow
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.stem)
def test_every_example_runs_through_the_local_api_server(api_server: str, path: Path) -> None:
    job_input = example_input(path)
    answer = requests.post(f"{api_server}/runsync", json={"input": job_input}, timeout=120).json()
    assert answer["status"] == "COMPLETED", answer
    check_example_output(job_input, answer["output"])
