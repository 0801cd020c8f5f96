"""The package version, apart so that modules reading it import nothing else."""

__version__ = "0.1.0"
