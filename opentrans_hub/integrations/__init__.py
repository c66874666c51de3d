"""Adapters for training frameworks. Each imports its framework lazily, so the package works without it."""
