"""Progress lines for long phases that are not training steps (writing the world's shards, reading captions for the
text tokenizer): one line every PROGRESS_EVERY_S seconds and one at the end, with an ETA when the total is known."""

import time
from collections.abc import Iterable, Iterator

from absl import logging

PROGRESS_EVERY_S = 30.0


def logged(items: Iterable, what: str, total: int | None = None, every_s: float = PROGRESS_EVERY_S) -> Iterator:
    """`items`, logging '<what>: n/total (p%), s elapsed, ETA s' (or 'n, s elapsed' without a total) every
    `every_s` seconds and when the last item has been consumed."""
    start = last = time.monotonic()
    done = 0
    for done, item in enumerate(items, 1):
        yield item
        now = time.monotonic()
        if now - last >= every_s or done == total:
            last = now
            _log(what, done, total, now - start)
    if done != total:  # ended early, or no total: the final count
        _log(what, done, total, time.monotonic() - start)


def _log(what: str, done: int, total: int | None, elapsed: float) -> None:
    if total:
        eta = elapsed / max(done, 1) * (total - done)
        logging.info("%s: %d/%d (%.0f%%), %.0f s elapsed, ETA %.0f s", what, done, total, 100 * done / total,
                     elapsed, eta)
    else:
        logging.info("%s: %d, %.0f s elapsed", what, done, elapsed)
