"""The library version, in its own module so the CLI and file headers read it without importing the package API."""

__version__ = "0.3.0"
