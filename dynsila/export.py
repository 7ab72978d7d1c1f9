"""``python -m dynsila.export RUN_DIR``: export a run's deploy model to ONNX (the command line of
:mod:`dynsila.deploy.run_export`; ``--help`` lists the options)."""

import sys

from dynsila.deploy.run_export import main

if __name__ == "__main__":
    sys.exit(main())
