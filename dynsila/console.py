"""What the command-line tools print: dynsila's log records as bare lines.

The library logs (``logging.getLogger(__name__)`` in each module) and never prints; a CLI's ``main()`` wraps its
work in ``log_lines_to(sys.stdout)`` so the user sees the messages exactly as written, one per line. Code that
calls the library can do the same with any text stream (a benchmark's log file), or configure ``logging`` itself.
A module that also runs as ``python -m dynsila.<module>`` names its logger explicitly (``"dynsila.train"``):
there its ``__name__`` is ``"__main__"``, outside the ``dynsila`` logger this handler listens to.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from typing import TextIO

ROOT_LOGGER = "dynsila"


@contextlib.contextmanager
def log_lines_to(stream: TextIO, level: int = logging.INFO) -> Iterator[None]:
    """While the block runs, write every ``dynsila.*`` record at ``level`` or above to ``stream``, message only.

    Under torchrun only rank 0 gets the handler (the library already logs its progress on rank 0 only; this
    keeps per-rank lines such as the data summary from repeating N times)."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    logger = logging.getLogger(ROOT_LOGGER)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.setLevel(level)
    previous_level = logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > level:
        logger.setLevel(level)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)


class Clock:
    """Throughput and ETA over the steps this process runs."""

    def __init__(self, total_steps: int) -> None:
        self.start, self.total, self.steps, self.images = time.perf_counter(), total_steps, 0, 0

    def tick(self, images: int) -> None:
        self.steps += 1
        self.images += images

    def images_per_second(self) -> float:
        return self.images / max(1e-9, time.perf_counter() - self.start)

    def eta(self) -> str:
        elapsed = time.perf_counter() - self.start
        remaining = elapsed / max(1, self.steps) * (self.total - self.steps)
        return time.strftime("%H:%M:%S", time.gmtime(remaining))
