"""Few-step presets (SDXL-Lightning, Hyper-SD as LoRA + scheduler settings) on the one set of SDXL weights, through
the real handler: their defaults and limits, their LoRA beside the request's own, and nothing left behind."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from test_sdxl_family import FAST, PHOTO, adapters_left, sha

from diffusion_worker.hygiene import weights_digest
from diffusion_worker.manifest import load_manifest
from diffusion_worker.presets import apply_preset
from diffusion_worker.schema import MAX_LORAS, parse_input

PRESETS = load_manifest().presets
NO_STEPS = {key: value for key, value in FAST.items() if key != "num_inference_steps"}


def test_the_manifest_declares_lightning_and_hyper_presets_with_pinned_loras() -> None:
    manifest = load_manifest()
    assert set(PRESETS) == {"lightning-4step", "lightning-8step", "hyper-8step"}
    for preset in PRESETS.values():
        lora = manifest.loras[preset.lora]
        assert lora.repo_id in ("ByteDance/SDXL-Lightning", "ByteDance/Hyper-SD")
        assert len(lora.revision) == 40 and int(lora.revision, 16) >= 0
        assert preset.scheduler_config == {"timestep_spacing": "trailing"}
        assert preset.guidance_scale == 0.0


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_each_preset_runs_at_its_steps_and_differs_from_the_base(run_job: Callable[..., dict], name: str) -> None:
    preset = PRESETS[name]
    result = run_job({**NO_STEPS, "preset": name})
    parameters = result["parameters"]
    assert (parameters["preset"], parameters["num_inference_steps"]) == (name, preset.steps[0])
    assert (parameters["guidance_scale"], parameters["scheduler"]) == (0.0, preset.scheduler)
    assert parameters["loras"] == []
    base = run_job({**FAST, "num_inference_steps": preset.steps[0], "guidance_scale": 0.0})
    assert sha(result) != sha(base)
    assert sha(run_job({**NO_STEPS, "preset": name})) == sha(result)


def test_a_preset_changes_only_its_jobs_scheduler(run_job: Callable[..., dict], worker, monkeypatch) -> None:
    family = worker.families["txt2img"]
    schedulers = []
    pipeline_for = family.pipeline_for

    def recording(*args: object):
        pipeline = pipeline_for(*args)
        schedulers.append(pipeline.scheduler)
        return pipeline

    monkeypatch.setattr(family, "pipeline_for", recording)
    run_job({**NO_STEPS, "preset": "lightning-4step"})
    run_job({**NO_STEPS, "preset": "hyper-8step"})
    run_job(FAST)
    assert [type(scheduler).__name__ for scheduler in schedulers] == [
        "EulerDiscreteScheduler",
        "DDIMScheduler",
        "EulerDiscreteScheduler",
    ]
    assert [scheduler.config.timestep_spacing for scheduler in schedulers] == ["trailing", "trailing", "leading"]
    # Trailing timesteps end at the noisiest training step, where a distilled LoRA expects to start.
    assert int(schedulers[0].timesteps[0]) == 999
    assert family.base.scheduler.config.timestep_spacing == "leading"


@pytest.mark.parametrize(
    "job",
    [{"task": "img2img", "image": PHOTO, "strength": 0.5}, {"task": "controlnet_depth", "image": PHOTO}],
    ids=["img2img", "controlnet_depth"],
)
def test_presets_serve_every_sdxl_task(run_job: Callable[..., dict], job: dict) -> None:
    with_preset = run_job({**NO_STEPS, **job, "preset": "lightning-4step"})
    assert with_preset["parameters"]["num_inference_steps"] == 4
    assert sha(with_preset) != sha(run_job({**FAST, **job, "num_inference_steps": 4, "guidance_scale": 0.0}))


def test_a_preset_combines_with_the_requests_own_lora(run_job: Callable[..., dict], worker) -> None:
    own = [{"name": "sdxl-offset", "scale": 0.8}]
    preset_only = sha(run_job({**NO_STEPS, "preset": "lightning-4step"}))
    lora_only = sha(
        run_job({**FAST, "num_inference_steps": 4, "guidance_scale": 0.0, "scheduler": "euler", "loras": own})
    )
    both = run_job({**NO_STEPS, "preset": "lightning-4step", "loras": own})
    assert both["parameters"]["loras"] == own
    assert len({preset_only, lora_only, sha(both)}) == 3
    assert sha(run_job({**NO_STEPS, "preset": "lightning-4step", "loras": own})) == sha(both)
    assert adapters_left(worker.families["txt2img"]) == []


def test_weights_are_bit_identical_after_preset_jobs(run_job: Callable[..., dict], worker) -> None:
    family = worker.families["txt2img"]
    before_weights = weights_digest(family.weight_modules())
    before_image = sha(run_job(FAST))
    for job in (
        {**NO_STEPS, "preset": "lightning-8step"},
        {**NO_STEPS, "preset": "hyper-8step", "loras": [{"name": "pixel-art-xl", "scale": -1.0}]},
        # Refused after resolution: nothing was loaded, nothing is left.
        {**NO_STEPS, "preset": "lightning-4step", "num_inference_steps": 3},
    ):
        run_job(job)
    assert adapters_left(family) == []
    assert weights_digest(family.weight_modules()) == before_weights
    assert sha(run_job(FAST)) == before_image


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (
            {"preset": "turbo"},
            "INVALID_INPUT: preset: 'turbo' is not a preset of this worker (hyper-8step, lightning-4step, "
            "lightning-8step)",
        ),
        (
            {"preset": "lightning-4step", "num_inference_steps": 8},
            "INVALID_INPUT: num_inference_steps: preset 'lightning-4step' runs at 4 steps only (got 8)",
        ),
        (
            {"preset": "hyper-8step", "guidance_scale": 5.0},
            "INVALID_INPUT: guidance_scale: preset 'hyper-8step' allows 0 to 2 (got 5)",
        ),
        (
            {"preset": "lightning-8step", "loras": [{"name": "sdxl-lightning-8step", "scale": 1.0}]},
            "INVALID_INPUT: loras: 'sdxl-lightning-8step' is applied by preset 'lightning-8step' already",
        ),
    ],
)
def test_a_request_outside_the_presets_limits_is_refused(
    run_job: Callable[..., dict], change: dict, error: str
) -> None:
    result = run_job({**NO_STEPS, **change})
    assert result["error"] == error
    assert result["retryable"] is False


def test_the_request_overrides_the_presets_defaults_within_its_limits() -> None:
    request = parse_input({"prompt": "x", "preset": "lightning-4step", "guidance_scale": 1.5, "scheduler": "dpmpp_2m"})
    resolved = apply_preset(request, PRESETS["lightning-4step"])
    assert (resolved.num_inference_steps, resolved.guidance_scale, resolved.scheduler) == (4, 1.5, "dpmpp_2m")
    # The preset's LoRA takes one of the MAX_LORAS adapter slots.
    loras = [{"name": f"l{index}", "scale": 1.0} for index in range(MAX_LORAS)]
    full = parse_input({"prompt": "x", "preset": "lightning-4step", "loras": loras})
    with pytest.raises(Exception, match=f"loras: at most {MAX_LORAS - 1} with preset 'lightning-4step'"):
        apply_preset(full, PRESETS["lightning-4step"])


def test_info_lists_the_presets(run_job: Callable[..., dict]) -> None:
    info = run_job({"task": "info"})
    (sdxl,) = (pipeline for pipeline in info["pipelines"] if "txt2img" in pipeline["tasks"])
    assert sorted(sdxl["presets"]) == sorted(PRESETS)
    assert sdxl["presets"]["lightning-4step"] == {
        "lora": "sdxl-lightning-4step",
        "scheduler": "euler",
        "scheduler_config": {"timestep_spacing": "trailing"},
        "steps": [4],
        "guidance_scale": 0.0,
        "max_guidance_scale": 2.0,
    }
