"""Engine-node hops: how many bot processes a generation request has already passed through.

A bot whose remote backend points (directly or round a ring of nodes) at itself would otherwise turn one request into
an endless storm. The remote backend sends the count it received plus one; the engine node refuses past MAX_HOPS;
and a bot whose `engine.url` is its own web server is refused at start-up.
"""

from __future__ import annotations

import ipaddress
import socket
from contextvars import ContextVar
from urllib.parse import urlsplit

from core.errors import UserError
from core.settings import Settings

HOP_HEADER = "X-Engine-Node-Hops"
MAX_HOPS = 4  # a front end → node → node chain is 2; past this it is a loop
# The hops of the request being served: the engine node sets it, the remote backend's requests carry it on.
incoming_hops: ContextVar[int] = ContextVar("engine_node_hops", default=0)


def outgoing_headers() -> dict[str, str]:
    """The hop header for a request to a remote engine, made while serving a request that came with `incoming_hops`."""
    return {HOP_HEADER: str(incoming_hops.get() + 1)}


def _loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _this_machine(host: str) -> bool:
    """Whether `host` names this machine: a loopback name, or an address a socket here can bind to."""
    if _loopback(host):
        return True
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    for family, kind, proto, _, address in infos:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.bind((address[0], 0))
        except OSError:
            continue
        return True
    return False


def check_not_own_node(settings: Settings) -> None:
    """A bot whose remote backend is its own web server would send every generation to itself: refuse to start."""
    if settings.engine.backend != "openai" or not settings.web.enabled:
        return
    url = urlsplit(settings.engine.url.strip())
    try:
        port = url.port or (443 if url.scheme == "https" else 80)
    except ValueError:
        return  # a malformed URL is the settings' own error to report
    host, own = (url.hostname or "").lower(), settings.web.host.strip().lower()
    if port != settings.web.port or not host:
        return
    if own in ("0.0.0.0", "::", ""):  # listening everywhere: any address of this machine reaches it
        itself = _this_machine(host)
    elif _loopback(own):
        itself = _loopback(host)
    else:
        itself = host == own
    if itself:
        raise UserError(f"engine.url({settings.engine.url})이 이 봇 자신의 웹 서버(포트 {port})를 가리킵니다. 다른 "
                        f"생성 서버의 주소를 쓰세요. (engine.url points at this bot's own engine node, which would send "
                        f"every request to itself)")
