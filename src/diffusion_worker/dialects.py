"""Request dialects (REQUEST_DIALECT): how the worker reads a job's input and shapes its answer.

`native` is the job contract of docs/API.md. `worker-sdxl` reads the requests of RunPod's own SDXL worker
(runpod-workers/worker-sdxl) and answers in its shape, so that an endpoint built on it changes workers without
changing its clients. Its fields are mapped onto a native request, which then meets the native validation and
limits; the native response is mapped back. The runtime calls a dialect at the edges only, and this module imports
no torch.
"""

from __future__ import annotations

from typing import Any, Protocol

from .errors import InvalidInput

# worker-sdxl's scheduler names → ours.
WORKER_SDXL_SCHEDULERS = {
    "PNDM": "pndm",
    "KLMS": "lms",
    "DDIM": "ddim",
    "K_EULER": "euler",
    "K_EULER_ANCESTRAL": "euler_ancestral",
    "DPMSolverMultistep": "dpmpp_2m",
    # There is no single-step DPM-Solver here (its SDE form needs torchsde); the multistep solver of the same order
    # is the nearest: the same model evaluations per step, a slightly different update.
    "DPMSolverSinglestep": "dpmpp_2m",
}
# worker-sdxl's defaults, where ours differ, so that its clients get what they got.
WORKER_SDXL_DEFAULTS = {
    "scheduler": "DDIM",
    "num_inference_steps": 25,
    "refiner_inference_steps": 50,
    "guidance_scale": 7.5,
    "strength": 0.3,
}
# Fields that mean the same in both contracts.
WORKER_SDXL_SAME = ("prompt", "negative_prompt", "height", "width", "seed", "guidance_scale", "num_images")
WORKER_SDXL_FIELDS = (
    *WORKER_SDXL_SAME,
    "scheduler",
    "num_inference_steps",
    "refiner_inference_steps",
    "strength",
    "high_noise_frac",
    "image_url",
)


class Dialect(Protocol):
    def read(self, raw: object, has_refiner: bool) -> object:
        """A job's input as a native request, before the native validation."""

    def answer(self, response: dict[str, Any]) -> dict[str, Any]:
        """A native response or error in the dialect's shape."""


class Native:
    def read(self, raw: object, has_refiner: bool) -> object:
        return raw

    def answer(self, response: dict[str, Any]) -> dict[str, Any]:
        return response


class WorkerSdxl:
    """worker-sdxl's request and response. Where its client sends `image_url`, the image is refined (img2img on the
    refiner, or on the base where the worker has no refiner) at `strength` over `refiner_inference_steps`; else the
    base generates and, where the worker has a refiner, hands over to it at `high_noise_frac`, or at 1 − `strength`
    (the share of the noise worker-sdxl's refiner removes) when none is sent."""

    def read(self, raw: object, has_refiner: bool) -> object:
        if not isinstance(raw, dict):
            return raw
        unknown = sorted(set(raw) - set(WORKER_SDXL_FIELDS))
        if unknown:
            raise InvalidInput(
                "; ".join(f"{name}: unknown field, not part of worker-sdxl's request" for name in unknown)
            )
        # worker-sdxl's clients send null for "not set" (seed, negative_prompt, image_url, high_noise_frac).
        given = {**WORKER_SDXL_DEFAULTS, **{name: value for name, value in raw.items() if value is not None}}
        scheduler = given["scheduler"]
        if scheduler not in WORKER_SDXL_SCHEDULERS:
            names = ", ".join(WORKER_SDXL_SCHEDULERS)
            raise InvalidInput(f"scheduler: must be one of {names} (got {scheduler!r})")
        native = {name: given[name] for name in WORKER_SDXL_SAME if name in given}
        # Its response holds PNGs and no thumbnails.
        native |= {"scheduler": WORKER_SDXL_SCHEDULERS[scheduler], "output_format": "png", "thumbnail_size": 0}
        if "image_url" in given:
            return {
                **native,
                "task": "img2img",
                "image": given["image_url"],
                "strength": given["strength"],
                "num_inference_steps": given["refiner_inference_steps"],
                **({"refiner": True} if has_refiner else {}),
            }
        native |= {"task": "txt2img", "num_inference_steps": given["num_inference_steps"]}
        if not has_refiner:
            return native
        return {
            **native,
            "refiner": True,
            "high_noise_frac": given.get("high_noise_frac", _handoff_of(given["strength"])),
            "refiner_inference_steps": given["refiner_inference_steps"],
        }

    def answer(self, response: dict[str, Any]) -> dict[str, Any]:
        if "error" in response:
            return {name: response[name] for name in ("error", "refresh_worker") if name in response}
        # A link with a bucket, a data URI inline; a local results folder (OUTPUT_DIR) gives a path.
        images = [entry.get("url") or entry.get("data") or entry.get("path") for entry in response["images"]]
        return {"images": images, "image_url": images[0], "seed": response["seed"]}


def _handoff_of(strength: object) -> float:
    """The hand-off point worker-sdxl's `strength` implies: its refiner removes that share of the noise."""
    if isinstance(strength, bool) or not isinstance(strength, int | float):
        raise InvalidInput(f"strength: must be a number (got {strength!r})")
    if not 0 < strength <= 0.5:
        raise InvalidInput(
            f"strength: must be above 0 and at most 0.5 without `high_noise_frac`, as the refiner takes over at "
            f"1 − strength and high_noise_frac is from 0.5 to under 1 (got {strength})"
        )
    return round(1 - strength, 6)


DIALECTS: dict[str, Dialect] = {"native": Native(), "worker-sdxl": WorkerSdxl()}
