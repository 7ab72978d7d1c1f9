"""``python -m dynsila.convert {msdnet,skipnet} CHECKPOINT --config CONFIG --out RUN_DIR``: a published
checkpoint as a dynsila run directory, and back with ``--to authors`` (the command line of
:mod:`dynsila.deploy.convert`; ``--help`` lists the options)."""

import sys

from dynsila.deploy.convert import main

if __name__ == "__main__":
    sys.exit(main())
