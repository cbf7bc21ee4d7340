"""The guarded opener alone, against a real listener on 127.0.0.1 (the stage's own tests, with
img2dataset on Ray, are in test_download.py)."""

from __future__ import annotations

import socket
import time
import urllib.request

import pytest

from four_m.pipeline.fetch import DeadlineExceeded, GuardedOpener

SOCKET_TIMEOUT_S = 120.0


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_the_deadline_cuts_a_server_that_never_answers(scheme):
    """https: the deadline holds during the TLS handshake too, before any http is spoken."""
    with socket.create_server(("127.0.0.1", 0)) as silent:  # the kernel completes TCP; nothing more
        opener = GuardedOpener(("http", "https"), deadline_s=1.0)
        request = urllib.request.Request(f"{scheme}://127.0.0.1:{silent.getsockname()[1]}/x.jpg")
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded, match=r"^deadline exceeded: 1 s$"):
            opener.urlopen(request, timeout=SOCKET_TIMEOUT_S)
        # Cut by the deadline, not by the socket's timeout (a deadline noticed only then would raise the
        # same error): half that timeout leaves a loaded machine a minute, not a bound on its pace.
        assert time.monotonic() - started < SOCKET_TIMEOUT_S / 2
