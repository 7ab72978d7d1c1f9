"""Speed benchmarks: the early-exit runner, ONNX Runtime, SkipNet skipping, throughput, the budgeted sweep, the
GPU check.

Each script is run as ``python benchmarks/speed/<name>.py`` and writes ``benchmarks/results/<name>.{json,md}``."""
