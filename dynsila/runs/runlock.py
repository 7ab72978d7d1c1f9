"""One writer per run directory: an advisory lock that the operating system releases when its holder dies.

Two training processes started on the same ``name`` would interleave their checkpoints and metrics rows. The
first takes ``fcntl.flock`` on ``runs/<name>/.lock`` for as long as it trains; the second finds it held and
stops with one line. A lock file that merely exists proves nothing (a killed run leaves it behind), so the file
is never removed and never read: the lock is the kernel's, dropped with the holder's file descriptor, so a
SIGKILLed run never leaves a stuck lock and ``resume=true`` can always take it. While holding it, the leftovers
of writes a kill interrupted (``.<file>.<random>.tmp``, see ``checkpoint.atomic_write``) are removed: no other
process can be writing them.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from dynsila.errors import DynsilaError

log = logging.getLogger(__name__)
LOCK_FILE = ".lock"


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir``'s lock (creating the folder) while the block runs; one line if another process has it."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:  # out_dir is a file, read-only, full: one line on every rank (the caller broadcasts it)
        raise DynsilaError(
            f"cannot create the run directory {run_dir} ({e.strerror or e}); choose another out_dir or name"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DynsilaError(
            f"run directory {run_dir} is in use by another training process; wait for it to end, stop it, or "
            "choose another name=..."
        ) from None
    try:
        remove_interrupted_writes(run_dir)
        yield
    finally:
        os.close(fd)  # releases the lock


def remove_interrupted_writes(run_dir: Path) -> None:
    """Delete the temporary files of atomic writes that a kill interrupted (never a finished file)."""
    for leftover in Path(run_dir).rglob(".*.tmp"):
        with contextlib.suppress(OSError):
            leftover.unlink()
            log.info(f"removed {leftover.name}, left by an interrupted write")


STUB_FILES = {"config.yaml"}  # what a run writes before its first epoch: alone, a run that stopped at once


def holds_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds anything a run wrote beyond a stub: not just its lock file, nor the config.yaml of
    a run that stopped before its first epoch (a corrupt image, a Ctrl-C), which the rerun writes again."""
    run_dir = Path(run_dir)
    return run_dir.is_dir() and any(not _bookkeeping(p.name) and p.name not in STUB_FILES for p in run_dir.iterdir())


def _bookkeeping(name: str) -> bool:
    """The lock file, or an interrupted write's temporary file."""
    return name == LOCK_FILE or (name.startswith(".") and name.endswith(".tmp"))


def refuse_existing_run(run_dir: Path, resume: bool, force: bool) -> None:
    """One line when a run already lives in ``run_dir`` and the command neither resumes nor overwrites it."""
    if holds_run(run_dir) and not (resume or force):
        raise DynsilaError(
            f"run directory {run_dir} already exists; pass resume=true to continue it, --force to "
            "overwrite it, or another name=..."
        )

