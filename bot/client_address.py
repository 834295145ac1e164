"""Which client sent a web request: the peer's address, or, behind a trusted reverse proxy, the address it reports.

`X-Forwarded-For` is believed only when the peer is one of `web.trusted_proxies`, and then read from the right,
skipping the trusted proxies' own entries: the first other address is the client (a client can prepend anything,
but not what the proxies it passed through appended). The engine shares its rows fairly by this key.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from aiohttp import web

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
PROXIES_KEY = web.AppKey("trusted_proxies", list)  # the app's parsed web.trusted_proxies


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None


def _trusted(address: ipaddress.IPv4Address | ipaddress.IPv6Address | None, proxies: Sequence[Network]) -> bool:
    return address is not None and any(address.version == net.version and address in net for net in proxies)


def client_address(peer: str | None, forwarded_for: Sequence[str], proxies: Sequence[Network]) -> str:
    """The client's address from the peer's and the `X-Forwarded-For` headers' values (in order)."""
    if not _trusted(_address(peer or ""), proxies):
        return peer or "unknown"
    hops = [hop.strip() for value in forwarded_for for hop in value.split(",") if hop.strip()]
    for hop in reversed(hops):
        address = _address(hop)
        if address is None:
            return peer or "unknown"  # a malformed entry: trust nothing beyond it
        if not _trusted(address, proxies):
            return str(address)
    return str(_address(hops[0])) if hops else (peer or "unknown")


def client_key(request: web.Request) -> str:
    """The fair-share key of a web request ("web:203.0.113.7")."""
    proxies = request.app.get(PROXIES_KEY, [])
    return "web:" + client_address(request.remote, request.headers.getall("X-Forwarded-For", []), proxies)
