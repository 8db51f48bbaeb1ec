"""Input images: decoding from base64 and data URIs, and fetching from a real HTTPS server on loopback with a
certificate made here. Torch-free; every test that could connect runs under a guard that fails it, before any packet
is sent, if it tries an address other than 127.0.0.1 or ::1.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import io
import ipaddress
import logging
import socket
import ssl
import struct
import threading
import time
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from diffusion_worker import inputs
from diffusion_worker.config import Settings
from diffusion_worker.errors import InputFetchFailed, InvalidInput
from diffusion_worker.inputs import InputLimits, classify_address, load_image

LIMITS = InputLimits(max_bytes=1024 * 1024, max_pixels=4096 * 4096, timeout_s=2.0, allow_private_urls=True)
STRICT = InputLimits(max_bytes=1024 * 1024, max_pixels=4096 * 4096, timeout_s=2.0)
RED, BLUE = (255, 0, 0), (0, 0, 255)
LOOPBACK = {"127.0.0.1", "::1"}


def encoded(image: Image.Image, image_format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_bytes(size: tuple[int, int] = (8, 6), colour: tuple[int, int, int] = RED) -> bytes:
    return encoded(Image.new("RGB", size, colour), "PNG")


def rotated_exif() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return exif.tobytes()


def greyscale_png(width: int, height: int, rows: int = 0) -> bytes:
    """A PNG whose header claims width×height, with only `rows` rows of pixels (zeros) behind it: a valid
    decompression bomb when rows == height (megapixels of zeros compress to kilobytes), a tiny one otherwise."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor = zlib.compressobj(9)
    # Each row is a filter byte, then the pixels.
    idat = b"".join(compressor.compress(bytes(width + 1)) for _ in range(rows)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def refused(source: str, limits: InputLimits = LIMITS, field: str = "image") -> str:
    with pytest.raises(InvalidInput) as caught:
        load_image(source, field, limits)
    assert caught.value.code == "INVALID_INPUT" and caught.value.retryable is False
    assert caught.value.message.startswith(field)
    return caught.value.message


def close_to(pixel: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 24) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected, strict=True))


# --- inline data ------------------------------------------------------------------------------------------------


def test_limits_come_from_settings() -> None:
    settings = Settings(
        models_dir=Path("."),
        allow_private_urls=True,
        max_input_bytes=5000,
        max_input_pixels=7000,
        input_fetch_timeout_s=3.5,
    )
    assert InputLimits.from_settings(settings) == InputLimits(5000, 7000, 3.5, True)


@pytest.mark.parametrize("image_format", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
def test_accepted_formats_decode_to_rgb(image_format: str) -> None:
    image = load_image(b64(encoded(Image.new("RGB", (16, 12), RED), image_format)), "image", LIMITS)
    assert (image.mode, image.size) == ("RGB", (16, 12))
    assert close_to(image.getpixel((8, 6)), RED)


@pytest.mark.parametrize(
    "prefix",
    ["data:image/png;base64,", "DATA:Image/PNG;BASE64,", "data:image/jpeg;base64,", "data:image/x;q=1;base64,"],
)
def test_data_uris_whatever_image_type_they_declare(prefix: str) -> None:
    image = load_image(prefix + b64(png_bytes()), "image", LIMITS)
    assert (image.mode, image.size, image.getpixel((0, 0))) == ("RGB", (8, 6), RED)


@pytest.mark.parametrize(
    "source",
    ["data:text/plain;base64,aGVsbG8=", "data:image/png,rawbytes", "data:;base64,aGVsbG8=", "data:image/png;base64"],
)
def test_data_uri_must_be_base64_image(source: str) -> None:
    assert "data:image/<type>;base64,<data>" in refused(source)


@given(
    pixels=st.binary(min_size=3 * 5 * 4, max_size=3 * 5 * 4),
    urlsafe=st.booleans(),
    unpadded=st.booleans(),
    wrap=st.sampled_from([0, 1, 4, 76]),
    surrounding=st.sampled_from(["", " ", "\n", "\r\n\t "]),
)
def test_base64_in_any_common_spelling(
    pixels: bytes, urlsafe: bool, unpadded: bool, wrap: int, surrounding: str
) -> None:
    original = Image.frombytes("RGB", (5, 4), pixels)
    text = (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(encoded(original, "PNG")).decode()
    if unpadded:
        text = text.rstrip("=")
    if wrap:
        text = "\n".join(text[i : i + wrap] for i in range(0, len(text), wrap))
    image = load_image(surrounding + text + surrounding, "image", LIMITS)
    assert image.tobytes() == original.tobytes()


@pytest.mark.parametrize("source", ["not base64!", "aGVsbG8", "a", "=abc", "ab=c", "é", "$$$$"])
def test_garbage_base64(source: str) -> None:
    message = refused(source)
    assert "base64" in message or "accepted format" in message


@pytest.mark.parametrize("data", [b"hello, world", b"", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"%PDF-1.4\n" + b"x" * 100])
def test_bytes_that_are_not_an_image(data: bytes) -> None:
    message = refused(b64(data), field="control_image")
    assert "accepted format" in message or "can't be decoded" in message


@pytest.mark.parametrize("image_format", ["PPM", "ICO", "TGA", "PCX"])
def test_formats_outside_the_accepted_few(image_format: str) -> None:
    assert "accepted format (PNG, JPEG, WEBP, GIF, BMP, TIFF)" in refused(
        b64(encoded(Image.new("RGB", (16, 16), RED), image_format))
    )


@pytest.mark.parametrize("image_format", ["PNG", "JPEG", "WEBP", "GIF"])
def test_truncated_image(image_format: str) -> None:
    whole = encoded(Image.effect_noise((64, 64), 40).convert("RGB"), image_format)
    assert refused(b64(whole[: len(whole) * 2 // 3])).startswith("image: can't be decoded (")


@pytest.mark.parametrize(
    ("mode", "colour", "expected"),
    [
        ("RGBA", (255, 0, 0, 255), RED),
        ("RGBA", (255, 0, 0, 0), (255, 255, 255)),
        ("LA", (0, 0), (255, 255, 255)),
        ("LA", (60, 255), (60, 60, 60)),
        ("L", 60, (60, 60, 60)),
        ("1", 1, (255, 255, 255)),
        ("I;16", 65535, (255, 255, 255)),
        ("I;16", 32896, (128, 128, 128)),
    ],
)
def test_modes_become_rgb(mode: str, colour: int | tuple[int, ...], expected: tuple[int, int, int]) -> None:
    image = load_image(b64(encoded(Image.new(mode, (4, 4), colour), "PNG")), "image", LIMITS)
    assert (image.mode, image.getpixel((1, 1))) == ("RGB", expected)


def test_palette_with_a_transparent_index_becomes_white_there() -> None:
    palette = Image.new("P", (4, 2), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255])
    palette.putpixel((3, 1), 1)
    image = load_image(b64(encoded(palette, "PNG", transparency=0)), "image", LIMITS)
    assert (image.getpixel((0, 0)), image.getpixel((3, 1))) == ((255, 255, 255), BLUE)


def test_cmyk_jpeg_becomes_rgb() -> None:
    image = load_image(b64(encoded(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG")), "image", LIMITS)
    assert image.mode == "RGB" and close_to(image.getpixel((4, 4)), RED)


def test_a_16_bit_depth_map_keeps_its_gradient() -> None:
    """Pillow's own conversion clips at 255: everything above 255/65535 would come out white."""
    depth = np.linspace(0, 65535, 256, dtype=np.uint16).reshape(1, 256).repeat(4, axis=0)
    image = load_image(b64(encoded(Image.fromarray(depth), "PNG")), "control_image", LIMITS)
    row = np.asarray(image)[0, :, 0]
    assert row[0] == 0 and row[-1] == 255 and np.all(np.diff(row.astype(int)) >= 0) and len(set(row)) > 200


def test_a_float_depth_map_is_stretched_over_its_range() -> None:
    depth = np.array([[0.5, 1.0], [1.5, 2.5]], dtype=np.float32)
    image = load_image(b64(encoded(Image.fromarray(depth), "TIFF")), "control_image", LIMITS)
    assert np.asarray(image)[:, :, 0].tolist() == [[0, 64], [128, 255]]


def test_exif_orientation_is_applied() -> None:
    """Orientation 6: the stored picture is turned a quarter clockwise to show, so its left half comes on top."""
    stored = Image.new("RGB", (40, 20), RED)
    stored.paste(BLUE, (20, 0, 40, 20))
    image = load_image(b64(encoded(stored, "JPEG", exif=rotated_exif(), quality=95)), "image", LIMITS)
    assert image.size == (20, 40)
    assert close_to(image.getpixel((10, 5)), RED) and close_to(image.getpixel((10, 35)), BLUE)


@pytest.mark.parametrize("image_format", ["GIF", "PNG", "WEBP", "TIFF", "MPO"])
def test_a_multi_frame_file_gives_its_first_frame(image_format: str) -> None:
    frames = [Image.new("RGB", (10, 10), colour) for colour in (RED, BLUE, (0, 255, 0))]
    data = encoded(frames[0], image_format, save_all=True, append_images=frames[1:])
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    image = load_image(b64(data), "image", LIMITS)
    assert image.size == (10, 10) and close_to(image.getpixel((5, 5)), RED)


def test_bomb_is_refused_from_its_header_before_any_pixel_is_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    bomb = greyscale_png(3000, 3000, rows=3000)
    assert len(bomb) < 32 * 1024
    loads: list[object] = []
    original_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self) or original_load(self))
    small = InputLimits(max_bytes=1024 * 1024, max_pixels=2000 * 2000, timeout_s=1.0)
    assert "3000×3000 is over the limit of 4000000 pixels" in refused(b64(bomb), small)
    assert loads == []
    # The same file is a valid image: only the limit stopped it.
    assert load_image(b64(bomb), "image", LIMITS).size == (3000, 3000)


BOMB_SIDE = 5000  # 25 megapixels: over the 4096² limit, under Pillow's own bomb levels


def bomb(image_format: str) -> bytes:
    """A small file of `image_format` whose header claims BOMB_SIDE × BOMB_SIDE pixels: what a decompression bomb
    shows before its pixels are decoded."""
    if image_format == "PNG":
        return greyscale_png(BOMB_SIDE, BOMB_SIDE)
    data = bytearray(encoded(Image.new("L" if image_format == "GIF" else "RGB", (8, 8)), image_format, lossless=True))
    side = struct.pack("<H", BOMB_SIDE)
    if image_format == "JPEG":
        # Start of frame: marker, length, precision, then height and width, big-endian.
        frame = data.index(b"\xff\xc0")
        data[frame + 5 : frame + 9] = struct.pack(">HH", BOMB_SIDE, BOMB_SIDE)
    elif image_format == "GIF":
        # The logical screen's width and height, then the first image descriptor's.
        data[6:10] = side * 2
        descriptor = data.index(b",", 13)
        data[descriptor + 5 : descriptor + 9] = side * 2
    elif image_format == "BMP":
        data[18:26] = struct.pack("<ii", BOMB_SIDE, BOMB_SIDE)
    elif image_format == "WEBP":
        # A lossless bitstream: a signature byte, then width - 1 and height - 1 in 14 bits each.
        bits = data.index(b"VP8L") + 9
        packed = struct.unpack("<I", data[bits : bits + 4])[0] & ~((1 << 28) - 1)
        data[bits : bits + 4] = struct.pack("<I", packed | (BOMB_SIDE - 1) | (BOMB_SIDE - 1) << 14)
    else:
        assert image_format == "TIFF"
        # The first directory's entries: tag, type, count, value; 256 and 257 are the width and the length.
        directory = struct.unpack("<I", data[4:8])[0]
        for entry in range(struct.unpack("<H", data[directory : directory + 2])[0]):
            at = directory + 2 + 12 * entry
            tag, kind = struct.unpack("<HH", data[at : at + 4])
            if tag in (256, 257):
                data[at + 8 : at + 12] = struct.pack("<H" if kind == 3 else "<I", BOMB_SIDE).ljust(4, b"\0")
    return bytes(data)


@pytest.mark.parametrize("image_format", inputs.ACCEPTED_FORMATS)
def test_a_bomb_in_every_accepted_format_is_refused_from_its_header(
    image_format: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = bomb(image_format)
    assert len(data) < 4096
    with Image.open(io.BytesIO(data)) as opened:
        assert (opened.format, opened.size) == (image_format, (BOMB_SIDE, BOMB_SIDE))
    loads: list[object] = []
    original_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self) or original_load(self))
    assert f"{BOMB_SIDE}×{BOMB_SIDE} is over the limit of {4096 * 4096} pixels" in refused(b64(data))
    assert loads == []


@pytest.mark.parametrize("fault", [MemoryError, AttributeError])
def test_a_fault_of_the_worker_while_decoding_is_not_blamed_on_the_input(
    fault: type[Exception], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only what the image's bytes cause is INVALID_INPUT: running out of memory, or a bug, propagates (INTERNAL)."""

    def failing(self: ImageFile.ImageFile) -> None:
        raise fault("the worker's fault")

    monkeypatch.setattr(ImageFile.ImageFile, "load", failing)
    with pytest.raises(fault):
        load_image(b64(png_bytes()), "image", LIMITS)


@pytest.mark.parametrize("side", [10_000, 100_000, 2**31 - 1])
def test_pillow_bomb_check_cannot_crash_or_bypass(side: int) -> None:
    """10,000² is over Pillow's warning level, the others over its error level; all tiny on disk."""
    bomb = greyscale_png(side, side)
    assert len(bomb) < 100
    for action in ("error", "ignore"):
        with warnings.catch_warnings():
            warnings.simplefilter(action)
            assert "over the limit" in refused(b64(bomb))


def test_byte_limit_on_inline_data_is_checked_before_decoding() -> None:
    small = InputLimits(max_bytes=1000, max_pixels=4096 * 4096, timeout_s=1.0)
    data = encoded(Image.effect_noise((40, 40), 50).convert("RGB"), "PNG")
    assert len(data) > 1000
    assert f"{len(data)} bytes of image data, over the limit of 1000 bytes" in refused(b64(data), small)
    assert "over the limit of 1000 bytes" in refused("data:image/png;base64," + "A" * 1400, small)
    assert load_image(b64(png_bytes()), "image", small).size == (8, 6)


@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=2000))
def test_any_bytes_give_an_image_or_invalid_input(data: bytes) -> None:
    try:
        image = load_image(b64(data), "image", LIMITS)
    except InvalidInput:
        return
    assert image.mode == "RGB"


SEEDS = {
    name: encoded(Image.effect_noise((24, 16), 60).convert(mode), name, **options)
    for name, mode, options in [
        ("PNG", "RGBA", {}),
        ("JPEG", "RGB", {"exif": rotated_exif()}),
        ("GIF", "P", {}),
        ("WEBP", "RGB", {}),
        ("BMP", "RGB", {}),
        ("TIFF", "RGB", {}),
    ]
}


# Pillow warns about some damage it works around; that is noise here.
@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.sampled_from(sorted(SEEDS)),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6),
    cut=st.integers(0, 10_000),
)
def test_damaged_images_give_an_image_or_invalid_input(seed: str, edits: list[tuple[int, int]], cut: int) -> None:
    """Whatever Pillow's parsers raise on hostile bytes must come out as INVALID_INPUT, never as a crash."""
    data = bytearray(SEEDS[seed])
    for position, value in edits:
        data[position % len(data)] = value
    try:
        image = load_image(b64(bytes(data[: max(1, len(data) - cut % len(data))])), "image", LIMITS)
    except InvalidInput:
        return
    assert image.mode == "RGB"


@given(text=st.text(max_size=200).filter(lambda text: ":" not in text))
def test_text_without_a_scheme_that_is_not_an_image_is_invalid_input(text: str) -> None:
    with pytest.raises(InvalidInput):
        load_image(text, "image", LIMITS)


# --- addresses --------------------------------------------------------------------------------------------------

NOT_PUBLIC = [
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.2.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "::1/128",
    "::/128",
    "fc00::/7",
    "fe80::/10",
    "ff00::/8",
    "2001:db8::/32",
    "::ffff:10.0.0.0/104",
    "::ffff:127.0.0.0/104",
    "64:ff9b::a00:0/104",
    "2002:a9fe::/32",
]
PUBLIC = ["1.1.1.0/24", "8.8.0.0/16", "93.184.216.0/24", "151.101.0.0/16", "2606:4700::/32", "2a00:1450::/32"]


def addresses_in(networks: list[str]) -> st.SearchStrategy[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    return st.sampled_from(networks).flatmap(lambda network: st.ip_addresses(network=network))


@given(address=addresses_in(NOT_PUBLIC))
def test_special_addresses_are_not_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    assert classify_address(address) in {"loopback", "link-local", "multicast", "private", "reserved"}


@given(address=addresses_in(PUBLIC))
def test_ordinary_addresses_are_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    assert classify_address(address) == "public"


@given(address=st.ip_addresses(v=4))
def test_ipv6_forms_carrying_an_ipv4_address_are_judged_by_it(address: ipaddress.IPv4Address) -> None:
    verdict = classify_address(address)
    value = int(address)
    assert classify_address(ipaddress.IPv6Address(0xFFFF << 32 | value)) == verdict  # ::ffff:a.b.c.d
    assert classify_address(ipaddress.IPv6Address(0x2002 << 112 | value << 80)) == verdict  # 6to4
    assert classify_address(ipaddress.IPv6Address(0x64FF9B << 96 | value)) == verdict  # NAT64
    # The deprecated IPv4-compatible form is never fetched.
    assert classify_address(ipaddress.IPv6Address(value)) != "public"


def test_kinds_are_named() -> None:
    kinds = {
        "127.0.0.1": "loopback",
        "::1": "loopback",
        "169.254.169.254": "link-local",
        "fe80::1": "link-local",
        "10.1.2.3": "private",
        "fd00::1": "private",
        "239.1.1.1": "multicast",
        "100.64.0.1": "reserved",
    }
    assert {address: classify_address(ipaddress.ip_address(address)) for address in kinds} == kinds


# --- fetching ---------------------------------------------------------------------------------------------------


@pytest.fixture
def connections(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Records every connection attempt and fails any to an address off this machine, before it is made."""
    attempts: list[object] = []
    real_connect = socket.socket.connect

    def connect(sock: socket.socket, address: object) -> None:
        attempts.append(address)
        assert isinstance(address, tuple) and address[0] in LOOPBACK, f"connection attempted to {address}"
        real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    return attempts


@dataclass
class Certificates:
    ca_pem: bytes
    cert_file: Path
    key_file: Path


def make_certificates(directory: Path, dns_names: list[str], ips: list[str]) -> Certificates:
    """A CA and a server certificate it signs, as a real deployment has: OpenSSL is stricter with self-signed leaves."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "diffusion-worker test CA")])

    def usage(signs_certificates: bool) -> x509.KeyUsage:
        return x509.KeyUsage(
            digital_signature=not signs_certificates,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=signs_certificates,
            crl_sign=signs_certificates,
            encipher_only=False,
            decipher_only=False,
        )

    def builder(subject: x509.Name, public_key: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        )

    ca = (
        builder(ca_name, ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage(signs_certificates=True), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    cert = (
        builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0])]), key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage(signs_certificates=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_file, key_file = directory / "server.pem", directory / "server.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return Certificates(ca.public_bytes(serialization.Encoding.PEM), cert_file, key_file)


IMAGE = png_bytes((12, 10), BLUE)
DRIP_INTERVAL_S = 0.05
DRIP_MAX = 60  # a dripping handler stops by itself after 3 s


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: pytest shows what matters."""

    def do_GET(self) -> None:
        self.server.requests.append((self.path, dict(self.headers)))
        path = self.path.split("?")[0]
        # The client gives up first in the tests that drip or oversize, as it should.
        with contextlib.suppress(OSError):
            self.route(path)

    def route(self, path: str) -> None:
        if path == "/image.png":
            self.reply(200, IMAGE)
        elif path == "/chunked.png":
            self.head(200, {"Transfer-Encoding": "chunked"})
            for start in range(0, len(IMAGE), 50):
                piece = IMAGE[start : start + 50]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        elif path == "/missing":
            self.reply(404, b"no such image")
        elif path == "/text":
            self.reply(200, b"this is not an image")
        elif path == "/declared-large":
            self.head(200, {"Content-Length": str(50 * 1024 * 1024)})
        elif path == "/undeclared-large":
            self.head(200, {})
            for _ in range(64):
                self.wfile.write(b"\0" * 64 * 1024)
        elif path == "/short":
            self.head(200, {"Content-Length": str(len(IMAGE) + 100)})
            self.wfile.write(IMAGE)
        elif path == "/drip-body":
            self.head(200, {"Content-Length": str(DRIP_MAX)})
            self.drip()
        elif path == "/drip-headers":
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")
            self.drip(b"X")
        elif path.startswith("/redirect/"):
            self.redirect(path.removeprefix("/redirect/"))
        else:
            self.reply(500, b"unknown route")

    def redirect(self, where: str) -> None:
        port = self.server.server_address[1]
        targets = {
            "image": "/image.png",
            "absolute": f"https://images.test:{port}/image.png?sig=1",
            "http": f"http://127.0.0.1:{port}/image.png",
            "private": "https://10.0.0.1/image.png",
            "loop": "/redirect/loop",
            "no-location": None,
        }
        if where.startswith("chain-"):
            hops = int(where.removeprefix("chain-"))
            location = f"/redirect/chain-{hops - 1}" if hops > 1 else "/image.png"
        else:
            location = targets[where]
        self.head(302, {"Location": location} if location else {})

    def head(self, status: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in {"Connection": "close", **headers}.items():
            self.send_header(name, value)
        self.end_headers()
        self.close_connection = True

    def reply(self, status: int, body: bytes) -> None:
        self.head(status, {"Content-Length": str(len(body))})
        self.wfile.write(body)

    def drip(self, byte: bytes = b"\0") -> None:
        for _ in range(DRIP_MAX):
            time.sleep(DRIP_INTERVAL_S)
            self.wfile.write(byte)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    # Don't wait for dripping handlers on close: they stop by themselves.
    block_on_close = False
    requests: list[tuple[str, dict[str, str]]]


@dataclass
class Local:
    port: int
    context: ssl.SSLContext
    requests: list[tuple[str, dict[str, str]]]
    resolved: list[str] = field(default_factory=list)

    def url(self, path: str, host: str = "images.test") -> str:
        return f"https://{host}:{self.port}{path}"

    def load(self, path: str, limits: InputLimits = LIMITS, host: str = "images.test") -> Image.Image:
        return load_image(self.url(path, host), "image", limits, ssl_context=self.context)

    def fails(self, path: str, limits: InputLimits = LIMITS, host: str = "images.test") -> str:
        with pytest.raises(InputFetchFailed) as caught:
            self.load(path, limits, host)
        assert caught.value.code == "INPUT_FETCH_FAILED" and caught.value.retryable is True
        assert caught.value.message.startswith("image")
        return caught.value.message


@pytest.fixture(scope="module")
def https_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, bytes]]:
    certificates = make_certificates(tmp_path_factory.mktemp("tls"), ["images.test", "v6first.test"], ["127.0.0.1"])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificates.cert_file, certificates.key_file)
    server = Server(("127.0.0.1", 0), Handler)
    server.requests = []
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server, certificates.ca_pem
    server.shutdown()
    server.server_close()


def fake_resolver(monkeypatch: pytest.MonkeyPatch, answers: dict[str, list[str]], resolved: list[str]) -> None:
    """Test hosts resolve to the given addresses (as numeric lookups: no DNS); anything else is a test bug."""
    real = socket.getaddrinfo

    def getaddrinfo(host: str, port: int, *args: object, **kwargs: object) -> list:
        resolved.append(host)
        if host in answers:
            return [info for ip in answers[host] for info in real(ip, port, *args, **kwargs)]
        ipaddress.ip_address(host)  # only literals may reach the real resolver
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.fixture
def local(https_server: tuple[Server, bytes], monkeypatch: pytest.MonkeyPatch, connections: list[object]) -> Local:
    server, ca_pem = https_server
    server.requests.clear()
    site = Local(server.server_address[1], ssl.create_default_context(cadata=ca_pem.decode()), server.requests)
    fake_resolver(
        monkeypatch,
        {"images.test": ["127.0.0.1"], "other.test": ["127.0.0.1"], "v6first.test": ["::1", "127.0.0.1"]},
        site.resolved,
    )
    return site


def test_fetch_an_image(local: Local, connections: list[object], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="diffusion_worker.inputs")
    image = local.load("/image.png?X-Amz-Signature=topsecret&a=b%20c")
    assert (image.mode, image.size, image.getpixel((0, 0))) == ("RGB", (12, 10), BLUE)
    # Resolved once, connected to the checked address, the query sent as it was.
    assert local.resolved == ["images.test"] and connections == [("127.0.0.1", local.port)]
    path, headers = local.requests[0]
    assert path == "/image.png?X-Amz-Signature=topsecret&a=b%20c"
    assert headers["Host"] == f"images.test:{local.port}" and headers["User-Agent"].startswith("diffusion-worker/")
    (record,) = [r for r in caplog.records if r.name == "diffusion_worker.inputs"]
    assert "images.test" in record.getMessage() and f"{len(IMAGE)} bytes" in record.getMessage()
    assert "topsecret" not in caplog.text and "image.png" not in caplog.text


def test_host_header_leaves_out_the_default_port() -> None:
    """As a browser sends it: a presigned S3 URL signs the Host header, and the signature has no :443 in it."""
    sent: list[bytes] = []
    for port, host in [(443, "images.test"), (8443, "images.test:8443")]:
        connection = inputs._Connection("images.test", port)
        connection.sock = type("Recorder", (), {"sendall": lambda self, data: sent.append(data)})()
        connection.request("GET", "/a.png")
        assert f"\r\nHost: {host}\r\n".encode() in sent.pop()


def test_fetch_a_chunked_body(local: Local) -> None:
    assert local.load("/chunked.png").size == (12, 10)


def test_a_path_with_spaces_and_unicode_is_percent_encoded(local: Local) -> None:
    assert local.load("/image.png?name=a b/é").size == (12, 10)
    assert local.requests[0][0] == "/image.png?name=a%20b/%C3%A9"


def test_next_address_is_tried_when_one_refuses(local: Local, connections: list[object]) -> None:
    assert local.load("/image.png", host="v6first.test").size == (12, 10)
    assert [address[0] for address in connections] == ["::1", "127.0.0.1"]


def test_http_error_status(local: Local) -> None:
    assert local.fails("/missing") == "image: images.test: HTTP 404"


def test_body_not_an_image(local: Local) -> None:
    assert "images.test: not an image in an accepted format" in local.fails("/text")


def test_body_over_the_byte_limit(local: Local) -> None:
    small = InputLimits(max_bytes=64 * 1024, max_pixels=4096 * 4096, timeout_s=2.0, allow_private_urls=True)
    assert f"{50 * 1024 * 1024} bytes, over the limit of 65536 bytes" in local.fails("/declared-large", small)
    assert "more than the limit of 65536 bytes" in local.fails("/undeclared-large", small)
    assert load_image(local.url("/image.png"), "image", small, local.context).size == (12, 10)


def test_body_cut_short(local: Local) -> None:
    assert f"ended after {len(IMAGE)} of {len(IMAGE) + 100} bytes" in local.fails("/short")


def test_pixel_limit_applies_to_fetched_images(local: Local) -> None:
    tiny = InputLimits(max_bytes=1024 * 1024, max_pixels=100, timeout_s=2.0, allow_private_urls=True)
    assert "12×10 is over the limit of 100 pixels" in local.fails("/image.png", tiny)


@pytest.mark.parametrize("path", ["/drip-body", "/drip-headers"])
def test_a_slow_drip_hits_the_deadline(local: Local, path: str) -> None:
    """Each byte comes well within a socket timeout; only one deadline over the whole fetch stops it."""
    quick = InputLimits(max_bytes=1024 * 1024, max_pixels=4096 * 4096, timeout_s=0.5, allow_private_urls=True)
    started = time.monotonic()
    assert "no complete answer within 0.5 s" in local.fails(path, quick)
    assert time.monotonic() - started < 2.0  # the drip alone lasts 3 s


def test_a_hanging_resolver_hits_the_deadline(local: Local, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: time.sleep(3))
    quick = InputLimits(max_bytes=1024, max_pixels=100, timeout_s=0.3, allow_private_urls=True)
    started = time.monotonic()
    assert "no complete answer within 0.3 s" in local.fails("/image.png", quick)
    assert time.monotonic() - started < 1.5


def test_unresolvable_host(local: Local, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> list:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    assert "can't resolve images.test" in local.fails("/image.png")


def test_connection_refused(local: Local) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    with pytest.raises(InputFetchFailed, match="refused"):
        load_image(f"https://127.0.0.1:{closed_port}/x.png", "image", LIMITS, local.context)


def test_certificate_is_verified_for_the_url_hostname(local: Local) -> None:
    """other.test resolves to the same server: the address is fine, the certificate doesn't name the host."""
    assert "certificate not trusted" in local.fails("/image.png", host="other.test")
    assert local.load("/image.png", host="127.0.0.1").size == (12, 10)


def test_production_trust_store_refuses_an_unknown_ca(local: Local) -> None:
    with pytest.raises(InputFetchFailed, match="certificate not trusted"):
        load_image(local.url("/image.png"), "image", LIMITS)


@pytest.mark.parametrize("route", ["image", "absolute", "chain-3"])
def test_redirects_are_followed_a_few_times(local: Local, route: str) -> None:
    assert local.load(f"/redirect/{route}").size == (12, 10)
    assert local.resolved == ["images.test"] * len(local.requests)


@pytest.mark.parametrize("route", ["loop", "chain-4"])
def test_too_many_redirects(local: Local, route: str) -> None:
    assert "more than 3 redirects from images.test" in local.fails(f"/redirect/{route}")
    assert len(local.requests) == 4


def test_a_redirect_without_location(local: Local) -> None:
    assert local.fails("/redirect/no-location") == "image: images.test: HTTP 302"


def test_a_redirect_to_http_is_refused(local: Local, connections: list[object]) -> None:
    with pytest.raises(InvalidInput, match=r"image \(redirected by images.test\): only https:// URLs are fetched"):
        local.load("/redirect/http")
    assert len(connections) == 1


def test_each_redirect_hop_is_checked(local: Local, connections: list[object], monkeypatch: pytest.MonkeyPatch) -> None:
    """The first hop passes as public here; the address it redirects to must still be refused, unconnected."""
    real = inputs.classify_address
    monkeypatch.setattr(
        inputs, "classify_address", lambda address: "public" if str(address) == "127.0.0.1" else real(address)
    )
    with pytest.raises(InvalidInput, match=r"10.0.0.1 is at 10.0.0.1, a private address; only public addresses"):
        local.load("/redirect/private", STRICT)
    assert connections == [("127.0.0.1", local.port)]


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("https://127.0.0.1/image.png", "loopback"),
        ("https://127.1.2.3:8443/", "loopback"),
        ("https://[::1]/image.png", "loopback"),
        ("https://10.0.0.1/image.png", "private"),
        ("https://192.168.1.1/", "private"),
        ("https://169.254.169.254/latest/meta-data/", "link-local"),
        ("https://[fe80::1]/", "link-local"),
        ("https://[::ffff:127.0.0.1]/", "loopback"),
        ("https://0.0.0.0/", "private"),
        ("https://224.0.0.1/", "multicast"),
        ("https://2130706433/", "loopback"),  # 127.0.0.1 as one number: judged by what it resolves to
    ],
)
def test_addresses_that_are_not_public_are_refused_unconnected(url: str, kind: str, connections: list[object]) -> None:
    with pytest.raises(InvalidInput) as caught:
        load_image(url, "control_image", STRICT)
    assert f"a {kind} address; only public addresses are fetched" in caught.value.message
    assert caught.value.message.startswith("control_image: ")
    assert connections == []


def test_every_resolved_address_must_be_public(
    local: Local, connections: list[object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One bad address among good ones is enough: any of them could be the one connected to."""
    fake_resolver(monkeypatch, {"mixed.test": ["93.184.216.34", "10.0.0.1"]}, [])
    with pytest.raises(InvalidInput, match=r"mixed\.test is at 10\.0\.0\.1, a private address"):
        load_image("https://mixed.test/image.png", "image", STRICT)
    assert connections == []


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1/image.png", "ftp://example.com/a.png", "file:///etc/passwd", "gopher://x", "HTTP://a.b/"],
)
def test_only_https(url: str, connections: list[object]) -> None:
    assert refused(url) == "image: must be an https:// URL, a data:image/...;base64, URI or bare base64"
    assert connections == []


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("https://", "the URL has no host"),
        ("https:///image.png", "the URL has no host"),
        ("https://[::1/", "not a valid URL"),
        ("https://example.com:99999/", "not a valid URL"),
        ("https://" + "a" * 70 + ".com/", "not a valid URL"),
    ],
)
def test_malformed_urls(url: str, message: str, connections: list[object]) -> None:
    assert refused(url, STRICT) == f"image: {message}"
    assert connections == []


def test_dns_rebinding_leads_nowhere_new(
    local: Local, connections: list[object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host whose DNS answer changes after the check (rebinding) is resolved once: the connection goes to the
    address checked, never to a later, private answer; and a private first answer is refused unconnected. Private
    addresses are refused throughout; 127.0.0.1 stands in for a public address."""
    real = inputs.classify_address
    monkeypatch.setattr(
        inputs, "classify_address", lambda address: "public" if str(address) == "127.0.0.1" else real(address)
    )
    real_getaddrinfo = socket.getaddrinfo

    def rebinding(answers: list[str]) -> None:
        queue = iter(answers)

        def getaddrinfo(host: str, port: int, *args: object, **kwargs: object) -> list:
            assert host == "images.test"
            return real_getaddrinfo(next(queue), port, *args, **kwargs)

        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)

    rebinding(["127.0.0.1", "10.0.0.1", "169.254.169.254"])
    assert local.load("/image.png", STRICT).size == (12, 10)
    assert connections == [("127.0.0.1", local.port)]
    rebinding(["169.254.169.254", "127.0.0.1"])
    with pytest.raises(InvalidInput, match=r"images\.test is at 169\.254\.169\.254, a link-local address"):
        local.load("/image.png", STRICT)
    assert connections == [("127.0.0.1", local.port)]
