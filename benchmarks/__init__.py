"""alignkit benchmarks: alignkit's path vs a baseline, measured in the same process, reported as ratios.

``python -m benchmarks.run --suite cpu --size smoke`` (or ``alignkit bench ...``); see ``run.py``.
"""
