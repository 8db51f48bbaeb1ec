"""Image encoding: the banded PNG writer decodes to the same pixels in every mode and at every level, the same pixels
give the same bytes, and the fast settings keep what they promise in size and picture."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from diffusion_worker.config import Settings
from diffusion_worker.errors import ConfigError, Internal
from diffusion_worker.media import (
    PNG_BANDS,
    check_not_blank,
    encode_image,
    encode_png,
    encode_thumbnail,
    to_picture,
    to_pixels,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from samples import photos


def decoded(data: bytes) -> Image.Image:
    Image.open(io.BytesIO(data)).verify()  # every chunk's CRC
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@settings(max_examples=40, deadline=None)
@given(
    mode=st.sampled_from(["L", "LA", "RGB", "RGBA"]),
    width=st.integers(1, 40),
    height=st.integers(1, 3 * PNG_BANDS),
    level=st.integers(0, 9),
    seed=st.integers(0, 2**16),
)
def test_a_png_decodes_to_the_same_pixels(mode: str, width: int, height: int, level: int, seed: int) -> None:
    channels = len(mode)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    image = Image.frombytes(mode, (width, height), pixels.tobytes())
    back = decoded(encode_png(image, level))
    assert (back.mode, back.size) == (mode, (width, height))
    assert back.tobytes() == image.tobytes()


def test_modes_without_a_banded_writer_go_through_pillow() -> None:
    image = Image.new("P", (9, 7), 3)
    # Pillow keeps only the palette entries in use, so the picture compares, not the indices.
    assert decoded(encode_png(image, 1)).convert("RGB").tobytes() == image.convert("RGB").tobytes()


def test_the_same_pixels_give_the_same_bytes() -> None:
    [photo] = photos(128, 1)
    first = encode_image(photo, "png", 90, 1).data
    assert encode_image(photo.copy(), "png", 90, 1).data == first
    assert encode_image(photo, "webp", 90, 1).data == encode_image(photo.copy(), "webp", 90, 1).data
    assert encode_image(photo, "jpeg", 90, 1).data == encode_image(photo.copy(), "jpeg", 90, 1).data


def test_on_photos_level_1_is_about_as_small_as_pillows_default() -> None:
    """The size side of the default's trade-off (bench/encoders.py has the time side): Pillow's level 6 picks a
    filter per row; one Average filter and run-length deflate stay within a few percent of it."""
    for photo in photos(512, 2):
        pillow = io.BytesIO()
        photo.save(pillow, format="PNG")
        assert len(encode_png(photo, 1)) < 1.05 * pillow.tell()
        assert len(encode_png(photo, 1)) < 0.7 * len(encode_png(photo, 0))


def test_a_thumbnail_keeps_the_aspect_and_matches_lanczos_from_full_size() -> None:
    [photo] = photos(512, 1)
    wide = photo.crop((0, 0, 512, 320))
    thumbnail = decoded(encode_thumbnail(wide, 128).data)
    assert thumbnail.size == (128, 80)
    reference = wide.resize((128, 80), Image.Resampling.LANCZOS)

    def error(image: Image.Image) -> float:
        return float(np.abs(np.asarray(image, dtype=int) - np.asarray(reference, dtype=int)).mean())

    # Against LANCZOS from full size encoded alike, what the box reduction adds (0.7 levels in 255 here) is small
    # beside what the encoding itself loses (5 levels).
    assert error(thumbnail) < error(decoded(encode_thumbnail(reference, 128).data)) + 1.0


def test_a_small_picture_is_never_enlarged_into_its_thumbnail() -> None:
    assert decoded(encode_thumbnail(Image.new("RGB", (40, 20), "red"), 256).data).size == (40, 20)


@pytest.mark.parametrize("value", ["-1", "10", "fast"])
def test_png_compress_level_outside_0_to_9_stops_the_worker(value: str) -> None:
    with pytest.raises(ConfigError, match="PNG_COMPRESS_LEVEL"):
        Settings.from_env({"PNG_COMPRESS_LEVEL": value})
    assert Settings.from_env({"PNG_COMPRESS_LEVEL": "6"}).png_compress_level == 6


def diffusers_rounding(decoded: torch.Tensor) -> np.ndarray:
    """What diffusers does to make PIL images: float32 on the host, channels last, `(x * 255).round()` by numpy."""
    return (decoded.float().movedim(-3, -1).numpy() * 255).round().astype(np.uint8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 17, 23), (5, 3, 8, 12)], ids=["image", "video"])
def test_decoded_floats_become_the_pixels_diffusers_makes(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    generator = torch.Generator().manual_seed(3)
    decoded = torch.rand(shape, generator=generator).to(dtype)
    # The rounding's ties too, k + ½ once scaled, as near as the dtype comes to them.
    ties = ((torch.arange(255) + 0.5) / 255).to(dtype)
    decoded.view(-1)[: ties.numel()] = ties
    expected = diffusers_rounding(decoded)
    if len(shape) == 3:
        picture = to_picture(decoded.clone(), "image 0")
        assert picture.mode == "RGB" and picture.size == (shape[2], shape[1])
        # The same from a decode laid out channels last.
        channels_last = decoded.movedim(0, -1).contiguous().movedim(-1, 0)
        assert to_picture(channels_last, "image 0").tobytes() == picture.tobytes()
        pixels = np.asarray(picture)
    else:
        pixels = to_pixels(decoded.clone(), "video 0")
        assert pixels.flags.c_contiguous
    assert pixels.dtype == np.uint8
    assert np.array_equal(pixels, expected)


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), float("-inf")])
def test_a_single_non_finite_value_fails_the_decode(poison: float) -> None:
    decoded = torch.full((3, 10, 10), 0.5)
    decoded[1, 4, 4] = poison
    with pytest.raises(Internal, match="video 0 has non-finite values in 0% of its pixels"):
        to_pixels(decoded, "video 0")
    with pytest.raises(Internal, match="image 0 has non-finite values in 0% of its pixels"):
        to_picture(decoded, "image 0")


@pytest.mark.parametrize("kind", ["picture", "frames"])
def test_one_lit_value_anywhere_is_not_blank(kind: str) -> None:
    """Black everywhere but the last channel of the last pixel: not blank; with that value 0 too, blank."""
    pixels = np.zeros((2, 9, 7, 3), dtype=np.uint8)
    pixels[-1, -1, -1, -1] = 1
    as_given = (lambda array: Image.fromarray(array[-1])) if kind == "picture" else (lambda array: array)
    check_not_blank(as_given(pixels), "it")
    pixels[-1, -1, -1, -1] = 0
    with pytest.raises(Internal, match="it is uniformly black"):
        check_not_blank(as_given(pixels), "it")
    with pytest.raises(Internal, match="it is empty"):
        check_not_blank(as_given(pixels[:, :0]), "it")
