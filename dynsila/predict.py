"""``python -m dynsila.predict RUN_DIR IMAGES...``: classify image files with a run's early-exit network, into a
CSV (the command line of :mod:`dynsila.deploy.predict`; ``--help`` lists the options)."""

import sys

from dynsila.deploy.predict import main

if __name__ == "__main__":
    sys.exit(main())
