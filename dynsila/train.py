"""``python -m dynsila.train CONFIG [overrides]``: train the network a config describes (the command line of
:mod:`dynsila.training.train`; ``--help`` lists the options)."""

import sys

from dynsila.training.train import main

if __name__ == "__main__":
    sys.exit(main())
