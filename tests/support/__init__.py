"""Helpers the test modules and workers share (imported as ``support.<module>``; ``conftest.py`` puts ``tests/`` on
sys.path, ``support.processes`` puts it on a subprocess's PYTHONPATH)."""
