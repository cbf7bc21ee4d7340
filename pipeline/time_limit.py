"""A call with a time limit, for model code that may hang on one input.

Ray Data has no per-batch timeout (ray-project/ray issues 45661 and 39800), and Python cannot stop a
thread. So the call runs in a daemon thread and the caller stops *waiting* at the limit: a hung call
runs on in the background (holding what it holds) while the caller moves on, and its result, if it
ever comes, is dropped. That is what keeps one pathological image from stalling a labeler pool; a
call that never returns costs one idle thread, not the job.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

Result = TypeVar("Result")


class TimeLimitExceeded(Exception):
    """The call had not returned when its time limit was up."""


def within(seconds: float, function: Callable[..., Result], *args: Any) -> Result:
    """``function(*args)``, or :class:`TimeLimitExceeded` once ``seconds`` have passed without it
    returning; an exception it raises in time is raised here."""
    outcome: dict[str, Any] = {}

    def call() -> None:
        try:
            outcome["value"] = function(*args)
        except BaseException as err:  # noqa: BLE001 - handed to the caller below
            outcome["error"] = err

    thread = threading.Thread(
        target=call, name=f"time-limited {getattr(function, '__qualname__', function)}", daemon=True
    )
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeLimitExceeded(f"no result after {seconds:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
