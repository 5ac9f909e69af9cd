"""Fetching an image from a client-given URL without letting the client reach what it
should not (SSRF): `serve.inputs.url`, deny by default.

Failures are `InputError`s like any bad input:

    413  too_many_bytes
    422  missing_field, url_disabled, url_not_allowed, url_fetch_failed, too_many_redirects
    504  url_timeout
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import re
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from mlplatform.deployments.decoding import InputError, fields_from
from mlplatform.errors import ConfigError

__all__ = ["UrlPolicy", "fetch_url"]


@dataclass(frozen=True)
class UrlPolicy:
    """`serve.inputs.url`: whether and where the API may fetch an image from a URL.

    Deny by default: off unless `enabled`, and then only hosts in `allowed_hosts` (an exact
    name or IP, or `.example.com` for any subdomain of example.com, not the apex itself).
    Hosts that resolve to a private, loopback, link-local, multicast, reserved or otherwise
    non-global address are refused unless `allow_private` is True (then nothing is resolved
    up front and the name is connected to as is).
    """

    enabled: bool
    allowed_hosts: tuple[str, ...]
    allow_private: bool
    timeout_s: float
    max_bytes: int
    max_redirects: int
    schemes: tuple[str, ...]

    def __post_init__(self) -> None:
        p = "serve.inputs.url"
        if not isinstance(self.timeout_s, int | float) or not self.timeout_s > 0:
            raise ConfigError(f"{p}.timeout_s", self.timeout_s, "must be > 0")
        if isinstance(self.max_bytes, bool) or not isinstance(self.max_bytes, int) or self.max_bytes < 1:
            raise ConfigError(f"{p}.max_bytes", self.max_bytes, "must be an integer >= 1")
        if (isinstance(self.max_redirects, bool) or not isinstance(self.max_redirects, int)
                or self.max_redirects < 0):
            raise ConfigError(f"{p}.max_redirects", self.max_redirects, "must be an integer >= 0")
        schemes = tuple(str(s).strip().lower() for s in self.schemes)
        if not schemes or not set(schemes) <= {"http", "https"}:
            raise ConfigError(f"{p}.schemes", self.schemes, "must be a non-empty subset of http, https")
        hosts = (self.allowed_hosts,) if isinstance(self.allowed_hosts, str) else self.allowed_hosts
        norm = []
        for entry in hosts:
            try:
                norm.append(_normalize_entry(str(entry)))
            except ValueError as e:
                raise ConfigError(f"{p}.allowed_hosts", entry, str(e)) from None
        object.__setattr__(self, "schemes", schemes)
        object.__setattr__(self, "allowed_hosts", tuple(norm))
        object.__setattr__(self, "enabled", bool(self.enabled))
        object.__setattr__(self, "allow_private", bool(self.allow_private))
        object.__setattr__(self, "timeout_s", float(self.timeout_s))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> UrlPolicy:
        kw = fields_from(cls, d, "serve.inputs.url")
        for key in ("allowed_hosts", "schemes"):
            if key in kw and not isinstance(kw[key], str):
                kw[key] = tuple(kw[key])
        return cls(**kw)


# ----------------------------------------------------------------------------- URLs

_HOSTNAME_RE = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_]([a-z0-9_-]{0,62}))*")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_REDIRECTS = {301, 302, 303, 307, 308}


def _as_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None


def _normalize_host(host: str) -> str:
    """Lower case, no brackets or trailing dot, IDNA; IPs in canonical form. ValueError if bad."""
    h = host.strip().lower()
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    ip = _as_ip(h)
    if ip is not None:
        return str(ip)
    h = h.rstrip(".")
    if not h.isascii():
        h = httpx.URL(f"http://{h}/").raw_host.decode("ascii").rstrip(".")
    if len(h) > 253 or not _HOSTNAME_RE.fullmatch(h):
        raise ValueError(f"not a valid host name: {host!r}")
    return h


def _normalize_entry(entry: str) -> str:
    e = entry.strip()
    if any(c in e for c in "/@?#") or (e.count(":") == 1 and not e.startswith("[")):
        raise ValueError("list a bare host name or IP (no scheme, port or path)")
    if e.startswith("."):
        return "." + _normalize_host(e[1:])
    return _normalize_host(e)


def _host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    is_ip = _as_ip(host) is not None
    return any(host == e or (not is_ip and e.startswith(".") and host.endswith(e)) for e in allowed)


def _non_public(addr: str) -> bool:
    """True for anything but a plain global unicast address, looking inside IPv4-in-IPv6."""
    ip = _as_ip(addr)
    if ip is None:
        return True
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:a.b.c.d is that IPv4 address, judged as such
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.sixtofour is not None:
            candidates.append(ip.sixtofour)
        if ip.teredo is not None:
            candidates.extend(ip.teredo)
        if ip in _NAT64:
            candidates.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    for c in candidates:
        if (c.is_private or c.is_loopback or c.is_link_local or c.is_multicast or c.is_reserved
                or c.is_unspecified or not c.is_global
                or (isinstance(c, ipaddress.IPv6Address) and c.is_site_local)):
            return True
    return False


def _not_allowed(message: str) -> InputError:
    return InputError(422, "url_not_allowed", message)


def _fetch_failed(message: str) -> InputError:
    return InputError(422, "url_fetch_failed", message)


def _check_url(raw: str, policy: UrlPolicy) -> tuple[httpx.URL, str, int]:
    """Scheme and host allowlist of one hop: (url, normalized host, port)."""
    try:
        url = httpx.URL(raw)
    except Exception:
        raise _not_allowed("The image URL is not a valid URL.") from None
    if url.scheme not in policy.schemes:
        raise _not_allowed(f"URL scheme {url.scheme or '(none)'!r} is not allowed; "
                           f"use {' or '.join(policy.schemes)}.")
    if url.userinfo:
        raise _not_allowed("URLs with credentials (user:password@) are not allowed.")
    try:
        host = _normalize_host(url.raw_host.decode("ascii"))
    except (ValueError, UnicodeError):
        raise _not_allowed("The image URL has no valid host.") from None
    port = url.port or (443 if url.scheme == "https" else 80)
    if not 0 < port < 65536:
        raise _not_allowed(f"Port {port} is not a valid TCP port.")
    if not _host_allowed(host, policy.allowed_hosts):
        raise _not_allowed(f"Host {host!r} is not in serve.inputs.url.allowed_hosts.")
    return url, host, port


async def _resolve(host: str, port: int) -> list[str]:
    """Every address `host` resolves to, in resolver order, without duplicates."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    out: list[str] = []
    for info in infos:
        addr = str(info[4][0]).split("%", 1)[0]
        if addr not in out:
            out.append(addr)
    return out


async def _addresses(host: str, port: int, policy: UrlPolicy) -> list[str] | None:
    """The checked addresses to connect to, or None to connect to the name as is."""
    if policy.allow_private:
        return None
    if _as_ip(host) is not None:
        if _non_public(host):
            raise _not_allowed(f"{host} is a private, loopback or otherwise non-public address.")
        return None
    try:
        addrs = await _resolve(host, port)
    except (OSError, UnicodeError):
        raise _fetch_failed(f"Host {host!r} could not be resolved.") from None
    if not addrs:
        raise _fetch_failed(f"Host {host!r} could not be resolved.")
    if any(_non_public(a) for a in addrs):
        # The address itself is not echoed: it would map the internal network for a caller.
        raise _not_allowed(f"Host {host!r} resolves to a private, loopback or otherwise "
                           "non-public address.")
    return addrs


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    return httpx.create_ssl_context()


async def _send(client: httpx.AsyncClient, url: httpx.URL, addrs: list[str] | None) -> httpx.Response:
    """GET `url`, pinned to the already checked `addrs` when given (first that connects)."""
    if addrs is None:
        return await client.send(client.build_request("GET", url), stream=True)
    headers = {"Host": url.netloc.decode("ascii")}
    ext = {"sni_hostname": url.raw_host.decode("ascii").rstrip(".")} if url.scheme == "https" else {}
    last: Exception | None = None
    for addr in addrs:
        request = client.build_request("GET", url.copy_with(host=addr), headers=headers, extensions=ext)
        try:
            return await client.send(request, stream=True)
        except httpx.ConnectError as e:
            last = e
    raise _fetch_failed(f"Could not connect to {url.host!r}.") from last


async def _fetch(raw: str, policy: UrlPolicy, transport: httpx.AsyncBaseTransport | None) -> bytes:
    timeout = httpx.Timeout(policy.timeout_s)
    headers = {"User-Agent": "mlplatform-image-fetch/1", "Accept": "image/*",
               "Accept-Encoding": "identity"}
    async with httpx.AsyncClient(transport=transport, verify=_ssl_context(), trust_env=False,
                                 follow_redirects=False, timeout=timeout, headers=headers) as client:
        url, host, port = _check_url(raw, policy)
        for _hop in range(policy.max_redirects + 1):
            addrs = await _addresses(host, port, policy)
            client.cookies.clear()
            response = await _send(client, url, addrs)
            try:
                status = response.status_code
                location = response.headers.get("location")
                if status in _REDIRECTS and location:
                    try:
                        target = str(url.join(location.strip()))
                    except Exception:
                        raise _fetch_failed("The URL redirected to an invalid location.") from None
                    url, host, port = _check_url(target, policy)
                    continue
                if not 200 <= status < 300:
                    raise _fetch_failed(f"Fetching the image URL failed: upstream answered HTTP {status}.")
                length = response.headers.get("content-length", "").strip()
                if length.isdigit() and int(length) > policy.max_bytes:
                    raise _too_many_url_bytes(int(length), policy)
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > policy.max_bytes:
                        raise _too_many_url_bytes(None, policy)
                return bytes(body)
            finally:
                await response.aclose()
        raise InputError(422, "too_many_redirects",
                         f"The image URL redirected more than {policy.max_redirects} times.")


def _too_many_url_bytes(n: int | None, policy: UrlPolicy) -> InputError:
    size = f"{n} bytes" if n is not None else f"more than {policy.max_bytes} bytes"
    return InputError(413, "too_many_bytes",
                      f"The image at the URL is {size}; the limit is {policy.max_bytes}.")


async def fetch_url(url: str, policy: UrlPolicy, *,
                    transport: httpx.AsyncBaseTransport | None = None) -> bytes:
    """The bytes at `url`, fetched under `policy`, or an `InputError`.

    Every hop (the URL and each redirect, at most `max_redirects`, followed by hand) is
    checked for scheme, host allowlist and, unless `allow_private`, the addresses its host
    resolves to: one non-public address refuses the host. The connection then goes to a
    checked address (the URL's host is replaced by the IP; the Host header and TLS SNI and
    certificate check keep the name), so a DNS answer that changes between the check and the
    connect (DNS rebinding) cannot redirect it. Residual risks: with `allow_private` nothing
    is checked; with a custom `transport` that ignores the URL's host, pinning is up to it.
    Environment proxies and .netrc are ignored. The body is streamed and cut off past
    `max_bytes` (after HTTP content decoding; identity encoding is requested). The whole
    fetch, redirects included, is bounded by `timeout_s` (504).
    """
    if not policy.enabled:
        raise InputError(422, "url_disabled",
                         "Image URLs are turned off on this server (serve.inputs.url.enabled).")
    if not isinstance(url, str) or not url.strip():
        raise InputError(422, "missing_field", "The image URL is empty.")
    try:
        return await asyncio.wait_for(_fetch(url.strip(), policy, transport), policy.timeout_s)
    except InputError:
        raise
    except (TimeoutError, httpx.TimeoutException):
        raise InputError(504, "url_timeout",
                         f"Fetching the image URL took longer than {policy.timeout_s:g} s.") from None
    except httpx.InvalidURL:
        raise _not_allowed("The image URL is not a valid URL.") from None
    except (httpx.HTTPError, httpx.StreamError, OSError, ValueError, UnicodeError):
        raise _fetch_failed("Fetching the image URL failed (connection or protocol error).") from None
