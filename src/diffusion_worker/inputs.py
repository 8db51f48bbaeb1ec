"""Input images of a job (`image`, `control_image`), decoded safely from base64, a data URI or an https URL.

Torch-free. Decoding:
- Pixels are counted from the header before any are decoded: Pillow's `open` reads only the header, so a
  decompression bomb is refused at the cost of a few bytes. Only ACCEPTED_FORMATS are tried; every other Pillow
  plugin would be attack surface that no user of this worker needs.
- An animated or multi-frame file (GIF, APNG, animated WebP, multi-page TIFF, or the MPO JPEGs many phone cameras
  write) gives its first frame: refusing them would refuse ordinary phone photos, and no task takes frames.
- EXIF orientation is applied, then the image becomes RGB: transparency over white, 16-bit greyscale (a depth map)
  scaled to 8 bits rather than clipped, 32-bit and float greyscale stretched from their minimum to their maximum.

Fetching, https only, with one deadline for resolving, connecting and every read, and a hard cap on the body:
- The host is resolved once; every address it resolves to must be public unless private ones are allowed (local
  testing); the connection goes to a checked address, so a DNS answer that changes in between leads nowhere new,
  while TLS still verifies the certificate for the URL's hostname.
- Redirects are followed MAX_REDIRECTS times at most, each hop checked as the first was.
- Logs and errors name the host, never the path or query, which may carry a signature.
"""

from __future__ import annotations

import base64
import http.client
import io
import ipaddress
import logging
import socket
import ssl
import struct
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from functools import cache
from typing import Any
from urllib.parse import quote, urljoin, urlsplit, urlunsplit

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from . import __version__
from .config import Settings
from .errors import InputFetchFailed, InvalidInput, WorkerError

log = logging.getLogger(__name__)

# JPEG covers MPO too: Pillow's JPEG opener hands multi-picture files to the MPO plugin itself.
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
# What Pillow's parsers raise on damaged files (tests/test_inputs.py fuzzes them): OSError for truncated or
# inconsistent data, SyntaxError for bad headers, ValueError, EOFError and struct.error for fields out of range.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)
MAX_REDIRECTS = 3
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
READ_CHUNK = 64 * 1024
USER_AGENT = f"diffusion-worker/{__version__}"
# What a URL may carry literally; anything else in a path or query (a space, non-ASCII) is percent-encoded as a
# browser would, and existing %XX escapes are left as they are.
URL_SAFE = "!#$%&'()*+,/:;=?@[]~"
URLSAFE_TO_STANDARD = str.maketrans("-_", "+/")
# IPv6 blocks that carry an IPv4 address in their last 32 bits; packets sent there can reach that IPv4 address.
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
WHITE = (255, 255, 255)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
AddrInfo = tuple[socket.AddressFamily, socket.SocketKind, int, str, tuple[Any, ...]]


@dataclass(frozen=True)
class InputLimits:
    max_bytes: int
    max_pixels: int
    timeout_s: float
    allow_private_urls: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> InputLimits:
        return cls(
            max_bytes=settings.max_input_bytes,
            max_pixels=settings.max_input_pixels,
            timeout_s=settings.input_fetch_timeout_s,
            allow_private_urls=settings.allow_private_urls,
        )


def load_image(source: str, field: str, limits: InputLimits, ssl_context: ssl.SSLContext | None = None) -> Image.Image:
    """Returns an RGB image with EXIF orientation applied. `field` (e.g. "image", "control_image") is named in
    every error.

    Inline data (bare base64 or a data URI) that is malformed, not an image, over max_pixels or over max_bytes:
    InvalidInput, since the input itself is bad. A URL that can't be fetched (DNS, refused, timeout, TLS, HTTP
    status >= 400, too many redirects, body over max_bytes) or whose body can't be decoded (not an image, over
    max_pixels): InputFetchFailed. A URL that is not https, or whose host resolves to an address that isn't public
    while allow_private_urls is False: InvalidInput, naming the rule. `ssl_context` is for tests that trust their
    own certificate; None is the system trust store.
    """
    text = source.strip()
    scheme, colon, rest = text.partition(":")
    # Base64 has no colon, so a colon means a URI.
    if not colon:
        return _decode(_decode_base64(text, field, limits.max_bytes), field, limits, InvalidInput)
    scheme = scheme.lower()
    if scheme == "data":
        return _decode(_decode_data_uri(rest, field, limits.max_bytes), field, limits, InvalidInput)
    if scheme == "https":
        host, body = _fetch(text, field, limits, ssl_context or _default_context())
        return _decode(body, f"{field}: {host}", limits, InputFetchFailed)
    raise InvalidInput(f"{field}: must be an https:// URL, a data:image/...;base64, URI or bare base64")


def echoed_url(url: str) -> str:
    """A URL as a response or result.json may repeat it: without userinfo (a password), query or fragment (a
    signature)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2], query="", fragment=""))


def classify_address(address: IPAddress) -> str:
    """Returns "public", or why a URL may not lead to the address: "loopback", "link-local", "multicast", "private" or
    "reserved" (IANA's special-purpose blocks: shared CGNAT space, documentation, benchmarking, ...).

    An IPv6 address that carries an IPv4 one (mapped, 6to4, NAT64) is judged by the IPv4 address it reaches.
    `is_global` alone won't do: it counts multicast and the deprecated IPv4-compatible block as global.
    """
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in NAT64:
            embedded = ipaddress.IPv4Address(address.packed[-4:])
        if embedded is not None:
            return classify_address(embedded)
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_multicast:
        return "multicast"
    if address.is_private:
        return "private"
    if not address.is_global or address in IPV4_COMPATIBLE:
        return "reserved"
    return "public"


def _decode_data_uri(rest: str, field: str, max_bytes: int) -> bytes:
    """`rest` follows "data:". The declared image type is not trusted: Pillow identifies the bytes themselves."""
    header, comma, payload = rest.partition(",")
    media_type, *parameters = (part.strip().lower() for part in header.split(";"))
    if not comma or not media_type.startswith("image/") or parameters[-1:] != ["base64"]:
        raise InvalidInput(f"{field}: a data URI must read data:image/<type>;base64,<data>")
    return _decode_base64(payload, field, max_bytes)


def _decode_base64(text: str, field: str, max_bytes: int) -> bytes:
    """Standard or URL-safe alphabet, padding optional, whitespace (MIME line breaks) ignored."""
    compact = "".join(text.split()).translate(URLSAFE_TO_STANDARD)
    padded = compact + "=" * (-len(compact) % 4)
    # The decoded size follows from the length: an oversized payload is refused before anything is decoded.
    size = len(padded) // 4 * 3 - padded[-2:].count("=")
    if size > max_bytes:
        raise InvalidInput(f"{field}: {size} bytes of image data, over the limit of {max_bytes} bytes")
    try:
        return base64.b64decode(padded, validate=True)
    except ValueError:
        raise InvalidInput(
            f"{field}: not valid base64; expected an https:// URL, a data:image/...;base64, URI or bare base64"
        ) from None


def _decode(data: bytes, label: str, limits: InputLimits, failure: type[WorkerError]) -> Image.Image:
    """The header's size is checked before `load()` decodes a single pixel; the first frame is the image."""
    try:
        with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as image:
            width, height = image.size
            if width * height > limits.max_pixels:
                raise failure(f"{label}: {width}×{height} is over the limit of {limits.max_pixels} pixels")
            image.load()
            return _to_rgb(ImageOps.exif_transpose(image))
    except WorkerError:
        raise
    # Pillow has a bomb check of its own, with a global limit: above it `open` raises an error, and a warning,
    # when warnings are errors. Either way the image is refused; neither can let one through that ours refuses.
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise failure(f"{label}: over the limit of {limits.max_pixels} pixels") from None
    except UnidentifiedImageError:
        raise failure(f"{label}: not an image in an accepted format ({', '.join(ACCEPTED_FORMATS)})") from None
    # What Pillow's parsers raise on bytes they can't make sense of: each means an image that can't be decoded. Any
    # other exception (MemoryError, a bug of ours or Pillow's) is the worker's fault and is not blamed on the input.
    except DECODE_ERRORS as error:
        raise failure(f"{label}: can't be decoded ({error or type(error).__name__})") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        image = _to_8bit(image)
    if image.has_transparency_data:
        # Colour under a transparent pixel is arbitrary, often black: white is what a viewer shows there.
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, WHITE)
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image if image.mode == "RGB" else image.convert("RGB")


def _to_8bit(image: Image.Image) -> Image.Image:
    """Pillow's own conversion clips these modes at 255, which turns a 16-bit depth map almost entirely white."""
    values = np.asarray(image, dtype=np.float32)
    if image.mode.startswith("I;16"):
        scaled = values / 257  # 0..65535 onto 0..255
    else:
        # 32-bit integers and floats have no fixed range: stretch what there is.
        values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) * (255 / (high - low)) if high > low else np.zeros_like(values)
    return Image.fromarray(np.rint(scaled).astype(np.uint8))


@dataclass(frozen=True)
class _Target:
    url: str
    host: str
    port: int
    # Path and query as the request line carries them.
    path: str


def _target(url: str, where: str) -> _Target:
    try:
        parts = urlsplit(url)
        port = parts.port
        host = parts.hostname or ""
        # Checked here so that resolving or sending can't fail on it later.
        host.encode("idna")
    except ValueError:
        raise InvalidInput(f"{where}: not a valid URL") from None
    if parts.scheme.lower() != "https":
        raise InvalidInput(f"{where}: only https:// URLs are fetched")
    if not host:
        raise InvalidInput(f"{where}: the URL has no host")
    path = quote(parts.path or "/", safe=URL_SAFE)
    if parts.query:
        path += "?" + quote(parts.query, safe=URL_SAFE)
    return _Target(url=url, host=host, port=443 if port is None else port, path=path)


@cache
def _default_context() -> ssl.SSLContext:
    """The system trust store, loaded once: building a context reads every CA certificate."""
    return ssl.create_default_context()


def _fetch(url: str, field: str, limits: InputLimits, context: ssl.SSLContext) -> tuple[str, bytes]:
    """Returns the host that answered and the body; one log line per fetch."""
    started = time.monotonic()
    target = _target(url, field)
    try:
        host, body = _download(target, field, limits, context)
    except WorkerError:
        log.warning("%s: fetch from %s failed after %.2f s", field, target.host, time.monotonic() - started)
        raise
    log.info("%s: fetched %d bytes from %s in %.2f s", field, len(body), host, time.monotonic() - started)
    return host, body


def _download(target: _Target, field: str, limits: InputLimits, context: ssl.SSLContext) -> tuple[str, bytes]:
    deadline = _Deadline(limits.timeout_s)
    first_host = target.host
    where = field
    try:
        for _ in range(MAX_REDIRECTS + 1):
            addresses = _checked_addresses(target, where, limits, deadline)
            with _connect(target, addresses, context, deadline) as tls:
                response = _get(target, tls, deadline)
                location = response.getheader("Location")
                if response.status in REDIRECT_STATUSES and location:
                    where = f"{field} (redirected by {target.host})"
                    target = _target(urljoin(target.url, location), where)
                    continue
                if not 200 <= response.status < 300:
                    raise InputFetchFailed(f"{field}: {target.host}: HTTP {response.status}")
                return target.host, _read_body(response, f"{field}: {target.host}", limits.max_bytes)
        raise InputFetchFailed(f"{field}: more than {MAX_REDIRECTS} redirects from {first_host}")
    except TimeoutError as error:
        raise InputFetchFailed(f"{field}: {target.host}: no complete answer within {limits.timeout_s:g} s") from error
    except socket.gaierror as error:
        raise InputFetchFailed(f"{field}: can't resolve {target.host} ({error.strerror})") from error
    except ssl.SSLCertVerificationError as error:
        raise InputFetchFailed(f"{field}: {target.host}: certificate not trusted ({error.verify_message})") from error
    except (OSError, http.client.HTTPException) as error:
        raise InputFetchFailed(f"{field}: {target.host}: {error or type(error).__name__}") from error


def _checked_addresses(target: _Target, where: str, limits: InputLimits, deadline: _Deadline) -> list[AddrInfo]:
    addresses = _resolve(target.host, target.port, deadline)
    if not limits.allow_private_urls:
        _check_public(target.host, addresses, where, "fetched")
    return addresses


def resolve_public(host: str, port: int, where: str, timeout_s: float, use: str) -> list[AddrInfo]:
    """Resolves `host` within `timeout_s` and returns its addresses, each of which must be public: InvalidInput
    otherwise, naming `where` and what only public addresses are (`use`, e.g. "written to"). A host that doesn't
    resolve raises socket.gaierror; a resolver that doesn't answer in time, TimeoutError."""
    addresses = _resolve(host, port, _Deadline(timeout_s))
    _check_public(host, addresses, where, use)
    return addresses


def _check_public(host: str, addresses: list[AddrInfo], where: str, use: str) -> None:
    """Every address the host resolves to must pass, since any one of them might be the one connected to."""
    for *_, sockaddr in addresses:
        address = ipaddress.ip_address(sockaddr[0])
        kind = classify_address(address)
        if kind != "public":
            raise InvalidInput(f"{where}: {host} is at {address}, a {kind} address; only public addresses are {use}")


def _resolve(host: str, port: int, deadline: _Deadline) -> list[AddrInfo]:
    """getaddrinfo has no timeout, so it runs in a daemon thread: the deadline holds while DNS hangs, and the
    thread ends on its own when the system resolver gives up."""
    answer: Future[list[AddrInfo]] = Future()

    def run() -> None:
        try:
            answer.set_result(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except Exception as error:  # whatever it is belongs to the caller's thread
            answer.set_exception(error)

    thread = threading.Thread(target=run, name="resolve", daemon=True)
    thread.start()
    thread.join(deadline.remaining())
    if not answer.done():
        raise TimeoutError(f"resolving {host}")
    return answer.result()


def _connect(target: _Target, addresses: list[AddrInfo], context: ssl.SSLContext, deadline: _Deadline) -> ssl.SSLSocket:
    """Tries the checked addresses in turn; TLS verifies the certificate for the hostname, not the address."""
    failure: OSError = OSError(f"{target.host} has no address")
    for family, kind, proto, _, sockaddr in addresses:
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(deadline.remaining())
            sock.connect(sockaddr)
        except OSError as error:
            sock.close()
            failure = error
            continue
        try:
            # The handshake as a whole is bounded by the socket's timeout.
            sock.settimeout(deadline.remaining())
            return context.wrap_socket(sock, server_hostname=target.host)
        except BaseException:
            sock.close()
            raise
    raise failure


class _Connection(http.client.HTTPConnection):
    """http.client writes the request and parses the answer over a socket opened and checked beforehand."""

    # The Host header leaves out :443, as browsers do: a presigned S3 URL signs that header.
    default_port = http.client.HTTPS_PORT


def _get(target: _Target, tls: ssl.SSLSocket, deadline: _Deadline) -> http.client.HTTPResponse:
    connection = _Connection(target.host, target.port)
    connection.sock = _DeadlineSocket(tls, deadline)
    connection.request("GET", target.path, headers={"User-Agent": USER_AGENT, "Connection": "close"})
    return connection.getresponse()


def _read_body(response: http.client.HTTPResponse, where: str, max_bytes: int) -> bytes:
    """Streams at most max_bytes + 1 bytes; a declared length over the limit is refused before any is read."""
    declared = response.length  # None for a chunked or close-delimited body
    if declared is not None and declared > max_bytes:
        raise InputFetchFailed(f"{where}: {declared} bytes, over the limit of {max_bytes} bytes")
    body = bytearray()
    while chunk := response.read(READ_CHUNK):
        body += chunk
        if len(body) > max_bytes:
            raise InputFetchFailed(f"{where}: more than the limit of {max_bytes} bytes")
    # http.client returns a short body without complaint when the server hangs up early.
    if declared is not None and len(body) != declared:
        raise InputFetchFailed(f"{where}: the body ended after {len(body)} of {declared} bytes")
    return bytes(body)


class _Deadline:
    def __init__(self, seconds: float) -> None:
        self.ends = time.monotonic() + seconds

    def remaining(self) -> float:
        left = self.ends - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        return left


class _DeadlineSocket:
    """What http.client uses of a socket, with every read and write bounded by the fetch's one deadline: a
    socket timeout alone bounds each call, and a server sending a byte at a time would never trip it."""

    def __init__(self, tls: ssl.SSLSocket, deadline: _Deadline) -> None:
        self._tls = tls
        self._deadline = deadline

    def sendall(self, data: bytes) -> None:
        self._tls.settimeout(self._deadline.remaining())
        self._tls.sendall(data)

    def makefile(self, mode: str) -> io.BufferedReader:
        return io.BufferedReader(_DeadlineReader(self._tls, self._deadline))

    def close(self) -> None:
        """Left to the fetch, which owns the socket: http.client calls this as soon as it reads `Connection:
        close`, before the body."""


class _DeadlineReader(io.RawIOBase):
    def __init__(self, tls: ssl.SSLSocket, deadline: _Deadline) -> None:
        super().__init__()
        self._tls = tls
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:
        self._tls.settimeout(self._deadline.remaining())
        return self._tls.recv_into(buffer)
