"""Depth maps for the depth ControlNet, estimated by a transformers depth-estimation model (Depth Anything V2 Small
in the manifest), loaded once at start on the worker's device.

transformers' own model and image processor are used rather than controlnet-aux: the latter needs torchvision and
fetches its checkpoints from the hub, while this loads offline from the models folder like every other role.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from transformers import AutoImageProcessor


class DepthEstimator:
    def __init__(self, processor: AutoImageProcessor, model: torch.nn.Module) -> None:
        self.processor = processor
        self.model = model

    @classmethod
    def load(cls, folder: Path, model: torch.nn.Module) -> DepthEstimator:
        """The estimator of `model` (an AutoModelForDepthEstimation, loaded where the memory plan says) with the
        image processor saved beside it in `folder`."""
        return cls(AutoImageProcessor.from_pretrained(folder, local_files_only=True), model.eval())

    @torch.inference_mode()
    def estimate(self, image: Image.Image) -> Image.Image:
        """The depth map of `image`, at its size, as 8-bit greyscale: near white, far black.

        The model sees the image at its own input size (518 px for Depth Anything V2); its prediction is scaled
        back to the image's size bicubically, as the diffusers depth ControlNet examples do.
        """
        inputs = self.processor(images=image, return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.model.device, self.model.dtype)
        outputs = self.model(pixel_values=pixel_values)
        depth = self.processor.post_process_depth_estimation(outputs, target_sizes=[(image.height, image.width)])
        return depth_to_image(depth[0]["predicted_depth"])


def depth_to_image(depth: torch.Tensor) -> Image.Image:
    """Stretches a relative depth prediction from its minimum to its maximum over 0–255, per image.

    Depth Anything predicts relative inverse depth (larger is nearer), which is what the SDXL depth ControlNet was
    trained on, so no inversion. Only the relative values mean anything, hence the per-image stretch. A map
    without any depth difference carries no structure: it becomes mid-grey rather than a division by zero.
    """
    depth = depth.detach().float().cpu()
    low, high = depth.min(), depth.max()
    scaled = (depth - low) / (high - low) if high > low else torch.full_like(depth, 0.5)
    pixels = (scaled * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)  # 2-D uint8: mode L
