"""Which addresses the downloader may contact, and connections pinned to a checked address.

Why pinning: checking a hostname's address and then letting the HTTP library resolve it again
leaves a DNS-rebinding window (first answer public, second answer 169.254.169.254). We resolve
once, check the address, and connect to exactly that address, while the Host header, TLS SNI and
certificate check still use the hostname. Redirects are followed by the caller, hop by hop, so
every hop goes through the same check.
"""
from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError
from urllib3.util import connection as u3_connection

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


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
        """Why `ip` may not be contacted, or None when it may."""
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
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


class Resolver:
    """getaddrinfo with a small TTL cache (millions of URLs share few hosts per shard)."""

    def __init__(self, policy: AddressPolicy, ttl_s: float = 300.0, max_entries: int = 4096):
        self.policy = policy
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._cache: OrderedDict[tuple[str, int], tuple[float, list[IPAddress]]] = OrderedDict()
        self._lock = threading.Lock()

    def _lookup(self, host: str, port: int) -> list[IPAddress]:
        try:
            return [ipaddress.ip_address(host.strip("[]"))]
        except ValueError:
            pass
        key = (host, port)
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and hit[0] > now:
                self._cache.move_to_end(key)
                return hit[1]
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise ResolveError(f"{host}: {exc}") from exc
        ips: list[IPAddress] = []
        for info in infos:
            ip = ipaddress.ip_address(info[4][0].split("%", 1)[0])
            if ip not in ips:
                ips.append(ip)
        with self._lock:
            self._cache[key] = (now + self.ttl_s, ips)
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        return ips

    def resolve(self, host: str, port: int) -> IPAddress:
        """The first address of `host` the policy allows; refuses when there is none."""
        ips = self._lookup(host, port)
        if not ips:
            raise ResolveError(f"{host}: no address")
        reasons = []
        for ip in ips:
            reason = self.policy.refusal(ip)
            if reason is None:
                return ip
            reasons.append(f"{ip} ({reason})")
        raise BlockedAddressError(f"{host} resolves only to refused addresses: {', '.join(reasons)}")


# --------------------------------------------------------------------------- pinned connections
class _PinnedMixin:
    """Connect to `pinned_ip` instead of resolving `host` again; re-check it right before."""

    pinned_ip: Optional[IPAddress] = None
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
                (str(ip), self.port),  # type: ignore[attr-defined]
                self.timeout,  # type: ignore[attr-defined]
                source_address=self.source_address,  # type: ignore[attr-defined]
                socket_options=self.socket_options,  # type: ignore[attr-defined]
            )
        except socket.timeout as exc:
            raise ConnectTimeoutError(self, f"connect to {self.host} ({ip}) timed out") from exc  # type: ignore[attr-defined]
        except OSError as exc:
            raise NewConnectionError(self, f"connect to {self.host} ({ip}) failed: {exc}") from exc  # type: ignore[arg-type,attr-defined]


class PinnedHTTPConnection(_PinnedMixin, HTTPConnection):
    pass


class PinnedHTTPSConnection(_PinnedMixin, HTTPSConnection):
    pass


class _PinnedPoolMixin:
    """A pool whose connections all go to one checked address; notes the connection in use so a
    deadline watchdog can shut its socket."""

    pinned_ip: Optional[IPAddress] = None
    policy: Optional[AddressPolicy] = None
    on_conn = None  # callable(conn) set by the adapter

    def _new_conn(self):  # type: ignore[override]
        conn = super()._new_conn()  # type: ignore[misc]
        conn.pinned_ip = self.pinned_ip
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
        key = (scheme, host, port, str(ip), tuple(sorted((k, str(v)) for k, v in pool_kwargs.items())))
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
