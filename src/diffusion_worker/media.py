"""Encoding results: images in the requested format, videos as streamable MP4, WEBP thumbnails, and the checks
that catch a failed decode."""

from __future__ import annotations

import io
import logging
import os
import struct
import subprocess
import tempfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import torch
from PIL import Image

from .errors import Internal
from .storage import CONTENT_TYPES, Asset

log = logging.getLogger(__name__)
THUMBNAIL_QUALITY = 80
# libwebp's effort, 0 (fastest) to 6; measured by bench/encoders.py at quality 90 against method 4, Pillow's default.
# Method 0: 0.35× the time for 1.10× the bytes on 1024² photos, 0.65× for 1.01× on noise. Method 2 is as small as 4
# on photos at 0.42× the time, but 1.9× larger on noise, the texture of fine detail: a risk 0 does not take.
WEBP_METHOD = 0
# A 256 px thumbnail by method 0: 0.55× the time, a few hundred bytes more.
THUMBNAIL_WEBP_METHOD = 0
# Pillow's JPEG `optimize` (a second pass for optimal Huffman tables): 2.8× the time for 1 % fewer bytes on photos.
JPEG_OPTIMIZE = False
# A thumbnail is first shrunk by the whole factor (a box average: 0.5 ms from 1024² to 256²), then by LANCZOS for what
# is left, if anything: 0.15× the time of reducing by 2 first (3.2 ms), which ran beside the image's own encoding and
# slowed it on a 2-core machine (one-image WEBP jobs to S3: 61-69 ms of the worker's own time against 49-52). Its
# picture is softer, by less than a level in 255 beside what the WEBP encoding of the thumbnail loses anyway.
THUMBNAIL_REDUCING_GAP = 1.0
# PNG's colour types for the 8-bit modes the worker produces.
PNG_COLOUR_TYPES = {"L": 0, "LA": 4, "RGB": 2, "RGBA": 6}
# A PNG's rows are filtered and deflated in this many bands side by side, as pigz does for gzip. A fixed number, not
# the machine's core count, so that the same pixels give the same bytes on every machine.
PNG_BANDS = 8
# Filter type 3 (Average) on every row: on photos 3 % more bytes than Pillow's per-row choice of filter, at a small
# part of its cost; `Up` would be cheaper still but 7.6 % larger.
PNG_FILTER_AVERAGE = 3
# PNG bands, for every job: zlib and numpy release the GIL, so the bands really run side by side, and beside the
# thread that waits for them.
_pool = ThreadPoolExecutor(min(PNG_BANDS, os.cpu_count() or 1), thread_name_prefix="encode")
# x264's constant quality: 18 is close to visually lossless; the quality, not the bitrate, stays the same.
VIDEO_CRF = 18
# x264's output is deterministic for a given thread count, but its default count follows the machine's cores, so
# the same frames would give other bytes on another machine.
VIDEO_THREADS = 4
# An encode that has not finished by then is stuck, not slow: 81 frames at 832×480 take about 1 s on two cores.
VIDEO_TIMEOUT_S = 300


def encode_image(image: Image.Image, output_format: str, quality: int, png_level: int) -> Asset:
    """Encodes without metadata (no timestamps, no EXIF), so the same pixels always give the same bytes."""
    if output_format == "png":
        return Asset(data=encode_png(image, png_level), ext="png", mime=CONTENT_TYPES["png"])
    buffer = io.BytesIO()
    if output_format == "jpeg":
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        rgb.save(buffer, format="JPEG", quality=quality, optimize=JPEG_OPTIMIZE)
    else:
        image.save(buffer, format="WEBP", quality=quality, method=WEBP_METHOD)
    return Asset(data=buffer.getvalue(), ext=output_format, mime=CONTENT_TYPES[output_format])


def encode_thumbnail(image: Image.Image, longest_side: int) -> Asset:
    """A WEBP whose longest side is `longest_side` at the most; a smaller picture is never enlarged."""
    scale = longest_side / max(image.size)
    if scale < 1:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=THUMBNAIL_REDUCING_GAP)
    buffer = io.BytesIO()
    image.save(buffer, format="WEBP", quality=THUMBNAIL_QUALITY, method=THUMBNAIL_WEBP_METHOD)
    return Asset(data=buffer.getvalue(), ext="webp", mime=CONTENT_TYPES["webp"])


def encode_png(image: Image.Image, level: int) -> bytes:
    """A PNG without metadata. Levels 0 (stored) and 1 are the worker's own encoder: bands of rows filtered and
    deflated side by side; levels 2 to 9 are Pillow's, one thread choosing a filter per row, a few percent smaller
    on photos at several times the cost (bench/encoders.py), as are modes other than 8-bit grey or RGB (± alpha).

    Level 1 deflates by run length only (zlib's Z_RLE): after the Average filter, on photos within 4 % of Pillow's
    default level 6. Each band is deflated on its own and all but the last end on a byte boundary (a sync flush), so
    their concatenation is the image's one zlib stream, as pigz does for gzip.
    """
    colour_type = PNG_COLOUR_TYPES.get(image.mode)
    if colour_type is None or level > 1:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=level)
        return buffer.getvalue()
    pixels = np.asarray(image)
    rows = pixels.reshape(image.height, -1)
    channels = len(image.getbands())
    band_height = -(-image.height // PNG_BANDS)
    starts = range(0, image.height, band_height)
    bands = list(
        _pool.map(lambda start: _png_band(rows, start, band_height, channels, level, start == starts[-1]), starts)
    )
    checksum = 1
    for filtered, _ in bands:
        checksum = zlib.adler32(filtered, checksum)
    # The zlib header: deflate with a 32 KiB window, no preset dictionary (0x78 0x01 is a multiple of 31).
    stream = [b"\x78\x01", *(deflated for _, deflated in bands), struct.pack(">I", checksum)]
    header = struct.pack(">IIBBBBB", image.width, image.height, 8, colour_type, 0, 0, 0)
    return b"".join(
        [
            b"\x89PNG\r\n\x1a\n",
            _png_chunk(b"IHDR", header),
            _png_chunk(b"IDAT", b"".join(stream)),
            _png_chunk(b"IEND", b""),
        ]
    )


def _png_band(
    rows: np.ndarray, start: int, height: int, channels: int, level: int, last: bool
) -> tuple[np.ndarray, bytes]:
    """Rows `start` to `start + height`, each led by its filter type byte, and their raw deflate stream."""
    band = rows[start : start + height]
    up = rows[start - 1 : start - 1 + len(band)] if start else np.vstack([np.zeros_like(band[:1]), band[:-1]])
    left = np.zeros_like(band)
    left[:, channels:] = band[:, :-channels]
    # floor((left + up) / 2) without widening to 16 bits.
    predicted = (left & up) + ((left ^ up) >> 1)
    filtered = np.empty((len(band), band.shape[1] + 1), dtype=np.uint8)
    filtered[:, 0] = PNG_FILTER_AVERAGE
    np.subtract(band, predicted, out=filtered[:, 1:])
    compressor = zlib.compressobj(level, zlib.DEFLATED, -15, 9, zlib.Z_RLE)
    deflated = compressor.compress(filtered) + compressor.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)
    return filtered, deflated


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def encode_video(frames: np.ndarray, fps: int, scratch_dir: Path) -> Asset:
    """Encodes uint8 RGB frames (frames, height, width, 3) as an H.264 MP4 that browsers play while it downloads.

    Through the ffmpeg binary the imageio-ffmpeg wheel ships, so no system ffmpeg is needed. The file goes through
    `scratch_dir` because `+faststart` moves the index (moov) before the data once the data is written, which needs
    a seekable file, not a pipe. The same frames give the same bytes: bit-exact colour conversion, a fixed thread
    count, and no metadata (no encoder version string, no creation time).
    """
    count, height, width, _ = frames.shape
    # A name of its own in the job's folder, which ffmpeg then overwrites (-y).
    descriptor, path = tempfile.mkstemp(suffix=".mp4", dir=scratch_dir)
    os.close(descriptor)
    # fmt: off
    command = [
        imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostats", "-loglevel", "error", "-y",
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-framerate", str(fps), "-i", "pipe:0",
        # RGB to BT.709 limited-range 4:2:0, what browsers assume for video, tagged so that players need not guess.
        "-vf", "scale=out_color_matrix=bt709:out_range=tv:flags=bicubic+accurate_rnd+full_chroma_int+bitexact,"
               "format=yuv420p,setparams=color_primaries=bt709:color_trc=bt709:colorspace=bt709:range=tv",
        "-c:v", "libx264", "-preset", "medium", "-crf", str(VIDEO_CRF), "-threads", str(VIDEO_THREADS), "-an",
        "-movflags", "+faststart", "-fflags", "+bitexact", "-flags:v", "+bitexact", "-map_metadata", "-1",
        "-f", "mp4", path,
    ]
    # fmt: on
    completed = subprocess.run(
        command,
        # The frames' own memory, not a copy: 81 frames at 480p are 97 MB.
        input=memoryview(np.ascontiguousarray(frames)).cast("B"),
        capture_output=True,
        timeout=VIDEO_TIMEOUT_S,
        check=False,
    )
    if completed.returncode != 0:
        errors = completed.stderr[-2000:].decode(errors="replace")
        log.error("ffmpeg failed on %d frames of %dx%d: %s", count, width, height, errors)
        raise Internal("the video encoder failed; the worker log has the details")
    return Asset(data=Path(path).read_bytes(), ext="mp4", mime=CONTENT_TYPES["mp4"])


def check_not_blank(image: Image.Image | np.ndarray, what: str) -> None:
    """A VAE that overflowed (NaN in half precision) decodes to uniformly black pixels: that is a failure.

    For a video, all its frames together: a video may well fade in from black."""
    if isinstance(image, Image.Image):
        # Pillow finds the first lit pixel where it is; np.asarray would copy the whole image out first.
        size, lit = image.width * image.height, image.getbbox(alpha_only=False) is not None
    else:
        size, lit = image.size, bool(image.any())
    if size == 0:
        raise Internal(f"{what} is empty")
    if not lit:
        raise Internal(f"{what} is uniformly black: the decode failed (NaN or overflow in the VAE)")


def to_pixels(decoded: torch.Tensor, what: str) -> np.ndarray:
    """A decoded video's floats in [0, 1], (F, 3, H, W), as uint8 frames channels last (`_checked_bytes`): what the
    encoder reads as raw video."""
    return _checked_bytes(decoded, what).movedim(-3, -1).contiguous().cpu().numpy()


def to_picture(decoded: torch.Tensor, what: str) -> Image.Image:
    """A decoded image's floats in [0, 1], (3, H, W), as an RGB picture (`_checked_bytes`). Its planes are
    interleaved by Pillow on the way in: a fifth of the time torch takes to turn uint8 channels last."""
    # A VAE's decode is contiguous already; Pillow reads each plane as one block of memory.
    planes = _checked_bytes(decoded, what).contiguous().cpu().numpy()
    height, width = planes.shape[1:]
    return Image.merge("RGB", [Image.frombuffer("L", (width, height), plane, "raw", "L", 0, 1) for plane in planes])


def _checked_bytes(decoded: torch.Tensor, what: str) -> torch.Tensor:
    """A decode's floats in [0, 1], channels first, as uint8, rounded as diffusers rounds its own PIL images (in
    float32, half to even), once they are checked: a NaN or an infinity anywhere means the decode failed (an
    overflow in half precision, a broken GPU) even where the rest looks fine. Checked before conversion: a NaN
    becomes a plausible 0. (A uniformly black result, the other sign of a failed decode, is refused by the runtime,
    for every output whatever made it.)

    Converted where the decode is, in place: on a GPU only the bytes cross to the host, a quarter of the floats, and
    a video has no float copy in host memory (81 frames at 480p are 390 MB of floats). A half-precision decode gets
    a float32 copy there, within the memory the decode has just freed."""
    # `float` keeps a float32 decode as it is: the pipeline's own tensor, which nothing else reads.
    scaled = decoded.float().mul_(255).round_()
    # Values in [0, 255] cannot sum to an infinity: one pass that finds any NaN or infinity, a fifth of `isfinite`'s.
    if not torch.isfinite(scaled.sum()):
        bad = 1 - torch.isfinite(scaled).float().mean().item()
        raise Internal(f"{what} has non-finite values in {bad:.0%} of its pixels: the decode failed")
    return scaled.to(torch.uint8)
