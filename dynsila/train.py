"""``python -m dynsila.train CONFIG [overrides]``: train the network a config describes (the loop is
:mod:`dynsila.training.train`; ``--help`` lists the options)."""

from __future__ import annotations

import sys

from dynsila.cli import USER_ERRORS, OneLineParser, fail
from dynsila.config import load_config
from dynsila.console import log_lines_to
from dynsila.runs import rundir
from dynsila.training.train import train


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m dynsila.train", description="train the network a config describes")
    parser.add_argument("config", help="YAML config, e.g. configs/msdnet_sila.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=2 data.batch_size=32")
    parser.add_argument("--force", action="store_true", help="overwrite an existing run directory")
    parser.add_argument("--technique", action="append", default=[], metavar="FILE.py",
                        help="a Python file that registers a training technique (repeatable); its keys can then be "
                        "set like any other; the run's config.yaml records the file")  # fmt: skip
    args = parser.parse_intermixed_args(argv)  # overrides may follow --technique FILE
    cfg = None
    with log_lines_to(sys.stdout):  # the library's log records, printed as plain lines
        try:
            cfg = load_config(args.config, args.overrides, args.technique)
            train(cfg, force=args.force)
        except USER_ERRORS as e:
            return fail(e)
        except KeyboardInterrupt:
            print(rundir.interrupted_line(cfg, args.config, args.overrides), file=sys.stderr)
            return EXIT_INTERRUPTED
    return 0


EXIT_INTERRUPTED = 130  # the shell's status for a process ended by SIGINT


if __name__ == "__main__":
    sys.exit(main())
