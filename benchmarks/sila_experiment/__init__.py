"""The anytime experiment that asks whether SiLa helps: the run grid, its report, paired statistics and the
last-epoch diagnostic. ``python benchmarks/sila_experiment/anytime.py --preset cpu`` (or ``python
benchmarks/anytime.py``); results in ``benchmarks/results/anytime_cifar10_dev2*``."""
