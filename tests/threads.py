"""The one thread-race harness of the tests: start the racers together and report every racer's error."""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def all_at_once(count: int, work: Callable[[int], T], *, timeout: float = 180) -> list[T]:
    """work(0), ..., work(count - 1) on `count` threads released together by one barrier; their results in order.
    An error in any racer fails the call after every racer has ended, naming the racer."""
    start, results, errors = threading.Barrier(count, timeout=timeout), [None] * count, []

    def racer(i: int) -> None:
        try:
            start.wait()
            results[i] = work(i)
        except Exception as e:                        # noqa: BLE001 - reported below, with the racer's number
            errors.append(f"racer {i}: {type(e).__name__}: {e}")
            start.abort()
    threads = [threading.Thread(target=racer, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    assert not errors and not any(t.is_alive() for t in threads), errors
    return results
