"""Which addresses the downloader may contact, and connections pinned to a checked address.

Why pinning: checking a hostname's address and then letting the HTTP library resolve it again
leaves a DNS-rebinding window (first answer public, second answer 169.254.169.254). We resolve
once, check the address, and connect to exactly that address, while the Host header, TLS SNI and
certificate check still use the hostname. Redirects are followed by the caller, hop by hop, so
every hop goes through the same check.
"""
from __future__ import annotations

import http.client
import ipaddress
import re
import socket
import threading
import time
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError
from urllib3.util import connection as u3_connection

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_ADDRESS_RE = re.compile(r"\s*(?:object )?at 0x[0-9a-fA-F]+")
_UNPRINTABLE_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def clean_detail(text: str, limit: int = 200) -> str:
    """An error detail fit for a row: no memory address (`<_io.BytesIO object at 0x7f..>`), no
    control characters or lone surrogates from a server's bytes, at most `limit` characters, so
    the same input gives the same row on every run."""
    text = _UNPRINTABLE_RE.sub("?", _ADDRESS_RE.sub("", text))
    return text if len(text) <= limit else text[: limit - 3] + "..."


class BlockedAddressError(Exception):
    """The host resolves to an address the policy refuses (loopback, private, link-local...)."""


class ResolveError(Exception):
    """The host name does not resolve."""


@dataclass(frozen=True)
class AddressPolicy:
    """Refuse everything that is not a public unicast address, unless switched on explicitly."""

    allow_loopback: bool = False
    allow_private: bool = False

    def refusal(self, ip: IPAddress) -> Optional[str]:
        """Why `ip` may not be contacted, or None when it may.

        IPv6 forms that carry an IPv4 address (mapped, compatible, 6to4, Teredo, NAT64) reach that
        IPv4 address, so they get its verdict: `2002:a9fe:a9fe::` is 169.254.169.254.
        """
        if isinstance(ip, ipaddress.IPv6Address):
            embedded = _embedded_ipv4(ip)
            if embedded is not None:
                kind, addresses = embedded
                for v4 in addresses:
                    reason = self._refusal(v4)
                    if reason is not None:
                        return f"{kind} form of a {reason}"
                return None
            if ip.is_site_local:  # fec0::/10, deprecated but still routed inside some networks
                return None if self.allow_private else "site-local"
        return self._refusal(ip)

    def _refusal(self, ip: IPAddress) -> Optional[str]:
        if ip.is_loopback:
            return None if self.allow_loopback else "loopback"
        if ip.is_unspecified:
            return "unspecified"
        if ip.is_multicast:
            return "multicast"
        if ip.is_link_local:
            return "link-local"
        if ip.is_reserved:
            return "reserved"
        if ip.is_private or not ip.is_global:
            return None if self.allow_private else "private"
        return None

    def check(self, ip: IPAddress, host: str = "") -> None:
        reason = self.refusal(ip)
        if reason is not None:
            raise BlockedAddressError(f"{host or ip} -> {ip} is a {reason} address")


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # the well-known prefix; 64:ff9b:1::/48 is local use (refused)
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> Optional[tuple[str, tuple[ipaddress.IPv4Address, ...]]]:
    """(form, the IPv4 addresses a packet to `ip` reaches) for the IPv6 forms that embed IPv4."""
    if ip.ipv4_mapped is not None:
        return "IPv4-mapped", (ip.ipv4_mapped,)
    if ip.sixtofour is not None:
        return "6to4", (ip.sixtofour,)
    if ip.teredo is not None:
        return "Teredo", ip.teredo  # (server, client): both are contacted
    low32 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _NAT64:
        return "NAT64", (low32,)
    if ip in _IPV4_COMPATIBLE and int(ip) > 1:  # ::a.b.c.d (deprecated); :: and ::1 are themselves
        return "IPv4-compatible", (low32,)
    return None


class ResolveTimeout(Exception):
    """The name did not resolve before the request's deadline (the lookup goes on in the background)."""


class Resolver:
    """getaddrinfo under the caller's deadline, with a small cache (millions of URLs share few hosts
    per shard): answers for `ttl_s`, failures (NXDOMAIN, no address) for `negative_ttl_s`.

    Why a thread: getaddrinfo cannot be interrupted and the system resolver may take 30 s or more,
    longer than the whole request may. Lookups run on at most `max_lookups` threads; concurrent
    requests for one name share one lookup, so a dead name server holds a bounded number of threads.
    `connect_to` (tests and archive replays only) maps a host name to the address to use instead of
    DNS; that address is checked like any other.
    """

    def __init__(self, policy: AddressPolicy, ttl_s: float = 300.0, negative_ttl_s: float = 300.0,
                 max_entries: int = 4096, max_lookups: int = 4,
                 connect_to: Optional[dict[str, str]] = None):
        self.policy = policy
        self.ttl_s = ttl_s
        self.negative_ttl_s = negative_ttl_s
        self.max_entries = max_entries
        self.connect_to = {k.lower(): _parse_connect_to(v) for k, v in (connect_to or {}).items()}
        self._cache: OrderedDict[tuple[str, int], tuple[float, object]] = OrderedDict()
        self._pending: dict[tuple[str, int], Future] = {}
        self._waiting: dict[tuple[str, int], int] = {}  # requests waiting on each pending lookup
        self._lock = threading.RLock()  # a lookup that finished already runs its callback at once
        self._pool = ThreadPoolExecutor(max(1, max_lookups), thread_name_prefix="download-dns")
        self.lookups = 0  # getaddrinfo calls made (tests)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _getaddrinfo(self, host: str, port: int) -> object:
        """The addresses, or the ResolveError to cache; never raises."""
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError, ValueError) as exc:
            return ResolveError(f"{host}: {_gai_reason(exc)}")
        except OSError as exc:  # socket.herror and friends
            return ResolveError(f"{host}: {type(exc).__name__}")
        ips: list[IPAddress] = []
        for info in infos:
            try:
                ip = ipaddress.ip_address(info[4][0].split("%", 1)[0])
            except ValueError:
                continue
            if ip not in ips:
                ips.append(ip)
        return ips if ips else ResolveError(f"{host}: no address")

    def _lookup(self, host: str, port: int, deadline: Optional[float]) -> list[IPAddress]:
        literal = _ip_literal(host)
        if literal is not None:
            return [literal]
        mapped = self.connect_to.get(host, self.connect_to.get("*"))
        if mapped is not None:
            return [mapped[0]]
        key = (host, port)
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and hit[0] > now:
                self._cache.move_to_end(key)
                answer = hit[1]
                if isinstance(answer, ResolveError):
                    raise answer
                return answer  # type: ignore[return-value]
            future = self._pending.get(key)
            if future is None:
                self.lookups += 1
                future = self._pool.submit(self._getaddrinfo, host, port)
                self._pending[key] = future
                future.add_done_callback(lambda f, key=key: self._store(key, f))
            self._waiting[key] = self._waiting.get(key, 0) + 1
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            answer = future.result(timeout=timeout)
        except FutureTimeout as exc:
            raise ResolveTimeout(f"{host}: no DNS answer within the deadline") from exc
        except CancelledError as exc:
            raise ResolveError(f"{host}: lookup cancelled") from exc
        finally:
            self._leave(key, future)
        if isinstance(answer, ResolveError):
            raise answer
        return answer  # type: ignore[return-value]

    def _leave(self, key: tuple[str, int], future: Future) -> None:
        """The last request waiting on a lookup that has not started drops it: a queued lookup
        nobody waits for would still hold a lookup thread later (up to the system resolver's
        timeout for a dead name server) and delay every name queued behind it."""
        with self._lock:
            left = self._waiting.get(key, 1) - 1
            if left > 0:
                self._waiting[key] = left
                return
            self._waiting.pop(key, None)
            future.cancel()  # only a lookup still queued; its callback forgets it, nothing is cached

    def _store(self, key: tuple[str, int], future: Future) -> None:
        with self._lock:
            self._pending.pop(key, None)
            if future.cancelled() or future.exception() is not None:
                return
            answer = future.result()
            ttl = self.negative_ttl_s if isinstance(answer, ResolveError) else self.ttl_s
            self._cache[key] = (time.monotonic() + ttl, answer)
            self._cache.move_to_end(key)
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)

    def resolve(self, host: str, port: int, deadline: Optional[float] = None) -> IPAddress:
        """The first address of `host` the policy allows; refuses when there is none."""
        ips = self._lookup(host, port, deadline)
        reasons = []
        for ip in ips:
            reason = self.policy.refusal(ip)
            if reason is None:
                return ip
            reasons.append(f"{ip} ({reason})")
        raise BlockedAddressError(f"{host} resolves only to refused addresses: {', '.join(reasons)}")


    def port_for(self, host: str, port: int) -> int:
        """The port to connect to: the URL's, unless `connect_to` maps the host elsewhere."""
        if _ip_literal(host) is not None:
            return port
        mapped = self.connect_to.get(host, self.connect_to.get("*"))
        return port if mapped is None or mapped[1] is None else mapped[1]


def _parse_connect_to(value: str) -> tuple[IPAddress, Optional[int]]:
    """`"127.0.0.1:8080"`, `"[::1]:8080"` or a bare address."""
    host, port = value, None
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else None
    elif value.count(":") == 1:
        host, port_text = value.split(":")
        port = int(port_text)
    ip = _ip_literal(host)
    if ip is None:
        raise ValueError(f"download.connect_to: {value!r} is not an address[:port]")
    return ip, port


def _ip_literal(host: str) -> Optional[IPAddress]:
    try:
        return ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return None


def _gai_reason(exc: BaseException) -> str:
    """A stable reason: getaddrinfo's message without per-run parts."""
    if isinstance(exc, socket.gaierror) and exc.args and isinstance(exc.args[0], int):
        names = {getattr(socket, n): n for n in ("EAI_NONAME", "EAI_AGAIN", "EAI_FAIL", "EAI_NODATA",
                                                 "EAI_ADDRFAMILY", "EAI_SERVICE") if hasattr(socket, n)}
        return names.get(exc.args[0], f"gaierror {exc.args[0]}")
    return type(exc).__name__


# --------------------------------------------------------------------------- pinned connections
class _PinnedMixin:
    """Connect to `pinned_ip` instead of resolving `host` again; re-check it right before."""

    pinned_ip: Optional[IPAddress] = None
    pinned_port: Optional[int] = None
    policy: Optional[AddressPolicy] = None

    def _new_conn(self) -> socket.socket:  # type: ignore[override]
        ip = self.pinned_ip
        if ip is None or self.policy is None:
            raise NewConnectionError(self, "refused: connection has no checked address")  # type: ignore[arg-type]
        try:
            self.policy.check(ip, self.host)  # type: ignore[attr-defined]
        except BlockedAddressError as exc:
            raise NewConnectionError(self, f"refused: {exc}") from exc  # type: ignore[arg-type]
        try:
            return u3_connection.create_connection(
                (str(ip), self.pinned_port or self.port),  # type: ignore[attr-defined]
                self.timeout,  # type: ignore[attr-defined]
                source_address=self.source_address,  # type: ignore[attr-defined]
                socket_options=self.socket_options,  # type: ignore[attr-defined]
            )
        except socket.timeout as exc:
            raise ConnectTimeoutError(self, f"connect to {self.host} ({ip}) timed out") from exc  # type: ignore[attr-defined]
        except OSError as exc:
            raise NewConnectionError(self, f"connect to {self.host} ({ip}) failed: {exc}") from exc  # type: ignore[arg-type,attr-defined]


MAX_INFORMATIONAL_RESPONSES = 16  # 1xx answers skipped before the final one; more is a hostile server


class InformationalSkippingResponse(http.client.HTTPResponse):
    """Skips every 1xx answer before the final one (103 Early Hints, 102 Processing), not only
    100 Continue as http.client does; 101 (a protocol switch we never asked for) stays final."""

    def _read_status(self):  # type: ignore[override]
        version, status, reason = super()._read_status()  # type: ignore[misc]
        if 100 < status < 200 and status != 101:
            self._informational = getattr(self, "_informational", 0) + 1
            if self._informational > MAX_INFORMATIONAL_RESPONSES:
                raise http.client.HTTPException(f"more than {MAX_INFORMATIONAL_RESPONSES} 1xx responses")
            return version, http.client.CONTINUE, reason  # begin() skips its headers and reads on
        return version, status, reason


class PinnedHTTPConnection(_PinnedMixin, HTTPConnection):
    response_class = InformationalSkippingResponse


class PinnedHTTPSConnection(_PinnedMixin, HTTPSConnection):
    response_class = InformationalSkippingResponse


class _PinnedPoolMixin:
    """A pool whose connections all go to one checked address; notes the connection in use so a
    deadline watchdog can shut its socket."""

    pinned_ip: Optional[IPAddress] = None
    pinned_port: Optional[int] = None
    policy: Optional[AddressPolicy] = None
    on_conn = None  # callable(conn) set by the adapter

    def _new_conn(self):  # type: ignore[override]
        conn = super()._new_conn()  # type: ignore[misc]
        conn.pinned_ip = self.pinned_ip
        conn.pinned_port = self.pinned_port
        conn.policy = self.policy
        return conn

    def _get_conn(self, timeout=None):  # type: ignore[override]
        conn = super()._get_conn(timeout)  # type: ignore[misc]
        if self.on_conn is not None:
            self.on_conn(conn)
        return conn


class PinnedHTTPConnectionPool(_PinnedPoolMixin, HTTPConnectionPool):
    ConnectionCls = PinnedHTTPConnection


class PinnedHTTPSConnectionPool(_PinnedPoolMixin, HTTPSConnectionPool):
    ConnectionCls = PinnedHTTPSConnection


class PinnedAddressAdapter(HTTPAdapter):
    """requests adapter that only sends a request carrying a checked address (`request.pinned_ip`)
    and keeps one small keep-alive pool per (scheme, host, port, address). One per thread."""

    def __init__(self, policy: AddressPolicy, max_pools: int = 64, on_conn=None):
        super().__init__(pool_connections=1, pool_maxsize=1, max_retries=0)
        self.policy = policy
        self.max_pools = max_pools
        self.on_conn = on_conn
        self._pools: OrderedDict[tuple, HTTPConnectionPool] = OrderedDict()

    def get_connection_with_tls_context(self, request, verify, proxies=None, cert=None):
        ip = getattr(request, "pinned_ip", None)
        if ip is None:
            raise BlockedAddressError(f"{request.url}: no checked address pinned to this request")
        host_params, pool_kwargs = self.build_connection_pool_key_attributes(request, verify, cert)
        scheme, host, port = host_params["scheme"], host_params["host"], host_params["port"]
        if port is None:
            port = 443 if scheme == "https" else 80
        pinned_port = getattr(request, "pinned_port", None)
        key = (scheme, host, port, str(ip), pinned_port, tuple(sorted((k, str(v)) for k, v in pool_kwargs.items())))
        pool = self._pools.get(key)
        if pool is not None:
            self._pools.move_to_end(key)
            return pool
        cls = PinnedHTTPSConnectionPool if scheme == "https" else PinnedHTTPConnectionPool
        kwargs = {} if scheme == "https" else {}
        if scheme == "https":
            kwargs.update(pool_kwargs)
        pool = cls(host, port, maxsize=1, block=False, **kwargs)
        pool.pinned_ip = ip
        pool.pinned_port = pinned_port
        pool.policy = self.policy
        pool.on_conn = self.on_conn
        self._pools[key] = pool
        while len(self._pools) > self.max_pools:
            _, old = self._pools.popitem(last=False)
            old.close()
        return pool

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
        super().close()
