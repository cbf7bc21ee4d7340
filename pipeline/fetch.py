"""How the download stage fetches one url: img2dataset's own ``download_image``, with three guards
that urllib lacks.

- **Redirects obey the listed urls' rule** (``url_problem``), checked before the redirected
  connection is made: urllib follows a 302 to ``ftp://`` (it refuses only a few schemes such as
  ``file://``), so any http server could steer the downloader to another protocol and host.
- **A total deadline per request** (``deadline_s``): urllib's timeout bounds each socket operation,
  so a server that sends a byte every few seconds holds a thread, and with it its shard, for as
  long as it likes. When the deadline passes, the request's socket is shut down; the blocked read
  returns at once and the row fails with ``deadline exceeded: N s``.
- **A body is read up to ``max_image_bytes``**, one byte more to tell, never to its end: img2dataset
  reads a whole body into memory, so a fast server sending without end would fill it inside the
  deadline. The row fails with ``file too large: more than N bytes`` (``core/images.py``'s wording,
  as a user's own image file is refused).

img2dataset has no hook for its opener: ``download_image`` calls ``urllib.request.urlopen``
through the ``urllib`` name of its own module. ``guarded_fetching`` repoints that one name, and
only while one shard downloads; urllib itself and every other user of it are untouched.
"""

from __future__ import annotations

import heapq
import http.client
import itertools
import os
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import img2dataset.downloader

from four_m.core.images import too_many_bytes


def url_problem(url: str | None, allowed_schemes: tuple[str, ...]) -> str | None:
    """Why ``url`` must not reach urllib, which would read file:// and ftp:// urls; None if it may.

    The one rule for listed urls and for every redirect they answer with.
    """
    if not url or not url.strip():
        return "empty url"
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname
    except ValueError as err:  # e.g. an unclosed [IPv6 bracket
        return f"invalid url: {err}"
    scheme = parts.scheme.lower()
    if scheme not in allowed_schemes:
        return f"unsupported url scheme {scheme or '(none)'!r} (allowed: {', '.join(allowed_schemes)})"
    if not host:
        return "invalid url: no host"
    return None


class RefusedRedirect(OSError):
    """A redirect to a url the stage would refuse in a list; the message starts with its reason."""


class DeadlineExceeded(OSError):
    """A request, redirects included, took longer than its deadline."""


class _Deadline:
    """One request's total time. When it runs out, the sockets handed to ``watch`` are shut down,
    which ends a read blocked on any of them at once."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expires = time.monotonic() + seconds
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._expired = False
        self._stopped = False
        _WATCHDOG.add(self)

    def watch(self, sock: socket.socket) -> None:
        """Shut ``sock`` down at the deadline (now, if it has passed).

        A duplicate descriptor is kept: shutting it down ends the connection even after TLS has
        taken over (and detached) the original socket object mid-handshake.
        """
        duplicate = sock.dup()
        with self._lock:
            self._sockets.append(duplicate)
            expired = self._expired
        if expired:
            _shut(duplicate)

    def stop(self) -> bool:
        """Stop the clock and release the sockets; whether the deadline had passed first (then
        whatever the request returned may have been cut short)."""
        with self._lock:
            expired = self._expired
            self._stopped = not expired
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            sock.close()
        return expired

    def expire(self) -> None:
        """The watchdog's call at the deadline: shut the request's sockets down, unless it is over."""
        with self._lock:
            if self._stopped:
                return
            self._expired = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shut(sock)

    def error(self) -> DeadlineExceeded:
        return DeadlineExceeded(f"deadline exceeded: {self.seconds:g} s")


def _shut(sock: socket.socket) -> None:
    with suppress(OSError):  # the peer may have closed it already
        sock.shutdown(socket.SHUT_RDWR)


class _Watchdog:
    """One thread per process that expires deadlines in time order; started on first use.

    A timer thread per request would cost about as much as the request's own Python work (0.3 ms).
    A deadline stopped early stays queued until its time, then expiring it does nothing.
    """

    def __init__(self) -> None:
        self._queue: list[tuple[float, int, _Deadline]] = []
        self._order = itertools.count()  # ties: never compare two deadlines
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    def add(self, deadline: _Deadline) -> None:
        with self._changed:
            heapq.heappush(self._queue, (deadline.expires, next(self._order), deadline))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fetch-deadlines", daemon=True)
                self._thread.start()
            if self._queue[0][2] is deadline:
                self._changed.notify()

    def _run(self) -> None:
        with self._changed:
            while True:
                now = time.monotonic()
                while self._queue and self._queue[0][0] <= now:
                    heapq.heappop(self._queue)[2].expire()
                self._changed.wait(self._queue[0][0] - now if self._queue else None)


_WATCHDOG = _Watchdog()
# A forked child has none of its parent's threads: it starts its own watchdog when it needs one.
os.register_at_fork(after_in_child=_WATCHDOG.__init__)


class _Watched:
    """Connection mixin: its socket is given to the request's deadline as soon as TCP connects.

    ``_create_connection`` is http.client's own seam between the TCP connect and the TLS
    handshake; watching from there bounds a trickled handshake too.
    """

    def __init__(self, *args: Any, deadline: _Deadline, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline = deadline
        self._create_connection = self._connect_watched

    def _connect_watched(self, *args: Any, **kwargs: Any) -> socket.socket:
        sock = socket.create_connection(*args, **kwargs)
        self._deadline.watch(sock)
        return sock


class _WatchedHTTPConnection(_Watched, http.client.HTTPConnection):
    pass


class _WatchedHTTPSConnection(_Watched, http.client.HTTPSConnection):
    pass


# The deadline rides on the request, as urllib's own per-request state (``timeout``) does: one
# opener then serves every thread of a shard.
class _WatchedHTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_WatchedHTTPConnection, req, deadline=req.deadline)


class _WatchedHTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_WatchedHTTPSConnection, req, deadline=req.deadline)


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to a url that ``url_problem`` accepts; refuses it before connecting."""

    def __init__(self, allowed_schemes: tuple[str, ...]) -> None:
        self.allowed_schemes = allowed_schemes

    def redirect_request(
        self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> urllib.request.Request | None:
        problem = url_problem(newurl, self.allowed_schemes)
        if problem:
            fp.close()
            raise RefusedRedirect(f"{problem}, redirected from {req.full_url}")
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None:
            new.deadline = req.deadline
        return new


class _DeadlineResponse:
    """What img2dataset uses of a response (a context manager, ``headers``, ``read()``), with a
    body that fails with the deadline's reason if the deadline cut it short (a body without a
    length would otherwise end quietly at the shutdown, truncated), or with the byte limit's if it
    is longer than ``max_bytes``."""

    def __init__(self, response: http.client.HTTPResponse, deadline: _Deadline, max_bytes: int) -> None:
        self._response = response
        self._deadline = deadline
        self._max_bytes = max_bytes
        self.headers = response.headers

    def read(self) -> bytes:
        try:
            body = self._response.read(self._max_bytes + 1)
        except (OSError, http.client.HTTPException) as err:
            if self._deadline.stop():
                raise self._deadline.error() from err
            raise
        if self._deadline.stop():
            raise self._deadline.error()
        if len(body) > self._max_bytes:
            raise too_many_bytes(self._max_bytes)
        if self._response.length:  # a read with a size returns a cut body short, where read() raises
            raise http.client.IncompleteRead(body, self._response.length)
        return body

    def __enter__(self) -> _DeadlineResponse:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._deadline.stop()
        self._response.close()


class GuardedOpener:
    """``urllib.request.urlopen`` as img2dataset calls it, with redirects checked and a deadline.

    One per shard, shared by its download threads (urllib's openers hold no per-request state).
    """

    def __init__(self, allowed_schemes: tuple[str, ...], deadline_s: float, max_bytes: int) -> None:
        self.deadline_s = deadline_s
        self.max_bytes = max_bytes
        self._opener = urllib.request.build_opener(
            _CheckedRedirects(allowed_schemes), _WatchedHTTPHandler(), _WatchedHTTPSHandler()
        )

    def urlopen(self, request: urllib.request.Request, timeout: float) -> _DeadlineResponse:
        request.deadline = deadline = _Deadline(self.deadline_s)
        try:
            response = self._opener.open(request, timeout=timeout)
        except Exception as err:
            if deadline.stop():
                raise deadline.error() from err
            raise
        return _DeadlineResponse(response, deadline, self.max_bytes)


# Repointing a module's name is process-wide: one shard at a time per process may hold it. A Ray
# worker runs one task at a time anyway; threads of one process sharing it would wait, not mix.
_PATCH_LOCK = threading.Lock()


@contextmanager
def guarded_fetching(allowed_schemes: tuple[str, ...], deadline_s: float, max_bytes: int) -> Iterator[None]:
    """Within the block, img2dataset's ``download_image`` opens urls through a ``GuardedOpener``."""
    opener = GuardedOpener(allowed_schemes, deadline_s, max_bytes)
    module = img2dataset.downloader
    with _PATCH_LOCK:
        original = module.urllib
        module.urllib = SimpleNamespace(request=SimpleNamespace(Request=urllib.request.Request, urlopen=opener.urlopen))
        try:
            yield
        finally:
            module.urllib = original
