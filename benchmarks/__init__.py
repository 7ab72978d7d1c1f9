"""Benchmarks: scripts run as ``python benchmarks/<name>.py``, sharing ``benchmarks.toolkit``."""
