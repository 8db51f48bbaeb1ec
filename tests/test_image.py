"""The Docker image, checked without a docker engine: its torch against every dependency's floor, its pinned
dependencies against the environment the tests pass in, its stages and copied paths, weights in layers of their own
ahead of the code, and the RunPod Hub files. (hadolint and the workflow lint run in scripts/test.sh.)"""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from diffusion_worker.manifest import load_manifest
from diffusion_worker.schema import parse_input

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "builder"))
import fetch_models  # noqa: E402
import lock  # noqa: E402

CONSTRAINTS = REPO / "requirements" / "constraints.txt"
MANIFEST = load_manifest()
# What a model folder is in the image: every role's, and the LoRAs'.
MODEL_FOLDERS = sorted({f"/models/{role.folder}" for role in MANIFEST.roles.values()} | {"/models/loras"})


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def copies(self) -> list[tuple[str | None, list[str], str]]:
        """(source stage or None for the build context, sources, destination) of each COPY."""
        found = []
        for keyword, arguments in self.instructions:
            if keyword == "COPY":
                words = arguments.split()
                source_stage = next((word.split("=", 1)[1] for word in words if word.startswith("--from=")), None)
                paths = [word for word in words if not word.startswith("--")]
                found.append((source_stage, paths[:-1], paths[-1]))
        return found


def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    """The global ARGs and the stages, each instruction on one line (continuations joined, comments dropped)."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        keyword, _, arguments = line.strip().partition(" ")
        if keyword == "FROM":
            base, _, name = arguments.partition(" AS ")
            stages.append(Stage(name.strip(), base.strip()))
        elif not stages and keyword == "ARG":
            key, _, value = arguments.partition("=")
            args[key] = value
        else:
            stages[-1].instructions.append((keyword, arguments))
    return args, stages


def stage(name: str) -> Stage:
    return next(stage for stage in dockerfile()[1] if stage.name == name)


def base_torch() -> Version:
    match = re.fullmatch(
        r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda[\d.]+-cudnn\d+-runtime@sha256:[0-9a-f]{64}",
        dockerfile()[0]["BASE_IMAGE"],
    )
    assert match, "the base is a pytorch/pytorch runtime tag pinned by digest"
    return Version(match[1])


# --- dependencies -----------------------------------------------------------------------------------------------


def test_constraints_pin_what_the_tests_run_on() -> None:
    pinned = dict(
        line.split("==") for line in CONSTRAINTS.read_text().splitlines() if line and not line.startswith("#")
    )
    assert pinned == lock.runtime_closure(), "requirements/constraints.txt is stale: run scripts/lock.sh"
    assert "torch" not in pinned


def test_the_base_images_torch_satisfies_every_dependencys_floor() -> None:
    torch = base_torch()
    # Declared under any extra too: transformers and diffusers name their torch floor (2.6) in their "torch" extra,
    # and transformers disables a torch below it at import.
    floors = {
        name: str(requirement.specifier)
        for name in [lock.PROJECT, *lock.runtime_closure()]
        for line in metadata.requires(name) or []
        if (requirement := Requirement(line)).name == "torch" and requirement.specifier
    }
    assert {"diffusion-worker", "transformers", "diffusers", "accelerate", "peft"} <= set(floors)
    for name, specifier in floors.items():
        assert torch in Requirement(f"torch{specifier}").specifier, f"{name} needs torch{specifier}, base has {torch}"
    # The same torch as the tests run on (CPU build), to the patch release.
    assert Version(metadata.version("torch")).release == torch.release


# --- stages and layers ------------------------------------------------------------------------------------------


def dockerignored(path: str) -> bool:
    ignored = False
    for pattern in (REPO / ".dockerignore").read_text().splitlines():
        if not pattern or pattern.startswith("#"):
            continue
        negated = pattern.startswith("!")
        pattern = pattern.removeprefix("!")
        parts = Path(path).parts
        if any(fnmatch.fnmatch("/".join(parts[: k + 1]), pattern) for k in range(len(parts))):
            ignored = not negated
    return ignored


def test_stages_and_every_copied_path_exist() -> None:
    _, stages = dockerfile()
    names = [stage.name for stage in stages]
    assert names == ["base", "weights", "worker"]
    assert stages[0].base == "${BASE_IMAGE}" and {stage.base for stage in stages[1:]} == {"base"}
    for current in stages:
        for source_stage, sources, _ in current.copies():
            if source_stage is None:
                for source in sources:
                    assert (REPO / source).exists(), f"{current.name}: COPY {source}: no such path"
                    assert not dockerignored(source), f"{current.name}: COPY {source}: excluded by .dockerignore"
            else:
                assert names.index(source_stage) < names.index(current.name)
                for source in sources:
                    assert source in MODEL_FOLDERS, f"{current.name}: COPY --from={source_stage} {source}"


def test_each_model_folder_is_a_layer_of_its_own_ahead_of_any_code() -> None:
    worker = stage("worker")
    kinds = [
        "weights" if keyword == "COPY" and "--from=weights" in arguments else keyword
        for keyword, arguments in worker.instructions
    ]
    weight_copies = [sources for source_stage, sources, _ in worker.copies() if source_stage == "weights"]
    copied = sorted(source for sources in weight_copies for source in sources)
    assert copied == MODEL_FOLDERS, "each manifest role's folder needs a COPY --from=weights of its own"
    assert all(len(sources) == 1 for sources in weight_copies)
    # Nothing that changes with the code or the dependencies comes before a weight layer.
    first_other = next(index for index, kind in enumerate(kinds) if kind != "weights")
    assert set(kinds[:first_other]) == {"weights"} and "weights" not in kinds[first_other:]
    # The weights stage creates every folder, baked or not, so each COPY --from has a source.
    runs = [arguments for keyword, arguments in stage("weights").instructions if keyword == "RUN"]
    (fetch,) = [arguments for arguments in runs if "fetch_models" in arguments]
    assert set(MODEL_FOLDERS) <= set(fetch.split()), "the weights stage's mkdir must name every role's folder"


def test_the_weights_stage_holds_everything_fetching_imports(tmp_path: Path) -> None:
    copied = [
        source for source_stage, sources, _ in stage("weights").copies() if source_stage is None for source in sources
    ]
    for source in copied:
        (tmp_path / source).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / source).write_bytes((REPO / source).read_bytes())
    # The stage's layout alone (builder/ and src/ from it first on the path): no torch, no diffusers needed.
    probe = (
        "import sys; sys.path[:0] = ['builder', 'src']; import fetch_models, diffusion_worker.manifest as m; "
        "assert m.__file__.startswith(sys.argv[1]), m.__file__; "
        "print(sorted({'torch', 'diffusers', 'transformers'} & set(sys.modules)))"
    )
    completed = subprocess.run(
        [sys.executable, "-c", probe, str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "[]"


def test_presets_name_manifest_roles_and_ci_builds_each() -> None:
    for roles in fetch_models.PRESETS.values():
        assert set(roles or ()) <= set(MANIFEST.roles)
    assert fetch_models.PRESETS["all"] is None
    workflow = yaml.safe_load((REPO / ".github" / "workflows" / "image.yml").read_text())
    matrix = workflow["jobs"]["build"]["strategy"]["matrix"]["preset"]
    assert '["image-only", "video-only", "all"]' in matrix
    assert workflow["env"]["DEFAULT_PRESET"] == "image-only"
    arguments = [arguments for keyword, arguments in stage("weights").instructions if keyword == "ARG"]
    assert "PRESET=image-only" in arguments


def test_ci_runs_the_readme_test_command() -> None:
    readme = (REPO / "README.md").read_text()
    assert "bash scripts/test.sh" in readme
    workflow = yaml.safe_load((REPO / ".github" / "workflows" / "tests.yml").read_text())
    steps = workflow["jobs"]["test"]["steps"]
    assert [step["run"] for step in steps if "run" in step] == ["bash scripts/test.sh"]
    assert (REPO / ".ci" / "run").read_text().rstrip().endswith("bash scripts/test.sh")


# --- RunPod Hub -------------------------------------------------------------------------------------------------


def test_hub_json_deploys_the_default_image_with_the_bucket_settings() -> None:
    hub = json.loads((REPO / ".runpod" / "hub.json").read_text())
    assert hub["type"] == "serverless" and hub["category"] in ("image", "video")
    assert hub["title"] and hub["description"]
    config = hub["config"]
    assert config["runsOn"] == "GPU" and config["gpuCount"] == 1
    # Pools of 24 GB and more: the image-only preset's largest job needs 17.9 GiB with every model resident
    # (python -m diffusion_worker.plan). No Blackwell pool: the base image's CUDA 12.6 torch has no kernels for it.
    pools = config["gpuIds"].split(",")
    assert pools and all(re.fullmatch(r"(AMPERE|ADA)_(24|48|80)(_PRO)?", pool) for pool in pools)
    # The image-only image: about 10 GB of weights and 8 GB of base image and libraries.
    assert config["containerDiskInGb"] >= 30
    keys = {entry["key"] for entry in config["env"]}
    assert {"BUCKET_NAME", "BUCKET_ENDPOINT_URL", "BUCKET_ACCESS_KEY_ID", "BUCKET_SECRET_ACCESS_KEY"} <= keys
    readme = (REPO / "README.md").read_text()
    for key in keys:
        assert f"`{key}`" in readme, f"{key} is not a documented setting"


def test_tests_json_holds_a_txt2img_and_an_info_job_the_worker_accepts() -> None:
    tests = json.loads((REPO / ".runpod" / "tests.json").read_text())
    tasks = [test["input"]["task"] for test in tests["tests"]]
    assert sorted(tasks) == ["info", "txt2img"]
    for test in tests["tests"]:
        assert test["name"] and test["timeout"] > 0
        parse_input(test["input"])
    assert tests["config"]["gpuCount"] == 1


@pytest.mark.parametrize("path", [".runpod/hub.json", ".runpod/tests.json"])
def test_hub_files_are_json(path: str) -> None:
    json.loads((REPO / path).read_text())
