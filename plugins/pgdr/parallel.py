"""Calls to the bucket made side by side: a round trip to object storage costs tens of milliseconds, and a listing of
hundreds of backups or a manifest of thousands of files would otherwise pay them one after another."""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor


def bounded_map(fn, items, workers: int, name: str) -> list:
    """Return ``[fn(item) for item in items]``, ``workers`` at a time, with few calls queued at once.

    ``ThreadPoolExecutor.map`` submits every item before the first result: a manifest that lists a
    million files (from the bucket, so from anyone who can write there) would make a million
    futures. Here at most ``2 * workers`` wait; the first error is raised once the running calls end.
    """
    results: list = []
    pending: deque = deque()
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix=name) as pool:
        for item in items:
            if len(pending) >= 2 * max(1, workers):
                results.append(pending.popleft().result())
            pending.append(pool.submit(fn, item))
        while pending:
            results.append(pending.popleft().result())
    return results
