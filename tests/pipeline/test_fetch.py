"""The guarded opener alone, against real listeners on 127.0.0.1 (the stage's own tests, with
img2dataset on Ray, are in test_download.py)."""

from __future__ import annotations

import contextlib
import http.client
import http.server
import socket
import threading
import time
import urllib.request

import pytest

from four_m.core.images import ImageRejected
from four_m.pipeline.fetch import DeadlineExceeded, GuardedOpener

SOCKET_TIMEOUT_S = 120.0


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_the_deadline_cuts_a_server_that_never_answers(scheme):
    """https: the deadline holds during the TLS handshake too, before any http is spoken."""
    with socket.create_server(("127.0.0.1", 0)) as silent:  # the kernel completes TCP; nothing more
        opener = GuardedOpener(("http", "https"), deadline_s=1.0, max_bytes=1000)
        request = urllib.request.Request(f"{scheme}://127.0.0.1:{silent.getsockname()[1]}/x.jpg")
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded, match=r"^deadline exceeded: 1 s$"):
            opener.urlopen(request, timeout=SOCKET_TIMEOUT_S)
        # Cut by the deadline, not by the socket's timeout (a deadline noticed only then would raise the
        # same error): half that timeout leaves a loaded machine a minute, not a bound on its pace.
        assert time.monotonic() - started < SOCKET_TIMEOUT_S / 2


class _Bodies(http.server.BaseHTTPRequestHandler):
    """``/<n>``: n bytes with their length; ``/cut``: 500 of 2000 promised; ``/endless``: no length, no end."""

    def do_GET(self):
        self.send_response(200)
        if self.path == "/endless":
            self.end_headers()
            with contextlib.suppress(OSError):  # the client hangs up once it has read enough
                while True:
                    self.wfile.write(b"\0" * 65536)
            return
        size = 2000 if self.path == "/cut" else int(self.path[1:])
        self.send_header("Content-Length", str(size))
        self.end_headers()
        self.wfile.write(b"\0" * (500 if self.path == "/cut" else size))

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def bodies():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Bodies)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _read(url: str) -> bytes:
    opener = GuardedOpener(("http", "https"), deadline_s=30.0, max_bytes=1000)
    with opener.urlopen(urllib.request.Request(url), timeout=10.0) as response:
        return response.read()


def test_a_body_is_read_up_to_the_byte_limit_and_no_further(bodies):
    assert len(_read(f"{bodies}/1000")) == 1000
    with pytest.raises(ImageRejected, match=r"^file too large: more than 1000 bytes$"):
        _read(f"{bodies}/1001")
    started = time.monotonic()
    with pytest.raises(ImageRejected, match=r"^file too large"):  # without the limit: memory fills
        _read(f"{bodies}/endless")
    assert time.monotonic() - started < 10
    with pytest.raises(http.client.IncompleteRead):  # a body cut short still fails as one
        _read(f"{bodies}/cut")
