"""Running a trained network for real: batch-norm folding (``fuse``), the PyTorch early-exit runner
(``runner``), ONNX export (``export``) and its ONNX Runtime runner (``onnx_runner``), and thresholded inference on a
run (``infer``). May import every lower layer (foundation, ``dynsila.models``, ``dynsila.methods``,
``dynsila.budget``, ``dynsila.runs``, ``dynsila.evaluation``); never ``dynsila.training``, its sibling.
"""
