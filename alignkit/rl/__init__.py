"""From-scratch RL core (GRPO building blocks); see :mod:`alignkit.rl.core`."""
from alignkit.rl.core import *
from alignkit.rl.core import __all__  # noqa: F401
