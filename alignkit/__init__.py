"""alignkit: SFT, preference alignment and RL with verifiable rewards, from data to evaluated model."""

__version__ = "0.1.0"
