"""Decoding ahead of the model: inputs prepared in order by a bounded thread pool, so that the
next images are read while the model runs, and an image repeated within the window is read once.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def source_key(source: Any) -> Any:
    """What makes two queries' images the same: the path, or the very object."""
    if isinstance(source, (str, Path)):
        return ("path", str(Path(source).expanduser()))
    return ("object", id(source))


def decode_ahead(
    prepare: Callable[[int, Any], T], sources: Sequence[Any], workers: int, ahead: int
) -> Iterator[T]:
    """``prepare(i, source)`` for every source, in order, up to ``ahead`` queries in advance on
    ``workers`` threads. An image repeated within that window (one image, several texts; a JSONL
    file that lists one photo several times in a row) is decoded once."""
    if workers == 0:
        last_key, last = None, None
        for i, src in enumerate(sources):
            key = source_key(src)
            if key != last_key:
                last_key, last = key, prepare(i, src)
            yield last
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="oneref-decode")
    window: OrderedDict[Any, Future] = OrderedDict()
    pending: deque[Future] = deque()
    todo = iter(enumerate(sources))

    def submit_next() -> None:
        nxt = next(todo, None)
        if nxt is None:
            return
        i, src = nxt
        key = source_key(src)
        fut = window.get(key)
        if fut is None:
            fut = window[key] = pool.submit(prepare, i, src)
            if len(window) > ahead:
                window.popitem(last=False)
        else:
            window.move_to_end(key)
        pending.append(fut)

    try:
        for _ in range(ahead):
            submit_next()
        while pending:
            fut = pending.popleft()
            submit_next()
            yield fut.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
