"""``python -m dynsila.infer RUN_DIR``: thresholded early-exit inference on a run (the command line of
:mod:`dynsila.deploy.infer`; ``--help`` lists the options)."""

import sys

from dynsila.deploy.infer import main

if __name__ == "__main__":
    sys.exit(main())
