"""What every command line shares: one ``error: ...`` line for any input it refuses, flags checked for range.

A user who mistypes a flag, passes a negative budget or points at a file they cannot read should see one line
naming the problem and the fix, and no traceback. ``OneLineParser`` makes argparse's own refusals (a missing
argument, a value that is not a number, a value out of range) one line; ``number`` builds the flag types that
check the range; ``fail`` prints a refused input (``DynsilaError``) or an operating-system failure (a file that
cannot be read or written: ``OSError``) as one line and returns the exit status 2.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from typing import NoReturn

import torch

from dynsila.config import name_problem
from dynsila.errors import DynsilaError

EXIT_REFUSED = 2
USER_ERRORS = (DynsilaError, OSError)  # what a command line reports in one line; anything else is a bug


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a refused command line is one line (argparse prints the usage first: two or more lines)."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {self.prog}: {message}; see {self.prog} --help", file=sys.stderr)
        raise SystemExit(EXIT_REFUSED)


def number(
    kind: Callable[[str], float], low: float | None = None, high: float | None = None, *, low_open: bool = False
) -> Callable[[str], float]:
    """An argparse ``type`` reading a finite ``kind`` (int or float) within [low, high] (``low_open``: (low, high])."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        below = low is not None and (value <= low if low_open else value < low)
        if not math.isfinite(value) or below or (high is not None and value > high):
            left = "(" if low_open else "["
            span = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}]"
            raise argparse.ArgumentTypeError(f"{text} is outside {span}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


positive = number(float, 0.0, low_open=True)
at_least_one = number(int, 1)


def plain_name(text: str) -> str:
    """An argparse ``type`` for a name that becomes a file or folder name inside a folder we choose."""
    problem = name_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a plain name: {problem}")
    return text


def device_name(text: str) -> str:
    """An argparse ``type`` for ``--device``: a torch device this machine has (cpu, cuda, cuda:1)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device name (cpu, cuda, cuda:1)") from None
    if device.type == "cpu":
        return text
    if device.type != "cuda" or not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"device {text!r} is not available here; use cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text


def fail(error: BaseException) -> int:
    """Print ``error`` as one ``error: ...`` line on stderr; the exit status of a refused input."""
    print(f"error: {one_line(error)}", file=sys.stderr)
    return EXIT_REFUSED


def one_line(error: BaseException) -> str:
    """The error's message on one line. An OSError names the file and says what to check (the library raises its
    own errors for the files it reads; this covers what the operating system refuses: permissions, a full disk,
    a folder where a file was expected)."""
    if isinstance(error, OSError) and not isinstance(error, DynsilaError):
        where = f" ({error.filename})" if error.filename else ""
        text = f"{error.strerror or error}{where}; check the path, its permissions and the free disk space"
    else:
        text = str(error)
    if "Original Traceback" in text:  # re-raised from a DataLoader worker: the worker's own last line is the error
        text = text.strip().splitlines()[-1].split(": ", 1)[-1]
    return " ".join(text.split())
