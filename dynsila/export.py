"""``python -m dynsila.export RUN_DIR``: export a run's deploy model to ONNX (the command line of
:mod:`dynsila.deploy.export`; ``--help`` lists the options)."""

import sys

from dynsila.deploy.export import main

if __name__ == "__main__":
    sys.exit(main())
