"""The package version, recorded in every artifact, checkpoint and export."""

__version__ = "0.1.0"
