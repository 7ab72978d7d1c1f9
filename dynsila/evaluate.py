"""``python -m dynsila.evaluate RUN_DIR``: evaluate a finished run, write its eval.json (the command line of
:mod:`dynsila.evaluation.evaluate`; ``--help`` lists the options)."""

import sys

from dynsila.evaluation.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
