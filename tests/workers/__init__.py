"""Rank functions for the multi-process tests: each runs on every spawned rank and compares the
pipelined run with the same model in one process. Importable by spawned ranks because
``tests/conftest.py`` puts the tests folder on ``sys.path`` (which spawned children inherit)."""
