"""A time-limited call: its result or its error in time, TimeLimitExceeded after, on a worker thread
that lives on between calls (the models keep their per-thread state) and is replaced after a hang."""

from __future__ import annotations

import threading

import pytest

from four_m.pipeline.time_limit import TimeLimitExceeded, within


def test_calls_return_their_result_or_raise_their_error_on_one_reused_thread():
    threads = [within(5, threading.get_ident) for _ in range(3)]
    assert len(set(threads)) == 1 and threads[0] != threading.get_ident()
    with pytest.raises(ZeroDivisionError):
        within(5, lambda: 1 / 0)
    assert within(5, threading.get_ident) == threads[0]  # an error does not cost the thread


def test_a_call_past_its_limit_is_left_behind_and_the_next_call_gets_a_new_thread():
    release = threading.Event()
    before = within(5, threading.get_ident)
    with pytest.raises(TimeLimitExceeded, match="no result after 0.2 s"):
        within(0.2, release.wait)
    after = within(5, threading.get_ident)
    assert after != before
    release.set()  # the hung call ends; its thread then stops


def test_each_calling_thread_has_its_own_worker():
    seen = {}

    def caller(name: str) -> None:
        seen[name] = within(5, threading.get_ident)

    threads = [threading.Thread(target=caller, args=(n,)) for n in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen["a"] != seen["b"]
