"""The size/time trade-off of each encoder setting the worker could use, on real photos and on tiny-model-like noise,
against Pillow's defaults on the same images in the same run: what the defaults in media.py were chosen from.

    python bench/encoders.py [--repeats 5] [--size 1024] [--groups png,thumbnail]

Times are medians per image; sizes are the total over the images, relative to the default's.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from collections.abc import Callable

import numpy as np
from PIL import Image
from samples import photos

from diffusion_worker.media import encode_png, encode_thumbnail

Encoder = Callable[[Image.Image], bytes]


def saved(**options: object) -> Encoder:
    def encode(image: Image.Image) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, **options)
        return buffer.getvalue()

    return encode


def thumbnail_by(shrink: Callable[[Image.Image], Image.Image]) -> Encoder:
    def encode(image: Image.Image) -> bytes:
        buffer = io.BytesIO()
        shrink(image).save(buffer, format="WEBP", quality=80, method=4)
        return buffer.getvalue()

    return encode


def copied_thumbnail(image: Image.Image) -> Image.Image:
    thumbnail = image.copy()
    thumbnail.thumbnail((256, 256), Image.Resampling.LANCZOS)
    return thumbnail


# Per group: the baseline (Pillow's default, or what the worker did before) first, then the candidates.
GROUPS: dict[str, dict[str, Encoder]] = {
    "png": {
        "level 6 (Pillow's default)": saved(format="PNG"),
        **{f"level {level}": saved(format="PNG", compress_level=level) for level in (0, 1, 2, 3, 9)},
        # zlib strategies (Z_FILTERED 1, Z_HUFFMAN_ONLY 2, Z_RLE 3): less searching for matches.
        **{
            f"level 1, strategy {name}": saved(format="PNG", compress_level=1, compress_type=strategy)
            for name, strategy in (("filtered", 1), ("huffman", 2), ("rle", 3))
        },
        # The worker's own: bands filtered and deflated side by side (media.encode_png).
        **{
            f"worker's banded, level {level}": lambda image, level=level: encode_png(image, level)
            for level in (1, 2, 6)
        },
    },
    "webp q90": {f"method {method}": saved(format="WEBP", quality=90, method=method) for method in (4, 0, 1, 2, 3, 6)},
    "jpeg q90": {
        "optimize off (Pillow's default)": saved(format="JPEG", quality=90),
        "optimize on": saved(format="JPEG", quality=90, optimize=True),
    },
    "thumbnail 256 webp": {
        "copy + thumbnail (LANCZOS, reducing_gap 2)": thumbnail_by(copied_thumbnail),
        "resize LANCZOS from full size": thumbnail_by(lambda image: image.resize((256, 256), Image.Resampling.LANCZOS)),
        "reduce 2 + LANCZOS": thumbnail_by(lambda image: image.reduce(2).resize((256, 256), Image.Resampling.LANCZOS)),
        "reduce 4 (box)": thumbnail_by(lambda image: image.reduce(4)),
        "reduce 2 + LANCZOS, webp method 0": lambda image: saved(format="WEBP", quality=80, method=0)(
            image.resize((256, 256), Image.Resampling.LANCZOS, reducing_gap=2.0)
        ),
        "the worker's (reduce 4 + LANCZOS, method 0)": lambda image: encode_thumbnail(image, 256).data,
    },
}


def measure(encode: Encoder, images: list[Image.Image], repeats: int) -> tuple[float, int]:
    times = []
    for _ in range(repeats):
        for image in images:
            began = time.perf_counter()
            encode(image)
            times.append(time.perf_counter() - began)
    return statistics.median(times), sum(len(encode(image)) for image in images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--groups", help="comma-separated, of png, webp, jpeg, thumbnail (default: all)")
    arguments = parser.parse_args()
    wanted = arguments.groups.split(",") if arguments.groups else None
    noise = np.random.default_rng(0).integers(0, 256, (4, arguments.size, arguments.size, 3), dtype=np.uint8)
    sources = {"photos": photos(arguments.size), "noise": [Image.fromarray(pixels) for pixels in noise]}
    print(f"{'encoder':<20} {'setting':<44} {'source':<7} {'ms':>7} {'× time':>7} {'× bytes':>8}")
    for group, encoders in GROUPS.items():
        if wanted and not any(word in group for word in wanted):
            continue
        for source, images in sources.items():
            baseline = None
            for setting, encode in encoders.items():
                seconds, size = measure(encode, images, arguments.repeats)
                baseline = baseline or (seconds, size)
                print(
                    f"{group:<20} {setting:<44} {source:<7} {seconds * 1000:>7.1f} "
                    f"{seconds / baseline[0]:>7.2f} {size / baseline[1]:>8.3f}"
                )


if __name__ == "__main__":
    main()
