"""Encoding results: images in the requested format, videos as streamable MP4, WEBP thumbnails, and the checks
that catch a failed decode."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import tempfile
from pathlib import Path

import imageio_ffmpeg
import numpy as np
from PIL import Image

from .errors import Internal
from .storage import CONTENT_TYPES, Asset

log = logging.getLogger(__name__)
THUMBNAIL_QUALITY = 80
# x264's constant quality: 18 is close to visually lossless; the quality, not the bitrate, stays the same.
VIDEO_CRF = 18
# x264's output is deterministic for a given thread count, but its default count follows the machine's cores, so
# the same frames would give other bytes on another machine.
VIDEO_THREADS = 4
# An encode that has not finished by then is stuck, not slow: 81 frames at 832×480 take about 1 s on two cores.
VIDEO_TIMEOUT_S = 300


def encode_image(image: Image.Image, output_format: str, quality: int) -> Asset:
    """Encodes without metadata (no timestamps, no EXIF), so the same pixels always give the same bytes."""
    buffer = io.BytesIO()
    if output_format == "png":
        image.save(buffer, format="PNG", compress_level=6)
    elif output_format == "jpeg":
        image.convert("RGB").save(buffer, format="JPEG", quality=quality, optimize=True)
    else:
        image.save(buffer, format="WEBP", quality=quality, method=4)
    return Asset(data=buffer.getvalue(), ext=output_format, mime=CONTENT_TYPES[output_format])


def encode_thumbnail(image: Image.Image, longest_side: int) -> Asset:
    thumbnail = image.copy()
    thumbnail.thumbnail((longest_side, longest_side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    thumbnail.save(buffer, format="WEBP", quality=THUMBNAIL_QUALITY, method=4)
    return Asset(data=buffer.getvalue(), ext="webp", mime=CONTENT_TYPES["webp"])


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
    pixels = np.asarray(image)
    if pixels.size == 0:
        raise Internal(f"{what} is empty")
    if not pixels.any():
        raise Internal(f"{what} is uniformly black: the decode failed (NaN or overflow in the VAE)")
