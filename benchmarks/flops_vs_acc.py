"""``python benchmarks/flops_vs_acc.py``: the short command the documentation uses; it runs
``benchmarks/accuracy/flops_vs_acc.py`` with the same arguments."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, so ``benchmarks`` imports

from benchmarks.accuracy.flops_vs_acc import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
