# syntax=docker/dockerfile:1
# The production image: CUDA torch from the base image, the dependencies at the versions the tests passed with, and
# the pinned real weights baked in, one layer per model role, ahead of all code: a code edit rebuilds and re-pushes
# the small layers after them, never the weights. A cold start reads local files and never the network.
#
#   docker build -t diffusion-worker .                                            # PRESET=image-only (SDXL family)
#   docker build --build-arg PRESET=video-only -t diffusion-worker:video-only .   # also: all; none (network volume)
#   docker build --build-arg MODEL_ROLES=sdxl,sdxl_vae,wan_t2v -t diffusion-worker:custom .
#
# Presets, roles, image sizes and GPU memory: README, "Deploy". EXTRA_LORAS names LoRAs to bake that are not baked by
# default (unpinned or non-commercial ones, such as causvid).

# torch 2.13.0, the version CI tests on CPU, built for CUDA 12.6 (drivers >= 560; sm_80 to sm_90: A100, RTX 4090,
# L40S, H100). The digest is the one two public build files record for this tag; check it with
# `docker buildx imagetools inspect pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime`, or pin another with
# --build-arg BASE_IMAGE=...@sha256:...
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime@sha256:6acf597eeb8e376a96580dde4952f37cc017fef732bb40bfc73f28f25e3f64b4

FROM ${BASE_IMAGE} AS base
# The base image's Python is marked externally managed (PEP 668); this image is the worker's alone.
ENV PIP_BREAK_SYSTEM_PACKAGES=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1
WORKDIR /app

# --- weights: only what fetching needs, so that nothing but the manifest and the builder invalidates a download ---
FROM base AS weights
ARG PRESET=image-only
ARG MODEL_ROLES=
ARG EXTRA_LORAS=
COPY requirements/constraints.txt requirements/
RUN pip install -c requirements/constraints.txt huggingface_hub
COPY models/manifest.toml models/
COPY src/diffusion_worker/__init__.py src/diffusion_worker/manifest.py src/diffusion_worker/sizes.py \
    src/diffusion_worker/
COPY builder/fetch_models.py builder/hub_files.py builder/
# Every role's folder exists, empty when not baked (no completion marker: the worker does not serve it), so that
# the worker stage copies each with a COPY of its own.
RUN HF_HOME=/tmp/hf-home PYTHONPATH=src python builder/fetch_models.py --models-dir /models \
        --preset "$PRESET" --roles "$MODEL_ROLES" --loras "$EXTRA_LORAS" \
    && rm -rf /tmp/hf-home \
    && mkdir -p /models/sdxl-base /models/sdxl-vae-fp16-fix /models/sdxl-refiner /models/controlnet-depth-sdxl \
        /models/depth-anything-v2-small /models/wan2.1-t2v-1.3b /models/wan2.1-i2v-14b-480p /models/loras

# --- the worker ---------------------------------------------------------------------------------------------------
FROM base AS worker
# One layer per role, first: dependency and code changes below leave them cached locally and in the registry.
COPY --from=weights /models/sdxl-base /models/sdxl-base
COPY --from=weights /models/sdxl-vae-fp16-fix /models/sdxl-vae-fp16-fix
COPY --from=weights /models/sdxl-refiner /models/sdxl-refiner
COPY --from=weights /models/controlnet-depth-sdxl /models/controlnet-depth-sdxl
COPY --from=weights /models/depth-anything-v2-small /models/depth-anything-v2-small
COPY --from=weights /models/wan2.1-t2v-1.3b /models/wan2.1-t2v-1.3b
# Links to the T2V role's files where the two WAN repos hold the same bytes (UMT5, tokenizer, VAE).
COPY --from=weights /models/wan2.1-i2v-14b-480p /models/wan2.1-i2v-14b-480p
COPY --from=weights /models/loras /models/loras

# The project's dependencies at the versions requirements/constraints.txt pins (scripts/lock.sh writes it from the
# environment the tests pass in); torch is never pinned there, so the base image's CUDA build stays.
COPY requirements/constraints.txt requirements/
COPY pyproject.toml ./
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
        > requirements/project.txt \
    && pip install -c requirements/constraints.txt -r requirements/project.txt

COPY README.md ./
COPY src ./src
# Importing what the handler imports fails the build, not the first cold start, when the environment is broken (a
# torch that transformers disables, a missing library); no weights are needed for it.
RUN pip install --no-deps . \
    && python -c "import runpod, diffusion_worker.runtime, diffusion_worker.fitness; \
from transformers.utils import is_torch_available; assert is_torch_available(), 'transformers cannot use this torch'"

COPY models/manifest.toml models/
COPY handler.py test_input.json ./
# Weights are baked (or on a network volume at MODELS_DIR): any attempt to reach the hub at run time is a bug, so
# it fails. DEVICE=cuda: a worker of this image without a usable GPU fails its fitness check at start.
# RUNPOD_LOG_LEVEL: the SDK's default, DEBUG, formats every job's output into the log.
ENV MODELS_DIR=/models \
    MODEL_MANIFEST=/app/models/manifest.toml \
    DEVICE=cuda \
    RUNPOD_LOG_LEVEL=INFO \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HOME=/tmp/hf-home
CMD ["python", "-u", "handler.py"]
