"""oneref: fast, faithful OneRef (NeurIPS 2024) on BEiT-3."""

__version__ = "0.1.0"
