"""Where a webhook may be sent: the URL rules, and the address rules checked on every resolved address.

A webhook URL is ``https`` (``http`` too outside production), has a host and no credentials. Unless
``webhook_allow_private_addresses`` is set, every address its host resolves to must be a public one: no
loopback, link-local (169.254.0.0/16, fe80::/10), private (10/8, 172.16/12, 192.168/16, fc00::/7, ...),
unspecified, multicast, reserved or otherwise non-global address, including IPv4 addresses inside IPv6 ones
(``::ffff:10.0.0.1``, 6to4, NAT64). The names are resolved at creation and again at every delivery, where the
connection goes to the address that was checked (``core.webhooks.transport``).
"""

from __future__ import annotations

import ipaddress
import socket
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
MAX_URL_LENGTH = 2048
RESOLVE_TIMEOUT_S = 5.0
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
# getaddrinfo has no timeout of its own: it runs on these threads, and the caller stops waiting in time
_resolver = ThreadPoolExecutor(max_workers=8, thread_name_prefix="secateurs-resolve")


class AddressRefused(ValueError):
    """A URL or an address a webhook may not be sent to; the message says why."""


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def refusal(ip: IPAddress) -> str | None:
    """Why ``ip`` may not receive webhooks (a kind of address), or None for a public address."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_ipv4(ip)
        if inner is not None and (why := refusal(inner)) is not None:
            return why
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip.is_private:
        return "private"
    if ip.is_reserved:
        return "reserved"
    if not ip.is_global:
        return "non-public"
    return None


def resolve(host: str, port: int, timeout: float = RESOLVE_TIMEOUT_S) -> list[IPAddress]:
    """Every address ``host`` resolves to (an IP literal is itself), in the resolver's order, without repeats."""
    try:
        return [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        pass
    future = _resolver.submit(socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM)
    try:
        infos = future.result(timeout=max(0.001, timeout))
    except FutureTimeout:
        raise AddressRefused(f"{host} could not be resolved within {timeout:g} s") from None
    except (OSError, UnicodeError) as e:
        raise AddressRefused(f"{host} does not resolve ({e.__class__.__name__}: {e})") from None
    out: list[IPAddress] = []
    for family, *_, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])  # an IPv6 scope id is no part of the address
        if ip not in out:
            out.append(ip)
    if not out:
        raise AddressRefused(f"{host} has no IPv4 or IPv6 address")
    return out


def checked_addresses(
    host: str, port: int, *, allow_private: bool, timeout: float = RESOLVE_TIMEOUT_S
) -> list[IPAddress]:
    """The addresses of ``host``, all of them allowed; raises AddressRefused naming the first that is not."""
    addresses = resolve(host, port, timeout)
    if not allow_private:
        for ip in addresses:
            why = refusal(ip)
            if why is not None:
                shown = host if host.strip("[]") == str(ip) else f"{host} resolves to {ip}, which"
                article = "an" if why[0] in "aeiou" else "a"
                raise AddressRefused(f"{shown} is {article} {why} address; webhooks go to public addresses only")
    return addresses


def parse_url(url: str, *, require_https: bool) -> httpx.URL:
    """The URL rules that need no resolving; raises AddressRefused."""
    if len(url) > MAX_URL_LENGTH:
        raise AddressRefused(f"longer than {MAX_URL_LENGTH} characters")
    try:
        u = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError) as e:
        raise AddressRefused(f"not a valid URL ({e})") from None
    if u.scheme not in ("http", "https"):
        raise AddressRefused("must be an http:// or https:// URL")
    if require_https and u.scheme != "https":
        raise AddressRefused("must be an https:// URL in production")
    if not u.host:
        raise AddressRefused("has no host")
    if u.userinfo:
        raise AddressRefused("must not carry credentials (user:password@)")
    return u


def port_of(u: httpx.URL) -> int:
    return u.port or (443 if u.scheme == "https" else 80)


def check_url(url: str, *, require_https: bool, allow_private: bool, timeout: float = RESOLVE_TIMEOUT_S) -> httpx.URL:
    """Every rule: the URL's own, then each address its host resolves to now."""
    u = parse_url(url, require_https=require_https)
    checked_addresses(u.raw_host.decode("ascii"), port_of(u), allow_private=allow_private, timeout=timeout)
    return u
