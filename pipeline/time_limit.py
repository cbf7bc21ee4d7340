"""A call with a time limit, for model code that may hang on one input.

Python cannot stop a thread. So the call runs in a worker thread and the caller stops *waiting* at
the limit: a hung call runs on in the background (holding what it holds) while the caller moves
on, and its result, if it ever comes, is dropped. That is what keeps one pathological image from
stalling a labeler pool; a call that never returns costs one idle thread, not the job.

The worker thread lives on between calls (one per calling thread) and is replaced only when a call
overruns. A new thread per call cost the labelling models about a fifth of their speed: the
libraries under torch keep per-thread state (scratch buffers, caches) that every new thread built
again (pipeline/label_actor.py's labelers, one thread, 8-image batches: 0.19 s an image called
directly, 0.23 s through a new thread each time).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

Result = TypeVar("Result")


class TimeLimitExceeded(Exception):
    """The call had not returned when its time limit was up."""


class _Call:
    """One call handed to a worker, and its outcome once the worker has run it."""

    def __init__(self, function: Callable[..., Any], args: tuple):
        self.function, self.args = function, args
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None


class _Worker:
    """A daemon thread running the calls put on its queue, one at a time, until told to stop."""

    def __init__(self):
        self.calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        threading.Thread(target=self._run, name="time-limited calls", daemon=True).start()

    def _run(self) -> None:
        while (call := self.calls.get()) is not None:
            try:
                call.value = call.function(*call.args)
            except BaseException as err:  # noqa: BLE001 - handed to the caller
                call.error = err
            call.done.set()


_workers = threading.local()
"""Each calling thread's worker: a caller never waits behind another caller's call."""


def within(seconds: float, function: Callable[..., Result], *args: Any) -> Result:
    """``function(*args)``, or :class:`TimeLimitExceeded` once ``seconds`` have passed without it
    returning; an exception it raises in time is raised here."""
    worker = getattr(_workers, "worker", None) or _Worker()
    _workers.worker = worker
    call = _Call(function, args)
    worker.calls.put(call)
    if not call.done.wait(seconds):
        # That thread is stuck in the call: it stops once (if ever) the call returns, and the next
        # call gets a fresh one.
        worker.calls.put(None)
        _workers.worker = None
        raise TimeLimitExceeded(f"no result after {seconds:g} s")
    if call.error is not None:
        raise call.error
    return call.value
