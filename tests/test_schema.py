"""Every rule of the job contract, with the inputs that break it. Torch-free: these run in milliseconds."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from diffusion_worker.errors import InvalidInput
from diffusion_worker.schema import (
    MAX_SEED,
    SCHEDULER_NAMES,
    ControlNetDepth,
    Img2Img,
    Img2Video,
    Info,
    Txt2Img,
    Txt2Video,
    json_schema,
    parse_input,
)

REPO = Path(__file__).resolve().parents[1]
IMAGE = "aGVsbG8="
BASE = {
    "txt2img": {"prompt": "a cat"},
    "img2img": {"task": "img2img", "prompt": "a cat", "image": IMAGE},
    "controlnet_depth": {"task": "controlnet_depth", "prompt": "a cat", "control_image": IMAGE},
    "txt2video": {"task": "txt2video", "prompt": "a cat"},
    "img2video": {"task": "img2video", "prompt": "a cat", "image": IMAGE},
}
IMAGE_TASKS = ["txt2img", "img2img", "controlnet_depth"]
VIDEO_TASKS = ["txt2video", "img2video"]


def refused(raw: object) -> str:
    with pytest.raises(InvalidInput) as caught:
        parse_input(raw)
    assert caught.value.code == "INVALID_INPUT"
    assert caught.value.retryable is False
    return caught.value.message


def test_task_defaults_to_txt2img_and_fields_to_the_contract() -> None:
    request = parse_input({"prompt": "a cat"})
    assert isinstance(request, Txt2Img)
    assert request.model_dump() == {
        "task": "txt2img",
        "prompt": "a cat",
        "negative_prompt": "",
        "seed": None,
        "num_inference_steps": None,
        "guidance_scale": None,
        "width": None,
        "height": None,
        "loras": [],
        "thumbnail_size": 256,
        "timeout_s": None,
        "scheduler": None,
        "preset": None,
        "num_images": 1,
        "output_format": "png",
        "output_quality": 90,
        "refiner": False,
        "high_noise_frac": 0.8,
        "refiner_inference_steps": None,
    }


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        (BASE["img2img"], Img2Img),
        (BASE["controlnet_depth"], ControlNetDepth),
        (BASE["txt2video"], Txt2Video),
        (BASE["img2video"], Img2Video),
        ({"task": "info"}, Info),
    ],
)
def test_each_task_parses_to_its_own_type(raw: dict, kind: type) -> None:
    assert isinstance(parse_input(raw), kind)


def test_contract_defaults_of_task_specific_fields() -> None:
    assert parse_input(BASE["img2img"]).strength == 0.6
    depth = parse_input(BASE["controlnet_depth"])
    assert (depth.controlnet_conditioning_scale, depth.control_guidance_start, depth.control_guidance_end) == (
        0.8,
        0.0,
        1.0,
    )
    assert depth.return_control_image is False
    assert parse_input(BASE["txt2video"]).fps == 16


@pytest.mark.parametrize("raw", [None, [], "prompt", 3, ["a"]])
def test_input_that_is_not_an_object(raw: object) -> None:
    assert refused(raw).startswith("input: must be a JSON object")


@pytest.mark.parametrize(
    ("task", "change", "field", "rule"),
    [
        ("txt2img", {"task": "paint"}, "task", "must be one of"),
        ("txt2img", {"prompt": ""}, "prompt", "at least 1 character"),
        ("txt2img", {"prompt": "   "}, "prompt", "not only white space"),
        ("txt2img", {"prompt": "x" * 2001}, "prompt", "at most 2000"),
        ("txt2img", {"prompt": 5}, "prompt", "valid string"),
        ("txt2img", {"negative_prompt": "x" * 2001}, "negative_prompt", "at most 2000"),
        ("txt2img", {"seed": -1}, "seed", "greater than or equal to 0"),
        ("txt2img", {"seed": MAX_SEED + 1}, "seed", f"less than or equal to {MAX_SEED}"),
        ("txt2img", {"seed": "42"}, "seed", "valid integer"),
        ("txt2img", {"seed": True}, "seed", "valid integer"),
        ("txt2img", {"seed": 4.5}, "seed", "valid integer"),
        ("txt2img", {"num_inference_steps": 0}, "num_inference_steps", "greater than or equal to 1"),
        ("txt2img", {"num_inference_steps": 151}, "num_inference_steps", "less than or equal to 150"),
        ("txt2img", {"guidance_scale": -0.1}, "guidance_scale", "greater than or equal to 0"),
        ("txt2img", {"guidance_scale": 30.5}, "guidance_scale", "less than or equal to 30"),
        ("txt2img", {"width": 1001}, "width", "multiple of 8 from 64 to 2048"),
        ("txt2img", {"height": 56}, "height", "multiple of 8 from 64 to 2048"),
        ("txt2img", {"width": 2056}, "width", "multiple of 8 from 64 to 2048"),
        ("txt2img", {"scheduler": "karras"}, "scheduler", "'euler'"),
        ("txt2img", {"num_images": 0}, "num_images", "greater than or equal to 1"),
        ("txt2img", {"num_images": 9}, "num_images", "less than or equal to 8"),
        ("txt2img", {"loras": [{"name": "a"}] * 2}, "loras", "once"),
        ("txt2img", {"loras": [{"name": f"l{i}"} for i in range(5)]}, "loras", "at most 4"),
        ("txt2img", {"loras": [{"name": "a", "scale": 4.5}]}, "loras.0.scale", "less than or equal to 4"),
        ("txt2img", {"loras": [{"name": "a", "scale": -4.5}]}, "loras.0.scale", "greater than or equal to -4"),
        ("txt2img", {"loras": [{"name": ""}]}, "loras.0.name", "at least 1 character"),
        ("txt2img", {"loras": [{"name": "a", "weight": 1}]}, "loras.0.weight", "unknown field"),
        ("txt2img", {"loras": "a"}, "loras", "valid list"),
        ("txt2img", {"output_format": "gif"}, "output_format", "'png', 'jpeg' or 'webp'"),
        ("txt2img", {"output_quality": 0}, "output_quality", "greater than or equal to 1"),
        ("txt2img", {"output_quality": 101}, "output_quality", "less than or equal to 100"),
        ("txt2img", {"thumbnail_size": 16}, "thumbnail_size", "0 (no thumbnail) or from 32 to 1024"),
        ("txt2img", {"thumbnail_size": 2048}, "thumbnail_size", "0 (no thumbnail) or from 32 to 1024"),
        ("txt2img", {"strength": 0.5}, "strength", "unknown field"),
        ("txt2img", {"num_frames": 9}, "num_frames", "unknown field"),
        ("txt2img", {"promt": "typo"}, "promt", "unknown field"),
        ("img2img", {"image": None}, "image", "valid string"),
        ("img2img", {"image": ""}, "image", "at least 1 character"),
        ("img2img", {"strength": 0}, "strength", "greater than 0"),
        ("img2img", {"strength": 1.01}, "strength", "less than or equal to 1"),
        ("controlnet_depth", {"image": IMAGE}, "image", "exactly one of"),
        ("controlnet_depth", {"controlnet_conditioning_scale": 2.5}, "controlnet_conditioning_scale", "less than"),
        (
            "controlnet_depth",
            {"control_guidance_start": 0.6, "control_guidance_end": 0.4},
            "control_guidance_start",
            "less",
        ),
        ("controlnet_depth", {"return_control_image": "yes"}, "return_control_image", "valid boolean"),
        ("txt2video", {"width": 840}, "width", "multiple of 16 from 64 to 1280"),
        ("txt2video", {"height": 1296}, "height", "multiple of 16 from 64 to 1280"),
        ("txt2video", {"num_frames": 8}, "num_frames", "4k+1 from 5 to 161"),
        ("txt2video", {"num_frames": 1}, "num_frames", "4k+1 from 5 to 161"),
        ("txt2video", {"num_frames": 165}, "num_frames", "4k+1 from 5 to 161"),
        ("txt2video", {"fps": 0}, "fps", "greater than or equal to 1"),
        ("txt2video", {"fps": 61}, "fps", "less than or equal to 60"),
        ("txt2video", {"scheduler": "euler"}, "scheduler", "unknown field"),
        ("txt2video", {"num_images": 2}, "num_images", "unknown field"),
        ("txt2video", {"output_format": "png"}, "output_format", "unknown field"),
        ("txt2video", {"image": IMAGE}, "image", "unknown field"),
        ("img2video", {"image": 7}, "image", "valid string"),
    ],
)
def test_each_rule_names_its_field(task: str, change: dict, field: str, rule: str) -> None:
    message = refused({**BASE[task], **change})
    assert message.startswith(f"{field}: ") or message.startswith("task: "), message
    assert rule in message


def test_missing_required_fields_are_named() -> None:
    assert refused({"task": "img2img", "prompt": "x"}) == "image: required"
    assert refused({"task": "img2video", "prompt": "x"}) == "image: required"
    assert refused({}) == "prompt: required"
    assert "exactly one of" in refused({"task": "controlnet_depth", "prompt": "x"})


def test_info_takes_no_other_field() -> None:
    assert refused({"task": "info", "prompt": "x"}) == "prompt: unknown field, not part of the job contract"


def test_every_problem_is_reported_at_once() -> None:
    message = refused({"prompt": "", "num_images": 20, "extra": 1})
    assert "prompt:" in message and "num_images:" in message and "extra:" in message


@pytest.mark.parametrize("task", IMAGE_TASKS)
def test_image_tasks_accept_every_scheduler_name(task: str) -> None:
    for name in SCHEDULER_NAMES:
        assert parse_input({**BASE[task], "scheduler": name}).scheduler == name


@given(width=st.integers(min_value=0, max_value=3000), height=st.integers(min_value=0, max_value=3000))
def test_sdxl_sizes_accepted_exactly_when_the_rule_holds(width: int, height: int) -> None:
    def ok(value: int) -> bool:
        return 64 <= value <= 2048 and value % 8 == 0

    raw = {"prompt": "x", "width": width, "height": height}
    if ok(width) and ok(height):
        assert parse_input(raw).width == width
    else:
        refused(raw)


@given(frames=st.integers(min_value=-10, max_value=200), size=st.integers(min_value=0, max_value=1500))
def test_wan_frames_and_sizes_accepted_exactly_when_the_rule_holds(frames: int, size: int) -> None:
    raw = {"task": "txt2video", "prompt": "x", "num_frames": frames, "width": size}
    if 5 <= frames <= 161 and frames % 4 == 1 and 64 <= size <= 1280 and size % 16 == 0:
        assert parse_input(raw).num_frames == frames
    else:
        refused(raw)


@given(seed=st.integers(min_value=0, max_value=MAX_SEED))
def test_every_32_bit_seed_is_accepted(seed: int) -> None:
    assert parse_input({"prompt": "x", "seed": seed}).seed == seed


def test_json_schema_is_generated_from_the_models() -> None:
    schema = json_schema()
    text = json.dumps(schema)
    for task in ("txt2img", "img2img", "controlnet_depth", "txt2video", "img2video", "info"):
        assert f'"{task}"' in text
    assert "size_rule" not in text


def test_the_documented_contract_names_every_field_of_every_task() -> None:
    documented = (REPO / "docs" / "API.md").read_text()
    for model in (Txt2Img, Img2Img, ControlNetDepth, Txt2Video, Img2Video, Info):
        for name in model.model_fields:
            assert f"`{name}`" in documented, f"docs/API.md does not document {model.__name__}.{name}"


def test_the_readme_documents_every_setting() -> None:
    readme = (REPO / "README.md").read_text()
    variables = set(re.findall(r'reader\.\w+\(\s*"([A-Z_]+)"', (REPO / "src/diffusion_worker/config.py").read_text()))
    assert len(variables) > 20
    assert not {name for name in variables if f"`{name}`" not in readme}
