"""Image URLs in requests to encoded bytes, without letting a request reach what it must not.

- `data:` URLs are always read (base64, with the per-image byte cap, before decoding).
- `http(s)` URLs only when their host is in `allowed_domains` (exact names). The name is resolved
  once, with an injectable `resolver`, and every address it gives must be public: never loopback,
  private, shared, link-local (cloud metadata at 169.254.169.254), multicast, reserved or unspecified,
  nor an IPv6 form of one. The connection then goes to that checked address (the name is not resolved
  a second time, so a name cannot change its answer in between). At most `max_redirects` redirects,
  each checked like the first URL; one deadline for the whole fetch; the body read to a byte cap.
- `file:` URLs only for files under `allowed_local_path` (after resolving symlinks).
- Anything else, including a bare path, is refused.

Every refusal is a `MediaError` with a one-line message and a short code; nothing is written to disk.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import httpcore

from ..errors import ImageError, VispromptError, one_line
from ..images import read_image_bytes

Resolver = Callable[[str, int], list[str]]
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_REDIRECTS = (301, 302, 303, 307, 308)
_CHUNK = 64 * 1024


class MediaError(VispromptError):
    """An image URL that is refused or could not be read.

    Args:
        message: one line for the client.
        code: a short reason ("domain_not_allowed", "address_not_allowed", "fetch_failed", ...).
    """

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


def system_resolver(host: str, port: int) -> list[str]:
    """The addresses the operating system gives for `host` (numeric forms such as 2130706433 included).

    Args:
        host: a name or an address literal.
        port: the port to connect to.

    Returns:
        Address strings, in the order to try them.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise MediaError(f"cannot resolve image URL host {host!r}: {exc}", "fetch_failed") from None
    return [str(info[4][0]) for info in infos]


def public_address(address: str) -> bool:
    """True when a connection to `address` leaves for the public internet.

    Args:
        address: an IPv4 or IPv6 address string (a zone suffix "%eth0" is allowed).

    Returns:
        False for loopback, private, shared, link-local, multicast, reserved and unspecified
        addresses, and for IPv6 forms that carry one of those (IPv4-mapped, NAT64).
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip in _NAT64:
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.is_global and not ip.is_multicast


class _CheckedNetwork(httpcore.NetworkBackend):
    """httpcore's network layer, connecting only to addresses `public_address` allows (for names in
    the allowed list); the only way the fetcher's connections are made."""

    def __init__(self, resolver: Resolver, allowed_domains: Iterable[str]):
        self._resolver = resolver
        self._allowed = frozenset(allowed_domains)
        self._inner = httpcore.SyncBackend()

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        if host.lower() not in self._allowed:  # the fetcher checked it too; this is the last gate
            raise MediaError(f"image URL host {host!r} is not in --allowed-media-domains", "domain_not_allowed")
        addresses = self._resolver(host, port)
        if not addresses:
            raise MediaError(f"image URL host {host!r} has no address", "fetch_failed")
        for address in addresses:
            if not public_address(address):
                raise MediaError(
                    f"image URL host {host!r} resolves to {address}, which is not a public address",
                    "address_not_allowed",
                )
        last: Exception | None = None
        for address in addresses:
            try:
                return self._inner.connect_tcp(address, port, timeout, local_address, socket_options)
            except httpcore.ConnectError as exc:
                last = exc
        raise last  # type: ignore[misc]

    def connect_unix_socket(self, path, timeout=None, socket_options=None):
        raise MediaError("image URLs never reach unix sockets", "address_not_allowed")

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class MediaFetcher:
    """Turns the `url` of an `image_url` part into the image's encoded bytes.

    Args:
        allowed_domains: host names whose http(s) URLs may be fetched (exact, case-insensitive).
        allowed_local_path: the folder `file:` URLs may read under; None refuses them.
        max_bytes: the largest image accepted, from any source.
        timeout: seconds for one http(s) fetch, redirects included.
        max_redirects: redirects followed per URL.
        resolver: host, port -> addresses (tests map names to chosen addresses with it).
    """

    def __init__(
        self,
        allowed_domains: Iterable[str] = (),
        allowed_local_path: str | Path | None = None,
        max_bytes: int = 16 << 20,
        timeout: float = 5.0,
        max_redirects: int = 3,
        resolver: Resolver = system_resolver,
    ):
        self.allowed_domains = frozenset(d.lower().strip("[]") for d in allowed_domains)
        self.allowed_local_path = Path(allowed_local_path).resolve() if allowed_local_path is not None else None
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.max_redirects = max_redirects
        self.resolver = resolver

    def read(self, url: str) -> bytes:
        """The encoded image bytes `url` names.

        Args:
            url: a `data:`, `http(s)` or `file:` URL.

        Returns:
            The bytes (not decoded). Raises `MediaError` (refused or unreachable) or `ImageError`
            (a bad data: URL, over the byte cap).
        """
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            return read_image_bytes(url, max_bytes=self.max_bytes)
        if scheme in ("http", "https"):
            return self._fetch(url)
        if scheme == "file":
            return self._read_local(url)
        shown = f"scheme {scheme!r}" if scheme else "no scheme (a bare path)"
        raise MediaError(f"image URL has {shown}: send a data: URL or an allowed http(s) URL", "unsupported_url")

    # -- http(s) --------------------------------------------------------------------------------
    def _fetch(self, url: str) -> bytes:
        deadline = time.monotonic() + self.timeout
        network = _CheckedNetwork(self.resolver, self.allowed_domains)
        with httpcore.ConnectionPool(network_backend=network, max_connections=1, retries=0) as pool:
            for _ in range(self.max_redirects + 1):
                target, headers = self._request_target(url)
                try:
                    with pool.stream("GET", target, headers=headers, extensions=_timeouts(deadline)) as response:
                        if response.status in _REDIRECTS:
                            location = _header(response.headers, b"location")
                            if not location:
                                raise MediaError("image URL redirected without a Location", "fetch_failed")
                            url = urljoin(url, location)
                            continue
                        if response.status != 200:
                            raise MediaError(f"image URL answered HTTP {response.status}", "fetch_failed")
                        return self._read_response(response, deadline)
                except httpcore.TimeoutException:
                    raise MediaError(f"image URL took over {self.timeout:g} s", "fetch_timeout") from None
                except httpcore.NetworkError as exc:  # refused, reset, unreachable, TLS failures
                    raise MediaError(f"cannot fetch image URL: {one_line(exc)}", "fetch_failed") from None
                except httpcore.ProtocolError as exc:
                    raise MediaError(f"image URL gave a bad HTTP answer: {one_line(exc)}", "fetch_failed") from None
        raise MediaError(f"image URL redirected more than {self.max_redirects} times", "too_many_redirects")

    def _request_target(self, url: str) -> tuple[httpcore.URL, list[tuple[bytes, bytes]]]:
        """The checked URL as httpcore's parts (so no second parser reads it differently) and headers."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise MediaError(f"image URL redirected to scheme {scheme!r}", "unsupported_url")
        try:
            host, port = parts.hostname, parts.port
        except ValueError:
            raise MediaError("image URL has an invalid port", "unsupported_url") from None
        if not host:
            raise MediaError("image URL has no host", "unsupported_url")
        if parts.username is not None or parts.password is not None:
            raise MediaError("image URLs with credentials are refused", "unsupported_url")
        if host not in self.allowed_domains:
            raise MediaError(
                f"image URL host {host!r} is not in --allowed-media-domains (send the image as a data: URL)",
                "domain_not_allowed",
            )
        default = 443 if scheme == "https" else 80
        port = port or default
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        target = httpcore.URL(scheme=scheme.encode(), host=host.encode("idna"), port=port, target=path.encode())
        shown = f"[{host}]" if ":" in host else host
        host_header = shown if port == default else f"{shown}:{port}"
        headers = [
            (b"Host", host_header.encode("idna")),
            (b"Accept", b"image/*"),
            (b"Accept-Encoding", b"identity"),
            (b"User-Agent", b"visprompt-serve"),
        ]
        return target, headers

    def _read_response(self, response, deadline: float) -> bytes:
        length = _header(response.headers, b"content-length")
        if length and length.isdigit() and int(length) > self.max_bytes:
            raise ImageError(f"image URL's content is over the {_size(self.max_bytes)} limit (max_image_bytes)")
        chunks, total = [], 0
        for chunk in response.iter_stream():
            total += len(chunk)
            if total > self.max_bytes:
                raise ImageError(f"image URL's content is over the {_size(self.max_bytes)} limit (max_image_bytes)")
            if time.monotonic() > deadline:
                raise MediaError(f"image URL took over {self.timeout:g} s", "fetch_timeout")
            chunks.append(chunk)
        if not total:
            raise ImageError("image data is empty (0 bytes)")
        return b"".join(chunks)

    # -- file: ----------------------------------------------------------------------------------
    def _read_local(self, url: str) -> bytes:
        if self.allowed_local_path is None:
            raise MediaError(
                "file: URLs are refused (the server reads local files only under --allowed-local-media-path)",
                "file_not_allowed",
            )
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise MediaError("file: URLs must name a local file (file:///path)", "unsupported_url")
        path = Path(unquote(parts.path)).resolve()
        if not path.is_relative_to(self.allowed_local_path):
            raise MediaError("the file: URL points outside --allowed-local-media-path", "file_not_allowed")
        return read_image_bytes(path, max_bytes=self.max_bytes)


def _timeouts(deadline: float) -> dict:
    left = max(0.001, deadline - time.monotonic())
    return {"timeout": {"connect": left, "read": left, "write": left, "pool": left}}


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1").strip()
    return None


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"
