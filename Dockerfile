# The production image: CUDA torch from the base image, the worker installed on top, and the pinned real
# weights baked in at build time, so a cold start reads local files and never the network.
#
#   docker build -t diffusion-worker .
#   docker build --build-arg MODEL_ROLES=sdxl,sdxl_vae,controlnet_depth,depth_estimator -t diffusion-worker:sdxl .
#
# MODEL_ROLES picks the manifest roles to bake (models/manifest.toml); the worker serves the tasks whose models
# are present. The default leaves out wan_i2v, a 14B model of about 65 GB.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ARG MODEL_ROLES=sdxl,sdxl_vae,controlnet_depth,depth_estimator,wan_t2v
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    MODELS_DIR=/models \
    MODEL_MANIFEST=/app/models/manifest.toml \
    HF_HOME=/tmp/hf-home

WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
# torch is already in the base image and satisfies the project's range, so pip keeps it.
RUN pip install .

COPY models/manifest.toml ./models/manifest.toml
COPY builder ./builder
RUN python builder/fetch_models.py --models-dir "$MODELS_DIR" --roles "$MODEL_ROLES" && rm -rf "$HF_HOME"

COPY handler.py test_input.json ./
# Weights are baked: any attempt to reach the hub at run time is a bug, so make it fail.
ENV HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
CMD ["python", "-u", "handler.py"]
