"""Encoding results: images in the requested format, WEBP thumbnails, and the checks that catch a failed decode."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from .errors import Internal
from .storage import Asset

IMAGE_MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
THUMBNAIL_QUALITY = 80


def encode_image(image: Image.Image, output_format: str, quality: int) -> Asset:
    """Encodes without metadata (no timestamps, no EXIF), so the same pixels always give the same bytes."""
    buffer = io.BytesIO()
    if output_format == "png":
        image.save(buffer, format="PNG", compress_level=6)
    elif output_format == "jpeg":
        image.convert("RGB").save(buffer, format="JPEG", quality=quality, optimize=True)
    else:
        image.save(buffer, format="WEBP", quality=quality, method=4)
    return Asset(data=buffer.getvalue(), ext=output_format, mime=IMAGE_MIME[output_format])


def encode_thumbnail(image: Image.Image, longest_side: int) -> Asset:
    thumbnail = image.copy()
    thumbnail.thumbnail((longest_side, longest_side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    thumbnail.save(buffer, format="WEBP", quality=THUMBNAIL_QUALITY, method=4)
    return Asset(data=buffer.getvalue(), ext="webp", mime="image/webp")


def check_not_blank(image: Image.Image, what: str) -> None:
    """A VAE that overflowed (NaN in half precision) decodes to a uniformly black frame: that is a failure."""
    pixels = np.asarray(image)
    if pixels.size == 0:
        raise Internal(f"{what} is empty")
    if not pixels.any():
        raise Internal(f"{what} is uniformly black: the decode failed (NaN or overflow in the VAE)")
