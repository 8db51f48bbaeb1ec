"""Real photos for the benchmarks: scikit-image's sample photos, which ship inside its wheel (the `bench` extra),
so nothing is downloaded at run time.

Each benchmark image is a 2×2 mosaic of four different photos, each fitted to a quarter of the size: no photo
repeats within a row, which would hand the PNG compressor matches a real picture does not have.
"""

from __future__ import annotations

from PIL import Image, ImageOps

# Colour photos whose files are in skimage/data/ of the wheel (others are fetched through pooch on first use).
PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "retina",
    "immunohistochemistry",
    "motorcycle",
)


def photos(size: int, count: int = 4) -> list[Image.Image]:
    """`count` different RGB mosaics of size×size."""
    from skimage import data

    quarter = (size // 2, size // 2)
    pictures = {name: getattr(data, name)() for name in PHOTOS if name != "motorcycle"}
    pictures["motorcycle"] = data.stereo_motorcycle()[0]
    tiles = [ImageOps.fit(Image.fromarray(pictures[name]).convert("RGB"), quarter) for name in PHOTOS]
    mosaics = []
    for index in range(count):
        mosaic = Image.new("RGB", (size, size))
        for corner in range(4):
            tile = tiles[(index * 2 + corner) % len(tiles)]
            mosaic.paste(tile, ((corner % 2) * quarter[0], (corner // 2) * quarter[1]))
        mosaics.append(mosaic)
    return mosaics
