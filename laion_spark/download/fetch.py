"""HTTP fetching that cannot hang: per-hop address checks, a total deadline enforced by a
watchdog that shuts the socket, a byte cap, bounded redirects, opt-out headers read before the
body, and per-host politeness (a concurrency cap and a shared back-off after 429/503).

Why a watchdog: socket read timeouts restart on every received byte, so a server dripping one
byte a second (or never ending a body, or dripping headers) keeps a thread forever; img2dataset's
"hangs at the end" come from this. Shutting the socket down from another thread wakes the
blocked read at once.
"""
from __future__ import annotations

import email.utils
import http.cookiejar
import heapq
import itertools
import logging
import random
import re
import socket
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Optional
from urllib.parse import urljoin, urlsplit

import requests
import urllib3.exceptions

from laion_spark.config import DownloadConfig
from laion_spark.download.safety import (
    AddressPolicy,
    MAX_INFORMATIONAL_RESPONSES,
    BlockedAddressError,
    PinnedAddressAdapter,
    ResolveError,
    ResolveTimeout,
    Resolver,
    clean_detail,
)

log = logging.getLogger(__name__)

READ_CHUNK = 65536
EXPIRED_RECHECK_S = 0.05  # how often the watchdog shuts the socket of a request past its deadline
RETRYABLE_STATUS = {429, 500, 502, 503, 504}
MAX_RETRY_AFTER_S = 600.0


@dataclass
class FetchResult:
    """What one URL gave: body bytes on success, else an error code ("http_404", "timeout"...)."""

    url: str
    body: Optional[bytes] = None
    http_status: Optional[int] = None
    error: Optional[str] = None  # "code: detail"
    skipped: bool = False  # refused by our policy (address, opt-out header, scheme), not the web's fault
    final_url: Optional[str] = None
    content_type: Optional[str] = None
    attempts: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None and self.body is not None


class FetchError(Exception):
    """One stable snake_case code plus a detail with no per-run value (`code: detail`)."""

    def __init__(self, code: str, detail: str = "", http_status: Optional[int] = None,
                 skipped: bool = False, retry_after: Optional[float] = None):
        detail = clean_detail(detail)
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code
        self.http_status = http_status
        self.skipped = skipped
        self.retry_after = retry_after


# --------------------------------------------------------------------------- deadline watchdog
class _Guard:
    """One request's hold on the connection it uses; the watchdog may shut it at the deadline."""

    __slots__ = ("deadline", "conn", "expired", "active", "lock")

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.conn = None
        self.expired = False
        self.active = True
        self.lock = threading.Lock()


class DeadlineWatchdog:
    """One thread for all requests of a task: at a request's deadline, shut its socket down."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, _Guard]] = []
        self._cond = threading.Condition()
        self._counter = itertools.count()
        self._stopped = False
        self._local = threading.local()
        self._thread = threading.Thread(target=self._loop, name="download-deadline", daemon=True)
        self._thread.start()

    def arm(self, deadline: float) -> _Guard:
        guard = _Guard(deadline)
        with self._cond:
            heapq.heappush(self._heap, (deadline, next(self._counter), guard))
            self._cond.notify()
        self._local.guard = guard
        return guard

    def disarm(self, guard: _Guard) -> None:
        with guard.lock:
            guard.active = False
            guard.conn = None
        self._local.guard = None

    def note_connection(self, conn) -> None:
        """Called by the connection pool when the current thread takes a connection."""
        guard = getattr(self._local, "guard", None)
        if guard is not None:
            with guard.lock:
                guard.conn = conn
            if guard.expired:
                _shutdown(conn)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and (not self._heap or self._heap[0][0] > time.monotonic()):
                    timeout = (self._heap[0][0] - time.monotonic()) if self._heap else None
                    self._cond.wait(timeout)
                if self._stopped:
                    return
                _, _, guard = heapq.heappop(self._heap)
            with guard.lock:
                if not guard.active:
                    continue
                guard.expired = True
                conn = guard.conn
            if conn is not None:
                _shutdown(conn)
            # The request may have had no socket yet (a connect still under way) and may open one
            # after this: a drip on it would then outlive the deadline, as the read timeout restarts
            # on every byte. Look again shortly, until the request notices and disarms.
            with self._cond:
                heapq.heappush(self._heap, (time.monotonic() + EXPIRED_RECHECK_S, next(self._counter), guard))

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=5)


def _shutdown(conn) -> None:
    sock = getattr(conn, "sock", None)
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


# --------------------------------------------------------------------------- per-host politeness
class HostLimiter:
    """At most `per_host` requests in flight per host, and a shared wait after 429/503."""

    def __init__(self, per_host: int):
        self.per_host = max(1, per_host)
        self._cond = threading.Condition()
        self._active: dict[str, int] = {}
        self._backoff_until: dict[str, float] = {}

    def acquire(self, host: str, deadline: float) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                wait_until = self._backoff_until.get(host, 0.0)
                if wait_until <= now and self._active.get(host, 0) < self.per_host:
                    self._active[host] = self._active.get(host, 0) + 1
                    return
                if wait_until > deadline:
                    raise FetchError("host_backoff", f"{host} asked to wait past the deadline")
                if now >= deadline:
                    raise FetchError("timeout", f"waiting for a free slot for {host}")
                self._cond.wait(min(deadline, max(wait_until, now + 0.05)) - now)

    def release(self, host: str) -> None:
        with self._cond:
            n = self._active.get(host, 1) - 1
            if n <= 0:
                self._active.pop(host, None)
            else:
                self._active[host] = n
            self._cond.notify_all()

    def back_off(self, host: str, seconds: float) -> None:
        with self._cond:
            until = time.monotonic() + seconds
            if until > self._backoff_until.get(host, 0.0):
                self._backoff_until[host] = until
            self._cond.notify_all()


def parse_retry_after(value: Optional[str], default: float) -> float:
    """Retry-After is seconds or an HTTP date; anything else gives `default`."""
    if not value:
        return default
    value = value.strip()
    try:
        return min(MAX_RETRY_AFTER_S, max(0.0, float(value)))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
        return min(MAX_RETRY_AFTER_S, max(0.0, when.timestamp() - time.time()))
    except (TypeError, ValueError, OverflowError):
        return default


# --------------------------------------------------------------------------- X-Robots-Tag
_KNOWN_DIRECTIVES = {
    "all", "noindex", "nofollow", "none", "noarchive", "nosnippet", "notranslate", "noimageindex",
    "unavailable_after", "max-snippet", "max-image-preview", "max-video-preview", "indexifembedded",
    "noai", "noimageai", "nocache", "noml",
}


def robots_refusal(values: list[str], user_agent_token: str, disallowed: list[str]) -> Optional[str]:
    """The first disallowed X-Robots-Tag directive that applies to us, or None.

    `googlebot: noindex` applies only to googlebot; unscoped directives apply to everyone.
    """
    token = user_agent_token.lower()
    banned = {d.lower() for d in disallowed}
    for value in values:
        scope: Optional[str] = None
        for part in value.split(","):
            part = part.strip().lower()
            if not part:
                continue
            if ":" in part:
                head, rest = (s.strip() for s in part.split(":", 1))
                if head not in _KNOWN_DIRECTIVES:
                    scope, part = head, rest
            if scope is not None and scope not in (token, "*"):
                continue
            if part in banned:
                return part
    return None


def user_agent_token(user_agent: str) -> str:
    return user_agent.split("/", 1)[0].split()[0].strip() if user_agent.strip() else ""


# --------------------------------------------------------------------------- body decoding
_CONTENT_LENGTH = re.compile(r"[0-9]{1,18}")


def parse_content_length(value: Optional[str]) -> Optional[int]:
    """The Content-Length, None when absent; FetchError("bad_response") for `²`, `-1`, `1e3` or
    two different values (`10, 20`), which a server that means well never sends."""
    if value is None:
        return None
    parts = {p.strip() for p in value.split(",")}
    if len(parts) != 1 or not _CONTENT_LENGTH.fullmatch(next(iter(parts))):
        raise FetchError("bad_response", f"Content-Length {value[:40]!r}")
    return int(next(iter(parts)))


class BodyDecoder:
    """Undoes Content-Encoding (gzip, x-gzip, deflate, stacked) while streaming, never producing
    more than `limit` bytes: a gzip bomb stops at the cap, not after inflating."""

    def __init__(self, content_encoding: Optional[str], limit: int):
        codings = [c.strip().lower() for c in (content_encoding or "").split(",")]
        codings = [c for c in codings if c and c != "identity"]
        if len(codings) > 3:
            raise FetchError("unsupported_encoding", f"{len(codings)} stacked content codings")
        for c in codings:
            if c not in ("gzip", "x-gzip", "deflate"):
                raise FetchError("unsupported_encoding", f"Content-Encoding {c[:40]!r}")
        self.codings = list(reversed(codings))  # the last applied is undone first
        self.limit = limit
        self._inflaters = [zlib.decompressobj(zlib.MAX_WBITS | 32) for _ in self.codings]
        self._started = [False] * len(self.codings)
        self.size = 0

    def _inflate(self, i: int, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        d = self._inflaters[i]
        while data and not d.eof:
            try:
                piece = d.decompress(data, READ_CHUNK)
            except zlib.error:
                if self._started[i] or self.codings[i] != "deflate":
                    raise FetchError("bad_encoding", f"{self.codings[i]} stream is corrupt")
                # "deflate" sent as a raw stream (no zlib header), as some servers do
                self._inflaters[i] = d = zlib.decompressobj(-zlib.MAX_WBITS)
                self._started[i] = True
                continue
            self._started[i] = True
            out.append(piece)
            data = d.unconsumed_tail
            if sum(map(len, out)) > self.limit:
                raise FetchError("too_large", f"decoded body over {self.limit} bytes")
        return out

    def feed(self, data: bytes) -> list[bytes]:
        pieces = [data]
        for i in range(len(self.codings)):
            pieces = [p for chunk in pieces for p in self._inflate(i, chunk)]
        self.size += sum(map(len, pieces))
        if self.size > self.limit:
            raise FetchError("too_large", f"decoded body over {self.limit} bytes")
        return pieces

    def finish(self) -> None:
        for i, d in enumerate(self._inflaters):
            if self._started[i] and not d.eof and self.codings[i] != "deflate":
                raise FetchError("truncated", f"{self.codings[i]} stream ends early")


# --------------------------------------------------------------------------- the fetcher
class Fetcher:
    """Fetch URLs from many threads; each thread keeps its own pooled `requests` session."""

    def __init__(self, cfg: DownloadConfig):
        self.cfg = cfg
        self.policy = AddressPolicy(cfg.allow_loopback, cfg.allow_private_addresses)
        self.resolver = Resolver(self.policy, negative_ttl_s=cfg.dns_negative_ttl_s,
                                 max_entries=cfg.max_dns_cache_entries, connect_to=cfg.connect_to)
        self.hosts = HostLimiter(cfg.per_host_concurrency)
        self.watchdog = DeadlineWatchdog()
        self.token = user_agent_token(cfg.user_agent)
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._sessions_lock = threading.Lock()

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.trust_env = False  # no proxies or netrc from the environment: we pin addresses
            # No cookie is kept or sent: prepare_request would add the jar's cookies to every request.
            session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
            adapter = PinnedAddressAdapter(self.policy, on_conn=self.watchdog.note_connection)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            session.headers.clear()
            session.headers.update({
                "User-Agent": self.cfg.user_agent,
                "Accept": "image/avif,image/webp,image/png,image/jpeg,image/*;q=0.8,*/*;q=0.5",
                "Accept-Encoding": "identity",
                "Connection": "keep-alive",
            })
            self._local.session = session
            with self._sessions_lock:
                self._sessions.append(session)
        return session

    def close(self) -> None:
        self.watchdog.stop()
        self.resolver.close()
        with self._sessions_lock:
            for s in self._sessions:
                s.close()
            self._sessions.clear()

    def fetch(self, url: str) -> FetchResult:
        """One URL, retried on transient errors when `retries` > 0, all inside one deadline."""
        cfg = self.cfg
        deadline = time.monotonic() + cfg.total_deadline_s
        result = FetchResult(url)
        attempt = 0
        while True:
            attempt += 1
            result.attempts = attempt
            try:
                body, status, final_url, ctype = self._fetch_once(url, deadline)
                result.body, result.http_status, result.final_url = body, status, final_url
                result.content_type = ctype
                result.error = None
                return result
            except FetchError as exc:
                result.error, result.http_status, result.skipped = str(exc), exc.http_status, exc.skipped
                transient = exc.code in ("timeout", "connection_error") or (
                    exc.http_status in RETRYABLE_STATUS)
                if exc.code == "timeout" and time.monotonic() >= deadline:
                    transient = False
                if not transient or attempt > cfg.retries:
                    return result
                pause = exc.retry_after if exc.retry_after is not None else (
                    0.5 * 2 ** (attempt - 1) * (1 + random.random() * 0.25))
                if time.monotonic() + pause >= deadline:
                    return result
                time.sleep(pause)

    def _fetch_once(self, url: str, deadline: float) -> tuple[bytes, int, str, Optional[str]]:
        cfg = self.cfg
        session = self._session()
        current = url
        for hop in range(cfg.max_redirects + 1):
            scheme, host, port = split_target(current)
            try:
                ip = self.resolver.resolve(host, port, deadline)
            except BlockedAddressError as exc:
                raise FetchError("blocked_address", str(exc), skipped=True) from exc
            except ResolveTimeout as exc:
                raise FetchError("timeout", f"total deadline {cfg.total_deadline_s:g}s (DNS)") from exc
            except ResolveError as exc:
                raise FetchError("dns_error", str(exc)) from exc
            site = host.rstrip(".")  # `a.test.` is `a.test`: one per-host cap and back-off for both
            self.hosts.acquire(site, deadline)
            try:
                redirect = self._one_hop(session, current, ip, self.resolver.port_for(host, port), site,
                                         deadline)
            finally:
                self.hosts.release(site)
            if isinstance(redirect, str):
                current = redirect
                continue
            body, status, ctype = redirect
            return body, status, current, ctype
        raise FetchError("too_many_redirects", f"more than {cfg.max_redirects}")

    def _one_hop(self, session: requests.Session, url: str, ip, port: int, host: str, deadline: float):
        cfg = self.cfg
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise FetchError("timeout", f"total deadline {cfg.total_deadline_s:g}s")
        try:
            # prepare_request, not Request.prepare(): only it merges the session's headers (our
            # User-Agent with its opt-out URL, Accept); session.send() alone sends none of them.
            request = session.prepare_request(requests.Request("GET", url))
        except (requests.RequestException, ValueError, UnicodeError) as exc:
            raise FetchError("bad_url", _short(exc)) from exc
        request.pinned_ip = ip  # type: ignore[attr-defined]
        request.pinned_port = port  # type: ignore[attr-defined]
        guard = self.watchdog.arm(deadline)
        response = None
        try:
            try:
                response = session.send(
                    request, stream=True, allow_redirects=False,
                    timeout=(min(cfg.connect_timeout_s, remaining), min(cfg.read_timeout_s, remaining)),
                )
            except requests.exceptions.ConnectTimeout as exc:
                raise FetchError("timeout", f"connect: {exc}") from exc
            except (requests.exceptions.ReadTimeout, socket.timeout) as exc:
                raise FetchError("timeout", f"read: {exc}") from exc
            except requests.RequestException as exc:
                if guard.expired:
                    raise FetchError("timeout", f"total deadline {cfg.total_deadline_s:g}s") from exc
                if "refused:" in str(exc):
                    raise FetchError("blocked_address", _short(exc), skipped=True) from exc
                if isinstance(exc, requests.exceptions.InvalidHeader) and "Content-Length" in str(exc):
                    raise FetchError("bad_response", _short(exc)) from exc
                if "1xx responses" in str(exc):
                    raise FetchError("bad_response", f"more than {MAX_INFORMATIONAL_RESPONSES} 1xx responses") from exc
                raise FetchError("connection_error", _short(exc)) from exc
            except BlockedAddressError as exc:
                raise FetchError("blocked_address", str(exc), skipped=True) from exc
            except (ValueError, UnicodeError) as exc:  # a URL requests accepted but cannot send
                raise FetchError("bad_url", _short(exc)) from exc
            status = response.status_code
            if status in (301, 302, 303, 307, 308):
                location = response.headers.get("Location")
                if not location:
                    raise FetchError("bad_redirect", "no Location header", http_status=status)
                try:
                    target = urljoin(url, location.strip())
                except ValueError as exc:  # the next hop's checks refuse the rest (scheme, host)
                    raise FetchError("bad_redirect", f"Location {location[:100]!r}", http_status=status) from exc
                return target
            if status in (429, 503):
                header = response.headers.get("Retry-After")
                retry_after = parse_retry_after(header, 1.0)
                self.hosts.back_off(host, retry_after)
                raise FetchError(f"http_{status}", f"Retry-After {(header or 'absent')[:40]!r}",
                                 http_status=status, retry_after=retry_after)
            if status != 200:
                raise FetchError(f"http_{status}", (response.reason or "")[:60], http_status=status)
            if cfg.respect_robots_headers and cfg.disallowed_robots_values:
                tags = response.raw.headers.getlist("X-Robots-Tag") if hasattr(
                    response.raw.headers, "getlist") else [response.headers.get("X-Robots-Tag", "")]
                refused = robots_refusal([t for t in tags if t], self.token, cfg.disallowed_robots_values)
                if refused:
                    raise FetchError("robots_disallowed", f"X-Robots-Tag {refused}", http_status=status,
                                     skipped=True)
            try:
                length = parse_content_length(response.headers.get("Content-Length"))
                decoder = BodyDecoder(response.headers.get("Content-Encoding"), cfg.max_bytes)
            except FetchError as exc:
                exc.http_status = status
                raise
            if length is not None and length > cfg.max_bytes:
                raise FetchError("too_large", f"Content-Length {length} > {cfg.max_bytes}", http_status=status)
            body = self._read_body(response, deadline, guard, length, decoder)
            return body, status, response.headers.get("Content-Type")
        finally:
            self.watchdog.disarm(guard)
            if response is not None:
                if response.raw is not None and getattr(response, "_fully_read", False):
                    response.raw.release_conn()
                else:
                    response.close()

    def _read_body(self, response: requests.Response, deadline: float, guard: _Guard,
                   expected: Optional[int], decoder: BodyDecoder) -> bytes:
        """The body as sent (Content-Length counts these bytes), then decoded under the byte cap."""
        cfg = self.cfg
        chunks: list[bytes] = []
        size = 0
        raw = response.raw
        try:
            while True:
                if time.monotonic() >= deadline:
                    raise FetchError("timeout", f"total deadline {cfg.total_deadline_s:g}s (body)",
                                     http_status=response.status_code)
                chunk = raw.read(READ_CHUNK, decode_content=False)
                if not chunk:
                    break
                size += len(chunk)
                if size > cfg.max_bytes:
                    raise FetchError("too_large", f"body over {cfg.max_bytes} bytes",
                                     http_status=response.status_code)
                chunks.extend(decoder.feed(chunk) if decoder.codings else (chunk,))
            decoder.finish()
        except FetchError as exc:
            exc.http_status = response.status_code
            raise
        except Exception as exc:  # socket shut by the watchdog, reset, protocol error
            if guard.expired or time.monotonic() >= deadline:
                raise FetchError("timeout", f"total deadline {cfg.total_deadline_s:g}s (body)",
                                 http_status=response.status_code) from exc
            if isinstance(exc, (socket.timeout, requests.exceptions.ReadTimeout)) or "timed out" in str(exc):
                raise FetchError("timeout", f"read: {_short(exc)}", http_status=response.status_code) from exc
            if "IncompleteRead" in repr(exc) or isinstance(exc, urllib3.exceptions.IncompleteRead):
                raise FetchError("truncated", f"connection closed after {size} of {expected} bytes",
                                 http_status=response.status_code) from exc
            raise FetchError("connection_error", f"body: {_short(exc)}",
                             http_status=response.status_code) from exc
        if guard.expired:
            raise FetchError("timeout", f"total deadline {cfg.total_deadline_s:g}s (body)",
                             http_status=response.status_code)
        if expected is not None and expected != size:
            raise FetchError("truncated", f"got {size} of {expected} bytes", http_status=response.status_code)
        response._fully_read = True  # type: ignore[attr-defined]
        return b"".join(chunks)


def split_target(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of a URL we may fetch, or a FetchError with a stable code: a URL from
    the web is hostile (`http://[::1/`, `http://a:99999/`, `javascript:`, a NUL in the host)."""
    try:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise FetchError("unsupported_scheme", repr(scheme[:20]), skipped=True)
        if "\\" in parts.netloc:
            # urlsplit reads `a\@b` as userinfo `a\` and host b; urllib3 and browsers end the host
            # at the backslash (a). The host we check must be the one the request names.
            raise FetchError("bad_url", "backslash in the authority")
        host = (parts.hostname or "").lower()
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError as exc:  # bad IPv6 literal, port out of range
        raise FetchError("bad_url", _short(exc)) from exc
    if not host or len(host) > 253 or any(c in host for c in "\x00\t\r\n /\\@"):
        raise FetchError("bad_url", f"host {host[:60]!r}")
    return scheme, host, port


def _short(exc: BaseException, limit: int = 200) -> str:
    """`Type: message` without memory addresses or control characters, capped."""
    return clean_detail(f"{type(exc).__name__}: {exc}", limit)
