"""alignkit benchmarks: alignkit's path vs a baseline, measured in the same process, reported as ratios.

``python -m benchmarks.run --suite cpu --size smoke`` from a source checkout (not part of the installed
package); see ``run.py``.
"""
