"""Python as if the deploy extra were not installed: put this folder first on PYTHONPATH.

``pip install -e ".[dev]"`` (no onnx, onnxruntime, onnxscript) must pass its tests as ``.[dev,deploy]`` does.
Python imports ``sitecustomize`` at start-up, in every process (the tests' subprocesses too); this one replaces
the path finder with one that does not see the three packages, so ``import onnx`` fails and
``importlib.util.find_spec("onnx")`` is None, exactly as on a machine without them.
"""

import importlib.machinery
import sys

HIDDEN = {"onnx", "onnxruntime", "onnxscript"}


class PathFinderWithoutDeploy(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):  # noqa: ANN001, ANN206 - the finder protocol
        if name.partition(".")[0] in HIDDEN:
            return None
        return super().find_spec(name, path, target)


sys.meta_path[:] = [PathFinderWithoutDeploy if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
